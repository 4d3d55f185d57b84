"""Peak resident memory of an optimizer's checkpoint operations on the CPU, beside torch's fused AdamW.

Each optimizer steps once over 4 params of --numel elements and saves `state_dict()` and `torch_state_dict()`; then,
each in a fresh process: resuming (`opt.load_state_dict(torch.load(path))` into a new optimizer),
`opt.torch_state_dict()`, and loading the saved torch form (`torch.load` and `load_state_dict` again). A row gives
each operation's peak resident memory beyond what the process held before it (VmHWM, reset through
/proc/self/clear_refs; glibc returns every block of 128 KiB or more at once, MALLOC_MMAP_THRESHOLD_, so a
freed temporary leaves the count) in bytes a param, beside the checkpoint's size. A resume peaks at the checkpoint
itself where the loaded tensors become the state, as torch's fused AdamW's do; torch_state_dict() at what it
returns (fp32 moments and masters) where its conversions take little beside.

    python benchmarks/cpu_state_memory.py --out benchmarks/results/<cpu>/state_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

# label -> (optimizer, param dtype, constructor options)
ROWS = {
    "torch AdamW fused, fp32": ("torch.AdamW", "float32", {"fused": True}),
    "AdamW fp32": ("AdamW", "float32", {}),
    "AdamW fp32, moments=int8": ("AdamW", "float32", {"moments": "int8"}),
    "AdamW bf16, master_weights=True": ("AdamW", "bfloat16", {"master_weights": True}),
    "AdamW bf16, moments=int8, master_weights=24": ("AdamW", "bfloat16", {"moments": "int8", "master_weights": 24}),
    "SGD fp32, momentum, moments=int8": ("SGD", "float32", {"momentum": 0.9, "moments": "int8"}),
    "Lion fp32, moments=int8": ("Lion", "float32", {"moments": "int8"}),
}
OPERATIONS = ("resume", "torch_state_dict", "load torch form")


def _resident(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(field))


def _peak_of(operation) -> tuple[int, object]:
    """(peak resident bytes beyond those held before, result) of `operation()`."""
    import gc

    gc.collect()
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # resets VmHWM to VmRSS
    before = _resident("VmRSS")
    result = operation()
    return _resident("VmHWM") - before, result


def child(label: str, operation: str, numel: int, path: str) -> dict:
    """One operation of one row, in this process: {"peak": bytes} (and what `save` learnt)."""
    import torch

    import fused_optim

    name, dtype, options = ROWS[label]
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(numel, dtype=getattr(torch, dtype))) for _ in range(4)]
    cls = torch.optim.AdamW if name == "torch.AdamW" else getattr(fused_optim, name)
    opt = cls(params, lr=1e-3, **options)
    if operation in ("save", "torch_state_dict"):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        for p in params:
            p.grad = None
    if operation == "save":
        torch.save(opt.state_dict(), path)
        if hasattr(opt, "torch_state_dict"):
            torch.save(opt.torch_state_dict(), path + ".torch")
        return {"checkpoint": os.path.getsize(path)}
    if operation == "torch_state_dict":
        peak, _ = _peak_of(opt.torch_state_dict)
    else:  # the checkpoint read in, then loaded
        peak, _ = _peak_of(lambda: opt.load_state_dict(torch.load(path if operation == "resume" else path + ".torch")))
    return {"peak": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--numel", type=int, default=16 << 20, help="elements of each of the 4 params")
    parser.add_argument("--out", help="write the results here as JSON")
    parser.add_argument("--child", nargs=3, metavar=("ROW", "OPERATION", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child[:2], args.numel, args.child[2])))
        return
    params = 4 * args.numel
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for label in ROWS:
            path = os.path.join(folder, "checkpoint.pt")
            row = {}
            for operation in ("save", *OPERATIONS):
                if operation in ("torch_state_dict", "load torch form") and label.startswith("torch"):
                    continue  # torch's own optimizer has no torch_state_dict(): its state_dict() is that form
                run = subprocess.run([sys.executable, __file__, "--numel", str(args.numel), "--child", label,
                                      operation, path], env=env, capture_output=True, text=True, check=True)
                row.update({operation if key == "peak" else key: value
                            for key, value in json.loads(run.stdout.splitlines()[-1]).items()})
            results[label] = {"checkpoint_bytes_per_param": round(row["checkpoint"] / params, 2),
                              **{f"{operation} peak, bytes per param": round(row[operation] / params, 2)
                                 for operation in OPERATIONS if operation in row}}
            print(label, results[label], flush=True)
    if args.out:
        from fused_optim import _backend

        with open(args.out, "w") as out:
            json.dump({"what": __doc__.split("\n\n")[1].replace("\n", " "), "params": params,
                       "cpu": _backend.cpu_info()[0], "cpu_isa": _backend.cpu_isa(), "results": results}, out,
                      indent=1)


if __name__ == "__main__":
    main()
