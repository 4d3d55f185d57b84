"""Linear + cross-entropy over row chunks, never holding the (N, V) logits: one autograd.Function.

For each chunk of rows the logits are one matmul (torch's GEMM), the fused cross-entropy kernel turns them into
their gradient in place, and two more matmuls fold that into the input and weight gradients, so the extra memory is
one chunk of logits plus the gradients themselves. With reduction "mean" or "sum" this all happens in the forward
(the backward only scales three small gradients by the incoming scalar); with "none" the incoming gradient differs
per row, so the forward keeps only the inputs and the backward recomputes each chunk.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from fused_optim.autograd.cross_entropy import (autocast_enabled, incoming_row_scale, loss_dtype, reduce_rows,
                                                reduction_scales, rows_op)
from fused_optim.autograd.differentiable_once import differentiable_once
from fused_optim.ops import cross_entropy as ops

# Logits bytes per chunk: a constant, so the loss's memory does not grow with the vocabulary. On a GPU larger
# chunks keep the GEMMs efficient; on a CPU a smaller chunk keeps the peak near the gradients' own size.
CHUNK_BYTES = {"cuda": 256 << 20}
DEFAULT_CHUNK_BYTES = 32 << 20


def chunk_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype of a chunk's logits and their gradient, for inputs of `dtype`: fp32 for bf16/fp16 on the CPU,
    whose low-precision GEMMs are emulated in fp32 anyway (torch's "accurate" policy there: a gradient rounded to
    bf16 before the input gradient's GEMM doubles its error), but under autocast autocast's, as F.linear's there;
    else the input's (on a GPU each GEMM accumulates in fp32)."""
    low_precision = dtype in (torch.bfloat16, torch.float16)
    return torch.float32 if device.type == "cpu" and low_precision and not autocast_enabled("cpu") else dtype


def chunk_rows(num_rows: int, num_classes: int, dtype: torch.dtype, device: torch.device,
               batch_chunk_size: int | None = None) -> int:
    """Rows per chunk of logits of `dtype` (chunk_dtype's): a budget of bytes, or `batch_chunk_size`."""
    if batch_chunk_size is not None:
        return batch_chunk_size
    budget = CHUNK_BYTES.get(device.type, DEFAULT_CHUNK_BYTES)
    return max(1, min(num_rows, budget // max(1, num_classes * dtype.itemsize)))


def add_rows(out: Tensor, rows: Tensor, values: Tensor) -> None:
    """out[rows[i]] += values[i], in the same order on every run: index_add_ on the CPU (a loop over i); on a GPU,
    where index_add_ adds with atomics in a varying order, index_put_ with accumulate (sorted by row first)."""
    if out.device.type == "cpu":
        out.index_add_(0, rows, values)
    else:
        out.index_put_((rows,), values, accumulate=True)


class _Chunks:
    """The per-chunk work shared by the forward ("mean"/"sum") and the recomputing backward ("none")."""

    def __init__(self, input, linear_weight, linear_bias, target, weight, scales, options, chunking, backend, vocab):
        # chunking: (rows per chunk, the chunks' dtype), as chunk_rows and chunk_dtype chose them in the forward
        self.input, self.linear_weight, self.linear_bias, self.target = input, linear_weight, linear_bias, target
        self.scales, self.options, (self.rows, self.dtype), self.backend = scales, options, chunking, backend
        self.forward_op, self.weight, _ = rows_op(backend, input.device, weight, vocab)
        # the lm head in the chunks' dtype (an fp32 copy of a bf16 one on the CPU, made once)
        self.head_weight = linear_weight.to(self.dtype)
        self.head_bias = None if linear_bias is None else linear_bias.to(self.dtype)
        ignore_index, label_smoothing, z_loss, softcap = options
        # fp32 chunks of the plain loss (whole rows; no smoothing, z-loss or softcap) fold the target's term of the
        # gradient in apart, as torch's chunked loss does: its logit's gradient is p_t s - s, and rounded there,
        # next to 1, a small p_t loses its precision before the GEMMs (their input gradient's error was 1.7x torch
        # chunked's against float64). So that entry holds p_t s, and s times the target's row of W, of x and 1 is
        # taken from the input, weight and bias gradients after them.
        self.target_apart = (vocab is None and self.dtype == torch.float32 and linear_weight.shape[0] > 0
                             and label_smoothing == 0.0 and z_loss == 0.0 and softcap == 0.0)
        if self.target_apart:
            num_classes = linear_weight.shape[0]
            kept = target != ignore_index
            # clamped: an out-of-range target must reach the kernel's own check (torch's IndexError), not fail here
            self.target_class = torch.where(kept, target, 0).clamp(0, num_classes - 1)
            # s per row: the kernel's C = ce_scale * w_t (cross_entropy.h), 0 on ignored rows; NaN on a row whose
            # target is out of range, which only the Triton kernel lets through (its loss NaN): its gradients too,
            # not those of the clamped class
            class_weight = 1.0 if weight is None else weight[self.target_class]
            in_range = (target >= 0) & (target < num_classes)
            self.target_scale = torch.where(kept, torch.where(in_range, scales[0] * class_weight, math.nan), 0.0)

    def logits(self, start, end, buffer):
        """The chunk's logits, written into `buffer` (one allocation for every chunk: two chunks are never alive)."""
        x, out = self.input[start:end].to(self.dtype), buffer[: end - start]
        if self.head_bias is None:
            return torch.mm(x, self.head_weight.t(), out=out)
        return torch.addmm(self.head_bias, x, self.head_weight.t(), out=out)

    def run(self, needs, row_scale=None):
        """Loss and lse per row (fp32), and the gradients `needs` = (input, weight, bias) asks for."""
        num_rows, num_classes = self.input.shape[0], self.linear_weight.shape[0]
        device = self.input.device
        loss_rows = torch.empty(num_rows, dtype=torch.float32, device=device)
        lse = torch.empty_like(loss_rows)
        grad_input = torch.empty_like(self.input) if needs[0] else None
        # the weight's gradient accumulates in the chunks' dtype: fp32 for a low-precision one on the CPU; on a GPU
        # in the weight's, each chunk's GEMM accumulating in fp32 (torch's "compact")
        grad_weight = torch.zeros(self.linear_weight.shape, dtype=self.dtype, device=device) if needs[1] else None
        grad_bias = torch.zeros(num_classes, dtype=torch.float32, device=device) if needs[2] else None
        any_grad = any(needs)
        buffer = torch.empty(min(self.rows, num_rows), num_classes, dtype=self.dtype, device=device)
        target_apart = self.target_apart and any_grad
        for start in range(0, num_rows, self.rows):
            end = min(start + self.rows, num_rows)
            logits = self.logits(start, end, buffer)
            if target_apart:  # read before the kernel writes the gradient over them
                target_class = self.target_class[start:end, None]
                target_logit = logits.gather(1, target_class)
            loss_rows[start:end], lse[start:end] = self.forward_op(
                logits, self.target[start:end], self.weight, self.scales, logits if any_grad else None,
                *self.options)
            if not any_grad:
                continue
            grad_logits = logits  # now holds d loss / d logits
            if target_apart:
                target_scale = self.target_scale[start:end, None]
                target_grad = torch.exp(target_logit - lse[start:end, None]) * target_scale
                # an ignored row's gradient stays 0, as the kernel left it, also where its logits hold a NaN
                grad_logits.scatter_(1, target_class, torch.where(target_scale == 0, 0.0, target_grad))
            if row_scale is not None:
                ops.scale_grad_op(self.backend, device)(grad_logits, row_scale[start:end])
                if target_apart:
                    target_scale = target_scale * row_scale[start:end, None]
            if grad_input is not None:
                in_place = self.dtype == self.input.dtype
                grad_x = torch.mm(grad_logits, self.head_weight, out=grad_input[start:end] if in_place else None)
                if target_apart:
                    grad_x -= target_scale * self.head_weight[target_class[:, 0]]
                if not in_place:  # rounded once, from the fp32 product
                    grad_input[start:end] = grad_x
            if grad_weight is not None:
                x = self.input[start:end].to(self.dtype)
                grad_weight.addmm_(grad_logits.t(), x)
                if target_apart:
                    add_rows(grad_weight, target_class[:, 0], x * -target_scale)
            if grad_bias is not None:
                grad_bias += grad_logits.sum(0, dtype=torch.float32)
                if target_apart:
                    add_rows(grad_bias, target_class[:, 0], -target_scale[:, 0])
        if grad_weight is not None:
            grad_weight = grad_weight.to(self.linear_weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(self.linear_bias.dtype)
        return loss_rows, lse, (grad_input, grad_weight, grad_bias)


# The chunk loop as one op: torch.compile sees a single node, not a Python loop over the rows that would make it
# compile anew for every batch size (dynamic shapes included). Vocabulary shards (their VocabShard is no op argument)
# run the loop directly.
@torch.library.custom_op("fused_optim::linear_cross_entropy_chunks", mutates_args=())
def chunks_op(input: Tensor, linear_weight: Tensor, linear_bias: Optional[Tensor], target: Tensor,
              weight: Optional[Tensor], scales: Tensor, ignore_index: int, label_smoothing: float, z_loss: float,
              softcap: float, rows: int, dtype: torch.dtype, needs: list[bool], backend: str,
              row_scale: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """_Chunks.run: (loss_rows, lse, grad_input, grad_weight, grad_bias), a gradient not asked for as an empty
    tensor (an op returns tensors, never None)."""
    chunks = _Chunks(input, linear_weight, linear_bias, target, weight, scales,
                     (ignore_index, label_smoothing, z_loss, softcap), (rows, dtype), backend, None)
    loss_rows, lse, grads = chunks.run(tuple(needs), row_scale)
    return loss_rows, lse, *(input.new_empty(0) if grad is None else grad for grad in grads)


@chunks_op.register_fake
def _(input, linear_weight, linear_bias, target, weight, scales, ignore_index, label_smoothing, z_loss, softcap,
      rows, dtype, needs, backend, row_scale):
    loss_rows = input.new_empty(input.shape[0], dtype=torch.float32)
    made = (input, linear_weight, linear_bias)
    return loss_rows, torch.empty_like(loss_rows), *(torch.empty_like(t) if need else input.new_empty(0)
                                                     for t, need in zip(made, needs))


def run_chunks(args: tuple, vocab, needs: tuple[bool, bool, bool], row_scale: Tensor | None = None):
    """(loss_rows, lse, (grad_input, grad_weight, grad_bias)) for `args` = (input, linear_weight, linear_bias,
    target, weight, scales, options, chunking, backend): through chunks_op for whole rows, directly for a shard."""
    if vocab is not None:
        return _Chunks(*args, vocab).run(needs, row_scale)
    *tensors, options, chunking, backend = args
    loss_rows, lse, *grads = chunks_op(*tensors, *options, *chunking, list(needs), backend, row_scale)
    return loss_rows, lse, tuple(grad if need else None for grad, need in zip(grads, needs))


def _savable(tensor: Optional[Tensor]) -> Optional[Tensor]:
    """A tensor autograd can save: an inference tensor (made under inference_mode, a frozen lm head's) copied
    outside inference mode, where saving it is refused (torch's loss takes it where only the bias needs a grad).
    Not under torch.compile, which cannot trace the question (and takes no inference tensors)."""
    if (tensor is not None and not torch.compiler.is_compiling() and tensor.is_inference()
            and not torch.is_inference_mode_enabled()):
        return tensor.clone()
    return tensor


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, linear_weight, linear_bias, target, weight, reduction, ignore_index, label_smoothing,
                z_loss, softcap, chunking, grad_enabled, backend, vocab=None, allow_retain_graph=False):
        # input (N, H); linear_weight (V, H); linear_bias (V,) or None; target (N,) int64; weight (V,) fp32 or None;
        # grad_enabled: grad mode outside (under no_grad, ctx.needs_input_grad still reports requires_grad);
        # vocab: the VocabShard that linear_weight's rows are (weight then covers the whole vocabulary), or None;
        # allow_retain_graph (LinearCrossEntropyOptions'): the backward scales the gradients the forward made into
        # new tensors, not in place, so it can run again
        num_classes = vocab.num_classes if vocab is not None else linear_weight.shape[0]
        scales, divisors = reduction_scales(target, weight, num_classes, reduction, ignore_index)
        args = (input, linear_weight, linear_bias, target, weight, scales,
                (ignore_index, label_smoothing, z_loss, softcap), chunking, backend)
        needs = tuple(ctx.needs_input_grad[:3]) if grad_enabled else (False, False, False)
        in_forward = reduction != "none"  # the per-row incoming gradient of "none" is known only in the backward
        loss_rows, lse, grads = run_chunks(args, vocab, needs if in_forward else (False, False, False))
        loss, z = reduce_rows(loss_rows, lse, divisors, z_loss, reduction, loss_dtype(input.dtype, input.device))
        # "none": what the backward recomputes from; else the gradients the forward made, saved as autograd saves
        # activations (offloading hooks move them, activation checkpointing drops them and runs the forward again);
        # and the loss last, for differentiable_once
        recompute_from = (_savable(input), _savable(linear_weight), _savable(linear_bias), target, weight,
                          scales) if not in_forward else ()
        made = [g for g in grads if g is not None] if in_forward else []
        ctx.reduction, ctx.made, ctx.scaled = reduction, [g is not None for g in grads], False
        ctx.allow_retain_graph = allow_retain_graph
        ctx.save_for_backward(*recompute_from, *made, loss)
        if not in_forward:
            ctx.settings = ((ignore_index, label_smoothing, z_loss, softcap), chunking, backend, vocab)
        ctx.mark_non_differentiable(z)
        return loss, z

    @staticmethod
    @differentiable_once("linear_cross_entropy")
    def backward(ctx, grad_loss, grad_z):
        needs = tuple(ctx.needs_input_grad[:3])
        if ctx.reduction == "none":
            options, chunking, backend, vocab = ctx.settings
            saved = ctx.saved_tensors[:-1]  # recompute_from: input, linear weight and bias, target, ...
            target, ignore_index = saved[3], options[0]
            _, _, grads = run_chunks((*saved, options, chunking, backend), vocab, needs,
                                     row_scale=incoming_row_scale(grad_loss, target == ignore_index))
        else:
            if ctx.scaled:
                raise RuntimeError("Trying to backward through the fused linear cross-entropy a second time; its "
                                   "gradients are computed in the forward and scaled in place (backward once per "
                                   "forward, unless LinearCrossEntropyOptions(allow_retain_graph=True)).")
            ctx.scaled = not ctx.allow_retain_graph
            made, scale = iter(ctx.saved_tensors[:-1]), grad_loss.to(torch.float32)
            scale_made = torch.mul if ctx.allow_retain_graph else torch.Tensor.mul_
            grads = tuple(scale_made(next(made), scale) if was_made else None for was_made in ctx.made)
        return (*grads, None, None, None, None, None, None, None, None, None, None, None, None)
