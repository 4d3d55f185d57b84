"""What a fused_optim optimizer does around its update kernels, shared by Adam/AdamW and SGD: find each param's
gradient, fold GradScaler's unscale, the global-norm clip and the inf/NaN check into one factor and one flag that
stay on the device, and count the skipped steps.

The update kernels already multiply every grad by 1/grad_scale and skip everything when found_inf != 0, so
clipping costs them nothing: the clip coefficient c is folded into the scale they divide by (grad_scale / c), and
a non-finite norm is folded into found_inf. The norm pass is the only extra read of the grads.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor

from fused_optim.clip_grad import clip_coefficient, global_norm

if TYPE_CHECKING:
    from torch.optim import Optimizer


def grad_of(p: Tensor) -> Tensor | None:
    """The gradient an optimizer steps `p` with: its fp32 `main_grad` (fused_optim.GradAccumulator) when set,
    else `p.grad`."""
    main_grad = getattr(p, "main_grad", None)
    return main_grad if main_grad is not None else p.grad


class StepGuard:
    """One optimizer's skip count, last grad norm, and the fold of clipping into its kernels' scale and flag."""

    def __init__(self, optimizer: Optimizer) -> None:
        self._optimizer = weakref.ref(optimizer)  # the optimizer holds its guard: no cycle, so `del opt` frees both
        # (a group may be empty: torch allows that, e.g. a "no weight decay" group with nothing in it)
        first_param = next((p for group in optimizer.param_groups for p in group["params"]), None)
        device = first_param.device if first_param is not None else torch.device("cpu")
        # A tensor made once and updated in place: a CUDA graph or a scheduler can hold on to it.
        self.skipped_steps = torch.zeros((), dtype=torch.float32, device=device)
        self.last_grad_norm: Tensor | None = None
        # Whether a step has had an inf/NaN check (max_grad_norm or a GradScaler): until one has, skipped_steps is
        # 0 and a reader (WarmupCosine's float mode) need not read it from the device.
        self.may_have_skipped = False

    def prepare(self, grads: list[Tensor], max_grad_norm: float | None, backend: str,
                norm_group: dist.ProcessGroup | None = None) -> tuple[Tensor | None, Tensor | None]:
        """The (grad_scale, found_inf) to hand the update kernels for a step over `grads`.

        GradScaler sets `grad_scale`/`found_inf` on the optimizer; fused_optim.GradScaler also sets
        `_grads_unchecked`, leaving the inf/NaN check to this step. found_inf is updated in place, so the
        scaler's `update()` sees what the step found."""
        optimizer = self._optimizer()
        grad_scale = getattr(optimizer, "grad_scale", None)
        found_inf = getattr(optimizer, "found_inf", None)
        if found_inf is not None and not isinstance(found_inf, Tensor):
            # torch's GradScaler sums its checks of the params' .grad (so does ours after a user's unscale_, torch's
            # path); with none to check (every grad a main_grad of GradAccumulator's, which it does not know) the
            # sum is the int 0, and its update() would fail next
            raise RuntimeError(
                f"GradScaler's unscale found no .grad to check on {type(optimizer).__name__}'s params (their "
                "gradients are GradAccumulator main grads): use fused_optim.GradScaler without unscale_, whose step "
                "checks main grads (clip with the optimizer's max_grad_norm=)"
            )
        reads_main_grads = found_inf is not None and self.reads_main_grads()
        if reads_main_grads and grad_scale is None and any(
                p.main_grad is not p.grad for group in optimizer.param_groups for p in group["params"]
                if getattr(p, "main_grad", None) is not None):
            # torch's GradScaler after the user's unscale_: it divided the params' .grad, and a bf16/fp16 param's
            # main grad is no .grad (an fp32 param's is: finalize() hands it over as both)
            raise RuntimeError(
                f"GradScaler.unscale_ unscaled only the .grad of {type(optimizer).__name__}'s params, not their "
                "GradAccumulator main grads, which would be stepped still scaled: do not call unscale_ (clip with "
                "the optimizer's max_grad_norm=, which clips the unscaled grads)")
        if not grads and norm_group is None and max_grad_norm is not None:
            self.last_grad_norm = torch.zeros_like(self.skipped_steps)  # no grads: 0, as clip_grad_norm_ gives
        # with norm_group every rank joins the all-reduce, its part of the params with grads or not
        if (grads or norm_group is not None) and (
                max_grad_norm is not None or getattr(optimizer, "_grads_unchecked", False) or reads_main_grads):
            norm = global_norm(grads, 2.0, backend) if grads else torch.zeros_like(self.skipped_steps)
            if norm_group is not None:  # this rank's part of the params (ZeRO): the parts' squares summed
                squares = norm.double().square()
                dist.all_reduce(squares, group=norm_group)
                norm = squares.sqrt()  # fp64 on every rank, whichever holds fp64 grads
            if grad_scale is not None:
                norm = norm / grad_scale.to(norm.device)  # the norm of the unscaled grads
            self.last_grad_norm = norm
            non_finite = (~torch.isfinite(norm)).to(torch.float32)
            if found_inf is None:
                found_inf = non_finite
            else:
                found_inf.add_(non_finite.to(found_inf.device))
            if max_grad_norm is not None:
                clip_coef = clip_coefficient(max_grad_norm, norm)
                grad_scale = (grad_scale.to(norm.device) if grad_scale is not None else 1.0) / clip_coef
        if found_inf is not None:
            self.may_have_skipped = True
            self.skipped_steps.add_((found_inf != 0).to(device=self.skipped_steps.device, dtype=torch.float32))
        return grad_scale, found_inf

    def reads_main_grads(self) -> bool:
        """Whether some param is stepped from a GradAccumulator main grad. torch's GradScaler checks only `.grad`
        for inf/NaN, so then the step checks the grads itself: it is skipped on an inf/NaN main grad (though torch's
        `update()` does not see it and keeps the scale; fused_optim.GradScaler does back off)."""
        return any(getattr(p, "main_grad", None) is not None
                   for group in self._optimizer().param_groups for p in group["params"])
