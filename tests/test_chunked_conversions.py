"""The torch-op conversions of whole tensors (int8 codes and scales, master remainders) run a chunk of elements at a
time (fused_optim/_chunks.py), and the torch backend's Adam a batch of params at a time, so that their temporaries
stay small beside large tensors. Cut into many small parts, each gives what one pass gives, bit for bit: odd sizes,
a last block cut short, channels_last, params of two dtypes."""

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


def test_torch_backend_adam_in_batches_steps_as_in_one(monkeypatch):
    def run():
        generator = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(n, generator=generator).to(dtype))
                  for n, dtype in [(5, torch.float32), (70, torch.bfloat16), (3, torch.float32), (64, torch.bfloat16),
                                   (130, torch.float32)]]
        opt = fused_optim.AdamW(params, lr=1e-2, moments="int8", master_weights=True, backend="torch")
        for _ in range(2):
            for p in params:
                p.grad = torch.randn(p.shape, generator=generator).to(p.dtype)
            opt.step()
        return [p.detach() for p in params], [opt.state[p] for p in params]

    whole = run()
    monkeypatch.setattr(fused_optim.ops.adam, "BATCH_ELEMENTS", 72)
    sizes = [(5, torch.float32), (60, torch.float32), (9, torch.bfloat16), (3, torch.float32), (130, torch.float32),
             (2, torch.float32)]
    assert fused_optim.ops.adam._batches([torch.empty(n, dtype=dtype) for n, dtype in sizes]) == [[0, 1, 3], [2], [4],
                                                                                                  [5]]
    assert_identical(run(), whole)
