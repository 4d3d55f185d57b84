"""The CPU kernels' arithmetic: ns a param of one optimizer step over params that stay in cache, on one thread.

A step over 33.6 M params (cpu_moment_modes.py) is bound by memory, and hides what an element's arithmetic costs;
262 K fp32 params, with their grads and state, fit in L2/L3, so here the update loop's own cost shows: what a
change to the element math (csrc/include/fused_optim) or to how gcc vectorises it does. Each configuration is
stepped `--steps` times, `--repeats` times, and the best repeat kept. The kernel level is the loaded one
(FUSED_OPTIM_CPU_ISA picks another); run it under two checkouts alternately to compare builds (PYTHONPATH).

    OMP_NUM_THREADS=1 FUSED_OPTIM_CPU_ISA=baseline python benchmarks/cpu_update_in_cache.py --out baseline.json
"""

from __future__ import annotations

import argparse
import json

import torch

import fused_optim
from fused_optim.tools.bench import device_name
from fused_optim.tools.bench.timing import best_time_cpu

NUMEL = 1 << 18
# (label, optimizer, param dtype, constructor options; `grad_dtype`: grads of another dtype, as torch 2.14's
# Parameter.grad_dtype lets autograd leave them)
CONFIGURATIONS = [
    ("SGD momentum, fp32", "SGD", torch.float32, dict(momentum=0.9)),
    ("SGD momentum + weight decay, fp32", "SGD", torch.float32, dict(momentum=0.9, weight_decay=1e-4)),
    ("SGD momentum, dampening 0.1, fp32", "SGD", torch.float32, dict(momentum=0.9, dampening=0.1)),
    ("SGD Nesterov + weight decay, bf16 params, master_weights=True", "SGD", torch.bfloat16,
     dict(momentum=0.9, nesterov=True, weight_decay=1e-4, master_weights=True)),
    ("SGD momentum, bf16 params, int8 buffer", "SGD", torch.bfloat16, dict(momentum=0.9, moments="int8")),
    ("Adam + L2 decay, fp32", "Adam", torch.float32, dict(weight_decay=1e-2)),
    ("Adam + L2 decay, bf16 params", "Adam", torch.bfloat16, dict(weight_decay=1e-2)),
    ("AdamW, fp32", "AdamW", torch.float32, dict()),
    ("AdamW, bf16 params", "AdamW", torch.bfloat16, dict()),
    ("AdamW, fp16 params", "AdamW", torch.float16, dict()),
    ("AdamW, fp16 params, master_weights=True", "AdamW", torch.float16, dict(master_weights=True)),
    ("SGD momentum, fp16 params", "SGD", torch.float16, dict(momentum=0.9)),
    ("Lion, fp16 params", "Lion", torch.float16, dict()),
    ("AdamW, fp32 params, fp16 grads", "AdamW", torch.float32, dict(grad_dtype=torch.float16)),
    ("AdamW, bf16 params, bf16 moments", "AdamW", torch.bfloat16, dict(moments="bf16")),
    ("AdamW, fp16 params, bf16 moments", "AdamW", torch.float16, dict(moments="bf16")),
]


def time_step(optimizer: str, dtype: torch.dtype, options: dict, steps: int, repeats: int) -> float:
    """The best of `repeats` runs of `steps` steps, in ns a param."""
    options = dict(options)
    grad_dtype = options.pop("grad_dtype", dtype)
    generator = torch.Generator().manual_seed(0)
    param = torch.nn.Parameter(torch.randn(NUMEL, generator=generator).to(dtype))
    if grad_dtype != dtype:
        param.grad_dtype = None  # any dtype
    param.grad = (torch.randn(NUMEL, generator=generator) * 1e-2).to(grad_dtype)
    opt = getattr(fused_optim, optimizer)([param], lr=1e-3, backend="cpu", **options)
    # (its untimed first step makes the state and takes the first step's branch)
    return best_time_cpu(opt.step, steps, repeats) / NUMEL * 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="steps timed together")
    parser.add_argument("--repeats", type=int, default=7, help="timings of --steps steps; the least is kept")
    parser.add_argument("--match", default="", help="only the configurations whose label contains this")
    parser.add_argument("--out", help="write the results here as JSON")
    args = parser.parse_args()
    results = {"device": device_name(torch.device("cpu")), "cpu_isa": fused_optim.backends()["cpu_isa"]["loaded"],
               "numel": NUMEL, "steps": args.steps, "repeats": args.repeats, "ns_per_param": {}}
    for label, optimizer, dtype, options in CONFIGURATIONS:
        if args.match in label:
            ns = time_step(optimizer, dtype, options, args.steps, args.repeats)
            results["ns_per_param"][label] = round(ns, 3)
            print(f"{results['cpu_isa']:>8}  {ns:6.2f} ns/param  {label}", flush=True)
    if args.out:
        with open(args.out, "w") as out:
            json.dump(results, out, indent=1)


if __name__ == "__main__":
    main()
