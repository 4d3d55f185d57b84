"""The torch-op conversions of whole tensors (int8 codes and scales, master remainders) run a chunk of elements at a
time (fused_optim/_chunks.py), and the torch backend's updates a piece of a param at a time, so that their
temporaries stay small beside large tensors. Cut into many small parts, each gives what one pass gives, bit for
bit: odd sizes, a last block cut short, channels_last, params of two dtypes."""

from __future__ import annotations

import pytest
import torch
from test_adam import assert_identical

import fused_optim
from fused_optim import _chunks
from fused_optim.int8_moments import BLOCK, dequantize, quantize
from fused_optim.master_remainder import join_master, split_master


_BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16}


def bits(t: torch.Tensor) -> torch.Tensor:
    """A tensor's bits, so that NaNs compare too."""
    return t.view(_BITS.get(t.dtype, t.dtype))


def conversions(x: torch.Tensor) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    bits16 = torch.randint(0, 1 << 16, (x.numel(),), generator=generator, dtype=torch.int32)
    results = []
    for signed in (True, False):
        values = x if signed else x.abs()
        codes, scales = quantize(values, signed)
        results += [codes, scales, *quantize(values, signed, bits16), dequantize(codes, scales)]
    for width in (32, 24):
        param, remainder = split_master(x, width)
        results += [param, remainder, join_master(param, remainder)]
    return results


@pytest.mark.parametrize("shape", [(), (1,), (3,), (63,), (BLOCK,), (1023,), (2, 3, 5, 7)])
def test_chunks_give_what_one_pass_gives(monkeypatch, shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 1e-3
    if x.dim() == 4:
        x = x.to(memory_format=torch.channels_last)
    if x.dim():
        x[(0,) * x.dim()] = float("nan")  # a NaN block
    one_pass = conversions(x)
    monkeypatch.setattr(_chunks, "CHUNK", 2 * BLOCK)
    for chunked, whole in zip(conversions(x), one_pass, strict=True):
        assert (chunked.dtype, chunked.shape, chunked.stride()) == (whole.dtype, whole.shape, whole.stride())
        assert torch.equal(bits(chunked), bits(whole))
    for codes in (one_pass[0], one_pass[5]):
        assert codes.stride() == x.stride()


OPTIMIZERS = [(fused_optim.AdamW, {"moments": "int8", "master_weights": True}),
              (fused_optim.AdamW, {"moments": "bf16", "stochastic_rounding": True, "amsgrad": True}),
              (fused_optim.AdamW, {"master_weights": 24}),
              (fused_optim.SGD, {"momentum": 0.9, "moments": "int8", "master_weights": 24}),
              (fused_optim.SGD, {"momentum": 0.9, "moments": "bf16", "stochastic_rounding": True}),
              (fused_optim.Lion, {"moments": "int8", "stochastic_rounding": True}),
              (fused_optim.Lion, {"moments": "bf16", "master_weights": True})]


@pytest.mark.parametrize("cls, options", OPTIMIZERS)
def test_torch_backend_in_pieces_steps_as_in_one(monkeypatch, cls, options):
    """The torch backend's updates take each param a piece at a time (ops/_library.py: pieces), Adam's batches of
    pieces of one dtype: cut into pieces of two blocks, params of two dtypes (one channels_last), every bit is the
    same, the random bits of stochastic rounding included."""
    def run():
        generator = torch.Generator().manual_seed(0)
        shapes = [((5,), torch.float32), ((300,), torch.bfloat16), ((3,), torch.bfloat16),
                  ((2, 3, 5, 7), torch.bfloat16), ((130,), torch.float32)]
        if options.get("master_weights") == 24:  # 24-bit masters are bf16 params' alone
            shapes = [(shape, torch.bfloat16) for shape, _ in shapes]
        params = [torch.nn.Parameter(torch.randn(shape, generator=generator).to(dtype)) for shape, dtype in shapes]
        params[3].data = params[3].data.to(memory_format=torch.channels_last)
        opt = cls(params, lr=1e-2, backend="torch", **options)
        for _ in range(2):
            for p in params:
                p.grad = torch.randn(p.shape, generator=generator).to(p.dtype).to(memory_format=torch.preserve_format)
            opt.step()
        return [p.detach() for p in params], [opt.state[p] for p in params]

    whole = run()
    monkeypatch.setattr(_chunks, "CHUNK", 2 * BLOCK)
    assert_identical(run(), whole)


def test_adam_batches_hold_pieces_of_one_dtype_up_to_a_chunk(monkeypatch):
    monkeypatch.setattr(_chunks, "CHUNK", 64)
    params = [torch.empty(n, dtype=dtype) for n, dtype in [(5, torch.float32), (50, torch.float32), (9, torch.bfloat16),
                                                            (3, torch.float32), (130, torch.float32)]]
    assert fused_optim.ops.adam._batches(params) == [
        [(0, slice(0, 5)), (1, slice(0, 50)), (3, slice(0, 3))], [(2, slice(0, 9))], [(4, slice(0, 64))],
        [(4, slice(64, 128))], [(4, slice(128, 130))]]
