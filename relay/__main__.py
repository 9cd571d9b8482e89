"""``python -m relay`` is the ``labrelay`` command."""

from relay.cli.main import main

raise SystemExit(main())
