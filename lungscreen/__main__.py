"""``python -m lungscreen``: the same as the ``lungscreen`` command."""

from lungscreen.server.cli import main

raise SystemExit(main())
