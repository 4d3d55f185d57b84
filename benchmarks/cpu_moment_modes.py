"""Step times of each optimizer x moment storage on the CPU, by kernel level (each this machine runs) and thread count.

The optimizers (AdamW on fp32 and bf16 params, the former also with amsgrad, the latter with master weights and
stochastic rounding; SGD with momentum, also on bf16 params with 24-bit masters; Lion; fp32, bf16 and int8
moments; --match picks some by their labels) are
set up at once on 33.6 M params and stepped round-robin, so a shared machine's load falls on every row alike; each
row is the median of its last steps. One process per kernel level (FUSED_OPTIM_CPU_ISA), thread count (--threads)
and pass; the table keeps one pass per level and thread count, the one whose rows took the least time in all, so
that its ratios and its STREAM triad come from one process (a row's best pass taken on its own paired one pass's
fp32 step with another's int8 one). Each row's GB/s is its bytes model (tools/bench: adam_step_bytes,
sgd_step_bytes, lion_step_bytes) over its median, beside the triad that process measured on as many threads
(tools/bench/timing.py, memory_roof). Every pass is kept in the JSON, and its rows' times relative to the first
row are printed, so the spread of a ratio between passes shows.

Whether the int8 step beats the fp32 one depends on the threads a memory system feeds: the fp32 step is bound by
its bytes once a few threads run it, the int8 step by its arithmetic until many do.

    python benchmarks/cpu_moment_modes.py --threads 1,2 \\
        --out benchmarks/results/<cpu>/optimizer_moment_modes_by_isa.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time

SHAPE = (4, 8192, 1024)
# (optimizer, param dtype, moments, further constructor options as (name, value) pairs)
OPTIMIZERS = [("AdamW", "float32", "fp32", ()), ("AdamW", "float32", "bf16", ()), ("AdamW", "float32", "int8", ()),
              ("AdamW", "bfloat16", "fp32", ()), ("AdamW", "bfloat16", "bf16", ()), ("AdamW", "bfloat16", "int8", ()),
              ("AdamW", "bfloat16", "fp32", (("master_weights", True),)),
              ("AdamW", "bfloat16", "fp32", (("master_weights", 24),)),
              ("AdamW", "bfloat16", "bf16", (("master_weights", 24),)),
              ("AdamW", "bfloat16", "bf16", (("stochastic_rounding", True),)),
              ("AdamW", "bfloat16", "int8", (("master_weights", 24),)),
              ("SGD", "float32", "fp32", ()), ("SGD", "float32", "int8", ()),
              ("SGD", "bfloat16", "int8", (("master_weights", 24),)),
              ("Lion", "float32", "fp32", ()), ("Lion", "float32", "bf16", ()), ("Lion", "float32", "int8", ())]
# this script's alone: the GPU scripts share OPTIMIZERS, and their time on a lent machine is spoken for
AMSGRAD_ROWS = [("AdamW", "float32", "fp32", (("amsgrad", True),)), ("AdamW", "float32", "int8", (("amsgrad", True),))]
MOMENT_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "int8": "int8"}
MASTER_BYTES = {True: 2, 24: 1}  # the remainder kept beside each bf16 param: int16 (exact fp32), int8 (24-bit)


def label(name: str, dtype: str, moments: str, options: tuple) -> str:
    if name == "SGD":
        params = "" if dtype == "float32" else f", {dtype} params"
        return f"SGD momentum 0.9{params}, moments={moments}" + "".join(f", {key}={value}" for key, value in options)
    if name == "Lion":
        return f"Lion, moments={moments}"
    return f"AdamW, {dtype} params, moments={moments}" + "".join(f", {key}={value}" for key, value in options)


def step_bytes(name: str, dtype: str, moments: str, options: tuple, numel: int) -> int:
    """The fewest bytes one step of this row moves (the bytes models of `fused-optim bench`)."""
    import torch

    from fused_optim.tools.bench.adamw import adam_step_bytes
    from fused_optim.tools.bench.lion import lion_step_bytes
    from fused_optim.tools.bench.sgd import sgd_step_bytes

    moment_dtype = getattr(torch, MOMENT_DTYPES[moments])
    master_bytes = MASTER_BYTES.get(dict(options).get("master_weights"), 0)
    if name == "AdamW":
        return adam_step_bytes(numel, getattr(torch, dtype), state_dtype=moment_dtype, master_bytes=master_bytes,
                               amsgrad=dict(options).get("amsgrad", False))
    if name == "SGD":
        return sgd_step_bytes(numel, moment_dtype, getattr(torch, dtype), master_bytes)
    return lion_step_bytes(numel, moment_dtype)


def one_pass(rows: list[tuple[str, str, str, tuple]], rounds: int, kept: int) -> dict:
    """This process's kernel level and thread count: {"rows": {row: median ms of its last `kept` of `rounds`
    steps}, "triad_gbps": the STREAM triad measured after them}."""
    import torch

    import fused_optim
    from fused_optim.tools.bench.timing import memory_roof

    generator = torch.Generator().manual_seed(0)
    steps, times = [], {}
    for name, dtype, moments, options in rows:
        param = torch.nn.Parameter(torch.randn(SHAPE, generator=generator).to(getattr(torch, dtype)))
        param.grad = torch.randn(SHAPE, generator=generator).to(param.dtype)
        hyper = {"momentum": 0.9, "lr": 1e-3} if name == "SGD" else {"lr": 1e-4 if name == "Lion" else 1e-3}
        optimizer = getattr(fused_optim, name)([param], moments=moments, backend="cpu", **hyper, **dict(options))
        row = label(name, dtype, moments, options)
        steps.append((row, optimizer.step))
        times[row] = []
    for _ in range(rounds):
        for row, step in steps:
            start = time.perf_counter()
            step()
            times[row].append((time.perf_counter() - start) * 1e3)
    del steps  # the optimizers' state, before the triad's arrays
    return {"rows": {row: round(statistics.median(ms[-kept:]), 2) for row, ms in times.items()},
            "triad_gbps": round(memory_roof("cpu", budget_s=0.5)["gbps"], 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="the JSON to write (default: only the table, printed)")
    parser.add_argument("--passes", type=int, default=2, help="processes per kernel level and thread count, one "
                        "after the other (the pass of least time in all is kept; every pass's ratios are printed)")
    parser.add_argument("--rounds", type=int, default=18, help="steps of each row in a pass, round-robin over the rows")
    parser.add_argument("--kept", type=int, default=15, help="steps per row the median is taken over (the last ones)")
    parser.add_argument("--threads", default=None,
                        help="comma-separated intra-op thread counts, one set of passes each (default: torch's)")
    parser.add_argument("--isas", default=None, help="comma-separated kernel levels (default: every one this CPU runs "
                        "and the package built, but baseline)")
    parser.add_argument("--match", default="", help="a regular expression: only the rows whose labels it finds "
                        "(e.g. 'AdamW, float32 params, moments=(fp32|int8)')")
    parser.add_argument("--one-pass", action="store_true", help=argparse.SUPPRESS)  # a child process: print its rows
    args = parser.parse_args()
    every_optimizer = OPTIMIZERS + AMSGRAD_ROWS
    rows = [row for row in every_optimizer if re.search(args.match, label(*row))]
    if not rows:
        every_row = "; ".join(label(*row) for row in every_optimizer)
        parser.error(f"--match {args.match!r} finds no row; the rows are: {every_row}.")
    if args.one_pass:
        print(json.dumps(one_pass(rows, args.rounds, args.kept)))
        return

    import torch

    from fused_optim import _backend
    from fused_optim.tools.bench import cpu_description

    thread_counts = [int(n) for n in (args.threads or str(torch.get_num_threads())).split(",")]
    bytes_of = {label(*row): step_bytes(*row, math.prod(SHAPE)) for row in rows}  # per step, by row label
    runnable = [isa for isa in _backend.cpu_isas_supported() if isa in _backend.cpu_isas_built()]
    isas = args.isas.split(",") if args.isas else [isa for isa in runnable if isa != "baseline"]
    if not set(isas) <= set(runnable):
        parser.error(f"--isas {args.isas}: this machine runs {', '.join(runnable)}.")
    passes: dict[str, dict[int, list[dict]]] = {}
    for isa in isas:
        for threads in thread_counts:
            for _ in range(args.passes):
                child = subprocess.run([sys.executable, __file__, "--one-pass", "--rounds",
                                        str(args.rounds), "--kept", str(args.kept), "--match", args.match],
                                       env={**os.environ, "FUSED_OPTIM_CPU_ISA": isa, "OMP_NUM_THREADS": str(threads)},
                                       check=True, capture_output=True, text=True)
                passes.setdefault(isa, {}).setdefault(threads, []).append(json.loads(child.stdout))
                print(isa, f"{threads} threads", passes[isa][threads][-1], flush=True)
    kept_pass, gbps, triad = {}, {}, {}
    for isa, by_threads in passes.items():
        for threads, runs in by_threads.items():
            run = min(runs, key=lambda run: sum(run["rows"].values()))
            kept_pass.setdefault(isa, {})[threads] = run["rows"]
            gbps.setdefault(isa, {})[threads] = {row: round(bytes_of[row] / (ms * 1e6), 1)
                                                 for row, ms in run["rows"].items()}
            triad.setdefault(isa, {})[threads] = run["triad_gbps"]
    width = max(map(len, bytes_of))
    for isa in kept_pass:
        for threads in thread_counts:
            print(f"\n{isa}, {threads} threads (STREAM triad {triad[isa][threads]} GB/s): ms a step, GB/s, "
                  "and each pass's time relative to the first row's")
            runs = passes[isa][threads]
            for row, ms in kept_pass[isa][threads].items():
                relative = " ".join(f"{run['rows'][row] / next(iter(run['rows'].values())):.3f}" for run in runs)
                print(f"  {row:{width}s} {ms:8.2f} ms {gbps[isa][threads][row]:7.1f} GB/s   x {relative}")
    if not args.out:
        return
    with open(args.out, "w") as out:
        json.dump({"what": __doc__.split("\n\n")[1].replace("\n", " "), "shape": SHAPE,
                   "cpu": cpu_description(), "torch": torch.__version__, "threads": thread_counts,
                   "passes": passes, "kept_pass": kept_pass, "gbps": gbps, "triad_gbps": triad}, out, indent=1)


if __name__ == "__main__":
    main()
