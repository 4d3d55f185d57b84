"""The files a `fused-optim` command is asked to write (`--json`, `--save`, `--plot`), checked before it trains or
measures for minutes rather than after."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def output_problem(outputs: dict[str, str | None]) -> str | None:
    """Why one of `outputs` (flag -> path; None: not asked for) cannot be written, naming its flag, else None: a
    `--plot` without matplotlib, or a directory where the file would go (a missing folder is made)."""
    if outputs.get("--plot") and importlib.util.find_spec("matplotlib") is None:
        return "--plot needs matplotlib (pip install matplotlib)"
    for flag, path in outputs.items():
        if path is not None and Path(path).is_dir():
            return f"{flag} {path}: is a directory; give a file name"
    return None
