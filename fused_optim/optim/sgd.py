"""fused_optim.SGD: a drop-in for torch.optim.SGD whose step is one fused kernel launch per parameter group
(fused_optim/ops/sgd.py picks the kernel).

Differences from torch:
- With momentum, `momentum_buffer` is fp32 whatever the param dtype (bf16 with `moments="bf16"`, int8 codes with
  their `moment_scales` with `moments="int8"`: rounded stochastically after each update, as AdamW's moments), in
  the param's memory layout, and a `step`
  count (a float32 tensor on the param's device) says on the device whether the buffer is set yet: the first step
  (count 0) takes the gradient as the buffer, as torch does when it finds no buffer, without a host sync. Without
  momentum there is no state, as in torch, unless an option below keeps some.
- bf16 and fp16 params take `master_weights=True` (a bf16 param's exact fp32 master as an int16 remainder beside it,
  an fp16 param's as an fp32 copy), `master_weights=24` (a bf16 param's 24-bit master: an int8 remainder) or
  `stochastic_rounding=True` (bf16 params rounded stochastically, keyed by a `step` count kept without momentum
  too), as fused_optim.AdamW's (optim/_base.py: init_master, _restore_master).
- state_dict interchange with torch.optim.SGD both ways: torch's loader hands us its buffers (in the param dtype,
  no `step`): they come back as fp32 with a count of 1 (set); ours load into torch as they are (torch casts the
  buffer to the param dtype and carries `step` along unread). A buffer whose count is still 0 (every step so far
  was skipped) is left out of state_dict, so the state reads as torch's would: no buffer yet.
- A skipped step (GradScaler's found_inf, or a non-finite grad norm with max_grad_norm) leaves params, buffers and
  counts untouched on the device; a skipped first step therefore leaves the buffer unset, as if it never happened.
  `skipped_steps` counts them; `gradient_release=True` steps each param inside backward (as AdamW);
  `max_grad_norm=` clips the global grad norm inside the step (with `grad_norm_group=` under ZeRO, as AdamW), and
  `last_grad_norm` holds that norm (fused_optim/optim/_guard.py, as fused_optim.AdamW).
- `backend=` ("auto", "cuda", "triton", "cpu", "torch"; default from FUSED_OPTIM_BACKEND) picks the kernels.
  `foreach` is accepted and ignored; `fused=True`, as with torch's fused optimizers, has torch's GradScaler hand
  the step its scale (README, GradScaler). torch's errors for both are kept.
- float64 and complex params keep buffers of their own dtype, as in torch (complex ones run the kernels on their
  real views, float64 ones plain torch ops: the kernels are fp32). Params with sparse grads, and every param of a
  `differentiable=True` group, are stepped by torch's own single-tensor SGD.
- A param's fp32 `main_grad` (fused_optim.GradAccumulator), when set, is used instead of its `.grad`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim.optimizer import ParamsT
from torch.optim.sgd import sgd as torch_sgd

from fused_optim import _backend
from fused_optim.ops.sgd import sgd_step
from fused_optim.optim._base import (LOW_PRECISION, PARAM_DTYPES, FusedOptimizer, _restore_master, check_torch_flags,
                                     init_int8_scales, init_master, int8_moments, master_of, moment_dtype,
                                     option, restore_moments, saved_states)
from fused_optim.optim._plan import Plan

# momentum buffers that round to nearest (fp32 and fp64, and complex params' buffers, stepped as their real views)
_WIDE_BUFFER_DTYPES = (torch.float32, torch.float64, torch.complex64, torch.complex128)


class SGD(FusedOptimizer):
    """Stochastic gradient descent with torch.optim.SGD's signature, state layout and results, fused.

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = fused_optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
        >>> model(torch.randn(8, 4)).square().mean().backward()
        >>> opt.step(); opt.zero_grad()
    """

    _moment_keys = {"momentum_buffer": True}  # key -> signed
    _torch_keeps_counts = False

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float | Tensor = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
        moments: str = "fp32",
        master_weights: bool | int = False,
        stochastic_rounding: bool = False,
        max_grad_norm: float | None = None,
        grad_norm_group: dist.ProcessGroup | None = None,
        gradient_release: bool = False,
        backend: str | None = None,
    ) -> None:
        # torch's checks, in torch's order and words
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "dampening": dampening,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
            "maximize": maximize,
            "foreach": foreach,
            "differentiable": differentiable,
            "fused": fused,
            "moments": moments,
            "master_weights": master_weights,
            "stochastic_rounding": stochastic_rounding,
        }
        super().__init__(params, defaults, max_grad_norm=max_grad_norm, grad_norm_group=grad_norm_group,
                         backend=backend, gradient_release=gradient_release)

    def _update(self, group: dict[str, Any], kind: str, lists: list[list[Tensor]], grad_scale: Tensor | None,
                found_inf: Tensor | None) -> None:
        weight_decay = group["weight_decay"]
        params, grads, buffers, masters, steps, scales = lists
        sgd_step(
            params, grads, buffers, steps, scales,
            master_params=masters,
            stochastic_rounding=kind == "stochastic",
            lr=group["lr"],
            momentum=group["momentum"],
            dampening=group["dampening"],
            # torch allows a tensor weight decay; our kernels take it as a number (a host read, only then)
            weight_decay=float(weight_decay) if isinstance(weight_decay, Tensor) else weight_decay,
            # torch checks nesterov's momentum at construction only: a scheduler may take momentum to 0 since
            nesterov=group["nesterov"] and group["momentum"] != 0,
            maximize=group["maximize"],
            seed=group.get("seed", 0),
            grad_scale=grad_scale,
            found_inf=found_inf,
            backend=self.backend,
        )

    def _gather(self, group: dict[str, Any], grads: list[Tensor | None],
                key: int | Tensor) -> dict[str, list[list[Tensor]]]:
        """{"plain": [params, grads, momentum buffers, steps]} of the group's params that have a grad (the last two
        empty without momentum), and {"torch": [params, grads, momentum buffers or None]} of those torch's own update
        steps (sparse grads, and every param of a differentiable group). Everything that can be wrong is checked
        before any state is created, as torch does; the op checks the grads themselves (shape, dtype, layout) before
        writing anything. The lists are kept between steps (optim/_plan.py) unless torch's update steps some."""
        has_grad = [grad is not None for grad in grads]
        by_torch = group["differentiable"] or any(grad is not None and grad.is_sparse for grad in grads)
        options = self._plan_options(group)
        plan = None if by_torch else self._kept_plan(key, group, has_grad, options)
        if plan is not None:
            return plan.with_grads(grads)
        if isinstance(key, int) and not torch.compiler.is_compiling():
            self._seed_group(group, key)
        with_grads = [(index, p, grad) for index, (p, grad) in enumerate(zip(group["params"], grads))
                      if grad is not None]
        check_torch_flags([p for _, p, _ in with_grads], group)
        self._check_dense([p for _, p, grad in with_grads if not grad.is_sparse])
        for _, p, grad in with_grads:
            if p.dtype not in PARAM_DTYPES:
                raise TypeError(f"fused_optim.SGD steps floating-point and complex params, not {p.dtype}")
            if grad.is_sparse and int8_moments(p, group) and group["momentum"] != 0:
                raise RuntimeError("fused_optim.SGD(moments='int8') does not take sparse gradients: torch's own "
                                   "update, which steps them, keeps its momentum buffers in floating point")
            if grad.is_sparse and self.max_grad_norm is not None:
                raise RuntimeError("fused_optim.SGD(max_grad_norm=...) does not take sparse gradients: torch's own "
                                   "update, which steps them, has no clipping; clip with clip_grad_norm_ before "
                                   "step() instead")
            _backend.resolve(self.backend, p.device.type)
        plan = Plan(group, self.state, has_grad, options)
        for index, p, grad in with_grads:
            if group["differentiable"] or grad.is_sparse:
                plan.add("torch", index, p, [])
            else:
                kind, state_tensors = self._kind_and_state_tensors(p, group)
                plan.add(kind, index, p, state_tensors)
        calls = plan.with_grads(grads)
        if by_torch:  # torch's update takes None for a buffer not set yet, and sets it: nothing kept
            calls["torch", 0].append([self._buffer_if_set(p) for p in calls["torch", 0][0]])
        else:
            self._keep_plan(key, plan)
        return calls

    def _plan_options(self, group: dict[str, Any]) -> tuple:
        return group["momentum"] != 0, *super()._plan_options(group)  # momentum on or off: buffers in the lists

    def _kind_and_state_tensors(self, p: Tensor, group: dict[str, Any]) -> tuple[str, list[Tensor | None]]:
        """A param the kernels step: its kind of update (`_kind`) and its entries in the op's state lists, [momentum
        buffer, master, step count, int8 scales], creating what its group's options ask for (None where nothing; and
        no state at all without any, as torch keeps none without momentum)."""
        momentum = group["momentum"] != 0
        if momentum:
            self._init_momentum(p, group)
        if option(group, "master_weights") and p.dtype in LOW_PRECISION and not self.state.get(p, {}).keys() & {
                "master_param", "master_remainder"}:
            init_master(p, self.state[p], option(group, "master_weights"))
        if p in self.state:
            self._follow_param(p, self.state[p], group)
        kind = self._kind(p, self.state.get(p, {}), group)
        if kind == "stochastic":  # the count keys the rounding's random stream, with momentum or without
            self.state[p].setdefault("step", torch.zeros((), dtype=torch.float32, device=p.device))
        if p not in self.state:
            return kind, [None, None, None, None]
        state = self.state[p]
        return kind, [state["momentum_buffer"] if momentum else None, master_of(state, kind),
                      state["step"] if momentum or kind == "stochastic" else None,
                      state.get("moment_scales") if momentum else None]

    def _init_momentum(self, p: Tensor, group: dict[str, Any]) -> None:
        """A momentum buffer and its step count, where the param has none yet."""
        state = self.state[p]
        if state.get("momentum_buffer") is None:  # None: unset, as in torch (a buffer reset by hand)
            # unset until the first step writes the gradient into it (count 0); fp32 (or bf16, int8: `moments`) for
            # fp32/bf16/fp16 params, in the param's layout
            state["momentum_buffer"] = torch.zeros_like(p, dtype=moment_dtype(p, group),
                                                        memory_format=torch.preserve_format)
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            if int8_moments(p, group):
                init_int8_scales(p, state, 1)
        elif "step" not in state:  # a buffer torch's update made (a sparse grad earlier): set
            state["step"] = torch.ones((), dtype=torch.float32, device=p.device)

    def _buffer_if_set(self, p: Tensor) -> Tensor | None:
        """The param's momentum buffer for torch's update, None while unset (its count 0: a host read, on this rare
        path only)."""
        state = self.state.get(p, {})
        if "momentum_buffer" not in state or ("step" in state and not bool(state["step"] != 0)):
            return None
        return state["momentum_buffer"]

    def _update_with_torch(self, group: dict[str, Any], lists: list[list[Tensor]]) -> None:
        params, grads, buffers = lists
        torch_sgd(params, grads, buffers, has_sparse_grad=any(g.is_sparse for g in grads), foreach=False,
                            fused=False, weight_decay=group["weight_decay"], momentum=group["momentum"],
                            lr=group["lr"], dampening=group["dampening"], nesterov=group["nesterov"],
                            maximize=group["maximize"])
        if group["momentum"] != 0:  # torch's update makes the buffers it finds missing
            for p, buffer in zip(params, buffers):
                state = self.state[p]
                state["momentum_buffer"] = buffer
                if "step" in state:
                    state["step"].fill_(1.0)

    def _own_state_dict(self) -> dict[str, Any]:
        """torch's state_dict, less the buffers no step has set yet (count 0: every step so far was skipped), so
        that it reads as torch.optim.SGD's would (a master weight stays), and less the counts that only say a buffer
        is set (`_count_is_only_set`): torch's SGD keeps none, and DCP asks for every key of the dict it loads into,
        so a checkpoint of torch's SGD loads into ours. Reads the counts on the host, once per call."""
        state_dict = super()._own_state_dict()
        numbered = self._numbered_params()
        for index, state in list(state_dict["state"].items()):
            if not isinstance(state, dict) or "step" not in state:
                continue
            if "momentum_buffer" in state and state["momentum_buffer"] is None:  # reset by hand: torch's form
                dropped = ("step", "moment_scales")
            elif "momentum_buffer" in state and not bool(state["step"] != 0):
                dropped = ("momentum_buffer", "step", "moment_scales")
            elif self._count_is_only_set(*numbered[index]):
                dropped = ("step",)
            else:
                continue
            # a new dict: the state_dict's entries are the optimizer's own
            kept = {key: value for key, value in state.items() if key not in dropped}
            if kept:
                state_dict["state"][index] = kept
            else:
                del state_dict["state"][index]
        return state_dict

    def _count_is_only_set(self, p: Tensor, group: dict[str, Any]) -> bool:
        """Whether `p`'s step count tells nothing but that its momentum buffer is set: an fp32, fp64 or complex buffer
        of a param not rounded stochastically. A bf16 or int8 buffer and a stochastically rounded param round with random
        bits that the count keys. A buffer loaded without a count counts as set."""
        state = self.state[p]
        return (state.get("momentum_buffer") is not None and state["momentum_buffer"].dtype in _WIDE_BUFFER_DTYPES
                and self._kind(p, state, group) != "stochastic")

    def _restore_saved_state(self, state_dict: dict[str, Any]) -> None:
        """Buffers come back in fp32 (bf16: moments="bf16", int8 codes: "int8") on the param's device, in its
        layout, whatever dtype they were saved in, and a buffer saved without a count (torch's) counts as set.
        Master weights come back in their own form (_restore_master); without momentum, a stochastically rounded
        param's count as saved."""
        for p, group, saved_state in saved_states(self, state_dict):
            state = self.state[p]
            _restore_master(p, state, saved_state, group)
            buffer, step = saved_state.get("momentum_buffer"), saved_state.get("step")
            if buffer is None:  # nothing set yet: the next step with momentum creates both
                if step is not None and group["momentum"] == 0:
                    state["step"] = torch.as_tensor(step).to(device=p.device, dtype=torch.float32, copy=True)
                if not state:  # a count alone, for a group with momentum: no state, as a param never stepped
                    del self.state[p]
                continue
            restore_moments(p, state, saved_state, group, self._moment_keys)
            count = torch.ones(()) if step is None else torch.as_tensor(step).clamp_min(1)
            state["step"] = count.to(device=p.device, dtype=torch.float32, copy=True)
