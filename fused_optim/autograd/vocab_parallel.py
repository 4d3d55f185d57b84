"""Vocabulary-parallel cross-entropy: logits sharded on the class dim (a DTensor with `Shard(1)`, as under torch's
`loss_parallel()`), or an lm-head weight sharded on its rows (`Shard(0)` of (V, H)), each rank holding the classes
[class_start, class_start + V_shard).

Each rank reads only its shard. Pass 1 (fused_optim::cross_entropy_shard_stats) reduces each row's shard to four
numbers: its max, its sum of exp(z - max), the target's logit when the target is in the shard (else 0) and the
weighted gap of its logits below its max (sum_j w_j * (max - z_j): cross_entropy.h). One all-gather of those N x 4
floats per call (per chunk of rows for the linear loss) gives every rank every shard's numbers; each rank combines
them (`combine`, below: the row max M, the sum S = sum_r sum_r exp(max_r - M), the loss from cross_entropy.h's formula, and the gradient's coefficients) and pass 2
(fused_optim::cross_entropy_shard_grad_) writes its shard's gradient from p_j = exp(z_j - M) / S. The loss and the
log-sum-exp come out as the unsharded kernel computes them, ((M - z_t) + log S and M + log S, in fp32), so every
option (ignore_index, label_smoothing, class weights, reductions, z_loss, softcap) gives the unsharded result, and
the gradient stays sharded like the logits.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fused_optim.ops import cross_entropy as ops
from fused_optim.ops._dtensor import DTensor, Replicate, Shard


class VocabShard:
    """This rank's shard of the vocabulary: which classes it holds and the group of ranks holding the others."""

    def __init__(self, mesh, mesh_dim: int, num_classes: int, shard_classes: int, what: str) -> None:
        self.mesh, self.mesh_dim, self.num_classes = mesh, mesh_dim, num_classes
        self.group = mesh.get_group(mesh_dim)
        self.ranks = ranks = mesh.size(mesh_dim)
        rank = mesh.get_local_rank(mesh_dim)
        # DTensor's Shard splits as torch.chunk does: ceil(V / ranks) classes a rank, the last ones fewer or none
        self.widest_shard = chunk = -(-num_classes // ranks)  # (the first ranks' count)
        self.class_start = min(rank * chunk, num_classes)
        self.shard_classes = min(chunk, num_classes - self.class_start)
        if shard_classes != self.shard_classes:
            raise RuntimeError(f"{what}: this rank holds {shard_classes} classes of {num_classes}, not the "
                               f"{self.shard_classes} of an even Shard; vocabulary-parallel losses take DTensor's "
                               "own sharding.")

    @staticmethod
    def of(tensor: Tensor, class_dim: int, what: str) -> VocabShard:
        """The vocabulary shard of a DTensor sharded on `class_dim` over one mesh dim and replicated over the rest."""
        placements = tensor.placements
        sharded = [d for d, p in enumerate(placements) if not p.is_replicate()]
        if len(sharded) != 1 or type(placements[sharded[0]]) is not Shard \
                or not placements[sharded[0]].is_shard(class_dim):
            raise ValueError(f"{what} must be sharded on the class dimension (Shard({class_dim})) over one mesh "
                             f"dimension and replicated over the others, got placements {tuple(placements)}.")
        return VocabShard(tensor.device_mesh, sharded[0], tensor.shape[class_dim],
                          tensor._local_tensor.shape[class_dim], what)

    def local_weight(self, weight: Tensor | None) -> Tensor | None:
        """The shard's class weights (the kernels' `weight`) from the whole vocabulary's."""
        if weight is None:
            return None
        return weight[self.class_start:self.class_start + self.shard_classes].contiguous()

    def replicated(self, tensor: Tensor) -> Tensor:
        """A result every rank computed alike, as a DTensor replicated on the mesh (what torch's loss_parallel
        returns); differentiable."""
        return DTensor.from_local(tensor, self.mesh, [Replicate()] * self.mesh.ndim, run_check=False)

    def rows(self, backend: str, weight: Tensor | None) -> ShardedRows:
        return ShardedRows(self, backend, weight)


class ShardedRows:
    """fused_optim::cross_entropy_forward's contract (per-row loss and lse in fp32, the gradient of the reduced loss
    written into `grad`) for a shard of the vocabulary: the two passes and the all-gather between them. `weight`
    holds the whole vocabulary's class weights (the target's weight may be in another shard); the `weight` a call
    receives is the shard's."""

    def __init__(self, shard: VocabShard, backend: str, weight: Tensor | None) -> None:
        self.shard, self.backend, self.weight = shard, backend, weight

    def __call__(self, logits, target, shard_weight, scales, grad, ignore_index, label_smoothing, z_loss, softcap):
        import torch.distributed._functional_collectives as funcol

        shard = self.shard
        stats = ops.shard_stats_op(self.backend, logits.device)(
            logits, target, shard_weight, shard.class_start, shard.num_classes, ignore_index, softcap)
        # (ranks, N, 4); the ranks counted, not inferred: an empty batch has no rows to infer them from
        # all_gather_single where torch has it (2.14 deprecates all_gather_tensor, which 2.11 has alone)
        all_gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor
        gathered = all_gather(stats, 0, shard.group).view(shard.ranks, *stats.shape)
        loss, lse, coefs = combine(gathered, target, self.weight, scales, shard.num_classes, ignore_index,
                                   label_smoothing, z_loss, grad is not None)
        if grad is not None:
            ops.shard_grad_op(self.backend, logits.device)(grad, logits, target, shard_weight, coefs,
                                                           shard.class_start, ignore_index, softcap)
        return loss, lse


def combine(gathered: Tensor, target: Tensor, weight: Tensor | None, scales: Tensor, num_classes: int,
            ignore_index: int, label_smoothing: float, z_loss: float, needs_grad: bool):
    """Every rank's ShardRowStats of a row (gathered: (ranks, N, 4)) into the row's loss and lse (N,) and pass 2's
    coefficients (N, 5), with cross_entropy.h's formulas in fp32; ignored rows give zeros."""
    maxes, sums, target_logits, weighted_gaps = gathered.unbind(-1)
    # a shard whose logits of the row are all -inf (a masked or padded vocabulary, or an empty shard) has max -inf
    # and sum 0 (gap 0), and adds its sum as it is, as OnlineLogSumExp.merge does: 0, or NaN where NaNs were among
    # them (a NaN leaves the max, not the sum), not sum * exp(-inf - row_max), which is NaN when every max is -inf
    row_max = maxes.amax(0)
    total = torch.where(maxes == -math.inf, sums, sums * torch.exp(maxes - row_max)).sum(0)
    log_sum = torch.log(total)
    lse = row_max + log_sum
    kept = target != ignore_index
    # clamped: a target in no shard (which only the Triton kernels let through) has a NaN target logit already,
    # and an index out of range here would fail (on a GPU, a device-side assert)
    safe_target = torch.where(kept, target, 0).clamp(0, num_classes - 1)
    target_weight = weight[safe_target] if weight is not None else torch.ones_like(lse)
    # (max - z_t) + log(sum), not lse - z_t: a confident row keeps its loss's precision (cross_entropy.h)
    loss = (1 - label_smoothing) * target_weight * ((row_max - target_logits.sum(0)) + log_sum)
    ce_scale, z_scale, weight_sum = scales.unbind()
    if label_smoothing > 0:  # each shard's gap below its own max, raised to the row's (an empty shard adds 0)
        shard_weights = shard_weight_sums(weight, num_classes, gathered.shape[0], gathered.device)[:, None]
        rise = torch.where((maxes < row_max) & (shard_weights != 0), shard_weights * (row_max - maxes), 0.0)
        gap = (weighted_gaps + rise).sum(0)
        loss = loss + label_smoothing / num_classes * (weight_sum * log_sum + gap)
    zero = torch.zeros_like(lse)
    coefs = None
    if needs_grad:
        target_coef = ce_scale * (1 - label_smoothing) * target_weight
        weight_coef = (ce_scale * label_smoothing / num_classes).expand_as(target_coef)
        p_coef = target_coef + ops.smoothing_term(weight_coef, weight_sum) + 2 * z_loss * z_scale * lse
        coefs = torch.stack([row_max, 1 / total, p_coef, weight_coef, target_coef], dim=1)
        coefs = torch.where(kept[:, None], coefs, 0.0).contiguous()
    return torch.where(kept, loss, zero), torch.where(kept, lse, zero), coefs


def shard_weight_sums(weight: Tensor | None, num_classes: int, ranks: int, device: torch.device) -> Tensor:
    """Each rank's sum of its classes' weights (its class count without weights), (ranks,) fp32, the classes split
    as VocabShard splits them: ceil(V / ranks) a rank, the last ones fewer or none. Device ops only."""
    chunk = -(-num_classes // ranks)
    weights = weight.float() if weight is not None else torch.ones(num_classes, device=device)
    return torch.nn.functional.pad(weights, (0, ranks * chunk - num_classes)).view(ranks, chunk).sum(1)


def replicated_local(tensor: Tensor | None, what: str) -> Tensor | None:
    """A plain tensor, or the local tensor of a DTensor replicated on its mesh (targets, class weights)."""
    if tensor is None or not isinstance(tensor, DTensor):
        return tensor
    if not all(p.is_replicate() for p in tensor.placements):
        raise ValueError(f"{what} of a vocabulary-parallel loss must be replicated, got placements "
                         f"{tuple(tensor.placements)}.")
    return tensor.to_local()


def replicated_like(tensor: Tensor | None, like: Tensor) -> Tensor | None:
    """A plain tensor as a DTensor replicated on `like`'s mesh (a DTensor, or None, as it is): a target or class
    weights beside DTensor logits in torch's own ops."""
    if tensor is None or isinstance(tensor, DTensor):
        return tensor
    return DTensor.from_local(tensor, like.device_mesh, [Replicate()] * like.device_mesh.ndim, run_check=False)


def input_for_sharded_weight(input: Tensor, shard: VocabShard) -> Tensor:
    """The hidden states a Shard(0) lm-head multiplies, as a local tensor whose gradient autograd sums over the
    vocabulary's ranks (each rank's grad_input covers its classes only): one all-reduce in the backward, through
    DTensor's Partial -> Replicate."""
    from torch.distributed.tensor import Partial

    if isinstance(input, DTensor):
        if not all(p.is_replicate() for p in input.placements):
            raise ValueError("input of a vocabulary-parallel linear cross-entropy must be a plain tensor or a DTensor "
                             f"replicated on the mesh, got placements {tuple(input.placements)}.")
        replicated = input
    else:
        replicated = shard.replicated(input)
    grad_placements = [Partial() if d == shard.mesh_dim else Replicate() for d in range(shard.mesh.ndim)]
    return replicated.to_local(grad_placements=grad_placements)
