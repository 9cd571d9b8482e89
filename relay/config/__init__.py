"""Node configuration: the schema (frozen dataclasses), TOML loader, OpenSSH grammar."""
