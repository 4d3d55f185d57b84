"""`fused_optim.clip_grad_norm_`: torch.nn.utils.clip_grad_norm_'s signature and result, in two multi-tensor passes.

The first pass reads every grad once for the global norm (fused_optim/ops/total_norm.py: one launch per device,
a 0-dim fp32 result on the device); the second multiplies the grads by min(1, max_norm / (norm + 1e-6)), a factor
that never leaves the device. Nothing reads a value on the host unless `error_if_nonfinite=True` asks for it, as
in torch (that check needs the norm's value). Norms our kernels don't take (norm_type <= 0, -inf) run torch's.

DTensor grads (FSDP2, tensor parallel) are clipped by the norm over their global elements, reduced over the mesh
with one collective (fused_optim/ops/_dtensor.py), and the norm is returned as torch returns it there: a DTensor
replicated on the mesh.
"""

from __future__ import annotations

import functools
import math
import types
import warnings
from collections.abc import Iterable

import torch
from torch import Tensor

from fused_optim import _backend
from fused_optim.ops._dtensor import DTensor, Replicate, is_dtensor, reduction_mesh
from fused_optim.ops._library import FLOAT_DTYPES
from fused_optim.ops.total_norm import kernel_supports, total_norm


def by_device(tensors: list[Tensor]) -> dict[torch.device, list[Tensor]]:
    """The tensors grouped by device, in order: one launch per device."""
    groups: dict[torch.device, list[Tensor]] = {}
    for t in tensors:
        groups.setdefault(t.device, []).append(t)
    return groups


def clip_coefficient(max_norm: float, norm: Tensor) -> Tensor:
    """torch's clip factor min(1, max_norm / (norm + 1e-6)), on the norm's device (no host read)."""
    return torch.clamp(float(max_norm) / (norm + 1e-6), max=1.0)


def by_device_or_dtensor(tensors: list[Tensor]) -> list[list[Tensor]]:
    """The plain tensors grouped by device, and the DTensors together (their norm takes one collective per root
    mesh), in order: one norm each."""
    groups: dict[object, list[Tensor]] = {}
    for t in tensors:
        groups.setdefault("dtensor" if is_dtensor(t) else t.device, []).append(t)
    return list(groups.values())


def global_norm(tensors: list[Tensor], norm_type: float = 2.0, backend: str = "auto") -> Tensor:
    """The norm of all `tensors` as one vector: a 0-dim tensor (plain) on the first tensor's (local) device, fp32
    (fp64 where some tensor is fp64 or complex).

    One launch per device; DTensors count with their global elements, with one collective per (root) device mesh
    (fused_optim/ops/_dtensor.py), so every rank of a mesh gets the same norm. Plain tensors beside DTensors
    count as this rank's own (replicated, as DDP keeps them). The partial norms are combined on the first device."""
    norms = [total_norm(group, norm_type, backend=backend) for group in by_device_or_dtensor(tensors)]
    norms = [norm._local_tensor if is_dtensor(norm) else norm for norm in norms]
    if len(norms) == 1:
        return norms[0]
    first_device = norms[0].device
    return torch.linalg.vector_norm(torch.stack([n.to(first_device) for n in norms]), norm_type)


@torch.no_grad()
def clip_grad_norm_(
    parameters: Tensor | Iterable[Tensor],
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    *,
    backend: str | None = None,
) -> Tensor:
    """Clips the gradient norm of `parameters`, as `torch.nn.utils.clip_grad_norm_` (same arguments, same result):
    the grads are scaled in place by min(1, max_norm / (total_norm + 1e-6)) and the total norm is returned.

    The norm is summed in fp32 over every element (in fp64 by the CPU kernels) and rounded once to the grads'
    dtype (torch rounds each per-tensor norm first); the clip factor is taken from the fp32 norm, and is 0 where
    the rounded one is inf (fp16 grads past 65504), as torch's. Where torch's fp32 sums overflow (grads near 1e19)
    or underflow (near 1e-19), the CPU kernels' norm is finite, or non-zero. Empty grads count for nothing, also
    for norm_type=inf, which torch refuses beside them.
    `foreach` is accepted and ignored; `backend` picks the kernels (fused_optim._backend).

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> model(torch.randn(8, 4)).square().sum().backward()
        >>> norm = fused_optim.clip_grad_norm_(model.parameters(), max_norm=1.0)
    """
    backend = backend if backend is not None else _backend.default_backend()
    _backend.check_backend_name(backend)
    if isinstance(parameters, Tensor):
        parameters = [parameters]
    else:
        is_generator = isinstance(parameters, types.GeneratorType)
        parameters = list(parameters)
        if is_generator and not parameters:
            warnings.warn("`parameters` is an empty generator, no gradient clipping will occur.", stacklevel=3)
    norm_type = float(norm_type)
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    if not kernel_supports(norm_type) or any(g.dtype not in FLOAT_DTYPES
                                             or g.is_sparse for g in grads):
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm, norm_type, error_if_nonfinite, foreach)
    norm = global_norm(grads, norm_type, backend)
    # torch's norm is in the grads' (promoted) dtype, and its check and clip factor read that: fp16 grads whose norm
    # passes 65504 raise, or are zeroed (factor max_norm / inf), as torch's are
    returned = norm.to(functools.reduce(torch.promote_types, {g.dtype for g in grads}))
    if error_if_nonfinite and torch.logical_or(returned.isnan(), returned.isinf()):
        raise RuntimeError(
            f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, so it cannot be "
            "clipped. To disable this error and scale the gradients by the non-finite norm anyway, set "
            "`error_if_nonfinite=False`"
        )
    if returned.dtype != norm.dtype:  # the factor from the finer fp32 norm, but 0 where the rounded one is inf
        norm = torch.where(returned.isinf(), math.inf, norm)
    coef = clip_coefficient(max_norm, norm)
    local_grads = [g._local_tensor if is_dtensor(g) else g for g in grads]  # each shard scaled by the global factor
    for device, device_grads in by_device(local_grads).items():
        torch._foreach_mul_(device_grads, coef.to(device))
    # torch returns a DTensor replicated on their mesh for DTensor grads
    if all(is_dtensor(g) for g in grads):
        mesh = reduction_mesh(grads[0].device_mesh)[0]
        return DTensor.from_local(returned, mesh, [Replicate()] * mesh.ndim, run_check=False)
    return returned
