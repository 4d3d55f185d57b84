"""fused_optim.Lion: Lion (Chen et al., 2023, "Symbolic Discovery of Optimization Algorithms") whose step is one
fused kernel launch per parameter group (fused_optim/ops/lion.py picks the kernel).

torch has no Lion; the signature and the state follow the reference implementations (lucidrains' lion-pytorch,
optax): `Lion(params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, use_triton=False,
decoupled_weight_decay=False)`, one state tensor `exp_avg` per param, and decoupled weight decay
(p *= 1 - lr * weight_decay; with `decoupled_weight_decay=True`, lion-pytorch's, weight_decay is divided by the lr
given to the constructor, for every group). `use_triton=True` picks our Triton backend (`backend="triton"`). The
update is lr * sign(beta1 * m + (1 - beta1) * g), so a Lion lr is typically 3-10x smaller than an AdamW lr and its
weight decay 3-10x larger. The rest is as fused_optim.AdamW:
- `exp_avg` is fp32 for fp32, bf16 and fp16 params (fp64 for fp64 params, stepped in plain torch ops), bf16
  with `moments="bf16"` (2 bytes a param, rounded stochastically after each update: as AdamW's), or int8 codes
  with their bf16 block scales `moment_scales` with `moments="int8"` (1.03 bytes a param: AdamW's exp_avg codec,
  fused_optim/int8_moments.py), and a `step` count (a float32 tensor on the param's device) keys the stochastic
  rounding's random stream on the device.
- `master_weights=True` keeps each bf16/fp16 param's fp32 master (a bf16 param's as an int16 remainder,
  `master_remainder`; an fp16 param's as an fp32 copy, `master_param`: as fused_optim.AdamW), `master_weights=24` a
  bf16 param's 24-bit master (an int8 remainder); `stochastic_rounding=True` rounds bf16 params stochastically
  instead. `maximize`, `max_grad_norm=` (and `grad_norm_group=`), `gradient_release=`, GradScaler
  (grad_scale and found_inf read on the device), a tensor lr, `backend=`, DTensor params, `main_grad`
  (GradAccumulator): as AdamW.
- Complex params, sparse grads and differentiable groups are refused (RuntimeError/TypeError at the step, nothing
  changed): torch has no Lion to hand them to.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim.optimizer import ParamsT

from fused_optim.ops.lion import SPARSE_MESSAGE, lion_step
from fused_optim.optim._base import (LOW_PRECISION, FusedOptimizer, beta_value, init_int8_scales, init_master,
                                     int8_moments, master_of, moment_dtype, option)

LION_DTYPES = (torch.float32, *LOW_PRECISION, torch.float64)


class Lion(FusedOptimizer):
    """Lion with decoupled weight decay, fused.

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = fused_optim.Lion(model.parameters(), lr=1e-4, weight_decay=0.1)
        >>> model(torch.randn(8, 4)).square().mean().backward()
        >>> opt.step(); opt.zero_grad()
    """

    _moment_keys = {"exp_avg": True}  # key -> signed
    _sparse_grad_message = SPARSE_MESSAGE

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        use_triton: bool = False,
        decoupled_weight_decay: bool = False,
        *,
        maximize: bool = False,
        master_weights: bool | int = False,
        moments: str = "fp32",
        stochastic_rounding: bool = False,
        max_grad_norm: float | None = None,
        grad_norm_group: dist.ProcessGroup | None = None,
        gradient_release: bool = False,
        backend: str | None = None,
    ) -> None:
        # torch's optimizers' checks and words, for the arguments Lion shares with them
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {tuple(betas)}")
        for index, beta in enumerate(betas):
            if not 0.0 <= beta <= 1.0:
                raise ValueError(f"Invalid beta parameter at index {index}: {beta}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        # lion-pytorch's two flags. use_triton picks its Triton kernel: ours, then.
        if use_triton:
            if backend not in (None, "triton"):
                raise ValueError(f"use_triton=True asks for backend 'triton', not {backend!r}.")
            backend = "triton"
        # decoupled_weight_decay divides every group's weight decay by the lr given here (lion-pytorch's _init_lr; a
        # tensor lr is read once, here), so a param decays by weight_decay * lr / initial lr a step.
        self.decoupled_weight_decay = decoupled_weight_decay
        self._initial_lr = float(lr) if decoupled_weight_decay else None
        if decoupled_weight_decay and not self._initial_lr > 0.0:
            raise ValueError(f"decoupled_weight_decay=True divides weight_decay by the lr, which must be > 0: {lr}.")
        defaults = {
            "lr": lr,
            "betas": tuple(beta_value(beta, index) for index, beta in enumerate(betas)),
            "weight_decay": weight_decay,
            "maximize": maximize,
            "master_weights": master_weights,
            "moments": moments,
            "stochastic_rounding": stochastic_rounding,
            # torch's Optimizer gives every group this key when it loads a state (as its optimizers have); Lion's
            # step is never differentiable, and a group asking for one is refused at the step
            "differentiable": False,
        }
        super().__init__(params, defaults, max_grad_norm=max_grad_norm, grad_norm_group=grad_norm_group,
                         backend=backend, gradient_release=gradient_release)

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "decoupled_weight_decay": self.decoupled_weight_decay,
                "initial_lr": self._initial_lr}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # a copy or an unpickling brings both; torch's load_state_dict calls this with neither: they stay
        self.decoupled_weight_decay = state.pop("decoupled_weight_decay",
                                                getattr(self, "decoupled_weight_decay", False))
        self._initial_lr = state.pop("initial_lr", getattr(self, "_initial_lr", None))
        super().__setstate__(state)

    def _update(self, group: dict[str, Any], kind: str, lists: list[list[Tensor]], grad_scale: Tensor | None,
                found_inf: Tensor | None) -> None:
        beta1, beta2 = group["betas"]
        weight_decay = group["weight_decay"]
        if self.decoupled_weight_decay:
            weight_decay = weight_decay / self._initial_lr
        lion_step(*lists, lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=weight_decay,
                  maximize=group["maximize"], stochastic_rounding=kind == "stochastic", seed=group.get("seed", 0),
                  grad_scale=grad_scale, found_inf=found_inf, backend=self.backend)

    def _check_first_step(self, group: dict[str, Any], params_and_grads: list[tuple[Tensor, Tensor]]) -> None:
        if group["differentiable"]:
            raise RuntimeError("fused_optim.Lion: differentiable=True is not supported (the step is in place)")
        for p, _ in params_and_grads:
            if p.dtype not in LION_DTYPES:
                raise TypeError(f"fused_optim.Lion steps float32, bfloat16, float16 and float64 params, not {p.dtype}")

    def _init_state(self, p: Tensor, state: dict[str, Tensor], group: dict[str, Any]) -> None:
        state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        state["exp_avg"] = torch.zeros_like(p, dtype=moment_dtype(p, group), memory_format=torch.preserve_format)
        if int8_moments(p, group):
            init_int8_scales(p, state, 1)
        if option(group, "master_weights") and p.dtype in LOW_PRECISION:
            init_master(p, state, option(group, "master_weights"))

    def _state_tensors(self, group: dict[str, Any], state: dict[str, Tensor], kind: str) -> list[Tensor | None]:
        return [state["exp_avg"], master_of(state, kind), state["step"], state.get("moment_scales")]

    def _required_state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("exp_avg",)  # lion-pytorch's state is this alone: a missing step counts from 0
