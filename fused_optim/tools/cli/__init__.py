"""The `fused-optim` console script (also `python -m fused_optim`).

    fused-optim info [--json]       what is built and usable here, and why not (fused_optim.backends())
    fused-optim bench [options]     our ops against their peers (AdamW, Adam, cross-entropy, linear + cross-entropy,
                                    grad accumulation, clip + unscale + AdamW, SGD): time, GB/s, % of the memory
                                    roof
    fused-optim train [options]     train a small GPT with the package (fused_optim/tools/cli/train.py)

Example:
    >>> from fused_optim.tools.cli import main
    >>> main(["info", "--json"])  # doctest: +SKIP
    0
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from fused_optim.tools._pyplot import png_name
from fused_optim.tools.cli import train as train_cli
from fused_optim.tools.cli.outputs import output_problem

# `--dtype` → the AdamW cases it runs (fused_optim/tools/bench/adamw.py) and the dtypes of the cross-entropy ops.
DTYPE_CASES = {
    "fp32": ("fp32", "host"),
    "bf16": ("bf16", "bf16+master"),
    "all": ("fp32", "bf16", "bf16+master", "host"),
}
DTYPE_LOSSES = {"fp32": ("fp32",), "bf16": ("bf16",), "all": ("fp32", "bf16")}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fused-optim", description="Fused training-step kernels for PyTorch.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{info,bench,train}")

    info = commands.add_parser("info", help="what is built and usable here, and why not")
    info.add_argument("--json", action="store_true", help="print fused_optim.backends() as JSON")

    bench = commands.add_parser(
        "bench",
        help="benchmark our ops against torch's on this device",
        description="Times each op beside its peers after checking each against a reference, and reports GB/s "
        "by the op's bytes model and % of the memory roof measured in the same run (GPU: copy_; CPU: STREAM triad). "
        "adamw: one AdamW step vs torch fused / foreach / for-loop (DeepSpeed CPUAdam on the CPU when installed; "
        "torch.compile of the foreach step on a GPU). "
        "adam: one Adam step (L2 weight decay coupled into the grad; the adamw cases except bf16) vs torch's Adam "
        "likewise. "
        "ce: cross-entropy forward + backward vs torch eager, torch.compile, Liger-Kernel. linear_ce: linear + "
        "cross-entropy forward + backward vs torch's chunked F.linear_cross_entropy and the naive logits path, "
        "with the peak memory of a call. accumulate: fp32 main grads += bf16/fp32 grads vs torch's add_ loop and "
        "_foreach_add_. clip_adamw: AdamW(max_grad_norm=1) stepped by our GradScaler vs torch's "
        "GradScaler.unscale_ + clip_grad_norm_ + fused AdamW. sgd: one SGD step with momentum 0.9 vs torch fused / "
        "foreach / for-loop (on a GPU: torch.compile of the foreach step; apex FusedSGD and FusedAdam when "
        "installed). lion: one Lion step vs a torch foreach Lion and lion-pytorch. fsdp_adamw, fsdp_clip_adamw: one AdamW step (with clip_grad_norm_ to 1.0) of an FSDP2-sharded "
        "model in spawned ranks (2 gloo ranks on the CPU, one NCCL rank per GPU) vs torch's fused AdamW on the same "
        "mesh, with the collectives per step. Peers that are not installed are listed as absent.",
    )
    bench.add_argument("--json", metavar="PATH", help="also write the results (device, versions, roof, rows) here")
    bench.add_argument("--plot", metavar="PATH", help="also draw GB/s by op and case (groups) and implementation "
                       "(bars), with the measured memory roof as a line, as a PNG here (needs matplotlib; wrong and "
                       "untimed rows are left out, and linear_ce, which has no bytes model)")
    bench.add_argument("--quick", action="store_true", help="small sizes and short timings: seconds, not minutes "
                       "(the tensors may fit in cache, so GB/s can pass the roof)")
    bench.add_argument("--dtype", choices=sorted(DTYPE_CASES),
                       help="adamw, adam: fp32 and the 1000-tensor host-overhead case (fp32), bf16 and bf16 with fp32 "
                       "master weights (bf16; adam: only the latter), or all four (all, the default). ce, "
                       "linear_ce: the logits' dtype (default: fp32 on the CPU, bf16 and fp32 on a GPU). "
                       "accumulate: the grads' dtype (default: both). clip_adamw, sgd, lion: always fp32")
    bench.add_argument("--sizes", metavar="SIZE[,SIZE...]",
                       help="adamw, adam, clip_adamw, sgd, lion: total params of the model-like cases, e.g. "
                       "8M,84M (default: 84M on the CPU, 256M on a GPU; --quick: 4M on the CPU, 16M on a GPU); "
                       "accumulate: the elements of its one-tensor case (same defaults). ce: NxV, e.g. 4096x32000 "
                       "(default: 4096x32000 on the CPU, 8192x128256 on a GPU). linear_ce: NxHxV, e.g. "
                       "8192x512x32000 (default: that on the CPU, 8192x4096x128256 on a GPU). fsdp_adamw, "
                       "fsdp_clip_adamw: total params (default 50M on the CPU, 256M on a GPU). Each op takes the sizes "
                       "of its form, else its defaults")
    bench.add_argument("--ops", default="adamw", metavar="OP[,OP...]",
                       help="ops to benchmark: adamw, adam, ce, linear_ce, accumulate, clip_adamw, sgd, lion, fsdp_adamw, "
                       "fsdp_clip_adamw, or all (default: adamw)")
    bench.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                       help="auto (default): the GPU when there is one, else the CPU")
    train_cli.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs the console script with `argv` (default: sys.argv[1:]); returns the exit status."""
    args = _parser().parse_args(argv)
    if args.command == "info":
        return _info(args)
    if args.command == "train":
        return train_cli.run(args)
    return _bench(args)


def _info(args: argparse.Namespace) -> int:
    import fused_optim

    info = fused_optim.backends()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    from rich.console import Console
    from rich.tree import Tree

    v = info["versions"]
    tree = Tree(f"[bold]fused_optim {fused_optim.__version__}[/]")
    cuda = f" (CUDA {v['torch_cuda']})" if v["torch_cuda"] else " (CPU build)"
    tree.add(f"python {v['python']} · torch {v['torch']}{cuda} · triton {v['triton'] or 'not installed'}")
    threads = info["cpu_threads"]
    tree.add(f"device: {info['device']} · {threads} CPU thread{'s' if threads != 1 else ''}")
    extensions = tree.add("C++ extensions")
    isa = info["cpu_isa"]
    for name, error in info["extensions"].items():
        loaded = "[green]loaded[/]" + (f" ({isa['loaded']} kernels; built: {', '.join(isa['built'])}; this CPU runs: "
                                       f"{', '.join(isa['supported'])})" if name == "cpu" else "")
        extensions.add(f"{name}: " + (loaded if error is None else f"[red]{error}[/]"))
    backends = tree.add("backends")
    for name, error in info["backends"].items():
        backends.add(f"[green]✓[/] {name}" if error is None else f"[red]✗[/] {name}: {error}")
    source = "FUSED_OPTIM_BACKEND" if "FUSED_OPTIM_BACKEND" in os.environ else "FUSED_OPTIM_BACKEND unset"
    picks = tree.add(f"default backend {info['default_backend']!r} ({source}) runs")
    for device_type, choice in info["auto"].items():
        picks.add(f"{device_type} tensors → {choice}")
    Console().print(tree)
    return 0


def _bench(args: argparse.Namespace) -> int:
    import torch
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from fused_optim.tools import bench

    ops = tuple(op.strip() for op in args.ops.split(",") if op.strip())
    if not ops:
        print(f"fused-optim bench: --ops names no op; known: {', '.join(bench.OPS)}", file=sys.stderr)
        return 2
    if "all" in ops:
        ops = bench.OPS
    unknown = [op for op in ops if op not in bench.OPS]
    if unknown:
        print(f"fused-optim bench: unknown op(s) {', '.join(unknown)}; known: {', '.join(bench.OPS)}", file=sys.stderr)
        return 2
    try:
        # one number: adamw's, adam's, accumulate's, clip_adamw's, sgd's and lion's sizes; NxV: ce's logits; NxHxV:
        # linear_ce's input, hidden size and classes
        by_rank: dict[int, list[tuple[int, ...]]] = {1: [], 2: [], 3: []}
        for text in args.sizes.split(",") if args.sizes else []:
            shape = bench.parse_shape(text)
            if len(shape) not in by_rank:
                raise ValueError(f"not a size (N params), NxV or NxHxV: {text!r}")
            by_rank[len(shape)].append(shape)
    except ValueError as error:
        print(f"fused-optim bench: --sizes: {error}", file=sys.stderr)
        return 2
    sizes = [shape[0] for shape in by_rank[1]] or None
    shapes = {"ce": by_rank[2], "linear_ce": by_rank[3]}
    taken = {1: any(op not in shapes for op in ops), 2: "ce" in ops, 3: "linear_ce" in ops}
    for rank, form in ((1, "N"), (2, "NxV"), (3, "NxHxV")):
        if by_rank[rank] and not taken[rank]:  # said, not dropped in silence: the ops run their defaults
            given = ", ".join("x".join(map(str, shape)) for shape in by_rank[rank])
            print(f"fused-optim bench: no op asked ({', '.join(ops)}) takes --sizes of the form {form}: {given} "
                  "ignored", file=sys.stderr)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("fused-optim bench: --device cuda, but no CUDA GPU is visible.", file=sys.stderr)
        return 2
    device = None if args.device == "auto" else args.device
    plot = png_name(args.plot) if args.plot else None  # the name written, said and checked
    problem = output_problem({"--json": args.json, "--plot": plot})
    if problem:  # say so before minutes of measuring
        print(f"fused-optim bench: {problem}", file=sys.stderr)
        return 2

    progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=Console(stderr=True), transient=True)
    state: dict[str, Any] = {}

    def on_plan(total: int) -> None:
        state["task"] = progress.add_task("measuring the memory roof", total=total)

    started = time.monotonic()

    def on_task(description: str) -> None:
        progress.update(state["task"], advance=1, description=f"done: {description}")
        if not progress.console.is_terminal:  # a log: one line per task, so a run stopped at a limit shows where
            print(f"[{time.monotonic() - started:7.1f} s] {description}", file=sys.stderr, flush=True)

    with progress:
        report = bench.run_benchmarks(ops, device=device, sizes=sizes, cases=DTYPE_CASES[args.dtype or "all"],
                                      quick=args.quick, on_task=on_task, on_plan=on_plan,
                                      dtypes=DTYPE_LOSSES[args.dtype] if args.dtype else None, shapes=shapes)
    bench.print_table(report)
    if args.json:
        bench.write_json(report, args.json)
        print(f"wrote {args.json}")
    if plot:
        from fused_optim.tools.bench.plot import write_plot

        try:
            write_plot(report, plot)
            print(f"wrote {plot}")
        except RuntimeError as error:  # nothing to draw (e.g. linear_ce alone): the table and the JSON still stand
            print(f"fused-optim bench: {error}; no plot written.", file=sys.stderr)
    wrong = [f"{r.get('op', 'adamw')} {r['case']} {r['impl']}" for r in report["rows"] if r["correct"] is False]
    if wrong:
        print(f"wrong results: {', '.join(wrong)}", file=sys.stderr)
    return 1 if any(r["impl"].startswith("fused_optim") for r in report["rows"] if r["correct"] is False) else 0
