"""Triton Lion over a packed pointer table: one launch per group (per param/grad dtype pair), as triton/adam.py.

The table holds, for each tensor, the addresses of its param, grad, moment, master copy and step count, its size,
and where its programs start in the grid. Each program finds its tensor by binary search over those starts and
updates BLOCKS consecutive blocks of BLOCK elements: unmasked (and, when the host saw every address 16-byte aligned,
with 16-byte loads) for whole blocks, masked for the last one. The element math mirrors
csrc/include/fused_optim/lion.h line for line; the step count keys the stochastic rounding's random stream, as in
triton/adam.py. With moments="int8" the moment is int8 codes with a scale per 64 elements, stepped as (BLOCK / 64,
64) tiles (triton/adam.py's _update_block_int8).
"""

from __future__ import annotations

import triton
import triton.language as tl

from fused_optim.triton._table import (DTYPES, EXACT_ARITHMETIC, addresses, all_aligned, device_table,
                                      increment_steps, load_pointer, locate_block, numels, pack, search_steps)
from fused_optim.triton.adam import (INT8_BLOCK, STOCHASTIC, _dequantize, _fp64_bits, _from_fp64_bits, _grad_multiplier,
                                     _moment_bits, _quantize, _store_moment, _stream_key, load_param, param_pointers,
                                     store_param, write_back)

BLOCK = 1024  # 4 warps x 32 threads x 8 elements: one 16-byte load of bf16, two of fp32, per array and thread
NUM_WARPS = 4  # benchmarks/gpu_triton_launch.py times other BLOCK, NUM_WARPS and BLOCKS on a GPU
# Blocks of one tensor a program and registers a thread at most, as triton/adam.py's: one until a GPU has timed four
BLOCKS, MAX_REGISTERS = 1, None
COLUMNS = 7  # param, grad, exp_avg, master, step, moment_scales, numel
STEP_COLUMN = 4


@triton.jit
def _lion_math(p, g, m, grad_multiplier, param_decay, lr, beta1, one_minus_beta1, beta2, one_minus_beta2):
    """lion.h's lion_update: the new param and moment."""
    g = g * grad_multiplier  # 1 / grad_scale, negated when maximizing
    p = p * param_decay  # decoupled weight decay
    direction = beta1 * m + one_minus_beta1 * g
    sign = (direction > 0.0).to(tl.float32) - (direction < 0.0).to(tl.float32)  # torch.sign: 0 for 0 and NaN
    m = beta2 * m + one_minus_beta2 * g
    p = p - lr * sign
    return p, m


@triton.jit
def _update_block(param_ptr, grad_ptr, exp_avg_ptr, master_ptr, offsets, mask, grad_multiplier, param_decay, lr,
                  beta1, one_minus_beta1, beta2, one_minus_beta2, stream, PARAM_DTYPE: tl.constexpr,
                  MOMENT_DTYPE: tl.constexpr, WRITE: tl.constexpr):
    p = load_param(param_ptr, master_ptr, offsets, mask, WRITE)
    g = tl.load(grad_ptr + offsets, mask=mask).to(tl.float32)
    m = tl.load(exp_avg_ptr + offsets, mask=mask).to(tl.float32)
    p, m = _lion_math(p, g, m, grad_multiplier, param_decay, lr, beta1, one_minus_beta1, beta2, one_minus_beta2)
    bits = 0
    if MOMENT_DTYPE == tl.bfloat16:  # moments="bf16": rounded stochastically (rounding.h's to_moment)
        bits = _moment_bits(stream, offsets, 0)
    _store_moment(exp_avg_ptr, offsets, mask, m, bits, MOMENT_DTYPE)
    store_param(param_ptr, master_ptr, offsets, mask, p, stream, PARAM_DTYPE, WRITE)


@triton.jit
def _update_block_int8(param_ptr, grad_ptr, codes_ptr, master_ptr, scales_ptr, start, numel, grad_multiplier,
                       param_decay, lr, beta1, one_minus_beta1, beta2, one_minus_beta2, stream,
                       PARAM_DTYPE: tl.constexpr, WRITE: tl.constexpr, BLOCK: tl.constexpr, FULL: tl.constexpr):
    """moments="int8": BLOCK elements as (BLOCK / 64, 64) tiles, one row per scale; FULL: the block lies inside the
    tensor, nothing masked."""
    groups: tl.constexpr = BLOCK // INT8_BLOCK
    scale_offsets = start // INT8_BLOCK + tl.arange(0, groups)
    offsets = scale_offsets[:, None] * INT8_BLOCK + tl.arange(0, INT8_BLOCK)[None, :]
    mask = None
    scale_mask = None
    if not FULL:
        mask = offsets < numel
        scale_mask = scale_offsets < (numel + INT8_BLOCK - 1) // INT8_BLOCK
    scales_ptr = scales_ptr.to(tl.pointer_type(tl.uint16))
    p = load_param(param_ptr, master_ptr, offsets, mask, WRITE)
    g = tl.load(grad_ptr + offsets, mask=mask).to(tl.float32)
    scales = tl.load(scales_ptr + scale_offsets, mask=scale_mask).to(tl.bfloat16, bitcast=True)
    m = _dequantize(tl.load(codes_ptr + offsets, mask=mask), scales, True)
    p, m = _lion_math(p, g, m, grad_multiplier, param_decay, lr, beta1, one_minus_beta1, beta2, one_minus_beta2)
    _quantize(codes_ptr, scales_ptr, offsets, mask, scale_offsets, scale_mask, m,
              _moment_bits(stream, offsets, 0) & 0xFFFF, True)
    store_param(param_ptr, master_ptr, offsets, mask, p, stream, PARAM_DTYPE, WRITE)


@triton.jit
def _step_block(param_ptr, grad_ptr, exp_avg_ptr, master_ptr, scales_ptr, block_start, numel, grad_multiplier,
                param_decay, lr, beta1, one_minus_beta1, beta2, one_minus_beta2, stream, PARAM_DTYPE: tl.constexpr,
                MOMENT_DTYPE: tl.constexpr, WRITE: tl.constexpr, BLOCK: tl.constexpr):
    """The block of BLOCK elements from block_start (inside the tensor): whole, or the tensor's partial last one."""
    offsets = block_start + tl.arange(0, BLOCK)
    if MOMENT_DTYPE == tl.int8:  # moments="int8"
        if block_start + BLOCK <= numel:
            _update_block_int8(param_ptr, grad_ptr, exp_avg_ptr, master_ptr, scales_ptr, block_start, numel,
                               grad_multiplier, param_decay, lr, beta1, one_minus_beta1, beta2, one_minus_beta2,
                               stream, PARAM_DTYPE, WRITE, BLOCK, True)
        else:
            _update_block_int8(param_ptr, grad_ptr, exp_avg_ptr, master_ptr, scales_ptr, block_start, numel,
                               grad_multiplier, param_decay, lr, beta1, one_minus_beta1, beta2, one_minus_beta2,
                               stream, PARAM_DTYPE, WRITE, BLOCK, False)
    elif block_start + BLOCK <= numel:  # a whole block: no mask, so the loads can be 16 bytes wide
        _update_block(param_ptr, grad_ptr, exp_avg_ptr, master_ptr, offsets, None, grad_multiplier, param_decay, lr,
                      beta1, one_minus_beta1, beta2, one_minus_beta2, stream, PARAM_DTYPE, MOMENT_DTYPE, WRITE)
    else:
        _update_block(param_ptr, grad_ptr, exp_avg_ptr, master_ptr, offsets, offsets < numel, grad_multiplier,
                      param_decay, lr, beta1, one_minus_beta1, beta2, one_minus_beta2, stream, PARAM_DTYPE,
                      MOMENT_DTYPE, WRITE)


@triton.jit
def _lion_kernel(
    table_ptr,  # (num_tensors * COLUMNS + num_tensors + 1,) int64: the rows, then the block starts
    lr_bits, lr_ptr, grad_scale_ptr, found_inf_ptr,  # the *_ptr read only when the matching HAS_ flag is set
    beta1, one_minus_beta1, beta2, one_minus_beta2, weight_decay_bits, seed, first_tensor_index, num_tensors,
    PARAM_DTYPE: tl.constexpr, GRAD_DTYPE: tl.constexpr, MOMENT_DTYPE: tl.constexpr, MAXIMIZE: tl.constexpr,
    WRITE: tl.constexpr,
    HAS_LR_TENSOR: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
    ALIGNED: tl.constexpr, SEARCH_STEPS: tl.constexpr, COLUMNS: tl.constexpr, BLOCK: tl.constexpr,
    BLOCKS: tl.constexpr,
):
    skip = False
    if HAS_FOUND_INF:
        skip = tl.load(found_inf_ptr) != 0.0  # GradScaler found inf/NaN: touch nothing
    if not skip:
        lo, start = locate_block(table_ptr, num_tensors, COLUMNS, SEARCH_STEPS, BLOCKS * BLOCK)
        row = table_ptr + lo * COLUMNS
        param_ptr, master_ptr = param_pointers(row, 0, 3, PARAM_DTYPE, WRITE, ALIGNED)
        grad_ptr = load_pointer(row, 1, GRAD_DTYPE, ALIGNED)
        exp_avg_ptr = load_pointer(row, 2, MOMENT_DTYPE, ALIGNED)
        numel = tl.load(row + 6)

        # The tensor's scalars (lion.h, lion_scalars): the lr in fp64 until 1 - lr * weight_decay is rounded.
        if HAS_LR_TENSOR:
            lr64 = tl.cast(tl.load(lr_ptr), tl.float64)
        else:
            lr64 = _from_fp64_bits(lr_bits)
        grad_multiplier = _grad_multiplier(grad_scale_ptr, HAS_GRAD_SCALE, MAXIMIZE)
        param_decay = (1.0 - lr64 * _from_fp64_bits(weight_decay_bits)).to(tl.float32)  # from the doubles, as lion.h
        stream = 0
        if WRITE == STOCHASTIC or MOMENT_DTYPE == tl.bfloat16 or MOMENT_DTYPE == tl.int8:
            step = tl.load(load_pointer(row, 4, tl.float32, False)) + 1.0
            stream = _stream_key(seed, first_tensor_index + lo, step)

        scales_ptr = row  # unused but for moments="int8", whose scales' address is in column 5
        if MOMENT_DTYPE == tl.int8:
            scales_ptr = load_pointer(row, 5, tl.uint16, False)
        if BLOCKS == 1:  # (no loop: the code as it was before BLOCKS, which the H200 timed)
            _step_block(param_ptr, grad_ptr, exp_avg_ptr, master_ptr, scales_ptr, start, numel, grad_multiplier,
                        param_decay, lr64.to(tl.float32), beta1, one_minus_beta1, beta2, one_minus_beta2, stream,
                        PARAM_DTYPE, MOMENT_DTYPE, WRITE, BLOCK)
        else:  # BLOCKS blocks of the tensor, one after another: the search and scalars above paid once for all
            for k in range(BLOCKS):
                if start + k * BLOCK < numel:  # (else the tensor ended in an earlier block of this program)
                    _step_block(param_ptr, grad_ptr, exp_avg_ptr, master_ptr, scales_ptr, start + k * BLOCK, numel,
                                grad_multiplier, param_decay, lr64.to(tl.float32), beta1, one_minus_beta1, beta2,
                                one_minus_beta2, stream, PARAM_DTYPE, MOMENT_DTYPE, WRITE, BLOCK)


def lion_step_triton(params, grads, exp_avgs, master_params, steps, moment_scales, lr, lr_tensor, beta1, beta2,
                     weight_decay, maximize, stochastic_rounding, seed, grad_scale, found_inf) -> None:
    """The fused_optim::lion_step_triton_ op (schema and argument checks in fused_optim/ops/lion.py)."""
    # Consecutive tensors of one (param dtype, grad dtype) pair share a launch.
    start = 0
    for end in range(1, len(params) + 1):
        if end == len(params) or (params[end].dtype, grads[end].dtype) != (params[start].dtype, grads[start].dtype):
            _launch(params[start:end], grads[start:end], exp_avgs[start:end], master_params[start:end],
                    steps[start:end], moment_scales[start:end], start, lr, lr_tensor, beta1, beta2, weight_decay,
                    maximize, stochastic_rounding, seed, grad_scale, found_inf)
            start = end


def _launch(params, grads, exp_avgs, master_params, steps, moment_scales, first_tensor_index, lr, lr_tensor, beta1,
            beta2, weight_decay, maximize, stochastic_rounding, seed, grad_scale, found_inf) -> None:
    absent = [0] * len(params)  # the column of an array the call has not
    columns = [addresses(params), addresses(grads), addresses(exp_avgs),
               addresses(master_params) if master_params else absent, addresses(steps),
               addresses(moment_scales) if moment_scales else absent, numels(params)]
    # 16-byte loads need every array address (the first four columns; steps are read alone) 16-byte aligned.
    aligned = all_aligned(*columns[:4])
    entries, num_programs = pack(columns, BLOCKS * BLOCK)
    table = device_table(entries, params[0].device)
    num_tensors = len(params)
    unused = table  # a valid pointer for the *_ptr arguments whose HAS_ flag is off
    if num_programs > 0:
        _lion_kernel[(num_programs,)](
            table, _fp64_bits(lr), unused if lr_tensor is None else lr_tensor,
            unused if grad_scale is None else grad_scale, unused if found_inf is None else found_inf,
            beta1, 1.0 - beta1, beta2, 1.0 - beta2, _fp64_bits(weight_decay), seed, first_tensor_index, num_tensors,
            PARAM_DTYPE=DTYPES[params[0].dtype], GRAD_DTYPE=DTYPES[grads[0].dtype],
            MOMENT_DTYPE=tl.int8 if moment_scales else DTYPES[exp_avgs[0].dtype], MAXIMIZE=maximize,
            WRITE=write_back(stochastic_rounding, master_params), HAS_LR_TENSOR=lr_tensor is not None,
            HAS_GRAD_SCALE=grad_scale is not None, HAS_FOUND_INF=found_inf is not None, ALIGNED=aligned,
            SEARCH_STEPS=search_steps(num_tensors), COLUMNS=COLUMNS, BLOCK=BLOCK, BLOCKS=BLOCKS, num_warps=NUM_WARPS,
            maxnreg=MAX_REGISTERS, **EXACT_ARITHMETIC,
        )
    increment_steps(table, num_tensors, COLUMNS, STEP_COLUMN, found_inf)
