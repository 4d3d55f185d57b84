"""pytest-benchmark: the optimizer side of a step with loss scaling and clipping on the CPU, ours
(`fused_optim.AdamW(max_grad_norm=1.0)` stepped by `fused_optim.GradScaler`) beside torch's
`GradScaler.unscale_` + `clip_grad_norm_` + fused AdamW (foreach where torch has no fused CPU AdamW).

    pytest benchmarks/bench_clip_adamw.py                                        # 2M params: seconds
    FUSED_OPTIM_BENCH_PARAMS=84000000 pytest benchmarks/bench_clip_adamw.py      # the real size (past the cache)

Each benchmark records the bytes model (32 B/param; fused_optim/tools/bench/clip_adamw.py), the GB/s reached (by the
median) and its % of the triad roof measured in the same session, in `extra_info`. Every implementation is checked
against float64 over two steps first (clipped, then not). Not part of the test suite (`testpaths = ["tests"]`);
GPU numbers come from `fused-optim bench --ops clip_adamw`.
"""

from __future__ import annotations

import os

import pytest
import torch

from fused_optim.tools.bench import clip_adamw

N_PARAMS = int(os.environ.get("FUSED_OPTIM_BENCH_PARAMS", 2_000_000))
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def workload():
    """The workload and its float64 reference, made once."""
    w = clip_adamw.make_workload(N_PARAMS, CPU)
    return w, clip_adamw.reference_params(w)


@pytest.mark.parametrize("impl", [pytest.param(impl, id=impl.name.replace(" ", "_"))
                                  for impl in clip_adamw.implementations(CPU)])
def test_clip_adamw_step(benchmark, impl, workload, roof_gbps):
    if impl.unavailable is not None:
        pytest.skip(impl.unavailable)
    w, expected = workload
    row = clip_adamw._row(impl, w)
    step = clip_adamw.checked_step(impl, w, expected, row)
    assert row["correct"], row["note"]
    step()  # allocates the state: not in the timed rounds

    benchmark.group = f"clip_adamw fp32 {w.numel / 1e6:g}M params"
    benchmark.extra_info.update(n_params=w.numel, n_tensors=len(w.p0), bytes=row["bytes"],
                                bytes_per_param=row["bytes"] / w.numel, roof="triad", roof_gbps=roof_gbps)
    benchmark(step)
    gbps = row["bytes"] / benchmark.stats.stats.median / 1e9
    benchmark.extra_info.update(gbps=gbps, pct_of_roof=100 * gbps / roof_gbps)
