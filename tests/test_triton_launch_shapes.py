"""The Triton optimizer kernels step the same bits at every launch shape (BLOCK elements a block, BLOCKS blocks a
program): the random bits of stochastic rounding and of the int8 codes hang on an element's index, not on the
program that steps it, and a block of int8 codes never straddles two programs. benchmarks/gpu_triton_launch.py times
other shapes on a GPU on that premise (its own run checks it there too)."""

from __future__ import annotations

import functools
import importlib

import pytest
import torch

import fused_optim
from conftest import TRITON_INTERPRETED

pytestmark = pytest.mark.skipif(not TRITON_INTERPRETED, reason="runs the Triton kernels on CPU tensors, interpreted")

# (optimizer, param dtype, constructor options): the modes with random bits or int8 codes
ROWS = [
    ("AdamW", torch.float32, {"moments": "int8"}),
    ("AdamW", torch.bfloat16, {"moments": "int8", "master_weights": 24, "amsgrad": True}),
    ("AdamW", torch.bfloat16, {"moments": "bf16", "stochastic_rounding": True}),
    ("SGD", torch.float32, {"moments": "int8", "momentum": 0.9}),
    ("Lion", torch.bfloat16, {"moments": "int8", "stochastic_rounding": True}),
]
MODULES = {"AdamW": "fused_optim.triton.adam", "SGD": "fused_optim.triton.sgd", "Lion": "fused_optim.triton.lion"}


def stepped(name: str, dtype: torch.dtype, options: dict) -> list[torch.Tensor]:
    """Params and state of two steps over three tensors: one of 10,007 elements (at 4 blocks of 1024 a program,
    three programs, the last with a partial block and a block past the end), one empty, one of 130."""
    generator = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(numel, generator=generator).to(dtype)) for numel in (10000 + 7, 0, 130)]
    # a seed of its own (not torch's, which each test sets): every run draws the same random bits
    optimizer = getattr(fused_optim, name)([{"params": params, "seed": 77}], lr=1e-3, backend="triton", **options)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator).mul_(1e-2).to(dtype)
        optimizer.step()
    tensors = [p.detach() for p in params]
    tensors += [t for p in params for t in optimizer.state[p].values() if isinstance(t, torch.Tensor)]
    return [t.contiguous().reshape(-1).view(torch.uint8).clone() for t in tensors]


@functools.cache
def stepped_at_the_default_shape(row: int) -> list[torch.Tensor]:
    """`stepped` for ROWS[row] at the modules' own BLOCK and BLOCKS, run once for the four shapes compared with it."""
    return stepped(*ROWS[row])


SHAPES = [{"BLOCK": 512}, {"BLOCK": 2048}, {"BLOCKS": 3}, {"BLOCKS": 4}]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda shape: ",".join(f"{k}={v}" for k, v in shape.items()))
@pytest.mark.parametrize("row", range(len(ROWS)), ids=["-".join(str(v).replace(" ", "") for v in row) for row in ROWS])
def test_every_launch_shape_steps_the_same_bits(monkeypatch, row, shape):
    name, dtype, options = ROWS[row]
    module = importlib.import_module(MODULES[name])
    expected = stepped_at_the_default_shape(row)
    for setting, value in shape.items():
        monkeypatch.setattr(module, setting, value)
    ours = stepped(name, dtype, options)
    assert len(ours) == len(expected)
    for a, b in zip(ours, expected):
        assert torch.equal(a, b)
