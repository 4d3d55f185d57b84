"""a * b + c rounded once (IEEE fma) in torch ops, as the GPU and the AVX2/AVX-512 CPU kernels compute it
(csrc/include/fused_optim/multiply_add.h): for the torch backend, and the tests' emulations of the kernels.

torch has no fma op, and its add(other, alpha=) is one only where its kernels are vectorised (not under
ATEN_CPU_CAPABILITY=default), and takes no tensor alpha. So fp32 operands go through float64, where their product
is exact, and the sum is rounded to odd (Boldo and Melquiond, 2008: to the neighbour whose last bit is 1 when
inexact), which makes the rounding to fp32 that follows, 29 bits coarser, correctly rounded: an fma's bits on every
device with float64. Two's sum (Knuth) gives the sum's rounding error exactly.
"""

from __future__ import annotations

import torch


def multiply_add(a: float | torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """a * b + c for fp32 `b` and `c`, `a` a number or a tensor read as fp32 (as the kernels read their scalars),
    rounded once to fp32. Other dtypes (the torch backend's fp64 params), and MPS tensors (no float64 there), take
    torch's own add(alpha=) (a tensor `a`: the product and the sum rounded each)."""
    if c.dtype != torch.float32 or c.device.type == "mps":
        return c + a * b if isinstance(a, torch.Tensor) else c.add(b, alpha=a)
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
