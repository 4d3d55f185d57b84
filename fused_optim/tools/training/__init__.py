"""`fused-optim train`: a small GPT trained with the whole package (fused AdamW or Lion with in-step clipping, warmup +
cosine, token-count-normalised gradient accumulation, fused linear cross-entropy), or, with `compare`, the same
seed beside torch's AdamW, clip_grad_norm_ and cross-entropy.

One idea per file: config.py (the settings), recipes.py (how each side computes a step), timing.py (forward /
backward / optimizer times without host syncs), metrics.py (FLOPs, MFU, Chinchilla), monitor.py (loss spikes and
divergence), checkpoint.py (save / resume), loop.py (the training loop), report.py (rich table and JSON),
plot.py (the loss curve).

Example:
    >>> from fused_optim.tools.training import TrainConfig, train
    >>> result = train(TrainConfig(steps=2, batch_size=2, seq_len=16, n_layer=1, n_head=2, d_model=32,
    ...                            data="README.md", eval_interval=2, eval_batches=1))  # doctest: +SKIP
"""

from fused_optim.tools.training.config import TrainConfig

__all__ = ["TrainConfig", "train"]


def __getattr__(name: str):
    # the loop imports torch and fused_optim: only when used, so `fused-optim --help` stays fast
    if name == "train":
        from fused_optim.tools.training.loop import train

        return train
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
