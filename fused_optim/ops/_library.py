"""The `fused_optim` torch.library namespace (every op schema of the package is defined in it) and the helpers the
ops share."""

from typing import Callable

import torch

from fused_optim import _backend

lib = torch.library.Library("fused_optim", "DEF")

# The dtypes the kernels read and write (params, grads, logits); their math is fp32.
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def dense(t: torch.Tensor) -> bool:
    """Whether t's elements fill one block of memory without gaps or overlaps, in any dimension order
    (the kernels walk it as a flat array)."""
    expected_stride = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda dim: dim[1]):
        if size != 1:
            if stride != expected_stride:
                return False
            expected_stride *= size
    return True


# Each op's name per concrete backend, by the name of its C++ op (define_op).
_OP_NAMES: dict[str, dict[str, str]] = {}


def define_op(name: str, schema: str, *, fake: Callable, torch_impl: Callable, triton_impl: Callable,
              sparse_message: str | None = None) -> None:
    """Defines op `name` (the C++ extensions register its CPU and CUDA kernels) and its two twins with the same
    schema: `<name>_triton` (the Triton kernels, on CUDA tensors, and CPU ones under TRITON_INTERPRET=1) and
    `<name>_torch` (torch's own ops); an in-place op's trailing underscore stays last (`adam_step_triton_`). Every
    one gets the fake impl; with `sparse_message`, a sparse grad reaching the kernels raises it."""
    stem, inplace = (name[:-1], "_") if name.endswith("_") else (name, "")
    names = {"cpu": name, "cuda": name, "triton": f"{stem}_triton{inplace}", "torch": f"{stem}_torch{inplace}"}
    for op_name in (name, names["triton"], names["torch"]):
        lib.define(op_name + schema)
        torch.library.register_fake(f"fused_optim::{op_name}", fake, lib=lib)
    lib.impl(names["torch"], torch_impl, "CompositeExplicitAutograd")
    for dispatch_key in ("CUDA", "CPU"):  # CPU tensors only under TRITON_INTERPRET=1 (checked in _backend)
        lib.impl(names["triton"], triton_impl, dispatch_key)
    if sparse_message is not None:
        refuse_sparse_grads((name, names["triton"]), sparse_message)
    _OP_NAMES[name] = names


@torch.compiler.assume_constant_result  # torch.compile: run while tracing, not traced through the backend lookup
def op_name(name: str, backend: str, device_type: str) -> str:
    """The name of op `name`'s twin that `backend` ("auto", "cuda", ...) runs on tensors of `device_type`."""
    return _OP_NAMES[name][_backend.resolve(backend, device_type)]


def resolve_op(name: str, backend: str, device_type: str) -> torch._ops.OpOverload:
    """Op `name`'s twin that `backend` runs on tensors of `device_type` (see op_name)."""
    return getattr(torch.ops.fused_optim, op_name(name, backend, device_type)).default


def refuse_sparse_grads(op_names: tuple[str, ...], message: str) -> None:
    """A sparse grad sends a call of these ops to the sparse dispatch keys: raise `message` there (the optimizer's
    own sentence) rather than the dispatcher's "no kernel" error."""

    def refuse(*args, **kwargs):
        raise RuntimeError(message)

    for name in op_names:
        for dispatch_key in ("SparseCPU", "SparseCUDA"):
            lib.impl(name, refuse, dispatch_key)


def real_views(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Complex tensors as real ones with a trailing (re, im) dim (torch.view_as_real: no copy), others unchanged.
    An elementwise update treats a complex number as its two parts, as torch's Adam does and torch's SGD's
    arithmetic amounts to, so complex64 params run the fp32 kernels."""
    return [torch.view_as_real(t) if t.is_complex() else t for t in tensors]


def split_wide(lists: list[list[torch.Tensor]]) -> tuple[list[list[torch.Tensor]], list[list[torch.Tensor]]]:
    """`lists` (params first, each list empty or one tensor per param) split into the float64 params' lists and
    the others': the kernels are fp32/bf16/fp16, so float64 params run torch's own implementation."""
    params = lists[0]
    wide = [i for i, p in enumerate(params) if p.dtype == torch.float64]
    if not wide:
        return [[] for _ in lists], lists
    narrow = [i for i in range(len(params)) if params[i].dtype != torch.float64]

    def pick(indices):
        return [[tensors[i] for i in indices] if tensors else [] for tensors in lists]

    return pick(wide), pick(narrow)
