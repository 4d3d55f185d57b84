"""fused_optim.Adam and fused_optim.AdamW: drop-ins for torch.optim.Adam/AdamW whose step is one fused kernel
launch per parameter group (fused_optim/ops/adam.py picks the kernel).

Differences from torch, all additive:
- State (`exp_avg`, `exp_avg_sq`, `max_exp_avg_sq`) is fp32 for fp32, bf16 and fp16 params, and `step` is a
  float32 tensor on the param's device, as in torch's fused implementation. A torch state_dict loads into ours
  (moments up-cast to fp32) and ours into torch's. float64 and complex params keep state of their own dtype, as in
  torch: complex ones run the kernels on their real views (torch's Adam does the same arithmetic), float64 ones
  torch's own fused Adam (the kernels are fp32).
- `moments="bf16"` stores the moments as bf16 (4 bytes of state a param instead of 8), updated in fp32 in the same
  pass and rounded back stochastically, each element from a counter-based hash (rounding.h): rounding to nearest
  would stall exp_avg_sq, whose 0.1 % steps are under half a bf16 ulp. `state_dict()` saves them as bf16,
  `torch_state_dict()` as fp32; a saved fp32 state loads rounded to nearest.
- `moments="int8"` stores each moment as one byte an element (exp_avg int8, exp_avg_sq and max_exp_avg_sq uint8),
  companded, in blocks of 64 sharing a bf16 scale (`state["moment_scales"]`, one row per moment): 2.06 bytes of
  state a param instead of 8. Each step dequantizes, updates in fp32 and requantizes stochastically in the same
  pass (fused_optim/int8_moments.py). `state_dict()` saves the codes and scales, `torch_state_dict()` fp32 moments;
  a saved fp32 or bf16 state loads quantized to nearest.
- `master_weights=True` keeps each bf16/fp16 param's exact fp32 master weight: for a bf16 param as a 2-byte int16
  remainder beside it (`state["master_remainder"]`: param and remainder together are the fp32 value, the param its
  rounding to nearest with ties away from zero; fused_optim/master_remainder.py), for an fp16 param as an fp32 copy
  (`state["master_param"]`). The update runs on the fp32 value. `state_dict()` saves the remainders as they are;
  `torch_state_dict()` gives fp32 masters (`master_param`), and `load_state_dict` takes either.
  `master_weights=24` (bf16 params only): FlashOptim's 24-bit masters, an int8 remainder (1 byte) holding the
  master rounded to 24 bits (to nearest, ties away from zero) after each step. `stochastic_rounding=True` instead
  rounds the fp32 result of each bf16 param to bf16 stochastically (unbiased), keeping no copy. fp32 params are
  unaffected by any of these.
- `backend=` ("auto", "cuda", "triton", "cpu", "torch"; default from FUSED_OPTIM_BACKEND) picks the kernels.
- Every step is capturable: the step count, a tensor lr and GradScaler's grad_scale/found_inf are read on the
  device, never on the host, so `capturable` is accepted and changes nothing. `foreach` is accepted and ignored;
  `fused=True`, as with torch's fused optimizers, has torch's GradScaler hand the step its scale (README,
  GradScaler). torch's errors for both are kept. `differentiable=True` groups are stepped by torch's own
  single-tensor Adam, with torch's state dtypes: what they ask for is autograd through the update.
- `max_grad_norm=` clips the global grad norm (over every group, as `clip_grad_norm_` over all params) inside the
  step: one pass reads the grads for the norm and the update pass applies unscale and clip as one factor, so the
  grads are read twice and never written. A non-finite norm skips the step on the device (params, state and step
  counts untouched). `last_grad_norm` holds the norm of the unscaled grads before clipping. `grad_norm_group=`:
  where each rank's optimizer holds only its part of the model's params, the process group over which the parts'
  squared norms are summed into the global one (one all-reduce a step); a ZeroRedundancyOptimizer that constructs
  ours gives its own group when none is passed.
- `skipped_steps` counts, on the device, the steps skipped for inf/NaN grads; fused_optim.lr_scheduler reads it so
  a skipped step does not advance the schedule.
- `gradient_release=True` steps each param inside backward as soon as its grad is accumulated and frees the grad
  (optim/_base.py, FusedOptimizer._release): the same result, without ever holding every grad.
- A param's `main_grad` (fp32, set by fused_optim.GradAccumulator), when present, is used instead of its `.grad`:
  bf16/fp16 params get their accumulated gradient without rounding it to their dtype.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim.adam import adam as torch_adam
from torch.optim.optimizer import ParamsT

from fused_optim.ops.adam import adam_step
from fused_optim.optim._base import (LOW_PRECISION, PARAM_DTYPES, FusedOptimizer, beta_value, check_torch_flags,
                                     init_int8_scales, init_master, int8_moments, master_of, moment_dtype, option)


class Adam(FusedOptimizer):
    """Adam (Kingma & Ba, 2015) with torch.optim.Adam's signature, state layout and results, fused.

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = fused_optim.Adam(model.parameters(), lr=1e-3)
        >>> model(torch.randn(8, 4)).square().mean().backward()
        >>> opt.step(); opt.zero_grad()
    """

    _moment_keys = {"exp_avg": True, "exp_avg_sq": False, "max_exp_avg_sq": False}  # key -> signed
    _sparse_grad_message = "Adam does not support sparse gradients, please consider SparseAdam instead"

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool = False,
        master_weights: bool | int = False,
        moments: str = "fp32",
        stochastic_rounding: bool = False,
        max_grad_norm: float | None = None,
        grad_norm_group: dist.ProcessGroup | None = None,
        gradient_release: bool = False,
        backend: str | None = None,
    ) -> None:
        # torch's checks, in torch's order and words
        if isinstance(lr, Tensor):
            if foreach and not capturable:
                raise ValueError("lr as a Tensor is not supported for capturable=False and foreach=True")
            if lr.numel() != 1:
                raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if not (isinstance(betas[0], float) and isinstance(betas[1], float)
                or isinstance(betas[0], Tensor) and isinstance(betas[1], Tensor)):
            raise ValueError("betas must be either both floats or both Tensors")
        for index, beta in enumerate(betas):
            if isinstance(beta, Tensor) and foreach and not capturable:
                raise ValueError(f"betas[{index}] as a Tensor is not supported for capturable=False and foreach=True")
        defaults = {
            "lr": lr,
            "betas": (beta_value(betas[0], 0), beta_value(betas[1], 1)),
            "eps": eps,
            "weight_decay": weight_decay,
            "amsgrad": amsgrad,
            "maximize": maximize,
            "foreach": foreach,
            "capturable": capturable,
            "differentiable": differentiable,
            "fused": fused,
            "decoupled_weight_decay": decoupled_weight_decay,
            "master_weights": master_weights,
            "moments": moments,
            "stochastic_rounding": stochastic_rounding,
        }
        super().__init__(params, defaults, max_grad_norm=max_grad_norm, grad_norm_group=grad_norm_group,
                         backend=backend, gradient_release=gradient_release)

    def _update(self, group: dict[str, Any], kind: str, lists: list[list[Tensor]], grad_scale: Tensor | None,
                found_inf: Tensor | None) -> None:
        beta1, beta2 = group["betas"]
        adam_step(
            *lists,
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            decoupled_weight_decay=group["decoupled_weight_decay"],
            amsgrad=group["amsgrad"],
            maximize=group["maximize"],
            stochastic_rounding=kind == "stochastic",
            seed=group.get("seed", 0),
            grad_scale=grad_scale,
            found_inf=found_inf,
            backend=self.backend,
        )

    def _plan_options(self, group: dict[str, Any]) -> tuple:
        return group["amsgrad"], *super()._plan_options(group)

    def _check_first_step(self, group: dict[str, Any], params_and_grads: list[tuple[Tensor, Tensor]]) -> None:
        check_torch_flags([p for p, _ in params_and_grads], group)
        for p, _ in params_and_grads:
            if p.dtype not in PARAM_DTYPES:
                raise TypeError(f"fused_optim.{type(self).__name__} steps floating-point and complex params, not "
                                f"{p.dtype}")

    def _init_state(self, p: Tensor, state: dict[str, Tensor], group: dict[str, Any]) -> None:
        # step on the param's device, as torch's fused and capturable Adam keep it: the kernels read it there
        state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)

        def zeros(signed: bool) -> Tensor:  # in the param's memory layout; fp32 (or bf16, int8) for low-precision params
            return torch.zeros_like(p, dtype=moment_dtype(p, group, signed), memory_format=torch.preserve_format)

        state["exp_avg"] = zeros(signed=True)
        state["exp_avg_sq"] = zeros(signed=False)
        if group["amsgrad"]:
            state["max_exp_avg_sq"] = zeros(signed=False)
        if int8_moments(p, group):
            init_int8_scales(p, state, 3 if group["amsgrad"] else 2)
        if option(group, "master_weights") and p.dtype in LOW_PRECISION:
            init_master(p, state, option(group, "master_weights"))

    def _state_tensors(self, group: dict[str, Any], state: dict[str, Tensor], kind: str) -> list[Tensor | None]:
        scales = state.get("moment_scales")
        if scales is not None and not group["amsgrad"]:  # amsgrad turned off since (or loaded so): as torch's, the
            scales = scales[:2]                           # update leaves max_exp_avg_sq and its scales alone
        return [state["exp_avg"], state["exp_avg_sq"], state["max_exp_avg_sq"] if group["amsgrad"] else None,
                master_of(state, kind), state["step"], scales]

    def _required_state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        # torch's loader refuses a state without a step too; an amsgrad state loaded into amsgrad=False keeps its
        # max_exp_avg_sq, which the update leaves alone (_state_tensors), as torch's does
        return ("step", "exp_avg", "exp_avg_sq", *(("max_exp_avg_sq",) if group.get("amsgrad") else ()))

    def _update_with_torch(self, group: dict[str, Any], lists: list[list[Tensor]]) -> None:
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, _, steps, _ = lists
        beta1, beta2 = group["betas"]
        torch_adam(
            params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, foreach=False, capturable=False,
            differentiable=group["differentiable"], fused=False, has_complex=any(p.is_complex() for p in params),
            decoupled_weight_decay=group["decoupled_weight_decay"], amsgrad=group["amsgrad"], beta1=beta1,
            beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"],
            maximize=group["maximize"],
        )


class AdamW(Adam):
    """AdamW (Loshchilov & Hutter, 2019) with torch.optim.AdamW's signature, state layout and results, fused.

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = fused_optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
        >>> model(torch.randn(8, 4)).square().mean().backward()
        >>> opt.step(); opt.zero_grad()
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        master_weights: bool | int = False,
        moments: str = "fp32",
        stochastic_rounding: bool = False,
        max_grad_norm: float | None = None,
        grad_norm_group: dist.ProcessGroup | None = None,
        gradient_release: bool = False,
        backend: str | None = None,
    ) -> None:
        super().__init__(
            params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize,
            capturable=capturable, differentiable=differentiable, fused=fused, decoupled_weight_decay=True,
            master_weights=master_weights, moments=moments, stochastic_rounding=stochastic_rounding,
            max_grad_norm=max_grad_norm, grad_norm_group=grad_norm_group,
            gradient_release=gradient_release, backend=backend,
        )

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True
