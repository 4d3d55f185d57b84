"""pytest-benchmark: one AdamW step, and one Adam step (weight decay coupled into the grad), on the CPU, ours beside
torch's fused / foreach / for-loop (and DeepSpeed's CPUAdam when installed), for fp32, bf16 and bf16 with fp32 master
weights (ours vs the torch way).

    pytest benchmarks/bench_adamw.py                                       # 2M params: under a minute
    FUSED_OPTIM_BENCH_PARAMS=84000000 pytest benchmarks/bench_adamw.py     # the real size (past the cache)

The default 2M params mostly fit in the last-level cache, so its GB/s can pass the roof; the README's CPU numbers
are at 84M. Each benchmark records the bytes model of its step (fused_optim/tools/bench/adamw.py), the GB/s it
reached (by the median) and its % of the triad roof measured in the same session, in `extra_info` (shown with
`--benchmark-json`). Every implementation is checked against torch's for-loop first. These are not part of the
test suite (`testpaths = ["tests"]`); GPU numbers come from `fused-optim bench` (CUDA events, do_bench).
"""

from __future__ import annotations

import os

import pytest
import torch

from fused_optim.tools.bench import adamw

N_PARAMS = int(os.environ.get("FUSED_OPTIM_BENCH_PARAMS", 2_000_000))
CPU = torch.device("cpu")
CASES = ("fp32", "bf16", "bf16+master")
# The for-loop moves ~10 passes over memory a step: at the real size a few rounds take tens of seconds.
FORLOOP_MAX_PARAMS = int(os.environ.get("FUSED_OPTIM_BENCH_FORLOOP_MAX", 100_000_000))


@pytest.fixture(scope="module")
def workload_of():
    """Each (variant, case)'s workload and the reference (torch's for-loop after the check steps), made once."""
    cache: dict[tuple[str, str], tuple[adamw.Workload, list[torch.Tensor]]] = {}

    def get(variant: adamw.Variant, case: str):
        if (variant.op, case) not in cache:
            cache.clear()  # one case's tensors at a time (GBs at the real size)
            w = adamw.make_workload(case, N_PARAMS, CPU)
            reference = adamw._torch(variant, foreach=False)(w)
            adamw._check_steps(reference, 2, CPU)
            cache[variant.op, case] = (w, [t.detach().clone() for t in reference.result()])
        return cache[variant.op, case]

    return get


def _cases():
    for variant in adamw.VARIANTS.values():
        for case in (case for case in CASES if case in variant.cases):
            for impl in adamw.implementations(case, CPU, variant):
                yield pytest.param(variant, case, impl, id=f"{variant.op}-{case}-{impl.name.replace(' ', '_')}")


@pytest.mark.parametrize("variant,case,impl", list(_cases()))
def test_adam_step(benchmark, variant, case, impl, workload_of, roof_gbps):
    if impl.unavailable is not None:
        pytest.skip(impl.unavailable)
    if impl.reference and N_PARAMS > FORLOOP_MAX_PARAMS:
        pytest.skip(f"for-loop skipped above {FORLOOP_MAX_PARAMS} params (FUSED_OPTIM_BENCH_FORLOOP_MAX)")
    w, reference = workload_of(variant, case)
    runner = impl.build(w)
    adamw._check_steps(runner, 2, CPU)  # also allocates the state: not in the timed rounds
    row = adamw._row(variant.op, case, impl, w)
    adamw._check(case, runner, reference, row, variant, w.p0)
    assert row["correct"], row["note"]

    n_bytes = adamw.adam_step_bytes(w.numel, w.dtype, state_dtype=runner.state_dtype(),
                                     master_bytes=runner.master_bytes if w.master else 0)
    benchmark.group = f"{variant.op} {case} {w.numel / 1e6:g}M params"
    benchmark.extra_info.update(n_params=w.numel, n_tensors=len(w.p0), dtype=row["dtype"], bytes=n_bytes,
                                bytes_per_param=n_bytes / w.numel, roof="triad", roof_gbps=roof_gbps)
    benchmark(runner.step)
    median_s = benchmark.stats.stats.median
    benchmark.extra_info["gbps"] = n_bytes / median_s / 1e9
    benchmark.extra_info["pct_of_roof"] = 100 * benchmark.extra_info["gbps"] / roof_gbps
