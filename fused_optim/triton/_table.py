"""The packed pointer table the multi-tensor Triton kernels share (Adam, gradient accumulation, total norm).

One launch covers a whole list of tensors: the host writes, per tensor, a row of int64s (the addresses of its
arrays, its numel last), then where each tensor's blocks start in the grid. A program finds its tensor by binary
search over those starts (`locate_block`) and reads its addresses from the row (`load_pointer`).

Tables are cached by their contents: the addresses of a model's tensors rarely change, so a step copies nothing to
the device, and a step captured in a CUDA graph after one warm-up step finds its table already there.
"""

from __future__ import annotations

import functools
import math
import operator
from collections import OrderedDict
from collections.abc import Sequence
from itertools import accumulate, chain

import torch
import triton
import triton.language as tl

DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}

# The launch options of the optimizer kernels: no a * b + c contracted into one FMA (Triton's default contracts),
# as the CPU and CUDA C++ kernels are built, so that every backend steps the same bits (their divisions and roots
# are correctly rounded already: tl.div_rn and tl.sqrt_rn, or _exact_math.py's sequences with their bits).
EXACT_ARITHMETIC = {"enable_fp_fusion": False}


@triton.jit
def locate_block(table_ptr, num_tensors, COLUMNS: tl.constexpr, SEARCH_STEPS: tl.constexpr, BLOCK: tl.constexpr):
    """(the index of this program's tensor, the offset of this program's block in it, int64)."""
    pid = tl.program_id(0)
    block_starts = table_ptr + num_tensors * COLUMNS
    # The program's tensor: the last one whose first block is at or before pid.
    lo = 0
    hi = num_tensors
    for _ in tl.static_range(SEARCH_STEPS):
        mid = (lo + hi) // 2
        right = tl.load(block_starts + mid) <= pid
        lo = tl.where(right, mid, lo)
        hi = tl.where(right, hi, mid)
    start = (pid - tl.load(block_starts + lo)) * BLOCK  # int64: the table is int64
    return lo, start


@triton.jit
def load_pointer(row, column, dtype, ALIGNED: tl.constexpr):
    """The address in `row[column]` as a pointer to `dtype`; ALIGNED: the host saw it 16-byte aligned, which lets
    the compiler emit 16-byte loads and stores."""
    pointer = tl.load(row + column).to(tl.pointer_type(dtype))
    if ALIGNED:
        pointer = tl.multiple_of(pointer, 16)
    return pointer


@triton.jit
def _increment_steps_kernel(table_ptr, found_inf_ptr, num_tensors, HAS_FOUND_INF: tl.constexpr,
                            COLUMNS: tl.constexpr, STEP_COLUMN: tl.constexpr, BLOCK: tl.constexpr):
    skip = False
    if HAS_FOUND_INF:
        skip = tl.load(found_inf_ptr) != 0.0
    if not skip:
        t = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = t < num_tensors
        steps = tl.load(table_ptr + t * COLUMNS + STEP_COLUMN, mask=mask, other=0).to(tl.pointer_type(tl.float32))
        tl.store(steps, tl.load(steps, mask=mask) + 1.0, mask=mask)


def increment_steps(table: torch.Tensor, num_tensors: int, columns: int, step_column: int,
                    found_inf: torch.Tensor | None) -> None:
    """Adds 1 to each tensor's fp32 step count (its address in column `step_column` of the table), unless found_inf
    is non-zero. Launched after the update kernel on the same stream, so every program of that read the old count."""
    block = 128
    _increment_steps_kernel[(triton.cdiv(num_tensors, block),)](
        table, table if found_inf is None else found_inf, num_tensors, HAS_FOUND_INF=found_inf is not None,
        COLUMNS=columns, STEP_COLUMN=step_column, BLOCK=block,
    )


def search_steps(num_tensors: int) -> int:
    """Binary-search steps that narrow `num_tensors` candidates to one (a constexpr of the kernels)."""
    return max(1, math.ceil(math.log2(num_tensors + 1)))


def addresses(tensors: Sequence[torch.Tensor]) -> list[int]:
    """A column of a table: each tensor's address."""
    return list(map(torch.Tensor.data_ptr, tensors))


def numels(tensors: Sequence[torch.Tensor]) -> list[int]:
    """A table's last column: each tensor's element count."""
    return list(map(torch.Tensor.numel, tensors))


def all_aligned(*columns: list[int]) -> bool:
    """Whether every address of the `columns` is a multiple of 16 bytes."""
    return functools.reduce(operator.or_, chain.from_iterable(columns), 0) % 16 == 0


def pack(columns: list[list[int]], block: int) -> tuple[list[int], int]:
    """(the table's entries: a row per tensor, its entry of each column in turn, the last column its numel, then the
    block starts; the number of blocks, i.e. the grid size). Built a column at a time, in C-level loops: a list per
    row held a thousand objects that Python's garbage collector tracks alive at once, and set it off. The blocks of a
    tensor by integer arithmetic: triton.cdiv is a ConstexprFunction in Triton 3.8, 2 us a call from the host."""
    block_starts = [0, *accumulate((numel + block - 1) // block for numel in columns[-1])]
    return [*chain.from_iterable(zip(*columns)), *block_starts], block_starts[-1]


_table_cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()
_TABLE_CACHE_SIZE = 64
# Tables a CUDA graph captured: the graph holds their addresses, not the tensors, so they must never be freed.
_captured_tables: dict[tuple, torch.Tensor] = {}


def device_table(entries: list[int], device: torch.device) -> torch.Tensor:
    """`entries` as an int64 tensor on `device`, from the cache when the same entries were sent before."""
    key = (device, *entries)  # each lookup hashes and compares its thousands of entries: one a dict, not two
    table = _captured_tables.get(key)
    if table is None:
        table = _table_cache.get(key)
        if table is not None:
            _table_cache.move_to_end(key)
    if table is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            # a copy from the host, which a capture cannot record: the tensors must have been stepped before
            raise RuntimeError(
                "fused_optim: the Triton backend captures a step in a CUDA graph only over tensors it has launched on "
                "before (its launch table is copied from the host); run a warm-up step over the same tensors, keep "
                "the grads across the capture (zero_grad(set_to_none=False)), or use backend='cuda'.")
        table = torch.tensor(entries, dtype=torch.int64).to(device, non_blocking=True)
        _table_cache[key] = table
        if len(_table_cache) > _TABLE_CACHE_SIZE:
            _table_cache.popitem(last=False)
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        _captured_tables[key] = table
    return table
