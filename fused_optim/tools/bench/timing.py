"""Timing and the memory roof, on the CPU and on a CUDA GPU (docs/design.md, Benchmarks).

- GPU: `triton.testing.do_bench` (CUDA events around each call, L2 flushed before each) → the 25th, 50th and 75th
  percentiles; without Triton, the same with a plain CUDA-event loop.
- CPU: warm-up, then each call timed alone with `time.perf_counter` → median and IQR. (`torch.utils.benchmark`
  would do as well but runs on one thread unless told otherwise, and imports the C++ extension builder.)
- Host overhead: `time.perf_counter` around a call that is not synchronised, the device queue drained between
  timed calls so that a full launch queue never blocks the host inside the timed region.
- Roof: on a GPU, a large device-to-device `copy_` (read + write bytes); on the CPU, the STREAM triad of the
  CPU extension (`a = b + s·c`, 12 bytes/element) on all intra-op threads — torch's `copy_` is no roof there.
"""

from __future__ import annotations

import gc

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch


@dataclass
class Timing:
    """Milliseconds per call: the median and the interquartile range, from `n` timed calls (None: not known)."""

    median_ms: float
    q25_ms: float
    q75_ms: float
    n: int | None = None

    @property
    def iqr_ms(self) -> float:
        return self.q75_ms - self.q25_ms

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "iqr_ms": self.iqr_ms}


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _quartiles(samples_ms: list[float]) -> Timing:
    if len(samples_ms) == 1:
        return Timing(samples_ms[0], samples_ms[0], samples_ms[0], 1)
    q25, q50, q75 = statistics.quantiles(samples_ms, n=4, method="inclusive")
    return Timing(q50, q25, q75, len(samples_ms))


def time_cpu(fn: Callable[[], Any], min_time_s: float = 1.0, warmup: int = 2, min_reps: int = 5,
             max_reps: int = 200) -> Timing:
    """Median/IQR of `fn()` on the CPU: `warmup` untimed calls, then enough timed ones to fill `min_time_s`
    (between `min_reps` and `max_reps`), each timed alone."""
    start = time.perf_counter()
    for _ in range(max(warmup, 1)):
        fn()
    estimate = (time.perf_counter() - start) / max(warmup, 1)
    reps = int(min(max_reps, max(min_reps, min_time_s / max(estimate, 1e-9))))
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return _quartiles(samples)


def best_time_cpu(fn: Callable[[], Any], calls: int, repeats: int) -> float:
    """Seconds per call of `fn()` on the CPU, the least of `repeats` timings of `calls` calls in a row, after one
    untimed call: for a loop over data in cache, whose best run shows its own cost (benchmarks/cpu_*.py)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def time_cuda(fn: Callable[[], Any], warmup_ms: float = 25, rep_ms: float = 200) -> Timing:
    """Median/IQR of `fn()` on the current CUDA device, by CUDA events (`triton.testing.do_bench`)."""
    try:
        from triton.testing import do_bench
    except ImportError:
        return _time_cuda_events(fn, warmup_ms, rep_ms)
    # `quantiles` (Triton >= 2.1; 3.6 and 3.8 alike) returns the percentiles of the per-call times and ignores
    # return_mode; do_bench flushes L2 before each call, so a step never starts with its tensors in cache.
    q25, q50, q75 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.25, 0.5, 0.75])
    return Timing(float(q50), float(q25), float(q75), None)


def _time_cuda_events(fn: Callable[[], Any], warmup_ms: float, rep_ms: float) -> Timing:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        fn()
    end.record()
    torch.cuda.synchronize()
    estimate = max(start.elapsed_time(end) / 3, 1e-3)
    for _ in range(max(1, int(warmup_ms / estimate))):
        fn()
    reps = max(5, int(rep_ms / estimate))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for begin, finish in events:
        begin.record()
        fn()
        finish.record()
    torch.cuda.synchronize()
    return _quartiles([begin.elapsed_time(finish) for begin, finish in events])


def time_fn(fn: Callable[[], Any], device: torch.device | str, budget_s: float = 1.0) -> Timing:
    """Median/IQR per call of `fn` on `device`, spending about `budget_s` seconds timing it."""
    if torch.device(device).type == "cuda":
        return time_cuda(fn, warmup_ms=min(100.0, 250 * budget_s), rep_ms=1e3 * budget_s)
    return time_cpu(fn, min_time_s=budget_s)


def host_time(fn: Callable[[], Any], device: torch.device | str, steps: int = 200, warmup: int = 10,
              drain_every: int = 10) -> Timing:
    """Host (CPU) milliseconds spent inside `fn()` per call, without synchronising inside the timed region. On a
    GPU the device is drained every `drain_every` calls, outside the timed region, so a full launch queue never
    blocks a timed call (the time measured is the host's own: Python, dispatch, launches)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples = []
    for i in range(steps):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
        if (i + 1) % drain_every == 0:
            synchronize(device)
    synchronize(device)
    return _quartiles(samples)


def memory_roof(device: torch.device | str, n_elements: int | None = None, budget_s: float = 1.0) -> dict[str, Any]:
    """The streaming bandwidth this device's memory reaches, measured now.

    CUDA: `dst.copy_(src)` over 2**28 fp32 elements (1 GiB each way), counting read + write (8 bytes/element).
    CPU: `fused_optim.ops.triad.triad_` (a = b + s·c, OpenMP) over 2**26 fp32 elements (768 MiB in all, far past
    any cache), counting 3 arrays (12 bytes/element, STREAM's convention: no write-allocate traffic). Also
    reported on the CPU, not used as the roof: torch's `copy_` bandwidth (docs/design.md: it is no roof there).
    """
    device = torch.device(device)
    if device.type == "cuda":
        n = n_elements or 2**28
        src = torch.ones(n, device=device)
        dst = torch.empty_like(src)
        timing = time_cuda(lambda: dst.copy_(src), rep_ms=1e3 * budget_s)
        bytes_moved = 8 * n
        roof = {"kind": "copy", "bytes_per_element": 8}
        del src, dst
    else:
        from fused_optim import _backend
        from fused_optim.ops.triad import triad_

        error = _backend.extension_error("cpu")
        if error is not None:
            raise RuntimeError(f"the CPU roof needs the triad of the CPU extension, which is {error}.")
        n = n_elements or 2**26
        a, b, c = torch.zeros(n), torch.ones(n), torch.full((n,), 2.0)  # touched now: no page faults when timed
        timing = time_cpu(lambda: triad_(a, b, c, 0.5), min_time_s=budget_s, warmup=3, min_reps=10)
        bytes_moved = 12 * n
        copy_timing = time_cpu(lambda: a.copy_(b), min_time_s=budget_s / 2, warmup=2, min_reps=5)
        roof = {
            "kind": "triad",
            "bytes_per_element": 12,
            "threads": torch.get_num_threads(),
            "copy_gbps": 8 * n / (copy_timing.median_ms * 1e6),
        }
        del a, b, c
    roof.update(
        n_elements=n,
        bytes=bytes_moved,
        time_ms_median=timing.median_ms,
        time_ms_iqr=timing.iqr_ms,
        gbps=bytes_moved / (timing.median_ms * 1e6),
    )
    return roof


def error_note(error: BaseException) -> str:
    """The note of a peer that failed: its exception type and the first line of its message."""
    message = str(error).strip()
    return f"error: {type(error).__name__}: {message.splitlines()[0] if message else ''}"


def release_memory(device: torch.device) -> None:
    """Frees what the previous implementation left, so the next one's time and peak memory are its own."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
