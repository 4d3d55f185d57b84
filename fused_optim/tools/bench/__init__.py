"""fused_optim.tools.bench: the measurement core behind `fused-optim bench` (docs/design.md, Benchmarks).

Each op reports its time beside its peers, its bandwidth by a bytes model (the fewest bytes the op must move) and
that bandwidth as % of the memory roof measured at the start of the same run: a large device-to-device `copy_` on a
GPU, the CPU extension's STREAM triad on the CPU. Every implementation is checked against a reference before it is
timed; a wrong one is not timed. The ops:

    adamw       one AdamW step (fused_optim/tools/bench/adamw.py): torch fused / foreach / for-loop, DeepSpeed CPUAdam
    adam        one Adam step, L2 weight decay coupled into the grad (same file; adamw's cases except bf16): torch's
                Adam
    ce          cross-entropy forward + backward (fused_optim/tools/bench/cross_entropy.py): torch eager, torch.compile,
                Liger-Kernel
    linear_ce   linear + cross-entropy forward + backward (same file): torch's chunked F.linear_cross_entropy, the
                naive F.cross_entropy(x @ w.T, y) (compiled too on a GPU), Liger-Kernel; time and peak memory
    accumulate  fp32 main grads += bf16/fp32 grads (fused_optim/tools/bench/accumulate.py): torch's add_ loop and
                _foreach_add_, one large tensor and 2,000 small ones
    clip_adamw  unscale + clip + AdamW (fused_optim/tools/bench/clip_adamw.py): AdamW(max_grad_norm) with our GradScaler
                vs torch's GradScaler.unscale_ + clip_grad_norm_ + fused AdamW
    sgd         one SGD step with momentum (tools/bench/sgd.py): torch fused / foreach / for-loop, apex FusedSGD
    lion        one Lion step (tools/bench/lion.py): a torch foreach Lion, lion-pytorch
    fsdp_adamw, fsdp_clip_adamw
                one AdamW step (with clipping) of an FSDP2-sharded model in spawned ranks (tools/bench/fsdp.py:
                2 gloo ranks on the CPU, one NCCL rank per GPU): torch fused AdamW (+ clip_grad_norm_) on the same
                mesh, with the collectives each step issues

Optional peers (DeepSpeed CPUAdam, Liger-Kernel, apex) that are not installed have a row saying "absent"; the report
lists them under "absent_peers". `fused_optim.tools.bench.plot.write_plot` draws a report's GB/s as a PNG.

The shared parts (implementations, check-then-time loop, derived columns) are in fused_optim/tools/bench/peers.py;
registry.py says what a benchmark module declares (BENCHMARKS below lists them), so `run_benchmarks` is one loop.

    >>> import tempfile, fused_optim.tools.bench
    >>> report = fused_optim.tools.bench.run_benchmarks(device="cpu", sizes=[1_000_000], cases=("fp32",), quick=True)
    >>> fused_optim.tools.bench.print_table(report)  # doctest: +SKIP
    >>> fused_optim.tools.bench.write_json(report, tempfile.mktemp(suffix=".json"))
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
from typing import Any, Callable

import torch

from fused_optim import _backend
from fused_optim.tools.bench import accumulate, adamw, clip_adamw, cross_entropy, fsdp, lion, sgd
from fused_optim.tools.bench.registry import Request
from fused_optim.tools.bench.timing import Timing, host_time, memory_roof, time_cpu, time_cuda, time_fn

__all__ = [
    "OPS", "Timing", "default_sizes", "host_time", "memory_roof", "parse_shape", "parse_size", "print_table",
    "run_benchmarks", "time_cpu", "time_cuda", "time_fn", "write_json",
]

# Every benchmark, in the order a run takes them (registry.py), and the ops `fused-optim bench --ops` knows.
BENCHMARKS = (*adamw.BENCHMARKS, cross_entropy.BENCHMARK, accumulate.BENCHMARK, clip_adamw.BENCHMARK, sgd.BENCHMARK,
              lion.BENCHMARK,
              fsdp.BENCHMARK)
OPS = tuple(op for benchmark in BENCHMARKS for op in benchmark.ops)


def parse_size(text: str) -> int:
    """'84M' → 84_000_000; also K, G (or B) and plain integers; '1.5G' → 1_500_000_000."""
    text = text.strip().upper().replace("_", "")
    scale = {"K": 10**3, "M": 10**6, "G": 10**9, "B": 10**9}.get(text[-1:], 1)
    number = text[:-1] if scale != 1 else text
    try:
        value = float(number) * scale
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 1 or value != int(value):
        raise ValueError(f"not a size: {text!r} (a count such as 84M, 1.5G or 4096, or shapes such as 4096x32000)")
    return int(value)


def parse_shape(text: str) -> tuple[int, ...]:
    """'4096x32000' → (4096, 32000) (also '×' or '*' between the sizes, each as `parse_size` reads it); '84M' →
    (84_000_000,)."""
    parts = text.strip().lower().replace("×", "x").replace("*", "x").split("x")
    return tuple(parse_size(part) for part in parts)


def default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def default_sizes(device: torch.device, quick: bool = False) -> list[int]:
    return Request(ops=(), device=device, quick=quick).default_sizes()


def cpu_isa() -> str:
    """The widest vector ISA this CPU has of those the CPU kernels are built for: a CPU figure holds for its ISA
    only (an AVX2 EPYC and an AVX-512 one share a name)."""
    flags = _backend.cpu_info()[1] or frozenset()
    for isa, needs in (("avx512_bf16", {"avx512f", "avx512_bf16"}), ("avx512", {"avx512f"}), ("avx2", {"avx2"}),
                       ("neon", {"asimd"})):
        if needs <= flags:
            return isa
    return platform.machine() or "unknown"


def cpu_description() -> str:
    """The CPU: its model name, its CPUID family/model/stepping where /proc/cpuinfo has them (a VM may name a Zen 1
    and a Zen 4 both "AMD EPYC") and its widest ISA: "AMD EPYC (family 25 model 17 stepping 0; avx512_bf16)"."""
    ids = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = (part.strip() for part in line.partition(":"))
                if key in ("cpu family", "model", "stepping") and key not in ids:
                    ids[key] = value
    except OSError:
        pass
    cpuid = f"family {ids['cpu family']} model {ids['model']} stepping {ids['stepping']}; " if len(ids) == 3 else ""
    return f"{_backend.cpu_name()} ({cpuid}{cpu_isa()})"


def device_name(device: torch.device) -> str:
    """The GPU's name; or the CPU (cpu_description), the level of the CPU kernels loaded (FUSED_OPTIM_CPU_ISA may
    pick one narrower than the CPU's) and the thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    kernels = f"{_backend.cpu_isa()} kernels" if _backend.cpu_isa() else "no CPU kernels loaded"
    return f"{cpu_description()}, {kernels}, {torch.get_num_threads()} threads"


def run_benchmarks(ops: tuple[str, ...] = OPS, device: torch.device | str | None = None,
                   sizes: list[int] | None = None, cases: tuple[str, ...] | None = None, quick: bool = False,
                   on_task: Callable[[str], None] | None = None,
                   on_plan: Callable[[int], None] | None = None, dtypes: tuple[str, ...] | None = None,
                   shapes: dict[str, list[tuple[int, ...]]] | None = None) -> dict[str, Any]:
    """Measures the roof, then each op's cases on `device` (default: the GPU when there is one). Returns the
    report that `print_table` and `write_json` take. `on_plan(total_tasks)` is called once before the first task,
    `on_task(description)` after each (a progress bar's hooks).

    adamw, adam: `sizes` (total params) and `cases`. ce, linear_ce: `dtypes` ("fp32", "bf16"; default fp32 on the CPU,
    both on a GPU) and `shapes` ({"ce": [(N, V)], "linear_ce": [(N, H, V)]}; default: the op's sizes).
    accumulate: `sizes` (elements of the one-tensor case; the 2000×4096 case always runs) and `dtypes` (the grads';
    default both). clip_adamw, sgd, lion: `sizes` (total fp32 params)."""
    import fused_optim

    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    for op in ops:
        if op not in OPS:
            raise ValueError(f"unknown op {op!r}; known: {', '.join(OPS)}")
    request = Request(ops=tuple(ops), device=device, sizes=sizes, cases=cases, quick=quick, dtypes=dtypes,
                      shapes=shapes, budget_s=0.25 if quick else 1.5)
    selected = [(benchmark, benchmark.configure(request)) for benchmark in BENCHMARKS
                if request.selected(benchmark.ops)]
    if on_plan is not None:
        on_plan(1 + sum(benchmark.count_tasks(config) for benchmark, config in selected))
    report_task = on_task or (lambda description: None)
    try:
        roof = memory_roof(device, budget_s=0.5 if quick else 2.0)
        report_task(f"roof ({roof['kind']}): {roof['gbps']:.1f} GB/s")
    except RuntimeError as error:  # no CPU extension: no triad; the rest still runs, without % of roof
        roof = {"kind": "none", "gbps": None, "note": str(error)}
        report_task("roof: not measured")
    rows: list[dict[str, Any]] = []
    run_config: dict[str, Any] = {"ops": list(ops), "quick": quick}
    for benchmark, config in selected:
        rows += benchmark.run(config, roof_gbps=roof["gbps"], on_task=on_task)
        run_config.update(benchmark.describe(config))
    info = fused_optim.backends()
    return {
        "schema": 1,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(device),
        "device_type": device.type,
        "versions": {**info["versions"], "fused_optim": fused_optim.__version__},
        "backends": info,
        "cpu_threads": torch.get_num_threads(),
        "cpu_isa": cpu_isa(),
        # Other processes on the machine slow the CPU benchmarks (torch's per-tensor OpenMP regions most of all):
        # the 1-minute load average before and after the run says whether the machine was quiet.
        "load_avg": {"before": load_before, "after": os.getloadavg()[0] if hasattr(os, "getloadavg") else None},
        "config": run_config,
        "roof": roof,
        "absent_peers": absent_peers(rows),
        "rows": rows,
    }


def absent_peers(rows: list[dict[str, Any]]) -> list[dict[str, str]]:
    """The peers that could not run here (optional ones not installed, torch features this torch or device lacks),
    once per op and peer: {"op", "impl", "why"} (their rows' note, "absent (...)"). Our own backends that are absent
    are not peers: their rows say so."""
    absent: dict[tuple[str, str], str] = {}
    for r in rows:
        if not r["impl"].startswith("fused_optim") and r["note"].startswith("absent"):
            absent.setdefault((r["op"], r["impl"]), r["note"])
    return [{"op": op, "impl": impl, "why": why} for (op, impl), why in absent.items()]


def finite_json(value: Any) -> Any:
    """`value` with every NaN or ±inf float (a wrong implementation's max_abs_err, say) replaced by None, so that
    it is strict JSON (null), which every JSON reader takes; tuples become lists, as json writes them anyway."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(item) for item in value]
    return value


def write_json(report: dict[str, Any], path: str | os.PathLike) -> None:
    """Writes `report` as strict JSON: non-finite floats as null (`finite_json`), anything else json cannot write
    as its str()."""
    directory = os.path.dirname(os.fspath(path))
    if directory:
        os.makedirs(directory, exist_ok=True)
    with open(path, "w") as f:
        json.dump(finite_json(report), f, indent=2, default=str, allow_nan=False)
        f.write("\n")


def _fmt(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def _bytes(n: int | None) -> str:
    if n is None:
        return ""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


# The caption under each op's table.
CAPTIONS = {
    "adamw": "ms: median step time; GB/s by the bytes model (fp32: 28 B/param); % of the roof; × = torch fused's "
             "time / this one's (bf16+master: the torch way with _foreach_copy_); host ms: host time per step (no "
             "sync); peak mem: memory a step allocates beyond its state.",
    "adam": "One Adam step, weight decay 0.1 coupled into the grad (L2, torch.optim.Adam's), else as adamw: ms: "
            "median step time; GB/s by the bytes model (fp32: 28 B/param); % of the roof; × = torch fused Adam's "
            "time / this one's; host ms: host time per step (no sync); peak mem: what a step allocates beyond its "
            "state.",
    **cross_entropy.CAPTIONS,
    **accumulate.CAPTIONS,
    **clip_adamw.CAPTIONS,
    **sgd.CAPTIONS,
    **lion.CAPTIONS,
    **fsdp.CAPTIONS,
}


def _speedups(r: dict[str, Any]) -> str:
    return ", ".join(f"{peer} {x:.2f}×" for peer, x in (r.get("speedup_vs") or {}).items())


def print_table(report: dict[str, Any], console=None) -> None:
    """The report as rich tables, one per op, one section per case and size (columns with nothing to show are left
    out). Printed 160 columns wide when stdout is not a terminal (logs), else at the terminal's width."""
    import sys

    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    if console is None:
        console = Console() if sys.stdout.isatty() else Console(width=160)
    roof = report["roof"]
    roof_text = f"{roof['kind']} {roof['gbps']:.1f} GB/s" if roof["gbps"] else f"not measured ({roof.get('note')})"
    if roof.get("copy_gbps"):
        roof_text += f" (torch copy_: {roof['copy_gbps']:.1f} GB/s, not the roof)"
    columns = [  # header, justify, cell
        ("case", "left", lambda r: r["case"]),
        ("impl", "left", lambda r: escape(r["impl"]) + (" (auto)" if r.get("auto") else "")),
        ("params", "right", lambda r: adamw._human(r["n_params"]) if r.get("n_params") else ""),
        ("tensors", "right", lambda r: str(r.get("n_tensors") or "")),
        ("shape", "right", lambda r: r.get("shape") or ""),
        ("ms", "right", lambda r: _fmt(r["time_ms_median"], ".3f")),
        ("IQR", "right", lambda r: _fmt(r["time_ms_iqr"], ".3f")),
        ("host ms", "right", lambda r: _fmt(r.get("host_ms_median"), ".3f")),
        ("GB/s", "right", lambda r: _fmt(r.get("gbps"), ".1f")),
        ("% roof", "right", lambda r: _fmt(r.get("pct_of_roof"), ".0f")),
        ("TFLOP/s", "right", lambda r: _fmt(r.get("tflops"), ".2f")),
        ("×", "right", lambda r: _fmt(r.get("speedup_vs_baseline", r.get("speedup_vs_torch_fused")), ".2f")),
        ("vs peers", "left", lambda r: escape(_speedups(r))),
        ("peak mem", "right", lambda r: _bytes(r.get("peak_mem"))),
        ("coll.", "right", lambda r: str(r["collectives_per_step"]) if r.get("collectives_per_step") is not None
         else ""),
        ("ok", "center", lambda r: {True: "[green]✓[/]", False: "[red]✗ wrong[/]", None: ""}[r["correct"]]),
        ("note", "left", lambda r: escape(r["note"])),
    ]
    ops = list(dict.fromkeys(r.get("op", "adamw") for r in report["rows"]))
    for op in ops:
        rows = [r for r in report["rows"] if r.get("op", "adamw") == op]
        cells = [[cell(r) for _, _, cell in columns] for r in rows]
        keep = [i for i, (header, _, _) in enumerate(columns)
                if header in ("case", "impl", "ms") or any(row[i] for row in cells)]
        table = Table(title=f"{op} — {report['device']} — memory roof: {roof_text}", caption=CAPTIONS.get(op))
        if any((r.get("pct_of_roof") or 0) > 100 for r in rows):
            table.caption += (
                " Over 100% of the roof: with --quick the tensors may stay in cache; else the roof kernel is no roof"
                " here (with few cores, bandwidth is bound by each core's outstanding misses, and more streams get"
                " more)."
            )
        for i in keep:
            header, justify, _ = columns[i]
            table.add_column(header, justify=justify, no_wrap=header not in ("impl", "note", "vs peers"),
                             overflow="fold")
        previous = None
        for r, row in zip(rows, cells):
            key = (r["case"], r.get("n_params"), r.get("shape"))
            if previous is not None and key != previous:
                table.add_section()
            previous = key
            table.add_row(*(row[i] for i in keep), style="bold" if r["impl"].startswith("fused_optim") else None)
        console.print(table)
    by_peer: dict[tuple[str, str], list[str]] = {}
    for peer in report.get("absent_peers", []):
        by_peer.setdefault((peer["impl"], peer["why"]), []).append(peer["op"])
    if by_peer:
        console.print("absent peers: " + "; ".join(
            f"{escape(impl)} ({', '.join(ops)}): {escape(why.removeprefix('absent (').removesuffix(')'))}"
            for (impl, why), ops in by_peer.items()))
    load = report.get("load_avg", {})
    busy = max(load.get("before") or 0, load.get("after") or 0)
    if report["device_type"] == "cpu" and busy > 0.5 * (os.cpu_count() or 1) + 1:
        console.print(f"[yellow]warning: the machine was busy (1-minute load average up to {busy:.1f} on "
                      f"{os.cpu_count()} CPUs): other processes distort CPU timings; run it again on a quiet machine.")
