"""Gradient accumulation benchmark: `main_grads[i] += grads[i]` (fp32 main grads), ours against torch's ways, on the
CPU or a CUDA GPU, reported as time, GB/s and % of the device's measured memory roof.

Cases: the grads' dtype (bf16 or fp32; the main grads are always fp32) × two layouts:
  one tensor      N elements in one tensor (`sizes`; default 84M on the CPU, 256M on a GPU; --quick 4M on the CPU,
                  16M on a GPU): the bandwidth case, far past the last-level cache (L2 on a GPU).
  2000×4096       2,000 tensors of 4,096 elements: what a per-tensor loop or launch costs when a model has many
                  small params.

Implementations: ours, `fused_optim.ops.accumulate.accumulate_grads(main_grads, grads, backend=...)`, on each
backend that runs here (CPU: the C++ kernels; GPU: CUDA C++ and Triton; one whose kernel is not registered yet is
shown as absent, and then ours on the torch backend is measured instead); torch's `main.add_(grad)` per tensor (the
baseline of the × column: what a training loop with main grads does) and `torch._foreach_add_(mains, grads)`.

Bytes model (`accumulate_bytes`), the fewest bytes one call moves per element: read the grad + read the main grad +
write the main grad = 2 + 4 + 4 = 10 B for bf16 grads, 4 + 4 + 4 = 12 B for fp32.

Correctness, before timing: one call on fresh copies of the main grads is compared with main + grad in float64; the
sum of an fp32 and a widened bf16/fp32 value is rounded once, so the result must be within one fp32 ulp
(`TOLERANCE`). A wrong implementation is reported as wrong and not timed. The timed calls keep adding the same
grads to the main grads (which grow by a grad each call: finite, normal values throughout).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from fused_optim.tools.bench.adamw import _human
from fused_optim.tools.bench.peers import Case, Impl, Kernel, new_row, our_implementations, run_cases
from fused_optim.tools.bench.registry import Benchmark

OPS = ("accumulate",)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DEFAULT_DTYPES = ("bf16", "fp32")
MANY_SHAPES = [(4096,)] * 2000  # the many-tensor case
# |result - (main + grad in float64)| <= rtol·|main + grad|: one rounding to fp32 is within half an ulp (2^-24
# relative); one ulp allowed.
TOLERANCE = 2.0**-23
KERNELS = (Kernel("accumulate_grads_", "accumulate"),)


def accumulate_bytes(numel: int, grad_dtype: torch.dtype) -> int:
    """The fewest bytes `main += grad` moves over `numel` elements: read grad and main, write main.

    >>> accumulate_bytes(1, torch.bfloat16), accumulate_bytes(1, torch.float32)
    (10, 12)
    """
    return numel * (grad_dtype.itemsize + 4 + 4)


@dataclass
class Workload:
    """One case's inputs: the initial main grads and the grads (read-only: each implementation adds into copies)."""

    case: str  # the grads' dtype: "bf16" or "fp32"
    device: torch.device
    mains0: list[Tensor]
    grads: list[Tensor]

    @property
    def numel(self) -> int:
        return sum(m.numel() for m in self.mains0)

    @property
    def shape_text(self) -> str:
        return shape_text([tuple(m.shape) for m in self.mains0])


def shape_text(shapes: list[tuple[int, ...]]) -> str:
    """'2000×4096' for 2,000 tensors of 4,096 elements; '84M' for one tensor of 84M."""
    each = math.prod(shapes[0])
    return _human(each) if len(shapes) == 1 else f"{len(shapes)}×{each}"


def make_workload(case: str, shapes: list[tuple[int, ...]], device: torch.device, seed: int = 0) -> Workload:
    generator = torch.Generator(device=device).manual_seed(seed)

    def randn(shape, dtype):  # a micro-batch's grads and their running sum: the same order of magnitude
        return (torch.randn(shape, generator=generator, device=device) * 1e-3).to(dtype)
    mains0 = [randn(s, torch.float32) for s in shapes]
    grads = [randn(s, DTYPES[case]) for s in shapes]
    return Workload(case, device, mains0, grads)


def _ours(backend: str) -> Callable[[Workload], tuple[Callable[[], None], list[Tensor]]]:
    from fused_optim.ops.accumulate import accumulate_grads

    def build(w: Workload):
        mains = [m.clone() for m in w.mains0]
        return (lambda: accumulate_grads(mains, w.grads, backend=backend)), mains
    return build


def _add_loop(w: Workload):
    mains = [m.clone() for m in w.mains0]

    def step():
        for main, grad in zip(mains, w.grads):
            main.add_(grad)
    return step, mains


def _foreach_add(w: Workload):
    mains = [m.clone() for m in w.mains0]
    return (lambda: torch._foreach_add_(mains, w.grads)), mains


def implementations(device: torch.device) -> list[Impl]:
    """The implementations compared on `device`, usable or not (with the reason). Each `build(workload)` returns
    (step, main grads it adds into)."""
    impls = our_implementations(device, _ours, KERNELS, torch_fallback=True)
    impls.append(Impl("torch add_ loop", _add_loop, baseline=True))
    impls.append(Impl("torch _foreach_add_", _foreach_add))
    return impls


def check(mains: list[Tensor], w: Workload, chunk: int = 1 << 24) -> tuple[bool, float]:
    """(every main grad within TOLERANCE of main0 + grad in float64, the largest |error|), after one call; walked
    in flat chunks so that no full-size float64 temporary is made."""
    ok, worst = True, 0.0
    for main, main0, grad in zip(mains, w.mains0, w.grads):
        flat, flat0, flat_grad = main.reshape(-1), main0.reshape(-1), grad.reshape(-1)
        for start in range(0, flat.numel(), chunk):
            expected = flat0[start:start + chunk].double() + flat_grad[start:start + chunk].double()
            error = (flat[start:start + chunk].double() - expected).abs()
            worst = max(worst, float(error.max()))
            ok = ok and bool((error <= TOLERANCE * expected.abs()).all())  # NaN fails
    return ok, worst


def checked_step(impl: Impl, w: Workload, row: dict[str, Any]) -> Callable[[], None] | None:
    """Builds `impl` on `w`, runs one call and checks it (correct, max_abs_err and, when wrong, a note in `row`);
    returns the step to time, or None when wrong."""
    step, mains = impl.build(w)
    step()
    ok, err = check(mains, w)
    row.update(correct=ok, max_abs_err=err)
    if not ok:
        row["note"] = f"wrong result (max |error| {err:.3g} vs float64): not timed"
        return None
    return step


@dataclass
class AccumulateConfig:
    """What `run` measures: the one-tensor case at each of `sizes` and the 2000×4096 case, for each grad dtype."""

    device: torch.device
    sizes: list[int]
    dtypes: tuple[str, ...] = DEFAULT_DTYPES
    budget_s: float = 1.5
    max_time_s: float = 30.0
    seed: int = 0

    def describe(self) -> dict[str, Any]:
        """The configuration as the JSON report records it."""
        return {"accumulate": {"sizes": self.sizes, "many": shape_text(MANY_SHAPES), "dtypes": list(self.dtypes),
                               "rtol_vs_float64": TOLERANCE, "baseline": "torch add_ loop",
                               "bytes_per_element": {d: accumulate_bytes(1, DTYPES[d]) for d in self.dtypes},
                               "budget_s": self.budget_s}}


def plan(config: AccumulateConfig) -> list[tuple[str, list[tuple[int, ...]]]]:
    """The (grad dtype, shapes) pairs `run` measures, in order."""
    layouts = [[(n,)] for n in config.sizes] + [MANY_SHAPES]
    return [(case, shapes) for case in config.dtypes for shapes in layouts]


def count_tasks(config: AccumulateConfig) -> int:
    return len(plan(config)) * len(implementations(config.device))


def run(config: AccumulateConfig, roof_gbps: float | None = None,
        on_task: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Measures every case × implementation of `config`; one row (a dict) per pair."""
    cases = [functools.partial(_case, config, case, shapes) for case, shapes in plan(config)]
    return run_cases(cases, implementations(config.device), config, roof_gbps, on_task)


def _case(config: AccumulateConfig, case: str, shapes: list[tuple[int, ...]]) -> Case:
    w = make_workload(case, shapes, config.device, config.seed)
    return Case(f"accumulate {case} {w.shape_text}", lambda impl: _row(impl, w),
                lambda impl, row: checked_step(impl, w, row))


def _row(impl: Impl, w: Workload) -> dict[str, Any]:
    return new_row("accumulate", w.case, impl, w.device, dtype=str(w.grads[0].dtype).replace("torch.", ""),
                   main_dtype="float32", shape=w.shape_text, n_params=w.numel, n_tensors=len(w.mains0),
                   bytes=accumulate_bytes(w.numel, w.grads[0].dtype))


CAPTIONS = {
    "accumulate": "ms: median time of main_grads[i] += grads[i] over all tensors (fp32 main grads; case = the "
                  "grads' dtype); GB/s by the bytes model (read grad + read main + write main: bf16 10 B/element, "
                  "fp32 12); % of the roof; × = torch's add_ loop's time / this one's; vs peers: ours' speed-up "
                  "over each; peak mem (GPU): what a call allocates beyond its inputs.",
}


BENCHMARK = Benchmark(
    ops=OPS, count_tasks=count_tasks, run=run,
    configure=lambda request: AccumulateConfig(device=request.device, sizes=request.default_sizes(),
                                               dtypes=request.dtypes or DEFAULT_DTYPES, budget_s=request.budget_s),
)
