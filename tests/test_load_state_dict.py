"""What `load_state_dict` refuses, and what it repairs, beyond torch's own checks: a saved state that would step
wrong numbers, fail inside a kernel, or leave an optimizer that cannot save again is refused with one sentence and
changes nothing (the optimizer then steps as a twin that never saw it); a state no param owns is left out; and the
saved tensors already in our form become the state, as torch's loader keeps them. Round trips and the interchange with
torch are tests/test_optimizer_contract.py's and each optimizer's own file's.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from test_adam import assert_identical, snapshot

import fused_optim

SHAPES = [(3,), (70,)]


def trained(cls=fused_optim.AdamW, dtype=torch.float32, steps=2, **options):
    """Params and an optimizer (cpu backend) after `steps` steps."""
    generator = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=generator).to(dtype)) for s in SHAPES]
    opt = cls(params, lr=1e-2, backend="cpu", **options)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator).to(dtype)
        opt.step()
    return params, opt


def twin_of(params, opt):
    """A copy of `params` and `opt` that has seen nothing."""
    twin_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    twin = type(opt)(twin_params, backend="cpu", max_grad_norm=opt.max_grad_norm)  # (the rest: the groups' options)
    twin.load_state_dict(copy.deepcopy(opt.state_dict()))  # its own tensors: a live state_dict() shares the optimizer's
    return twin_params, twin


def steps_as_its_twin(params, opt, twin_params, twin, state=True):
    """One step of both with the same grads leaves the params (and the state) bit for bit alike."""
    for p, q in zip(params, twin_params):
        p.grad = torch.ones_like(p)
        q.grad = torch.ones_like(q)
    opt.step()
    twin.step()
    assert_identical([p.detach() for p in params], [q.detach() for q in twin_params])
    if state:
        assert_identical([opt.state[p] for p in params], [twin.state[q] for q in twin_params])


def assert_refused_and_unchanged(params, opt, state_dict, error, match):
    twin_params, twin = twin_of(params, opt)
    before = snapshot(opt)
    with pytest.raises(error, match=match):
        opt.load_state_dict(state_dict)
    assert_identical(snapshot(opt), before)
    # and it steps on as the twin (whose count, where it only says "set", may differ: SGD's state_dict leaves it out)
    steps_as_its_twin(params, opt, twin_params, twin, state=False)


@pytest.mark.parametrize("cls, key, dtype", [(fused_optim.AdamW, "exp_avg", torch.float64),
                                             (fused_optim.AdamW, "exp_avg_sq", torch.float32),
                                             (fused_optim.SGD, "momentum_buffer", torch.float64),
                                             (fused_optim.Lion, "exp_avg", torch.float32)])
def test_int8_codes_cast_to_floats_are_refused(cls, key, dtype):
    """A cast turns codes (-127..127, 0..255) into values thousands to 10^8 times the moments they stand for."""
    options = dict(momentum=0.9) if cls is fused_optim.SGD else {}
    params, opt = trained(cls, moments="int8", **options)
    state_dict = opt.state_dict()
    state_dict["state"][1] = {**state_dict["state"][1], key: state_dict["state"][1][key].to(dtype)}
    assert_refused_and_unchanged(params, opt, state_dict, TypeError,
                                 f"'{key}' of param 1 is {dtype} beside int8 'moment_scales'")


@pytest.mark.parametrize("cls, key, dtype", [(fused_optim.AdamW, "exp_avg", torch.uint8),
                                             (fused_optim.AdamW, "exp_avg_sq", torch.int8),
                                             (fused_optim.Lion, "exp_avg", torch.uint8)])
def test_codes_of_the_wrong_kind_are_refused(cls, key, dtype):
    params, opt = trained(cls, moments="int8")
    state_dict = opt.state_dict()
    state_dict["state"][0] = {**state_dict["state"][0], key: state_dict["state"][0][key].view(dtype)}
    assert_refused_and_unchanged(params, opt, state_dict, TypeError, f"'{key}' of param 0 holds {dtype} codes")


@pytest.mark.parametrize("moments", ["fp32", "int8"])
def test_an_adam_state_without_its_step_is_refused(moments):
    """Counted from 0 again, its bias corrections would double the next update (torch's loader refuses it too)."""
    params, opt = trained(moments=moments)
    state_dict = opt.state_dict()
    state_dict["state"][0] = {key: value for key, value in state_dict["state"][0].items() if key != "step"}
    assert_refused_and_unchanged(params, opt, state_dict, ValueError, "param 0 has no 'step', which AdamW's update")


@pytest.mark.parametrize("cls", [fused_optim.AdamW, fused_optim.Lion, fused_optim.SGD], ids=lambda c: c.__name__)
def test_a_step_of_several_numbers_is_refused(cls):
    """A 'step' must be one number (a mis-merged checkpoint may hold more): refused at the load, not at the next
    step after the state was replaced."""
    params, opt = trained(cls, **({"momentum": 0.9} if cls is fused_optim.SGD else {}))
    state_dict = opt.state_dict()
    state_dict["state"][0] = {**state_dict["state"][0], "step": torch.tensor([1.0, 2.0])}
    assert_refused_and_unchanged(params, opt, state_dict, TypeError,
                                 "'step' of param 0 must be a number or a one-element tensor")


def test_an_adam_state_loaded_into_adamw_leaves_it_decoupled():
    """torch.optim.AdamW keeps decoupled_weight_decay=True whatever a loaded group says (an Adam checkpoint says
    False), and so does ours: the next step is AdamW's."""
    init = torch.randn(8)
    adam = torch.optim.Adam([torch.nn.Parameter(init.clone())], lr=0.1, weight_decay=0.5)
    ours, theirs = torch.nn.Parameter(init.clone()), torch.nn.Parameter(init.clone())
    opt = fused_optim.AdamW([ours], lr=0.1, weight_decay=0.5)
    torch_opt = torch.optim.AdamW([theirs], lr=0.1, weight_decay=0.5)
    for optimizer in (opt, torch_opt):
        optimizer.load_state_dict(adam.state_dict())
    assert opt.param_groups[0]["decoupled_weight_decay"] is torch_opt.param_groups[0]["decoupled_weight_decay"] is True
    ours.grad, theirs.grad = torch.full((8,), 1e-3), torch.full((8,), 1e-3)  # the decay moves params 10x the grad
    opt.step()
    torch_opt.step()
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


def test_a_none_moment_is_refused_and_a_none_master_starts_from_the_param():
    params, opt = trained()
    state_dict = opt.state_dict()
    state_dict["state"][1] = {**state_dict["state"][1], "exp_avg": None}  # (the state's own dict: not in place)
    assert_refused_and_unchanged(params, opt, state_dict, ValueError, "param 1 has no 'exp_avg'")

    params, opt = trained(dtype=torch.bfloat16, master_weights=True)
    state_dict = opt.state_dict()
    state_dict["state"][0] = {**state_dict["state"][0], "master_remainder": None}  # as if saved without a master:
    opt.load_state_dict(state_dict)  # it starts from the param
    assert not opt.state[params[0]]["master_remainder"].any() and opt.state[params[1]]["master_remainder"].any()


@pytest.mark.parametrize("cls, torch_cls, options", [
    (fused_optim.AdamW, torch.optim.AdamW, {}),
    (fused_optim.SGD, torch.optim.SGD, dict(momentum=0.9)),
])
def test_a_torch_checkpoint_resumes_fp16_masters_whichever_is_loaded_first(cls, torch_cls, options):
    """A torch checkpoint has no master: an fp16 param's fp32 master starts from the param at its next step, so a
    model loaded after the optimizer's state is what training goes on from (a copy taken at the load undid it: the
    first step jumped back to the fresh model's weights). A bf16 param's remainder starts at 0, the param itself."""
    generator = torch.Generator().manual_seed(0)
    trained_weights = [torch.randn(s, generator=generator) for s in SHAPES]
    torch_params = [torch.nn.Parameter(w.clone()) for w in trained_weights]
    torch_opt = torch_cls(torch_params, lr=1e-2, **options)
    for p in torch_params:
        p.grad = torch.randn(p.shape, generator=generator)
    torch_opt.step()
    checkpoint = {"model": [p.detach().half() for p in torch_params], "opt": torch_opt.state_dict()}
    grads = [torch.randn(s, generator=generator).half() for s in SHAPES]
    results = []
    for model_first in (True, False):
        params = [torch.nn.Parameter(torch.zeros(s, dtype=torch.float16)) for s in SHAPES]  # a fresh model
        opt = cls(params, lr=1e-2, backend="cpu", master_weights=True, **options)
        if model_first:
            for p, w in zip(params, checkpoint["model"]):
                p.data.copy_(w)
        opt.load_state_dict(copy.deepcopy(checkpoint["opt"]))  # (its tensors become the state, as in torch)
        if not model_first:
            for p, w in zip(params, checkpoint["model"]):
                p.data.copy_(w)
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        results.append([p.detach().clone() for p in params])
    for ours_model_first, ours_opt_first, before in zip(*results, checkpoint["model"]):
        assert torch.equal(ours_model_first, ours_opt_first)
        assert (ours_opt_first.float() - before.float()).abs().max() < 0.05  # one step of lr 1e-2 away


@pytest.mark.parametrize("source, target", [
    (dict(cls=fused_optim.AdamW), dict(cls=fused_optim.SGD, momentum=0.9)),
    (dict(cls=fused_optim.AdamW, moments="int8"), dict(cls=fused_optim.Lion, moments="int8")),
    (dict(cls=fused_optim.Lion), dict(cls=fused_optim.AdamW)),
], ids=["adamw-into-sgd", "int8-adamw-into-lion", "lion-into-adamw"])
def test_another_optimizers_state_is_refused(source, target):
    _, source_opt = trained(**source)
    params, opt = trained(**target)
    assert_refused_and_unchanged(params, opt, source_opt.state_dict(), ValueError,
                                 "param 0 (holds 'exp_avg', which SGD does not keep|holds 'exp_avg_sq', which Lion "
                                 "does not keep|has no 'exp_avg_sq', which AdamW's update reads)")


@pytest.mark.parametrize("cls", [fused_optim.AdamW, fused_optim.SGD])
def test_the_state_of_an_id_no_group_lists_is_left_out(cls):
    """torch's loader would keep it under its bare id, where no param steps it; our state_dict could not number it."""
    params, opt = trained(cls, **(dict(momentum=0.9) if cls is fused_optim.SGD else {}))
    state_dict = opt.state_dict()
    state_dict["state"][7] = state_dict["state"][0]
    opt.load_state_dict(state_dict)
    assert set(opt.state) == set(params)
    assert set(opt.state_dict()["state"]) == set(opt.torch_state_dict()["state"]) == {0, 1}


@pytest.mark.parametrize("cls, saved, built, match", [
    (torch.optim.AdamW, {}, dict(moments="int8"), "moments='int8' does not take differentiable"),
    (torch.optim.AdamW, {}, dict(max_grad_norm=1.0), "max_grad_norm does not take differentiable"),
    (torch.optim.SGD, dict(momentum=0.9), dict(momentum=0.9, moments="int8"),
     "moments='int8' does not take differentiable"),
])
def test_a_loaded_group_takes_only_what_the_constructor_takes(cls, saved, built, match):
    """A loaded group's options win, as in torch, and are checked as the constructor checks them (torch's
    optimizer saved with differentiable=True: its group says so)."""
    torch_params = [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]
    torch_opt = cls(torch_params, lr=1e-2, **saved)
    for p in torch_params:
        p.grad = torch.randn(p.shape)
    torch_opt.step()
    state_dict = torch_opt.state_dict()
    state_dict["param_groups"][0]["differentiable"] = True
    ours = fused_optim.SGD if cls is torch.optim.SGD else fused_optim.AdamW
    params, opt = trained(ours, **built)
    assert_refused_and_unchanged(params, opt, state_dict, ValueError, f"loaded state dict's param group 0: {match}")


def test_24_bit_masters_are_refused_for_fp16_params():
    _, source = trained(dtype=torch.bfloat16, steps=0, master_weights=24)
    params, opt = trained(dtype=torch.float16)
    assert_refused_and_unchanged(params, opt, source.state_dict(), ValueError,
                                 "param group 0: master_weights=24 keeps a bfloat16 param's master")


def test_a_group_saved_with_stochastic_rounding_keeps_master_weights_off():
    """The two are alternatives: the saved group left master_weights out at False, and it stays False."""
    _, source = trained(dtype=torch.bfloat16, stochastic_rounding=True)
    params, opt = trained(dtype=torch.bfloat16, master_weights=True)
    opt.load_state_dict(source.state_dict())
    group = opt.param_groups[0]
    assert group["stochastic_rounding"] and "master_weights" not in group  # (a group holds no neutral option)
    assert "master_remainder" not in opt.state[params[0]]


@pytest.mark.parametrize("moments", ["fp32", "int8"])
def test_amsgrad_turned_off_leaves_its_moment_as_torch_does(moments):
    """Loaded into amsgrad=False (or turned off between steps), an amsgrad state steps on as one saved without
    amsgrad, and keeps its max_exp_avg_sq, unread, as torch's does."""
    params, opt = trained(amsgrad=True, moments=moments)
    state_dict = copy.deepcopy(opt.state_dict())
    for group in state_dict["param_groups"]:
        group["amsgrad"] = False
    plain_dict = {**state_dict, "state": {index: {key: value for key, value in state.items()
                                                  if key != "max_exp_avg_sq"} for index, state in
                                          state_dict["state"].items()}}
    if moments == "int8":
        for state in plain_dict["state"].values():
            state["moment_scales"] = state["moment_scales"][:2]
    loaded_params, loaded = twin_of(params, opt)
    loaded.load_state_dict(copy.deepcopy(state_dict))
    plain_params, plain = twin_of(params, opt)
    plain.load_state_dict(copy.deepcopy(plain_dict))
    opt.param_groups[0]["amsgrad"] = False  # in place, between steps
    kept = loaded.state[loaded_params[0]]["max_exp_avg_sq"]
    assert torch.equal(kept, state_dict["state"][0]["max_exp_avg_sq"].view(kept.shape))  # (int8: a unit dim saved)
    for run in (params, loaded_params, plain_params):
        for p in run:
            p.grad = torch.ones_like(p)
    for optimizer in (opt, loaded, plain):
        optimizer.step()
    assert_identical([p.detach() for p in loaded_params], [p.detach() for p in plain_params])
    assert_identical([p.detach() for p in params], [p.detach() for p in plain_params])


def test_a_step_saved_as_a_numpy_number_loads():
    params, opt = trained()
    state_dict = opt.state_dict()
    state_dict["state"][0] = {**state_dict["state"][0], "step": np.float32(2.0)}
    opt.load_state_dict(state_dict)
    assert opt.state[params[0]]["step"].item() == 2.0


def test_an_fp32_master_loaded_beside_an_fp32_param_becomes_the_param():
    """The master of an fp16 run is exact where its param is rounded: an fp32 param takes it, and keeps no copy."""
    fp16_params, fp16 = trained(dtype=torch.float16, master_weights=True)
    params, opt = trained()
    opt.load_state_dict(fp16.state_dict())
    for p, q in zip(params, fp16_params):
        assert "master_param" not in opt.state[p]
        assert torch.equal(p.detach(), fp16.state[q]["master_param"])


def same_memory(a, b) -> bool:
    """Whether b is a, or a view of all of a's elements."""
    return isinstance(b, torch.Tensor) and a.data_ptr() == b.data_ptr() and a.numel() == b.numel()


@pytest.mark.parametrize("cls, dtype, options", [(fused_optim.AdamW, torch.float32, {}),
                                                 (fused_optim.AdamW, torch.float32, {"moments": "int8"}),
                                                 (fused_optim.AdamW, torch.bfloat16, {"moments": "bf16",
                                                                                      "master_weights": True}),
                                                 (fused_optim.AdamW, torch.bfloat16, {"moments": "int8",
                                                                                      "master_weights": 24}),
                                                 (fused_optim.Adam, torch.float16, {"master_weights": True}),
                                                 (fused_optim.SGD, torch.float32, {"momentum": 0.9}),
                                                 (fused_optim.Lion, torch.bfloat16, {"moments": "int8",
                                                                                     "stochastic_rounding": True})])
def test_a_resume_keeps_the_saved_tensors_as_torch_does(cls, dtype, options):
    """A checkpoint's tensors already in our form become the state as they are, not copies (torch's loader keeps
    them so too; int8 codes, saved with a unit dim, as views of them): a resume holds the state once, not twice. It
    then steps on as a twin loaded from a copy."""
    params, opt = trained(cls, dtype, **options)
    saved = copy.deepcopy(opt.state_dict())
    twin_params, twin = twin_of(params, opt)
    opt.load_state_dict(saved)
    for index, p in enumerate(params):
        kept = {key for key, value in opt.state[p].items() if same_memory(value, saved["state"][index].get(key))}
        assert kept == set(opt.state[p]) - {"step"}  # the count becomes a float32 tensor on the param's device
    steps_as_its_twin(params, opt, twin_params, twin)
    assert_identical([opt.state[p] for p in params], [twin.state[q] for q in twin_params])


def test_a_saved_tensor_in_another_form_is_converted_and_left_as_it_was():
    """fp64 moments saved for fp32 ones, and a moment in another memory layout, are copies in ours: the checkpoint
    stays as it was through the steps."""
    params = [torch.nn.Parameter(torch.randn(4, 6))]
    opt = fused_optim.AdamW(params, lr=1e-2, backend="cpu")
    params[0].grad = torch.randn(4, 6)
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    saved["state"][0]["exp_avg"] = saved["state"][0]["exp_avg"].double()
    saved["state"][0]["exp_avg_sq"] = saved["state"][0]["exp_avg_sq"].t().contiguous().t()
    before = copy.deepcopy(saved)
    opt.load_state_dict(saved)
    state = opt.state[params[0]]
    assert state["exp_avg"].dtype == torch.float32 and state["exp_avg_sq"].is_contiguous()
    params[0].grad = torch.randn(4, 6)
    opt.step()
    assert_identical(saved, before)


def test_one_saved_tensor_under_two_params_becomes_two_states():
    """torch.load keeps a tensor saved under two params (or two keys) as one: each param's state is then a copy of
    its own, and steps as if it had been saved twice."""
    generator = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, generator=generator)) for _ in range(2)]
    opt = fused_optim.AdamW(params, lr=1e-2, amsgrad=True, backend="cpu")
    for p in params:
        p.grad = torch.randn(5, generator=generator)
    opt.step()
    shared, apart = copy.deepcopy(opt.state_dict()), copy.deepcopy(opt.state_dict())
    shared["state"][1]["exp_avg"] = shared["state"][0]["exp_avg"]
    shared["state"][0]["max_exp_avg_sq"] = shared["state"][0]["exp_avg_sq"]
    apart["state"][1]["exp_avg"] = apart["state"][0]["exp_avg"].clone()
    apart["state"][0]["max_exp_avg_sq"] = apart["state"][0]["exp_avg_sq"].clone()
    twin_params, twin = twin_of(params, opt)
    twin.load_state_dict(apart)
    opt.load_state_dict(shared)
    keys = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    assert len({opt.state[p][key].data_ptr() for p in params for key in keys}) == 6
    steps_as_its_twin(params, opt, twin_params, twin)


def test_a_saved_tensor_that_requires_grad_is_copied():
    """An fp32 master saved as another model's weight (a Parameter) is copied: the steps leave that weight alone."""
    params, opt = trained(dtype=torch.float16, master_weights=True)
    saved = copy.deepcopy(opt.state_dict())
    weight = torch.nn.Parameter(saved["state"][0]["master_param"].clone())
    saved["state"][0]["master_param"] = weight
    before = weight.detach().clone()
    opt.load_state_dict(saved)
    master = opt.state[params[0]]["master_param"]
    assert master is not weight and not master.requires_grad and torch.equal(master, before)
    params[0].grad = torch.ones_like(params[0])
    opt.step()
    assert torch.equal(weight.detach(), before)


def test_int8_scales_saved_as_a_strided_view_load():
    """Saved scales that are a view with gaps (columns of a wider tensor) load as the contiguous rows the kernels
    read."""
    params, opt = trained(moments="int8")
    saved = copy.deepcopy(opt.state_dict())
    twin_params, twin = twin_of(params, opt)
    for state in saved["state"].values():
        wide = torch.zeros(state["moment_scales"].shape[0], 2 * state["moment_scales"].shape[1], dtype=torch.bfloat16)
        wide[:, ::2] = state["moment_scales"]
        state["moment_scales"] = wide[:, ::2]
    opt.load_state_dict(saved)
    steps_as_its_twin(params, opt, twin_params, twin)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("cls", [fused_optim.AdamW, fused_optim.SGD, fused_optim.Lion], ids=lambda c: c.__name__)
@pytest.mark.parametrize("options", [{}, {"stochastic_rounding": True}], ids=["plain", "stochastic"])
def test_a_saved_master_is_dropped_by_a_group_that_keeps_none(cls, dtype, options):
    """torch_state_dict()'s fp32 master (`master_param`) loaded into a group without master weights: the group's
    choice holds (no master kept, stochastic rounding where asked for) and the params stay as loaded."""
    if options and dtype == torch.float16:
        pytest.skip("stochastic rounding is for bf16 params")
    kwargs = {"momentum": 0.9} if cls is fused_optim.SGD else {}
    params, source = trained(cls, dtype=dtype, master_weights=True, **kwargs)
    saved = copy.deepcopy(source.torch_state_dict())
    assert all("master_param" in state for state in saved["state"].values())
    loaded = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = cls(loaded, lr=1e-2, backend="cpu", **kwargs, **options)
    opt.load_state_dict(saved)
    assert all(torch.equal(p, q) for p, q in zip(loaded, params))
    for p in loaded:
        assert not opt.state[p].keys() & {"master_param", "master_remainder"}
        assert opt._kind(p, opt.state[p], opt.param_groups[0]) == ("stochastic" if options else "plain")


@pytest.mark.parametrize("cls", [fused_optim.AdamW, fused_optim.SGD, fused_optim.Lion], ids=lambda c: c.__name__)
@pytest.mark.parametrize("saved_options, loaded_options", [
    ({"master_weights": True}, {"master_weights": 24}),
    ({"master_weights": 24}, {"master_weights": True}),
    ({"master_weights": True}, {"master_weights": False}),
    ({"master_weights": 24}, {"master_weights": False, "stochastic_rounding": True}),
], ids=["16-to-24", "24-to-16", "16-to-none", "24-to-stochastic"])
def test_a_saved_remainder_loads_into_another_master_mode_as_its_fp32_master(cls, saved_options, loaded_options):
    """A state saved with remainders whose groups are edited to another master mode before loading: the group's mode
    holds (a remainder of its kind, or none), as if the fp32 masters of torch_state_dict() had been loaded."""
    kwargs = {"momentum": 0.9} if cls is fused_optim.SGD else {}
    params, source = trained(cls, dtype=torch.bfloat16, **saved_options, **kwargs)
    ours = copy.deepcopy(source.state_dict())
    for group in ours["param_groups"]:
        group.update(loaded_options)
    results = []
    for saved in (ours, copy.deepcopy(source.torch_state_dict())):
        loaded = [torch.nn.Parameter(p.detach().clone()) for p in params]
        opt = cls(loaded, lr=1e-2, backend="cpu", **kwargs, **loaded_options)
        opt.load_state_dict(saved)
        results.append((loaded, opt))
    (ours_params, ours_opt), (torch_params, torch_opt) = results
    if "seed" in ours_opt.param_groups[0]:  # the torch form saves none: it keeps the loading optimizer's
        torch_opt.param_groups[0]["seed"] = ours_opt.param_groups[0]["seed"]
    for p in ours_params:
        remainder = ours_opt.state[p].get("master_remainder")
        assert (None if remainder is None else remainder.dtype) == {True: torch.int16, 24: torch.int8}.get(
            loaded_options["master_weights"])
    assert_identical([p.detach() for p in ours_params], [p.detach() for p in torch_params])
    assert_identical([ours_opt.state[p] for p in ours_params], [torch_opt.state[p] for p in torch_params])
    steps_as_its_twin(ours_params, ours_opt, torch_params, torch_opt)


@pytest.mark.parametrize("cls", [fused_optim.AdamW, fused_optim.SGD])
def test_a_load_that_fails_part_way_changes_nothing(cls, monkeypatch):
    """A load that fails after torch's loader took the groups (a failure past what check_saved_state knows to check,
    stood in for by a failing restore) leaves the groups and the state as they were, and the optimizer steps on as
    its twin."""
    options = {"momentum": 0.9} if cls is fused_optim.SGD else {}
    params, opt = trained(cls, **options)
    _, other = trained(cls, steps=3, **options)
    state_dict = other.state_dict()
    state_dict["param_groups"][0]["lr"] = 0.5
    twin_params, twin = twin_of(params, opt)
    before = snapshot(opt)

    def failing_restore(self, state_dict):
        raise RuntimeError("a restore that fails")

    monkeypatch.setattr(cls, "_restore_saved_state", failing_restore)
    with pytest.raises(RuntimeError, match="a restore that fails"):
        opt.load_state_dict(state_dict)
    monkeypatch.undo()
    assert opt.param_groups[0]["lr"] == 1e-2
    assert_identical(snapshot(opt), before)
    steps_as_its_twin(params, opt, twin_params, twin, state=False)


@pytest.mark.parametrize("into", [{}, {"moments": "bf16"}, {"moments": "int8"}], ids=["fp32", "bf16", "int8"])
def test_a_dcp_checkpoint_of_int8_moments_loads_only_into_int8_moments(tmp_path, into):
    """DCP loads a checkpoint into the tensors of the dict the loading optimizer gives, and ignores saved keys it
    does not ask for (`moment_scales`, a group's `moments`): int8 codes of the param's shape were cast into an fp32
    or bf16 optimizer's moments without a word (10^5 times the moments). Saved with a unit dim, DCP's size check
    refuses them; an int8 optimizer loads them back bit for bit."""
    dcp = pytest.importorskip("torch.distributed.checkpoint")
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    def model_and_optimizer(**options):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
        return model, fused_optim.AdamW(model.parameters(), lr=1e-2, **options)

    model, opt = model_and_optimizer(moments="int8")
    for _ in range(2):
        model(torch.randn(5, 8)).square().mean().backward()
        opt.step()
    model_state, optim_state = get_state_dict(model, opt)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp_path))
    loaded_model, loaded = model_and_optimizer(**into)
    model_state, optim_state = get_state_dict(loaded_model, loaded)
    state = {"model": model_state, "optim": optim_state}
    if into.get("moments") != "int8":
        with pytest.raises(CheckpointException, match=r"Size mismatch between saved torch.Size\(\[16, 8, 1\]\)"):
            dcp.load(state, checkpoint_id=str(tmp_path))
        return
    dcp.load(state, checkpoint_id=str(tmp_path))
    set_state_dict(loaded_model, loaded, model_state_dict=state["model"], optim_state_dict=state["optim"])
    for p, q in zip(model.parameters(), loaded_model.parameters()):
        assert_identical(loaded.state[q], opt.state[p])
