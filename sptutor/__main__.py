"""``python -m sptutor``: the ``sptutor`` command."""

from sptutor.cli import main

raise SystemExit(main())
