"""fused_optim.lr_scheduler.WarmupCosine: linear warmup, then cosine decay, as a torch LRScheduler that also runs
on a tensor lr without a host sync and does not advance over skipped optimizer steps.

The schedule. Each group's lr is `base_lr * f(t)`, where t counts the optimizer steps that were taken (0 for the
first) and, with w = warmup_steps, T = total_steps, m = min_lr_ratio:

    t < w:        f(t) = (t + 1) / w                                      never 0, so the first step moves the weights
    w <= t < T:   f(t) = m + (1 - m) * (1 + cos(pi * (t - w) / (T - w))) / 2      1 at t = w, approaching m at T
    t >= T:       f(t) = m

warmup_steps=0 starts the cosine at 1. total_steps == warmup_steps is allowed: the cosine phase is empty, the lr
rises to base_lr on the last step (t = T - 1) and is m * base_lr on any step past the schedule.

Skipped steps. fused_optim optimizers count the steps they skipped on the device (GradScaler found an inf/NaN, or the
grad norm was not finite) in `optimizer.skipped_steps`, a 0-dim float32 tensor. Each scheduler step moves the
schedule's position t by 1 less the steps skipped since the last one, but never back: a skipped step does not use up
the warmup, and a scheduler stepped less often than the optimizer (or not after the steps it saw skipped) never
takes t below 0, where the warmup's lr would be 0 or negative. Optimizers without the attribute (torch's) count as
never skipping. The state_dict holds the position itself: after load_state_dict, skips are counted from the
optimizer's skipped_steps as it is then (a resumed fused_optim optimizer starts it again from 0), so a resumed run
continues identically. Resume in torch's order: build the scheduler, then load the optimizer's state and the
scheduler's. A float-lr scheduler built after the optimizer's load multiplies the loaded lr by f(0) (chainable, as
torch's LinearLR in SequentialLR does), and the run goes on at that fraction of its lr. A param group added to the
optimizer later (add_param_group) joins the schedule at the next step, its lr then as its base lr.

Two modes, chosen per param group:
- float lr (the usual case): torch's chainable form, lr_t = lr_{t-1} * f(t) / f(t-1) (the closed form where
  f(t-1) == 0), so it composes with other schedulers in ChainedScheduler and SequentialLR. Reading skipped_steps is
  a host read: on a GPU it costs one host sync per scheduler step, once the optimizer can skip (fused_optim's
  optimizers: from the first step that checked its grads for inf/NaN, i.e. with max_grad_norm or a GradScaler;
  without either, nothing is read).
- tensor lr (group["lr"] is a Tensor, or the group has capturable=True: its float lr becomes a 0-dim float32 tensor
  on the group's params' device when the scheduler is built): the lr is computed on the device, in the closed form,
  from the position kept as a device tensor (each step adds 1 less the skips since the last one, read from
  skipped_steps on the device), and written into the same lr tensor in place. Nothing is read on the host and no
  per-step Python value enters the device computation, so an optimizer step captured in a CUDA graph sees the new
  lr, and scheduler.step() can be captured itself (it then reads the skipped_steps tensor it was captured with;
  fused_optim's is updated in place). Chaining (a product with other schedulers' factors) applies to float lrs only:
  the closed form overwrites a tensor lr.

Example:
    >>> import torch, fused_optim
    >>> model = torch.nn.Linear(4, 2)
    >>> opt = fused_optim.AdamW(model.parameters(), lr=1.0)
    >>> sched = fused_optim.lr_scheduler.WarmupCosine(opt, warmup_steps=2, total_steps=6, min_lr_ratio=0.1)
    >>> lrs = []
    >>> for _ in range(7):
    ...     lrs.append(round(opt.param_groups[0]["lr"], 4))
    ...     model(torch.randn(8, 4)).square().mean().backward()
    ...     opt.step(); opt.zero_grad(); sched.step()
    >>> lrs
    [0.5, 1.0, 1.0, 0.8682, 0.55, 0.2318, 0.1]
"""

from __future__ import annotations

import math
import operator
import warnings
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

__all__ = ["WarmupCosine"]

_DEVICE_COUNTERS = ("_device_position", "_device_skipped_seen")  # tensor mode's position and skips seen


def _int_arg(name: str, value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f"WarmupCosine: {name} must be an int, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"WarmupCosine: {name} must be an int, got {value!r}") from None


class WarmupCosine(LRScheduler):
    """Linear warmup over `warmup_steps` optimizer steps, then cosine decay to `min_lr_ratio * base_lr` at
    `total_steps`; optimizer steps skipped for an inf/NaN grad (fused_optim's `optimizer.skipped_steps`; torch's
    GradScaler skips without calling step(), unseen) do not advance it, and a tensor
    lr is updated on the device (see the module docstring for the formula and the two modes).

    Args:
        optimizer: the optimizer whose param groups' lr it sets; each group's initial lr is its base_lr.
        warmup_steps: int >= 0; the lr of the t-th step (t = 0 first) is base_lr * (t + 1) / warmup_steps.
        total_steps: int >= max(1, warmup_steps); the cosine reaches min_lr_ratio * base_lr here, and stays.
        min_lr_ratio: the floor as a fraction of each group's base_lr, in [0, 1].
        last_epoch: as in torch's schedulers (-1 to start; resume with load_state_dict instead).

    Example:
        >>> import torch, fused_optim
        >>> opt = torch.optim.SGD(torch.nn.Linear(4, 2).parameters(), lr=0.1)
        >>> sched = fused_optim.lr_scheduler.WarmupCosine(opt, warmup_steps=4, total_steps=100)
        >>> sched.get_last_lr()
        [0.025]
    """

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_steps: int,
        total_steps: int,
        min_lr_ratio: float = 0.0,
        last_epoch: int = -1,
    ) -> None:
        warmup_steps = _int_arg("warmup_steps", warmup_steps)
        total_steps = _int_arg("total_steps", total_steps)
        if warmup_steps < 0:
            raise ValueError(f"WarmupCosine: warmup_steps must be >= 0, got {warmup_steps}")
        if total_steps < 1 or total_steps < warmup_steps:
            raise ValueError(
                f"WarmupCosine: total_steps must be >= 1 and >= warmup_steps ({warmup_steps}), got {total_steps}"
            )
        if isinstance(min_lr_ratio, bool) or not isinstance(min_lr_ratio, (int, float)):
            raise ValueError(f"WarmupCosine: min_lr_ratio must be a float, got {min_lr_ratio!r}")
        if not 0.0 <= min_lr_ratio <= 1.0:  # also rejects NaN
            raise ValueError(f"WarmupCosine: min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"{type(optimizer).__name__} is not an Optimizer")
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_lr_ratio = float(min_lr_ratio)

        float_lrs = {}  # of capturable groups, made tensors: given back if torch's checks below refuse
        for index, group in enumerate(optimizer.param_groups):
            if group.get("capturable", False) and not isinstance(group["lr"], Tensor):
                device = group["params"][0].device if group["params"] else torch.device("cpu")
                float_lrs[index] = group["lr"]
                group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)

        # The schedule's position t and the optimizer's skip count as of the last step: a step moves t by 1 less
        # the skips since then. Float mode keeps them on the host, with the factor last applied (the chainable
        # form divides by it; 1 before the first step, which multiplies the initial lr by f(0)).
        self._position = last_epoch
        self._skipped_seen = self._read_skipped(optimizer) if self._has_float_group(optimizer.param_groups) else 0
        self._last_factor = 1.0
        self._chained_groups = len(optimizer.param_groups)
        # Tensor mode keeps them as float64 tensors on the device of the first tensor lr, changed only by device
        # ops whose arguments are the same every step, so scheduler.step() can be captured in a CUDA graph.
        self._device_position: Tensor | None = None
        self._device_skipped_seen: Tensor | None = None
        self._make_device_counters(optimizer, last_epoch)
        try:
            super().__init__(optimizer, last_epoch)
        except BaseException:
            for index, lr in float_lrs.items():
                optimizer.param_groups[index]["lr"] = lr
            raise

    # ---- the schedule -----------------------------------------------------------------------------------------

    def _factor(self, t: int) -> float:
        """f(t) in float64 on the host."""
        warmup, total, floor = self.warmup_steps, self.total_steps, self.min_lr_ratio
        if t < warmup:
            return (t + 1) / warmup
        if t < total:
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * (t - warmup) / (total - warmup)))
        return floor

    def _device_factor(self) -> Tensor:
        """f(t) as a 0-dim float64 tensor computed on the device from the device position: only constants fixed at
        construction enter, so the same ops run every step."""
        t = self._device_position
        warmup, total, floor = self.warmup_steps, self.total_steps, self.min_lr_ratio
        # max(., 1) keeps the divisions finite where their branch is not taken (warmup 0, an empty cosine phase)
        ramp = (t + 1) / max(warmup, 1)
        progress = (t - warmup) / max(total - warmup, 1)
        cosine = floor + (1.0 - floor) * 0.5 * (1.0 + torch.cos(progress * math.pi))
        return torch.where(t < warmup, ramp, torch.where(t < total, cosine, torch.full_like(t, floor)))

    def get_lr(self) -> list[float | Tensor]:
        """The lr of each group for the current position: chainable for float lrs (the current lr times
        f(t) / f(t_prev), the closed form where f(t_prev) == 0); the closed form, on the device, for tensor lrs."""
        if not self._get_lr_called_within_step:
            warnings.warn(
                "To get the last learning rate computed by the scheduler, please use `get_last_lr()`.",
                UserWarning,
                stacklevel=2,
            )
        closed = self._get_closed_form_lr()
        if self._last_factor == 0.0 or not self._has_float_group():
            return closed
        ratio = self._factor(self._position) / self._last_factor
        return [
            value if isinstance(group["lr"], Tensor) or index >= self._chained_groups else group["lr"] * ratio
            for index, (group, value) in enumerate(zip(self.optimizer.param_groups, closed))
        ]

    def _get_closed_form_lr(self) -> list[float | Tensor]:
        """base_lr * f(t) for each group: a float for a float lr, a device tensor for a tensor lr."""
        tensor_groups = [isinstance(group["lr"], Tensor) for group in self.optimizer.param_groups]
        device_factor = self._device_factor() if any(tensor_groups) else None
        host_factor = self._factor(self._position) if not all(tensor_groups) else None
        values: list[float | Tensor] = []
        for group, base_lr, is_tensor in zip(self.optimizer.param_groups, self.base_lrs, tensor_groups):
            if is_tensor:
                values.append(base_lr * device_factor.to(group["lr"].device))
            else:
                values.append(float(base_lr) * host_factor)
        return values

    # ---- stepping ---------------------------------------------------------------------------------------------

    def _initial_step(self) -> None:
        # Also what SequentialLR calls after it reset the lrs to their initial values and took last_epoch back by
        # one: start the chain again from the initial lr and put the device counter back in step with last_epoch.
        # A scheduler built with last_epoch >= 0 (torch's old way to resume) starts from the closed form instead,
        # which a last factor of 0 selects.
        self._last_factor = 1.0 if self.last_epoch == -1 else 0.0
        self._restart_at(self.last_epoch)
        self._step_count = 0
        self.step()

    def step(self, epoch: int | None = None) -> None:
        """Advance the schedule by one optimizer step (not at all if that step was skipped); call it after
        optimizer.step(). `epoch` (deprecated in torch) jumps to that position, in the closed form."""
        if self._step_count == 1 and not getattr(self.optimizer, "_opt_called", False):
            warnings.warn(
                "Detected call of `lr_scheduler.step()` before `optimizer.step()`: the first value of the "
                "schedule is skipped. Call `optimizer.step()` before `lr_scheduler.step()`.",
                UserWarning,
                stacklevel=2,
            )
        self._step_count += 1
        if epoch is not None:
            warnings.warn(
                "The epoch argument of `scheduler.step()` is deprecated in torch: call `scheduler.step()`.",
                UserWarning,
                stacklevel=2,
            )
        self._update_lr(epoch)

    def _update_lr(self, epoch: int | None = None) -> None:
        # torch's SequentialLR calls this with epoch=0 at a milestone (older torch calls step(0)).
        optimizer = self.optimizer
        self._take_added_groups()
        self._make_device_counters(optimizer, self._position)  # for a tensor lr set after construction
        has_float = self._has_float_group()
        if epoch is None:
            self.last_epoch += 1
            if self._device_position is not None:
                skipped = _skipped_on(optimizer, self._device_position.device)
                if skipped is None:
                    self._device_position.add_(1)
                else:  # t += 1 - (skips since the last step), never back
                    self._device_position.add_((self._device_skipped_seen - skipped + 1).clamp_min(0))
                    self._device_skipped_seen.copy_(skipped)
            if has_float:
                skipped = self._read_skipped(optimizer)
                self._position += max(0, 1 - (skipped - self._skipped_seen))
                self._skipped_seen = skipped
        else:
            # a jump: the position is `epoch`, whatever was skipped before
            self.last_epoch = epoch
            self._restart_at(epoch)

        self._get_lr_called_within_step = True
        try:
            values = self.get_lr() if epoch is None else self._get_closed_form_lr()
        finally:
            self._get_lr_called_within_step = False
        for group, value in zip(optimizer.param_groups, values):
            if isinstance(group["lr"], Tensor):
                group["lr"].copy_(value)  # in place: a captured optimizer step reads this very tensor
            else:
                group["lr"] = value
        if has_float:
            self._last_factor = self._factor(self._position)
        self._last_lr = [
            group["lr"].clone() if isinstance(group["lr"], Tensor) else group["lr"] for group in optimizer.param_groups
        ]

    # ---- state ------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """torch's state_dict, with copies of the device counters: the live ones change in place at every step, and
        a dict kept in memory (a rollback) holds the position it was taken at, as torch's schedulers' dicts do."""
        state = super().state_dict()
        for key in _DEVICE_COUNTERS:
            if state[key] is not None:
                state[key] = state[key].clone()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's load_state_dict, except that skips are counted from the optimizer's skipped_steps as it is now
        (a resumed optimizer starts it again from 0), and the device position is copied into the existing tensor,
        so a CUDA graph that captured scheduler.step() keeps working after a resume."""
        state = {key: value for key, value in state_dict.items() if key not in _DEVICE_COUNTERS}
        saved_position = state_dict.get("_device_position")
        self.__dict__.update(state)
        if self._has_float_group():
            if saved_position is not None:  # saved with tensor lrs, whose position only the device counter kept
                self._position = int(saved_position)  # (read on the host: a load, not a step)
                self._last_factor = self._factor(self._position)
            self._skipped_seen = self._read_skipped(self.optimizer)
        if self._device_position is not None:
            if saved_position is not None:
                self._device_position.copy_(saved_position)
            else:  # saved by a scheduler whose lrs were all floats: its position is on the host
                self._device_position.fill_(self._position)
            self._see_skips_now()

    # ---- helpers ----------------------------------------------------------------------------------------------

    def _take_added_groups(self) -> None:
        """Groups the optimizer took since the last step (add_param_group: layers unfrozen as training goes) join
        the schedule: each one's lr when added is its base lr, as a group's initial lr is, and it takes the closed
        form this step (get_lr chains the first `_chained_groups` only), as it has no factor of its own to chain
        from."""
        groups = self.optimizer.param_groups
        self._chained_groups = len(self.base_lrs)
        if len(groups) == self._chained_groups:
            return
        if self._has_float_group(groups[self._chained_groups:]) and not self._has_float_group(
                groups[:self._chained_groups]):
            # a float lr joins tensor ones, whose position only the device counter kept: read once on the host
            self._position = int(self._device_position)
            self._skipped_seen = self._read_skipped(self.optimizer)
        for group in groups[self._chained_groups:]:
            lr = group["lr"]
            self.base_lrs.append(group.setdefault("initial_lr", lr.clone() if isinstance(lr, Tensor) else lr))

    def _has_float_group(self, groups: list[dict[str, Any]] | None = None) -> bool:
        groups = groups if groups is not None else self.optimizer.param_groups
        return any(not isinstance(group["lr"], Tensor) for group in groups)

    @staticmethod
    def _read_skipped(optimizer: Optimizer) -> int:
        """The optimizer's skipped-step count on the host (a sync on a GPU, unless the optimizer says no step can
        have been skipped yet); 0 for an optimizer that never skips."""
        skipped = getattr(optimizer, "skipped_steps", None)
        if skipped is None or not getattr(optimizer, "may_have_skipped", True):
            return 0
        return int(skipped.item() if isinstance(skipped, Tensor) else skipped)

    def _restart_at(self, position: int) -> None:
        """Put the schedule at `position`, counting skips from the optimizer's skipped_steps as it is now."""
        self._position = position
        if self._has_float_group():
            self._skipped_seen = self._read_skipped(self.optimizer)
        if self._device_position is not None:
            self._device_position.fill_(position)
            self._see_skips_now()

    def _see_skips_now(self) -> None:
        skipped = _skipped_on(self.optimizer, self._device_skipped_seen.device)
        if skipped is None:
            self._device_skipped_seen.zero_()
        else:
            self._device_skipped_seen.copy_(skipped)

    def _make_device_counters(self, optimizer: Optimizer, position: int) -> None:
        if self._device_position is not None:
            return
        lrs = [group["lr"] for group in optimizer.param_groups if isinstance(group["lr"], Tensor)]
        if not lrs:
            return
        device = lrs[0].device
        self._device_position = torch.full((), float(position), dtype=torch.float64, device=device)
        skipped = _skipped_on(optimizer, device)
        self._device_skipped_seen = torch.zeros_like(self._device_position) if skipped is None else skipped.clone()


def _skipped_on(optimizer: Optimizer, device: torch.device) -> Tensor | None:
    """The optimizer's skipped-step count as a float64 tensor on `device`, never read on the host; None for an
    optimizer that never skips."""
    skipped = getattr(optimizer, "skipped_steps", None)
    return None if skipped is None else torch.as_tensor(skipped).to(device=device, dtype=torch.float64)
