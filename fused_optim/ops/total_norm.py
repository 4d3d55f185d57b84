"""The norm of a list of tensors taken as one vector, as torch.library ops: one op per backend, one schema.

- `fused_optim::total_norm`         the C++ kernels: csrc/cpu/total_norm.cpp, csrc/cuda/total_norm.cu
- `fused_optim::total_norm_triton`  fused_optim/triton/total_norm.py
- `fused_optim::total_norm_torch`   torch's `_foreach_norm` in fp32, then the norm of those norms

`total_norm(tensors, norm_type)` returns a 0-dim fp32 tensor on the tensors' device (fp64 where some tensor is
fp64 or complex: those are torch's to read): (Σ|x|^p)^(1/p) over every element of every tensor, max|x| for
p = inf. Sums are taken in fp32 per block of elements (in fp64 throughout on the CPU) and the block partial sums
added in a fixed order, so the result does not depend on the thread count. Any NaN gives NaN and any inf gives inf,
which is what the callers' inf/NaN check reads. It reads each element once and writes one number: no host sync, so
clipping and the optimizer step that uses it stay capturable.
"""

from __future__ import annotations

import math

import torch

from fused_optim.ops import _dtensor
from fused_optim.ops._library import define_op, dense, resolve_op
from fused_optim.ops.accumulate import GRAD_DTYPES

SCHEMA = "(Tensor[] tensors, float norm_type) -> Tensor"
# what `total_norm` also takes, read by torch rather than the kernels: the grads of fp64 and complex params
WIDE_DTYPES = (torch.float64, torch.complex64, torch.complex128)


def check_total_norm_args(tensors, norm_type, dtypes=GRAD_DTYPES) -> None:
    """The Python twin of csrc/ops/total_norm.h's checks, for the Triton and torch ops (and, with `dtypes`
    WIDE_DTYPES too, for `total_norm`)."""
    if not tensors:
        raise RuntimeError("total_norm: needs at least one tensor")
    if not (norm_type > 0):  # also refuses NaN
        raise RuntimeError(f"total_norm: norm_type must be positive or inf, got {norm_type}")
    if any(t.dtype not in dtypes for t in tensors):
        names = [str(dtype).removeprefix("torch.") for dtype in dtypes]
        raise RuntimeError(f"total_norm: tensors must be {', '.join(names[:-1])} or {names[-1]}")
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise RuntimeError(f"total_norm: all tensors must be on one device, got {sorted(map(str, devices))}")
    if not all(t.is_contiguous() or dense(t) for t in tensors):
        raise RuntimeError("total_norm: tensors must be dense")


def _total_norm_triton(tensors, norm_type):
    from fused_optim.triton.total_norm import total_norm_triton

    check_total_norm_args(tensors, norm_type)
    return total_norm_triton(tensors, norm_type)


def _total_norm_torch(tensors, norm_type):
    check_total_norm_args(tensors, norm_type)
    # Empty tensors add nothing to any norm, and _foreach_norm refuses them for p = inf (max has no identity).
    nonempty = [t for t in tensors if t.numel() > 0]
    if not nonempty:
        return tensors[0].new_zeros((), dtype=torch.float32)
    norms = torch._foreach_norm(nonempty, norm_type, dtype=torch.float32)
    return torch.linalg.vector_norm(torch.stack(norms), norm_type)


define_op("total_norm", SCHEMA, fake=lambda tensors, norm_type: tensors[0].new_empty((), dtype=torch.float32),
          torch_impl=_total_norm_torch, triton_impl=_total_norm_triton)


def kernel_supports(norm_type: float) -> bool:
    """Whether our kernels compute this norm: p > 0 or inf (torch's 0-"norm" and -inf fall back to torch)."""
    return norm_type > 0 and not math.isnan(norm_type)


def _wide_norm(tensors: list[torch.Tensor], norm_type: float) -> torch.Tensor:
    """The norm of fp64 and complex tensors (the grads of the params the optimizers step in fp64 or as real views),
    by torch in fp64, complex64 ones too (torch's own clip_grad_norm_ sums those in fp32: 2e-6 off for a 0.5-norm
    of 5,000 elements), a complex element counting with its modulus; a 0-dim fp64 tensor."""
    norms = [torch.linalg.vector_norm(t, norm_type, dtype=torch.complex128 if t.is_complex() else torch.float64)
             for t in tensors if t.numel() > 0]  # an empty tensor has no max, and adds nothing to any norm
    if not norms:
        return tensors[0].new_zeros((), dtype=torch.float64)
    return torch.linalg.vector_norm(torch.stack(norms), norm_type)


def total_norm(tensors: list[torch.Tensor], norm_type: float = 2.0, *, backend: str = "auto") -> torch.Tensor:
    """The `norm_type`-norm of all elements of `tensors` (dense or not, on one device) as one vector: a 0-dim tensor
    on their device, fp32, or fp64 where some tensor is fp64 or complex. fp32/bf16/fp16 tensors are read by the
    `backend` op; fp64 and complex ones (a complex element counting with its modulus) by torch in fp64
    (`_wide_norm`), and the two norms combined in fp64. Non-dense tensors are copied first.

    DTensors on one mesh give the norm of their global elements, a 0-dim DTensor replicated on the mesh, with one
    collective over the mesh (ops/_dtensor.py: shards summed, replicas counted once)."""
    if not tensors or not norm_type > 0:  # no device to pick a backend for, or no norm: one sentence, here
        check_total_norm_args(tensors, norm_type)
    if _dtensor.is_dtensor(tensors[0]):
        _dtensor.to_local("total_norm", tensors)  # all DTensors, or one sentence saying otherwise
        return _dtensor.mesh_norm(tensors, norm_type, lambda local: total_norm(local, norm_type, backend=backend))
    tensors = [t if t.is_contiguous() or dense(t) else t.contiguous() for t in tensors]
    if all(t.dtype in GRAD_DTYPES for t in tensors):
        return resolve_op("total_norm", backend, tensors[0].device.type)(tensors, float(norm_type))
    check_total_norm_args(tensors, norm_type, (*GRAD_DTYPES, *WIDE_DTYPES))
    wide = [t for t in tensors if t.dtype in WIDE_DTYPES]
    narrow = [t for t in tensors if t.dtype not in WIDE_DTYPES]
    norms = [_wide_norm(wide, norm_type)]
    if narrow:
        norms.append(resolve_op("total_norm", backend, tensors[0].device.type)(narrow, float(norm_type)).double())
    return torch.linalg.vector_norm(torch.stack(norms), norm_type)
