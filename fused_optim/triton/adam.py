"""Triton Adam/AdamW over a packed pointer table: one launch per group (per param/grad dtype pair).

The table holds, for each tensor, the addresses of its param, grad, moments, master copy and step count, its size,
and where its programs start in the grid. Each program finds its tensor by binary search over those starts, derives
the tensor's scalars from the step count on the device, and updates BLOCKS consecutive blocks of BLOCK elements:
unmasked (and, when the host saw every address 16-byte aligned, with 16-byte loads) for whole blocks, masked for the
last one. The element math mirrors csrc/include/fused_optim/adam.h line for line; the stochastic-rounding hash
mirrors rounding.h.

The table and its search are fused_optim/triton/_table.py's, shared with the other multi-tensor kernels.
"""

from __future__ import annotations

import math
import struct

import torch
import triton
import triton.language as tl

from fused_optim.triton._exact_math import code_root, multiply_add, quotient_by_constant
from fused_optim.triton._table import (DTYPES, EXACT_ARITHMETIC, addresses, all_aligned, device_table,
                                      increment_steps, load_pointer, locate_block, numels, pack, search_steps)

BLOCK = 1024  # 4 warps x 32 threads x 8 elements: one 16-byte load of bf16, two of fp32, per array and thread
NUM_WARPS = 4  # benchmarks/gpu_triton_launch.py times other BLOCK, NUM_WARPS and BLOCKS on a GPU
# Consecutive blocks of one tensor a program steps. Every thread computes the tensor's search and scalars (a chain of
# dependent loads, then fp64 bias corrections: 180-200 instructions) once a program; at four blocks the whole
# block's path is 11-13 % shorter for int8 moments and stochastic rounding (sm_90 SASS,
# benchmarks/sass_per_element.py), but Triton 3.6 then takes more registers (fewer programs an SM) on six rows.
# One until a GPU has timed four (benchmarks/gpu_triton_launch.py).
BLOCKS = 1
# Registers a thread at most (None: as many as the compiler takes; a cap spills with amsgrad).
MAX_REGISTERS = None
COLUMNS = 9  # param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, master, step, moment_scales, numel
STEP_COLUMN = 6


@triton.jit
def _mix32(h):
    h ^= h >> 16
    h *= 0x85EBCA6B
    h ^= h >> 13
    h *= 0xC2B2AE35
    return h ^ (h >> 16)


@triton.jit
def _stream_key(seed, tensor_index, step):
    """The random stream of one tensor at one step (the count after it): rounding.h's stream_key."""
    return _mix32(_mix32(tl.cast(seed, tl.uint32) + 0x9E3779B9 * tensor_index.to(tl.uint32)) ^ step.to(tl.uint32))


@triton.jit
def _random_bits(stream, index):
    """32 random bits for element `index` of `stream` (rounding.h's random_bits)."""
    index = index.to(tl.uint64)
    return _mix32(_mix32(stream ^ index.to(tl.uint32)) + (index >> 32).to(tl.uint32))


@triton.jit
def _bf16_stochastic(x, bits):
    """x (fp32) to bf16, rounding up with probability equal to the discarded fraction: the low 16 of `bits` added
    below the bf16 mantissa, then truncated (rounding.h); inf and NaN unchanged."""
    u = x.to(tl.uint32, bitcast=True)
    u = tl.where((u & 0x7F800000) != 0x7F800000, u + (bits & 0xFFFF), u)
    return (u >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _moment_bits(stream, offsets, draw: tl.constexpr):
    """Random bits of bf16 moments (rounding.h's moment_stream and moment_bits): draw 0 rounds exp_avg (low 16) and
    exp_avg_sq (high 16), draw 1 max_exp_avg_sq."""
    moment_stream = _mix32(stream + ((0x9E3779B9 * (draw + 1)) & 0xFFFFFFFF))
    index = offsets.to(tl.uint64)
    return _mix32((moment_stream ^ index.to(tl.uint32)) + 0x9E3779B9 * (index >> 32).to(tl.uint32))


@triton.jit
def _store_moment(ptr, offsets, mask, value, bits, MOMENT_DTYPE: tl.constexpr):
    """A moment's new value: fp32 as it is, bf16 (moments="bf16") stochastically rounded with the low 16 of `bits`
    (rounding.h's to_moment)."""
    if MOMENT_DTYPE == tl.bfloat16:
        tl.store(ptr + offsets, _bf16_stochastic(value, bits), mask=mask)
    else:
        tl.store(ptr + offsets, value, mask=mask)


@triton.jit
def _bf16_nearest(x):
    """x (fp32) to bf16, to nearest with ties to even, in integer ops (rounding.h's float_to_bf16_bits): Triton's
    interpreter truncates in its own fp32-to-bf16 cast, and the tests run the kernel there."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    rounded = tl.where(x != x, 0x7FC0, rounded)  # NaN stays a quiet NaN
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


# How an update's result reaches a param (rounding.h's WriteBack): rounded to nearest, through an fp32 master copy,
# through a bf16 param's int16 master remainder (the two together are the fp32 master), stochastically rounded, or
# through an int8 remainder (a 24-bit master).
NEAREST: tl.constexpr = tl.constexpr(0)
MASTER: tl.constexpr = tl.constexpr(1)
REMAINDER: tl.constexpr = tl.constexpr(2)
STOCHASTIC: tl.constexpr = tl.constexpr(3)
REMAINDER8: tl.constexpr = tl.constexpr(4)


def write_back(stochastic_rounding: bool, master_params) -> int:
    """The write-back of a call: stochastic rounding, or its master list's kind."""
    if stochastic_rounding:
        return STOCHASTIC.value
    if not master_params:
        return NEAREST.value
    return {torch.int16: REMAINDER.value, torch.int8: REMAINDER8.value}.get(master_params[0].dtype, MASTER.value)


@triton.jit
def param_pointers(row, param_column, master_column, PARAM_DTYPE: tl.constexpr, WRITE: tl.constexpr,
                   ALIGNED: tl.constexpr):
    """A row's param and master addresses as pointers: a remainder's param is read and written as its raw bits."""
    if WRITE == REMAINDER:
        param_ptr = load_pointer(row, param_column, tl.uint16, ALIGNED)
        master_ptr = load_pointer(row, master_column, tl.int16, ALIGNED)
    elif WRITE == REMAINDER8:
        param_ptr = load_pointer(row, param_column, tl.uint16, ALIGNED)
        master_ptr = load_pointer(row, master_column, tl.int8, ALIGNED)
    else:
        param_ptr = load_pointer(row, param_column, PARAM_DTYPE, ALIGNED)
        master_ptr = load_pointer(row, master_column, tl.float32, ALIGNED)
    return param_ptr, master_ptr


@triton.jit
def load_param(param_ptr, master_ptr, offsets, mask, WRITE: tl.constexpr):
    """The fp32 values an update starts from: the param's, its master copy's, or the bf16 param's bits joined with
    its sign-extended remainder (rounding.h's join_bf16_master)."""
    if WRITE == REMAINDER:
        bits = tl.load(param_ptr + offsets, mask=mask).to(tl.uint32)
        rest = tl.load(master_ptr + offsets, mask=mask).to(tl.int32).to(tl.uint32, bitcast=True)
        p = ((bits << 16) + rest).to(tl.float32, bitcast=True)
    elif WRITE == REMAINDER8:  # rounding.h's join_bf16_master24
        bits = tl.load(param_ptr + offsets, mask=mask).to(tl.uint32)
        rest = tl.load(master_ptr + offsets, mask=mask).to(tl.int32).to(tl.uint32, bitcast=True)
        p = (((bits << 8) + rest) << 8).to(tl.float32, bitcast=True)
    elif WRITE == MASTER:
        p = tl.load(master_ptr + offsets, mask=mask)
    else:
        p = tl.load(param_ptr + offsets, mask=mask).to(tl.float32)
    return p


@triton.jit
def store_param(param_ptr, master_ptr, offsets, mask, p, stream, PARAM_DTYPE: tl.constexpr, WRITE: tl.constexpr):
    """An optimizer's new param values `p` (fp32) into the param, by WRITE: with the master copy, split into a bf16
    param rounded to nearest with ties away from zero and the int16 remainder below it (rounding.h's
    bf16_master_bits), the same one byte lower for a 24-bit master (REMAINDER8), stochastically rounded to bf16
    (with the tensor's random stream), or rounded to nearest."""
    if WRITE == REMAINDER:
        u = p.to(tl.uint32, bitcast=True)
        bits = tl.where((u & 0x7FFFFFFF) > 0x7F800000, (u >> 16) | 0x0040, (u + 0x8000) >> 16)
        tl.store(param_ptr + offsets, bits.to(tl.uint16), mask=mask)
        tl.store(master_ptr + offsets, (u - (bits << 16)).to(tl.uint16).to(tl.int16, bitcast=True), mask=mask)
    elif WRITE == REMAINDER8:  # rounding.h's bf16_master24_bits and bf16_master24_remainder
        u = p.to(tl.uint32, bitcast=True)
        nan = (u & 0x7FFFFFFF) > 0x7F800000
        top24 = (u + 0x80) >> 8
        bits = tl.where(nan, (u >> 16) | 0x0040, (top24 + 0x80) >> 8)
        rest = tl.where(nan, 0, top24 - (bits << 8)) & 0xFF
        tl.store(param_ptr + offsets, bits.to(tl.uint16), mask=mask)
        tl.store(master_ptr + offsets, rest.to(tl.uint8).to(tl.int8, bitcast=True), mask=mask)
    else:
        if WRITE == MASTER:
            tl.store(master_ptr + offsets, p, mask=mask)
        if WRITE == STOCHASTIC:
            tl.store(param_ptr + offsets, _bf16_stochastic(p, _random_bits(stream, offsets)), mask=mask)
        elif PARAM_DTYPE == tl.bfloat16:
            tl.store(param_ptr + offsets, _bf16_nearest(p), mask=mask)
        else:
            tl.store(param_ptr + offsets, p.to(PARAM_DTYPE), mask=mask)


@triton.jit
def _adam_math(p, g, m, v, max_v, grad_multiplier, weight_decay, param_decay, one_minus_beta1, beta2,
               one_minus_beta2, step_size, bias_correction2_sqrt, eps, DECOUPLED: tl.constexpr,
               AMSGRAD: tl.constexpr):
    """adam.h's adam_update on fp32 values: (new param, exp_avg, exp_avg_sq, max_exp_avg_sq)."""
    g = g * grad_multiplier  # 1 / grad_scale, negated when maximizing
    if DECOUPLED:  # AdamW's decoupled decay
        p = p * param_decay
    elif weight_decay != 0.0:  # Adam's coupled (L2) decay
        g = multiply_add(weight_decay, p, g)  # one rounding, as torch's grad.add(param, alpha=weight_decay)
    # torch's lerp(m, g, w): exact at either end of the weight range
    if one_minus_beta1 < 0.5:
        m = m + one_minus_beta1 * (g - m)
    else:
        m = g - (g - m) * (1.0 - one_minus_beta1)
    v = v * beta2 + one_minus_beta2 * g * g
    second_moment = v
    if AMSGRAD:
        second_moment = tl.where((v > max_v) | (v != v), v, max_v)  # a NaN in either kept (adam.h)
    # correctly rounded division and square root (Triton's defaults are approximate), as the CUDA and CPU kernels
    # compute them: the division by the tensor's constant sqrt(1 - beta2^t) by _exact_math.py's sequence
    inverse_bias_correction2_sqrt = tl.div_rn(1.0, bias_correction2_sqrt)
    denom = quotient_by_constant(tl.sqrt_rn(second_moment), bias_correction2_sqrt, inverse_bias_correction2_sqrt) + eps
    p = p - tl.div_rn(step_size * m, denom)  # (step_size * m) / denom, in torch's order (adam.h)
    return p, m, v, second_moment


@triton.jit
def _update_block(param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, max_sq_ptr, master_ptr, offsets, mask,
                  grad_multiplier, weight_decay, param_decay, one_minus_beta1, beta2, one_minus_beta2, step_size,
                  bias_correction2_sqrt, eps, stream, PARAM_DTYPE: tl.constexpr, MOMENT_DTYPE: tl.constexpr,
                  DECOUPLED: tl.constexpr, AMSGRAD: tl.constexpr, WRITE: tl.constexpr):
    p = load_param(param_ptr, master_ptr, offsets, mask, WRITE)
    g = tl.load(grad_ptr + offsets, mask=mask).to(tl.float32)
    m = tl.load(exp_avg_ptr + offsets, mask=mask).to(tl.float32)
    v = tl.load(exp_avg_sq_ptr + offsets, mask=mask).to(tl.float32)
    max_v = 0.0
    if AMSGRAD:
        max_v = tl.load(max_sq_ptr + offsets, mask=mask).to(tl.float32)
    p, m, v, max_v = _adam_math(p, g, m, v, max_v, grad_multiplier, weight_decay, param_decay, one_minus_beta1,
                                beta2, one_minus_beta2, step_size, bias_correction2_sqrt, eps, DECOUPLED, AMSGRAD)
    if AMSGRAD:
        max_bits = 0
        if MOMENT_DTYPE == tl.bfloat16:
            max_bits = _moment_bits(stream, offsets, 1)
        _store_moment(max_sq_ptr, offsets, mask, max_v, max_bits, MOMENT_DTYPE)
    bits = 0
    if MOMENT_DTYPE == tl.bfloat16:
        bits = _moment_bits(stream, offsets, 0)
    _store_moment(exp_avg_ptr, offsets, mask, m, bits, MOMENT_DTYPE)
    _store_moment(exp_avg_sq_ptr, offsets, mask, v, bits >> 16, MOMENT_DTYPE)
    store_param(param_ptr, master_ptr, offsets, mask, p, stream, PARAM_DTYPE, WRITE)


# moments="int8": moment_int8.h's formulas, operation for operation (int8_moments.py is the torch twin).
INT8_BLOCK: tl.constexpr = tl.constexpr(64)


@triton.jit
def _dequantize(codes, scales, SIGNED: tl.constexpr):
    """(groups, INT8_BLOCK) codes with their (groups,) bf16 scales, as fp32."""
    c = codes.to(tl.float32)
    if SIGNED:
        return (c * tl.abs(c)) * (scales.to(tl.float32) * (1.0 / 16129.0))[:, None]
    root = (c * c) * (scales.to(tl.float32) * (1.0 / 65025.0))[:, None]
    return root * root


@triton.jit
def _quantize(ptr, scales_ptr, offsets, mask, scale_offsets, scale_mask, x, bits16, SIGNED: tl.constexpr):
    """Stores x's codes and its blocks' scales: each block's largest magnitude (on the fp32 bits, so NaN wins),
    rounded up to bf16. A code is s = sqrt(|x| / scale) in 127 (255) steps with 16 fraction bits, rounded from
    c = floor(s) by the 16 random bits `bits16` (moment_int8.h's quantize_signed and quantize_unsigned). A
    non-negative moment is given by its square roots."""
    magnitude = x.to(tl.uint32, bitcast=True) & 0x7FFFFFFF
    if mask is not None:  # a partial block: the elements past the end count for nothing
        magnitude = tl.where(mask, magnitude, 0)
    largest = tl.minimum(tl.max(magnitude, axis=1), 0x7FC00000)  # a NaN as 0x7FC00000 (moment_int8.h)
    scale_bits = (largest + 0xFFFF) >> 16
    tl.store(scales_ptr + scale_offsets, scale_bits.to(tl.uint16), mask=scale_mask)
    scale = (scale_bits << 16).to(tl.float32, bitcast=True)
    # a zero, NaN or subnormal block: 0 (moment_int8.h's inverse_scale)
    inverse = tl.where(scale >= 1.1754943508222875e-38, tl.div_rn(1.0, scale), 0.0)[:, None]
    quotient = tl.abs(x) * inverse
    fixed = (code_root(tl.where(quotient < 1.0, quotient, 1.0)) * ((127.0 if SIGNED else 255.0) * 65536.0)).to(tl.int32)
    if SIGNED:  # up with probability f (s + c) / (2c + 1): the value c^2 is unbiased (moment_int8.h)
        s = fixed.to(tl.float32)  # s 2^16, exactly (< 2^23)
        c = (fixed & ~0xFFFF).to(tl.float32)  # c 2^16
        draw = (65536 - bits16.to(tl.int32)).to(tl.float32)  # u 2^16
        up = draw * ((c + c) + 65536.0) < (s - c) * (s + c)
        code = (fixed >> 16) + tl.where(up, 1, 0)
        tl.store(ptr + offsets, tl.where(x < 0.0, -code, code).to(tl.int8), mask=mask)
    else:  # up with probability f: the code is unbiased; a non-zero moment keeps code 1
        code = tl.maximum((fixed + bits16.to(tl.int32)) >> 16, tl.where(x > 0.0, 1, 0))
        tl.store(ptr + offsets, code.to(tl.uint8), mask=mask)


@triton.jit
def _update_block_int8(param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, max_sq_ptr, master_ptr, scales_ptr,
                       start, numel, grad_multiplier, weight_decay, param_decay, one_minus_beta1, beta2,
                       one_minus_beta2, step_size, bias_correction2_sqrt, eps, stream, PARAM_DTYPE: tl.constexpr,
                       DECOUPLED: tl.constexpr, AMSGRAD: tl.constexpr, WRITE: tl.constexpr, BLOCK: tl.constexpr,
                       FULL: tl.constexpr):
    """The update of BLOCK elements with int8 moments, as (BLOCK / 64, 64) tiles: one row per scale. The scale rows
    of a tensor of `numel` elements are ceil(numel / 64) long (exp_avg's, exp_avg_sq's, max_exp_avg_sq's). FULL: the
    block lies inside the tensor, so nothing is masked (and loads can be 16 bytes wide)."""
    groups: tl.constexpr = BLOCK // INT8_BLOCK
    scale_offsets = start // INT8_BLOCK + tl.arange(0, groups)
    offsets = scale_offsets[:, None] * INT8_BLOCK + tl.arange(0, INT8_BLOCK)[None, :]
    row_length = (numel + INT8_BLOCK - 1) // INT8_BLOCK
    mask = None
    scale_mask = None
    if not FULL:
        mask = offsets < numel
        scale_mask = scale_offsets < row_length
    scales_ptr = scales_ptr.to(tl.pointer_type(tl.uint16))

    p = load_param(param_ptr, master_ptr, offsets, mask, WRITE)
    g = tl.load(grad_ptr + offsets, mask=mask).to(tl.float32)
    m = _dequantize(tl.load(exp_avg_ptr + offsets, mask=mask),
                    tl.load(scales_ptr + scale_offsets, mask=scale_mask).to(tl.bfloat16, bitcast=True), True)
    v = _dequantize(tl.load(exp_avg_sq_ptr + offsets, mask=mask),
                    tl.load(scales_ptr + row_length + scale_offsets, mask=scale_mask).to(tl.bfloat16, bitcast=True), False)
    max_v = 0.0
    if AMSGRAD:
        max_v = _dequantize(tl.load(max_sq_ptr + offsets, mask=mask),
                            tl.load(scales_ptr + 2 * row_length + scale_offsets, mask=scale_mask).to(tl.bfloat16, bitcast=True), False)
    p, m, v, max_v = _adam_math(p, g, m, v, max_v, grad_multiplier, weight_decay, param_decay, one_minus_beta1,
                                beta2, one_minus_beta2, step_size, bias_correction2_sqrt, eps, DECOUPLED, AMSGRAD)
    bits = _moment_bits(stream, offsets, 0)  # exp_avg: low 16, exp_avg_sq: high 16
    _quantize(exp_avg_ptr, scales_ptr, offsets, mask, scale_offsets, scale_mask, m, bits & 0xFFFF, True)
    # the second moments by their roots (moment_int8.h)
    _quantize(exp_avg_sq_ptr, scales_ptr + row_length, offsets, mask, scale_offsets, scale_mask, tl.sqrt_rn(v),
              bits >> 16, False)
    if AMSGRAD:
        _quantize(max_sq_ptr, scales_ptr + 2 * row_length, offsets, mask, scale_offsets, scale_mask,
                  tl.sqrt_rn(max_v), _moment_bits(stream, offsets, 1) & 0xFFFF, False)
    store_param(param_ptr, master_ptr, offsets, mask, p, stream, PARAM_DTYPE, WRITE)


@triton.jit
def _step_block(param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, max_sq_ptr, master_ptr, scales_ptr, block_start,
                numel, grad_multiplier, weight_decay, param_decay, one_minus_beta1, beta2, one_minus_beta2, step_size,
                bias_correction2_sqrt, eps, stream, PARAM_DTYPE: tl.constexpr, MOMENT_DTYPE: tl.constexpr,
                DECOUPLED: tl.constexpr, AMSGRAD: tl.constexpr, WRITE: tl.constexpr, BLOCK: tl.constexpr):
    """The block of BLOCK elements from block_start (inside the tensor): whole, or the tensor's partial last one."""
    offsets = block_start + tl.arange(0, BLOCK)
    if MOMENT_DTYPE == tl.int8:
        if block_start + BLOCK <= numel:
            _update_block_int8(param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, max_sq_ptr, master_ptr, scales_ptr,
                               block_start, numel, grad_multiplier, weight_decay, param_decay, one_minus_beta1, beta2,
                               one_minus_beta2, step_size, bias_correction2_sqrt, eps, stream, PARAM_DTYPE, DECOUPLED,
                               AMSGRAD, WRITE, BLOCK, True)
        else:
            _update_block_int8(param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, max_sq_ptr, master_ptr, scales_ptr,
                               block_start, numel, grad_multiplier, weight_decay, param_decay, one_minus_beta1, beta2,
                               one_minus_beta2, step_size, bias_correction2_sqrt, eps, stream, PARAM_DTYPE, DECOUPLED,
                               AMSGRAD, WRITE, BLOCK, False)
    elif block_start + BLOCK <= numel:  # a whole block: no mask, so the loads can be 16 bytes wide
        _update_block(param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, max_sq_ptr, master_ptr, offsets, None,
                      grad_multiplier, weight_decay, param_decay, one_minus_beta1, beta2, one_minus_beta2, step_size,
                      bias_correction2_sqrt, eps, stream, PARAM_DTYPE, MOMENT_DTYPE, DECOUPLED, AMSGRAD, WRITE)
    else:
        _update_block(param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, max_sq_ptr, master_ptr, offsets,
                      offsets < numel, grad_multiplier, weight_decay, param_decay, one_minus_beta1, beta2,
                      one_minus_beta2, step_size, bias_correction2_sqrt, eps, stream, PARAM_DTYPE, MOMENT_DTYPE,
                      DECOUPLED, AMSGRAD, WRITE)


@triton.jit
def _from_fp64_bits(bits):
    """The double a launcher passed as its bits (_fp64_bits)."""
    return tl.full([], bits, tl.int64).to(tl.float64, bitcast=True)


@triton.jit
def _grad_multiplier(grad_scale_ptr, HAS_GRAD_SCALE: tl.constexpr, MAXIMIZE: tl.constexpr):
    """1 / grad_scale, correctly rounded as the C++ headers' (`/` would be the GPU's approximate division), negated
    when maximizing: what the optimizer kernels multiply each grad by."""
    multiplier = 1.0
    if HAS_GRAD_SCALE:
        multiplier = tl.div_rn(1.0, tl.load(grad_scale_ptr))
    if MAXIMIZE:
        multiplier = -multiplier
    return multiplier


@triton.jit
def _adam_kernel(
    table_ptr,  # (num_tensors * COLUMNS + num_tensors + 1,) int64: the rows, then the block starts
    lr_bits, lr_ptr, grad_scale_ptr, found_inf_ptr,  # the *_ptr read only when the matching HAS_ flag is set
    log_beta1_bits, log_beta2_bits,  # lr and log(beta) as the bits of fp64s: Triton passes Python floats as fp32
    one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay_bits, seed, first_tensor_index, num_tensors,
    PARAM_DTYPE: tl.constexpr, GRAD_DTYPE: tl.constexpr, MOMENT_DTYPE: tl.constexpr, DECOUPLED: tl.constexpr,
    AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, WRITE: tl.constexpr, HAS_LR_TENSOR: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr, ALIGNED: tl.constexpr, SEARCH_STEPS: tl.constexpr,
    COLUMNS: tl.constexpr, BLOCK: tl.constexpr, BLOCKS: tl.constexpr,
):
    skip = False
    if HAS_FOUND_INF:
        skip = tl.load(found_inf_ptr) != 0.0  # GradScaler found inf/NaN: touch nothing
    if not skip:
        lo, start = locate_block(table_ptr, num_tensors, COLUMNS, SEARCH_STEPS, BLOCKS * BLOCK)
        row = table_ptr + lo * COLUMNS
        param_ptr, master_ptr = param_pointers(row, 0, 5, PARAM_DTYPE, WRITE, ALIGNED)
        grad_ptr = load_pointer(row, 1, GRAD_DTYPE, ALIGNED)
        if MOMENT_DTYPE == tl.int8:  # moments="int8": exp_avg int8, the others uint8 codes
            exp_avg_ptr = load_pointer(row, 2, tl.int8, ALIGNED)
            exp_avg_sq_ptr = load_pointer(row, 3, tl.uint8, ALIGNED)
            max_sq_ptr = load_pointer(row, 4, tl.uint8, ALIGNED)
        else:
            exp_avg_ptr = load_pointer(row, 2, MOMENT_DTYPE, ALIGNED)
            exp_avg_sq_ptr = load_pointer(row, 3, MOMENT_DTYPE, ALIGNED)
            max_sq_ptr = load_pointer(row, 4, MOMENT_DTYPE, ALIGNED)
        step_ptr = load_pointer(row, 6, tl.float32, False)
        scales_ptr = load_pointer(row, 7, tl.uint16, False)
        numel = tl.load(row + 8)

        # The tensor's scalars (adam.h, adam_scalars): bias corrections in fp64 from the step count on the device.
        step = tl.load(step_ptr) + 1.0
        if HAS_LR_TENSOR:
            lr64 = tl.cast(tl.load(lr_ptr), tl.float64)
        else:
            lr64 = _from_fp64_bits(lr_bits)
        grad_multiplier = _grad_multiplier(grad_scale_ptr, HAS_GRAD_SCALE, MAXIMIZE)
        # 1 - lr * weight_decay from the two doubles, rounded once (an fp32 weight decay moved it by an ulp at some lrs)
        weight_decay64 = _from_fp64_bits(weight_decay_bits)
        weight_decay = weight_decay64.to(tl.float32)  # Adam's coupled decay, fp32 as in adam.h
        param_decay = (1.0 - lr64 * weight_decay64).to(tl.float32)
        log_beta1 = _from_fp64_bits(log_beta1_bits)
        log_beta2 = _from_fp64_bits(log_beta2_bits)
        bias_correction1 = 1.0 - tl.exp(step.to(tl.float64) * log_beta1)
        bias_correction2 = 1.0 - tl.exp(step.to(tl.float64) * log_beta2)
        step_size = (lr64 / bias_correction1).to(tl.float32)
        bias_correction2_sqrt = tl.sqrt(bias_correction2).to(tl.float32)
        stream = 0
        if WRITE == STOCHASTIC or MOMENT_DTYPE == tl.bfloat16 or MOMENT_DTYPE == tl.int8:
            stream = _stream_key(seed, first_tensor_index + lo, step)

        if BLOCKS == 1:  # (no loop: the code as it was before BLOCKS, which the H200 timed)
            _step_block(param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, max_sq_ptr, master_ptr, scales_ptr, start,
                        numel, grad_multiplier, weight_decay, param_decay, one_minus_beta1, beta2, one_minus_beta2,
                        step_size, bias_correction2_sqrt, eps, stream, PARAM_DTYPE, MOMENT_DTYPE, DECOUPLED, AMSGRAD,
                        WRITE, BLOCK)
        else:  # BLOCKS blocks of the tensor, one after another: the search and scalars above paid once for all
            for k in range(BLOCKS):
                if start + k * BLOCK < numel:  # (else the tensor ended in an earlier block of this program)
                    _step_block(param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, max_sq_ptr, master_ptr, scales_ptr,
                                start + k * BLOCK, numel, grad_multiplier, weight_decay, param_decay,
                                one_minus_beta1, beta2, one_minus_beta2, step_size, bias_correction2_sqrt, eps,
                                stream, PARAM_DTYPE, MOMENT_DTYPE, DECOUPLED, AMSGRAD, WRITE, BLOCK)


def _fp64_bits(value: float) -> int:
    """A double as the int64 of its bits: Triton passes a Python float to a kernel as fp32 (_from_fp64_bits)."""
    return struct.unpack("<q", struct.pack("<d", value))[0]


def adam_step_triton(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, steps, moment_scales, lr,
                     lr_tensor, beta1, beta2, eps, weight_decay, decoupled_weight_decay, amsgrad, maximize, stochastic_rounding,
                     seed, grad_scale, found_inf) -> None:
    """The fused_optim::adam_step_triton_ op (schema and argument checks in fused_optim/ops/adam.py)."""
    # Consecutive tensors of one (param dtype, grad dtype) pair share a launch.
    start = 0
    for end in range(1, len(params) + 1):
        if end == len(params) or (params[end].dtype, grads[end].dtype) != (params[start].dtype, grads[start].dtype):
            _launch(params[start:end], grads[start:end], exp_avgs[start:end], exp_avg_sqs[start:end],
                    max_exp_avg_sqs[start:end] if amsgrad else [], master_params[start:end], steps[start:end],
                    moment_scales[start:end], start, lr, lr_tensor, beta1, beta2, eps, weight_decay, decoupled_weight_decay, amsgrad, maximize,
                    stochastic_rounding, seed, grad_scale, found_inf)
            start = end


def _launch(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, steps, moment_scales,
            first_tensor_index, lr, lr_tensor, beta1, beta2, eps, weight_decay, decoupled_weight_decay, amsgrad, maximize,
            stochastic_rounding, seed, grad_scale, found_inf) -> None:
    absent = [0] * len(params)  # the column of an array the call has not
    columns = [addresses(params), addresses(grads), addresses(exp_avgs), addresses(exp_avg_sqs),
               addresses(max_exp_avg_sqs) if amsgrad else absent, addresses(master_params) if master_params else absent,
               addresses(steps), addresses(moment_scales) if moment_scales else absent, numels(params)]
    # 16-byte loads need every array address (the first six columns; steps are read alone) 16-byte aligned.
    aligned = all_aligned(*columns[:6])
    entries, num_programs = pack(columns, BLOCKS * BLOCK)
    table = device_table(entries, params[0].device)
    num_tensors = len(params)
    unused = table  # a valid pointer for the *_ptr arguments whose HAS_ flag is off
    flags = dict(HAS_LR_TENSOR=lr_tensor is not None, HAS_GRAD_SCALE=grad_scale is not None,
                 HAS_FOUND_INF=found_inf is not None)
    if num_programs > 0:
        _adam_kernel[(num_programs,)](
            table, _fp64_bits(lr), unused if lr_tensor is None else lr_tensor, unused if grad_scale is None else grad_scale,
            unused if found_inf is None else found_inf,
            _fp64_bits(math.log(beta1) if beta1 > 0 else -math.inf),
            _fp64_bits(math.log(beta2) if beta2 > 0 else -math.inf),
            1.0 - beta1, beta2, 1.0 - beta2, eps, _fp64_bits(weight_decay), seed, first_tensor_index, num_tensors,
            PARAM_DTYPE=DTYPES[params[0].dtype], GRAD_DTYPE=DTYPES[grads[0].dtype],
            MOMENT_DTYPE=tl.int8 if moment_scales else DTYPES[exp_avgs[0].dtype],
            DECOUPLED=decoupled_weight_decay, AMSGRAD=amsgrad, MAXIMIZE=maximize,
            WRITE=write_back(stochastic_rounding, master_params), ALIGNED=aligned,
            SEARCH_STEPS=search_steps(num_tensors), COLUMNS=COLUMNS, BLOCK=BLOCK, BLOCKS=BLOCKS,
            num_warps=NUM_WARPS, maxnreg=MAX_REGISTERS, **EXACT_ARITHMETIC, **flags,
        )
    increment_steps(table, num_tensors, COLUMNS, STEP_COLUMN, found_inf)
