"""How each side of `fused-optim train` turns micro-batches into an optimizer step.

Both sides minimise the same objective: the mean cross-entropy over every target token of the step's
micro-batches. Each micro-batch's loss is summed (reduction="sum") and the step's gradient divided once by the
total token count, which is the full batch's mean however the tokens fall into micro-batches
(docs/accumulation-notes.md).

- FusedRecipe, the package: fused linear + cross-entropy over the final hidden states and the tied LM head weight
  (no (B·T, V) logits), micro-batch grads added into fp32 main grads by GradAccumulator, divided by
  `count_tokens` in `finalize`, then fused AdamW (or Lion), which clips the global norm inside its step. With
  gradient release the accumulator's `release` arms the last micro-batch's backward instead, in which each param is
  divided, stepped and zeroed as its grad arrives (no clipping: a global norm needs every grad first).
- TorchRecipe, the baseline: materialised logits and F.cross_entropy, grads accumulated by autograd in `.grad`,
  divided by the token count, torch.nn.utils.clip_grad_norm_, torch.optim.AdamW (its default foreach kernels).

Neither reads a value on the host inside a step: the token count, grad norm and loss stay on the device.
Precision: on a GPU both run the transformer body under bf16 autocast; the LM head and the loss run in fp32 on
both sides, outside autocast. With 256 byte tokens the head is ~2 % of the model's FLOPs, and an fp32 head gives an
fp32 loss: the fused loss of bf16 inputs is rounded to bf16 (torch's rule for bf16 logits), steps of 0.4-0.8 % at
these losses, too coarse to log or compare sides by.
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fused_optim
from fused_optim.tools.examples.gpt import GPT
from fused_optim.tools.training.config import COMPARE_OPTIMIZERS, TrainConfig

SIDES = ("fused", "torch")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on the matrices and embeddings (dim >= 2), none on biases and LayerNorm gains (GPT-2's
    practice: decaying a gain towards 0 shrinks the signal, not the capacity)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


class Recipe:
    """One side: its optimizer and scheduler, its loss, and what runs between the last backward and the next
    forward. `autocast_dtype`: bf16 on a GPU, None (fp32) on the CPU unless config.bf16 says otherwise."""

    name: str

    def __init__(self, model: GPT, config: TrainConfig, device: torch.device) -> None:
        self.model, self.config, self.device = model, config, device
        self.autocast_dtype = config.autocast_dtype(device.type)
        self.optimizer = self._optimizer(param_groups(model, config.weight_decay))
        self.scheduler = fused_optim.lr_scheduler.WarmupCosine(
            self.optimizer, warmup_steps=config.warmup, total_steps=config.steps, min_lr_ratio=config.min_lr_ratio)

    def _optimizer(self, groups: list[dict]) -> torch.optim.Optimizer:
        raise NotImplementedError

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)

    def loss_sum(self, x: Tensor, y: Tensor) -> Tensor:
        """The summed cross-entropy of the micro-batch (x, y): (B, T) token ids; a 0-dim fp32 tensor."""
        raise NotImplementedError

    def before_last_backward(self, num_tokens: Tensor) -> None:
        """Before the step's last micro-batch's backward, with the step's token count (a device tensor)."""

    def after_backward(self) -> None:
        """After each micro-batch's backward."""

    def optimizer_step(self, num_tokens: Tensor) -> Tensor | None:
        """Normalises the accumulated gradient by `num_tokens` (a device tensor), clips, steps the optimizer and
        the schedule, and clears the grads. Returns the grad norm before clipping (a device tensor) or None."""
        raise NotImplementedError

    def lr(self) -> float:
        lr = self.optimizer.param_groups[0]["lr"]
        return float(lr)  # a host read of a tensor lr: only at report points

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        # torch's loader puts the saved group values in place as they are: a tensor lr would come back on the
        # checkpoint's map_location (the CPU). Keep each group's own lr tensor (on the params' device; the
        # scheduler writes into it) and copy the saved value in.
        lr_tensors = [group["lr"] if isinstance(group["lr"], Tensor) else None for group in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state["optimizer"])
        for group, lr in zip(self.optimizer.param_groups, lr_tensors):
            if lr is not None:
                group["lr"] = lr.copy_(torch.as_tensor(group["lr"]))
        self.scheduler.load_state_dict(state["scheduler"])


class FusedRecipe(Recipe):
    name = "fused"

    def __init__(self, model: GPT, config: TrainConfig, device: torch.device) -> None:
        super().__init__(model, config, device)
        self.accumulator = fused_optim.GradAccumulator(model.parameters(), backend=config.backend)

    def _optimizer(self, groups: list[dict]) -> torch.optim.Optimizer:
        config = self.config
        # capturable: the lr becomes a device tensor that WarmupCosine updates on the device, so reading the
        # optimizer's skipped-step count never syncs the host (a float lr would read it every step). The same on
        # the CPU, so that the CPU tests run the GPU's path (its only cost: the lr is rounded to fp32). Lion takes
        # the tensor lr itself.
        common = dict(betas=config.betas, weight_decay=config.weight_decay, max_grad_norm=config.max_grad_norm,
                      moments=config.moments, master_weights=config.master_weights, backend=config.backend,
                      gradient_release=config.gradient_release)
        if config.optimizer == "lion":
            lr = torch.tensor(config.lr, dtype=torch.float32, device=self.device)
            return fused_optim.Lion(groups, lr=lr, **common)
        return fused_optim.AdamW(groups, lr=config.lr, capturable=True, **common)

    def loss_sum(self, x: Tensor, y: Tensor) -> Tensor:
        with self.autocast():
            hidden = self.model(x)
        with torch.autocast(self.device.type, enabled=False):  # head and loss in fp32 (module docstring)
            return fused_optim.functional.linear_cross_entropy(
                hidden.reshape(-1, hidden.shape[-1]).float(), self.model.lm_head_weight.float(), y.reshape(-1),
                reduction="sum", backend=self.config.backend)

    def before_last_backward(self, num_tokens: Tensor) -> None:
        if self.config.gradient_release:
            self.accumulator.release(num_tokens=num_tokens)

    def after_backward(self) -> None:
        if not self.config.gradient_release:  # released: the optimizer's hooks took each grad in backward
            self.accumulator.accumulate()

    def optimizer_step(self, num_tokens: Tensor) -> Tensor | None:
        if self.config.gradient_release:
            # every param was stepped in the last backward: step() steps nothing, but the scheduler sees it called
            # (else torch warns of a skipped first lr)
            self.optimizer.step()
        else:
            self.accumulator.finalize(num_tokens=num_tokens)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.accumulator.zero_()
        self.scheduler.step()
        return self.optimizer.last_grad_norm


class TorchRecipe(Recipe):
    name = "torch"

    def _optimizer(self, groups: list[dict]) -> torch.optim.Optimizer:
        config = self.config
        module, name, _ = COMPARE_OPTIMIZERS[config.compare_optimizer]
        optimizer_class = getattr(importlib.import_module(module), name)
        return optimizer_class(groups, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)

    def loss_sum(self, x: Tensor, y: Tensor) -> Tensor:
        with self.autocast():
            hidden = self.model(x)
        with torch.autocast(self.device.type, enabled=False):  # head and loss in fp32 (module docstring)
            logits = self.model.logits(hidden.float())  # (B, T, V), materialised
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum")

    def optimizer_step(self, num_tokens: Tensor) -> Tensor | None:
        params = [p for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        grads = [p.grad for p in params]
        torch._foreach_div_(grads, num_tokens.to(grads[0].dtype))
        norm = None
        if self.config.max_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return norm


def make_recipe(side: str, model: GPT, config: TrainConfig, device: torch.device) -> Recipe:
    return {"fused": FusedRecipe, "torch": TorchRecipe}[side](model, config, device)
