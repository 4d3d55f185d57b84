"""Cross-entropy benchmarks: forward + backward of our fused losses beside their peers, on the CPU or a CUDA GPU.

  ce          `fused_optim.functional.cross_entropy` on (N, V) logits, against torch eager `F.cross_entropy`,
              `torch.compile(F.cross_entropy)` and Liger-Kernel's `LigerCrossEntropyLoss` (GPU, when installed).
              Bytes model (`ce_bytes`): the logits read once + their gradient written once = 2·N·V·itemsize
              (fp32: 8·N·V, bf16: 4·N·V); GB/s and % of the memory roof measured in the same run.
  linear_ce   `fused_optim.functional.linear_cross_entropy` of (N, H) inputs and a (V, H) weight, against torch's
              chunked `F.linear_cross_entropy(..., options=LinearCrossEntropyOptions())` (torch 2.14+), the naive
              `F.cross_entropy(x @ w.T, y)`, `torch.compile` of the naive one (GPU only: on the CPU it compiles to
              the same GEMMs) and Liger-Kernel's `LigerFusedLinearCrossEntropyLoss` (GPU, when installed).
              It is GEMM-bound (three N·H·V GEMMs), so there is no bytes model: it reports time, TFLOP/s
              (6·N·H·V flops) and the peak extra memory of one call.

What is timed: one call of `step()`: the grads of the leaf inputs are set to None, then `loss = f(...)` and
`loss.backward()` (reduction "mean"). Each call therefore computes a fresh gradient and allocates its buffer, as a
training step does; nothing is reused from the previous call. CPU: median and IQR of separately timed calls; GPU:
CUDA events via `triton.testing.do_bench` (fused_optim/tools/bench/timing.py). On the CPU a fresh (N, V) buffer is fresh
pages from the kernel (glibc maps and unmaps allocations this large): faulting in 524 MB took ~75 ms here, about
half of our ce call, and torch eager pays it twice (log-softmax output and gradient). It is part of every row's
time, as it is of a training step; `THP_MEM_ALLOC_ENABLE=1` (huge pages for torch's CPU allocations) makes it smaller.

Correctness, before timing: every implementation's loss and gradients are compared with
`fused_optim.reference.cross_entropy` in float64 on the same input, gradients by their largest error relative to
the largest reference value (`TOLERANCES`). `ce` is checked on the full input (the reference walks it in row
chunks); `linear_ce` on its first `CHECK_ROWS` rows (the same weight, so every vocabulary column is checked; the
float64 GEMMs of the full input would take longer than the benchmark). A wrong implementation is reported as wrong
and not timed.

Peak extra memory (`peak_mem`, bytes): what one call allocates beyond its inputs, gradients included.
  GPU: `torch.cuda.max_memory_allocated()` during one call minus `memory_allocated()` before it (both losses).
  CPU: (linear_ce only) one fresh subprocess per implementation: a small call first (code pages, the OpenMP pool,
  torch's lazy initialisations), then the inputs are made, the kernel's peak-RSS mark is reset to the current RSS
  (`echo 5 > /proc/self/clear_refs`, Linux >= 4.0), one call runs and the peak is read back (VmHWM in
  /proc/self/status): peak minus the RSS before the call. RSS counts the pages a call touches, which is what it costs
  the machine; a fresh process keeps malloc's cache of freed memory from hiding allocations. Where clear_refs
  cannot be written, `ru_maxrss` is used instead (an upper bound if anything before the call peaked higher);
  `peak_mem_method` says which.

    >>> from fused_optim.tools.bench import cross_entropy as ce
    >>> config = ce.LossConfig(device=torch.device("cpu"), ops=("ce",), dtypes=("fp32",),
    ...                        shapes={"ce": [(64, 1000)]}, budget_s=0.05)
    >>> rows = ce.run(config)  # doctest: +SKIP
"""

from __future__ import annotations

import gc
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from fused_optim import reference
from fused_optim.tools.bench.peers import Impl, derive, not_installed, our_implementations
from fused_optim.tools.bench.registry import Benchmark
from fused_optim.tools.bench.timing import error_note, release_memory, synchronize, time_fn

OPS = ("ce", "linear_ce")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DEFAULT_DTYPES = {"cpu": ("fp32",), "cuda": ("bf16", "fp32")}
# ce: (N rows, V classes). CPU: 4096 × 32000 fp32 logits are 524 MB, far past the cache (the size). GPU:
# 8192 tokens of Llama 3's 128256-word vocabulary: 2.1 GB of bf16 logits, far past an H100's 50 MB L2.
# linear_ce: (N rows, H hidden, V classes); the naive peer holds (N, V) logits (CPU: 1 GB fp32; GPU: 2-4 GB).
SHAPES = {
    "ce": {"cpu": [(4096, 32000)], "cuda": [(8192, 128256)]},
    "linear_ce": {"cpu": [(8192, 512, 32000)], "cuda": [(8192, 4096, 128256)]},
}
QUICK_SHAPES = {
    "ce": {"cpu": [(1024, 32000)], "cuda": [(4096, 32000)]},
    "linear_ce": {"cpu": [(1024, 256, 8000)], "cuda": [(4096, 2048, 32000)]},
}
LOGIT_STD = 2.0  # the logits' spread (an LM's are a few units): exp() sees a realistic range
CHECK_ROWS = 1024  # linear_ce is checked on its first CHECK_ROWS rows
# Largest |error| relative to |reference| (loss) or to the largest |reference| value (gradients), against float64.
# fp32: the kernels and torch are ~1e-7 apart from float64 (the GEMMs of linear_ce ~1e-6). bf16: the loss is rounded
# to bf16, whose ulp is 2^-8..2^-7 relative: two ulps allowed; the gradients are rounded once (2^-9 relative), and
# the GEMMs of linear_ce read bf16 inputs.
TOLERANCES = {
    "ce": {"fp32": {"loss": 1e-5, "grad": 1e-5}, "bf16": {"loss": 1.6e-2, "grad": 8e-3}},
    "linear_ce": {"fp32": {"loss": 1e-5, "grad": 1e-4}, "bf16": {"loss": 1.6e-2, "grad": 3e-2}},
}
BASELINE = {"ce": "torch eager", "linear_ce": "torch chunked"}  # the peer of the × column


def ce_bytes(n_rows: int, n_classes: int, dtype: torch.dtype) -> int:
    """The fewest bytes cross-entropy forward + backward moves: read the logits once, write the gradient once.

    >>> ce_bytes(4096, 32000, torch.bfloat16) == 4 * 4096 * 32000
    True
    """
    return 2 * n_rows * n_classes * dtype.itemsize


def linear_ce_flops(n_rows: int, hidden: int, n_classes: int) -> int:
    """Flops of linear + cross-entropy forward + backward: the logits GEMM and the two gradient GEMMs."""
    return 3 * 2 * n_rows * hidden * n_classes


@dataclass
class Workload:
    """One case's inputs (read-only: every implementation makes its own leaves from copies of them)."""

    op: str
    case: str  # "fp32" or "bf16"
    device: torch.device
    target: Tensor  # (N,) int64
    logits: Tensor | None = None  # ce: (N, V)
    input: Tensor | None = None  # linear_ce: (N, H)
    linear_weight: Tensor | None = None  # linear_ce: (V, H)

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.case]

    @property
    def shape(self) -> tuple[int, ...]:
        if self.op == "ce":
            return tuple(self.logits.shape)
        return (self.input.shape[0], self.input.shape[1], self.linear_weight.shape[0])

    def first_rows(self, n: int) -> Workload:
        if self.op == "ce" or n >= self.target.shape[0]:
            return self
        return Workload(self.op, self.case, self.device, self.target[:n], input=self.input[:n],
                        linear_weight=self.linear_weight)


def make_workload(op: str, case: str, shape: tuple[int, ...], device: torch.device, seed: int = 0) -> Workload:
    generator = torch.Generator(device=device).manual_seed(seed)

    def randn(*size, std):
        return torch.randn(size, generator=generator, device=device).mul_(std).to(DTYPES[case])
    n_rows, n_classes = shape[0], shape[-1]
    target = torch.randint(0, n_classes, (n_rows,), generator=generator, device=device)
    if op == "ce":
        return Workload(op, case, device, target, logits=randn(n_rows, n_classes, std=LOGIT_STD))
    hidden = shape[1]
    # x ~ N(0, 1), w ~ N(0, std²/H): the logits x·wᵀ have the spread LOGIT_STD, as in the ce case
    return Workload(op, case, device, target, input=randn(n_rows, hidden, std=1.0),
                    linear_weight=randn(n_classes, hidden, std=LOGIT_STD / hidden**0.5))


class Unavailable(Exception):
    """An implementation that cannot run here, found out only when built (a torch.compile that fails)."""


class Runner:
    """One implementation on a workload: `step()` = grads to None, loss, loss.backward(); `result()` = the last
    step's (loss, gradients of the leaves)."""

    def __init__(self, loss_fn: Callable[..., Tensor], leaves: list[Tensor], args: tuple) -> None:
        self.loss_fn, self.leaves, self.args = loss_fn, leaves, args
        self.loss: Tensor | None = None

    def step(self) -> None:
        for leaf in self.leaves:
            leaf.grad = None
        loss = self.loss_fn(*self.args)
        loss.backward()
        self.loss = loss.detach()

    def clear(self) -> None:
        for leaf in self.leaves:
            leaf.grad = None
        self.loss = None

    def result(self) -> tuple[Tensor | None, list[Tensor | None]]:
        return self.loss, [leaf.grad for leaf in self.leaves]


def _runner(loss_fn: Callable[..., Tensor]) -> Callable[[Workload], Runner]:
    """ce: loss_fn(logits, target); linear_ce: loss_fn(input, linear_weight, target). The leaves are copies of the
    workload's tensors: an implementation that writes its gradient over its input (Liger-Kernel's cross-entropy
    does) must not change what the next one reads."""
    def build(w: Workload) -> Runner:
        if w.op == "ce":
            logits = w.logits.clone().requires_grad_()
            return Runner(loss_fn, [logits], (logits, w.target))
        x, weight = w.input.clone().requires_grad_(), w.linear_weight.clone().requires_grad_()
        return Runner(loss_fn, [x, weight], (x, weight, w.target))
    return build


def _compiled(loss_fn: Callable[..., Tensor]) -> Callable[[Workload], Runner]:
    """torch.compile of `loss_fn` (static shapes); a compile that fails makes the peer absent, not an error."""
    def build(w: Workload) -> Runner:
        runner = _runner(torch.compile(loss_fn, dynamic=False))(w)
        try:
            runner.step()  # compiles forward and backward
        except Exception as error:  # noqa: BLE001
            raise Unavailable(f"absent (torch.compile failed: {type(error).__name__}: "
                              f"{str(error).strip().splitlines()[0] if str(error).strip() else ''})") from error
        runner.clear()
        return runner
    return build


def _ours(op: str, backend: str) -> Callable[[Workload], Runner]:
    import fused_optim.functional as FF

    if op == "ce":
        return _runner(lambda logits, target: FF.cross_entropy(logits, target, backend=backend))
    return _runner(lambda x, weight, target: FF.linear_cross_entropy(x, weight, target, backend=backend))


def _naive_linear_ce(x: Tensor, weight: Tensor, target: Tensor) -> Tensor:
    return F.cross_entropy(x @ weight.t(), target)


def _torch_chunked_linear_ce(x: Tensor, weight: Tensor, target: Tensor) -> Tensor:
    return F.linear_cross_entropy(x, weight, target, options=torch.nn.LinearCrossEntropyOptions())


def _liger(op: str, device: torch.device) -> Impl:
    name = "Liger-Kernel"
    missing = not_installed("liger_kernel", "liger-kernel")
    if missing is not None:
        return Impl(name, None, unavailable=missing)
    if device.type != "cuda":
        return Impl(name, None, unavailable="absent (Liger-Kernel's Triton kernels need a CUDA GPU)")
    from liger_kernel.transformers import LigerCrossEntropyLoss, LigerFusedLinearCrossEntropyLoss

    if op == "ce":
        return Impl(name, _runner(LigerCrossEntropyLoss()))
    loss = LigerFusedLinearCrossEntropyLoss()  # forward(lin_weight, _input, target)
    return Impl(name, _runner(lambda x, weight, target: loss(weight, x, target)))


def implementations(op: str, device: torch.device) -> list[Impl]:
    """The implementations compared in `op` on `device`, usable or not (with the reason)."""
    impls = our_implementations(device, lambda backend: _ours(op, backend))
    if op == "ce":
        impls.append(Impl("torch eager", _runner(F.cross_entropy), baseline=True))
        impls.append(Impl("torch.compile", _compiled(F.cross_entropy)))
    else:
        chunked = hasattr(torch.nn, "LinearCrossEntropyOptions")
        if chunked:
            impls.append(Impl("torch chunked", _runner(_torch_chunked_linear_ce), baseline=True))
        else:
            impls.append(Impl("torch chunked", None, unavailable=f"absent (torch {torch.__version__} has no "
                              "chunked F.linear_cross_entropy; torch 2.14+)"))
        impls.append(Impl("torch naive", _runner(_naive_linear_ce), baseline=not chunked))
        if device.type == "cuda":
            impls.append(Impl("torch.compile naive", _compiled(_naive_linear_ce)))
    impls.append(_liger(op, device))
    return impls


@dataclass
class LossConfig:
    """What `run` measures. `shapes[op]`: ce (N, V), linear_ce (N, H, V) (default: SHAPES for the device);
    `budget_s`: seconds spent timing each implementation; an implementation whose timing would take longer than
    `max_time_s` (from one call) is not timed."""

    device: torch.device
    ops: tuple[str, ...] = OPS
    dtypes: tuple[str, ...] | None = None
    shapes: dict[str, list[tuple[int, ...]]] = field(default_factory=dict)
    quick: bool = False
    budget_s: float = 1.5
    max_time_s: float = 120.0
    check_rows: int = CHECK_ROWS
    measure_memory: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        self.dtypes = tuple(self.dtypes or DEFAULT_DTYPES[self.device.type])
        defaults = QUICK_SHAPES if self.quick else SHAPES
        self.shapes = {op: [tuple(s) for s in self.shapes.get(op) or defaults[op][self.device.type]]
                       for op in self.ops}

    def describe(self) -> dict[str, Any]:
        """The configuration as the JSON report records it."""
        return {op: {"shapes": self.shapes[op], "dtypes": list(self.dtypes), "tolerances": TOLERANCES[op],
                     "baseline": BASELINE[op], "logit_std": LOGIT_STD, "budget_s": self.budget_s,
                     **({"check_rows": self.check_rows} if op == "linear_ce" else {})} for op in self.ops}


def plan(config: LossConfig) -> list[tuple[str, str, tuple[int, ...]]]:
    """The (op, dtype, shape) triples `run` measures, in order."""
    return [(op, case, shape) for op in config.ops for case in config.dtypes for shape in config.shapes[op]]


def count_tasks(config: LossConfig) -> int:
    return sum(1 + len(implementations(op, config.device)) for op, _, _ in plan(config))


def run(config: LossConfig, roof_gbps: float | None = None,
        on_task: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Measures every (op, dtype, shape) × implementation of `config`; one row (a dict) per pair."""
    rows = []
    for op, case, shape in plan(config):
        rows += _run_case(config, op, case, shape, roof_gbps, on_task or (lambda description: None))
    return rows


def _shape_text(op: str, shape: tuple[int, ...]) -> str:
    return "×".join(map(str, shape)) if op == "ce" else f"{shape[0]}×{shape[1]}→{shape[2]}"


def _run_case(config: LossConfig, op: str, case: str, shape: tuple[int, ...], roof_gbps: float | None,
              on_task: Callable[[str], None]) -> list[dict[str, Any]]:
    device = config.device
    w = make_workload(op, case, shape, device, config.seed)
    check_w = w.first_rows(config.check_rows)
    expected = reference_result(check_w)
    label = f"{op} {case} {_shape_text(op, shape)}"
    on_task(f"{label}: float64 reference")

    rows = []
    for impl in implementations(op, device):
        row = _row(op, case, impl, w)
        rows.append(row)
        runner = None
        try:
            if impl.unavailable is not None:
                row["note"] = impl.unavailable
                continue
            runner = impl.build(check_w)
            runner.step()
            _check(op, case, runner, expected, row)
            if not row["correct"]:
                continue
            if check_w is not w:
                runner = None
                gc.collect()
                runner = impl.build(w)
            _measure(config, op, case, shape, impl, runner, row)
        except Unavailable as error:
            row["note"] = str(error)
        except Exception as error:  # noqa: BLE001  (one failing peer must not end the benchmark)
            row["note"] = error_note(error)
        finally:
            runner = None
            release_memory(device)
            on_task(f"{label}: {impl.name}")
    derive(rows, roof_gbps)
    return rows


def _row(op: str, case: str, impl: Impl, w: Workload) -> dict[str, Any]:
    shape = w.shape
    return {
        "op": op,
        "case": case,
        "impl": impl.name,
        "auto": impl.auto,
        "baseline": impl.baseline,
        "dtype": str(w.dtype).replace("torch.", ""),
        "shape": _shape_text(op, shape),
        "n_rows": shape[0],
        "hidden": shape[1] if op == "linear_ce" else None,
        "n_classes": shape[-1],
        "device": str(w.device),
        "time_ms_median": None,
        "time_ms_iqr": None,
        "n_timed": None,
        "time_ms_estimate": None,
        "bytes": ce_bytes(shape[0], shape[1], w.dtype) if op == "ce" else None,
        "gbps": None,
        "pct_of_roof": None,
        "flops": linear_ce_flops(*shape) if op == "linear_ce" else None,
        "tflops": None,
        "speedup_vs_baseline": None,
        "speedup_vs": None,
        "peak_mem": None,
        "peak_mem_method": None,
        "correct": None,
        "loss_rel_err": None,
        "grad_rel_err": None,
        "checked_rows": None,
        "note": "",
    }


def _row_chunks(n_rows: int, n_cols: int, max_elements: int = 1 << 24):
    step = max(1, max_elements // max(1, n_cols))
    for start in range(0, n_rows, step):
        yield start, min(start + step, n_rows)


def reference_result(w: Workload) -> tuple[float, list[Tensor]]:
    """(loss, gradients as fp32) of `w` by `fused_optim.reference.cross_entropy` in float64, reduction "mean"
    (no target is ignored and there are no class weights, so "mean" divides by N)."""
    n_rows = w.target.shape[0]
    if w.op == "ce":
        grad = torch.empty(w.logits.shape, dtype=torch.float32, device=w.device)
        total = torch.zeros((), dtype=torch.float64, device=w.device)
        for start, end in _row_chunks(n_rows, w.logits.shape[1]):
            z = w.logits[start:end].double().requires_grad_()
            loss_sum, _ = reference.cross_entropy(z, w.target[start:end], reduction="sum")
            loss_sum.backward()
            grad[start:end] = z.grad / n_rows
            total += loss_sum.detach()
        return float(total) / n_rows, [grad]
    x, weight = w.input.double().requires_grad_(), w.linear_weight.double().requires_grad_()
    loss, _ = reference.cross_entropy(x @ weight.t(), w.target)
    loss.backward()
    return float(loss.detach()), [x.grad.float(), weight.grad.float()]


def max_rel_error(result: Tensor, expected: Tensor) -> float:
    """max |result - expected| / max |expected|, walked in row chunks (no full-size temporaries)."""
    worst = scale = 0.0
    result2, expected2 = result.reshape(result.shape[0], -1), expected.reshape(expected.shape[0], -1)
    for start, end in _row_chunks(*result2.shape):
        a, b = result2[start:end].float(), expected2[start:end]
        worst = max(worst, float((a - b).abs().max()))
        scale = max(scale, float(b.abs().max()))
    return worst / scale if scale else worst


def _check(op: str, case: str, runner: Runner, expected: tuple[float, list[Tensor]], row: dict[str, Any]) -> None:
    expected_loss, expected_grads = expected
    loss, grads = runner.result()
    tolerance = TOLERANCES[op][case]
    row["checked_rows"] = expected_grads[0].shape[0]
    if any(g is None for g in grads):
        row.update(correct=False, note="wrong: no gradient computed: not timed")
        return
    loss_err = abs(float(loss) - expected_loss) / abs(expected_loss)
    grad_err = max(max_rel_error(g, e) for g, e in zip(grads, expected_grads))
    ok = loss_err <= tolerance["loss"] and grad_err <= tolerance["grad"]  # NaN fails both
    row.update(correct=ok, loss_rel_err=loss_err, grad_rel_err=grad_err)
    if not ok:
        row["note"] = (f"wrong result (loss {loss_err:.2g}, grad {grad_err:.2g} relative error vs float64; "
                       f"tolerance {tolerance['loss']:g}, {tolerance['grad']:g}): not timed")


def _measure(config: LossConfig, op: str, case: str, shape: tuple[int, ...], impl: Impl, runner: Runner,
             row: dict[str, Any]) -> None:
    device = config.device
    synchronize(device)
    t0 = time.perf_counter()
    runner.step()  # linear_ce: the first call at full size; ce: one more warm-up
    synchronize(device)
    step_s = time.perf_counter() - t0
    if step_s * 7 > config.max_time_s:
        row["time_ms_estimate"] = step_s * 1e3
        row["note"] = f"not timed: {step_s:.1f} s/call (> {config.max_time_s:.0f} s for 7 calls)"
        return
    timing = time_fn(runner.step, device, config.budget_s)
    row.update(time_ms_median=timing.median_ms, time_ms_iqr=timing.iqr_ms, n_timed=timing.n)
    if not config.measure_memory:
        return
    if device.type == "cuda":
        runner.clear()
        gc.collect()
        synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        runner.step()
        synchronize(device)
        row.update(peak_mem=torch.cuda.max_memory_allocated(device) - base, peak_mem_method="cuda max_allocated")
    elif op == "linear_ce":
        runner.clear()  # frees this process's gradients while the child runs
        try:
            peak, method = peak_memory_in_subprocess(impl.name, op, case, shape, config.seed)
            row.update(peak_mem=peak, peak_mem_method=method)
        except RuntimeError as error:
            row["note"] = f"peak memory not measured: {error}"


# ---- peak memory on the CPU: one fresh process per implementation (module docstring) ----

def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {key} in /proc/self/status")


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _max_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def _peak_memory_child() -> None:
    """Runs in the subprocess: one call of the implementation named in argv[1]'s JSON; prints its peak extra RSS."""
    spec = json.loads(sys.argv[1])
    torch.set_num_threads(spec["threads"])
    device = torch.device("cpu")
    impl = next(i for i in implementations(spec["op"], device) if i.name == spec["impl"])
    small = (64, 32, 1000) if spec["op"] == "linear_ce" else (64, 1000)
    impl.build(make_workload(spec["op"], spec["case"], small, device)).step()  # warm-up: code, thread pool
    gc.collect()
    runner = impl.build(make_workload(spec["op"], spec["case"], tuple(spec["shape"]), device, spec["seed"]))
    gc.collect()
    if os.path.exists("/proc/self/status") and _reset_peak_rss():
        before = _status_kib("VmRSS") * 1024
        runner.step()
        peak, method = _status_kib("VmHWM") * 1024, "peak RSS (VmHWM after clear_refs), fresh process"
    else:
        before = _max_rss_bytes()
        runner.step()
        peak, method = _max_rss_bytes(), "ru_maxrss, fresh process (an upper bound)"
    print(json.dumps({"peak_extra": peak - before, "method": method}))


def peak_memory_in_subprocess(impl_name: str, op: str, case: str, shape: tuple[int, ...], seed: int = 0,
                              timeout_s: float = 600) -> tuple[int, str]:
    """(bytes one call of `impl_name` allocates beyond its inputs, the method), measured in a fresh process."""
    import fused_optim

    package_root = os.path.dirname(os.path.dirname(os.path.abspath(fused_optim.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
    spec = {"impl": impl_name, "op": op, "case": case, "shape": list(shape), "seed": seed,
            "threads": torch.get_num_threads()}
    code = "from fused_optim.tools.bench.cross_entropy import _peak_memory_child; _peak_memory_child()"
    try:
        done = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True,
                              env=env, timeout=timeout_s)
    except subprocess.TimeoutExpired as error:
        raise RuntimeError(f"the measuring process ran past {timeout_s:.0f} s") from error
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or [f"exit {done.returncode}"]
        raise RuntimeError(f"the measuring process failed: {tail[0]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return int(result["peak_extra"]), result["method"]


CAPTIONS = {
    "ce": "ms: median time of forward + backward (a fresh gradient each call); GB/s by the bytes model (read the "
          "logits once + write their gradient once = 2·N·V·itemsize); % of the roof; × = torch eager's time / this "
          "one's; vs peers: ours' speed-up over each; peak mem (GPU): what a call allocates beyond its inputs.",
    "linear_ce": "ms: median time of forward + backward (gradients of input and weight); GEMM-bound, so no bytes "
                 "model: TFLOP/s counts the three GEMMs (6·N·H·V); × = torch chunked's time / this one's; vs "
                 "peers: ours' speed-up over each; peak mem: what one call allocates beyond its inputs, gradients "
                 "included (GPU: max_memory_allocated; CPU: peak RSS in a fresh process).",
}


BENCHMARK = Benchmark(
    ops=OPS, count_tasks=count_tasks, run=run,
    configure=lambda request: LossConfig(device=request.device, ops=request.selected(OPS), dtypes=request.dtypes,
                                         shapes=request.shapes or {}, quick=request.quick, budget_s=request.budget_s),
)
