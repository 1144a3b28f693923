"""``python -m kdfast``: the same command line as the ``kdfast`` script."""
from kdfast.cli import main

raise SystemExit(main())
