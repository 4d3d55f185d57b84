"""The Adam/AdamW step as torch.library ops: one op per backend, one schema, and the one place that picks a backend.

- `fused_optim::adam_step_`         the C++ kernels: csrc/cpu/adam.cpp (CPU), csrc/cuda/adam.cu (CUDA)
- `fused_optim::adam_step_triton_`  fused_optim/triton/adam.py
- `fused_optim::adam_step_torch_`   torch's own fused Adam (`torch._fused_adam_`), the fallback and the peer

Each op updates every tensor of its lists in place (params, moments, master params, step counts), reads the lr
and the GradScaler's grad_scale/found_inf from the device when given as tensors, and launches once per group
(a few times for very large groups on CUDA): no host sync, so a step can be captured in a CUDA graph. The ops are
opaque to torch.compile (a pointer table cannot be traced), which sees their mutations through the schema.
"""

from __future__ import annotations

import torch

from fused_optim import _chunks
from fused_optim.master_remainder import are_remainders, join_master, store_split
from fused_optim.ops import _dtensor
from fused_optim.ops._library import (FLOAT_DTYPES, check_step_lists, count_writes, define_op, piece, piece_scales,
                                      pieces, real_views, resolve_op, split_wide, step_scalars)
from fused_optim.int8_moments import dequantize, quantize
from fused_optim.rounding import bf16_stochastic_round, moment_bits16

ADAM_SCHEMA = (
    "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
    "Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] master_params, Tensor(f!)[] steps, Tensor(g!)[] moment_scales, "
    "float lr, Tensor? lr_tensor, "
    "float beta1, float beta2, float eps, float weight_decay, bool decoupled_weight_decay, bool amsgrad, "
    "bool maximize, bool stochastic_rounding, int seed, Tensor? grad_scale, Tensor? found_inf) -> ()"
)



def check_adam_args(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, steps, moment_scales,
                    amsgrad, stochastic_rounding, scalars=(), dtypes=FLOAT_DTYPES) -> list[torch.Tensor]:
    """The Python twin of csrc/ops/adam.h's check_adam_args, for the Triton and torch ops
    (`dtypes`: the param dtypes the op takes): every argument checked before anything is written, and the grads
    returned in their params' memory layout."""
    n = len(params)
    if not (len(grads) == len(exp_avgs) == len(exp_avg_sqs) == len(steps) == n):
        raise RuntimeError("adam_step: params, grads, exp_avgs, exp_avg_sqs and steps must have the same length")
    if amsgrad and len(max_exp_avg_sqs) != n:
        raise RuntimeError("adam_step: amsgrad needs one max_exp_avg_sq per param")
    if master_params and len(master_params) != n:
        raise RuntimeError("adam_step: one master param per param, or none")
    state_lists = [exp_avgs, exp_avg_sqs] + ([max_exp_avg_sqs] if amsgrad else [])
    return check_step_lists("adam_step", params, grads, steps, state_lists, stochastic_rounding, scalars, dtypes,
                            "Adam does not support sparse gradients, please consider SparseAdam instead",
                            master_params, bf16_moment_lists=len(state_lists),
                            int8_moments=(moment_scales, [True, False, False][:len(state_lists)]))


def _adam_step_triton(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, steps, moment_scales, lr,
                      lr_tensor, beta1, beta2, eps, weight_decay, decoupled_weight_decay, amsgrad, maximize, stochastic_rounding,
                      seed, grad_scale, found_inf):
    from fused_optim.triton.adam import adam_step_triton

    grads = check_adam_args(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, steps,
                            moment_scales, amsgrad, stochastic_rounding, (lr_tensor, grad_scale, found_inf))
    if params:
        adam_step_triton(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, steps, moment_scales,
                         lr, lr_tensor,
                         beta1, beta2, eps, weight_decay, decoupled_weight_decay, amsgrad, maximize,
                         stochastic_rounding, seed, grad_scale, found_inf)


def _adam_step_torch(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, steps, moment_scales, lr,
                     lr_tensor, beta1, beta2, eps, weight_decay, decoupled_weight_decay, amsgrad, maximize, stochastic_rounding,
                     seed, grad_scale, found_inf):
    """torch's fused kernel, on fp32 copies where our state is fp32 but the params are not (fp64 params run on
    themselves, with their fp64 state), and on fp32 copies of bf16 and int8 moments, rounded back stochastically;
    a batch of pieces of params at a time (_batches)."""
    grads = check_adam_args(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, steps,
                            moment_scales, amsgrad, stochastic_rounding, (lr_tensor, grad_scale, found_inf), (*FLOAT_DTYPES, torch.float64))
    if not params:
        return
    if found_inf is not None:
        # our kernels skip on any non-zero found_inf (a StepGuard adds its own inf check to GradScaler's, giving 2);
        # torch's skips only on exactly 1.0, and the step count below is taken back by found_inf itself
        found_inf = (found_inf != 0).to(torch.float32)
    fused = torch._fused_adamw_ if decoupled_weight_decay else torch._fused_adam_
    # torch's CUDA kernel reads a tensor lr as fp32 alone (its CPU one reads an fp64 one exactly)
    torch_lr = lr_tensor.float() if lr_tensor is not None and lr_tensor.is_cuda else lr_tensor
    torch._foreach_add_(steps, 1)  # torch's kernel reads the count after this step
    for batch in _batches(params):
        def pick(tensors, batch=batch):
            return [piece(tensors[i], part) for i, part in batch]

        group_params, group_steps = pick(params), [steps[i] for i, _ in batch]
        low_precision = group_params[0].dtype in (torch.bfloat16, torch.float16)
        remainders = pick(master_params) if are_remainders(master_params) else []
        if remainders:  # bf16 params with their masters' remainders: the fp32 masters, joined
            fp32_params = [join_master(p, r) for p, r in zip(group_params, remainders)]
        elif master_params:
            fp32_params = pick(master_params)
        elif low_precision:
            fp32_params = [p.float() for p in group_params]
        else:
            fp32_params = group_params
        # torch's kernel reads grads of its params' dtype (fp32, or fp64 for fp64 params; grad_dtype_fits lets them
        # be bf16/fp16), and unscales them in place, where our schema says grads are read-only: copies then. It takes
        # an fp32 grad_scale alone: fp64 params' copies are unscaled here, in fp64 (step_scalars)
        fp32_grads = [g.to(fp32_params[0].dtype, copy=grad_scale is not None) for g in pick(grads)]
        batch_scale = grad_scale
        if grad_scale is not None and fp32_params[0].dtype == torch.float64:
            torch._foreach_div_(fp32_grads, grad_scale)
            batch_scale = None
        moments = [pick(exp_avgs), pick(exp_avg_sqs), pick(max_exp_avg_sqs) if amsgrad else []]
        bf16_moments = moments[0][0].dtype == torch.bfloat16
        scales = [piece_scales(moment_scales[i], part) for i, part in batch] if moment_scales else []
        if scales:
            fp32_moments = [[dequantize(m, s[row]) for m, s in zip(tensors, scales)]
                            for row, tensors in enumerate(moments)]
        elif bf16_moments:
            fp32_moments = [[m.float() for m in tensors] for tensors in moments]
        else:
            fp32_moments = moments
        fused(fp32_params, fp32_grads, *fp32_moments, group_steps, lr=lr if lr_tensor is None else torch_lr,
              beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps, amsgrad=amsgrad, maximize=maximize,
              grad_scale=batch_scale, found_inf=found_inf)
        if bf16_moments:  # rounding.h's to_moment, each moment its own random stream (a skipped step's untouched
            # copies round back to themselves: they are bf16 values)
            for moment, (tensors, fp32_tensors) in enumerate(zip(moments, fp32_moments)):
                for (i, part), m, m32 in zip(batch, tensors, fp32_tensors):
                    m.copy_(bf16_stochastic_round(m32, seed, i, steps[i], moment, part.start))
        if scales:  # int8_moments.quantize with rounding.h's moment bits; a skipped step keeps the old codes
            for row, (tensors, fp32_tensors) in enumerate(zip(moments, fp32_moments)):
                for (i, part), codes, m32, s in zip(batch, tensors, fp32_tensors, scales):
                    bits = moment_bits16(seed, i, steps[i], row, m32.numel(), part.start)
                    new_codes, new_scales = quantize(m32, row == 0, bits)
                    if found_inf is not None:
                        new_codes = torch.where(found_inf != 0, codes, new_codes)
                        new_scales = torch.where(found_inf != 0, s[row], new_scales)
                    codes.copy_(new_codes)
                    s[row].copy_(new_scales)
        if remainders:
            store_split(group_params, remainders, fp32_params, None if found_inf is None else found_inf != 0)
        elif low_precision:
            if stochastic_rounding:
                rounded = [bf16_stochastic_round(p32, seed, i, steps[i], start=part.start)
                           for (i, part), p32 in zip(batch, fp32_params)]
            else:
                rounded = [p32.to(p.dtype) for p32, p in zip(fp32_params, group_params)]
            if found_inf is not None:  # a skipped step leaves the params exactly as they were
                rounded = [torch.where(found_inf != 0, p, r) for p, r in zip(group_params, rounded)]
            torch._foreach_copy_(group_params, rounded)
    if found_inf is not None:
        torch._foreach_sub_(steps, [found_inf] * len(steps))


def _batches(params) -> list[list[tuple[int, slice]]]:
    """The params' pieces (_library.pieces: (index, part)) in batches of one dtype (torch's fused kernel takes one per
    call) and CHUNK elements at most: the fp32 copies of bf16 params, master remainders and compact moments, and
    their random bits, are made a batch at a time."""
    batches: list[list[tuple[int, slice]]] = []
    open_batches: dict[torch.dtype, tuple[list[tuple[int, slice]], int]] = {}  # dtype -> (its last batch, elements)
    for i, part in pieces(params):
        numel = part.stop - part.start
        batch, count = open_batches.get(params[i].dtype, (None, 0))
        if batch is None or count + numel > _chunks.CHUNK:
            batch, count = [], 0
            batches.append(batch)
        batch.append((i, part))
        open_batches[params[i].dtype] = (batch, count + numel)
    return batches


# CPU tensors run the Triton kernels only under TRITON_INTERPRET=1 (checked in _backend); triton is imported on
# the first call, so the package imports without it.
define_op("adam_step_", ADAM_SCHEMA, fake=lambda *args, **kwargs: None, torch_impl=_adam_step_torch,
          triton_impl=_adam_step_triton,
          sparse_message="Adam does not support sparse gradients, please consider SparseAdam instead")


def adam_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, steps, moment_scales=(), *, lr,
              beta1, beta2,
              eps, weight_decay, decoupled_weight_decay, amsgrad, maximize, stochastic_rounding=False, seed=0,
              grad_scale=None, found_inf=None, backend="auto") -> None:
    """One fused Adam/AdamW step over lists of tensors on one device (see the schema above).

    `lr` is a float or a one-element tensor (read on the device). Params are fp32, bf16 or fp16 with fp32, or fp64
    with fp64 state (stepped by torch's own fused Adam whatever the backend: the kernels are fp32), and complex ones
    are stepped as their real views; grads have the param's dtype or fp32 (fp32 and fp64 params' bf16 or fp16 too).
    `backend` is resolved by fused_optim._backend. DTensors (params, grads and state alike) are stepped through their
    local shards (ops/_dtensor.py).
    """
    if not params:
        return
    count_writes(params)
    # one call per DTensor layout, each with its shards' seed
    calls = _dtensor.by_layout(seed, [params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, steps,
                                      list(moment_scales)])
    for seed, (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, steps, moment_scales) in calls:
        lists = _dtensor.to_local("adam_step", params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params)
        # (scales are plain tensors, a DTensor's its local shard's)
        wide, narrow = split_wide(real_views(lists) + [steps, list(moment_scales)])
        device = params[0].device
        for op, fp64_params, (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, steps,
                              moment_scales) in (
                (resolve_op("adam_step_", "torch", device.type), True, wide),
                (resolve_op("adam_step_", backend, device.type), False, narrow)):
            if params:
                lr_value, lr_tensor, scale, inf = step_scalars(device, lr, grad_scale, found_inf, wide=fp64_params)
                op(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, steps, moment_scales,
                   lr_value, lr_tensor, beta1, beta2, eps, weight_decay, decoupled_weight_decay, amsgrad, maximize,
                   stochastic_rounding, seed, scale, inf)
