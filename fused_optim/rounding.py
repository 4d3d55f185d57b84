"""Stochastic rounding's random bits in torch ops: csrc/include/fused_optim/rounding.h's counter-based hash of (seed,
tensor, step, element), in int64 tensor ops (every value kept in [0, 2^32), so nothing overflows). The torch backend
rounds with these, and the tests check every other backend's bits against them.
"""

from __future__ import annotations

import torch

from fused_optim.int8_moments import memory_order

_MASK32 = 0xFFFFFFFF


def _mul32(a: torch.Tensor, b: int) -> torch.Tensor:
    """(a * b) mod 2^32 without int64 overflow: multiply by b's two 16-bit halves."""
    low = a * (b & 0xFFFF)
    high = ((a * (b >> 16)) & 0xFFFF) << 16
    return (low + high) & _MASK32


def _mix32(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def stream_key(seed: int, tensor_index: int, step: torch.Tensor) -> torch.Tensor:
    """The random stream of one tensor at one step (step: the count after the step, as a tensor)."""
    start = torch.full_like(step, (seed + 0x9E3779B9 * tensor_index) & _MASK32, dtype=torch.int64)
    return _mix32(_mix32(start) ^ (step.to(torch.int64) & _MASK32))


def random_bits(stream: torch.Tensor, numel: int, start: int = 0) -> torch.Tensor:
    """The bits of elements start .. start + numel of a tensor (its memory order) in `stream`."""
    index = torch.arange(start, start + numel, dtype=torch.int64, device=stream.device)
    return _mix32((_mix32(stream ^ (index & _MASK32)) + (index >> 32)) & _MASK32)


def moment_stream(stream: torch.Tensor, draw: int) -> torch.Tensor:
    """The stream of bf16 moments' draw 0 (exp_avg: low 16 bits, exp_avg_sq: high 16) or 1 (max_exp_avg_sq)."""
    return _mix32((stream + 0x9E3779B9 * (draw + 1)) & _MASK32)


def moment_bits(stream: torch.Tensor, numel: int, start: int = 0) -> torch.Tensor:
    """rounding.h's moment_bits: one mix32 of stream and index (elements start .. start + numel)."""
    index = torch.arange(start, start + numel, dtype=torch.int64, device=stream.device)
    return _mix32(((stream ^ (index & _MASK32)) + _mul32(index >> 32, 0x9E3779B9)) & _MASK32)


def moment_bits16(seed: int, tensor_index: int, step: torch.Tensor, moment: int, numel: int,
                  start: int = 0) -> torch.Tensor:
    """The 16 random bits (int64) that round each element (start .. start + numel) of Adam's moment 0 (exp_avg),
    1 (exp_avg_sq) or 2 (max_exp_avg_sq) at a step (the count after it), bf16 or int8: draw moment // 2, its low or
    high half."""
    stream = moment_stream(stream_key(seed, tensor_index, step), moment // 2)
    return (moment_bits(stream, numel, start) >> (16 * (moment % 2))) & 0xFFFF


def bf16_stochastic_round(x: torch.Tensor, seed: int, tensor_index: int, step: torch.Tensor,
                          moment: int | None = None, start: int = 0) -> torch.Tensor:
    """Round fp32 `x` to bf16, up with probability equal to the discarded fraction (inf/NaN unchanged), with the
    random bits of a param (moment=None) or of its Adam moment 0 (exp_avg), 1 (exp_avg_sq) or 2 (max_exp_avg_sq):
    moment_stream. The bits go to x's elements in memory order, as the kernels walk a tensor (channels_last too),
    those of its elements from `start` on where x is a piece of it (ops/_library.py: pieces); the result has x's
    layout."""
    bits = memory_order(x).view(torch.int32).to(torch.int64) & _MASK32
    if moment is None:
        noise = random_bits(stream_key(seed, tensor_index, step), x.numel(), start) & 0xFFFF
    else:
        noise = moment_bits16(seed, tensor_index, step, moment, x.numel(), start)
    finite = (bits & 0x7F800000) != 0x7F800000
    bits = torch.where(finite, (bits + noise) & _MASK32, bits)
    upper = bits >> 16
    upper = torch.where(upper >= 0x8000, upper - 0x10000, upper)  # as a signed 16-bit value
    rounded = torch.empty_like(x, dtype=torch.bfloat16)
    memory_order(rounded).copy_(upper.to(torch.int16).view(torch.bfloat16))
    return rounded
