"""a * b + c rounded once, the optimizers' fma (SGD's decay, momentum and update, Adam's L2 term), as the GPU and
the AVX2/AVX-512 CPU kernels compute it with the instruction, in its two emulations: fused_optim/multiply_add.py's
`fma` (the torch backend's for a tensor lr, and the tests' emulations of the kernels) and _exact_math.py's
multiply_add under Triton's interpreter, each checked against a correctly rounded fma in exact rational arithmetic;
and the torch backend's `multiply_add`, which rounds as torch's add(alpha=) does here."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
import triton
import triton.language as tl
from conftest import TORCH_FUSES_MULTIPLY_ADD, TRITON_INTERPRETED

from fused_optim.multiply_add import fma, multiply_add
from fused_optim.triton._exact_math import multiply_add as triton_multiply_add


def correctly_rounded(exact: Fraction) -> np.float32:
    """`exact` rounded to the nearest fp32, ties to even (finite, within fp32's range)."""
    guess = np.float32(float(exact))  # within an ulp: rounded twice, to double then to fp32
    candidates = [np.nextafter(guess, np.float32(-np.inf)), guess, np.nextafter(guess, np.float32(np.inf))]
    return min(candidates, key=lambda x: (abs(Fraction(float(x)) - exact), int(np.array(x).view(np.int32)) & 1))


def triples(count: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random fp32 operands of the magnitudes an optimizer meets, half of them with c cancelling most of a * b,
    and products on a midpoint of two floats nudged by a tiny addend."""
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(count, generator=generator) * 10.0 ** torch.randint(-6, 2, (count,), generator=generator)
    b = torch.randn(count, generator=generator)
    c = torch.randn(count, generator=generator) * 10.0 ** torch.randint(-4, 3, (count,), generator=generator)
    half = count // 2
    c[:half] = -(a[:half] * b[:half]) * (1 + torch.randn(half, generator=generator) * 1e-6)
    odd = (torch.randint(0, 1 << 22, (count // 4,), generator=generator, dtype=torch.int32) * 2 + 0x3F800001)
    a[: count // 4], b[: count // 4] = odd.view(torch.float32), 1.5
    c[: count // 4] = torch.where(torch.rand(count // 4, generator=generator) < 0.5, 2.0**-60, -(2.0**-60))
    return a, b, c


def test_the_torch_emulation_is_correctly_rounded():
    a, b, c = triples(4000)
    ours = fma(a, b, c)
    expected = [correctly_rounded(Fraction(float(x)) * Fraction(float(y)) + Fraction(float(z)))
                for x, y, z in zip(a.tolist(), b.tolist(), c.tolist())]
    assert torch.equal(ours, torch.from_numpy(np.array(expected, dtype=np.float32)))


def test_the_torch_emulation_keeps_infinities_nans_and_signed_zeros():
    specials = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, 1e-45, -1e-45, 3.4e38, -3.4e38, 1.0, -1.0])
    a, b, c = (t.flatten() for t in torch.meshgrid(specials, specials, specials, indexing="ij"))
    ours = fma(a, b, c)
    # no triple of these lies near a midpoint of two floats, so their sum rounded to float64 first rounds alike
    expected = (a.double() * b.double() + c.double()).float()
    assert torch.equal(ours.isnan(), expected.isnan())
    numbers = ~expected.isnan()
    assert torch.equal(ours[numbers].view(torch.int32), expected[numbers].view(torch.int32))  # zeros' signs too


def test_a_tensor_or_a_python_scalar_is_read_as_fp32():
    b, c = torch.randn(100), torch.randn(100)
    as_fp32 = torch.tensor(0.1, dtype=torch.float32)
    assert torch.equal(fma(0.1, b, c), fma(as_fp32, b, c))
    assert torch.equal(fma(torch.tensor(0.1, dtype=torch.float64), b, c), fma(as_fp32, b, c))


@triton.jit
def _multiply_add_kernel(a_ptr, b_ptr, c_ptr, out_ptr, scalar, n, BLOCK: tl.constexpr, SCALAR_A: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    a = scalar if SCALAR_A else tl.load(a_ptr + offsets, mask=mask)
    result = triton_multiply_add(a, tl.load(b_ptr + offsets, mask=mask), tl.load(c_ptr + offsets, mask=mask))
    tl.store(out_ptr + offsets, result, mask=mask)


@pytest.mark.skipif(not TRITON_INTERPRETED, reason="the emulation is the interpreter's (compiled: tl.fma)")
@pytest.mark.parametrize("scalar_a", [False, True], ids=["tensor", "scalar"])
def test_the_triton_interpreters_emulation_is_the_torch_emulations(scalar_a):
    """The kernels' scalars (an lr, a decay) reach the interpreter as Python floats: read as fp32."""
    a, b, c = triples(3000, seed=1)
    out = torch.full_like(a, math.nan)
    _multiply_add_kernel[(triton.cdiv(a.numel(), 1024),)](a, b, c, out, -0.1, a.numel(), BLOCK=1024,
                                                           SCALAR_A=scalar_a)
    assert torch.equal(out, fma(-0.1 if scalar_a else a, b, c))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_the_torch_backend_rounds_as_torchs_add_here(dtype):
    """A number `a`: torch's add(alpha=) itself. A tensor (an lr tensor, which add() does not take): fma where
    torch's kernels fuse here (fp32), else the product and the sum rounded each."""
    b, c = torch.randn(1000, dtype=dtype), torch.randn(1000, dtype=dtype)
    assert torch.equal(multiply_add(0.1, b, c), c.add(b, alpha=0.1))
    fused = TORCH_FUSES_MULTIPLY_ADD and dtype == torch.float32
    lr = torch.tensor(0.1, dtype=dtype)
    assert torch.equal(multiply_add(lr, b, c), fma(lr, b, c) if fused else c + lr * b)
    if fused:  # what torch's add(alpha=) gives with the lr read on the host
        assert torch.equal(multiply_add(lr, b, c), c.add(b, alpha=lr.item()))
