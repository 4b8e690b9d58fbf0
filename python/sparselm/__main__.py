"""``python -m sparselm``: the same command line as the ``sparselm`` script."""

from sparselm.cli import main

raise SystemExit(main())
