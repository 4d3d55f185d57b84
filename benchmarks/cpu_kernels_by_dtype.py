"""The CPU loss, accumulation and norm kernels' arithmetic by dtype: ns an element on one thread, in cache.

The optimizers' counterpart is cpu_update_in_cache.py. Here each kernel runs over fp32, bf16 and fp16, so what
converting a dtype costs the loop shows beside the loop itself: cross-entropy forward + backward (64 rows of 32768
classes, "mean": the backward scales the gradient by 1/64; each row's pass stays in L2, and 2 M logits amortise the
call), with and without soft-capping; `accumulate_grads` of 262 K grads into fp32 main grads; their `total_norm`
(2-norm). Each is run `--calls` times, `--repeats` times, and
the best repeat kept. The kernel level is the loaded one (FUSED_OPTIM_CPU_ISA picks another); run it under two
checkouts alternately to compare builds (PYTHONPATH).

    OMP_NUM_THREADS=1 FUSED_OPTIM_CPU_ISA=avx2 python benchmarks/cpu_kernels_by_dtype.py --out avx2.json
"""

from __future__ import annotations

import argparse
import json
from typing import Callable

import torch

import fused_optim
import fused_optim.functional as FF
from fused_optim.ops.accumulate import accumulate_grads
from fused_optim.ops.total_norm import total_norm
from fused_optim.tools.bench import device_name
from fused_optim.tools.bench.timing import best_time_cpu

NUMEL = 1 << 18
ROWS, CLASSES = 64, 1 << 15
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cross_entropy_call(dtype: torch.dtype, softcap: float | None) -> Callable[[], None]:
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(ROWS, CLASSES, generator=generator) * 3).to(dtype).requires_grad_()
    target = torch.randint(CLASSES, (ROWS,), generator=generator)

    def call() -> None:
        FF.cross_entropy(logits, target, softcap=softcap, backend="cpu").backward()
        logits.grad = None

    return call


def accumulate_call(dtype: torch.dtype) -> Callable[[], None]:
    generator = torch.Generator().manual_seed(0)
    grad, main_grad = torch.randn(NUMEL, generator=generator).to(dtype), torch.zeros(NUMEL)
    return lambda: accumulate_grads([main_grad], [grad], backend="cpu")


def norm_call(dtype: torch.dtype) -> Callable[[], None]:
    grad = torch.randn(NUMEL, generator=torch.Generator().manual_seed(0)).to(dtype)
    return lambda: total_norm([grad], 2.0, backend="cpu")


# label -> (call maker, elements a call)
KERNELS = {
    "cross_entropy": (lambda dtype: cross_entropy_call(dtype, None), ROWS * CLASSES),
    "cross_entropy, softcap 30": (lambda dtype: cross_entropy_call(dtype, 30.0), ROWS * CLASSES),
    "accumulate_grads": (accumulate_call, NUMEL),
    "total_norm": (norm_call, NUMEL),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=30, help="calls timed together")
    parser.add_argument("--repeats", type=int, default=7, help="timings of --calls calls; the least is kept")
    parser.add_argument("--match", default="", help="only the kernels whose label contains this")
    parser.add_argument("--out", help="write the results here as JSON")
    args = parser.parse_args()
    results = {"device": device_name(torch.device("cpu")), "cpu_isa": fused_optim.backends()["cpu_isa"]["loaded"],
               "calls": args.calls, "repeats": args.repeats, "ns_per_element": {}}
    for label, (make_call, numel) in KERNELS.items():
        if args.match not in label:
            continue
        for dtype_name, dtype in DTYPES.items():
            ns = best_time_cpu(make_call(dtype), args.calls, args.repeats) / numel * 1e9
            results["ns_per_element"][f"{label}, {dtype_name}"] = round(ns, 3)
            print(f"{results['cpu_isa']:>8}  {ns:6.3f} ns/element  {label}, {dtype_name}", flush=True)
    if args.out:
        with open(args.out, "w") as out:
            json.dump(results, out, indent=1)


if __name__ == "__main__":
    main()
