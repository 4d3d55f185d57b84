"""a * b + c in torch ops, rounded as the kernels round it (csrc/include/fused_optim/multiply_add.h): for the torch
backend, and the tests' emulations of the kernels.

`multiply_add` is torch's own add(other, alpha=) where `a` is a number: one rounding (an FMA) where torch's kernels
are vectorised (AVX2, AVX-512, CUDA), the product and the sum rounded each under ATEN_CPU_CAPABILITY=default, as
multiply_add.h rounds on the CPUs that load our baseline build. add() takes no tensor alpha (torch's own SGD reads
a tensor lr on the host), so a tensor `a` (an lr tensor) takes `fma` where torch's kernels fuse.

`fma` is one rounding on any device with float64, for fp32 operands: their product is exact in float64, and the sum
is rounded to odd (Boldo and Melquiond, 2008: to the neighbour whose last bit is 1 when inexact), which makes the
rounding to fp32 that follows, 29 bits coarser, correctly rounded. Two's sum (Knuth) gives the sum's rounding error
exactly. It takes some 15 float64 passes over its operands: the torch backend calls it only for a tensor `a`.
"""

from __future__ import annotations

import torch


def multiply_add(a: float | torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """a * b + c as torch's c.add(b, alpha=a) rounds it on c's device (`a` a number or a 0-dim tensor)."""
    if not isinstance(a, torch.Tensor):
        return c.add(b, alpha=a)
    fused = c.device.type == "cuda" or (
        c.device.type == "cpu" and torch.backends.cpu.get_cpu_capability() != "DEFAULT")
    return fma(a, b, c) if fused and c.dtype == torch.float32 else c + a * b


def fma(a: float | torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """a * b + c for fp32 `b` and `c`, `a` a number or a tensor read as fp32 (as the kernels read their scalars),
    rounded once to fp32, through float64 (not on MPS, which has none)."""
    a = a.to(torch.float32).double() if isinstance(a, torch.Tensor) else float(torch.tensor(a, dtype=torch.float32))
    product = b.double() * a  # exact: 48 bits of 53
    addend = c.double()
    total = product + addend
    addend_part = total - product  # two's sum: the error of `total`, exact
    error = (product - (total - addend_part)) + (addend - addend_part)
    inexact = (error != 0) & total.isfinite()  # an infinite or NaN total (only from such operands) is the answer
    total_bits = total.view(torch.int64)
    # the exact sum lies nearer zero than `total` (the signs differ): the odd neighbour below in magnitude, else above
    beyond = inexact & ((error.view(torch.int64) ^ total_bits) < 0)
    return ((total_bits - beyond.long()) | inexact.long()).view(torch.float64).float()
