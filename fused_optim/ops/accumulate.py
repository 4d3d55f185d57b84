"""Gradient accumulation as torch.library ops: `main_grads[i] += grads[i]` over whole lists, one op per backend.

- `fused_optim::accumulate_grads_`         the C++ kernels: csrc/cpu/accumulate.cpp, csrc/cuda/accumulate.cu
- `fused_optim::accumulate_grads_triton_`  fused_optim/triton/accumulate.py
- `fused_optim::accumulate_grads_torch_`   torch's `_foreach_add_` (the fallback and the peer)

The main grads are fp32; a grad is fp32, bf16 or fp16 and is widened on the fly, so a bf16 micro-batch gradient
costs 2 bytes read + 4 read + 4 written per element (the 10 B/element of the bytes model) and nothing else.
A grad whose strides differ from its main grad's is first copied into the main grad's layout (the kernels walk
both as flat arrays); autograd hands out grads in their param's layout, and the main grads take it too.
"""

from __future__ import annotations

import torch

from fused_optim.ops import _dtensor
from fused_optim.ops._library import FLOAT_DTYPES, define_op, dense, resolve_op

SCHEMA = "(Tensor(a!)[] main_grads, Tensor[] grads) -> ()"
GRAD_DTYPES = FLOAT_DTYPES


def check_accumulate_args(main_grads, grads) -> list[torch.Tensor]:
    """The Python twin of csrc/ops/accumulate.h's checks, for the Triton and torch ops:
    everything is checked before anything is written; returns the grads in their main grads' memory layout."""
    if len(main_grads) != len(grads):
        raise RuntimeError("accumulate_grads_: main_grads and grads must have the same length")
    if any(m.dtype != torch.float32 for m in main_grads):
        raise RuntimeError("accumulate_grads_: main grads must be float32")
    if any(g.dtype not in GRAD_DTYPES for g in grads):
        raise RuntimeError("accumulate_grads_: grads must be float32, bfloat16 or float16")
    if [m.shape for m in main_grads] != [g.shape for g in grads]:
        raise RuntimeError("accumulate_grads_: a grad must have its main grad's shape")
    devices = {t.device for tensors in (main_grads, grads) for t in tensors}
    if len(devices) > 1:
        raise RuntimeError(f"accumulate_grads_: all tensors must be on one device, got {sorted(map(str, devices))}")
    if not all(m.is_contiguous() or dense(m) for m in main_grads):
        raise RuntimeError("accumulate_grads_: main grads must be dense")
    return [g if g.stride() == m.stride() else torch.empty_like(m, dtype=g.dtype).copy_(g)
            for m, g in zip(main_grads, grads)]


def _accumulate_triton(main_grads, grads):
    from fused_optim.triton.accumulate import accumulate_grads_triton

    grads = check_accumulate_args(main_grads, grads)
    if main_grads:
        accumulate_grads_triton(main_grads, grads)


def _accumulate_torch(main_grads, grads):
    grads = check_accumulate_args(main_grads, grads)
    if main_grads:
        torch._foreach_add_(main_grads, grads)  # widens bf16/fp16 grads to the fp32 main grads


define_op("accumulate_grads_", SCHEMA, fake=lambda main_grads, grads: None, torch_impl=_accumulate_torch,
          triton_impl=_accumulate_triton)


def accumulate_grads(main_grads: list[torch.Tensor], grads: list[torch.Tensor], *, backend: str = "auto") -> None:
    """`main_grads[i] += grads[i]` for every i, in one launch (a few for very long lists on CUDA).

    `main_grads`: fp32 tensors, dense; `grads`: fp32/bf16/fp16 tensors of the same shapes, on the same device.
    DTensors (main grads and grads alike) are added through their local shards (ops/_dtensor.py).
    """
    if not main_grads:
        return
    main_grads, grads = _dtensor.to_local("accumulate_grads_", main_grads, grads)
    try:
        resolve_op("accumulate_grads_", backend, main_grads[0].device.type)(main_grads, grads)
    except NotImplementedError:  # dispatch found no kernel: said in one sentence for a sparse grad (checked only now,
        if any(grad.is_sparse for grad in grads):  # not on every call)
            raise RuntimeError("accumulate_grads_: sparse grads (nn.Embedding(sparse=True)) are not supported: the "
                               "main grads are dense fp32 buffers; use a dense embedding") from None
        raise
