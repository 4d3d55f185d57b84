"""Cross-entropy as torch.library ops: one op per backend, one schema, and the one place that picks a backend.

- `fused_optim::cross_entropy_forward(logits, target, weight, scales, grad, ...) -> (loss, lse)`: per row, the
  cross-entropy (with label smoothing, class weights, soft-capping) and its log-sum-exp, both fp32, 0 for ignored
  rows; when `grad` is given, also the gradient of `ce_scale * loss + z_scale * z_loss_coef * lse^2` written into it
  (`grad` may be the logits themselves). `scales` = (ce_scale, z_scale, sum of the class weights), fp32 on the
  device: the reduction's normalisers, computed from the targets without a host sync.
- `fused_optim::cross_entropy_scale_grad_(grad, row_scale)`: grad *= row_scale (one value or one per row); rows
  whose scale is exactly 1 are neither read nor written, so the backward of a plain `loss.backward()` moves nothing.

- `fused_optim::cross_entropy_shard_stats(logits, target, weight, class_start, num_classes, ...) -> stats` and
  `fused_optim::cross_entropy_shard_grad_(grad, logits, target, weight, row_coefs, class_start, ...)`: the two passes
  of a vocabulary-parallel row, whose logits hold the classes [class_start, class_start + V_shard) of a vocabulary
  of num_classes (csrc/include/fused_optim/cross_entropy.h, ShardRowStats): per row (max, sum of exp(z - max), the
  target's logit when it is in the shard else 0, sum of w_j z_j) as an (N, 4) fp32 tensor; then, from the row's
  combined (max, 1 / sum, p_coef, weight_coef, target_coef), the shard's gradient (`grad` may be the logits).

Kernels: csrc/cpu/cross_entropy.cpp and csrc/cuda/cross_entropy.cu (no suffix), Triton (`..._triton`), and plain
torch ops in fp32 (`..._torch`, the fallback).
"""

from __future__ import annotations

import math

import torch

from fused_optim.ops._library import FLOAT_DTYPES, define_op, resolve_op

FORWARD_SCHEMA = (
    "(Tensor logits, Tensor target, Tensor? weight, Tensor scales, Tensor(a!)? grad, int ignore_index, "
    "float label_smoothing, float z_loss, float softcap) -> (Tensor loss, Tensor lse)"
)
SCALE_GRAD_SCHEMA = "(Tensor(a!) grad, Tensor row_scale) -> ()"
SHARD_STATS_SCHEMA = ("(Tensor logits, Tensor target, Tensor? weight, int class_start, int num_classes, "
                      "int ignore_index, float softcap) -> Tensor")
SHARD_GRAD_SCHEMA = ("(Tensor(a!) grad, Tensor logits, Tensor target, Tensor? weight, Tensor row_coefs, "
                     "int class_start, int ignore_index, float softcap) -> ()")


def _forward_fake(logits, target, weight, scales, grad, ignore_index, label_smoothing, z_loss, softcap):
    rows = logits.new_empty(logits.shape[0], dtype=torch.float32)
    return rows, torch.empty_like(rows)


def _shard_stats_fake(logits, target, weight, class_start, num_classes, ignore_index, softcap):
    return logits.new_empty(logits.shape[0], 4, dtype=torch.float32)


def check_forward_args(logits, target, weight, scales, grad) -> None:
    """The Python twin of csrc/ops/cross_entropy.h's checks, for the Triton and torch ops."""
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise RuntimeError("cross_entropy_forward: logits must be (N, V) with unit column stride")
    if logits.dtype not in FLOAT_DTYPES:
        raise RuntimeError("cross_entropy_forward: logits must be float32, bfloat16 or float16")
    if target.shape != logits.shape[:1] or target.dtype != torch.int64 or not target.is_contiguous() \
            or target.device != logits.device:
        raise RuntimeError("cross_entropy_forward: target must be a contiguous int64 (N,) tensor on the logits' device")
    if scales.dtype != torch.float32 or scales.numel() != 3 or scales.device != logits.device:
        raise RuntimeError("cross_entropy_forward: scales must be three float32 values on the logits' device")
    if weight is not None and (weight.dtype != torch.float32 or weight.shape != logits.shape[1:]
                               or not weight.is_contiguous() or weight.device != logits.device):
        raise RuntimeError("cross_entropy_forward: weight must be a contiguous float32 tensor of V values on the "
                           "logits' device")
    if grad is not None and (grad.shape != logits.shape or grad.stride() != logits.stride()
                             or grad.dtype != logits.dtype or grad.device != logits.device):
        raise RuntimeError("cross_entropy_forward: grad must have the logits' shape, strides, dtype and device")


def check_scale_grad_args(grad, row_scale) -> None:
    if grad.dim() != 2 or grad.stride(1) != 1 or grad.dtype not in FLOAT_DTYPES:
        raise RuntimeError("cross_entropy_scale_grad_: grad must be a float32, bfloat16 or float16 (N, V) tensor "
                           "with unit column stride")
    if row_scale.dtype != torch.float32 or row_scale.numel() not in (1, grad.shape[0]) \
            or not row_scale.is_contiguous() or row_scale.device != grad.device:
        raise RuntimeError("cross_entropy_scale_grad_: row_scale must be float32 on grad's device, one value or one "
                           "per row")


def check_shard_args(op, logits, target, weight, class_start) -> None:
    """The Python twin of csrc/ops/cross_entropy.h's check_shard_args."""
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise RuntimeError(f"{op}: logits must be (N, V) with unit column stride")
    if logits.dtype not in FLOAT_DTYPES:
        raise RuntimeError(f"{op}: logits must be float32, bfloat16 or float16")
    if target.shape != logits.shape[:1] or target.dtype != torch.int64 or not target.is_contiguous() \
            or target.device != logits.device:
        raise RuntimeError(f"{op}: target must be a contiguous int64 (N,) tensor on the logits' device")
    if class_start < 0:
        raise RuntimeError(f"{op}: class_start must be >= 0")
    if weight is not None and (weight.dtype != torch.float32 or weight.shape != logits.shape[1:]
                               or not weight.is_contiguous() or weight.device != logits.device):
        raise RuntimeError(f"{op}: weight must be a contiguous float32 tensor of the shard's V values on the logits' "
                           "device")


def check_shard_grad_args(grad, logits, target, weight, row_coefs, class_start) -> None:
    check_shard_args("cross_entropy_shard_grad_", logits, target, weight, class_start)
    if row_coefs.dtype != torch.float32 or row_coefs.shape != (logits.shape[0], 5) or not row_coefs.is_contiguous() \
            or row_coefs.device != logits.device:
        raise RuntimeError("cross_entropy_shard_grad_: row_coefs must be a contiguous float32 (N, 5) tensor on the "
                           "logits' device")
    if grad.shape != logits.shape or grad.stride() != logits.stride() or grad.dtype != logits.dtype \
            or grad.device != logits.device:
        raise RuntimeError("cross_entropy_shard_grad_: grad must have the logits' shape, strides, dtype and device")


def _check_targets_on_cpu(target, kept, num_classes) -> None:
    """torch's IndexError for a class index out of range: on a CPU tensor, reading it is no device sync."""
    if target.device.type == "cpu":
        bad = kept & ((target < 0) | (target >= num_classes))
        if bool(bad.any()):
            raise IndexError(f"Target {int(target[bad][0])} is out of bounds.")


def no_class_rows(target, ignore_index) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward's (loss, lse) rows of logits with no class: 0 for an ignored row, NaN for any other (its target
    is out of range, which the Triton kernels show as NaN and the CPU check refuses first)."""
    rows = torch.where(target == ignore_index, 0.0, math.nan).to(torch.float32)
    return rows, rows.clone()  # (an op's two outputs may not share memory)


def _capped_fp32(logits, softcap) -> torch.Tensor:
    z = logits.float()
    return softcap * torch.tanh(z / softcap) if softcap > 0 else z


def _shard_stats_torch(logits, target, weight, class_start, num_classes, ignore_index, softcap):
    check_shard_args("cross_entropy_shard_stats", logits, target, weight, class_start)
    kept = target != ignore_index
    _check_targets_on_cpu(target, kept, num_classes)
    z = _capped_fp32(logits, softcap)
    shard_classes = z.shape[1]
    row_max = z.amax(dim=1) if shard_classes else z.new_full(z.shape[:1], -torch.inf)
    # a shard of masked (-inf) logits sums to 0 (cross_entropy.h): against 0, not its max (-inf - -inf is NaN)
    sums = torch.exp(z - torch.where(row_max == -torch.inf, 0.0, row_max)[:, None]).sum(1)
    local_target = target - class_start
    here = kept & (local_target >= 0) & (local_target < shard_classes)
    target_logit = z.gather(1, torch.where(here, local_target, 0)[:, None])[:, 0] if shard_classes \
        else torch.zeros_like(row_max)
    stats = torch.stack([row_max, sums, torch.where(here, target_logit, 0.0), _weighted_gap(z, row_max, weight)],
                        dim=1)
    return torch.where(kept[:, None], stats, 0.0)


def _shard_grad_torch(grad, logits, target, weight, row_coefs, class_start, ignore_index, softcap):
    check_shard_grad_args(grad, logits, target, weight, row_coefs, class_start)
    kept = target != ignore_index
    z = _capped_fp32(logits, softcap)
    row_max, inv_sum, p_coef, weight_coef, target_coef = (c[:, None] for c in row_coefs.unbind(1))
    g = torch.exp(z - row_max) * inv_sum * p_coef - smoothing_term(weight_coef, weight)
    local_target = target - class_start
    here = kept & (local_target >= 0) & (local_target < z.shape[1])
    if z.shape[1]:
        g.scatter_add_(1, torch.where(here, local_target, 0)[:, None], torch.where(here[:, None], -target_coef, 0.0))
    if softcap > 0:
        g *= 1 - (z / softcap) ** 2
    grad.copy_(torch.where(kept[:, None], g, 0.0))


def _shard_stats_triton(logits, target, weight, class_start, num_classes, ignore_index, softcap):
    from fused_optim.triton.cross_entropy import cross_entropy_shard_stats_triton

    check_shard_args("cross_entropy_shard_stats", logits, target, weight, class_start)
    return cross_entropy_shard_stats_triton(logits, target, weight, class_start, num_classes, ignore_index, softcap)


def _shard_grad_triton(grad, logits, target, weight, row_coefs, class_start, ignore_index, softcap):
    from fused_optim.triton.cross_entropy import cross_entropy_shard_grad_triton

    check_shard_grad_args(grad, logits, target, weight, row_coefs, class_start)
    cross_entropy_shard_grad_triton(grad, logits, target, weight, row_coefs, class_start, ignore_index, softcap)


def _forward_triton(logits, target, weight, scales, grad, ignore_index, label_smoothing, z_loss, softcap):
    from fused_optim.triton.cross_entropy import cross_entropy_forward_triton

    check_forward_args(logits, target, weight, scales, grad)
    return cross_entropy_forward_triton(logits, target, weight, scales, grad, ignore_index, label_smoothing, z_loss,
                                        softcap)


def _scale_grad_triton(grad, row_scale):
    from fused_optim.triton.cross_entropy import cross_entropy_scale_grad_triton

    check_scale_grad_args(grad, row_scale)
    cross_entropy_scale_grad_triton(grad, row_scale)


def _weighted_gap(z: torch.Tensor, row_max: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """sum_j w_j * (max - z_j) of each row (cross_entropy.h: the smoothing term without cancellation)."""
    gap = torch.where(z < row_max[:, None], row_max[:, None] - z, 0.0)
    return (gap * weight).sum(1) if weight is not None else gap.sum(1)


def smoothing_term(weight_coef: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """A smoothing term of the gradient, weight_coef * w (w a class weight, or their sum): 0 where weight_coef is 0,
    not 0 * inf (cross_entropy.h)."""
    term = weight_coef * (weight if weight is not None else 1.0)
    return torch.where(weight_coef != 0, term, 0.0)


def _forward_torch(logits, target, weight, scales, grad, ignore_index, label_smoothing, z_loss, softcap):
    """The same contract in plain torch ops, fp32 (it materialises a few (N, V) fp32 temporaries)."""
    check_forward_args(logits, target, weight, scales, grad)
    num_classes = logits.shape[1]
    kept = target != ignore_index
    _check_targets_on_cpu(target, kept, num_classes)
    if num_classes == 0:  # no logit to take a max or a target's of
        return no_class_rows(target, ignore_index)
    safe_target = torch.where(kept, target, 0)
    z = _capped_fp32(logits, softcap)
    row_max = z.amax(dim=1)
    exp_shifted = torch.exp(z - row_max[:, None])
    sum_exp = exp_shifted.sum(1)
    log_sum = torch.log(sum_exp)
    lse = row_max + log_sum
    target_logit = z.gather(1, safe_target[:, None])[:, 0]
    target_weight = weight[safe_target] if weight is not None else torch.ones_like(lse)
    ce_scale, z_scale, weight_sum = scales.unbind()
    loss = (1 - label_smoothing) * target_weight * ((row_max - target_logit) + log_sum)  # see cross_entropy.h
    if label_smoothing > 0:
        loss = loss + label_smoothing / num_classes * (weight_sum * log_sum + _weighted_gap(z, row_max, weight))
    if grad is not None:
        target_coef = ce_scale * (1 - label_smoothing) * target_weight
        weight_coef = ce_scale * label_smoothing / num_classes
        p_coef = target_coef + smoothing_term(weight_coef, weight_sum) + 2 * z_loss * z_scale * lse
        g = exp_shifted / sum_exp[:, None] * p_coef[:, None]
        g -= smoothing_term(weight_coef, weight)
        g.scatter_add_(1, safe_target[:, None], -target_coef[:, None])
        if softcap > 0:
            g *= 1 - (z / softcap) ** 2
        grad.copy_(torch.where(kept[:, None], g, 0.0))
    zero = torch.zeros_like(lse)
    return torch.where(kept, loss, zero), torch.where(kept, lse, zero)


def _scale_grad_torch(grad, row_scale):
    check_scale_grad_args(grad, row_scale)
    grad.mul_(row_scale.view(-1, 1) if row_scale.numel() != 1 else row_scale.view(()))


define_op("cross_entropy_forward", FORWARD_SCHEMA, fake=_forward_fake, torch_impl=_forward_torch,
          triton_impl=_forward_triton)
define_op("cross_entropy_scale_grad_", SCALE_GRAD_SCHEMA, fake=lambda grad, row_scale: None,
          torch_impl=_scale_grad_torch, triton_impl=_scale_grad_triton)
define_op("cross_entropy_shard_stats", SHARD_STATS_SCHEMA, fake=_shard_stats_fake, torch_impl=_shard_stats_torch,
          triton_impl=_shard_stats_triton)
define_op("cross_entropy_shard_grad_", SHARD_GRAD_SCHEMA, fake=lambda *args: None, torch_impl=_shard_grad_torch,
          triton_impl=_shard_grad_triton)


def forward_op(backend: str, device: torch.device):
    """The cross_entropy_forward op of `backend` ("auto", "cuda", ...) for tensors on `device`."""
    return resolve_op("cross_entropy_forward", backend, device.type)


def scale_grad_op(backend: str, device: torch.device):
    return resolve_op("cross_entropy_scale_grad_", backend, device.type)


def shard_stats_op(backend: str, device: torch.device):
    return resolve_op("cross_entropy_shard_stats", backend, device.type)


def shard_grad_op(backend: str, device: torch.device):
    return resolve_op("cross_entropy_shard_grad_", backend, device.type)
