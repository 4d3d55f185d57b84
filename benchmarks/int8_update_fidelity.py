"""How faithful AdamW's updates stay with `moments="int8"`: the int8 and the fp32-moment optimizer stepped side by
side on the same grads, for the elements whose grads are a small fraction of their block's largest (where a code
has few steps and its rounding noise is largest). Blocks of 64 params, the first of each with grads of 1, the others
`--fractions` of that; grads mean-dominated (1 + N(0, 0.5^2)) or zero-mean (N(0, 0.5^2)), times that size.

Over the last `--window` steps it reports, int8 against fp32: the projection of the int8 updates on the fp32 ones
(<a, b> / <b, b>: 1 when the update is right on average, whatever its noise), their cosine, the RMS ratio, and the
mean `exp_avg` and `exp_avg_sq` ratios at the end.

    python benchmarks/int8_update_fidelity.py --backend cpu [--json PATH]
"""

from __future__ import annotations

import argparse
import json

import torch

import fused_optim
from fused_optim import _backend

BLOCK = 64


def run(moments: str, fraction: float, mean: float, args: argparse.Namespace) -> tuple[torch.Tensor, dict]:
    """The per-step updates of the small elements over the last window, and the final state, in fp32."""
    generator = torch.Generator().manual_seed(args.seed)
    numel = BLOCK * args.blocks
    param = torch.nn.Parameter(torch.zeros(numel))
    optimizer = fused_optim.AdamW([{"params": [param], "seed": args.seed}], lr=args.lr, weight_decay=0.0,
                                  moments=moments, backend=args.backend)
    size = torch.full((numel,), fraction)
    size[::BLOCK] = 1.0
    updates = []
    for step in range(args.steps):
        param.grad = size * (mean + 0.5 * torch.randn(numel, generator=generator))
        before = param.detach().clone()
        optimizer.step()
        if step >= args.steps - args.window:
            updates.append(param.detach() - before)
    small = size != 1.0
    state = optimizer.torch_state_dict()["state"][0]
    final = {key: state[key][small].double() for key in ("exp_avg", "exp_avg_sq")}
    return torch.stack(updates)[:, small].double(), final


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="cpu", help="cpu, torch, triton or cuda")
    parser.add_argument("--fractions", default="1e-2,1e-3", help="the small grads' size, of their block's largest")
    parser.add_argument("--steps", type=int, default=2500, help="steps of both optimizers")
    parser.add_argument("--window", type=int, default=500, help="the last steps whose updates are compared")
    parser.add_argument("--blocks", type=int, default=16, help="blocks of 64 params")
    parser.add_argument("--lr", type=float, default=1e-4, help="both optimizers' learning rate")
    parser.add_argument("--seed", type=int, default=0, help="the grads' random seed")
    parser.add_argument("--json", metavar="PATH", help="also write the rows here")
    args = parser.parse_args()
    rows = []
    print(f"AdamW moments=int8 against moments=fp32, backend {args.backend}, CPU kernels {_backend.cpu_isa()}")
    print("grads          fraction  projection  cosine  RMS ratio  exp_avg ratio  exp_avg_sq ratio")
    for mean, kind in ((1.0, "mean-dominated"), (0.0, "zero-mean")):
        for fraction in map(float, args.fractions.split(",")):
            int8_updates, int8_state = run("int8", fraction, mean, args)
            fp32_updates, fp32_state = run("fp32", fraction, mean, args)
            row = {"grads": kind, "fraction": fraction,
                   "projection": ((int8_updates * fp32_updates).sum() / fp32_updates.square().sum()).item(),
                   "cosine": torch.nn.functional.cosine_similarity(int8_updates.flatten(), fp32_updates.flatten(),
                                                                   dim=0).item(),
                   "rms_ratio": (int8_updates.square().mean() / fp32_updates.square().mean()).sqrt().item(),
                   "exp_avg_ratio": (int8_state["exp_avg"].abs().mean() / fp32_state["exp_avg"].abs().mean()).item(),
                   "exp_avg_sq_ratio": (int8_state["exp_avg_sq"].mean() / fp32_state["exp_avg_sq"].mean()).item()}
            rows.append(row)
            print(f"{kind:15}{fraction:8.0e}{row['projection']:12.3f}{row['cosine']:8.3f}{row['rms_ratio']:11.3f}"
                  f"{row['exp_avg_ratio']:15.3f}{row['exp_avg_sq_ratio']:18.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"backend": args.backend, "cpu": _backend.cpu_name(), "cpu_isa": _backend.cpu_isa(),
                       "torch": torch.__version__, "config": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
