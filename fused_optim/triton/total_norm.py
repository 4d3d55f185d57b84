"""Triton total norm: the p-norm of a list of tensors taken as one vector, over a packed pointer table.

Pass 1 (one launch per tensor dtype): each program reads BLOCK elements of one tensor (fused_optim/triton/_table.py
finds which), widened to fp32, and writes one partial: max|x| for p = inf, else the block's Σ|x|^p. Pass 2 (one
program) combines the partials in fp64 in a fixed order and takes the 1/p-th power. Nothing depends on the order in
which programs run (no atomics), so the same inputs give the same bits every time, whatever their addresses.

Precision: |x| and x² are summed in fp32 within a block (Triton's tree reduction, so the error grows with log2 of
BLOCK, not BLOCK) and the blocks in fp64: never worse than torch's own norm at the same dtype in the tests. A general
p takes |x|^p as exp2(p·log2|x|) in fp64, since an fp32 log would lose about p·|log2|x|| ulps of it. Like torch's
CUDA norm, x² overflows fp32 for |x| > 1.8e19, and the 2-norm is then inf.

NaN anywhere gives NaN, inf gives inf (or NaN with a NaN elsewhere): sums propagate both by IEEE rules; maxima are
made to, since the GPU's max drops NaN.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fused_optim.triton._table import (DTYPES, addresses, all_aligned, device_table, load_pointer, locate_block, numels,
                                      pack, search_steps)
from fused_optim.triton.adam import _fp64_bits, _from_fp64_bits

BLOCK = 1024  # 4 warps x 32 threads x 8 elements: one 16-byte load of bf16, two of fp32, per thread
COLUMNS = 2  # tensor, numel
COMBINE_BLOCK = 1024  # partials the combining program reads at a time

# What a block computes: the kernels' NORM (globals a kernel reads must be constexprs)
NORM_INF, NORM_1, NORM_2, NORM_P = (tl.constexpr(kind) for kind in range(4))


@triton.jit
def _max_keeping_nan(values, axis: tl.constexpr):
    """max(values), NaN when any value is NaN: tl.max (the GPU's max.f32) returns the other operand of a NaN."""
    has_nan = tl.max((values != values).to(tl.int32), axis) > 0
    return tl.where(has_nan, float("nan"), tl.max(values, axis))


@triton.jit
def _norm_partials_kernel(
    table_ptr,  # (num_tensors * COLUMNS + num_tensors + 1,) int64: the rows, then the block starts
    partials_ptr,  # (number of blocks,) fp64: one partial per program
    num_tensors,
    p_bits,  # p as the bits of an fp64 (read only for NORM_P): Triton passes Python floats as fp32
    DTYPE: tl.constexpr, NORM: tl.constexpr, ALIGNED: tl.constexpr, SEARCH_STEPS: tl.constexpr,
    COLUMNS: tl.constexpr, BLOCK: tl.constexpr,
):
    index, start = locate_block(table_ptr, num_tensors, COLUMNS, SEARCH_STEPS, BLOCK)
    row = table_ptr + index * COLUMNS
    x_ptr = load_pointer(row, 0, DTYPE, ALIGNED)
    numel = tl.load(row + 1)
    offsets = start + tl.arange(0, BLOCK)
    if start + BLOCK <= numel:  # a whole block: no mask, so the loads can be 16 bytes wide
        x = tl.load(x_ptr + offsets)
    else:  # the tail: zeros add nothing to any of the norms
        x = tl.load(x_ptr + offsets, mask=offsets < numel, other=0.0)
    magnitude = tl.abs(x.to(tl.float32))
    if NORM == NORM_INF:
        partial = _max_keeping_nan(magnitude, 0).to(tl.float64)
    elif NORM == NORM_1:
        partial = tl.sum(magnitude, 0).to(tl.float64)
    elif NORM == NORM_2:
        partial = tl.sum(magnitude * magnitude, 0).to(tl.float64)
    else:  # |x|^p; 0 -> exp2(-inf) = 0 for every p > 0
        p = _from_fp64_bits(p_bits)
        partial = tl.sum(tl.exp2(p * tl.log2(magnitude.to(tl.float64))), 0)
    tl.store(partials_ptr + tl.program_id(0), partial)


@triton.jit
def _combine_partials_kernel(
    partials_ptr,  # (num_partials,) fp64
    norm_ptr,  # () fp32: the result
    num_partials,
    inverse_p_bits,  # 1/p as the bits of an fp64 (read only for NORM_P)
    NORM: tl.constexpr, BLOCK: tl.constexpr,
):
    offsets = tl.arange(0, BLOCK)
    # Lane i takes partials i, i + BLOCK, ...: a fixed order, then a fixed tree over the lanes.
    accumulated = tl.zeros([BLOCK], tl.float64)
    for first in range(0, num_partials, BLOCK):
        partial = tl.load(partials_ptr + first + offsets, mask=first + offsets < num_partials, other=0.0)
        if NORM == NORM_INF:
            larger = tl.maximum(accumulated, partial)
            accumulated = tl.where(partial != partial, partial, larger)  # a NaN sticks; tl.maximum drops it
        else:
            accumulated += partial
    if NORM == NORM_INF:
        norm = _max_keeping_nan(accumulated, 0)
    else:
        norm = tl.sum(accumulated, 0)
        if NORM == NORM_2:
            norm = tl.sqrt(norm)  # fp64: the IEEE square root (only fp32 has an approximate one)
        elif NORM == NORM_P:
            inverse_p = _from_fp64_bits(inverse_p_bits)
            norm = tl.exp2(tl.log2(norm) * inverse_p)
    tl.store(norm_ptr, norm.to(tl.float32))


def norm_kind(norm_type: float) -> int:
    """The kernels' NORM for a p > 0 or inf."""
    if math.isinf(norm_type):
        return NORM_INF.value
    return {1.0: NORM_1, 2.0: NORM_2}.get(norm_type, NORM_P).value


def total_norm_triton(tensors, norm_type: float) -> torch.Tensor:
    """The fused_optim::total_norm_triton op (schema and argument checks in fused_optim/ops/total_norm.py):
    a 0-dim fp32 tensor on the tensors' device."""
    device = tensors[0].device
    norm = norm_kind(norm_type)
    by_dtype: dict = {}  # tensor dtype -> its tensors: the partials kernel is specialised for one dtype
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    launches = []  # (dtype, the table's entries, its blocks, its tensors' addresses)
    for dtype, group in by_dtype.items():
        group_addresses = addresses(group)
        launches.append((dtype, *pack([group_addresses, numels(group)], BLOCK), group_addresses))
    num_partials = sum(num_blocks for _, _, num_blocks, _ in launches)
    result = torch.empty((), dtype=torch.float32, device=device)
    if num_partials == 0:  # only empty tensors: the norm of an empty vector
        return result.zero_()
    partials = torch.empty(num_partials, dtype=torch.float64, device=device)
    first = 0
    for dtype, entries, num_blocks, group_addresses in launches:
        if num_blocks == 0:
            continue
        _norm_partials_kernel[(num_blocks,)](
            device_table(entries, device), partials[first:], len(group_addresses), _fp64_bits(float(norm_type)),
            DTYPE=DTYPES[dtype], NORM=norm, ALIGNED=all_aligned(group_addresses),
            SEARCH_STEPS=search_steps(len(group_addresses)), COLUMNS=COLUMNS, BLOCK=BLOCK, num_warps=4,
        )
        first += num_blocks
    _combine_partials_kernel[(1,)](
        partials, result, num_partials, _fp64_bits(1.0 / norm_type), NORM=norm, BLOCK=COMBINE_BLOCK, num_warps=4,
    )
    return result
