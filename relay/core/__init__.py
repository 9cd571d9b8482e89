"""Sans-IO policy and wire formats: no reactor, no sockets, time given in."""
