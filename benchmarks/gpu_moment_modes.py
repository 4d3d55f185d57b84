"""Step times of each optimizer x moment storage x master-weight mode on a CUDA GPU, for both GPU backends.

The rows are cpu_moment_modes.py's (AdamW on fp32 and bf16 params, the latter also with master weights and stochastic
rounding; SGD with momentum, also on bf16 params with 24-bit masters; Lion; fp32, bf16 and int8 moments), each on
one tensor of 64 M params (256 MB in fp32, four times an H200's L2), stepped by our CUDA C++ and Triton kernels.
Each time is the median of CUDA-event timed steps (tools/bench/timing.py, time_cuda); GB/s is the row's bytes model
(tools/bench: adam_step_bytes, sgd_step_bytes, lion_step_bytes) over it, beside the copy bandwidth the same process
measured (memory_roof): issue 15's target is each mode at >= 90 % of it.

    python benchmarks/gpu_moment_modes.py --out benchmarks/results/<gpu>/optimizer_moment_modes.json
"""

from __future__ import annotations

import argparse
import json
import re

import torch

from cpu_moment_modes import OPTIMIZERS, label, step_bytes

NUMEL = 64 * 2**20
BACKENDS = ("cuda", "triton")


def make_optimizer(name: str, dtype: str, moments: str, options: tuple, backend: str):
    """This row's optimizer, stepped by `backend`, on one NUMEL-param tensor with the same values every call."""
    import fused_optim

    generator = torch.Generator(device="cuda").manual_seed(0)
    param = torch.nn.Parameter(torch.randn(NUMEL, device="cuda", generator=generator).to(getattr(torch, dtype)))
    param.grad = torch.randn(NUMEL, device="cuda", generator=generator).mul_(1e-3).to(param.dtype)
    hyper = {"momentum": 0.9, "lr": 1e-3} if name == "SGD" else {"lr": 1e-4 if name == "Lion" else 1e-3}
    return getattr(fused_optim, name)([param], moments=moments, backend=backend, **hyper, **dict(options))


def time_row(name: str, dtype: str, moments: str, options: tuple, backend: str, rep_ms: float) -> float:
    """Median milliseconds of one step of this row's optimizer."""
    from fused_optim.tools.bench.timing import release_memory, time_cuda

    optimizer = make_optimizer(name, dtype, moments, options, backend)
    optimizer.step()  # creates the state and compiles the kernel, outside the timing
    timing = time_cuda(optimizer.step, rep_ms=rep_ms)
    del optimizer
    release_memory(torch.device("cuda"))
    return timing.median_ms


def write_results(path: str, what: str, roof: dict, rows: list[dict]) -> None:
    """The JSON of a GPU run: what it measured, on which device and torch, against which copy roof."""
    from fused_optim.tools.bench import device_name

    with open(path, "w") as out:
        json.dump({"what": what.replace("\n", " "), "numel": NUMEL, "device": device_name(torch.device("cuda")),
                   "torch": torch.__version__, "roof": roof, "rows": rows}, out, indent=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="the JSON to write")
    parser.add_argument("--match", default="", help="a regular expression: only the rows whose labels it finds")
    parser.add_argument("--rep-ms", type=float, default=50.0, help="milliseconds of timed steps per row")
    parser.add_argument("--profile", action="store_true",
                        help="for a profiler: one step of each row and backend, nothing timed or written")
    args = parser.parse_args()
    if not args.profile and not args.out:
        parser.error("--out is required (but with --profile)")

    from fused_optim.tools.bench.timing import memory_roof, release_memory

    rows = [row for row in OPTIMIZERS if re.search(args.match, label(*row))]
    if args.profile:
        for row in rows:
            for backend in BACKENDS:
                optimizer = make_optimizer(*row, backend)
                optimizer.step()
                torch.cuda.synchronize()
                del optimizer
                release_memory(torch.device("cuda"))
        return
    roof = memory_roof("cuda", budget_s=1.0)
    results = []
    for row in rows:
        for backend in BACKENDS:
            try:
                ms = time_row(*row, backend, args.rep_ms)
            except Exception as error:  # a failing row is reported and the others still run
                results.append({"row": label(*row), "backend": backend, "error": f"{type(error).__name__}: {error}"})
                print(f"{label(*row):60s} {backend:7s} failed: {results[-1]['error']}", flush=True)
                continue
            gbps = step_bytes(*row, NUMEL) / (ms * 1e6)
            results.append({"row": label(*row), "backend": backend, "ms": round(ms, 4), "gbps": round(gbps, 1),
                            "pct_of_roof": round(100 * gbps / roof["gbps"], 1),
                            "bytes_per_step": step_bytes(*row, NUMEL)})
            print(f"{label(*row):60s} {backend:7s} {ms:8.3f} ms {gbps:7.1f} GB/s {results[-1]['pct_of_roof']:5.1f} %",
                  flush=True)
    write_results(args.out, __doc__.split("\n\n")[1], roof, results)


if __name__ == "__main__":
    main()
