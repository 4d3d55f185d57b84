"""Warnings on loss spikes and divergence, from the per-step losses read at report points.

A spike: a step's loss above `spike_factor` times the lowest loss seen so far (early steps fall fast, so the
running minimum is a stricter baseline than a moving mean). Divergence: a loss that is not finite (NaN or inf);
the run stops there, since every later step would be wasted.

Example:
    >>> from fused_optim.tools.training.monitor import LossMonitor
    >>> monitor = LossMonitor(spike_factor=1.5)
    >>> for step, loss in enumerate([5.0, 3.0, 4.9, float("nan")], start=1):
    ...     print(monitor.check(step, loss))
    None
    None
    step 3: loss 4.900 is 1.63x the lowest so far (3.000): a loss spike
    step 4: loss is nan: the run diverged
"""

from __future__ import annotations

import math


class LossMonitor:
    def __init__(self, spike_factor: float) -> None:
        self.spike_factor = spike_factor
        self.lowest = math.inf
        self.diverged = False
        self.warnings: list[str] = []

    def check(self, step: int, loss: float) -> str | None:
        """The warning for this step's loss, or None; kept in `warnings` too."""
        message = None
        if not math.isfinite(loss):
            if not self.diverged:  # said once: a diverged run's later losses stay NaN
                message = f"step {step}: loss is {loss}: the run diverged"
            self.diverged = True
        elif loss > self.spike_factor * self.lowest:
            message = (f"step {step}: loss {loss:.3f} is {loss / self.lowest:.2f}x the lowest so far "
                       f"({self.lowest:.3f}): a loss spike")
        if math.isfinite(loss):
            self.lowest = min(self.lowest, loss)
        if message is not None:
            self.warnings.append(message)
        return message

    def state_dict(self) -> dict:
        return {"lowest": self.lowest, "diverged": self.diverged, "warnings": list(self.warnings)}

    def load_state_dict(self, state: dict) -> None:
        self.lowest, self.diverged, self.warnings = state["lowest"], state["diverged"], list(state["warnings"])
