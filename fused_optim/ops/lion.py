"""The Lion step as torch.library ops: one op per backend, one schema, and the one place that picks a backend.

- `fused_optim::lion_step_`         the C++ kernels: csrc/cpu/lion.cpp (CPU), csrc/cuda/lion.cu (CUDA)
- `fused_optim::lion_step_triton_`  fused_optim/triton/lion.py
- `fused_optim::lion_step_torch_`   plain torch ops, one tensor at a time in fp32: the fallback

Each op updates every tensor of its lists in place (params, moments, master params, step counts), reads the lr and
GradScaler's grad_scale/found_inf on the device when given as tensors (a found_inf != 0 leaves everything
untouched, step counts included), and launches once per group: no host sync, so a step can be captured in a CUDA
graph. Lion needs no step count for its update; the count keys the stochastic rounding's random stream, per step,
on the device.
"""

from __future__ import annotations

import torch

from fused_optim.int8_moments import dequantize, quantize
from fused_optim.ops import _dtensor
from fused_optim.ops._library import (FLOAT_DTYPES, check_step_lists, count_writes, define_op, grad_multiplier_and_skip,
                                      param_masters, piece, piece_scales, pieces, real_views, resolve_op, split_wide,
                                      step_scalars, store_update, update_start)
from fused_optim.rounding import bf16_stochastic_round, moment_bits16

LION_SCHEMA = (
    "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] master_params, Tensor(d!)[] steps, "
    "Tensor(e!)[] moment_scales, float lr, Tensor? lr_tensor, float beta1, float beta2, float weight_decay, "
    "bool maximize, bool stochastic_rounding, int seed, Tensor? grad_scale, Tensor? found_inf) -> ()"
)
SPARSE_MESSAGE = "Lion does not support sparse gradients"


def check_lion_args(params, grads, exp_avgs, master_params, steps, moment_scales, stochastic_rounding, scalars=(),
                    dtypes=FLOAT_DTYPES) -> list[torch.Tensor]:
    """The Python twin of csrc/ops/lion.h's check_lion_args, for the Triton and torch ops (`dtypes`: the param
    dtypes the op takes): every argument checked before anything is written, and the grads returned in their
    params' memory layout."""
    n = len(params)
    if not (len(grads) == len(exp_avgs) == len(steps) == n):
        raise RuntimeError("lion_step: params, grads, exp_avgs and steps must have the same length")
    if master_params and len(master_params) != n:
        raise RuntimeError("lion_step: one master param per param, or none")
    if stochastic_rounding and master_params:
        raise RuntimeError("lion_step: stochastic_rounding and master params are alternatives; pass one")
    return check_step_lists("lion_step", params, grads, steps, [exp_avgs], stochastic_rounding, scalars, dtypes,
                            SPARSE_MESSAGE, master_params, bf16_moment_lists=1,
                            int8_moments=(moment_scales, [True]))


def _lion_step_triton(params, grads, exp_avgs, master_params, steps, moment_scales, lr, lr_tensor, beta1, beta2,
                      weight_decay, maximize, stochastic_rounding, seed, grad_scale, found_inf):
    from fused_optim.triton.lion import lion_step_triton

    grads = check_lion_args(params, grads, exp_avgs, master_params, steps, moment_scales, stochastic_rounding,
                            (lr_tensor, grad_scale, found_inf))
    if params:
        lion_step_triton(params, grads, exp_avgs, master_params, steps, moment_scales, lr, lr_tensor, beta1, beta2,
                         weight_decay, maximize, stochastic_rounding, seed, grad_scale, found_inf)


def _lion_step_torch(params, grads, exp_avgs, master_params, steps, moment_scales, lr, lr_tensor, beta1, beta2,
                     weight_decay, maximize, stochastic_rounding, seed, grad_scale, found_inf):
    """lion.h's formulas in plain torch ops, a piece of a tensor at a time (_library.pieces) in fp32 (fp64 for fp64
    params); a skipped step is selected with torch.where, so nothing is read on the host."""
    grads = check_lion_args(params, grads, exp_avgs, master_params, steps, moment_scales, stochastic_rounding,
                            (lr_tensor, grad_scale, found_inf), (*FLOAT_DTYPES, torch.float64))
    if not params:
        return
    grad_multiplier, skip = grad_multiplier_and_skip(maximize, grad_scale, found_inf)
    # lr and 1 - lr * weight_decay in double, as a Python float; a 0-dim tensor meets the param's dtype as a
    # scalar does (rounded once to fp32), as the kernels round them
    lr_value = lr_tensor.double() if lr_tensor is not None else lr
    param_decay = 1 - lr_value * weight_decay
    torch._foreach_add_(steps, 1.0 if skip is None else (~skip).to(torch.float32))
    masters, remainders = param_masters(params, master_params)
    for i, part in pieces(params):
        param, master, remainder = (piece(t, part) for t in (params[i], masters[i], remainders[i]))
        p = update_start(param, master, remainder)
        g = piece(grads[i], part).to(p.dtype) * grad_multiplier
        # a bf16 moment (moments="bf16") or int8 codes (moments="int8"), dequantized
        exp_avg = piece(exp_avgs[i], part)
        scale_row = piece_scales(moment_scales[i], part)[0] if moment_scales else None
        m = dequantize(exp_avg, scale_row) if moment_scales else exp_avg.to(p.dtype)
        updated = p * param_decay - lr_value * torch.sign(beta1 * m + (1 - beta1) * g)
        updated_m = beta2 * m + (1 - beta2) * g
        if moment_scales:  # int8_moments.quantize with rounding.h's bits (the count after this step)
            updated_m, scales = quantize(updated_m, True,
                                         moment_bits16(seed, i, steps[i], 0, updated_m.numel(), part.start))
            scale_row.copy_(scales if skip is None else torch.where(skip, scale_row, scales))
        elif exp_avg.dtype == torch.bfloat16:  # rounding.h's to_moment
            updated_m = bf16_stochastic_round(updated_m, seed, i, steps[i], 0, part.start)
        exp_avg.copy_(updated_m if skip is None else torch.where(skip, exp_avg, updated_m))
        store_update(param, master, remainder, updated, skip, (seed, i, steps[i]) if stochastic_rounding else None,
                     part.start)


# CPU tensors run the Triton kernels only under TRITON_INTERPRET=1 (checked in _backend); triton is imported on
# the first call, so the package imports without it.
define_op("lion_step_", LION_SCHEMA, fake=lambda *args, **kwargs: None, torch_impl=_lion_step_torch,
          triton_impl=_lion_step_triton, sparse_message=SPARSE_MESSAGE)


def lion_step(params, grads, exp_avgs, master_params, steps, moment_scales=(), *, lr, beta1, beta2, weight_decay,
              maximize, stochastic_rounding=False, seed=0, grad_scale=None, found_inf=None, backend="auto") -> None:
    """One fused Lion step over lists of tensors on one device (see the schema above).

    `lr` is a float or a one-element tensor (read on the device). Params are fp32, bf16 or fp16 with fp32 state (or
    bf16, or int8 codes with their `moment_scales`: rounded stochastically from `seed`'s streams), or fp64 with fp64
    state (stepped in plain torch ops whatever the backend: the kernels are fp32); grads have the param's dtype or fp32
    (fp32 and fp64 params' bf16 or fp16 too). `backend` is resolved by fused_optim._backend. DTensors (params, grads
    and state alike) are stepped through their local shards (ops/_dtensor.py).
    """
    if not params:
        return
    count_writes(params)
    # one call per DTensor layout, each with its shards' seed
    calls = _dtensor.by_layout(seed, [params, grads, exp_avgs, master_params, steps, list(moment_scales)])
    for seed, (params, grads, exp_avgs, master_params, steps, moment_scales) in calls:
        lists = _dtensor.to_local("lion_step", params, grads, exp_avgs, master_params)
        wide, narrow = split_wide(real_views(lists) + [steps, list(moment_scales)])
        device = params[0].device
        for op, fp64_params, (params, grads, exp_avgs, master_params, steps, moment_scales) in (
                (resolve_op("lion_step_", "torch", device.type), True, wide),
                (resolve_op("lion_step_", backend, device.type), False, narrow)):
            if params:
                lr_value, lr_tensor, scale, inf = step_scalars(device, lr, grad_scale, found_inf, wide=fp64_params)
                op(params, grads, exp_avgs, master_params, steps, moment_scales, lr_value, lr_tensor, beta1, beta2,
                   weight_decay, maximize, stochastic_rounding, seed, scale, inf)
