"""The ``labrelay`` command and its subcommands."""
