"""`gradient_release=True`: each param is stepped inside backward as soon as autograd has accumulated its grad, and
the grad is freed at once. The result must be the ordinary step's, bit for bit, for every optimizer and backend
that runs here; step() and zero_grad() stay callable and change nothing (but step() steps a grad that no hook
took, a frozen param's included); what needs every grad first (a global
norm, a GradScaler, a closure) is refused in one sentence, and so is a reentrant checkpoint's nested backward;
with a GradAccumulator the step waits for the backward its `release()` arms."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import CPU_BACKENDS
from test_adam import assert_identical

import fused_optim

OPTIMIZERS = {
    "AdamW": (fused_optim.AdamW, dict(lr=1e-2, weight_decay=0.1)),
    "Adam-amsgrad": (fused_optim.Adam, dict(lr=1e-2, amsgrad=True, weight_decay=0.01)),
    "SGD-nesterov": (fused_optim.SGD, dict(lr=1e-2, momentum=0.9, nesterov=True)),
    "Lion": (fused_optim.Lion, dict(lr=1e-3, weight_decay=0.1)),
}


def make_model(dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4), torch.nn.Tanh(),
                                torch.nn.Linear(4, 3, bias=False))
    return model.to(dtype)


def backward(model: torch.nn.Module, step: int, create_graph: bool = False) -> None:
    generator = torch.Generator().manual_seed(step)
    p = next(model.parameters())
    x = torch.randn(6, 8, generator=generator).to(p.dtype)
    model(x).float().square().mean().backward(create_graph=create_graph)


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("backend, device", CPU_BACKENDS)
def test_released_steps_equal_ordinary_steps(name, backend, device):
    cls, kwargs = OPTIMIZERS[name]
    released, ordinary = make_model(), make_model()
    released_opt = cls(released.parameters(), backend=backend, gradient_release=True, **kwargs)
    ordinary_opt = cls(ordinary.parameters(), backend=backend, **kwargs)
    for step in range(4):
        backward(released, step)
        assert all(p.grad is None for p in released.parameters())  # every grad was freed in backward
        released_opt.step()  # harmless: nothing left to step
        released_opt.zero_grad()
        backward(ordinary, step)
        ordinary_opt.step()
        ordinary_opt.zero_grad()
    assert_identical([p.detach() for p in released.parameters()], [p.detach() for p in ordinary.parameters()])
    assert_identical(released_opt.state_dict()["state"], ordinary_opt.state_dict()["state"])


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")  # torch's, about .grad cycles
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_a_backward_that_creates_a_graph_steps_outside_autograd(name):
    """backward(create_graph=True) runs the hooks with grad mode on; the release steps as the ordinary step, which
    runs under no_grad, and records nothing: the params stay leaves, and no state tensor requires grad."""
    cls, kwargs = OPTIMIZERS[name]
    released, ordinary = make_model(), make_model()
    released_opt = cls(released.parameters(), backend="cpu", gradient_release=True, **kwargs)
    ordinary_opt = cls(ordinary.parameters(), backend="cpu", **kwargs)
    for step in range(3):
        backward(released, step, create_graph=True)
        backward(ordinary, step, create_graph=True)
        ordinary_opt.step()
        ordinary_opt.zero_grad()
    assert all(p.is_leaf and p.grad is None for p in released.parameters())
    assert not any(value.requires_grad for state in released_opt.state.values() for value in state.values()
                   if isinstance(value, torch.Tensor))
    assert_identical([p.detach() for p in released.parameters()], [p.detach() for p in ordinary.parameters()])
    assert_identical(released_opt.state_dict()["state"], ordinary_opt.state_dict()["state"])


@pytest.mark.parametrize("name", ["AdamW", "SGD-nesterov"])
@pytest.mark.parametrize("backend, device", CPU_BACKENDS)
def test_bf16_params_with_master_weights(backend, device, name):
    cls, kwargs = OPTIMIZERS[name]
    released, ordinary = make_model(torch.bfloat16), make_model(torch.bfloat16)
    released_opt = cls(released.parameters(), master_weights=True, backend=backend, gradient_release=True, **kwargs)
    ordinary_opt = cls(ordinary.parameters(), master_weights=True, backend=backend, **kwargs)
    for step in range(3):
        backward(released, step)
        backward(ordinary, step)
        ordinary_opt.step()
        ordinary_opt.zero_grad()
    assert_identical([p.detach() for p in released.parameters()], [p.detach() for p in ordinary.parameters()])
    assert_identical(released_opt.state_dict()["state"], ordinary_opt.state_dict()["state"])


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_a_compiled_model_releases_its_grads_as_an_eager_one_does(name):
    """torch.compile'd forward and backward (AOTAutograd's graph): autograd still accumulates each param's grad
    and runs its hook, so the compact modes step in backward as in eager mode, bit for bit the ordinary steps."""
    cls, kwargs = OPTIMIZERS[name]
    options = dict(kwargs, moments="int8", master_weights=24)
    torch._dynamo.reset()
    released, ordinary = make_model(torch.bfloat16), make_model(torch.bfloat16)
    released_opt = cls(released.parameters(), backend="cpu", gradient_release=True, **options)
    ordinary_opt = cls(ordinary.parameters(), backend="cpu", **options)
    compiled = torch.compile(released)
    for step in range(3):
        backward(compiled, step)
        assert all(p.grad is None for p in released.parameters())
        backward(ordinary, step)
        ordinary_opt.step()
        ordinary_opt.zero_grad()
    assert_identical([p.detach() for p in released.parameters()], [p.detach() for p in ordinary.parameters()])
    assert_identical(released_opt.state_dict()["state"], ordinary_opt.state_dict()["state"])


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("backend, device", CPU_BACKENDS)
def test_a_node_that_still_reads_a_stepped_param_is_refused_as_torch_refuses_it(name, backend, device):
    """A param whose own grad is complete while a later node of the same backward still reads it (here through
    `w.detach()`): the release steps it in place, and autograd refuses the node that would compute with the new
    values ("modified by an inplace operation"), as it refuses torch's own per-param hook recipe."""
    cls, kwargs = OPTIMIZERS[name]
    torch.manual_seed(0)
    layer, w = torch.nn.Linear(4, 4), torch.nn.Parameter(torch.randn(3, 4))
    opt = cls([*layer.parameters(), w], backend=backend, gradient_release=True, **kwargs)
    h = layer(torch.randn(2, 4))
    loss = (h @ w.detach().t()).square().sum() + w.square().sum()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    del opt


def test_no_two_grads_are_alive_at_once():
    model = make_model()
    opt = fused_optim.AdamW(model.parameters(), lr=1e-2, gradient_release=True)
    alive = []

    def spy(p):  # runs after the optimizer's hook, registered before it
        alive.append(sum(q.grad is not None for q in model.parameters()))

    for p in model.parameters():
        p.register_post_accumulate_grad_hook(spy)
    backward(model, 0)
    assert alive == [0] * len(list(model.parameters()))


def test_the_group_settings_are_read_live_and_survive_load_state_dict():
    model = make_model()
    opt = fused_optim.AdamW(model.parameters(), lr=1e-2, gradient_release=True)
    backward(model, 0)
    saved = copy.deepcopy(opt.state_dict())
    opt.load_state_dict(saved)  # new group dicts: the hooks must follow them
    for group in opt.param_groups:
        group["lr"] = 0.0
        group["weight_decay"] = 0.0
    before = [p.detach().clone() for p in model.parameters()]
    backward(model, 1)
    assert_identical([p.detach() for p in model.parameters()], before)  # lr 0: nothing moves
    assert all(s["step"].item() == 2 for s in opt.state.values())


def test_a_copy_releases_its_own_params():
    model = make_model()
    opt = fused_optim.Lion(model.parameters(), lr=1e-3, gradient_release=True)
    copied = copy.deepcopy(opt)
    copied_params = [p for group in copied.param_groups for p in group["params"]]
    assert copied.gradient_release and len(copied._release_hooks) == len(copied_params)
    assert not any(p is q for p, q in zip(copied_params, model.parameters()))


def test_what_needs_every_grad_first_is_refused():
    model = make_model()
    with pytest.raises(ValueError, match="cannot clip by their global norm"):
        fused_optim.AdamW(model.parameters(), max_grad_norm=1.0, gradient_release=True)
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters())  # nothing registered

    opt = fused_optim.SGD(model.parameters(), lr=0.1, momentum=0.9, gradient_release=True)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="step\\(\\) does nothing more, so it takes no closure"):
        opt.step(lambda: 0.0)
    assert_identical([p.detach() for p in model.parameters()], before)
    assert len(opt.state) == 0

    with pytest.raises(RuntimeError, match="GradScaler cannot step a SGD with gradient_release=True"):
        fused_optim.GradScaler("cpu").step(opt)

    # refused already in the backward of the scaled loss, at its first param: nothing stepped with a scaled grad
    scaler = fused_optim.GradScaler("cpu")
    loss = model(torch.randn(6, 8)).square().mean()
    with pytest.raises(RuntimeError, match="cannot step a param in the backward of a loss that GradScaler scaled"):
        scaler.scale([loss])[0].backward()
    assert_identical([p.detach() for p in model.parameters()], before)
    assert len(opt.state) == 0
    # the refusing param's scaled grad is gone too: a later step() or backward would step with it
    assert all(p.grad is None for p in model.parameters())
    backward(model, 0)  # a backward of a loss not scaled still steps
    assert len(opt.state) == len(list(model.parameters()))

    accumulator = fused_optim.GradAccumulator(model.parameters())
    with pytest.raises(ValueError, match="num_tokens must be a positive number of tokens"):
        accumulator.release(num_tokens=0)


class TiedCheckpointed(torch.nn.Module):
    """An embedding matrix used twice, as a tied one is: outside a checkpointed segment and inside it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.tied = torch.nn.Parameter(torch.randn(8, 8))
        self.inner = torch.nn.Parameter(torch.randn(8, 8))
        self.head = torch.nn.Parameter(torch.randn(8, 3))

    def segment(self, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(h @ self.inner) @ self.tied

    def forward(self, x: torch.Tensor, use_reentrant: bool) -> torch.Tensor:
        h = torch.utils.checkpoint.checkpoint(self.segment, x @ self.tied.t(), use_reentrant=use_reentrant)
        return (h @ self.head).square().mean()


def test_a_reentrant_checkpoint_is_refused_in_one_sentence():
    """A reentrant backward accumulates its segment's grads by itself, so the tied param would be stepped twice in
    one backward (once with the segment's part of its grad): refused before the segment's params are stepped."""
    model = TiedCheckpointed()
    opt = fused_optim.AdamW(model.parameters(), lr=1e-2, gradient_release=True)  # kept: its hooks go with it
    inside = [model.tied.detach().clone(), model.inner.detach().clone()]
    with pytest.raises(RuntimeError,
                       match="cannot step a param inside a reentrant backward .* pass use_reentrant=False"):
        model(torch.randn(4, 8), use_reentrant=True).backward()
    assert_identical([model.tied.detach(), model.inner.detach()], inside)
    assert model.tied not in opt.state
    assert model.inner.grad is None  # not the segment's part of it, which step() would then step with


def test_a_non_reentrant_checkpoint_steps_a_tied_param_once():
    """use_reentrant=False recomputes the segment inside the one backward: autograd sums the tied param's two grads
    before its hook runs, and the released steps equal the ordinary ones."""
    released, ordinary = TiedCheckpointed(), TiedCheckpointed()
    released_opt = fused_optim.AdamW(released.parameters(), lr=1e-2, gradient_release=True)
    ordinary_opt = fused_optim.AdamW(ordinary.parameters(), lr=1e-2)
    for step in range(3):
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(step))
        released(x, use_reentrant=False).backward()
        ordinary(x, use_reentrant=False).backward()
        ordinary_opt.step()
        ordinary_opt.zero_grad()
    assert_identical([p.detach() for p in released.parameters()], [p.detach() for p in ordinary.parameters()])
    assert_identical(released_opt.state_dict()["state"], ordinary_opt.state_dict()["state"])


@pytest.mark.parametrize("name", ["AdamW", "Lion"])
def test_with_a_grad_accumulator_the_last_micro_batch_steps(name):
    """Micro-batches accumulate into the fp32 main grads; `release(num_tokens)` before the last one's backward makes
    its hooks add, normalise and step each param as its grad arrives: the result of finalize() + step(), bit for
    bit, and the main grads are zero again for the next step."""
    cls, kwargs = OPTIMIZERS[name]
    released, ordinary = make_model(torch.bfloat16), make_model(torch.bfloat16)
    released_opt = cls(released.parameters(), gradient_release=True, **kwargs)
    ordinary_opt = cls(ordinary.parameters(), **kwargs)
    released_acc = fused_optim.GradAccumulator(released.parameters(), use_hooks=True)
    ordinary_acc = fused_optim.GradAccumulator(ordinary.parameters())
    micro_batches, tokens = 3, torch.tensor(17)
    for step in range(2):
        for micro in range(micro_batches):
            if micro == micro_batches - 1:
                released_acc.release(num_tokens=tokens)
            before = [p.detach().clone() for p in released.parameters()]
            backward(released, 10 * step + micro)
            moved = any(not torch.equal(p, q) for p, q in zip(released.parameters(), before))
            assert moved == (micro == micro_batches - 1)  # only the armed backward steps
            backward(ordinary, 10 * step + micro)
            ordinary_acc.accumulate()
        ordinary_acc.finalize(num_tokens=tokens)
        ordinary_opt.step()
        ordinary_acc.zero_()
        assert all(float(g.abs().max()) == 0 for g in released_acc.main_grads)
    assert_identical([p.detach() for p in released.parameters()], [p.detach() for p in ordinary.parameters()])
    assert_identical(released_opt.state_dict()["state"], ordinary_opt.state_dict()["state"])


def test_with_a_grad_accumulator_a_param_without_a_grad_this_step_is_left_alone():
    """At the end of the armed backward the params that got a grad in an earlier micro-batch of this step are
    stepped; one that got none this step (but did in the last) is left alone, as finalize() + step() leave it."""
    used, unused = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    params = [*used.parameters(), *unused.parameters()]
    opt = fused_optim.AdamW(params, lr=0.1, weight_decay=0.1, gradient_release=True)
    acc = fused_optim.GradAccumulator(params, use_hooks=True)
    x = torch.randn(8, 4)
    acc.release()
    (used(x) + unused(x)).sum().backward()
    opt.step()
    before = [p.detach().clone() for p in unused.parameters()]
    acc.release()
    used(x).sum().backward()
    opt.step()
    assert all(torch.equal(p, q) for p, q in zip(unused.parameters(), before))


def test_a_param_frozen_after_the_optimizer_was_made_moves_no_random_streams_on_resume():
    """A released param rounds with the ordinary step's bits: its stream is its place among its group's params that
    take grads. One frozen after the optimizer was made, then a resume (load_state_dict hooks the params again):
    the param after it still rounds as the ordinary step's does."""
    results = []
    for release in (False, True):
        torch.manual_seed(0)
        first, frozen, last = (torch.nn.Parameter(torch.randn(256).bfloat16()) for _ in range(3))
        opt = fused_optim.AdamW([first, frozen, last], lr=1e-3, stochastic_rounding=True, gradient_release=release)
        frozen.requires_grad_(False)
        opt.load_state_dict(opt.state_dict())
        x = torch.randn(256).bfloat16()
        ((first * x).sum() + (last * x * 2).sum()).backward()
        opt.step()
        results.append(last.detach())
    assert torch.equal(*results)


def test_step_warns_when_backward_stepped_a_param_twice_since_the_last_one():
    """A framework's own gradient accumulation (HF Trainer's gradient_accumulation_steps, accelerate's accumulate())
    runs several backwards before one step(): under gradient release each of them stepped the params, and step()
    says so. One backward a step(), or a GradAccumulator's armed last micro-batch, is quiet."""
    model = make_model()
    opt = fused_optim.AdamW(model.parameters(), lr=1e-2, gradient_release=True)
    backward(model, 0)
    backward(model, 1)
    with pytest.warns(UserWarning, match="stepped 5 params more than once in backward since the last step\\(\\) "
                                         "\\(up to 2 times\\)"):
        opt.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step in range(2):
            backward(model, step)
            opt.step()
        accumulator = fused_optim.GradAccumulator(model.parameters(), use_hooks=True)
        backward(model, 2)
        accumulator.release(num_tokens=torch.tensor(4))
        backward(model, 3)
        opt.step()


def test_step_warns_when_backwards_that_reach_a_part_each_stepped_a_shared_param_twice():
    """Each backward reaches the shared layer and one expert of several (a mixture of experts): fewer releases than
    there are params, yet the shared layer was stepped twice, and step() says so."""
    torch.manual_seed(0)
    shared, experts = torch.nn.Linear(4, 4), torch.nn.ModuleList(torch.nn.Linear(4, 2) for _ in range(4))
    opt = fused_optim.SGD([*shared.parameters(), *experts.parameters()], lr=0.1, gradient_release=True)
    for expert in experts[:2]:
        expert(shared(torch.randn(3, 4))).square().sum().backward()
    with pytest.warns(UserWarning, match="stepped 2 params more than once"):
        opt.step()


@pytest.mark.parametrize("use_hooks", [False, True])
def test_finalize_refuses_the_grads_a_release_optimizer_would_not_step(use_hooks):
    """finalize() + step(), the accumulation loop without gradient release, would not train with a release
    optimizer (its step() takes no finalized grads): finalize() says so in one sentence and changes nothing."""
    model = make_model(torch.bfloat16)
    opt = fused_optim.AdamW(model.parameters(), lr=1e-2, gradient_release=True)
    acc = fused_optim.GradAccumulator(model.parameters(), use_hooks=use_hooks)
    for micro in range(2):
        backward(model, micro)
        acc.accumulate()
    main_grads = [g.clone() for g in acc.main_grads]
    before = [p.detach().clone() for p in model.parameters()]
    refusal = r"optimizer with gradient_release=True \(AdamW\), whose step\(\) takes no finalized grads"
    with pytest.raises(RuntimeError, match=refusal):
        acc.finalize(num_tokens=9)
    assert all(torch.equal(g, h) for g, h in zip(acc.main_grads, main_grads))
    assert all(getattr(p, "main_grad", None) is None for p in model.parameters())
    assert_identical([p.detach() for p in model.parameters()], before)
    assert len(opt.state) == 0
    del opt  # an optimizer the program dropped steps nothing, and finalize() goes on
    acc.finalize(num_tokens=9)
    assert all(p.main_grad is not None for p in model.parameters())


STOCHASTIC = {
    "bf16 moments": dict(moments="bf16"),
    "int8 moments": dict(moments="int8"),
    "stochastic rounding": dict(stochastic_rounding=True),
    "int8 moments, masters": dict(moments="int8", master_weights=True),
}


@pytest.mark.parametrize("options", STOCHASTIC.values(), ids=STOCHASTIC)
def test_released_steps_draw_the_ordinary_steps_random_bits(options):
    """With stochastic rounding each param draws the bits the ordinary step would: its group's seed (here one whose
    streams pass 2**31), a frozen param ahead of it and params of two kinds (bf16 and fp32 in one group)."""
    results = []
    for release in (True, False):
        model = make_model(torch.bfloat16)
        frozen = torch.nn.Parameter(torch.randn(3).bfloat16(), requires_grad=False)
        extra = torch.nn.Parameter(torch.randn(5))  # fp32: another op call of the group than the bf16 params
        params = [frozen, *model.parameters(), extra]
        group = {"params": params, "seed": 2**31 - 3}
        cls = fused_optim.AdamW if "moments" in options else fused_optim.Lion
        opt = cls([group], lr=1e-2, gradient_release=release, **options)
        for step in range(3):
            backward(model, step)
            if not release:
                extra.grad = None
            opt.step()
            opt.zero_grad()
        results.append(([p.detach().clone() for p in params], opt.state_dict()["state"]))
    (released, released_state), (ordinary, ordinary_state) = results
    assert_identical(released, ordinary)
    assert_identical(released_state, ordinary_state)


@pytest.mark.parametrize("options", STOCHASTIC.values(), ids=STOCHASTIC)
def test_params_cast_after_they_were_hooked_draw_the_ordinary_steps_random_bits(options):
    """Some layers of an fp32 model cast to bf16 after the optimizer hooked them (norms kept fp32): their kind of
    op call changes, and the release numbers the group again to draw the ordinary step's bits (autocast runs the
    mixed model)."""
    results = []
    for release in (True, False):
        model = make_model()
        cls = fused_optim.AdamW if "moments" in options else fused_optim.Lion
        opt = cls(model.parameters(), lr=1e-2, gradient_release=release, **options)
        for step in range(4):
            if step == 2:
                model[0].bfloat16()
                model[4].bfloat16()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                backward(model, step)
            opt.step()
            opt.zero_grad()
        results.append(([p.detach().clone() for p in model.parameters()], opt.state_dict()["state"]))
    assert_identical(*results)


def test_a_param_unfrozen_after_the_constructor_is_trained():
    model, ordinary = make_model(), make_model()
    models_opts = []
    for m, release in ((model, True), (ordinary, False)):
        m[0].weight.requires_grad_(False)
        models_opts.append((m, fused_optim.AdamW(m.parameters(), lr=1e-2, gradient_release=release)))
    for step in range(3):
        if step == 1:
            model[0].weight.requires_grad_(True)
            ordinary[0].weight.requires_grad_(True)
        for m, opt in models_opts:
            backward(m, step)
            opt.step()  # the released one steps the param backward could not: unfrozen since the constructor
            opt.zero_grad()
    assert_identical([p.detach() for p in model.parameters()], [p.detach() for p in ordinary.parameters()])
    assert model[0].weight in models_opts[0][1]._release_hooks


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_a_frozen_param_with_a_grad_set_by_hand_is_stepped_by_step(name):
    """torch's step() steps every param holding a grad, frozen or not; backward cannot release a frozen one (it has
    no hook), so step() does, and leaves it frozen and unhooked."""
    cls, kwargs = OPTIMIZERS[name]
    results = []
    for release in (True, False):
        model = make_model()
        model[0].weight.requires_grad_(False)
        opt = cls(model.parameters(), backend="cpu", gradient_release=release, **kwargs)
        for step in range(3):
            backward(model, step)
            model[0].weight.grad = torch.randn(16, 8, generator=torch.Generator().manual_seed(step))
            opt.step()
            opt.zero_grad()
        assert model[0].weight.grad is None and not model[0].weight.requires_grad
        assert model[0].weight not in getattr(opt, "_release_hooks", {})
        results.append(([p.detach().clone() for p in model.parameters()], opt.state_dict()["state"]))
    (released, released_state), (ordinary, ordinary_state) = results
    assert_identical(released, ordinary)
    assert_identical(released_state, ordinary_state)


@pytest.mark.parametrize("options", STOCHASTIC.values(), ids=STOCHASTIC)
def test_a_frozen_params_random_bits_come_after_its_groups_places(options):
    """A frozen param stepped by step() draws the stream of place len(params) + its index in the group, which no
    hooked param of the group takes: as an ordinary step of it alone under the seed of that place."""
    cls = fused_optim.AdamW if "moments" in options else fused_optim.Lion
    seed = 2**31 - 3
    model = make_model(torch.bfloat16)
    frozen = torch.nn.Parameter(torch.randn(7).bfloat16(), requires_grad=False)
    alone = torch.nn.Parameter(frozen.detach().clone(), requires_grad=False)
    params = [*model.parameters(), frozen]
    place = len(params) + len(params) - 1
    released_opt = cls([{"params": params, "seed": seed}], lr=1e-2, gradient_release=True, **options)
    alone_opt = cls([{"params": [alone], "seed": (seed + 0x9E3779B9 * place) % 2**32}], lr=1e-2, **options)
    for step in range(3):
        backward(model, step)
        frozen.grad = torch.randn(7, generator=torch.Generator().manual_seed(step)).bfloat16()
        alone.grad = frozen.grad.clone()
        released_opt.step()
        alone_opt.step()
    assert_identical(frozen.detach(), alone.detach())
    assert_identical(released_opt.state[frozen], alone_opt.state[alone])


def test_a_refused_constructor_leaves_no_hooks():
    model = make_model()
    bf16 = torch.nn.Parameter(torch.randn(3))  # fp32: refused by master_weights=24 in the second group
    with pytest.raises(ValueError, match="every param of its group must be bfloat16"):
        fused_optim.AdamW([{"params": model.parameters()}, {"params": [bf16], "master_weights": 24}],
                          gradient_release=True)
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters())
    backward(model, 0)
    assert all(p.grad is not None for p in model.parameters())  # an ordinary backward: nothing stepped them


def test_a_refused_constructor_leaves_the_older_optimizer_its_params():
    model, ordinary = make_model(), make_model()
    older = fused_optim.AdamW(model.parameters(), lr=1e-2, gradient_release=True)
    with pytest.raises(ValueError, match="every param of its group must be bfloat16"):
        fused_optim.AdamW([{"params": model.parameters()}, {"params": [torch.nn.Parameter(torch.randn(3))],
                                                            "master_weights": 24}], gradient_release=True)
    ordinary_opt = fused_optim.AdamW(ordinary.parameters(), lr=1e-2)
    for step in range(2):
        backward(model, step)
        backward(ordinary, step)
        ordinary_opt.step()
        ordinary_opt.zero_grad()
    assert_identical([p.detach() for p in model.parameters()], [p.detach() for p in ordinary.parameters()])
    assert all(len(p._post_accumulate_grad_hooks) == 1 for p in model.parameters())
    assert len(older._release_hooks) == len(list(model.parameters()))


@pytest.mark.parametrize("let_go", ["del", "replaced by an ordinary optimizer"])
def test_an_optimizer_let_go_stops_stepping_in_backward(let_go):
    """As with any torch optimizer, backward leaves the grads once the user drops the optimizer (no gc needed)."""
    model = make_model()
    opt = fused_optim.AdamW(model.parameters(), lr=1e-2, gradient_release=True)
    backward(model, 0)
    if let_go == "del":
        del opt
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)  # noqa: F841 (the release optimizer is dropped)
    before = [p.detach().clone() for p in model.parameters()]
    backward(model, 1)
    assert all(p.grad is not None and not p._post_accumulate_grad_hooks for p in model.parameters())
    assert_identical([p.detach() for p in model.parameters()], before)


def test_an_accumulator_let_go_stops_taking_the_grads():
    model = make_model()
    accumulator = fused_optim.GradAccumulator(model.parameters(), use_hooks=True)
    backward(model, 0)
    assert all(p.grad is None for p in model.parameters())  # taken into the main grads
    del accumulator
    opt = fused_optim.AdamW(model.parameters(), lr=1e-2, gradient_release=True)
    before = [p.detach().clone() for p in model.parameters()]
    backward(model, 1)
    assert len(opt.state) == len(before)  # the release optimizer's hooks stepped every param
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_a_resume_while_a_param_is_frozen_follows_the_new_groups():
    """Progressive unfreezing with a resume in the frozen phase: the frozen param's hook reads the loaded groups
    (the scheduler's lr), as the ordinary step does, once it is unfrozen."""
    results = []
    for release in (True, False):
        model = make_model()
        model[0].weight.requires_grad_(False)
        opt = fused_optim.AdamW(model.parameters(), lr=1e-2, gradient_release=release)
        backward(model, 0)
        opt.step()
        opt.zero_grad()
        saved = opt.state_dict()
        saved["param_groups"][0]["lr"] = 1e-4
        opt.load_state_dict(saved)
        model[0].weight.requires_grad_(True)
        for step in (1, 2):
            backward(model, step)
            opt.step()
            opt.zero_grad()
        results.append([p.detach().clone() for p in model.parameters()])
    assert_identical(*results)


def test_a_new_optimizer_over_the_same_params_takes_them_over():
    model, ordinary = make_model(), make_model()
    older = fused_optim.SGD(model.parameters(), lr=0.1, gradient_release=True)  # replaced before any step
    replacement = fused_optim.SGD(model.parameters(), lr=0.5, momentum=0.9, gradient_release=True)
    ordinary_opt = fused_optim.SGD(ordinary.parameters(), lr=0.5, momentum=0.9)
    for step in range(2):
        backward(model, step)
        older.step()  # neither takes the params back
        older.load_state_dict(older.state_dict())
        backward(ordinary, step)
        ordinary_opt.step()
        ordinary_opt.zero_grad()
    assert_identical([p.detach() for p in model.parameters()], [p.detach() for p in ordinary.parameters()])
    assert all(len(p._post_accumulate_grad_hooks) == 1 for p in model.parameters())
    assert len(replacement.state) == len(list(model.parameters()))


def test_a_param_without_a_grad_in_the_last_micro_batch_is_stepped_at_its_end():
    """A param (an expert, a branch) that got a grad in an earlier micro-batch but none in the armed one is stepped
    when that backward ends, from its main grad, as finalize() + step() steps it; its main grad is zero after."""
    results = []
    for release in (True, False):
        torch.manual_seed(0)
        used, unused = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
        params = [*used.parameters(), *unused.parameters()]
        opt = fused_optim.AdamW(params, lr=0.1, gradient_release=release)
        acc = fused_optim.GradAccumulator(params)
        x = torch.randn(2, 4)
        (used(x).sum() + unused(x).sum()).backward()  # micro-batch 1: both
        acc.accumulate()
        if release:
            acc.release(num_tokens=4)
        used(x).sum().backward()  # micro-batch 2, the last: one of them
        if not release:
            acc.accumulate()
            acc.finalize(num_tokens=4)
            opt.step()
            acc.zero_()
        assert all(float(g.abs().max()) == 0 for g in acc.main_grads)
        results.append([p.detach().clone() for p in params])
    assert_identical(*results)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_step_steps_the_grads_no_hook_took(name):
    # grads set by hand (from torch.autograd.grad) reach no backward hook: step() steps them, as without release
    cls, kwargs = OPTIMIZERS[name]
    released, ordinary = make_model(), make_model()
    released_opt = cls(released.parameters(), gradient_release=True, **kwargs)
    ordinary_opt = cls(ordinary.parameters(), **kwargs)
    for step in range(3):
        for model in (released, ordinary):
            generator = torch.Generator().manual_seed(step)
            loss = model(torch.randn(6, 8, generator=generator)).square().mean()
            for p, grad in zip(model.parameters(), torch.autograd.grad(loss, list(model.parameters()))):
                p.grad = grad
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # one step per param: nothing to warn of
            released_opt.step()
        assert all(p.grad is None for p in released.parameters())
        ordinary_opt.step()
        ordinary_opt.zero_grad()
    assert_identical([p.detach() for p in released.parameters()], [p.detach() for p in ordinary.parameters()])
    assert_identical(released_opt.state_dict()["state"], ordinary_opt.state_dict()["state"])


def test_an_accumulators_release_under_compiled_autograd_is_refused_before_anything_steps():
    """Compiled autograd does not call the end of its backward, where release() steps the params that got a grad in
    an earlier micro-batch alone: the armed backward is refused at its first param, nothing taken or stepped."""
    torch._dynamo.reset()
    model, extra = make_model(), torch.nn.Linear(8, 3)
    params = [*model.parameters(), *extra.parameters()]
    opt = fused_optim.AdamW(params, lr=1e-2, gradient_release=True)
    accumulator = fused_optim.GradAccumulator(params, use_hooks=True)
    x = torch.randn(6, 8)
    (model(x).square().mean() + extra(x).square().mean()).backward()  # extra gets a grad in this micro-batch alone
    main_grads = [g.clone() for g in accumulator.main_grads]
    accumulator.release(num_tokens=12)

    def last_backward(x):
        model(x).square().mean().backward()

    with torch._dynamo.config.patch(compiled_autograd=True):
        with pytest.raises(RuntimeError, match="cannot step params in a backward that compiled autograd runs"):
            torch.compile(last_backward, backend="aot_eager")(x)
    assert len(opt.state) == 0 and all(p.grad is None for p in params)
    assert_identical(list(accumulator.main_grads), main_grads)
    torch._dynamo.reset()
