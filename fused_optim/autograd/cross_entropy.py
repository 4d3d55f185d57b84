"""Cross-entropy of (N, V) logits and (N,) class indices as one autograd.Function.

The forward computes the loss and, when the logits need a gradient, the gradient of the reduced loss in the same
pass over the logits (fused_optim::cross_entropy_forward), scaled by the reduction's normaliser read on the device.
The backward then only multiplies it by the incoming gradient, a no-op that reads nothing when that is exactly 1
(fused_optim::cross_entropy_scale_grad_): fwd + bwd move the logits once and the gradient once.
"""

from __future__ import annotations

import math

import torch

from fused_optim.autograd.differentiable_once import differentiable_once
from fused_optim.ops import cross_entropy as ops

# The dtypes torch.autocast casts to float32 for torch's cross-entropy (float64 it leaves alone).
_AUTOCAST_ELIGIBLE = (torch.float32, torch.bfloat16, torch.float16)


def loss_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype torch's cross-entropy computes and returns for logits of `dtype` on `device`: their own, or float32
    under torch.autocast, whose policy runs it in fp32 (on the CPU cross_entropy_loss itself, on CUDA log_softmax
    and nll_loss). The kernels compute in fp32 either way; this is only the dtype the loss is rounded to."""
    if dtype in _AUTOCAST_ELIGIBLE and autocast_enabled(device.type):
        return torch.float32
    return dtype


def autocast_enabled(device_type: str) -> bool:
    """Whether torch.autocast is on for `device_type` (a device type autocast has no state for, "meta", is never;
    a fixed tuple, not torch.amp.is_autocast_available, which torch 2.11's dynamo cannot trace)."""
    return device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type)


def reduction_scales(target: torch.Tensor, weight: torch.Tensor | None, num_classes: int, reduction: str,
                     ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ce_scale, z_scale, sum of the class weights) as one fp32 device tensor, for the kernels' gradient, and the
    (ce, z) divisors of the reduced losses (reduce_rows: a quotient rounds once, as torch's mean does, where a
    product with the rounded reciprocal rounds twice); without a host sync.

    "mean" divides the cross-entropy by the summed weights of the kept targets (torch's rule: a plain count without
    weights) and the z-loss by the number of kept targets; "sum" and "none" leave both unscaled. No kept weight
    (every target ignored, or every kept one weighted 0) gives a NaN scale: the loss comes out NaN, as torch's 0 / 0
    does, and ignored rows' gradient stays zero (they never use the scale)."""
    kept = target != ignore_index
    kept_count = kept.sum(dtype=torch.float32)
    if weight is None:
        kept_weight, weight_sum = kept_count, torch.full_like(kept_count, num_classes)
    else:
        # clamped: an out-of-range target must reach the kernel's own check, not fail in this gather; selected, not
        # multiplied by `kept`: an ignored row's clamped class may weigh inf or NaN, which torch never reads
        kept_weight = torch.where(kept, weight[target.clamp(0, num_classes - 1)], 0.0).sum(dtype=torch.float32)
        weight_sum = weight.sum(dtype=torch.float32)
    if reduction == "mean":
        # kept targets whose weights sum to 0: NaN as torch's 0 / 0, not inf from a label-smoothing term over 0
        ce_divisor = torch.where(kept_weight != 0, kept_weight, math.nan)
        return torch.stack([1 / ce_divisor, 1 / kept_count, weight_sum]), torch.stack([ce_divisor, kept_count])
    one = torch.ones_like(kept_count)
    return torch.stack([one, one, weight_sum]), torch.stack([one, one])


def reduce_rows(loss_rows: torch.Tensor, lse: torch.Tensor, divisors: torch.Tensor, z_loss: float, reduction: str,
                out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-row cross-entropy and log-sum-exp (fp32) reduced to (loss including the z-loss, z-loss), rounded
    once to out_dtype (`divisors`: reduction_scales')."""
    z_rows = z_loss * lse * lse  # lse is 0 on ignored rows
    if reduction == "none":
        return (loss_rows + z_rows).to(out_dtype), z_rows.to(out_dtype)
    ce, z = loss_rows.sum(), z_rows.sum()
    if reduction == "mean":
        ce, z = ce / divisors[0], z / divisors[1]
    return (ce + z).to(out_dtype), z.to(out_dtype)


def incoming_row_scale(grad_loss: torch.Tensor, ignored_rows: torch.Tensor) -> torch.Tensor:
    """reduction="none"'s incoming gradient, per row, in fp32, 0 on ignored rows: torch's loss gives those a zero
    gradient whatever comes in, and a NaN there (a per-sequence mean over a sequence of padding alone, 0 / 0) must
    not reach the weights through 0 * NaN."""
    return torch.where(ignored_rows, 0.0, grad_loss.to(torch.float32)).contiguous()


def rows_op(backend: str, device: torch.device, weight: torch.Tensor | None, vocab):
    """(the per-row forward: fused_optim::cross_entropy_forward or, for a vocabulary shard, the same contract in two
    passes and an all-gather (autograd/vocab_parallel.py), the class weights it takes, the number of classes)."""
    if vocab is None:
        return ops.forward_op(backend, device), weight, None
    return vocab.rows(backend, weight), vocab.local_weight(weight), vocab.num_classes


class CrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, weight, reduction, ignore_index, label_smoothing, z_loss, softcap, needs_grad,
                inplace, backend, vocab=None):
        # logits (N, V) with unit column stride; target (N,) int64; weight (V,) fp32 or None; needs_grad: grad mode
        # was on and the logits require a gradient (under no_grad, ctx.needs_input_grad still says they do);
        # vocab: the VocabShard these logits are, or None for whole rows
        rows, kernel_weight, num_classes = rows_op(backend, logits.device, weight, vocab)
        scales, divisors = reduction_scales(target, weight, num_classes or logits.shape[1], reduction, ignore_index)
        grad = None
        if needs_grad:  # the kernels take one row stride for both: a row-strided view gets a gradient like it
            grad = logits if inplace else torch.empty_strided(logits.shape, logits.stride(), dtype=logits.dtype,
                                                              device=logits.device)
        loss_rows, lse = rows(logits, target, kernel_weight, scales, grad, ignore_index, label_smoothing, z_loss,
                              softcap)
        if grad is logits:
            # Autograd must know the logits now hold the gradient: a graph that saved them for another
            # backward raises "modified by an inplace operation" instead of using the gradient as logits.
            torch.autograd.graph.increment_version(logits)
        ctx.backend, ctx.scaled = backend, grad is None
        ctx.ignored_rows = target == ignore_index if reduction == "none" else None
        loss, z = reduce_rows(loss_rows, lse, divisors, z_loss, reduction, loss_dtype(logits.dtype, logits.device))
        # The gradient saved as autograd saves activations: hooks that offload them (save_on_cpu) move it too, and
        # activation checkpointing drops it and runs the forward again. The loss last, for differentiable_once.
        ctx.save_for_backward(*([] if grad is None else [grad]), loss)
        ctx.mark_non_differentiable(z)
        return loss, z

    @staticmethod
    @differentiable_once("cross_entropy")
    def backward(ctx, grad_loss, grad_z):
        if ctx.scaled:
            raise RuntimeError("Trying to backward through the fused cross-entropy a second time; its gradient "
                               "buffer is used in place (backward once per forward).")
        ctx.scaled = True
        grad = ctx.saved_tensors[0]
        if ctx.ignored_rows is None:  # one number: a NaN there is NaN in torch's gradient too
            row_scale = grad_loss.to(torch.float32).contiguous()
        else:
            row_scale = incoming_row_scale(grad_loss, ctx.ignored_rows)
        ops.scale_grad_op(ctx.backend, grad.device)(grad, row_scale.view(-1))
        return grad, None, None, None, None, None, None, None, None, None, None, None
