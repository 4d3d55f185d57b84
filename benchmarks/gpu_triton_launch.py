"""Step times of the Triton optimizer kernels at other launch shapes on a CUDA GPU, for the moment modes that miss
issue 15's 90 % target: BLOCK elements a block, NUM_WARPS warps and BLOCKS blocks a program, MAX_REGISTERS a thread
(today 1024, 4, 1 and no cap: 8 elements a thread).

On the H200, with one block a program, five Triton rows of very different instructions and bytes took the same
0.41-0.43 ms (AdamW with int8 moments or stochastic rounding, Lion with bf16 or int8 moments), as if each program's
chain of dependent loads (the table, the tensor's addresses, its step count, then its data) bounded them. Four
blocks a program (the second shape below) make a quarter as many such chains and 11-13 % fewer instructions an
element on those rows, but more registers a thread; the third caps them (as many programs an SM as today), the
others try fewer elements a thread (fewer registers, more warps) and larger programs.

Each shape is set on the kernel's module (fused_optim.triton.adam, lion, sgd) for one row at a time. Its params and
state after two steps must equal today's shape's bit for bit (the random bits hang on the element's index, not on
the program that steps it) before the shape is timed. The rows are gpu_moment_modes.py's, on its 64 M-param tensor;
GB/s is the same bytes model over the median step, beside the copy roof measured in the same process.

    python benchmarks/gpu_triton_launch.py --out benchmarks/results/<gpu>/triton_launch.json
"""

from __future__ import annotations

import argparse
import importlib
import re

import torch

from cpu_moment_modes import OPTIMIZERS, label, step_bytes
from gpu_moment_modes import NUMEL, make_optimizer, write_results

# Settings changed from today's (the first: none). Compiled for sm_90 here (no GPU), AdamW with int8 moments: 96
# registers today, 120-126 at four blocks a program (Triton 3.6, 3.8), 96 again under the cap (amsgrad's kernels
# spill there).
SHAPES = [{}, {"BLOCKS": 4}, {"BLOCKS": 4, "MAX_REGISTERS": 96}, {"NUM_WARPS": 8}, {"NUM_WARPS": 8, "BLOCKS": 4},
          {"BLOCK": 2048, "NUM_WARPS": 16}]
SETTINGS = ("BLOCK", "NUM_WARPS", "BLOCKS", "MAX_REGISTERS")
KERNEL_MODULES = {"AdamW": "fused_optim.triton.adam", "SGD": "fused_optim.triton.sgd",
                  "Lion": "fused_optim.triton.lion"}


def stepped_bits(optimizer) -> list[torch.Tensor]:
    """The param and every state tensor after two steps, as raw bytes (NaN-safe equality)."""
    optimizer.step()
    optimizer.step()
    param = optimizer.param_groups[0]["params"][0]
    tensors = [param.detach()] + [t for t in optimizer.state[param].values() if isinstance(t, torch.Tensor)]
    return [t.contiguous().reshape(-1).view(torch.uint8).clone() for t in tensors]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the JSON to write")
    parser.add_argument("--match", default=r"moments=int8|stochastic_rounding",
                        help="a regular expression: the rows whose labels it finds (default: int8 moments and "
                             "stochastic rounding, the rows furthest from the target)")
    parser.add_argument("--rep-ms", type=float, default=30.0, help="milliseconds of timed steps per row and shape")
    args = parser.parse_args()

    from fused_optim.tools.bench.timing import memory_roof, release_memory, time_cuda

    roof = memory_roof("cuda", budget_s=1.0)
    results = []
    for row in [row for row in OPTIMIZERS if re.search(args.match, label(*row))]:
        module = importlib.import_module(KERNEL_MODULES[row[0]])
        today = {name: getattr(module, name) for name in SETTINGS}
        expected = None
        for shape in SHAPES:
            settings = {**today, **shape}
            for name, value in settings.items():
                setattr(module, name, value)
            entry = {"row": label(*row), **settings}
            shown = " ".join(f"{name} {value}" for name, value in settings.items())
            try:
                bits = stepped_bits(make_optimizer(*row, "triton"))
                if expected is None:
                    expected = bits
                elif not all(torch.equal(a, b) for a, b in zip(bits, expected)):
                    raise AssertionError(f"{shown} stepped other bits than today's shape")
                del bits
                optimizer = make_optimizer(*row, "triton")
                optimizer.step()  # the state and the kernel's compile, outside the timing
                ms = time_cuda(optimizer.step, rep_ms=args.rep_ms).median_ms
                del optimizer
                gbps = step_bytes(*row, NUMEL) / (ms * 1e6)
                entry.update(ms=round(ms, 4), gbps=round(gbps, 1), pct_of_roof=round(100 * gbps / roof["gbps"], 1))
                print(f"{label(*row):64s} {shown:55s} {ms:8.3f} ms {gbps:7.1f} GB/s {entry['pct_of_roof']:5.1f} %",
                      flush=True)
            except Exception as error:  # a failing shape is reported and the others still run
                entry["error"] = f"{type(error).__name__}: {error}"
                print(f"{label(*row):64s} {shown:55s} failed: {entry['error']}", flush=True)
            finally:
                for name, value in today.items():
                    setattr(module, name, value)
                release_memory(torch.device("cuda"))
            results.append(entry)
        del expected
    write_results(args.out, __doc__.split("\n\n")[0], roof, results)


if __name__ == "__main__":
    main()
