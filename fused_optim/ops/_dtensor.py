"""DTensor inputs (FSDP2, tensor parallel), for every op, in this one place: the ops run on the local shards.

Why unwrap here rather than register a sharding strategy for each op (`register_sharding`):
- Every update op of ours (Adam, SGD, gradient accumulation) is elementwise per tensor, so a param's update needs
  only its own shard of the grad and the state: the local tensors are the whole work, with no gather and no copy.
  Unwrapping a list costs one attribute read per tensor; DTensor's dispatch would run sharding propagation for
  each op call and each of our 12 op names (one per backend) would need its own strategy.
- The norms need a cross-rank combine that DTensor placements cannot express in one step: the p-th powers of the
  shards are summed, a replicated tensor must be counted once (not once per replica), and a 2-D FSDP x TP mesh
  holds tensors sharded over both dims beside tensors replicated over one (and FSDP2 puts the modules left out of
  tensor parallelism on the data-parallel submesh). `mesh_norm` does that with one collective per root mesh,
  whatever the number of tensors.
- The optimizer state is made from the params with torch's own factory ops (`torch.zeros_like(p)`), which DTensor
  runs: it is a DTensor with the param's mesh and placements, as torch's optimizers keep it, so `state_dict()`,
  torch.distributed.checkpoint and resharding see what they see with torch's.

A list handed to an op is all DTensors (each with the mesh and placements of the first list's tensor at the same
index: a grad like its param) or all plain tensors; anything else is refused with one sentence. The DTensors of one
list may be on different meshes (a 2-D mesh and its submeshes, as torch's optimizers take them): their local
tensors are on this rank's device all the same, and the op runs once over all of them.
"""

from __future__ import annotations

import math
import operator
import zlib
from collections.abc import Callable, Sequence
from itertools import chain, repeat

import torch
import torch.distributed as dist
from torch import Tensor

if dist.is_available():
    from torch.distributed.tensor import DTensor, Replicate, Shard
else:  # a torch built without distributed support has no DTensors to unwrap
    DTensor = Replicate = Shard = None


def is_dtensor(t: object) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


_LAYOUT = operator.attrgetter("device_mesh", "placements")  # layout() of a DTensor, by a C-level getter
_LOCAL_TENSOR = operator.attrgetter("_local_tensor")


def layout(t: Tensor) -> tuple | None:
    """(mesh, placements) of a DTensor, None for a plain tensor: two tensors with equal layouts are sharded alike."""
    return _LAYOUT(t) if is_dtensor(t) else None


def same_layouts(tensors: Sequence[Tensor], like: Sequence[Tensor]) -> bool:
    """Whether DTensors tensors[i] and like[i] have equal layouts for every i (of the shorter list). In C-level loops
    and a pair at a time: two lists of a thousand layout tuples would set off Python's garbage collector."""
    return all(map(operator.eq, map(_LAYOUT, tensors), map(_LAYOUT, like)))


def to_local(op: str, *lists: Sequence[Tensor]) -> list[list[Tensor]]:
    """The local shards of `lists` (each all DTensors, each tensor laid out as the first list's tensor at its index)
    or the lists unchanged when they hold plain tensors. `op` names the caller in the error."""
    kinds = set(map(type, chain.from_iterable(lists)))
    if DTensor is None or DTensor not in kinds:
        return [list(tensors) for tensors in lists]
    if kinds != {DTensor}:
        raise RuntimeError(f"{op}: the tensors must be all DTensors or all plain tensors, not a mix.")
    reference = next(tensors for tensors in lists if tensors)
    for tensors in lists:
        if tensors is not reference and not same_layouts(tensors, reference):
            raise RuntimeError(f"{op}: every DTensor must have the mesh and placements of its param.")
    # _local_tensor rather than to_local(): the ops run under no_grad and the autograd wrapper costs microseconds
    # a tensor, which a step over a thousand tensors would pay every time.
    return [list(map(_LOCAL_TENSOR, tensors)) for tensors in lists]


def on_local_shards(fn: Callable[..., Tensor | tuple[Tensor, ...]], like: Tensor, *others: Tensor
                    ) -> Tensor | tuple[Tensor, ...]:
    """fn(like, *others) elementwise over plain tensors; over DTensors of one layout, fn of their local shards,
    returned as a DTensor laid out as `like` (no communication), or a tuple of them where fn returns a tuple."""
    if not is_dtensor(like):
        return fn(like, *others)
    local = fn(like.to_local(), *(t.to_local() for t in others))

    def laid_out_as_like(shard: Tensor) -> Tensor:
        return DTensor.from_local(shard, like.device_mesh, like.placements, run_check=False, shape=like.shape,
                                  stride=like.stride())

    return tuple(map(laid_out_as_like, local)) if isinstance(local, tuple) else laid_out_as_like(local)


def largest_shard_numel(p: Tensor) -> int:
    """The element count of a DTensor's largest local shard (the first ranks' along each sharded dim, as
    torch.chunk splits)."""
    shape = list(p.shape)
    for mesh_dim, placement in enumerate(p.placements):
        if not placement.is_replicate():  # Shard, or FSDP2's _StridedShard under tensor parallelism
            shape[placement.dim] = -(-shape[placement.dim] // p.device_mesh.size(mesh_dim))
    return math.prod(shape)


def rank_rows(local: Tensor, like: Tensor, width: int) -> Tensor:
    """This rank's plain `local` (2-D: rows of per-rank values, such as int8 block scales of the local shard of the
    DTensor `like`) as row r of a DTensor over `like`'s mesh that every rank shares, r the rank's place in the
    mesh, its last dim padded with zeros to `width` (the same on every rank), and one row more: the fingerprint of
    the shard (`shard_fingerprint`). A distributed checkpoint keeps a plain tensor once, as if each rank held the
    same; this way it keeps each rank's own (`local_rows` takes it back, on the sharding it was saved from)."""
    mesh = like.device_mesh
    padded = local.new_zeros(1, local.shape[0] + 1, width)
    padded[0, :-1, :local.shape[1]] = local
    fingerprint = shard_fingerprint(like, width)
    padded[0, -1, :fingerprint.numel()] = fingerprint.view(local.dtype)
    rows = local.shape[0] + 1
    return DTensor.from_local(padded, mesh, [Shard(0)] * mesh.ndim, run_check=False,
                              shape=(mesh.size(), rows, width), stride=(rows * width, width, 1))


def local_rows(rows: Tensor, like: Tensor, width: int) -> Tensor:
    """This rank's rows of a `rank_rows` DTensor, their first `width` columns, where they were saved from this
    rank's shard of `like` (else ValueError: the blocks they scale are another sharding's); a plain tensor passes
    unchanged."""
    if not is_dtensor(rows):
        return rows
    local = rows.to_local()
    if local.dim() != 3 or local.shape[0] != 1:
        return local  # check_saved_state says what is wrong
    fingerprint = shard_fingerprint(like, local.shape[2])
    if not torch.equal(local[0, -1, :fingerprint.numel()].view(torch.int16), fingerprint.to(local.device)):
        raise ValueError(f"int8 moment scales saved from another sharding than this rank's shard of a param "
                         f"({tuple(like.to_local().shape)} of {tuple(like.shape)}, placements "
                         f"{tuple(like.placements)}): a checkpoint of int8 moments in our own form loads on the "
                         "sharding it was saved from; save it inside opt.torch_layout() to reshard it")
    return local[0, :-1, :width].contiguous()


def shard_fingerprint(like: Tensor, width: int) -> Tensor:
    """Up to `width` int16 numbers (two where there is room) that tell this rank's shard of the DTensor `like`
    from the shard of another sharding: a CRC of the global and local shapes, the mesh's shape, this rank's place
    in it and the placements (kind, dim, split factor: plain numbers, the same on every torch version). The blocks
    of 64 elements that int8 scales serve run along the local shard's memory, so scales saved from another sharding
    with as many blocks would scale other elements."""
    mesh = like.device_mesh
    placements = [(type(placement).__name__, getattr(placement, "dim", None), getattr(placement, "split_factor", None))
                  for placement in like.placements]
    key = repr((tuple(like.shape), tuple(like.to_local().shape), tuple(mesh.shape), tuple(mesh.get_coordinate()),
                placements))
    crc = zlib.crc32(key.encode())
    halves = [crc & 0xFFFF, crc >> 16][:max(1, min(width, 2))]
    return torch.tensor([half - 0x10000 if half >= 0x8000 else half for half in halves], dtype=torch.int16)


def rank_seed(seed: int, tensors: Sequence[Tensor]) -> int:
    """A stochastic-rounding seed for this rank's shards of DTensors of one layout (plain tensors: `seed`). The
    kernels draw by position in the local tensor, so each shard needs a seed of its own, taken from its coordinates
    along the mesh dims that shard it: the replicas of a shard (its ranks along Replicate dims: HSDP, a tensor-
    parallel model's replicated params) draw the same numbers, as they must to stay equal."""
    if not tensors or not is_dtensor(tensors[0]):
        return seed
    mesh, placements = tensors[0].device_mesh, tensors[0].placements
    coordinate = mesh.get_coordinate()
    shard = 0  # the shard's index among the tensor's shards
    for mesh_dim, placement in enumerate(placements):
        if not placement.is_replicate():  # Shard, or FSDP2's _StridedShard (whose is_shard() is False)
            shard = shard * mesh.size(mesh_dim) + coordinate[mesh_dim]
    return (seed + 1_000_003 * shard) % (2**31 - 1)


def by_layout(seed: int, lists: list[list]) -> list[tuple[int, list[list]]]:
    """`lists` (params first, each list empty or one entry per param) as one op call per DTensor layout of the
    params (mesh and placements), each with its seed for this rank (rank_seed; the calls' seeds differ, so that
    shard 0 of two layouts does not draw alike); plain tensors, or DTensors of one layout, as one call."""
    params = lists[0]
    if not params or not is_dtensor(params[0]):
        return [(seed, lists)]
    if same_layouts(params, repeat(params[0])):  # FSDP2: the common case, and a third of the host time of the
        return [(rank_seed(seed, params), lists)]  # split below (1000 params)
    layouts: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        layouts.setdefault(_LAYOUT(p), []).append(i)
    calls = []
    for call, indices in enumerate(layouts.values()):
        picked = [[tensors[i] for i in indices] if tensors else [] for tensors in lists]
        calls.append((rank_seed(seed + 0x9E3779B1 * call, picked[0]), picked))
    return calls


def mesh_group(mesh) -> dist.ProcessGroup:
    """The process group of every rank of `mesh` (a 2-D mesh's too): one collective over the whole mesh."""
    if mesh.ndim == 1:
        return mesh.get_group()
    if mesh.size() == dist.get_world_size():
        return dist.group.WORLD
    return mesh._flatten().get_group()


def reduction_mesh(mesh) -> tuple[object, tuple[int, ...]]:
    """(the mesh whose ranks a norm over `mesh`'s DTensors is reduced over, the dims of it that `mesh`'s dims are).

    A submesh (`mesh_2d["dp"]`, where FSDP2 puts the modules a 2-D FSDP x TP model leaves out of tensor
    parallelism) is reduced over its root mesh, its shards being replicated over the root's other dims: then the
    params of the whole model, on the root and its submeshes, take one collective. A mesh whose place in its root
    is not known by dim name is reduced over itself."""
    get_root = getattr(mesh, "_get_root_mesh", None)
    root = get_root() if get_root is not None else mesh
    names, root_names = mesh.mesh_dim_names, getattr(root, "mesh_dim_names", None)
    if root is not mesh and names and root_names and all(name in root_names for name in names):
        return root, tuple(root_names.index(name) for name in names)
    return mesh, tuple(range(mesh.ndim))


def mesh_norm(tensors: Sequence[Tensor], norm_type: float, local_norm: Callable[[list[Tensor]], Tensor]) -> Tensor:
    """The `norm_type`-norm of DTensors, taken over their global elements: a 0-dim DTensor of `local_norm`'s dtype
    (fp64 where some tensor is fp64 or complex, else fp32), replicated on the (root) mesh. `local_norm` is the norm
    kernel over a list of local tensors.

    Shards are summed and a replica is counted once: each tensor's local norm is taken, in one kernel call per kind
    of placement, and kept only by the ranks at coordinate 0 of every mesh dim the tensor is replicated over (a
    submesh's tensor: also of the root's dims outside the submesh). The p-th powers are added in fp64 and summed
    across the mesh with one all-reduce per root mesh (inf: one max of the largest value and a NaN flag, since a max
    may drop a NaN). Any NaN or inf on any rank gives a NaN or inf norm on every rank: the inf check of a step is
    global too. Nothing is read on the host."""
    import torch.distributed._functional_collectives as funcol

    def place(t: Tensor) -> tuple[object, tuple[int, ...]]:
        """(t's root mesh, the root dims t is replicated over)"""
        if any(placement.is_partial() for placement in t.placements):
            raise RuntimeError("total_norm: a DTensor with a Partial placement has no norm yet; redistribute it to "
                               "Shard or Replicate first.")
        root, dims = reduction_mesh(t.device_mesh)
        replicated = {dims[d] for d, placement in enumerate(t.placements) if placement.is_replicate()}
        return root, tuple(sorted(replicated | (set(range(root.ndim)) - set(dims))))

    # root mesh -> the root dims a tensor is replicated over -> local tensors
    by_root: dict[object, dict[tuple[int, ...], list[Tensor]]] = {}
    if same_layouts(tensors, repeat(tensors[0])):  # one layout (FSDP2's), placed once: 4 us a tensor less
        root, replicated = place(tensors[0])
        by_root[root] = {replicated: list(map(_LOCAL_TENSOR, tensors))}
    else:
        for t in tensors:
            root, replicated = place(t)
            by_root.setdefault(root, {}).setdefault(replicated, []).append(t._local_tensor)
    totals, dtype = [], torch.float32
    for root, by_replicated_dims in by_root.items():
        coordinate = root.get_coordinate()
        local_norms = []
        for replicated, local_tensors in by_replicated_dims.items():
            norm = local_norm(local_tensors)
            counted_here = all(coordinate[dim] == 0 for dim in replicated)
            local_norms.append(norm if counted_here else torch.zeros_like(norm))
        local = torch.stack(local_norms)
        dtype = torch.promote_types(dtype, local.dtype)
        if math.isinf(norm_type):
            largest = local.amax()  # keeps NaN
            is_nan = torch.isnan(largest)
            message = torch.stack([torch.where(is_nan, math.inf, largest), is_nan.to(largest.dtype)])
            reduced = funcol.all_reduce(message, "max", mesh_group(root))
            totals.append(torch.where(reduced[1] > 0, math.nan, reduced[0]).double())
        else:
            totals.append(funcol.all_reduce((local.double() ** norm_type).sum(), "sum", mesh_group(root)))
    if math.isinf(norm_type):
        total = torch.stack(totals).amax()
    else:
        total = torch.stack(totals).sum() ** (1.0 / norm_type)
    mesh = next(iter(by_root))
    return DTensor.from_local(total.to(dtype), mesh, [Replicate()] * mesh.ndim, run_check=False)
