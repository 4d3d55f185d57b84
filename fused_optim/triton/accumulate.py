"""Triton gradient accumulation, `main_grads[i] += grads[i]`, over a packed pointer table: one launch per grad dtype.

Each table row holds a main grad's address (fp32), its grad's (fp32, bf16 or fp16, in the main grad's layout) and
their numel (fused_optim/triton/_table.py). Each program adds BLOCK elements, the grad widened to fp32 on the fly:
unmasked (and, when the host saw every address 16-byte aligned, with 16-byte loads) for whole blocks, masked for
the last one. A bf16 grad thus costs 2 bytes read + 4 read + 4 written per element, the op's bytes model.
"""

from __future__ import annotations

import triton
import triton.language as tl

from fused_optim.triton._table import (DTYPES, addresses, all_aligned, device_table, load_pointer, locate_block, numels,
                                      pack, search_steps)

BLOCK = 1024  # 4 warps x 32 threads x 8 elements: one 16-byte load of bf16, two of fp32, per array and thread
COLUMNS = 3  # main grad, grad, numel


@triton.jit
def _add_block(main_ptr, grad_ptr, offsets, mask):
    main = tl.load(main_ptr + offsets, mask=mask)
    grad = tl.load(grad_ptr + offsets, mask=mask).to(tl.float32)  # exact: fp32 holds every bf16 and fp16
    tl.store(main_ptr + offsets, main + grad, mask=mask)


@triton.jit
def _accumulate_kernel(
    table_ptr,  # (num_tensors * COLUMNS + num_tensors + 1,) int64: the rows, then the block starts
    num_tensors,
    GRAD_DTYPE: tl.constexpr, ALIGNED: tl.constexpr, SEARCH_STEPS: tl.constexpr, COLUMNS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    index, start = locate_block(table_ptr, num_tensors, COLUMNS, SEARCH_STEPS, BLOCK)
    row = table_ptr + index * COLUMNS
    main_ptr = load_pointer(row, 0, tl.float32, ALIGNED)
    grad_ptr = load_pointer(row, 1, GRAD_DTYPE, ALIGNED)
    numel = tl.load(row + 2)
    offsets = start + tl.arange(0, BLOCK)
    if start + BLOCK <= numel:  # a whole block: no mask, so the loads can be 16 bytes wide
        _add_block(main_ptr, grad_ptr, offsets, None)
    else:
        _add_block(main_ptr, grad_ptr, offsets, offsets < numel)


def accumulate_grads_triton(main_grads, grads) -> None:
    """The fused_optim::accumulate_grads_triton_ op (schema and argument checks in fused_optim/ops/accumulate.py;
    `grads` already in their main grads' layout)."""
    by_dtype: dict = {}  # grad dtype -> indices: the kernel is specialised for one grad dtype
    for i, grad in enumerate(grads):
        by_dtype.setdefault(grad.dtype, []).append(i)
    for dtype, indices in by_dtype.items():
        picked = [grads[i] for i in indices]
        columns = [addresses([main_grads[i] for i in indices]), addresses(picked), numels(picked)]
        entries, num_blocks = pack(columns, BLOCK)
        if num_blocks == 0:  # only empty tensors
            continue
        table = device_table(entries, main_grads[0].device)
        _accumulate_kernel[(num_blocks,)](
            table, len(indices), GRAD_DTYPE=DTYPES[dtype], ALIGNED=all_aligned(*columns[:2]),
            SEARCH_STEPS=search_steps(len(indices)), COLUMNS=COLUMNS, BLOCK=BLOCK, num_warps=4,
        )
