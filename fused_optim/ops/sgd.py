"""The SGD step as torch.library ops: one op per backend, one schema, and the one place that picks a backend.

- `fused_optim::sgd_step_`         the C++ kernels: csrc/cpu/sgd.cpp (CPU), csrc/cuda/sgd.cu (CUDA)
- `fused_optim::sgd_step_triton_`  fused_optim/triton/sgd.py
- `fused_optim::sgd_step_torch_`   plain torch ops, one tensor at a time in fp32: the fallback

Each op updates every tensor of its lists in place (params, momentum buffers, master params, step counts). With
momentum 0 the buffer list is empty (torch keeps no state then), and so is the step list unless the params round
stochastically (the count keys the random stream); otherwise a tensor whose step count is 0 takes its gradient as
its first buffer, decided on the device. The lr, the GradScaler's grad_scale and found_inf are read on
the device when given as tensors, and a found_inf != 0 leaves everything untouched, step counts included: no host
sync, so a step can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch

from fused_optim.int8_moments import dequantize, quantize
from fused_optim.multiply_add import multiply_add
from fused_optim.ops import _dtensor
from fused_optim.ops._library import (FLOAT_DTYPES, check_step_lists, count_writes, define_op, grad_multiplier_and_skip,
                                      param_masters, piece, piece_scales, pieces, real_views, resolve_op, split_wide,
                                      step_scalars, store_update, update_start)
from fused_optim.rounding import bf16_stochastic_round, moment_bits16

SGD_SCHEMA = (
    "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, Tensor(c!)[] master_params, "
    "Tensor(d!)[] steps, Tensor(e!)[] moment_scales, float lr, Tensor? lr_tensor, float momentum, float dampening, "
    "float weight_decay, bool nesterov, bool maximize, bool stochastic_rounding, int seed, Tensor? grad_scale, "
    "Tensor? found_inf) -> ()"
)
SPARSE_MESSAGE = "sgd_step: sparse gradients are not supported"


def check_sgd_args(params, grads, momentum_buffers, master_params, steps, moment_scales, momentum,
                   nesterov, stochastic_rounding, scalars=(), dtypes=FLOAT_DTYPES) -> list[torch.Tensor]:
    """The Python twin of csrc/ops/sgd.h's check_sgd_args, for the Triton and torch ops
    (`dtypes`: the param dtypes the op takes): every argument checked before anything is written, and the grads
    returned in their params' memory layout."""
    n = len(params)
    if len(grads) != n:
        raise RuntimeError("sgd_step: params and grads must have the same length")
    if len(momentum_buffers) != (n if momentum != 0 else 0):
        raise RuntimeError("sgd_step: with momentum, one momentum buffer per param; without, none")
    if len(steps) != (n if momentum != 0 or stochastic_rounding else 0):
        raise RuntimeError("sgd_step: with momentum or stochastic rounding, one step per param; without, none")
    if master_params and len(master_params) != n:
        raise RuntimeError("sgd_step: one master param per param, or none")
    if stochastic_rounding and master_params:
        raise RuntimeError("sgd_step: stochastic_rounding and master params are alternatives; pass one")
    if nesterov and momentum <= 0:  # dampening is allowed: torch checks it with Nesterov at construction only
        raise RuntimeError("sgd_step: Nesterov momentum requires a momentum")
    if moment_scales and not momentum_buffers:
        raise RuntimeError("sgd_step: int8 momentum buffers need momentum")
    buffers = [momentum_buffers] if momentum_buffers else []
    return check_step_lists("sgd_step", params, grads, steps, buffers, stochastic_rounding, scalars, dtypes,
                            SPARSE_MESSAGE, master_params, bf16_moment_lists=len(buffers),
                            int8_moments=(moment_scales, [True] * len(buffers)))


def _sgd_step_triton(params, grads, momentum_buffers, master_params, steps, moment_scales, lr, lr_tensor, momentum,
                     dampening, weight_decay, nesterov, maximize, stochastic_rounding, seed, grad_scale, found_inf):
    from fused_optim.triton.sgd import sgd_step_triton

    grads = check_sgd_args(params, grads, momentum_buffers, master_params, steps, moment_scales, momentum,
                           nesterov, stochastic_rounding, (lr_tensor, grad_scale, found_inf))
    if params:
        sgd_step_triton(params, grads, momentum_buffers, master_params, steps, moment_scales, lr, lr_tensor, momentum,
                        dampening, weight_decay, nesterov, maximize, stochastic_rounding, seed, grad_scale, found_inf)


def _sgd_step_torch(params, grads, momentum_buffers, master_params, steps, moment_scales, lr, lr_tensor, momentum,
                    dampening, weight_decay, nesterov, maximize, stochastic_rounding, seed, grad_scale, found_inf):
    """sgd.h's formulas in plain torch ops, a piece of a tensor at a time (_library.pieces) in fp32 (fp64 for fp64
    params); the first step and a skipped step are selected with torch.where, so nothing is read on the host."""
    grads = check_sgd_args(params, grads, momentum_buffers, master_params, steps, moment_scales, momentum,
                           nesterov, stochastic_rounding, (lr_tensor, grad_scale, found_inf),
                           (*FLOAT_DTYPES, torch.float64))
    if not params:
        return
    grad_multiplier, skip = grad_multiplier_and_skip(maximize, grad_scale, found_inf)
    # Python floats meet fp32 tensors as fp32 values, as the kernels' fp32 scalars (1 - dampening in double first)
    lr_value = lr_tensor if lr_tensor is not None else lr
    masters, remainders = param_masters(params, master_params)
    for i, part in pieces(params):
        param, master, remainder = (piece(t, part) for t in (params[i], masters[i], remainders[i]))
        p = update_start(param, master, remainder)
        g = piece(grads[i], part).to(p.dtype) * grad_multiplier
        if weight_decay != 0:
            g = multiply_add(weight_decay, p, g)
        if momentum != 0:
            buffer = piece(momentum_buffers[i], part)
            scale_row = piece_scales(moment_scales[i], part)[0] if moment_scales else None
            old_buffer = dequantize(buffer, scale_row) if moment_scales else buffer.to(p.dtype)
            updated_buffer = torch.where(steps[i] == 0, g, multiply_add(1.0 - dampening, g, old_buffer * momentum))
            g = multiply_add(momentum, updated_buffer, g) if nesterov else updated_buffer
            if moment_scales:  # moments="int8": int8_moments.quantize with rounding.h's bits, the count after
                codes, scales = quantize(updated_buffer, True,
                                         moment_bits16(seed, i, steps[i] + 1, 0, buffer.numel(), part.start))
                scale_row.copy_(scales if skip is None else torch.where(skip, scale_row, scales))
                updated_buffer = codes
            elif buffer.dtype == torch.bfloat16:  # moments="bf16": rounding.h's to_moment, with the count after
                updated_buffer = bf16_stochastic_round(updated_buffer, seed, i, steps[i] + 1, 0, part.start)
            buffer.copy_(updated_buffer if skip is None else torch.where(skip, buffer, updated_buffer))
        # stochastic rounding: rounding.h's stream of the count after this step, as the kernels'
        store_update(param, master, remainder, multiply_add(-lr_value, g, p), skip,
                     (seed, i, steps[i] + 1) if stochastic_rounding else None, part.start)
    if steps:
        torch._foreach_add_(steps, 1.0 if skip is None else (~skip).to(torch.float32))


# CPU tensors run the Triton kernels only under TRITON_INTERPRET=1 (checked in _backend); triton is imported on
# the first call, so the package imports without it.
define_op("sgd_step_", SGD_SCHEMA, fake=lambda *args, **kwargs: None, torch_impl=_sgd_step_torch,
          triton_impl=_sgd_step_triton, sparse_message=SPARSE_MESSAGE)


def sgd_step(params, grads, momentum_buffers, steps, moment_scales=(), *, lr, momentum, dampening, weight_decay,
             nesterov, maximize, master_params=(), stochastic_rounding=False, seed=0, grad_scale=None, found_inf=None,
             backend="auto") -> None:
    """One fused SGD step over lists of tensors on one device (see the schema above).

    `lr` is a float or a one-element tensor (read on the device). Params are fp32, bf16 or fp16 with fp32 momentum
    buffers (or bf16 ones, or int8 codes with their `moment_scales`, rounded stochastically from `seed`'s
    streams), or fp64 with fp64 buffers (stepped in plain torch ops whatever the backend: the kernels are fp32), and
    complex ones are stepped as their real views; grads have the param's dtype or fp32 (fp32 and fp64 params' bf16
    or fp16 too). `master_params`: each low-precision param's fp32 master copy or bf16 remainder (the update starts
    from the master and writes both), or none; `stochastic_rounding` rounds bf16 params stochastically instead
    (`steps` then given without momentum too). `backend` is resolved by fused_optim._backend. DTensors (params, grads
    and state alike) are stepped through their local shards (ops/_dtensor.py).
    """
    if not params:
        return
    count_writes(params)
    # one call per DTensor layout, each with its shards' seed
    calls = _dtensor.by_layout(seed, [params, grads, momentum_buffers, list(master_params), steps,
                                      list(moment_scales)])
    for seed, (params, grads, momentum_buffers, master_params, steps, moment_scales) in calls:
        lists = _dtensor.to_local("sgd_step", params, grads, momentum_buffers, master_params)
        wide, narrow = split_wide(real_views(lists) + [steps, list(moment_scales)])
        device = params[0].device
        for op, fp64_params, (params, grads, momentum_buffers, master_params, steps, moment_scales) in (
                (resolve_op("sgd_step_", "torch", device.type), True, wide),
                (resolve_op("sgd_step_", backend, device.type), False, narrow)):
            if params:
                lr_value, lr_tensor, scale, inf = step_scalars(device, lr, grad_scale, found_inf, wide=fp64_params)
                op(params, grads, momentum_buffers, master_params, steps, moment_scales, lr_value, lr_tensor,
                   momentum, dampening, weight_decay, nesterov, maximize, stochastic_rounding, seed, scale, inf)
