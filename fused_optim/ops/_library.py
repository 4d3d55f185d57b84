"""The `fused_optim` torch.library namespace (every op schema of the package is defined in it) and the helpers the
ops share."""

import torch

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
