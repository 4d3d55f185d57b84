"""a * b + c rounded once, the optimizers' fma (SGD's decay, momentum and update, Adam's L2 term), in its three
emulations: multiply_add.h where the CPU has no FMA instruction (the x86-64 baseline build), fused_optim/multiply_add.py
(the torch backend, and the tests' emulations of the kernels) and _exact_math.py's multiply_add under Triton's
interpreter. Each is checked against a correctly rounded fma: libm's fmaf, or exact rational arithmetic."""

from __future__ import annotations

import math
import shutil
import subprocess
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
import triton
import triton.language as tl
from conftest import TRITON_INTERPRETED
from torch.utils import cpp_extension

from fused_optim.multiply_add import multiply_add
from fused_optim.triton._exact_math import multiply_add as triton_multiply_add

ROOT = Path(__file__).resolve().parents[1]


def test_the_baselines_emulation_is_fmaf_bit_for_bit(tmp_path):
    """tests/native/multiply_add.cpp: 50 million triples, among them products on a midpoint nudged by a tiny addend,
    where a sum rounded to double first would tie (a double-rounding emulation fails a sixth of those)."""
    compiler = shutil.which(cpp_extension.get_cxx_compiler())
    if compiler is None:
        pytest.skip("no C++ compiler")
    binary = tmp_path / "multiply_add"
    # the baseline kernels' flags (setup.py), without an FMA instruction whatever this CPU has
    march = ["-march=x86-64"] if "x86_64" in subprocess.run([compiler, "-dumpmachine"], capture_output=True,
                                                            text=True).stdout else []
    if not march:
        pytest.skip("the emulation is the x86-64 baseline build's")
    subprocess.run([compiler, "-O2", "-std=c++20", *march, "-ffp-contract=off", "-fno-math-errno",
                    "-fno-trapping-math", f"-I{ROOT / 'csrc' / 'include'}",
                    str(ROOT / "tests" / "native" / "multiply_add.cpp"), "-o", str(binary)], check=True)
    done = subprocess.run([str(binary), "10000000"], capture_output=True, text=True, timeout=300)
    checked, mismatches = map(int, done.stdout.split()[-2:])
    assert checked == 6 * 10_000_000 + 13**3
    assert mismatches == 0 and done.returncode == 0, done.stdout


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
    ours = multiply_add(a, b, c)
    expected = [correctly_rounded(Fraction(float(x)) * Fraction(float(y)) + Fraction(float(z)))
                for x, y, z in zip(a.tolist(), b.tolist(), c.tolist())]
    assert torch.equal(ours, torch.from_numpy(np.array(expected, dtype=np.float32)))


def test_the_torch_emulation_keeps_infinities_nans_and_signed_zeros():
    specials = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, 1e-45, -1e-45, 3.4e38, -3.4e38, 1.0, -1.0])
    a, b, c = (t.flatten() for t in torch.meshgrid(specials, specials, specials, indexing="ij"))
    ours = multiply_add(a, b, c)
    # no triple of these lies near a midpoint of two floats, so their sum rounded to float64 first rounds alike
    expected = (a.double() * b.double() + c.double()).float()
    assert torch.equal(ours.isnan(), expected.isnan())
    numbers = ~expected.isnan()
    assert torch.equal(ours[numbers].view(torch.int32), expected[numbers].view(torch.int32))  # zeros' signs too


def test_a_tensor_or_a_python_scalar_is_read_as_fp32():
    b, c = torch.randn(100), torch.randn(100)
    as_fp32 = torch.tensor(0.1, dtype=torch.float32)
    assert torch.equal(multiply_add(0.1, b, c), multiply_add(as_fp32, b, c))
    assert torch.equal(multiply_add(torch.tensor(0.1, dtype=torch.float64), b, c), multiply_add(as_fp32, b, c))


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
    assert torch.equal(out, multiply_add(-0.1 if scalar_a else a, b, c))
