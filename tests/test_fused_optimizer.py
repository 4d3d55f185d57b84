"""What every fused_optim optimizer shares (fused_optim/optim/_base.py): empty param groups, and a bad grad in a later
group changing nothing in the earlier ones."""

from __future__ import annotations

import copy

import pytest
import torch
from test_adam import assert_identical

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


@pytest.mark.parametrize("cls", [fused_optim.AdamW, fused_optim.Lion], ids=lambda cls: cls.__name__)
def test_a_sparse_grad_in_a_later_group_changes_nothing(cls):
    """Refused before any group is stepped, on a later step too (when the groups' lists are already made), and on a
    first step without the earlier group's state left behind."""
    for steps_before in (0, 2):
        good = torch.nn.Parameter(torch.randn(5))
        sparse = torch.nn.Parameter(torch.randn(4, 3))
        opt = cls([{"params": [good]}, {"params": [sparse]}], lr=0.1)
        for _ in range(steps_before):
            good.grad, sparse.grad = torch.randn(5), torch.randn(4, 3)
            opt.step()
        state_before = {key: value.clone() for key, value in opt.state.get(good, {}).items()}
        before = good.detach().clone()
        good.grad = torch.randn(5)
        sparse.grad = torch.randn(4, 3).to_sparse()
        with pytest.raises(RuntimeError, match="sparse"):
            opt.step()
        assert torch.equal(good, before)
        assert {key: value.tolist() for key, value in opt.state.get(good, {}).items()} == \
            {key: value.tolist() for key, value in state_before.items()}
        assert (good in opt.state) == (steps_before > 0)


@pytest.mark.parametrize("edit", ["state reset", "step count set", "moment set"])
def test_state_replaced_after_a_step_is_what_the_next_step_uses(edit):
    """torch's optimizers read the state every step; ours keep their op arguments between steps, and must see a
    param's state dict replaced, or one of its tensors, as torch does."""
    results = []
    for cls in (torch.optim.AdamW, fused_optim.AdamW):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3)
        opt = cls(model.parameters(), lr=0.1)
        x = torch.randn(2, 4)
        for step in range(4):
            model(x).square().sum().backward()
            opt.step()
            opt.zero_grad()
            if step == 1:
                state = opt.state[model.weight]
                if edit == "state reset":
                    opt.state[model.weight] = {}
                elif edit == "step count set":
                    state["step"] = torch.tensor(0.0)
                else:
                    state["exp_avg"] = torch.zeros_like(state["exp_avg"])
        results.append((model.weight.detach(), opt.state_dict()["state"][0]))
    (theirs, their_state), (ours, our_state) = results
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    assert float(our_state["step"]) == float(their_state["step"])


@pytest.mark.parametrize("options, message", [
    ({"moments": "int 8"}, "moments must be"),
    ({"master_weights": 16}, "master_weights must be"),
    ({"master_weights": True, "stochastic_rounding": True}, "alternatives"),
])
def test_a_groups_own_options_are_checked_as_the_constructors(options, message):
    first, second = torch.nn.Parameter(torch.randn(3).bfloat16()), torch.nn.Parameter(torch.randn(3).bfloat16())
    with pytest.raises(ValueError, match=message):
        fused_optim.AdamW([{"params": [first]}, {"params": [second], **options}])
    opt = fused_optim.AdamW([first])
    with pytest.raises(ValueError, match=message):
        opt.add_param_group({"params": [second], **options})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("misfit", ["shape", "dtype", "device"])
def test_one_misfit_grad_among_many_is_refused_and_nothing_steps(misfit):
    """The grads are checked together (optim/_base.py's _grads_fit) and, only when one does not fit, one at a time
    for the words: a misfit among a hundred bf16 params' grads (bf16 and fp32 ones, both allowed) is refused in the
    optimizer's sentence and no param moves; with it mended, every param steps."""
    params = [torch.nn.Parameter(torch.randn(5).bfloat16()) for _ in range(100)]
    for i, p in enumerate(params):  # main_grad: torch's .grad setter itself refuses another shape, dtype or device
        p.main_grad = torch.randn(5).to(torch.float32 if i % 2 else torch.bfloat16)
    good = params[73].main_grad
    params[73].main_grad = {"shape": torch.randn(4), "dtype": torch.randn(5).half(),
                            "device": torch.empty(5, device="meta")}[misfit]
    opt = fused_optim.AdamW(params, lr=0.1)
    before = [p.detach().clone() for p in params]
    with pytest.raises(RuntimeError, match="a grad must have its param's shape and device, and its param's dtype"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before)) and not opt.state
    params[73].main_grad = good
    opt.step()
    assert not any(torch.equal(p, b) for p, b in zip(params, before))


GRAD_DTYPE = hasattr(torch.nn.Parameter(torch.zeros(1)), "grad_dtype")  # torch 2.14: a grad of another dtype


def low_precision_grads(params, dtype, seed=0):
    """bf16/fp16 grads for fp32 or fp64 params, as autograd accumulates them with `grad_dtype`."""
    generator = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad_dtype = None
        p.grad = torch.randn(p.shape, generator=generator).to(dtype)


def step_with_narrow_and_widened_grads(low, opt_low, wide, opt_wide, grad_dtype, steps=3):
    """`steps` steps of twin optimizers: `low`'s params with `grad_dtype` grads, `wide`'s with the same grads in
    their params' dtype."""
    for step in range(steps):
        low_precision_grads(low, grad_dtype, seed=step)
        for p, q in zip(low, wide):
            q.grad = p.grad.to(q.dtype)
        opt_low.step()
        opt_wide.step()


def starting_params(shapes, dtype) -> list[torch.nn.Parameter]:
    """The params every run of the test below starts from."""
    return [torch.nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=dtype))
            for shape in shapes]


@pytest.mark.skipif(not GRAD_DTYPE, reason="needs torch's Parameter.grad_dtype (2.14)")
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("grad_dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("cls, options", [(fused_optim.AdamW, {}), (fused_optim.Adam, {"moments": "int8"}),
                                          (fused_optim.SGD, {"momentum": 0.9}), (fused_optim.Lion, {})],
                         ids=["AdamW", "Adam-int8", "SGD", "Lion"])
def test_a_low_precision_grad_of_a_wide_param_steps_as_its_wide_value(cls, options, grad_dtype, param_dtype,
                                                                       cpu_backend):
    """torch's SGD steps an fp32 or fp64 param with a bf16/fp16 grad (torch 2.14's grad_dtype); ours do too, every
    optimizer, reading the grad in the param's dtype (the kernels as it is, the torch ops that step fp64 params a
    widened piece at a time: bit for bit the step with the widened grad), in step() and in gradient release. SGD as
    torch's with the widened grads: torch's own momentum buffer would take the grad's dtype and round every step."""
    shapes = [(3,), (1023,), (4, 5)]
    low = starting_params(shapes, param_dtype)
    wide = starting_params(shapes, param_dtype)
    opt_low = cls(low, lr=0.1, backend=cpu_backend, **options)
    opt_wide = cls(wide, lr=0.1, backend=cpu_backend, **options)
    step_with_narrow_and_widened_grads(low, opt_low, wide, opt_wide, grad_dtype)
    for p, q in zip(low, wide):
        assert torch.equal(p, q)
    if cls is fused_optim.SGD:
        reference = starting_params(shapes, param_dtype)
        torch_opt = torch.optim.SGD(reference, lr=0.1, **options)
        for step in range(3):
            low_precision_grads(reference, grad_dtype, seed=step)
            for p in reference:
                p.grad = p.grad.to(param_dtype)
            torch_opt.step()
        for p, q in zip(low, reference):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)
    released = starting_params(shapes, param_dtype)
    opt_released = cls(released, lr=0.1, backend=cpu_backend, gradient_release=True, **options)
    for step in range(3):
        generator = torch.Generator().manual_seed(step)
        for p in released:
            p.grad_dtype = grad_dtype  # autograd accumulates in grad_dtype; the hook then steps
        loss = sum((p * torch.randn(p.shape, generator=generator).to(grad_dtype).to(param_dtype)).sum()
                   for p in released)
        loss.backward()
        opt_released.step()
        assert all(p.grad is None for p in released)
    for p, q in zip(released, low):
        assert torch.equal(p, q)


@pytest.mark.skipif(not GRAD_DTYPE, reason="needs torch's Parameter.grad_dtype (2.14)")
@pytest.mark.parametrize("param_dtype, grad_dtype", [(torch.float32, torch.bfloat16), (torch.float64, torch.bfloat16),
                                                     (torch.float64, torch.float32)], ids=str)
@pytest.mark.parametrize("cls, options", [(fused_optim.AdamW, {}), (fused_optim.SGD, {"momentum": 0.9})],
                         ids=["AdamW", "SGD"])
def test_a_differentiable_group_steps_narrower_grads_of_wide_params_as_their_wide_values(cls, options, param_dtype,
                                                                                        grad_dtype):
    """A differentiable group runs torch's own update, which reads a grad in its param's dtype: a bf16 grad of an
    fp32 or fp64 param, or an fp32 grad of an fp64 one, is widened for it (the ops read it as it is), and the state
    keeps the param's dtype."""
    shapes = [(3,), (4, 5)]
    # tensors that do not require grad: torch's differentiable update runs with grad mode on, in place
    low = [torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=param_dtype) for shape in shapes]
    wide = [p.clone() for p in low]
    opt_low = cls(low, lr=0.1, differentiable=True, **options)
    opt_wide = cls(wide, lr=0.1, differentiable=True, **options)
    step_with_narrow_and_widened_grads(low, opt_low, wide, opt_wide, grad_dtype)
    assert all(torch.equal(p, q) for p, q in zip(low, wide))
    assert all(value.dtype == param_dtype for p in low for key, value in opt_low.state[p].items() if key != "step")


@pytest.mark.parametrize("cls, options, others", [
    (fused_optim.AdamW, {}, [torch.float64, torch.complex64]),
    (fused_optim.SGD, {"momentum": 0.9}, [torch.float64, torch.complex64]),
    (fused_optim.Lion, {}, [torch.float64]),  # Lion steps no complex params
], ids=["AdamW", "SGD", "Lion"])
@pytest.mark.parametrize("moments", ["bf16", "int8"])
def test_a_compact_group_steps_its_fp64_and_complex_params_with_whole_moments(cls, options, others, moments,
                                                                               cpu_backend):
    """`moments` compacts fp32, bf16 and fp16 params' state only: an fp64 or complex param in the same group keeps
    its moments whole and steps as in a group of its own (an op call of its own), beside an fp32 param whose
    moments are bf16 or int8 codes."""
    def params_of(dtypes):
        generator = torch.Generator().manual_seed(0)
        return [torch.nn.Parameter(torch.randn(7, generator=generator, dtype=dtype)) for dtype in dtypes]

    dtypes = [torch.float32, *others]
    mixed, apart = params_of(dtypes), params_of(dtypes)[1:]
    opt = cls(mixed, lr=0.1, moments=moments, backend=cpu_backend, **options)
    alone = [cls([p], lr=0.1, backend=cpu_backend, **options) for p in apart]
    for step in range(2):
        generator = torch.Generator().manual_seed(10 + step)
        grads = [torch.randn(7, generator=generator, dtype=dtype) for dtype in dtypes]
        for p, grad in zip(mixed + apart, grads + grads[1:]):
            p.grad = grad.clone()
        opt.step()
        for single in alone:
            single.step()
    assert all(torch.equal(p, q) for p, q in zip(mixed[1:], apart))
    compact = {"bf16": torch.bfloat16, "int8": torch.int8}[moments]
    assert next(value for key, value in opt.state[mixed[0]].items() if key != "step").dtype == compact
    assert all(value.dtype in (torch.float32, p.dtype) for p in mixed[1:] for value in opt.state[p].values())


def _adam(params, grads, state, backend):
    fused_optim.ops.adam.adam_step(params, grads, state[0], state[1], [], [], state[2], lr=0.1, beta1=0.9,
                                   beta2=0.999, eps=1e-8, weight_decay=0.1, decoupled_weight_decay=True, amsgrad=False,
                                   maximize=False, backend=backend)


def _sgd(params, grads, state, backend):
    fused_optim.ops.sgd.sgd_step(params, grads, state[0], state[2], lr=0.1, momentum=0.9, dampening=0.0,
                                 weight_decay=0.1, nesterov=True, maximize=False, backend=backend)


def _lion(params, grads, state, backend):
    fused_optim.ops.lion.lion_step(params, grads, state[0], [], state[2], lr=0.1, beta1=0.9, beta2=0.99,
                                   weight_decay=0.1, maximize=False, backend=backend)


@pytest.mark.parametrize("step", [_adam, _sgd, _lion], ids=["adam", "sgd", "lion"])
def test_the_ops_read_low_precision_grads_of_fp32_params_as_they_are(step, cpu_backend):
    """Every backend's op takes bf16 and fp16 grads of fp32 params (in one list with fp32 ones) and reads them in fp32:
    the update of the grads widened first, bit for bit. So the optimizers make no widened copy of them."""
    generator = torch.Generator().manual_seed(0)
    shapes, grad_dtypes = [(3,), (1023,), (4, 5)], [torch.bfloat16, torch.float32, torch.float16]
    init = [torch.randn(shape, generator=generator) for shape in shapes]
    grads = [torch.randn(shape, generator=generator).to(dtype) for shape, dtype in zip(shapes, grad_dtypes)]
    runs = []
    for given in (grads, [g.float() for g in grads]):
        params = [p.clone() for p in init]
        state = [[torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params],
                 [torch.zeros((), dtype=torch.float32) for _ in params]]
        for _ in range(2):
            step(params, given, state, cpu_backend)
        runs.append((params, state))
    (params, state), (wide_params, wide_state) = runs
    assert all(torch.equal(p, q) for p, q in zip(params, wide_params))
    assert all(torch.equal(a, b) for tensors, wide in zip(state, wide_state) for a, b in zip(tensors, wide))


@pytest.mark.parametrize("options", [{"stochastic_rounding": True}, {"moments": "bf16"}, {"moments": "int8"}],
                         ids=["stochastic_rounding", "bf16-moments", "int8-moments"])
def test_seeds_drawn_before_torch_distributed_started_become_the_replicas_own(options, monkeypatch):
    """An optimizer built before init_process_group, on ranks seeded differently (dropout, data order), hashed each
    rank's torch seed into its groups' seeds, and DDP replicas rounded apart: once torch.distributed runs, the first
    step takes the seed every replica draws alike. A seed a group was given stays. (Two optimizers in one process
    stand for two ranks; `_multi_process` for init_process_group.)"""
    from fused_optim.optim import _base

    init = torch.randn(2, 300, generator=torch.Generator().manual_seed(0))
    replicas = []
    for rank in range(2):
        torch.manual_seed(100 + rank)
        params = [torch.nn.Parameter(init[0].clone().bfloat16())]
        opt = fused_optim.AdamW(params, lr=1e-2, **options)
        opt.add_param_group({"params": [torch.nn.Parameter(init[1].clone().bfloat16())], "seed": 7})
        replicas.append(opt)
    assert replicas[0].param_groups[0]["seed"] != replicas[1].param_groups[0]["seed"]
    monkeypatch.setattr(_base, "_multi_process", lambda: True)
    for step in range(3):
        grads = torch.randn(2, 300, generator=torch.Generator().manual_seed(step)).bfloat16()
        for opt in replicas:
            for group, grad in zip(opt.param_groups, grads):
                group["params"][0].grad = grad.clone()
            opt.step()
    first, second = ([group["params"][0] for group in opt.param_groups] for opt in replicas)
    assert all(torch.equal(p, q) for p, q in zip(first, second))
    assert [group["seed"] for group in replicas[0].param_groups] == [group["seed"] for group in replicas[1].param_groups]
    assert replicas[0].param_groups[1]["seed"] == 7


@pytest.mark.parametrize("cls", [fused_optim.AdamW, fused_optim.SGD], ids=lambda c: c.__name__)  # Lion has none
@pytest.mark.parametrize("option, match", [
    (dict(moments="bf16"), r"^moments='bf16' does not take differentiable=True"),
    (dict(master_weights=True), r"^master_weights does not take differentiable=True"),
    (dict(master_weights=24), r"^master_weights does not take differentiable=True"),
    (dict(stochastic_rounding=True), r"^stochastic_rounding does not take differentiable=True"),
], ids=["bf16-moments", "masters", "24-bit-masters", "stochastic-rounding"])
def test_a_differentiable_group_refuses_the_storage_options_in_one_sentence(cls, option, match):
    """A differentiable group runs torch's own update, which knows none of them: refused as the group is made (it
    failed inside torch's update, or kept a master it never updated, or rounded to nearest), the constructor's or
    add_param_group's, with nothing added."""
    params = [torch.nn.Parameter(torch.randn(3).bfloat16())]
    with pytest.raises(ValueError, match=match):
        cls(params, lr=0.1, differentiable=True, **option)
    opt = cls([torch.nn.Parameter(torch.randn(3).bfloat16())], lr=0.1)
    with pytest.raises(ValueError, match=match[1:]):
        opt.add_param_group({"params": params, "differentiable": True, **option})
    assert len(opt.param_groups) == 1 and not opt.state


CHANGES = {  # (optimizer options, param dtype before, after)
    "fp32-to-bf16-masters": ({"master_weights": True}, torch.float32, torch.bfloat16),
    "fp32-to-bf16-stochastic": ({"stochastic_rounding": True}, torch.float32, torch.bfloat16),
    "bf16-masters-to-fp32": ({"master_weights": True}, torch.bfloat16, torch.float32),
    "fp16-masters-to-fp32": ({"master_weights": True}, torch.float16, torch.float32),
    "bf16-int8-moments-to-fp64": ({"moments": "int8"}, torch.bfloat16, torch.float64),
    "fp64-to-fp32-bf16-moments": ({"moments": "bf16"}, torch.float64, torch.float32),
}


@pytest.mark.parametrize("cls, kwargs", [(fused_optim.AdamW, {}), (fused_optim.SGD, {"momentum": 0.9}),
                                         (fused_optim.Lion, {})], ids=["AdamW", "SGD", "Lion"])
@pytest.mark.parametrize("change", CHANGES)
def test_a_param_whose_dtype_changed_after_steps_steps_as_a_resume_into_it(cls, kwargs, change):
    """`model.to(dtype)` after steps (torch's optimizers fail on it): the state is made again in the form the new
    dtype asks for (a master started, joined into a wide param, or dropped; moments whole or compact), as loading
    the state_dict into an optimizer over the converted params makes it; both then step alike, bit for bit."""
    options, before, after = CHANGES[change]
    runs = []
    for resume in (False, True):
        generator = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(shape, generator=generator).to(before)) for shape in [(3,), (70,)]]
        opt = cls(params, lr=1e-2, backend="cpu", **kwargs, **options)
        for step in range(4):
            if step == 2:
                saved = copy.deepcopy(opt.state_dict())
                for index, p in enumerate(params):  # SGD saves no count that says only "set": the new dtype may
                    saved["state"][index].setdefault("step", opt.state[p]["step"].clone())  # need it (its random bits)
                for p in params:
                    p.data = p.data.to(after)
                if resume:
                    opt = cls(params, lr=1e-2, backend="cpu", **kwargs, **options)
                    opt.load_state_dict(saved)
            for p in params:
                p.grad = torch.randn(p.shape, generator=generator).to(p.dtype)
            opt.step()
        runs.append(([p.detach() for p in params], [opt.state[p] for p in params]))
    (params, states), (resumed_params, resumed_states) = runs
    assert all(p.dtype == after for p in params)
    assert_identical(params, resumed_params)
    assert_identical(states, resumed_states)


@pytest.mark.parametrize("start, edit", [({}, {"moments": "bf16"}), ({}, {"moments": "int8"}),
                                         ({}, {"master_weights": True}),
                                         ({"master_weights": True}, {"master_weights": 24}),
                                         ({"master_weights": 24}, {"master_weights": True}),
                                         ({"amsgrad": True}, {"amsgrad": False}),
                                         ({"amsgrad": True, "moments": "int8"}, {"amsgrad": False})],
                         ids=["bf16-moments", "int8-moments", "masters", "exact-to-24-bit-masters",
                              "24-bit-to-exact-masters", "amsgrad-off", "int8-amsgrad-off"])
def test_a_groups_option_set_by_hand_after_steps_steps_as_a_resume_into_it(start, edit):
    """An option of a live group changed by hand (not through the constructor, add_param_group or a load): the next
    step makes the state again in the form it asks for, as a resume with the edited group would."""
    runs = []
    for resume in (False, True):
        generator = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(shape, generator=generator).bfloat16()) for shape in [(3,), (70,)]]
        opt = fused_optim.AdamW(params, lr=1e-2, backend="cpu", **start)
        for step in range(4):
            if step == 2:
                if resume:
                    saved = copy.deepcopy(opt.state_dict())
                    saved["param_groups"][0].update(edit)
                    opt = fused_optim.AdamW(params, lr=1e-2, backend="cpu", **start)
                    opt.load_state_dict(saved)
                else:
                    opt.param_groups[0].update(edit)
            for p in params:
                p.grad = torch.randn(p.shape, generator=generator).bfloat16()
            opt.step()
        runs.append(([p.detach() for p in params], [opt.state[p] for p in params]))
    assert_identical(runs[0][0], runs[1][0])
    assert_identical(runs[0][1], runs[1][1])
