"""Forward / backward / optimizer times of a training loop without host syncs inside a step.

On a GPU a kernel launch returns before the kernel runs, so a host clock around the Python code measures launch
time, not work. The timer records CUDA events on the current stream between the phases instead and reads them
only in `flush()`, which the loop calls at its report points (the one sync there). On the CPU the ops run when they
are called, so a host clock (perf_counter) is exact.

Example:
    >>> import torch
    >>> from fused_optim.tools.training.timing import PhaseTimer
    >>> timer = PhaseTimer(torch.device("cpu"))
    >>> start = timer.mark()
    >>> _ = torch.randn(256, 256) @ torch.randn(256, 256)
    >>> timer.record("forward", start, timer.mark())
    >>> timer.flush()["forward"] > 0
    True
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch

PHASES = ("forward", "backward", "optimizer")


class PhaseTimer:
    """Seconds spent per phase, summed over everything recorded since construction."""

    def __init__(self, device: torch.device) -> None:
        self.on_gpu = device.type == "cuda"
        self.totals: dict[str, float] = defaultdict(float)
        self._pending: list[tuple[str, object, object]] = []

    def mark(self):
        """A point in time: a recorded CUDA event on a GPU, the host clock on the CPU."""
        if self.on_gpu:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def record(self, phase: str, start, end) -> None:
        """Counts the time from `start` to `end` (two marks) to `phase`, when it is next flushed."""
        self._pending.append((phase, start, end))

    def flush(self) -> dict[str, float]:
        """Adds the pending intervals to the totals (on a GPU: waits for the last event, one sync) and returns the
        totals in seconds."""
        if self._pending and self.on_gpu:
            self._pending[-1][2].synchronize()
        for phase, start, end in self._pending:
            self.totals[phase] += start.elapsed_time(end) / 1e3 if self.on_gpu else end - start
        self._pending.clear()
        return dict(self.totals)
