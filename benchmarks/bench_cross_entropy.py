"""pytest-benchmark: cross-entropy forward + backward on the CPU, ours beside torch eager and torch.compile (ce), and
linear + cross-entropy forward + backward beside torch's chunked F.linear_cross_entropy and the naive
F.cross_entropy(x @ w.T, y) (linear_ce), in fp32 and bf16.

    pytest benchmarks/bench_cross_entropy.py                      # ce 1024x32000, linear_ce 1024x256x8000: ~1 min
    FUSED_OPTIM_BENCH_CE=4096x32000 FUSED_OPTIM_BENCH_LINEAR_CE=8192x512x32000 \\
        pytest benchmarks/bench_cross_entropy.py                  # the real sizes (minutes)

Each call is one `loss.backward()` on fresh gradients (fused_optim/tools/bench/cross_entropy.py). The default ce logits
(131 MB fp32) are past the cache, so GB/s is meaningful; `extra_info` (shown with `--benchmark-json`) records the
bytes model, GB/s and % of the triad roof (ce), TFLOP/s and the peak extra memory of one call measured in a fresh
process (linear_ce). Every implementation is checked against the float64 reference first: ours must pass; a peer
that does not is reported as xfail with its error. Not part of the test suite (`testpaths = ["tests"]`); GPU
numbers come from `fused-optim bench --ops ce,linear_ce` (CUDA events, do_bench).
"""

from __future__ import annotations

import os

import pytest
import torch

from fused_optim.tools.bench import cross_entropy as ce
from fused_optim.tools.bench import parse_shape

CPU = torch.device("cpu")
SHAPES = {
    "ce": parse_shape(os.environ.get("FUSED_OPTIM_BENCH_CE", "1024x32000")),
    "linear_ce": parse_shape(os.environ.get("FUSED_OPTIM_BENCH_LINEAR_CE", "1024x256x8000")),
}
CASES = ("fp32", "bf16")


@pytest.fixture(scope="module")
def workload_of():
    """Each (op, dtype)'s workload, the part of it that is checked, and its float64 reference, made once."""
    cache: dict[tuple[str, str], tuple[ce.Workload, ce.Workload, tuple]] = {}

    def get(op: str, case: str):
        if (op, case) not in cache:
            cache.clear()  # one case's tensors at a time
            w = ce.make_workload(op, case, SHAPES[op], CPU)
            check_w = w.first_rows(ce.CHECK_ROWS)
            cache[op, case] = (w, check_w, ce.reference_result(check_w))
        return cache[op, case]

    return get


def _cases():
    for op in ce.OPS:
        for case in CASES:
            for impl in ce.implementations(op, CPU):
                yield pytest.param(op, case, impl, id=f"{op}-{case}-{impl.name.replace(' ', '_')}")


@pytest.mark.parametrize("op,case,impl", list(_cases()))
def test_cross_entropy(benchmark, op, case, impl, workload_of, roof_gbps):
    if impl.unavailable is not None:
        pytest.skip(impl.unavailable)
    w, check_w, expected = workload_of(op, case)
    try:
        runner = impl.build(check_w)
    except ce.Unavailable as error:
        pytest.skip(str(error))
    runner.step()
    row = ce._row(op, case, impl, w)
    ce._check(op, case, runner, expected, row)
    if not row["correct"] and not impl.name.startswith("fused_optim"):
        pytest.xfail(f"{impl.name}: {row['note']}")
    assert row["correct"], row["note"]
    if check_w is not w:
        runner = impl.build(w)

    shape = SHAPES[op]
    benchmark.group = f"{op} {case} {row['shape']}"
    benchmark.extra_info.update(shape=list(shape), dtype=row["dtype"], loss_rel_err=row["loss_rel_err"],
                                grad_rel_err=row["grad_rel_err"])
    benchmark(runner.step)
    median_s = benchmark.stats.stats.median
    if op == "ce":
        gbps = row["bytes"] / median_s / 1e9
        benchmark.extra_info.update(bytes=row["bytes"], gbps=gbps, roof="triad", roof_gbps=roof_gbps,
                                    pct_of_roof=100 * gbps / roof_gbps)
    else:
        runner = None  # its gradients, freed while the measuring process runs
        peak, method = ce.peak_memory_in_subprocess(impl.name, op, case, shape)
        benchmark.extra_info.update(flops=row["flops"], tflops=row["flops"] / median_s / 1e12, peak_mem=peak,
                                    peak_mem_method=method)
