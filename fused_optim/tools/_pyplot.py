"""matplotlib's pyplot for the `--plot` PNGs of `fused-optim train` and `fused-optim bench`: imported only when a
plot is asked for (matplotlib is not a dependency), with the Agg backend (files only: no display needed)."""

from __future__ import annotations

from pathlib import Path


def png_name(path: str) -> str:
    """The file matplotlib's savefig writes for `path`: with no suffix it adds ".png"."""
    return path if Path(path).suffix else f"{path}.png"


def pyplot():
    """matplotlib.pyplot on the Agg backend; RuntimeError with what to install when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("--plot needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
