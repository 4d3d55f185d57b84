"""Train a small byte-level GPT with fused_optim: the whole loop on one screen.

What the package changes in an ordinary PyTorch loop, and nothing else:
- `fused_optim.AdamW` for `torch.optim.AdamW`, with clipping folded into the step (`max_grad_norm=`: one pass over
  the grads, no `clip_grad_norm_` call, no host sync);
- `fused_optim.functional.linear_cross_entropy` for `F.cross_entropy(hidden @ lm_head.T, targets)`: the
  (tokens x vocabulary) logits are never materialised;
- `fused_optim.GradAccumulator`: micro-batch grads summed into fp32 main grads, scaled by the number of tokens;
- `fused_optim.lr_scheduler.WarmupCosine`: warmup then cosine decay.

The text is the Python standard library's own source (no download), one byte per token.

    python examples/train_gpt.py                  # CPU: a few hundred steps in minutes
    python examples/train_gpt.py --device cuda --steps 2000
"""

from __future__ import annotations

import argparse
import time

import torch

import fused_optim
from fused_optim.tools.examples.data import BatchSampler, stdlib_corpus
from fused_optim.tools.examples.gpt import GPT, GPTConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--micro-batches", type=int, default=2, help="micro-batches accumulated per step")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per micro-batch")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    config = GPTConfig(seq_len=64, n_layer=2, n_head=4, d_model=128)
    corpus = stdlib_corpus(max_bytes=2_000_000)
    train = BatchSampler(corpus.train, args.batch_size, config.seq_len, seed=args.seed)
    val = BatchSampler(corpus.val, args.batch_size, config.seq_len, seed=args.seed + 1)
    model = GPT(config).to(device)

    # Weight decay on matrices only (not on norms, biases or the position embedding), as in GPT-2 / nanoGPT.
    decayed = [p for p in model.parameters() if p.dim() == 2 and p is not model.position_embedding.weight]
    others = [p for p in model.parameters() if not any(p is q for q in decayed)]
    opt = fused_optim.AdamW([{"params": decayed, "weight_decay": 0.1}, {"params": others, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), max_grad_norm=1.0)
    schedule = fused_optim.lr_scheduler.WarmupCosine(opt, warmup_steps=args.steps // 10, total_steps=args.steps)
    accumulator = fused_optim.GradAccumulator(model.parameters())

    def loss_of(inputs: torch.Tensor, targets: torch.Tensor, reduction: str) -> torch.Tensor:
        hidden = model(inputs.to(device)).flatten(0, 1)  # (B*T, C)
        return fused_optim.functional.linear_cross_entropy(hidden, model.lm_head_weight,
                                                           targets.to(device).flatten(), reduction=reduction)

    start = time.perf_counter()
    for step in range(args.steps):
        tokens = 0
        for _ in range(args.micro_batches):
            inputs, targets = train.next()
            loss_of(inputs, targets, "sum").backward()  # summed: finalize divides by the tokens of the whole step
            accumulator.accumulate()
            tokens += targets.numel()
        accumulator.finalize(num_tokens=tokens)  # main grads = sum of the micro-batches' grads / tokens
        opt.step()
        accumulator.zero_()
        schedule.step()
        if step % 50 == 0 or step == args.steps - 1:
            with torch.no_grad():
                val_loss = loss_of(*val.next(), "mean").item()  # the only host read, once per 50 steps
            print(f"step {step:4d}  val loss {val_loss:.3f}  lr {schedule.get_last_lr()[0]:.2e}  "
                  f"{time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
