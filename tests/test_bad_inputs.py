"""Bad input gets torch's behaviour or one clear sentence, and changes nothing: the cases a review found across the
optimizers, the losses and GradAccumulator (each test names what it once did instead)."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import fused_optim
import fused_optim.functional as FF


def snapshot(opt: torch.optim.Optimizer) -> dict:
    return {id(p): {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
            for p, state in opt.state.items()}


def test_a_bad_grad_in_a_later_group_leaves_no_state_in_an_earlier_one():
    # the first group used to create its state before the second group's grad was checked
    first, second = torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(3))
    opt = fused_optim.Adam([{"params": [first]}, {"params": [second]}])
    first.grad = torch.randn(4)
    second.main_grad = torch.randn(5)  # the wrong shape (autograd itself would refuse it as a .grad)
    with pytest.raises(RuntimeError, match="shape"):
        opt.step()
    assert dict(opt.state) == {} and opt.state_dict()["state"] == {}


@pytest.mark.parametrize("cls", [fused_optim.AdamW, fused_optim.SGD])
@pytest.mark.parametrize("bad", ["a float moment", "a moment of another shape", "a step that is a list",
                                 "a state that is not a dict"])
def test_load_state_dict_checks_everything_before_it_changes_anything(cls, bad):
    # a saved moment that was not a tensor used to load half the state, then raise TypeError
    params = [torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(2, 3))]
    kwargs = {"momentum": 0.9} if cls is fused_optim.SGD else {}
    opt = cls(params, lr=0.1, **kwargs)
    for p in params:
        p.grad = torch.randn(p.shape)
    opt.step()
    saved = copy.deepcopy(opt.state_dict())  # torch's state_dict shares the state's own dicts
    key = "momentum_buffer" if cls is fused_optim.SGD else "exp_avg"
    state = saved["state"][1]
    if bad == "a float moment":
        state[key] = 0.5
    elif bad == "a moment of another shape":
        state[key] = torch.zeros(7)
    elif bad == "a step that is a list":
        state["step"] = [1]
    else:
        saved["state"][1] = [state[key]]
    before = snapshot(opt)
    with pytest.raises((TypeError, ValueError), match="param 1"):
        opt.load_state_dict(saved)
    after = snapshot(opt)
    assert before.keys() == after.keys()
    for p in before:
        for k, v in before[p].items():
            assert torch.equal(v, after[p][k])


def test_sgd_state_dict_with_a_state_that_is_not_a_dict():
    # SGD.state_dict() used to crash reading "step" from it
    param = torch.nn.Parameter(torch.randn(3))
    opt = fused_optim.SGD([param], lr=0.1)
    opt.state[param] = ["not a dict"]
    assert opt.state_dict()["state"] == {0: ["not a dict"]}


CE_CASES = {
    # name: (logits, target, kwargs)
    "NaN label smoothing is none, as torch's": (lambda: torch.randn(4, 5), lambda: torch.tensor([0, 1, 2, 3]),
                                                dict(label_smoothing=math.nan)),
    "one class, strided column": (lambda: torch.randn(1, 4).t(), lambda: torch.zeros(4, dtype=torch.long), {}),
}


@pytest.mark.parametrize("name", CE_CASES)
def test_cross_entropy_does_what_torch_does(name):
    make_logits, make_target, kwargs = CE_CASES[name]
    logits, target = make_logits(), make_target()
    ours = logits.clone().requires_grad_()
    theirs = logits.clone().requires_grad_()
    FF.cross_entropy(ours, target, **kwargs).backward()
    F.cross_entropy(theirs, target, **kwargs).backward()
    torch.testing.assert_close(ours.grad, theirs.grad)


def test_cross_entropy_refuses_with_one_sentence():
    logits = torch.randn(4, 5, requires_grad=True)
    target = torch.tensor([0, 1, 2, 3])
    with pytest.raises(RuntimeError, match="target on the input's device"):  # a meta loss came back
        FF.cross_entropy(logits, target.to("meta"))
    with pytest.raises(RuntimeError, match="not differentiable with respect to argument 'weight'"):  # silently none
        FF.cross_entropy(logits, target, weight=torch.rand(5, requires_grad=True))
    # 0-d logits: torch's errors in torch's order (the target's shape first), not one from our ops
    for target, error, match in ((torch.tensor(0), RuntimeError, "^Expected floating point type for target"),
                                 (torch.tensor(0.5), IndexError, "^Dimension specified as 1 but tensor has no"),
                                 (torch.tensor([0, 1]), IndexError, r"^Dimension out of range \(expected to be in")):
        for cross_entropy in (F.cross_entropy, FF.cross_entropy):
            with pytest.raises(error, match=match):
                cross_entropy(torch.tensor(1.0), target)


def test_probability_targets_without_z_loss_have_no_nan_from_it():
    # 0 * lse^2 with an infinite lse used to turn a finite row into NaN
    logits = torch.tensor([[0.0, 1.0, -math.inf], [math.inf, 0.0, 0.0]])
    target = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.5, 0.5]])
    torch.testing.assert_close(FF.cross_entropy(logits, target, reduction="none"),
                               F.cross_entropy(logits, target, reduction="none"), equal_nan=True)


def test_linear_cross_entropy_refuses_a_negative_chunk_size():
    if not hasattr(torch.nn, "LinearCrossEntropyOptions"):
        pytest.skip("this torch has no LinearCrossEntropyOptions")
    with pytest.raises(ValueError, match="batch_chunk_size"):
        FF.linear_cross_entropy(torch.randn(4, 3), torch.randn(5, 3), torch.tensor([0, 1, 2, 3]),
                                options=torch.nn.LinearCrossEntropyOptions(batch_chunk_size=-3))


@pytest.mark.parametrize("num_tokens", [0, -3, math.nan, math.inf])
def test_finalize_refuses_a_token_count_that_is_no_count(num_tokens):
    # these were taken silently (a division by zero, or a negative gradient)
    param = torch.nn.Parameter(torch.randn(3))
    acc = fused_optim.GradAccumulator([param])
    param.grad = torch.ones(3)
    acc.accumulate()
    with pytest.raises(ValueError, match="positive number of tokens"):
        acc.finalize(num_tokens=num_tokens)


def test_a_device_count_of_zero_skips_the_step():
    param = torch.nn.Parameter(torch.randn(3))
    before = param.detach().clone()
    acc = fused_optim.GradAccumulator([param])
    opt = fused_optim.AdamW([param], max_grad_norm=1.0)
    param.grad = torch.ones(3)
    acc.accumulate()
    acc.finalize(num_tokens=torch.zeros((), dtype=torch.int64))
    opt.step()
    assert torch.equal(param, before) and float(opt.skipped_steps) == 1


def test_compiled_step_raises_no_dynamo_warning():
    # backend resolution was functools.lru_cache-wrapped, and Dynamo warned about each call in the step
    model = torch.nn.Linear(8, 4)
    opt = fused_optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 8)).sum().backward()
    step = torch.compile(opt.step)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step()
        step()
    assert not [w for w in caught if "lru_cache" in str(w.message)]


def outcome(function):
    """("ok", result) or (the exception's type, its message)."""
    try:
        return "ok", function()
    except Exception as error:  # noqa: BLE001 (any error: compared with torch's)
        return type(error), str(error)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("kwargs", [
    dict(ignore_index=torch.tensor(2)), dict(ignore_index=torch.tensor([2])), dict(ignore_index=torch.tensor(2.0)),
    dict(ignore_index=2.0), dict(ignore_index=True), dict(ignore_index=2**63),
    dict(label_smoothing=torch.tensor(0.1)), dict(label_smoothing=torch.tensor([0.1])),
    dict(label_smoothing=torch.tensor(0.1, requires_grad=True)), dict(label_smoothing=None),
    dict(label_smoothing="0.1"), dict(label_smoothing=1), dict(label_smoothing=True), dict(label_smoothing=1j),
], ids=lambda kwargs: f"{next(iter(kwargs))}={next(iter(kwargs.values()))!r}")
def test_cross_entropy_takes_the_argument_types_torchs_parser_takes(kwargs, backend):
    """ignore_index an int (any __index__: an int tensor of one element too), label_smoothing a float (an int, a
    0-d tensor that requires no grad): what torch takes gives torch's loss, what it refuses its error and words."""
    logits, target = torch.randn(4, 5, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 2, 1, 2])
    ours = outcome(lambda: FF.cross_entropy(logits, target, backend=backend, **kwargs))
    theirs = outcome(lambda: F.cross_entropy(logits, target, **kwargs))
    assert ours[0] == theirs[0]
    if ours[0] == "ok":
        torch.testing.assert_close(ours[1], theirs[1])
    else:
        assert ours[1] == theirs[1]
