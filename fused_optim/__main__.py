"""`python -m fused_optim info | bench | train` (the `fused-optim` console script)."""

from fused_optim.cli import main

raise SystemExit(main())
