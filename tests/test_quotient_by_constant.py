"""adam.h's quotient_by_constant, sqrt(v) / sqrt(1 - beta2^t) in every Adam step: the AVX-512 CPU kernels and the
CUDA ones compute it as x * (1 / divisor) corrected by an FMA (tests/native/quotient_by_constant.cpp), which must
give the division's bits. A GPU rounds its FMUL and FFMA as the CPU rounds vmulps and vfmadd (IEEE, to nearest), so
the sequence checked here is the CUDA kernels' too. The optimizer tests cannot tell a one-ulp slip from the fp64 bias
corrections' own (they allow ~1e-6), so this checks the sequence itself, against vdivps, on every mantissa of x."""

from __future__ import annotations

import math
import random
import shutil
import subprocess
from pathlib import Path

import pytest
from torch.utils import cpp_extension

from fused_optim import _backend

ROOT = Path(__file__).resolve().parents[1]


def divisors() -> list[float]:
    """Bias corrections sqrt(1 - beta2^t) as the optimizers meet them, and random mantissas."""
    rng = random.Random(0)
    corrections = [math.sqrt(1.0 - beta2**step) for beta2 in (0.999, 0.95, 0.5) for step in (1, 2, 3, 10, 1000)]
    return corrections + [rng.uniform(0.5, 1.0) for _ in range(40)]


def test_the_avx512_sequence_gives_the_division_bit_for_bit(tmp_path):
    if "avx512" not in _backend.cpu_isas_supported():
        pytest.skip("the sequence is the AVX-512 kernels' only; this CPU does not run them")
    compiler = shutil.which(cpp_extension.get_cxx_compiler())
    if compiler is None:
        pytest.skip("no C++ compiler")
    binary = tmp_path / "quotient_by_constant"
    # the kernels' own flags (setup.py): no contraction, FMAs only where the code asks for them
    subprocess.run([compiler, "-O2", "-std=c++20", "-march=x86-64-v4", "-fopenmp-simd", "-ffp-contract=off",
                    "-fno-math-errno", "-fno-trapping-math", f"-I{ROOT / 'csrc' / 'include'}",
                    str(ROOT / "tests" / "native" / "quotient_by_constant.cpp"), "-o", str(binary)], check=True)
    done = subprocess.run([str(binary)], input="\n".join(map(repr, divisors())), capture_output=True, text=True,
                          timeout=300)
    checked, mismatches = map(int, done.stdout.split()[-2:])
    assert checked == len(divisors()) * ((1 << 23) + 5)
    assert mismatches == 0 and done.returncode == 0, done.stdout
