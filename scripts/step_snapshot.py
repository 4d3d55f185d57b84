"""Byte-for-byte A/B of two builds of the CPU kernels: a change meant to leave every bit as it was (a loop
restructured, a conversion moved) is checked by stepping the same optimizers under both builds and comparing every
param and state tensor.

    # under each build (PYTHONPATH picks the checkout), on each kernel level and thread count
    OMP_NUM_THREADS=1 FUSED_OPTIM_CPU_ISA=avx2 PYTHONPATH=old python scripts/step_snapshot.py save old_avx2_1.pt
    OMP_NUM_THREADS=1 FUSED_OPTIM_CPU_ISA=avx2 PYTHONPATH=new python scripts/step_snapshot.py save new_avx2_1.pt
    python scripts/step_snapshot.py compare old_avx2_1.pt new_avx2_1.pt

`save` steps every optimizer (AdamW, amsgrad, Adam with L2 decay, SGD plain, with momentum and Nesterov, Lion) over
fp32/bf16/fp16 params, fp32/bf16/int8 moments, master copies and 16- and 8-bit remainders, on tensors of 3, 70001
and 130 elements (a partial block, many chunks, a tail), 4 steps with NaN and inf grads in the third; each
configuration seeds torch's generator, so stochastic rounding draws the same bits under both builds.
"""

from __future__ import annotations

import argparse

import torch

SIZES = (3, 70001, 130)
STEPS = 4
OPTIMIZERS = [
    ("AdamW", {}), ("AdamW", {"amsgrad": True}), ("Adam", {"weight_decay": 1e-2}), ("SGD", {}),
    ("SGD", {"momentum": 0.9}), ("SGD", {"momentum": 0.9, "nesterov": True, "weight_decay": 1e-3}),
    ("Lion", {"weight_decay": 0.1}),
]


def configurations():
    """(param dtype, optimizer, its options) for every storage mode the optimizer takes on those params."""
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        masters = [False] + ([True] if dtype != torch.float32 else []) + ([24] if dtype == torch.bfloat16 else [])
        for name, options in OPTIMIZERS:
            stateful = name != "SGD" or "momentum" in options
            for moments in ("fp32", "bf16", "int8") if stateful else ("fp32",):
                for master in masters:
                    chosen = dict(options, lr=1e-2, backend="cpu")
                    if stateful:
                        chosen["moments"] = moments
                    if master:
                        chosen["master_weights"] = master
                    yield dtype, name, chosen


def snapshot() -> dict[str, list[torch.Tensor]]:
    import fused_optim  # the build under test, found on PYTHONPATH (compare needs none)

    tensors = {}
    for index, (dtype, name, options) in enumerate(configurations()):
        generator = torch.Generator().manual_seed(index)
        torch.manual_seed(index)  # the optimizer's rounding seed
        params = [torch.nn.Parameter(torch.randn(size, generator=generator).to(dtype)) for size in SIZES]
        optimizer = getattr(fused_optim, name)(params, **options)
        for step in range(STEPS):
            for p in params:
                p.grad = torch.randn(p.shape, generator=generator).to(dtype)
                if step == 2:
                    p.grad[0] = float("inf")
                    p.grad[-1] = float("nan")
            optimizer.step()
        state = [value for per_param in optimizer.state.values() for value in per_param.values()
                 if torch.is_tensor(value)]
        tensors[f"{dtype} {name} {options}"] = [p.detach().clone() for p in params] + [t.clone() for t in state]
    return tensors


def as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().reshape(-1).contiguous().view(torch.uint8)


def compare(a: dict[str, list[torch.Tensor]], b: dict[str, list[torch.Tensor]]) -> int:
    """The count of differing bytes, each differing configuration printed."""
    if a.keys() != b.keys():
        raise SystemExit("the two snapshots hold different configurations")
    total = differing = 0
    for key in a:
        if len(a[key]) != len(b[key]):
            raise SystemExit(f"{key}: {len(a[key])} tensors against {len(b[key])}")
        count = 0
        for x, y in zip(a[key], b[key]):
            x_bytes, y_bytes = as_bytes(x), as_bytes(y)
            count += x_bytes.numel() if x_bytes.shape != y_bytes.shape else int((x_bytes != y_bytes).sum())
            total += x_bytes.numel()
        differing += count
        if count:
            print(f"{key}: {count} bytes differ")
    print(f"{len(a)} configurations, {total} bytes: {differing} differ")
    return differing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    save = commands.add_parser("save", help="step every configuration and save its params and state")
    save.add_argument("out", help="the file to write (torch.save)")
    both = commands.add_parser("compare", help="compare two saved snapshots byte for byte (exit 1 if any differ)")
    both.add_argument("a", help="one build's snapshot")
    both.add_argument("b", help="the other build's")
    args = parser.parse_args()
    if args.command == "save":
        tensors = snapshot()
        torch.save(tensors, args.out)
        print(f"{len(tensors)} configurations saved in {args.out}")
    else:
        raise SystemExit(1 if compare(torch.load(args.a), torch.load(args.b)) else 0)


if __name__ == "__main__":
    main()
