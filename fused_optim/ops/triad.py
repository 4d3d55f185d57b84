"""STREAM triad on the CPU, a = b + scalar * c (csrc/cpu/triad.cpp): the memory roof the CPU benchmarks report
their bandwidth against. torch's copy_ is no roof there (docs/design.md, Benchmarks)."""

import torch

from fused_optim.ops._library import lib as _lib

_lib.define("triad_(Tensor(a!) a, Tensor b, Tensor c, float scalar) -> ()")
torch.library.register_fake("fused_optim::triad_", lambda *args: None, lib=_lib)


def triad_(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, scalar: float) -> None:
    """a = b + scalar * c over fp32 CPU tensors, on all of torch's intra-op threads. Moves 12 bytes/element."""
    torch.ops.fused_optim.triad_.default(a, b, c, scalar)
