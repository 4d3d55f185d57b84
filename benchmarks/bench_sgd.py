"""pytest-benchmark: one SGD step with momentum 0.9 on the CPU, ours (`fused_optim.SGD` on each backend that runs
here) beside torch's fused (where torch has it on the CPU), foreach and for-loop SGD.

    pytest benchmarks/bench_sgd.py                                        # 2M params: seconds
    FUSED_OPTIM_BENCH_PARAMS=84000000 pytest benchmarks/bench_sgd.py      # the real size (past the cache)

Each benchmark records the bytes model (20 B/param; fused_optim/tools/bench/sgd.py), the GB/s reached (by the
median) and its % of the triad roof measured in the same session, in `extra_info`. Every implementation is checked against
float64 (ReferenceSGD) over two steps first. Not part of the test suite (`testpaths = ["tests"]`); GPU numbers come
from `fused-optim bench --ops sgd`.
"""

from __future__ import annotations

import os

import pytest
import torch

from fused_optim.tools.bench import sgd

N_PARAMS = int(os.environ.get("FUSED_OPTIM_BENCH_PARAMS", 2_000_000))
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def workload():
    """The workload and its float64 reference, made once."""
    w = sgd.make_workload("fp32", N_PARAMS, CPU)
    return w, sgd.reference(w)


@pytest.mark.parametrize("impl", [pytest.param(impl, id=impl.name.replace(" ", "_"))
                                  for impl in sgd.implementations(CPU)])
def test_sgd_step(benchmark, impl, workload, roof_gbps):
    if impl.unavailable is not None:
        pytest.skip(impl.unavailable)
    w, expected = workload
    row = sgd._row(impl, w)
    step = sgd.checked_step(impl, w, expected, row)
    assert row["correct"], row["note"]

    benchmark.group = f"sgd fp32 {w.numel / 1e6:g}M params"
    benchmark.extra_info.update(n_params=w.numel, n_tensors=len(w.p0), bytes=row["bytes"],
                                bytes_per_param=row["bytes"] / w.numel, roof="triad", roof_gbps=roof_gbps)
    benchmark(step)
    gbps = row["bytes"] / benchmark.stats.stats.median / 1e9
    benchmark.extra_info.update(gbps=gbps, pct_of_roof=100 * gbps / roof_gbps)
