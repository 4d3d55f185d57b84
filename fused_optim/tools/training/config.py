"""The settings of one `fused-optim train` run (the CLI's flags, fused_optim/tools/cli/train.py, map onto these)."""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass

# What defines the trained weights and the validation losses recorded: a resumed run must have the checkpoint's
# values (checkpoint.py checks). The backend is the resolved one (loop.train records it): other kernels round
# differently. eval_batches picks the validation set, so a history is measured on one set throughout.
RUN_DEFINING = ("steps", "batch_size", "micro_batches", "seq_len", "lr", "warmup", "min_lr_ratio", "weight_decay",
                "max_grad_norm", "betas", "optimizer", "moments", "params", "master_weights", "compare_optimizer",
                "n_layer", "n_head", "d_model", "seed", "data", "max_data_bytes", "bf16", "backend", "eval_batches")

# Each optimizer's lr, decoupled weight decay and betas where the run does not set them. Lion's update is a sign,
# larger than AdamW's, so it takes a 10x smaller lr and a 10x larger decay (the same lr x decay), and its own betas.
OPTIMIZER_DEFAULTS = {"adamw": {"lr": 1e-3, "weight_decay": 0.1, "betas": (0.9, 0.95)},
                      "lion": {"lr": 1e-4, "weight_decay": 1.0, "betas": (0.9, 0.99)}}

# The --compare side's optimizer: torch's AdamW, or an 8-bit AdamW of another package: (the module holding its class,
# the class, its name in reports).
COMPARE_OPTIMIZERS = {"adamw": ("torch.optim", "AdamW", "torch"),
                      "torchao-adamw8bit": ("torchao.optim", "AdamW8bit", "torchao AdamW8bit"),
                      "bnb-adamw8bit": ("bitsandbytes.optim", "AdamW8bit", "bitsandbytes AdamW8bit")}

# --quick: a model and run small enough for seconds on a laptop CPU
QUICK = {"steps": 30, "batch_size": 8, "micro_batches": 2, "seq_len": 64, "n_layer": 2, "n_head": 2, "d_model": 64,
         "warmup": 5, "eval_interval": 10, "eval_batches": 4}


@dataclass
class TrainConfig:
    steps: int = 200  # optimizer steps
    batch_size: int = 8  # sequences per micro-batch
    micro_batches: int = 2  # micro-batches accumulated per optimizer step
    seq_len: int = 128
    optimizer: str = "adamw"  # the fused side's: fused_optim.AdamW or fused_optim.Lion
    lr: float | None = None  # peak lr, reached after the warmup (None: OPTIMIZER_DEFAULTS')
    warmup: int = 20  # linear-warmup steps; cosine decay to min_lr_ratio·lr at `steps` after it
    min_lr_ratio: float = 0.1
    weight_decay: float | None = None  # decoupled, on the matrices and embeddings only (None: OPTIMIZER_DEFAULTS')
    max_grad_norm: float | None = 1.0  # clip the global grad norm (None: no clipping)
    betas: tuple[float, float] | None = None  # None: OPTIMIZER_DEFAULTS'
    moments: str = "fp32"  # the fused optimizer's moment storage (its `moments`)
    params: str = "fp32"  # the fused side's param dtype: "bf16" stores its model in bf16 (the torch side keeps fp32)
    master_weights: bool | int = False  # the fused optimizer's `master_weights` for bf16 params: True (exact fp32), 24
    gradient_release: bool = False  # the fused optimizer steps each param inside the last micro-batch's backward
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 256
    device: str = "auto"  # auto: the GPU when there is one
    bf16: bool | None = None  # bf16 autocast of the model; None: on a GPU only (True on the CPU: tests of that path)
    seed: int = 0
    compare: bool = False  # also train the torch.optim.AdamW + F.cross_entropy baseline, same seed (AdamW only)
    compare_optimizer: str = "adamw"  # the baseline's optimizer (COMPARE_OPTIMIZERS)
    data: str | None = None  # a text file or directory; None: the Python stdlib's source
    max_data_bytes: int = 8 << 20
    eval_interval: int = 50  # validation loss every this many steps (and at the end)
    eval_batches: int = 8  # micro-batches of validation data per evaluation (the same ones every time)
    log_interval: int = 10  # host reads of the loss and timers (the only syncs on a GPU) every this many steps
    spike_factor: float = 1.5  # warn when a step's loss exceeds this times the lowest loss so far
    save: str | None = None  # checkpoint path, written at every evaluation and at the end
    resume: str | None = None
    stop_after: int | None = None  # stop (and save) after this step, as if interrupted; resume it later
    backend: str | None = None  # fused_optim kernels (None: $FUSED_OPTIM_BACKEND or auto; train() resolves it)

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZER_DEFAULTS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZER_DEFAULTS)}, got {self.optimizer!r}")
        if self.compare and self.optimizer != "adamw":
            raise ValueError(f"compare trains torch's AdamW beside the fused AdamW; it has no {self.optimizer} twin")
        if self.compare_optimizer not in COMPARE_OPTIMIZERS:
            raise ValueError(f"compare_optimizer must be one of {', '.join(COMPARE_OPTIMIZERS)}, "
                             f"got {self.compare_optimizer!r}")
        if self.compare_optimizer != "adamw":
            if not self.compare:
                raise ValueError(f"compare_optimizer {self.compare_optimizer} is the --compare side's: "
                                 "it needs compare")
            package = COMPARE_OPTIMIZERS[self.compare_optimizer][0].split(".")[0]
            if importlib.util.find_spec(package) is None:
                raise ValueError(f"compare_optimizer {self.compare_optimizer} needs {package}, which is not installed")
        # not a field: replace() passes these as None again, so a changed optimizer brings its own defaults
        self._defaulted = [name for name in OPTIMIZER_DEFAULTS[self.optimizer] if getattr(self, name) is None]
        for name in self._defaulted:
            setattr(self, name, OPTIMIZER_DEFAULTS[self.optimizer][name])
        positive = ("steps", "batch_size", "micro_batches", "seq_len", "n_layer", "n_head", "d_model",
                    "eval_interval", "eval_batches", "log_interval", "max_data_bytes")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.warmup <= self.steps:
            raise ValueError(f"warmup must be in [0, steps={self.steps}], got {self.warmup}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 (or None for no clipping), got {self.max_grad_norm}")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model ({self.d_model}) must be a multiple of n_head ({self.n_head})")
        if not self.spike_factor > 1:
            raise ValueError(f"spike_factor must be > 1, got {self.spike_factor}")
        if self.stop_after is not None and not 1 <= self.stop_after <= self.steps:
            raise ValueError(f"stop_after must be in [1, steps={self.steps}], got {self.stop_after}")
        if self.params not in ("fp32", "bf16"):
            raise ValueError(f"params must be 'fp32' or 'bf16', got {self.params!r}")
        if self.master_weights not in (False, True, 24) or (self.master_weights and self.params != "bf16"):
            raise ValueError(f"master_weights must be False, True or 24, and only with bf16 params; got "
                             f"{self.master_weights!r} with {self.params} params")
        if self.gradient_release and self.max_grad_norm is not None:
            raise ValueError("gradient_release steps each param inside backward, before the other grads exist, so "
                             "it cannot clip by their global norm: turn max_grad_norm off (--max-grad-norm 0)")
        self.betas = tuple(self.betas)

    def autocast_dtype(self, device_type: str):
        """torch.bfloat16 when the model runs under bf16 autocast on `device_type`, else None."""
        import torch

        return torch.bfloat16 if (self.bf16 if self.bf16 is not None else device_type == "cuda") else None

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.micro_batches * self.seq_len

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **({name: None for name in self._defaulted} | changes))

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)
