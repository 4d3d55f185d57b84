"""pytest-benchmark: gradient accumulation on the CPU, fp32 main grads += bf16 or fp32 grads, ours beside torch's
`main.add_(grad)` loop and `torch._foreach_add_`, on one large tensor and on 2,000 tensors of 4,096.

    pytest benchmarks/bench_accumulate.py                                        # 4M elements: seconds
    FUSED_OPTIM_BENCH_ELEMENTS=84000000 pytest benchmarks/bench_accumulate.py    # the issue's size (past the cache)

Each benchmark records the bytes model (10 B/element for bf16 grads, 12 for fp32;
fused_optim/tools/bench/accumulate.py), the GB/s reached (by the median) and its % of the triad roof measured in the same session, in `extra_info` (shown
with `--benchmark-json`). Every implementation is checked against float64 first. Ours runs on each backend whose
kernel is registered (else on the torch backend). Not part of the test suite (`testpaths = ["tests"]`); GPU
numbers come from `fused-optim bench --ops accumulate`.
"""

from __future__ import annotations

import os

import pytest
import torch

from fused_optim.tools.bench import accumulate

N_ELEMENTS = int(os.environ.get("FUSED_OPTIM_BENCH_ELEMENTS", 4_000_000))
CPU = torch.device("cpu")
LAYOUTS = {"one": [(N_ELEMENTS,)], "many": accumulate.MANY_SHAPES}


@pytest.fixture(scope="module")
def workload_of():
    """Each (grad dtype, layout)'s workload, made once."""
    cache: dict[tuple[str, str], accumulate.Workload] = {}

    def get(case: str, layout: str) -> accumulate.Workload:
        if (case, layout) not in cache:
            cache.clear()  # one case's tensors at a time
            cache[case, layout] = accumulate.make_workload(case, LAYOUTS[layout], CPU)
        return cache[case, layout]

    return get


def _cases():
    for case in accumulate.DEFAULT_DTYPES:
        for layout in LAYOUTS:
            for impl in accumulate.implementations(CPU):
                yield pytest.param(case, layout, impl, id=f"{case}-{layout}-{impl.name.replace(' ', '_')}")


@pytest.mark.parametrize("case,layout,impl", list(_cases()))
def test_accumulate(benchmark, case, layout, impl, workload_of, roof_gbps):
    if impl.unavailable is not None:
        pytest.skip(impl.unavailable)
    w = workload_of(case, layout)
    row = accumulate._row(impl, w)
    step = accumulate.checked_step(impl, w, row)
    assert row["correct"], row["note"]

    benchmark.group = f"accumulate {case} {w.shape_text}"
    benchmark.extra_info.update(n_elements=w.numel, n_tensors=len(w.mains0), dtype=row["dtype"],
                                bytes=row["bytes"], roof="triad", roof_gbps=roof_gbps)
    benchmark(step)
    gbps = row["bytes"] / benchmark.stats.stats.median / 1e9
    benchmark.extra_info.update(gbps=gbps, pct_of_roof=100 * gbps / roof_gbps)
