"""torch's own optimizer contract (torch.testing._internal.common_optimizers.optim_db) run against fused_optim's
Adam, AdamW and SGD: every config torch's OptimizerInfo lists for the CPU, with each of torch's implementation flags
(foreach, fused, differentiable) on in turn, must give torch's params within torch's default tolerances after a few
steps, in float32, float64 and complex64 (with a non-contiguous param beside contiguous ones); and every error
input must raise what torch raises.

The model is torch's own test model (a (10, 5) weight and a (10,) bias, loss = sum((W x + b)^2)), with the weight
stored transposed (non-contiguous) in one variant.
"""

from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch

import fused_optim

common_optimizers = pytest.importorskip("torch.testing._internal.common_optimizers")
OptimizerErrorEnum = common_optimizers.OptimizerErrorEnum

INFOS = [info for info in common_optimizers.optim_db if info.optim_cls in (torch.optim.Adam, torch.optim.AdamW,
                                                                            torch.optim.SGD)]
DTYPES = [torch.float32, torch.float64, torch.complex64]
STEPS = 5


def configs():
    for info in INFOS:
        name = info.optim_cls.__name__
        for dtype in DTYPES:
            inputs = common_optimizers._get_optim_inputs_including_global_cliquey_kwargs("cpu", dtype, info)
            for optim_input in inputs:
                for layout in ("contiguous", "transposed"):
                    yield pytest.param(name, dtype, optim_input.kwargs, layout,
                                       id=f"{name}-{str(dtype)[6:]}-{optim_input.desc}-{layout}".replace(" ", "_"))


def make_params(dtype: torch.dtype, layout: str) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(10, 5, generator=generator, dtype=dtype)
    if layout == "transposed":
        weight = weight.t().contiguous().t()  # the same values, column-major: non-contiguous
    bias = torch.randn(10, generator=generator, dtype=dtype)
    return [torch.nn.Parameter(weight), torch.nn.Parameter(bias)]


def loss_of(params: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    out = params[0] @ x + params[1]
    return torch.view_as_real(out).square().sum() if out.is_complex() else out.square().sum()


def train(optimizer_class, kwargs: dict, dtype: torch.dtype, layout: str) -> list[torch.Tensor]:
    """The params after STEPS steps; with differentiable=True, after one step (the state it updates in place is
    saved for the backward of the step before, as in torch's own differentiable tests), also the gradient of their
    sum with respect to the leaves they were made from, through the update (the params are non-leaf tensors then,
    and their grads set by hand)."""
    leaves = make_params(dtype, layout)
    differentiable = kwargs.get("differentiable", False)
    params = [leaf.clone() for leaf in leaves] if differentiable else leaves
    opt = optimizer_class(params, **copy.deepcopy(kwargs))
    x = torch.randn(5, generator=torch.Generator().manual_seed(1), dtype=dtype)
    for _ in range(1 if differentiable else STEPS):
        if differentiable:
            grads = torch.autograd.grad(loss_of(params, x), params)
            for p, g in zip(params, grads):
                p.grad = g
            step = opt.step
        else:
            def step():
                def closure():
                    opt.zero_grad()
                    loss = loss_of(params, x)
                    loss.backward()
                    return loss
                return opt.step(closure)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            step()
    result = [p.detach().clone() for p in params]
    if differentiable:
        total = sum(torch.view_as_real(p).sum() if p.is_complex() else p.sum() for p in params)
        result += list(torch.autograd.grad(total, leaves))
    return result


@pytest.mark.parametrize("name, dtype, kwargs, layout", list(configs()))
def test_every_torch_config_matches_torch(name, dtype, kwargs, layout):
    try:
        want = train(getattr(torch.optim, name), kwargs, dtype, layout)
    except Exception as error:  # noqa: BLE001  (a config torch refuses, e.g. fused=True on complex params)
        with pytest.raises(type(error), match=re.escape(str(error))):
            train(getattr(fused_optim, name), kwargs, dtype, layout)
        return
    got = train(getattr(fused_optim, name), kwargs, dtype, layout)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)  # torch's default tolerances for the dtype


def error_cases():
    for info in INFOS:
        name = info.optim_cls.__name__
        for error_input in info.optim_error_inputs_func(device="cpu", dtype=torch.float32):
            yield pytest.param(name, error_input, id=f"{name}-{error_input.optimizer_error_input.desc}".replace(" ", "_"))


@pytest.mark.parametrize("name, error_input", list(error_cases()))
def test_every_torch_error_input_raises_what_torch_raises(name, error_input):
    optim_input = error_input.optimizer_error_input
    params = optim_input.params
    if params is None:
        params = make_params(torch.float32, "contiguous")
    elif isinstance(params, list):
        params = copy.copy(params)
    cls = getattr(fused_optim, name)
    if issubclass(error_input.error_type, Warning):
        with pytest.warns(error_input.error_type, match=error_input.error_regex):
            cls(params, **optim_input.kwargs)
        return
    if error_input.error_on == OptimizerErrorEnum.CONSTRUCTION_ERROR:
        with pytest.raises(error_input.error_type, match=error_input.error_regex):
            cls(params, **optim_input.kwargs)
    else:
        opt = cls(params, **optim_input.kwargs)
        with pytest.raises(error_input.error_type, match=error_input.error_regex):
            opt.step()


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sparse_grads_step_as_torch_steps_them(momentum):
    """SGD with sparse grads (an nn.Embedding(sparse=True), as torch's OptimizerInfo marks SGD): torch's own update
    runs those params, the kernels the dense ones beside them."""
    results = []
    for cls in (torch.optim.SGD, fused_optim.SGD):
        torch.manual_seed(0)
        embedding = torch.nn.Embedding(20, 4, sparse=True)
        head = torch.nn.Linear(4, 1)
        opt = cls([*embedding.parameters(), *head.parameters()], lr=0.1, momentum=momentum, weight_decay=0.0)
        for step in range(3):
            opt.zero_grad()
            head(embedding(torch.tensor([step, 3, 7]))).square().sum().backward()
            opt.step()
        results.append([p.detach() for p in (embedding.weight, head.weight, head.bias)])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


def test_sparse_grads_with_max_grad_norm_are_refused_and_change_nothing():
    """torch's own update, which steps sparse grads, has no clipping: refused in one sentence, before any change to
    the dense params beside them."""
    embedding = torch.nn.Embedding(20, 4, sparse=True)
    head = torch.nn.Linear(4, 1)
    opt = fused_optim.SGD([{"params": head.parameters()}, {"params": embedding.parameters()}], lr=0.1, momentum=0.9,
                          max_grad_norm=1.0)
    head(embedding(torch.tensor([1, 3, 7]))).square().sum().backward()
    before = [p.detach().clone() for p in (embedding.weight, head.weight, head.bias)]
    with pytest.raises(RuntimeError, match=r"^fused_optim.SGD\(max_grad_norm=...\) does not take sparse gradients"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip((embedding.weight, head.weight, head.bias), before))
    assert len(opt.state) == 0
