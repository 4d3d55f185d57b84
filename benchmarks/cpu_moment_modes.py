"""Step times of each optimizer x moment storage on the CPU, every CPU kernel level this machine runs.

All eleven optimizers (AdamW on fp32 and bf16 params, SGD with momentum, Lion; fp32, bf16 and int8 moments) are set
up at once on 33.6 M params and stepped round-robin, so a shared machine's load falls on every row alike; each row
is the median of its last steps. One process per kernel level (FUSED_OPTIM_CPU_ISA) and pass; the table keeps the
lower of each row's medians over the passes.

    python benchmarks/cpu_moment_modes.py --out benchmarks/results/<cpu>/optimizer_moment_modes_by_isa.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

SHAPE = (4, 8192, 1024)
OPTIMIZERS = [("AdamW", "float32", "fp32"), ("AdamW", "float32", "bf16"), ("AdamW", "float32", "int8"),
              ("AdamW", "bfloat16", "fp32"), ("AdamW", "bfloat16", "bf16"), ("AdamW", "bfloat16", "int8"),
              ("SGD", "float32", "fp32"), ("SGD", "float32", "int8"),
              ("Lion", "float32", "fp32"), ("Lion", "float32", "bf16"), ("Lion", "float32", "int8")]


def label(name: str, dtype: str, moments: str) -> str:
    if name == "SGD":
        return f"SGD momentum 0.9, moments={moments}"
    return f"{name}, {dtype} params, moments={moments}" if name == "AdamW" else f"{name}, moments={moments}"


def one_pass(rounds: int, kept: int) -> dict[str, float]:
    """This process's kernel level: {row: median ms of its last `kept` of `rounds` steps}."""
    import torch

    import fused_optim

    generator = torch.Generator().manual_seed(0)
    steps, times = [], {}
    for name, dtype, moments in OPTIMIZERS:
        param = torch.nn.Parameter(torch.randn(SHAPE, generator=generator).to(getattr(torch, dtype)))
        param.grad = torch.randn(SHAPE, generator=generator).to(param.dtype)
        options = {"momentum": 0.9, "lr": 1e-3} if name == "SGD" else {"lr": 1e-4 if name == "Lion" else 1e-3}
        optimizer = getattr(fused_optim, name)([param], moments=moments, backend="cpu", **options)
        row = label(name, dtype, moments)
        steps.append((row, optimizer.step))
        times[row] = []
    for _ in range(rounds):
        for row, step in steps:
            start = time.perf_counter()
            step()
            times[row].append((time.perf_counter() - start) * 1e3)
    return {row: round(statistics.median(ms[-kept:]), 2) for row, ms in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the JSON to write")
    parser.add_argument("--passes", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=18)
    parser.add_argument("--kept", type=int, default=15, help="steps per row the median is taken over (the last ones)")
    parser.add_argument("--one-pass", action="store_true", help=argparse.SUPPRESS)  # a child process: print its row
    args = parser.parse_args()
    if args.one_pass:
        print(json.dumps(one_pass(args.rounds, args.kept)))
        return

    import torch

    from fused_optim import _backend
    from fused_optim.tools.bench import device_name

    passes: dict[str, list[dict[str, float]]] = {}
    for isa in _backend.cpu_isas_supported():
        if isa not in _backend.cpu_isas_built() or isa == "baseline":
            continue
        for _ in range(args.passes):
            child = subprocess.run([sys.executable, __file__, "--out", args.out, "--one-pass", "--rounds",
                                    str(args.rounds), "--kept", str(args.kept)], env={**os.environ,
                                   "FUSED_OPTIM_CPU_ISA": isa}, check=True, capture_output=True, text=True)
            passes.setdefault(isa, []).append(json.loads(child.stdout))
            print(isa, passes[isa][-1], flush=True)
    lower = {isa: {row: min(p[row] for p in runs) for row in runs[0]} for isa, runs in passes.items()}
    with open(args.out, "w") as out:
        json.dump({"what": __doc__.split("\n\n")[1].replace("\n", " "), "shape": SHAPE,
                   "cpu": device_name(torch.device("cpu")), "torch": torch.__version__, "passes": passes,
                   "lower": lower}, out, indent=1)


if __name__ == "__main__":
    main()
