"""The files a `fused-optim` command is asked to write (`--json`, `--save`, `--plot`), checked before it trains or
measures for minutes rather than after."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def output_problem(outputs: dict[str, str | None]) -> str | None:
    """Why one of `outputs` (flag -> path; None: not asked for) cannot be written, naming its flag, else None: a
    `--plot` without matplotlib or with an ending matplotlib does not save as, a directory where the file would go,
    or a file where a folder of its path would go (a missing folder is made)."""
    plot = outputs.get("--plot")
    if plot and importlib.util.find_spec("matplotlib") is None:
        return "--plot needs matplotlib (pip install matplotlib)"
    if plot and Path(plot).suffix:
        from matplotlib.backend_bases import FigureCanvasBase  # (matplotlib's import takes a second: only here)

        formats = FigureCanvasBase.get_supported_filetypes()
        if Path(plot).suffix[1:].lower() not in formats:
            return (f"--plot {plot}: matplotlib does not save {Path(plot).suffix!r} files; end the name with one of "
                    f"{', '.join('.' + name for name in sorted(formats))}")
    for flag, path in outputs.items():
        if path is None:
            continue
        if Path(path).is_dir():
            return f"{flag} {path}: is a directory; give a file name"
        blocking = next((folder for folder in Path(path).parents if folder.exists() and not folder.is_dir()), None)
        if blocking is not None:
            return f"{flag} {path}: {blocking} is a file, not a folder"
    return None
