"""A bf16 param's fp32 master weight kept as a 16-bit remainder beside it (`master_weights=True`): 2 bytes a param
instead of an fp32 copy's 4, and exactly the same fp32 value.

The master is (param bits << 16) + remainder, the remainder a signed 16-bit integer. Any fp32 value splits so when
the param is the master rounded to nearest with ties away from zero: the low half left over then lies in
[-0x8000, 0x7FFF]. (Ties to even would round some ties down, leaving +0x8000: one value too many for 16 bits.) The
param so differs from round-to-nearest-even only on exact ties, by one ulp; the kernels split and join in registers
(csrc/include/fused_optim/rounding.h, fused_optim/triton/adam.py), these are the same operations in torch ops, for
the torch backend, state conversions and the tests.
"""

from __future__ import annotations

import torch
from torch import Tensor

_LOW16 = 0xFFFF
_LOW32 = 0xFFFFFFFF


def _signed(bits: Tensor, width: int) -> Tensor:
    """Unsigned `width`-bit values (in int64) as the two's-complement signed values with the same bits."""
    return bits - (bits >= 1 << (width - 1)).to(torch.int64) * (1 << width)


def split_master(master: Tensor) -> tuple[Tensor, Tensor]:
    """(bf16 param, int16 remainder) holding the fp32 `master` exactly; a NaN gives a quiet NaN param."""
    u = master.contiguous().view(torch.int32).to(torch.int64) & _LOW32
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    bits = torch.where(nan, (u >> 16) | 0x0040, ((u + 0x8000) >> 16) & _LOW16)
    remainder = (u - (bits << 16)) & _LOW16
    param = _signed(bits, 16).to(torch.int16).view(torch.bfloat16)
    return param.reshape(master.shape), _signed(remainder, 16).to(torch.int16).reshape(master.shape)


def join_master(param: Tensor, remainder: Tensor) -> Tensor:
    """The fp32 master that a bf16 `param` and its int16 `remainder` hold (in `param`'s shape, contiguous)."""
    bits = param.contiguous().view(torch.int16).to(torch.int64) & _LOW16
    u = ((bits << 16) + remainder.contiguous().to(torch.int64)) & _LOW32
    return _signed(u, 32).to(torch.int32).view(torch.float32).reshape(param.shape)


def round_like_master(x: Tensor) -> Tensor:
    """x (fp32) rounded to the bf16 param a master remainder leaves: to nearest, ties away from zero."""
    return split_master(x.float())[0]


def store_split(params: list[Tensor], remainders: list[Tensor], masters: list[Tensor], skip: Tensor | None = None):
    """Each fp32 master split into its bf16 param and int16 remainder, written into them in place; where `skip`
    (a device bool, a skipped step) is true, both keep their values."""
    for param, remainder, master in zip(params, remainders, masters):
        new_param, new_remainder = split_master(master)
        if skip is not None:
            new_param, new_remainder = torch.where(skip, param, new_param), torch.where(skip, remainder, new_remainder)
        param.copy_(new_param)
        remainder.copy_(new_remainder)
