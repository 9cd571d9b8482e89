"""Conch glue: the client link, the relay server, channels, authentication and host keys."""
