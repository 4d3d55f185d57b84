"""moments="int8": an optimizer moment as one byte an element, blocks of BLOCK elements sharing a bf16 scale, the
codes companded (a signed moment as sqrt(|x| / scale) in 127 steps, a non-negative one by its root r = sqrt(x), as
sqrt(r / scale) in 255 with the scale of the roots) and rounded stochastically: a signed one unbiased in the value
it stands for, a non-negative one in its code. csrc/include/fused_optim/moment_int8.h explains the choices; these are
its formulas in torch ops, the same fp32 operations in the same order, for the torch backend, state conversions and
the tests (every backend's codes agree with these bit for bit).

Blocks run along a tensor's memory order (the kernels walk param, grad and state as flat arrays), from its first
element: a tensor of n elements has ceil(n / BLOCK) scales. A DTensor's blocks are its local shard's.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fused_optim._chunks import chunks

BLOCK = 64
_MAGNITUDE = 0x7FFFFFFF
_SIGNED_STEP = 1.0 / 16129.0  # 1 / 127^2, rounded to fp32 where it multiplies
_UNSIGNED_STEP = 1.0 / 65025.0  # 1 / 255^2, of the root


def scale_count(numel: int) -> int:
    """The scales of a tensor of `numel` elements."""
    return -(-numel // BLOCK)


def code_dtype(signed: bool) -> torch.dtype:
    return torch.int8 if signed else torch.uint8


def memory_order(t: Tensor) -> Tensor:
    """A dense tensor's elements as a flat view in memory order (how the kernels walk it)."""
    return t.reshape(-1) if t.is_contiguous() else t.as_strided((t.numel(),), (1,))


def _blocks(flat: Tensor, fill: float | int = 0) -> Tensor:
    """A flat tensor as (blocks, BLOCK) rows, the last padded with `fill`."""
    padding = scale_count(flat.numel()) * BLOCK - flat.numel()
    return torch.nn.functional.pad(flat, (0, padding), value=fill).view(-1, BLOCK)


def _steps(scales: Tensor, signed: bool) -> Tensor:
    """What each block's codes are multiplied by: scale / 127^2 (the value) or scale / 255^2 (the root), fp32. The
    factor is a 0-dim CPU tensor, which a CUDA op reads as a scalar; one made on the GPU was a copy the host waited
    for."""
    return scales.float() * torch.tensor(_SIGNED_STEP if signed else _UNSIGNED_STEP, dtype=torch.float32)


def dequantize(codes: Tensor, scales: Tensor) -> Tensor:
    """The fp32 values of `codes` (int8: a signed moment, uint8: a non-negative one) with their block `scales`
    (bf16, scale_count(numel)), in the codes' shape and memory layout."""
    out = torch.empty_like(codes, dtype=torch.float32)
    flat_codes, flat_out = memory_order(codes), memory_order(out)
    for part in chunks(codes.numel()):
        flat_out[part] = _dequantized(flat_codes[part], scales[blocks_of(part)])
    return out


def _dequantized(codes: Tensor, scales: Tensor) -> Tensor:
    """dequantize of flat `codes`."""
    signed = codes.dtype == torch.int8
    c = _blocks(codes.float())
    values = (c * c.abs() if signed else c * c) * _steps(scales, signed)[:, None]
    return (values if signed else values * values).reshape(-1)[: codes.numel()]  # a root, squared


def blocks_of(part: slice) -> slice:
    """The scales of the elements `part` (a _chunks.chunks() slice, which starts a block) covers."""
    return slice(part.start // BLOCK, scale_count(part.stop))


def _root(x: Tensor) -> Tensor:
    """The fp32 square root correctly rounded, as the kernels take it (sqrtf, tl.sqrt_rn). torch's own CPU sqrt is
    not: torch 2.14's is one ulp off for about one fp32 value in seven, which moved a code where it fell on a rounding
    boundary (tests/test_fuzz.py). Its float64 root (within an ulp: one in seventy is off) rounded to fp32 is exact:
    an fp32 number's root lies at least 2^-50 of its binade, four float64 ulps, from an fp32 rounding midpoint.
    torch's CUDA sqrt is sqrtf, IEEE's."""
    return torch.sqrt(x.double()).float() if x.device.type == "cpu" else torch.sqrt(x)


def quantize(values: Tensor, signed: bool, bits16: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(codes, scales) of fp32 `values`, codes in their shape and memory layout. `bits16`: 16 random bits per element
    (memory order) for stochastic rounding; None rounds to the nearest value (a state loaded from fp32)."""
    codes = torch.empty_like(values, dtype=code_dtype(signed))
    scales = torch.empty(scale_count(values.numel()), dtype=torch.bfloat16, device=values.device)
    flat_values, flat_codes = memory_order(values), memory_order(codes)
    for part in chunks(values.numel()):
        flat_codes[part], scales[blocks_of(part)] = _quantized(flat_values[part].float(), signed,
                                                                None if bits16 is None else bits16[part])
    return codes, scales


def _quantized(flat: Tensor, signed: bool, bits16: Tensor | None) -> tuple[Tensor, Tensor]:
    """quantize of `flat` fp32 values."""
    if not signed:  # kept by its root
        flat = _root(flat)
    # a NaN as 0x7FC00000 (moment_int8.h's int8_scale_bits)
    largest = (_blocks(flat).view(torch.int32) & _MAGNITUDE).amax(dim=1).to(torch.int64).clamp(max=0x7FC00000)
    scale_bits = (largest + 0xFFFF) >> 16
    scales = torch.where(scale_bits >= 0x8000, scale_bits - 0x10000, scale_bits).to(torch.int16).view(torch.bfloat16)
    scale = scales.float()
    # zero, NaN and subnormal blocks: 0 (moment_int8.h's inverse_scale)
    inverse = torch.where(scale >= 2.0**-126, 1.0 / scale, 0.0).repeat_interleave(BLOCK)[: flat.numel()]
    quotient = flat.abs() * inverse  # just over 1 (and NaN) -> 1
    fixed = (_root(torch.where(quotient < 1.0, quotient, 1.0)) * ((127.0 if signed else 255.0) * 65536.0)).int()
    bits = 32768 if bits16 is None else bits16.to(torch.int32)  # None: to the nearest
    if signed:  # up with probability f (s + c) / (2c + 1): the value c^2 is unbiased (moment_int8.h)
        s, c = fixed.float(), (fixed & ~0xFFFF).float()  # s 2^16, c 2^16
        below = (65536 - bits) * ((c + c) + 65536.0)  # u (2c + 1) 2^32
        code = (fixed >> 16) + (below < (s - c) * (s + c)).int()
        code = torch.where(flat < 0, -code, code)
    else:  # up with probability f: the code is unbiased; a non-zero moment keeps code 1
        code = torch.maximum((fixed + bits) >> 16, (flat > 0).to(torch.int32))
    return code.to(torch.int16).to(code_dtype(signed)), scales
