"""A bf16 param's fp32 master weight kept as a 16-bit remainder beside it (`master_weights=True`): 2 bytes a param
instead of an fp32 copy's 4, and exactly the same fp32 value; or as an 8-bit one (`master_weights=24`, FlashOptim's
"24-bit" masters): 1 byte, the master rounded to 24 bits each step.

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

from fused_optim._chunks import chunks

_LOW16 = 0xFFFF
_LOW32 = 0xFFFFFFFF
# A master remainder's dtype: int16 (the exact fp32 master), int8 (a 24-bit master).
REMAINDER_DTYPES = (torch.int16, torch.int8)


def are_remainders(master_params) -> bool:
    """Whether an op call's master list holds remainders (all of one kind: the ops check) rather than fp32 copies."""
    return bool(master_params) and master_params[0].dtype in REMAINDER_DTYPES


def _signed(bits: Tensor, width: int) -> Tensor:
    """Unsigned `width`-bit values (in int64) as the two's-complement signed values with the same bits."""
    return bits - (bits >= 1 << (width - 1)).to(torch.int64) * (1 << width)


def split_master(master: Tensor, bits: int = 32) -> tuple[Tensor, Tensor]:
    """(bf16 param, remainder) of the fp32 `master`: an int16 remainder holding it exactly (bits=32), or an int8 one
    holding it rounded to 24 bits (bits=24: to nearest, ties away from zero); a NaN gives a quiet NaN param."""
    flat = master.contiguous().view(-1)
    param = torch.empty(flat.shape, dtype=torch.bfloat16, device=flat.device)
    remainder = torch.empty(flat.shape, dtype=torch.int16 if bits == 32 else torch.int8, device=flat.device)
    for part in chunks(flat.numel()):
        param[part], remainder[part] = _split(flat[part], bits)
    return param.view(master.shape), remainder.view(master.shape)


def _split(master: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """split_master of a flat `master`."""
    u = master.view(torch.int32).to(torch.int64) & _LOW32
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    rest_bits = bits - 16
    top = u if bits == 32 else (u + 0x80) >> 8  # the master's top `bits` bits
    param_bits = torch.where(nan, (u >> 16) | 0x0040, ((top + (1 << (rest_bits - 1))) >> rest_bits) & _LOW16)
    rest = (top - (param_bits << rest_bits)) & ((1 << rest_bits) - 1)
    if bits == 24:
        rest = torch.where(nan, 0, rest)
    return _signed(param_bits, 16).to(torch.int16).view(torch.bfloat16), _signed(rest, rest_bits)


def join_master(param: Tensor, remainder: Tensor) -> Tensor:
    """The fp32 master that a bf16 `param` and its remainder (int16: exact; int8: a 24-bit master) hold, in
    `param`'s shape and layout (torch's fused AdamW, which the torch backend runs on it, pairs its tensors' elements
    by memory order: a contiguous master beside channels_last moments would be updated with other elements' grads)."""
    flat_param, flat_remainder = param.contiguous().view(-1), remainder.contiguous().view(-1)
    master = torch.empty_like(param, dtype=torch.float32)
    in_place = master.is_contiguous()
    flat = master.view(-1) if in_place else torch.empty(flat_param.shape, dtype=torch.float32, device=param.device)
    for part in chunks(flat.numel()):
        flat[part] = _join(flat_param[part], flat_remainder[part])
    return master if in_place else master.copy_(flat.view(param.shape))


def _join(param: Tensor, remainder: Tensor) -> Tensor:
    """join_master of a flat `param` and `remainder`."""
    param_bits = param.view(torch.int16).to(torch.int64) & _LOW16
    rest = remainder.to(torch.int64)
    if remainder.dtype == torch.int8:
        u = (((param_bits << 8) + rest) << 8) & _LOW32
    else:
        u = ((param_bits << 16) + rest) & _LOW32
    return _signed(u, 32).to(torch.int32).view(torch.float32)


def round_like_master(x: Tensor, bits: int = 32) -> Tensor:
    """x (fp32) rounded to the bf16 param a master remainder leaves: to nearest, ties away from zero (of the 24-bit
    master, with bits=24)."""
    return split_master(x.float(), bits)[0]


def store_split(params: list[Tensor], remainders: list[Tensor], masters: list[Tensor], skip: Tensor | None = None):
    """Each fp32 master split into its bf16 param and remainder (int16, or int8: rounded to 24 bits), written into
    them in place; where `skip` (a device bool, a skipped step) is true, both keep their values."""
    for param, remainder, master in zip(params, remainders, masters):
        new_param, new_remainder = split_master(master, 24 if remainder.dtype == torch.int8 else 32)
        if skip is not None:
            new_param, new_remainder = torch.where(skip, param, new_param), torch.where(skip, remainder, new_remainder)
        param.copy_(new_param)
        remainder.copy_(new_remainder)
