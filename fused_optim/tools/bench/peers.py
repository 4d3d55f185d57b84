"""What every op's benchmark shares: the implementations compared (ours per backend, the peers), the loop that
checks each before timing it, the timing of one checked step, and the derived columns (GB/s, % of the roof,
speed-ups).

An op module (adamw.py, cross_entropy.py, accumulate.py, clip_adamw.py, sgd.py) supplies its workload, its
implementations (`Impl`), its reference check and its bytes model (accumulate, clip_adamw and sgd run their cases
through `run_cases`); the rows it returns are what `fused_optim.tools.bench.print_table` and
`write_json` take.
"""

from __future__ import annotations

import importlib
import importlib.util
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch

from fused_optim import _backend
from fused_optim.tools.bench.registry import Request
from fused_optim.tools.bench.timing import error_note, release_memory, synchronize, time_fn


@dataclass
class Impl:
    name: str
    build: Callable | None
    unavailable: str | None = None  # why it cannot run here (then build is None)
    auto: bool = False  # what fused_optim's backend="auto" picks here
    baseline: bool = False  # the peer the × column is relative to
    reference: bool = False  # the check's reference itself (adamw: torch's for-loop)


@dataclass(frozen=True)
class Kernel:
    """An op our implementation needs: its C++ op name (CPU/CUDA backends) and its Triton module."""

    op: str  # "accumulate_grads_": the C++ kernels register fused_optim::accumulate_grads_
    triton_module: str  # "accumulate": fused_optim/triton/accumulate.py


def missing_kernel(backend: str, kernels: tuple[Kernel, ...]) -> str | None:
    """Why `backend` has no kernel for one of `kernels` (an op whose kernels are not written or built yet), or None.
    The schemas are always defined (fused_optim/ops); the C++ extensions register the CPU and CUDA kernels."""
    for kernel in kernels:
        if backend in ("cpu", "cuda"):
            key = backend.upper()
            if not torch._C._dispatch_has_kernel_for_dispatch_key(f"fused_optim::{kernel.op}", key):
                return f"absent (the {key} extension registers no kernel for fused_optim::{kernel.op})"
        elif backend == "triton" and importlib.util.find_spec(f"fused_optim.triton.{kernel.triton_module}") is None:
            return f"absent (no Triton kernel fused_optim/triton/{kernel.triton_module}.py)"
    return None


def not_installed(module: str, package: str) -> str | None:
    """"absent (`package` is not installed)" when `module` cannot be imported, else None: an optional peer's
    row says so instead of running."""
    return None if importlib.util.find_spec(module) is not None else f"absent ({package} is not installed)"


def apex_peer(name: str, optimizer: str, device: torch.device, build: Callable[[type], Callable]) -> Impl | None:
    """apex's `apex.optimizers.<optimizer>` (FusedAdam, FusedSGD) as a peer on a GPU, `build(optimizer_class)`
    making its runner; its row says why when apex is absent. None on the CPU: apex's optimizers run on CUDA only
    (so no row there, as DeepSpeed's CPUAdam has none on a GPU)."""
    if device.type != "cuda":
        return None
    missing = not_installed("apex", "apex")
    if missing is not None:
        return Impl(name, None, unavailable=missing)
    try:
        optimizer_class = getattr(importlib.import_module("apex.optimizers"), optimizer)
    except (ImportError, AttributeError) as error:
        message = str(error).strip().splitlines()
        return Impl(name, None, unavailable=f"absent (apex.optimizers.{optimizer}: {message[0] if message else ''})")
    return Impl(name, build(optimizer_class))


def torch_fused_supported(optimizer_class: type, device: torch.device) -> bool:
    """Whether torch's `optimizer_class` (AdamW, SGD) takes fused=True for fp32 params on `device` (CUDA; the CPU
    since torch 2.4)."""
    try:
        optimizer_class([torch.zeros(1, device=device, requires_grad=True)], lr=1e-3, fused=True)
    except (RuntimeError, ValueError):
        return False
    return True


def compile_step(step: Callable[[], Any], params: list[torch.Tensor], initial: list[torch.Tensor],
                 state: dict) -> Callable[[], Any]:
    """`torch.compile(step)` (an optimizer's `opt.step`, fullgraph=False), compiled here on two warm-up steps (one
    for the empty state, one for the state the first step creates), after which `params` are copied back from
    `initial` and the optimizer's `state` is emptied: the check steps and the timing start from the workload, and
    do not time the compiles. A GPU peer only: on the CPU, compiling an optimizer step takes long."""
    compiled = torch.compile(step, fullgraph=False)
    for _ in range(2):
        compiled()
    with torch.no_grad():
        torch._foreach_copy_(params, initial)
    state.clear()  # the same dict (the compiled step's guards look at it), empty as before the first step
    return compiled


def our_implementations(device: torch.device, build: Callable[[str], Callable], kernels: tuple[Kernel, ...] = (),
                        torch_fallback: bool = False) -> list[Impl]:
    """Ours on each backend that runs `device`'s tensors (`build(backend)` makes its runner), or why one cannot.
    A backend runs only if it has every one of `kernels`. With `torch_fallback`, ours on the torch backend is added
    when no other backend of ours runs here (so that our path is still measured while kernels are missing)."""
    impls = []
    try:
        auto = _backend.resolve("auto", device.type)
    except RuntimeError:
        auto = None
    for backend in ("cuda", "triton") if device.type == "cuda" else ("cpu",):
        name = f"fused_optim[{backend}]"
        try:
            _backend.resolve(backend, device.type)
        except RuntimeError as error:
            impls.append(Impl(name, None, unavailable=str(error)))
            continue
        missing = missing_kernel(backend, kernels)
        if missing is not None:
            impls.append(Impl(name, None, unavailable=missing))
            continue
        impls.append(Impl(name, build(backend), auto=backend == auto))
    if torch_fallback and all(impl.unavailable is not None for impl in impls):
        impls.append(Impl("fused_optim[torch]", build("torch")))
    return impls


def time_step(step: Callable[[], Any], device: torch.device, row: dict[str, Any], budget_s: float,
              max_time_s: float) -> None:
    """Times `step` into `row` (time_ms_median, time_ms_iqr, n_timed; on a GPU also peak_mem: what one call
    allocates beyond what it keeps). One untimed call first; if it shows that ~7 calls would take longer than
    `max_time_s`, the step is not timed (time_ms_estimate and a note instead)."""
    synchronize(device)
    t0 = time.perf_counter()
    step()
    synchronize(device)
    step_s = time.perf_counter() - t0
    if step_s * 7 > max_time_s:
        row["time_ms_estimate"] = step_s * 1e3
        row["note"] = (row["note"] + "; " if row["note"] else "") + (
            f"not timed: {step_s:.1f} s/call (> {max_time_s:.0f} s for 7 calls)")
        return
    timing = time_fn(step, device, budget_s)
    row.update(time_ms_median=timing.median_ms, time_ms_iqr=timing.iqr_ms, n_timed=timing.n)
    if device.type == "cuda":
        synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        synchronize(device)
        row["peak_mem"] = torch.cuda.max_memory_allocated(device) - base


# The columns a run fills in (time_step, derive): None until measured.
MEASURED = ("time_ms_median", "time_ms_iqr", "n_timed", "time_ms_estimate", "gbps", "pct_of_roof",
            "speedup_vs_baseline", "speedup_vs", "peak_mem", "correct", "max_abs_err")


def new_row(op: str, case: str, impl: Impl, device: torch.device, **workload: Any) -> dict[str, Any]:
    """A result row before anything is measured: what ran (op, case, impl, the workload's own fields, device)."""
    return {"op": op, "case": case, "impl": impl.name, "auto": impl.auto, "baseline": impl.baseline, **workload,
            "device": str(device), **dict.fromkeys(MEASURED), "note": ""}


def check_then_time(impls: list[Impl], device: torch.device, label: str, new_row: Callable[[Impl], dict[str, Any]],
                    checked_step: Callable[[Impl, dict[str, Any]], Callable[[], Any] | None], budget_s: float,
                    max_time_s: float, on_task: Callable[[str], None]) -> list[dict[str, Any]]:
    """One row per implementation: `checked_step(impl, row)` builds it, checks it (writing correct, the error and,
    when wrong, a note into the row) and returns the step to time, or None when it is wrong (then not timed).
    An implementation that fails is reported with its error; the next one still runs."""
    rows = []
    for impl in impls:
        row = new_row(impl)
        rows.append(row)
        step = None
        try:
            if impl.unavailable is not None:
                row["note"] = impl.unavailable
                continue
            step = checked_step(impl, row)
            if step is not None:
                time_step(step, device, row, budget_s, max_time_s)
        except Exception as error:  # noqa: BLE001  (one failing peer must not end the benchmark)
            row["note"] = error_note(error)
        finally:
            step = None
            release_memory(device)
            on_task(f"{label}: {impl.name}")
    return rows


def derive(rows: list[dict[str, Any]], roof_gbps: float | None) -> None:
    """GB/s (rows with a bytes model), % of the roof, TFLOP/s (rows with flops), the speed-up over the baseline
    (speedup_vs_baseline) and, on our rows, over each peer (speedup_vs)."""
    timed = [r for r in rows if r["time_ms_median"]]
    baseline = next((r for r in timed if r["baseline"]), None)
    for r in timed:
        if r.get("bytes"):
            r["gbps"] = r["bytes"] / (r["time_ms_median"] * 1e6)
            if roof_gbps:
                r["pct_of_roof"] = 100.0 * r["gbps"] / roof_gbps
        if r.get("flops"):
            r["tflops"] = r["flops"] / (r["time_ms_median"] * 1e9)
        if baseline is not None:
            r["speedup_vs_baseline"] = baseline["time_ms_median"] / r["time_ms_median"]
        if r["impl"].startswith("fused_optim"):
            r["speedup_vs"] = {p["impl"]: p["time_ms_median"] / r["time_ms_median"]
                               for p in timed if not p["impl"].startswith("fused_optim")}


@dataclass
class SizesConfig:
    """What an op measured at total sizes runs (clip_adamw, sgd): one case at each of `sizes`. `budget_s`: seconds
    spent timing each implementation; one whose timing would take longer than `max_time_s` is not timed."""

    device: torch.device
    sizes: list[int]
    budget_s: float = 1.5
    max_time_s: float = 30.0
    seed: int = 0

    @classmethod
    def from_request(cls, request: Request) -> SizesConfig:
        """The config `fused-optim bench` asked for (registry.py): its sizes, else the defaults, and its budget."""
        return cls(device=request.device, sizes=request.default_sizes(), budget_s=request.budget_s)


@dataclass
class Case:
    """One case of an op, its workload (and reference) made: the `label` of its progress tasks, a row per
    implementation (`new_row(impl)`) and the check that returns the step to time (`check_then_time`'s
    `checked_step`). `reference`: what making it computed, reported as a task of its own (None: nothing)."""

    label: str
    new_row: Callable[[Impl], dict[str, Any]]
    checked_step: Callable[[Impl, dict[str, Any]], Callable[[], Any] | None]
    reference: str | None = None


def run_cases(cases: Iterable[Callable[[], Case]], impls: list[Impl], config: Any, roof_gbps: float | None,
              on_task: Callable[[str], None] | None) -> list[dict[str, Any]]:
    """Makes each case in turn (`make_case()`: its workload, one case's tensors at a time), checks then times every
    implementation on it and derives its columns; `config` gives device, budget_s and max_time_s. One row per case
    and implementation."""
    on_task = on_task or (lambda description: None)
    rows: list[dict[str, Any]] = []
    for make_case in cases:
        case = make_case()
        if case.reference is not None:
            on_task(f"{case.label}: {case.reference}")
        case_rows = check_then_time(impls, config.device, case.label, case.new_row, case.checked_step,
                                    config.budget_s, config.max_time_s, on_task)
        derive(case_rows, roof_gbps)
        rows += case_rows
        del case  # its workload, before the next one is made
    return rows
