"""DTensor inputs (FSDP2, tensor parallel), for every op, in this one place: the ops run on the local shards.

Why unwrap here rather than register a sharding strategy for each op (`register_sharding`):
- Every update op of ours (Adam, SGD, gradient accumulation) is elementwise per tensor, so a param's update needs
  only its own shard of the grad and the state: the local tensors are the whole work, with no gather and no copy.
  Unwrapping a list costs one attribute read per tensor; DTensor's dispatch would run sharding propagation for
  each op call and each of our 12 op names (one per backend) would need its own strategy.
- The norms need a cross-rank combine that DTensor placements cannot express in one step: the p-th powers of the
  shards are summed, a replicated tensor must be counted once (not once per replica), and a 2-D FSDP x TP mesh
  holds tensors sharded over both dims beside tensors replicated over one. `mesh_norm` does that with one
  collective per mesh, whatever the number of tensors.
- The optimizer state is made from the params with torch's own factory ops (`torch.zeros_like(p)`), which DTensor
  runs: it is a DTensor with the param's mesh and placements, as torch's optimizers keep it, so `state_dict()`,
  torch.distributed.checkpoint and resharding see what they see with torch's.

A list handed to an op is all DTensors (one mesh, and each with the placements of the first list's tensor at the
same index: a grad like its param) or all plain tensors; anything else is refused with one sentence.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

if dist.is_available():
    from torch.distributed.tensor import DTensor, Replicate, Shard
else:  # a torch built without distributed support has no DTensors to unwrap
    DTensor = Replicate = Shard = None


def is_dtensor(t: object) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def layout(t: Tensor) -> tuple | None:
    """(mesh, placements) of a DTensor, None for a plain tensor: two tensors with equal layouts are sharded alike."""
    return (t.device_mesh, t.placements) if is_dtensor(t) else None


def to_local(op: str, *lists: Sequence[Tensor]) -> list[list[Tensor]]:
    """The local shards of `lists` (each all DTensors, each tensor laid out as the first list's tensor at its index)
    or the lists unchanged when they hold plain tensors. `op` names the caller in the error."""
    kinds = {type(t) for tensors in lists for t in tensors}
    if DTensor is None or DTensor not in kinds:
        return [list(tensors) for tensors in lists]
    if kinds != {DTensor}:
        raise RuntimeError(f"{op}: the tensors must be all DTensors or all plain tensors, not a mix.")
    reference = next(tensors for tensors in lists if tensors)
    for tensors in lists:
        if tensors and [layout(t) for t in tensors] != [layout(t) for t in reference[:len(tensors)]]:
            raise RuntimeError(f"{op}: every DTensor must have the mesh and placements of its param.")
    # _local_tensor rather than to_local(): the ops run under no_grad and the autograd wrapper costs microseconds
    # a tensor, which a step over a thousand tensors would pay every time.
    return [[t._local_tensor for t in tensors] for tensors in lists]


def rank_seed(seed: int, tensors: Sequence[Tensor]) -> int:
    """A stochastic-rounding seed of this rank's own for DTensor shards: the kernels draw by position in the local
    tensor, so without it every rank would round its shard with the same random numbers."""
    if tensors and is_dtensor(tensors[0]):
        return (seed + 1_000_003 * tensors[0].device_mesh.get_rank()) % (2**31 - 1)
    return seed


def mesh_group(mesh) -> dist.ProcessGroup:
    """The process group of every rank of `mesh` (a 2-D mesh's too): one collective over the whole mesh."""
    if mesh.ndim == 1:
        return mesh.get_group()
    if mesh.size() == dist.get_world_size():
        return dist.group.WORLD
    return mesh._flatten().get_group()


def mesh_norm(tensors: Sequence[Tensor], norm_type: float, local_norm: Callable[[list[Tensor]], Tensor]) -> Tensor:
    """The `norm_type`-norm of DTensors on one mesh, taken over their global elements: a 0-dim fp32 DTensor,
    replicated on the mesh. `local_norm` is the norm kernel over a list of local tensors.

    Shards are summed over the mesh and a replica is counted once: each tensor's local norm is taken, in one kernel
    call per kind of placement, and kept only by the ranks at coordinate 0 of every mesh dim the tensor is
    replicated over. The p-th powers are added in fp64 and summed across the mesh with one all-reduce (inf: one
    max of the largest value and a NaN flag, since a max may drop a NaN). Any NaN or inf on any rank gives a
    NaN or inf norm on every rank: the inf check of a step is global too. Nothing is read on the host."""
    import torch.distributed._functional_collectives as funcol

    mesh = tensors[0].device_mesh
    if any(t.device_mesh != mesh for t in tensors):
        raise RuntimeError("total_norm: DTensors on different device meshes; take each mesh's norm on its own.")
    by_replicated_dims: dict[tuple[int, ...], list[Tensor]] = {}
    for t in tensors:
        if any(placement.is_partial() for placement in t.placements):
            raise RuntimeError("total_norm: a DTensor with a Partial placement has no norm yet; redistribute it to "
                               "Shard or Replicate first.")
        replicated = tuple(dim for dim, placement in enumerate(t.placements) if placement.is_replicate())
        by_replicated_dims.setdefault(replicated, []).append(t._local_tensor)
    coordinate = mesh.get_coordinate()
    local_norms = []
    for replicated, local_tensors in by_replicated_dims.items():
        norm = local_norm(local_tensors)
        counted_here = all(coordinate[dim] == 0 for dim in replicated)
        local_norms.append(norm if counted_here else torch.zeros_like(norm))
    local = torch.stack(local_norms)
    group = mesh_group(mesh)
    if math.isinf(norm_type):
        largest = local.amax()  # keeps NaN
        is_nan = torch.isnan(largest)
        message = torch.stack([torch.where(is_nan, math.inf, largest), is_nan.to(largest.dtype)])
        reduced = funcol.all_reduce(message, "max", group)
        total = torch.where(reduced[1] > 0, math.nan, reduced[0])
    else:
        powers = funcol.all_reduce((local.double() ** norm_type).sum(), "sum", group)
        total = powers ** (1.0 / norm_type)
    total = total.to(torch.float32)
    return DTensor.from_local(total, mesh, [Replicate()] * mesh.ndim, run_check=False)
