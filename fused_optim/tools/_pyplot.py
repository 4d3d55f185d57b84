"""matplotlib's pyplot for the `--plot` PNGs of `fused-optim train` and `fused-optim bench`: imported only when a
plot is asked for (matplotlib is not a dependency), with the Agg backend (files only: no display needed)."""

from __future__ import annotations


def pyplot():
    """matplotlib.pyplot on the Agg backend; RuntimeError with what to install when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("--plot needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
