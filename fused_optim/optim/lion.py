"""fused_optim.Lion: Lion (Chen et al., 2023, "Symbolic Discovery of Optimization Algorithms") whose step is one
fused kernel launch per parameter group (fused_optim/ops/lion.py picks the kernel).

torch has no Lion; the signature and the state follow the reference implementations (lucidrains' lion-pytorch,
optax): `Lion(params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0)`, one state tensor `exp_avg` per param, and
decoupled weight decay (p *= 1 - lr * weight_decay). The update is lr * sign(beta1 * m + (1 - beta1) * g), so a
Lion lr is typically 3-10x smaller than an AdamW lr and its weight decay 3-10x larger. The rest is as
fused_optim.AdamW:
- `exp_avg` is fp32 for fp32, bf16 and fp16 params (fp64 for fp64 params, stepped in plain torch ops), and a
  `step` count (a float32 tensor on the param's device) keys the stochastic rounding's random stream on the device.
- `master_weights=True` keeps an fp32 copy of each bf16/fp16 param (`master_param`); `stochastic_rounding=True`
  rounds bf16 params stochastically instead. `maximize`, `max_grad_norm=`, `gradient_release=`, GradScaler
  (grad_scale and found_inf read on the device), a tensor lr, `backend=`, DTensor params, `main_grad`
  (GradAccumulator): as AdamW.
- Complex params, sparse grads and differentiable groups are refused (RuntimeError/TypeError at the step, nothing
  changed): torch has no Lion to hand them to.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from fused_optim import _backend
from fused_optim.ops.lion import SPARSE_MESSAGE, lion_step
from fused_optim.optim._base import LOW_PRECISION, FusedOptimizer, check_saved_state, restore_saved_state, state_dtype
from fused_optim.optim._plan import Plan

LION_DTYPES = (torch.float32, *LOW_PRECISION, torch.float64)


class Lion(FusedOptimizer):
    """Lion with decoupled weight decay, fused.

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = fused_optim.Lion(model.parameters(), lr=1e-4, weight_decay=0.1)
        >>> model(torch.randn(8, 4)).square().mean().backward()
        >>> opt.step(); opt.zero_grad()
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        master_weights: bool = False,
        stochastic_rounding: bool = False,
        max_grad_norm: float | None = None,
        gradient_release: bool = False,
        backend: str | None = None,
    ) -> None:
        # torch's optimizers' checks and words, for the arguments Lion shares with them
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        for index, beta in enumerate(betas):
            if not 0.0 <= beta <= 1.0:
                raise ValueError(f"Invalid beta parameter at index {index}: {beta}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if master_weights and stochastic_rounding:
            raise ValueError("master_weights and stochastic_rounding are alternatives: choose one")
        defaults = {
            "lr": lr,
            "betas": tuple(float(beta) for beta in betas),
            "weight_decay": weight_decay,
            "maximize": maximize,
            "master_weights": master_weights,
            "stochastic_rounding": stochastic_rounding,
            # torch's Optimizer gives every group this key when it loads a state (as its optimizers have); Lion's
            # step is never differentiable, and a group asking for one is refused at the step
            "differentiable": False,
        }
        super().__init__(params, defaults, max_grad_norm=max_grad_norm, backend=backend,
                         gradient_release=gradient_release)

    def _update(self, group: dict[str, Any], kind: str, lists: list[list[Tensor]], grad_scale: Tensor | None,
                found_inf: Tensor | None) -> None:
        beta1, beta2 = group["betas"]
        lion_step(*lists, lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"],
                  maximize=group["maximize"], stochastic_rounding=kind == "stochastic", seed=group.get("seed", 0),
                  grad_scale=grad_scale, found_inf=found_inf, backend=self.backend)

    def _gather(self, group: dict[str, Any], grads: list[Tensor | None]) -> dict[str, list[list[Tensor]]]:
        """The group's params with grads, their grads and state ([params, grads, exp_avgs, master params, steps]),
        split by how the result is written back: "plain", "master" (fp32 copy), "stochastic" (bf16). Everything
        that can be wrong with a first step is checked before any state is created."""
        params = group["params"]
        has_grad = [grad is not None for grad in grads]
        options = (group["master_weights"], group["stochastic_rounding"])
        plan = self._plans.get(id(group))
        if plan is not None and plan.fits(group, self.state, has_grad, options):
            return plan.with_grads(grads)
        if group["differentiable"]:
            raise RuntimeError("fused_optim.Lion: differentiable=True is not supported (the step is in place)")
        with_grads = [(index, p, grad) for index, (p, grad) in enumerate(zip(params, grads)) if grad is not None]
        for _, p, grad in with_grads:
            if grad.is_sparse:
                raise RuntimeError(SPARSE_MESSAGE)
            if p.dtype not in LION_DTYPES:
                raise TypeError(f"fused_optim.Lion steps float32, bfloat16, float16 and float64 params, not {p.dtype}")
            _backend.resolve(self.backend, p.device.type)
        plan = Plan(group, self.state, has_grad, options)
        for index, p, _ in with_grads:
            state = self.state[p]
            if len(state) == 0:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["exp_avg"] = torch.zeros_like(p, dtype=state_dtype(p, group), memory_format=torch.preserve_format)
                if group["master_weights"] and p.dtype in LOW_PRECISION:
                    state["master_param"] = p.detach().float()
            if "master_param" in state:
                kind = "master"
            elif group["stochastic_rounding"] and p.dtype == torch.bfloat16:
                kind = "stochastic"
            else:
                kind = "plain"
            plan.add(kind, index, p, [state["exp_avg"], state["master_param"] if kind == "master" else None,
                                      state["step"]])
        plan.state_size = len(self.state)
        self._plans[id(group)] = plan
        return plan.with_grads(grads)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's load_state_dict, after checking everything it will use (check_saved_state: else ValueError or
        TypeError, and nothing changes); state comes back in fp32 on the param's device whatever dtype it was
        saved in. A state saved without `step` (lion-pytorch's) starts the count at 0."""
        check_saved_state(self, state_dict, ("exp_avg", "master_param"))
        self._plans.clear()
        super().load_state_dict(state_dict)
        restore_saved_state(self, state_dict, ("exp_avg",))
