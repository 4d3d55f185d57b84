"""Triton cross-entropy forward (+ the gradient in the same launch): one program per row; and the two passes of a
vocabulary-parallel row (csrc/include/fused_optim/cross_entropy.h, ShardRowStats).

Pass 1 streams the row in BLOCK-wide pieces keeping a running max and sum of exp (rescaled once per piece) and the
weighted sum of the logits; pass 2 streams it again and writes the gradient, possibly over the logits themselves
(each element is read before the same program writes it). Ignored rows read nothing (their loops run zero
iterations) and write zeros. The row math mirrors csrc/include/fused_optim/cross_entropy.h.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fused_optim.ops.cross_entropy import no_class_rows
from fused_optim.triton.adam import _bf16_nearest

_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _tanh(y):
    """tanh from exp, as the CPU kernel computes it: (1 - e) / (1 + e) with e = exp(-2|y|), and near 0, where
    1 - e cancels, its odd Taylor series."""
    a = tl.abs(y)
    e = tl.exp(-2.0 * a)
    far = (1.0 - e) / (1.0 + e)
    far = tl.where(y < 0, -far, far)
    y2 = y * y
    near = y * (1.0 + y2 * (-1.0 / 3.0 + y2 * (2.0 / 15.0 + y2 * (-17.0 / 315.0 + y2 * (62.0 / 2835.0)))))
    return tl.where(a < 0.25, near, far)


@triton.jit
def _capped(x, softcap, SOFTCAP: tl.constexpr):
    if SOFTCAP:
        return softcap * _tanh(x / softcap)
    return x


@triton.jit
def _smoothing_term(weight_coef, weight):
    """cross_entropy.h's smoothing_term: weight_coef * weight, 0 where weight_coef is 0 (not 0 * an inf weight)."""
    return tl.where(weight_coef != 0.0, weight_coef * weight, 0.0)


@triton.jit
def _online_row_stats(x_row, weight_ptr, row_length, num_classes, softcap, HAS_WEIGHT: tl.constexpr,
                      SOFTCAP: tl.constexpr, BLOCK: tl.constexpr):
    """Pass 1 over one row's first row_length of num_classes logits: the max, the sum of exp(z - max) and the
    weighted gap sum_j w_j * (max - z_j) (cross_entropy.h's OnlineWeightedGap), both rescaled online."""
    cols = tl.arange(0, BLOCK)
    running_max = -float("inf")
    running_sum = 0.0
    gap = tl.zeros([BLOCK], dtype=tl.float32)  # lanes of the gap against the running max, and of their weights
    gap_weight = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, row_length, BLOCK):
        offsets = start + cols
        mask = offsets < num_classes
        z = _capped(tl.load(x_row + offsets, mask=mask, other=0.0).to(tl.float32), softcap, SOFTCAP)
        new_max = tl.maximum(running_max, tl.max(tl.where(mask, z, -float("inf")), axis=0))
        # One rescale per piece. While every logit so far is masked (-inf), exponentiate against 0 instead:
        # -inf - -inf would be NaN, exp(-inf - 0) is the 0 they add.
        shift = tl.where(new_max == -float("inf"), 0.0, new_max)
        running_sum = running_sum * tl.exp(running_max - shift) + tl.sum(tl.where(mask, tl.exp(z - shift), 0.0), axis=0)
        if HAS_WEIGHT:
            w = tl.load(weight_ptr + offsets, mask=mask, other=0.0)
        else:
            w = tl.where(mask, 1.0, 0.0)
        rise = tl.where(new_max > running_max, gap_weight * (new_max - running_max), 0.0)
        gap += tl.where(gap_weight != 0.0, rise, 0.0)  # (no 0 * inf while every logit so far is masked)
        gap += tl.where(mask & (z < new_max), w * (new_max - z), 0.0)
        gap_weight += w
        running_max = new_max
    return running_max, running_sum, tl.sum(gap, axis=0)


@triton.jit
def _cross_entropy_forward_kernel(
    logits_ptr,  # (N, V), rows row_stride elements apart
    target_ptr,  # (N,) int64
    weight_ptr,  # (V,) fp32 class weights (unused without HAS_WEIGHT)
    scales_ptr,  # (3,) fp32: ce_scale, z_scale, weight_sum
    grad_ptr,  # (N, V) like the logits, possibly the logits themselves (unused without HAS_GRAD)
    loss_ptr,  # (N,) fp32
    lse_ptr,  # (N,) fp32
    num_classes,
    row_stride,
    ignore_index,
    label_smoothing,
    z_loss,
    softcap,
    HAS_WEIGHT: tl.constexpr,
    HAS_GRAD: tl.constexpr,
    SOFTCAP: tl.constexpr,
    GRAD_IS_BF16: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = logits_ptr + row * row_stride
    cols = tl.arange(0, BLOCK)
    label_smoothing = tl.cast(label_smoothing, tl.float32)
    softcap = tl.cast(softcap, tl.float32)
    target = tl.load(target_ptr + row)
    kept = target != ignore_index
    in_range = (target >= 0) & (target < num_classes)
    row_length = tl.where(kept, num_classes, 0)  # an ignored row reads nothing

    running_max, running_sum, weighted_gap = _online_row_stats(x_row, weight_ptr, row_length, num_classes, softcap,
                                                                HAS_WEIGHT, SOFTCAP, BLOCK)
    log_sum = tl.log(running_sum)
    lse = running_max + log_sum
    inv_sum = tl.div_rn(1.0, running_sum)  # correctly rounded: `/` is the GPU's approximate division

    safe_target = tl.where(kept & in_range, target, 0)
    target_logit = _capped(tl.load(x_row + safe_target).to(tl.float32), softcap, SOFTCAP)
    if HAS_WEIGHT:
        target_weight = tl.load(weight_ptr + safe_target)
    else:
        target_weight = 1.0
    ce_scale = tl.load(scales_ptr)
    z_scale = tl.load(scales_ptr + 1)
    weight_sum = tl.load(scales_ptr + 2)
    # (max - z_t) + log(sum), not lse - z_t: a confident row keeps its loss's precision (cross_entropy.h)
    loss = (1.0 - label_smoothing) * target_weight * ((running_max - target_logit) + log_sum)
    smoothing_per_class = tl.div_rn(label_smoothing, tl.cast(num_classes, tl.float32))
    smoothing = smoothing_per_class * (weight_sum * log_sum + weighted_gap)
    loss += tl.where(label_smoothing > 0, smoothing, 0.0)  # masked (-inf) logits make the unused term NaN
    loss = tl.where(in_range, loss, float("nan"))  # an out-of-range target shows as a NaN loss
    tl.store(loss_ptr + row, tl.where(kept, loss, 0.0))
    tl.store(lse_ptr + row, tl.where(kept, lse, 0.0))

    if HAS_GRAD:
        target_coef = ce_scale * (1.0 - label_smoothing) * target_weight
        weight_coef = tl.div_rn(ce_scale * label_smoothing, tl.cast(num_classes, tl.float32))
        p_coef = (target_coef + _smoothing_term(weight_coef, weight_sum)
                  + 2.0 * tl.cast(z_loss, tl.float32) * z_scale * lse)
        g_row = grad_ptr + row * row_stride
        for start in range(0, num_classes, BLOCK):
            offsets = start + cols
            mask = offsets < num_classes
            z = _capped(tl.load(x_row + offsets, mask=mask & kept, other=0.0).to(tl.float32), softcap, SOFTCAP)
            if HAS_WEIGHT:
                w = tl.load(weight_ptr + offsets, mask=mask, other=0.0)
            else:
                w = 1.0
            g = (tl.exp(z - running_max) * inv_sum * p_coef - _smoothing_term(weight_coef, w)
                 - tl.where(offsets == target, target_coef, 0.0))
            if SOFTCAP:
                t = z / softcap
                g *= 1.0 - t * t
            g = tl.where(kept, g, 0.0)
            if GRAD_IS_BF16:
                tl.store(g_row + offsets, _bf16_nearest(g), mask=mask)
            else:
                tl.store(g_row + offsets, g.to(grad_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _shard_stats_kernel(
    logits_ptr,  # (N, V_shard), rows row_stride elements apart
    target_ptr,  # (N,) int64, indices into the whole vocabulary
    weight_ptr,  # (V_shard,) fp32 class weights of the shard (unused without HAS_WEIGHT)
    stats_ptr,  # (N, 4) fp32: max, sum of exp(z - max), target logit or 0, weighted gap below max (ShardRowStats)
    shard_classes,
    row_stride,
    class_start,
    num_classes,  # of the whole vocabulary
    ignore_index,
    softcap,
    HAS_WEIGHT: tl.constexpr,
    SOFTCAP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Pass 1 of a vocabulary-parallel row: pass 1 of the forward kernel over this rank's shard of it. A target
    outside the whole vocabulary gives a NaN target logit, hence a NaN loss, as the forward kernel does."""
    row = tl.program_id(0).to(tl.int64)
    x_row = logits_ptr + row * row_stride
    softcap = tl.cast(softcap, tl.float32)
    target = tl.load(target_ptr + row)
    kept = target != ignore_index
    row_length = tl.where(kept, shard_classes, 0)  # an ignored row reads nothing and combines into nothing
    running_max, running_sum, weighted_gap = _online_row_stats(x_row, weight_ptr, row_length, shard_classes, softcap,
                                                                HAS_WEIGHT, SOFTCAP, BLOCK)
    local_target = target - class_start
    here = kept & (local_target >= 0) & (local_target < shard_classes)
    target_logit = _capped(tl.load(x_row + tl.where(here, local_target, 0), mask=here, other=0.0).to(tl.float32),
                           softcap, SOFTCAP)
    in_range = (target >= 0) & (target < num_classes)
    out = stats_ptr + row * 4
    tl.store(out, tl.where(kept, running_max, 0.0))
    tl.store(out + 1, running_sum)
    tl.store(out + 2, tl.where(here, target_logit, tl.where(in_range | ~kept, 0.0, float("nan"))))
    tl.store(out + 3, weighted_gap)


@triton.jit
def _shard_grad_kernel(
    grad_ptr,  # (N, V_shard) like the logits, possibly the logits themselves
    logits_ptr,  # (N, V_shard)
    target_ptr,  # (N,) int64
    weight_ptr,  # (V_shard,) fp32 (unused without HAS_WEIGHT)
    coefs_ptr,  # (N, 5) fp32: max, 1 / sum, p_coef, weight_coef, target_coef (ShardRowCoefs)
    shard_classes,
    row_stride,
    class_start,
    ignore_index,
    softcap,
    HAS_WEIGHT: tl.constexpr,
    SOFTCAP: tl.constexpr,
    GRAD_IS_BF16: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Pass 2: the shard's gradient from the row's combined coefficients; each element is read by the program
    that then writes it, so the gradient may go over the logits."""
    row = tl.program_id(0).to(tl.int64)
    offsets = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < shard_classes
    softcap = tl.cast(softcap, tl.float32)
    target = tl.load(target_ptr + row)
    kept = target != ignore_index
    coefs = coefs_ptr + row * 5
    row_max = tl.load(coefs)
    inv_sum = tl.load(coefs + 1)
    p_coef = tl.load(coefs + 2)
    weight_coef = tl.load(coefs + 3)
    target_coef = tl.load(coefs + 4)
    z = _capped(tl.load(logits_ptr + row * row_stride + offsets, mask=mask & kept, other=0.0).to(tl.float32), softcap,
                SOFTCAP)
    if HAS_WEIGHT:
        w = tl.load(weight_ptr + offsets, mask=mask, other=0.0)
    else:
        w = 1.0
    g = (tl.exp(z - row_max) * inv_sum * p_coef - _smoothing_term(weight_coef, w)
         - tl.where(offsets == target - class_start, target_coef, 0.0))
    if SOFTCAP:
        t = z / softcap
        g *= 1.0 - t * t
    g = tl.where(kept, g, 0.0)
    pointers = grad_ptr + row * row_stride + offsets
    if GRAD_IS_BF16:
        tl.store(pointers, _bf16_nearest(g), mask=mask)
    else:
        tl.store(pointers, g.to(grad_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _scale_grad_kernel(
    grad_ptr,  # (N, V)
    scale_ptr,  # (N,) or (1,) fp32
    num_classes,
    row_stride,
    PER_ROW: tl.constexpr,
    GRAD_IS_BF16: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offsets = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    scale = tl.load(scale_ptr + row) if PER_ROW else tl.load(scale_ptr)
    # A scale of exactly 1 (a plain loss.backward()) masks every access: the row is neither read nor written.
    mask = (offsets < num_classes) & (tl.full([BLOCK], 1.0, tl.float32) != scale)
    pointers = grad_ptr + row * row_stride + offsets
    g = tl.load(pointers, mask=mask, other=0.0).to(tl.float32) * scale
    if GRAD_IS_BF16:
        tl.store(pointers, _bf16_nearest(g), mask=mask)
    else:
        tl.store(pointers, g.to(grad_ptr.dtype.element_ty), mask=mask)


def _block(num_classes: int) -> int:
    # 16 KB of bf16 or 32 KB of fp32 per piece: long pieces amortise the per-piece rescale and reductions.
    return min(triton.next_power_of_2(max(num_classes, 16)), 8192)


def cross_entropy_forward_triton(logits, target, weight, scales, grad, ignore_index, label_smoothing, z_loss,
                                 softcap):
    """The launcher of fused_optim::cross_entropy_forward_triton (arguments checked by the op)."""
    num_rows, num_classes = logits.shape
    loss = torch.empty(num_rows, dtype=torch.float32, device=logits.device)
    lse = torch.empty(num_rows, dtype=torch.float32, device=logits.device)
    if num_rows == 0:
        return loss, lse
    if num_classes == 0:  # no logit to read (the kernel reads a row's target logit at index 0 at least)
        return no_class_rows(target, ignore_index)
    block = _block(num_classes)
    _cross_entropy_forward_kernel[(num_rows,)](
        logits, target, weight if weight is not None else scales, scales, grad if grad is not None else logits,
        loss, lse, num_classes, logits.stride(0), ignore_index, label_smoothing, z_loss, softcap,
        HAS_WEIGHT=weight is not None, HAS_GRAD=grad is not None, SOFTCAP=softcap > 0,
        GRAD_IS_BF16=logits.dtype == torch.bfloat16, BLOCK=block, num_warps=8 if block >= 4096 else 4,
    )
    return loss, lse


def cross_entropy_scale_grad_triton(grad, row_scale):
    """The launcher of fused_optim::cross_entropy_scale_grad_triton_ (arguments checked by the op)."""
    num_rows, num_classes = grad.shape
    if num_rows == 0 or num_classes == 0:
        return
    block = min(triton.next_power_of_2(num_classes), 4096)
    _scale_grad_kernel[(num_rows, triton.cdiv(num_classes, block))](
        grad, row_scale, num_classes, grad.stride(0), PER_ROW=row_scale.numel() != 1,
        GRAD_IS_BF16=grad.dtype == torch.bfloat16, BLOCK=block,
    )


def cross_entropy_shard_stats_triton(logits, target, weight, class_start, num_classes, ignore_index, softcap):
    """The launcher of fused_optim::cross_entropy_shard_stats_triton (arguments checked by the op)."""
    num_rows, shard_classes = logits.shape
    stats = torch.empty(num_rows, 4, dtype=torch.float32, device=logits.device)
    if num_rows == 0:
        return stats
    block = _block(shard_classes)
    _shard_stats_kernel[(num_rows,)](
        logits, target, weight if weight is not None else stats, stats, shard_classes, logits.stride(0), class_start,
        num_classes, ignore_index, softcap, HAS_WEIGHT=weight is not None, SOFTCAP=softcap > 0, BLOCK=block,
        num_warps=8 if block >= 4096 else 4,
    )
    return stats


def cross_entropy_shard_grad_triton(grad, logits, target, weight, row_coefs, class_start, ignore_index, softcap):
    """The launcher of fused_optim::cross_entropy_shard_grad_triton_ (arguments checked by the op)."""
    num_rows, shard_classes = logits.shape
    if num_rows == 0 or shard_classes == 0:
        return
    block = min(triton.next_power_of_2(shard_classes), 4096)
    _shard_grad_kernel[(num_rows, triton.cdiv(shard_classes, block))](
        grad, logits, target, weight if weight is not None else row_coefs, row_coefs, shard_classes, logits.stride(0),
        class_start, ignore_index, softcap, HAS_WEIGHT=weight is not None, SOFTCAP=softcap > 0,
        GRAD_IS_BF16=grad.dtype == torch.bfloat16, BLOCK=block,
    )
