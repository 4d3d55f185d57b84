"""`python -m fused_optim info | bench | train` (the `fused-optim` console script)."""

from fused_optim.tools.cli import main

raise SystemExit(main())
