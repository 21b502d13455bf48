"""`python -m fxconvert NAME`: see `fxconvert.cli`."""

from fxconvert.cli import main

raise SystemExit(main())
