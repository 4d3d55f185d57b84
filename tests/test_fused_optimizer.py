"""What every fused_optim optimizer shares (fused_optim/optim/_base.py): empty param groups, and a bad grad in a later
group changing nothing in the earlier ones."""

from __future__ import annotations

import pytest
import torch

import fused_optim

OPTIMIZERS = [fused_optim.Adam, fused_optim.AdamW, fused_optim.SGD]


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda cls: cls.__name__)
def test_an_empty_param_group_is_allowed_as_in_torch(cls, cpu_backend):
    param = torch.nn.Parameter(torch.randn(5))
    param.grad = torch.randn(5)
    before = param.detach().clone()
    opt = cls([{"params": []}, {"params": [param]}], lr=0.1, backend=cpu_backend)
    opt.step()
    assert not torch.equal(param, before)
    assert opt.skipped_steps.device == param.device


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda cls: cls.__name__)
def test_a_bad_grad_in_a_later_group_changes_nothing(cls, cpu_backend):
    good = torch.nn.Parameter(torch.randn(5))
    good.grad = torch.randn(5)
    bad = torch.nn.Parameter(torch.randn(4).bfloat16())
    bad.main_grad = torch.randn(4).half()  # neither the param's dtype nor float32
    momentum = {"momentum": 0.9} if cls is fused_optim.SGD else {}
    opt = cls([{"params": [good]}, {"params": [bad]}], lr=0.1, max_grad_norm=1.0, backend=cpu_backend, **momentum)
    before = [good.detach().clone(), bad.detach().clone()]
    with pytest.raises(RuntimeError, match="a grad must have its param's shape and device, and its param's dtype"):
        opt.step()
    assert torch.equal(good, before[0]) and torch.equal(bad, before[1])
    assert float(opt.skipped_steps) == 0 and opt.last_grad_norm is None


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda cls: cls.__name__)
def test_fused_and_foreach_together_is_torchs_error(cls):
    param = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(RuntimeError) as torchs:
        getattr(torch.optim, cls.__name__)([param], lr=0.1, foreach=True, fused=True)
    with pytest.raises(RuntimeError) as ours:
        cls([param], lr=0.1, foreach=True, fused=True)
    assert str(ours.value) == str(torchs.value)
