"""``python -m relay`` is the ``labrelay`` command."""

from .cli import main

raise SystemExit(main())
