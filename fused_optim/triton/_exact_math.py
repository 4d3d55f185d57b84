"""Correctly rounded operations of the optimizer kernels whose bits the interpreter would not give.

quotient_by_constant and code_root take fewer GPU instructions than tl.div_rn and tl.sqrt_rn, with their bits: the
Triton twins of adam.h's quotient_by_constant and moment_int8.h's code_root (the reasons and the proofs are there,
and in tests/test_quotient_by_constant.py and tests/test_code_root_sass.py). multiply_add is tl.fma, one rounding,
as multiply_add.h's.

Under Triton's interpreter, which runs the kernels in the tests on machines without a GPU, the first two are
tl.div_rn and tl.sqrt_rn themselves: the interpreter rounds tl.fma's product before the sum (in NumPy), which would
break the sequences, and cannot run inline PTX; and multiply_add is computed in float64, rounded to odd, as
fused_optim/multiply_add.py computes it. Compiled for a GPU (`COMPILED`), they are the sequences and tl.fma.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

COMPILED = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") != "1")
CODE_ROOT_FLOOR = tl.constexpr(2.0**-60)  # below it a code's q counts as this: its code is 0 either way


@triton.jit
def multiply_add(a, b, c):
    """a * b + c in fp32, rounded once (IEEE fma), as torch's add(other, alpha=) on its vectorised kernels."""
    if COMPILED:
        result = tl.fma(a, b, c)
    else:  # fused_optim/multiply_add.py's emulation, step for step
        # (a scalar argument may reach the interpreter as a Python float: cast, as the compiled kernel reads fp32)
        product = tl.cast(a, tl.float32).to(tl.float64) * tl.cast(b, tl.float32).to(tl.float64)
        addend = tl.cast(c, tl.float32).to(tl.float64)
        total = product + addend
        addend_part = total - product
        error = (product - (total - addend_part)) + (addend - addend_part)
        inexact = (error != 0.0) & (total - total == 0.0)  # an infinite or NaN total is the answer as it is
        total_bits = total.to(tl.int64, bitcast=True)
        beyond = inexact & ((error.to(tl.int64, bitcast=True) ^ total_bits) < 0)
        result = ((total_bits - beyond.to(tl.int64)) | inexact.to(tl.int64)).to(tl.float64, bitcast=True)
        result = result.to(tl.float32)
    return result


@triton.jit
def quotient_by_constant(x, divisor, inverse):
    """x / divisor correctly rounded for x >= +0, given inverse = 1 / divisor correctly rounded: x * inverse
    corrected by its remainder (Markstein), in place of the IEEE division's reciprocal, refinement and branch."""
    if COMPILED:
        estimate = x * inverse
        corrected = tl.fma(tl.fma(-estimate, divisor, x), inverse, estimate)
        quotient = tl.where(estimate < float("inf"), corrected, estimate)  # inf and NaN: x * inverse is x / divisor
    else:
        quotient = tl.div_rn(x, divisor)
    return quotient


@triton.jit
def code_root(q):
    """sqrt(q) for a code's q in [0, 1], q below 2^-60 counted as 2^-60: MUFU.RSQ and two FMAs, the fast path of
    the correctly rounded root, which covers [2^-60, 1], without the range check and branch around it."""
    if COMPILED:
        q = tl.maximum(q, CODE_ROOT_FLOOR)
        estimate = tl.inline_asm_elementwise("rsqrt.approx.ftz.f32 $0, $1;", "=f,f", [q], dtype=tl.float32,
                                             is_pure=True, pack=1)
        root = q * estimate
        root = tl.fma(tl.fma(-root, root, q), estimate * 0.5, root)
    else:
        root = tl.sqrt_rn(q)
    return root
