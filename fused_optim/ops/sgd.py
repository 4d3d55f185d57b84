"""The SGD step as torch.library ops: one op per backend, one schema, and the one place that picks a backend.

- `fused_optim::sgd_step_`         the C++ kernels: csrc/cpu/sgd.cpp (CPU), csrc/cuda/sgd.cu (CUDA)
- `fused_optim::sgd_step_triton_`  fused_optim/triton/sgd.py
- `fused_optim::sgd_step_torch_`   plain torch ops, one tensor at a time in fp32: the fallback

Each op updates every tensor of its lists in place (params, momentum buffers, step counts). With momentum 0 the
buffer and step lists are empty (torch keeps no state then); otherwise a tensor whose step count is 0 takes its
gradient as its first buffer, decided on the device. The lr, the GradScaler's grad_scale and found_inf are read on
the device when given as tensors, and a found_inf != 0 leaves everything untouched, step counts included: no host
sync, so a step can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch

from fused_optim.int8_moments import dequantize, quantize
from fused_optim.ops import _dtensor
from fused_optim.ops._library import (FLOAT_DTYPES, check_scales, define_op, dense, grad_multiplier_and_skip, real_views,
                                      resolve_op, split_wide, step_scalars)
from fused_optim.rounding import bf16_stochastic_round, moment_bits16

SGD_SCHEMA = (
    "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, Tensor(c!)[] steps, "
    "Tensor(d!)[] moment_scales, float lr, "
    "Tensor? lr_tensor, float momentum, float dampening, float weight_decay, bool nesterov, bool maximize, "
    "int seed, Tensor? grad_scale, Tensor? found_inf) -> ()"
)



def check_sgd_args(params, grads, momentum_buffers, steps, moment_scales, momentum, dampening, nesterov, scalars=(),
                   dtypes=FLOAT_DTYPES) -> list[torch.Tensor]:
    """The Python twin of csrc/ops/sgd.h's check_sgd_args, for the Triton and torch ops
    (`dtypes`: the param dtypes the op takes): every argument checked before anything is written, and the grads
    returned in their params' memory layout."""
    n = len(params)
    if len(grads) != n:
        raise RuntimeError("sgd_step: params and grads must have the same length")
    if (len(momentum_buffers), len(steps)) != ((n, n) if momentum != 0 else (0, 0)):
        raise RuntimeError("sgd_step: with momentum, one momentum buffer and one step per param; without, none")
    if nesterov and (momentum <= 0 or dampening != 0):
        raise RuntimeError("sgd_step: Nesterov momentum requires a momentum and zero dampening")
    if n == 0:
        return []
    if any(grad.is_sparse for grad in grads):
        raise RuntimeError("sgd_step: sparse gradients are not supported")
    param_dtypes = [p.dtype for p in params]
    if not set(param_dtypes) <= set(dtypes):
        raise RuntimeError(f"sgd_step: params must be {', '.join(map(str, dtypes))}, got {set(param_dtypes)}")
    if any(g.dtype not in (dtype, torch.float32) for g, dtype in zip(grads, param_dtypes)):
        raise RuntimeError("sgd_step: a grad must have its param's dtype or float32")
    devices = {t.device for tensors in (params, grads, momentum_buffers, steps) for t in tensors}
    if len(devices) != 1:
        raise RuntimeError(f"sgd_step: all tensors must be on one device, got {sorted(map(str, devices))}")
    shapes, strides = [p.shape for p in params], [p.stride() for p in params]
    if [g.shape for g in grads] != shapes:
        raise RuntimeError("sgd_step: a grad must have its param's shape")
    if not all(p.is_contiguous() or dense(p) for p in params):
        raise RuntimeError("sgd_step: params must be dense")
    buffer_dtypes = [torch.float64 if dtype == torch.float64 else torch.float32 for dtype in param_dtypes]
    if momentum_buffers and momentum_buffers[0].dtype == torch.bfloat16 and torch.float64 not in param_dtypes:
        buffer_dtypes = [torch.bfloat16] * n  # moments="bf16"
    if moment_scales:  # moments="int8": codes, and their scales (one row)
        if not momentum_buffers or torch.float64 in param_dtypes:
            raise RuntimeError("sgd_step: int8 momentum buffers need momentum and float32, bfloat16 or float16 params")
        check_scales("sgd_step", params, moment_scales, 1, devices)
        buffer_dtypes = [torch.int8] * n
    if momentum_buffers and ([b.shape for b in momentum_buffers] != shapes
                             or [b.stride() for b in momentum_buffers] != strides
                             or [b.dtype for b in momentum_buffers] != buffer_dtypes):
        raise RuntimeError("sgd_step: a momentum buffer must have its param's shape, strides and device, float32 "
                           "(float64 for float64 params), all bfloat16, or int8 codes with scales")
    # The kernels read these through raw pointers as one fp32 value each.
    if any(step.numel() != 1 or step.dtype != torch.float32 for step in steps):
        raise RuntimeError("sgd_step: each step must be a one-element float32 tensor on the param's device")
    if any(t is not None and (t.numel() != 1 or t.dtype != torch.float32 or t.device not in devices) for t in scalars):
        raise RuntimeError("sgd_step: lr_tensor, grad_scale and found_inf must be one-element float32 tensors on "
                           "the params' device")
    matched_grads = list(grads)
    for i, grad in enumerate(grads):
        if grad.stride() != strides[i]:
            matched_grads[i] = torch.empty_like(params[i], dtype=grad.dtype).copy_(grad)
    return matched_grads


def _sgd_step_triton(params, grads, momentum_buffers, steps, moment_scales, lr, lr_tensor, momentum, dampening,
                     weight_decay, nesterov, maximize, seed, grad_scale, found_inf):
    from fused_optim.triton.sgd import sgd_step_triton

    grads = check_sgd_args(params, grads, momentum_buffers, steps, moment_scales, momentum, dampening, nesterov,
                           (lr_tensor, grad_scale, found_inf))
    if params:
        sgd_step_triton(params, grads, momentum_buffers, steps, moment_scales, lr, lr_tensor, momentum, dampening,
                        weight_decay, nesterov, maximize, seed, grad_scale, found_inf)


def _sgd_step_torch(params, grads, momentum_buffers, steps, moment_scales, lr, lr_tensor, momentum, dampening,
                    weight_decay, nesterov, maximize, seed, grad_scale, found_inf):
    """sgd.h's formulas in plain torch ops, one tensor at a time in fp32 (fp64 for fp64 params); the first step and
    a skipped step are selected with torch.where, so nothing is read on the host."""
    grads = check_sgd_args(params, grads, momentum_buffers, steps, moment_scales, momentum, dampening, nesterov,
                           (lr_tensor, grad_scale, found_inf), (*FLOAT_DTYPES, torch.float64))
    if not params:
        return
    grad_multiplier, skip = grad_multiplier_and_skip(maximize, grad_scale, found_inf)
    # Python floats meet fp32 tensors as fp32 values, as the kernels' fp32 scalars (1 - dampening in double first)
    lr_value = lr_tensor if lr_tensor is not None else lr
    for i, param in enumerate(params):
        compute_dtype = torch.promote_types(param.dtype, torch.float32)
        p = param.to(compute_dtype)
        g = grads[i].to(compute_dtype) * grad_multiplier
        if weight_decay != 0:
            g = g + weight_decay * p
        if momentum != 0:
            buffer = momentum_buffers[i]
            old_buffer = dequantize(buffer, moment_scales[i][0]) if moment_scales else buffer.to(compute_dtype)
            updated_buffer = torch.where(steps[i] == 0, g, old_buffer * momentum + (1.0 - dampening) * g)
            g = g + momentum * updated_buffer if nesterov else updated_buffer
            if moment_scales:  # moments="int8": int8_moments.quantize with rounding.h's bits, the count after
                codes, scales = quantize(updated_buffer, True, moment_bits16(seed, i, steps[i] + 1, 0, buffer.numel()))
                scale_row = moment_scales[i][0]
                scale_row.copy_(scales if skip is None else torch.where(skip, scale_row, scales))
                updated_buffer = codes
            elif buffer.dtype == torch.bfloat16:  # moments="bf16": rounding.h's to_moment, with the count after
                updated_buffer = bf16_stochastic_round(updated_buffer, seed, i, steps[i] + 1, 0)
            buffer.copy_(updated_buffer if skip is None else torch.where(skip, buffer, updated_buffer))
        updated = (p - lr_value * g).to(param.dtype)
        param.copy_(updated if skip is None else torch.where(skip, param, updated))
    if steps:
        torch._foreach_add_(steps, 1.0 if skip is None else (~skip).to(torch.float32))


# CPU tensors run the Triton kernels only under TRITON_INTERPRET=1 (checked in _backend); triton is imported on
# the first call, so the package imports without it.
define_op("sgd_step_", SGD_SCHEMA, fake=lambda *args, **kwargs: None, torch_impl=_sgd_step_torch,
          triton_impl=_sgd_step_triton, sparse_message="sgd_step: sparse gradients are not supported")


def sgd_step(params, grads, momentum_buffers, steps, moment_scales=(), *, lr, momentum, dampening, weight_decay,
             nesterov, maximize, seed=0, grad_scale=None, found_inf=None, backend="auto") -> None:
    """One fused SGD step over lists of tensors on one device (see the schema above).

    `lr` is a float or a one-element tensor (read on the device). Params are fp32, bf16 or fp16 with fp32 momentum
    buffers (or bf16 ones, or int8 codes with their `moment_scales`, rounded stochastically from `seed`'s
    streams), or fp64 with fp64 buffers (stepped in
    plain torch ops whatever the backend: the kernels are fp32), and complex ones are stepped as their real views;
    grads have the param's dtype or fp32. `backend` is resolved by fused_optim._backend.
    DTensors (params, grads and buffers alike) are stepped through their local shards (ops/_dtensor.py).
    """
    if not params:
        return
    # one call per DTensor layout, each with its shards' seed
    calls = _dtensor.by_layout(seed, [params, grads, momentum_buffers, steps, list(moment_scales)])
    for seed, (params, grads, momentum_buffers, steps, moment_scales) in calls:
        lists = _dtensor.to_local("sgd_step", params, grads, momentum_buffers)
        wide, narrow = split_wide([real_views(tensors) for tensors in lists] + [steps, list(moment_scales)])
        device = params[0].device
        for op, (params, grads, momentum_buffers, steps, moment_scales) in (
                (resolve_op("sgd_step_", "torch", device.type), wide),
                (resolve_op("sgd_step_", backend, device.type), narrow)):
            if params:
                lr_value, lr_tensor, scale, inf = step_scalars(device, lr, grad_scale, found_inf)
                op(params, grads, momentum_buffers, steps, moment_scales, lr_value, lr_tensor, momentum, dampening,
                   weight_decay, nesterov, maximize, seed, scale, inf)
