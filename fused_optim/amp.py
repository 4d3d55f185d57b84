"""`fused_optim.GradScaler`: torch.amp.GradScaler, except that a fused_optim optimizer checks the grads for inf/NaN
inside its own step.

torch's GradScaler, before it calls an optimizer's step, reads (and rewrites) every grad once to look for inf/NaN
(`_check_inf_per_device`). A fused_optim optimizer can do that check itself, in the pass that already reads the
grads for the clipping norm (AdamW(max_grad_norm=...)) or in a norm pass of its own: one read of the grads instead
of a read and a write, and no pass at all beyond the norm when clipping. The step writes what it found into the
`found_inf` tensor this scaler gives it, so `update()` backs the scale off exactly as torch's does.

The grads are left as backward made them, scaled: torch's unscale writes them back unscaled, and so do torch's
fused optimizers; call `unscale_` before the step to read them after it.

Everything else is torch's: other optimizers, `unscale_` called by the user (then torch's path runs), a closure,
sparse grads and differentiable groups (which torch's own update steps), a disabled scaler, `update`,
`state_dict`. With torch's own GradScaler our optimizers work too (they read `grad_scale`/`found_inf` on the
device), with torch's extra pass.

Example:
    >>> model = torch.nn.Linear(4, 2)
    >>> scaler = fused_optim.GradScaler("cpu")
    >>> opt = fused_optim.AdamW(model.parameters(), max_grad_norm=1.0)
    >>> loss = model(torch.randn(8, 4)).square().mean()
    >>> scaler.scale(loss).backward(); scaler.step(opt); scaler.update()
"""

from __future__ import annotations

from typing import Any

import torch
from torch.amp.grad_scaler import OptState

from fused_optim.optim._base import note_scaled_backward
from fused_optim.optim._guard import grad_of


def _note_backwards_of(scaled: Any) -> None:
    """A hook on each scaled tensor (in lists and tuples too) that backward will start from: it tells a
    gradient_release optimizer's hooks that the grads of that backward are scaled, before the first of them runs."""
    if isinstance(scaled, torch.Tensor):
        if scaled.requires_grad:
            scaled.register_hook(note_scaled_backward)
    elif isinstance(scaled, (list, tuple)):
        for item in scaled:
            _note_backwards_of(item)


class GradScaler(torch.amp.GradScaler):
    __doc__ = __doc__

    def scale(self, outputs: Any) -> Any:
        """torch's `GradScaler.scale`; a gradient_release optimizer then refuses, in the backward from the result and
        before it steps any param, to step with the scaled grads."""
        scaled = super().scale(outputs)
        if self._enabled:
            _note_backwards_of(scaled)
        return scaled

    def step(self, optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        """torch's `GradScaler.step`; for a fused_optim optimizer whose grads were not unscaled by the user, the
        inf/NaN check runs inside the optimizer's step (see the module docstring)."""
        if not self._enabled:
            return super().step(optimizer, *args, **kwargs)
        if getattr(optimizer, "gradient_release", False):
            raise RuntimeError(f"GradScaler cannot step a {type(optimizer).__name__} with gradient_release=True: each "
                               "param was already updated inside backward with its scaled grad, before any inf/NaN "
                               "check; use bf16 (no scaler) or drop gradient_release")
        state = self._per_optimizer_states[id(optimizer)]
        # torch's path for a closure (it is called only on a step that is not skipped, after the unscale) and for
        # grads the step cannot check
        if (args or kwargs or not getattr(optimizer, "_checks_grads_in_step", False)
                or state["stage"] is not OptState.READY or not _step_can_check(optimizer)):
            return super().step(optimizer, *args, **kwargs)
        self._check_scale_growth_tracker("step")
        scale = self._get_scale_async()
        found_inf = torch.zeros((), dtype=torch.float32, device=scale.device)
        state["found_inf_per_device"] = {scale.device: found_inf}
        optimizer.grad_scale = scale
        optimizer.found_inf = found_inf
        optimizer._grads_unchecked = True
        try:
            result = optimizer.step()
        finally:
            del optimizer.grad_scale, optimizer.found_inf, optimizer._grads_unchecked
        state["stage"] = OptState.STEPPED
        return result


def _step_can_check(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the optimizer's step can take the unscale and the inf/NaN check of its grads: some param has a grad
    (torch's path refuses a step with none: "No inf checks were recorded"), and no group is stepped by torch's own
    update, which takes no scale (a differentiable group, SGD's sparse grads)."""
    grads = [grad_of(p) for group in optimizer.param_groups for p in group["params"]]
    return (any(grad is not None for grad in grads) and not any(grad is not None and grad.is_sparse for grad in grads)
            and not any(group.get("differentiable", False) for group in optimizer.param_groups))
