"""The CUDA cross-entropy kernel's pass 1 replayed on the host (tests/native/online_weighted_gap.cpp): each thread's
online max, sum of exp and weighted gap below the max (cross_entropy.h's OnlineLogSumExp and OnlineWeightedGap),
merged across a block as csrc/cuda/cross_entropy.cu merges them, against the direct fp64 sums. The CUDA kernels run
only where a GPU is lent; this checks the merging arithmetic they share with the header on every machine."""

from __future__ import annotations

import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def replay(tmp_path_factory):
    """Runs the replay on (threads, logits, weights): (max, sum, gap) as merged, then as summed directly in fp64."""
    compiler = shutil.which(cpp_extension.get_cxx_compiler())
    if compiler is None:
        pytest.skip("no C++ compiler")
    binary = tmp_path_factory.mktemp("native") / "online_weighted_gap"
    subprocess.run([compiler, "-O2", "-std=c++20", f"-I{ROOT / 'csrc' / 'include'}",
                    str(ROOT / "tests" / "native" / "online_weighted_gap.cpp"), "-o", str(binary)], check=True)

    def run(threads: int, logits: torch.Tensor, weights: torch.Tensor):
        numbers = " ".join(map(repr, [*logits.tolist(), *weights.tolist()]))
        done = subprocess.run([str(binary)], input=f"{threads} {logits.numel()}\n{numbers}\n", capture_output=True,
                              text=True, check=True)
        merged, direct = ([float(v) for v in line.split()] for line in done.stdout.splitlines())
        return merged, direct

    return run


@pytest.mark.parametrize("threads", [32, 128, 1024])
@pytest.mark.parametrize("numel", [1, 3, 8, 1023, 4099])
@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_merged_gap_equals_the_direct_sum(replay, threads, numel, offset):
    """Rows shorter than a vector, than the block, and odd ones; logits around 0 and around 1e4 (where a weighted
    sum of the logits themselves would cancel): the merged gap is the direct one to fp32 precision."""
    generator = torch.Generator().manual_seed(numel)
    logits = 3 * torch.randn(numel, generator=generator) + offset
    weights = torch.rand(numel, generator=generator) + 0.5
    (max_, sum_, gap), (direct_max, direct_sum, direct_gap) = replay(threads, logits, weights)
    assert max_ == direct_max
    assert sum_ == pytest.approx(direct_sum, rel=1e-5)
    assert gap == pytest.approx(direct_gap, rel=1e-5, abs=1e-6)


def test_masked_logits_make_the_gap_infinite(replay):
    """A masked (-inf) logit of positive weight is infinitely far below the max, wherever it falls: first in the
    row (before any finite max), in the middle, or filling whole vectors at the end (a padded vocabulary)."""
    for masked in (slice(0, 16), slice(40, 41), slice(200, 256)):
        logits = torch.randn(256)
        logits[masked] = -math.inf
        (max_, _, gap), (direct_max, _, direct_gap) = replay(64, logits, torch.ones(256))
        assert max_ == direct_max and gap == direct_gap == math.inf


@pytest.mark.parametrize("numel", [7, 13, 256])
@pytest.mark.parametrize("where", ["first", "middle", "last", "a-whole-vector", "beside-masked", "plus-inf"])
def test_a_nan_or_inf_logit_makes_the_sum_nan(replay, numel, where):
    """A NaN logit anywhere in the row makes its sum of exp, hence its loss, NaN, as torch's, the CPU kernel's and
    Triton's: in the scalar tail (a row shorter than a vector, or 13 = a vector and 5), inside a vector, filling a
    vector (whose max, taken with fmaxf, is then -inf), beside masked logits; and so does a +inf logit (inf - inf)."""
    logits = torch.randn(numel)
    position = {"first": 0, "middle": numel // 2, "last": numel - 1}.get(where, 0)
    if where in ("a-whole-vector", "beside-masked"):
        logits[:8] = math.nan
        logits[4:8] = -math.inf if where == "beside-masked" else math.nan
    else:
        logits[position] = math.inf if where == "plus-inf" else math.nan
    for threads in (32, 64):
        (_, sum_, _), (_, direct_sum, _) = replay(threads, logits, torch.ones(numel))
        assert math.isnan(direct_sum) and math.isnan(sum_), (threads, sum_)
