"""The drop-in contract every fused_optim optimizer keeps with its torch twin, one test each, run for every spec in
SPECS (as torch's OptimizerInfo does for its optimizers): torch's errors for bad hyperparameters, state dicts that
cross both ways, copies and pickles that keep working, one device per group, a step that torch.compile traces into
one graph, and a step that a CUDA graph captures. A new optimizer gets the whole contract by adding its spec.

The numerics of each update (against the float64 reference and torch) stay in the optimizer's own test file.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import io
from dataclasses import dataclass, field
from inspect import signature
from typing import Any

import pytest
import torch
from conftest import BACKEND_DEVICES, CPU_BACKENDS
from test_adam import assert_identical, make_params, random_grads, set_grads, snapshot, step_both_and_compare

import fused_optim
from fused_optim.ops import _library


@dataclass(frozen=True)
class OptimizerSpec:
    ours: type[torch.optim.Optimizer]
    theirs: type[torch.optim.Optimizer]
    # The hyperparameters of the contract runs: every kind of state the optimizer keeps is made.
    options: dict[str, Any]
    # The state it keeps in fp32 whatever the param's dtype.
    fp32_state: tuple[str, ...]
    # Constructor arguments torch refuses, each with torch's ValueError.
    bad_hyperparameters: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Options for bf16 params (more state to carry through copies).
    bf16_options: dict[str, Any] = field(default_factory=dict)


ADAM_BAD_HYPERPARAMETERS = {
    "lr<0": dict(lr=-1e-3),
    "eps<0": dict(eps=-1e-8),
    "weight_decay<0": dict(weight_decay=-0.1),
    "beta1=1": dict(betas=(1.0, 0.999)),
    "beta1<0": dict(betas=(-0.1, 0.999)),
    "beta2=1": dict(betas=(0.9, 1.0)),
    "beta2<0": dict(betas=(0.9, -0.5)),
    "betas-float-and-tensor": dict(betas=(0.9, torch.tensor(0.999))),
    "betas-int": dict(betas=(0, 0.999)),
    "lr-tensor-2-elements": dict(lr=torch.tensor([1e-3, 1e-3])),
}
SGD_BAD_HYPERPARAMETERS = {
    "lr<0": dict(lr=-1e-3),
    "momentum<0": dict(momentum=-0.1),
    "weight_decay<0": dict(weight_decay=-0.1),
    "nesterov-without-momentum": dict(nesterov=True),
    "nesterov-with-dampening": dict(nesterov=True, momentum=0.9, dampening=0.1),
    "lr-tensor-2-elements": dict(lr=torch.tensor([1e-3, 1e-3])),
}
ADAM_STATE = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
SPECS = {
    "Adam": OptimizerSpec(fused_optim.Adam, torch.optim.Adam, dict(weight_decay=0.1, amsgrad=True), ADAM_STATE,
                          ADAM_BAD_HYPERPARAMETERS, dict(master_weights=True)),
    "AdamW": OptimizerSpec(fused_optim.AdamW, torch.optim.AdamW, dict(weight_decay=0.1, amsgrad=True), ADAM_STATE,
                           ADAM_BAD_HYPERPARAMETERS, dict(master_weights=True)),
    "SGD-nesterov": OptimizerSpec(fused_optim.SGD, torch.optim.SGD, dict(momentum=0.9, nesterov=True,
                                                                         weight_decay=0.1), ("momentum_buffer",),
                                  SGD_BAD_HYPERPARAMETERS),
    "SGD-dampening": OptimizerSpec(fused_optim.SGD, torch.optim.SGD, dict(momentum=0.9, dampening=0.2),
                                   ("momentum_buffer",)),
}
SHAPES = [(3,), (1023,)]


def trained(spec: OptimizerSpec, backend: str, device: str, dtype=torch.float32, steps=3, **extra):
    """Params and our optimizer after `steps` steps with the spec's options."""
    params = make_params([torch.randn(s) for s in SHAPES], dtype, device)
    opt = spec.ours(params, lr=1e-2, backend=backend, **spec.options, **extra)
    for _ in range(steps):
        set_grads(random_grads(SHAPES, dtype, device), params)
        opt.step()
    return params, opt


@pytest.mark.parametrize("spec", [name for name, spec in SPECS.items() if spec.bad_hyperparameters])
def test_bad_hyperparameters_raise_torchs_error(spec):
    spec = SPECS[spec]
    for kwargs in spec.bad_hyperparameters.values():
        param = torch.nn.Parameter(torch.randn(3))
        before = param.detach().clone()
        with pytest.raises(ValueError) as torch_error:
            spec.theirs([param], **kwargs)
        with pytest.raises(ValueError) as our_error:
            spec.ours([param], **kwargs)
        assert str(our_error.value) == str(torch_error.value), kwargs
        assert torch.equal(param, before)


@pytest.mark.parametrize("spec", list(SPECS))
@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_torch_state_dict_loads_into_ours(spec, backend, device):
    """torch's state after three steps, loaded into ours (the hyperparameters come with it, and a step of ours
    taken before the load is replaced), continues as torch does."""
    spec = SPECS[spec]
    theirs = make_params([torch.randn(s) for s in SHAPES], torch.float32, device)
    torch_opt = spec.theirs(theirs, lr=1e-2, foreach=False, **spec.options)
    for _ in range(3):
        set_grads(random_grads(SHAPES, device=device), theirs)
        torch_opt.step()
    ours = make_params([p.detach() for p in theirs], torch.float32, device)
    opt = spec.ours(ours, lr=1.0, backend=backend)
    set_grads(random_grads(SHAPES, device=device), ours)
    opt.step()
    with torch.no_grad():
        for p, q in zip(ours, theirs):
            p.copy_(q)
    opt.load_state_dict(copy.deepcopy(torch_opt.state_dict()))  # its own tensors, as from a checkpoint
    assert opt.param_groups[0]["lr"] == 1e-2
    assert all(opt.param_groups[0][key] == value for key, value in spec.options.items())
    for p, q in zip(ours, theirs):
        state, torch_state = opt.state[p], torch_opt.state[q]
        assert state["step"].device == p.device
        if "step" in torch_state:  # torch's Adam counts steps; its SGD does not, ours does (no first step again)
            assert state["step"].item() == torch_state["step"].item() == 3.0
        else:
            assert state["step"].item() >= 1
        for key in spec.fp32_state:
            if key in torch_state:
                assert torch.equal(state[key], torch_state[key])
    step_both_and_compare(opt, torch_opt, ours, theirs, SHAPES, device)


@pytest.mark.parametrize("spec", list(SPECS))
@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_our_state_dict_loads_into_torch_and_back(spec, backend, device):
    spec = SPECS[spec]
    ours, opt = trained(spec, backend, device)
    theirs = make_params([p.detach() for p in ours], torch.float32, device)
    torch_opt = spec.theirs(theirs, lr=1.0, foreach=False)
    # A copy: torch's loader keeps a non-fused optimizer's `step` tensors as given, so loading the live state
    # dict would share our step counters with torch's (and each would count the other's steps).
    torch_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert all(torch_opt.param_groups[0][key] == value for key, value in spec.options.items())
    step_both_and_compare(opt, torch_opt, ours, theirs, SHAPES, device)
    # and back: torch's state continues in a fresh optimizer of ours
    again = make_params([q.detach() for q in theirs], torch.float32, device)
    again_opt = spec.ours(again, backend=backend)
    again_opt.load_state_dict(copy.deepcopy(torch_opt.state_dict()))
    step_both_and_compare(again_opt, torch_opt, again, theirs, SHAPES, device)


@pytest.mark.parametrize("spec", list(SPECS))
def test_torch_layout_gives_torchs_form_within_and_ours_after(spec):
    """Inside `torch_layout()`, state_dict() is torch_state_dict(): fp32 moments, groups with torch's keys alone
    (what DCP's get_state_dict reads, and then asks a checkpoint for); ours again after the block, an error in it
    too."""
    spec = SPECS[spec]
    ours, opt = trained(spec, "cpu", "cpu", torch.bfloat16, moments="int8", master_weights=24)
    torch_keys = set(spec.theirs([torch.nn.Parameter(torch.randn(3))], **spec.options).state_dict()["param_groups"][0])
    own = opt.state_dict()
    with opt.torch_layout():
        inside = opt.state_dict()
        assert_identical(inside, opt.torch_state_dict())
    assert set(inside["param_groups"][0]) <= torch_keys < set(own["param_groups"][0])
    for state in inside["state"].values():
        assert "moment_scales" not in state and "master_remainder" not in state and "master_param" in state
        assert all(value.dtype == torch.float32 for value in state.values())
    with opt.torch_layout(master_weights=False):  # the form of torch's own state: no masters
        without = opt.state_dict()["state"].values()
        assert all(not {"master_param", "master_remainder"} & set(state) for state in without)
    with pytest.raises(KeyError):
        with opt.torch_layout():
            raise KeyError("a failing save")
    assert_identical(opt.state_dict(), own)
    opt.load_state_dict(inside)  # and back: quantized, the masters split again
    assert opt.state_dict().keys() == own.keys() and "moment_scales" in opt.state_dict()["state"][0]


@pytest.mark.parametrize("spec", list(SPECS))
@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_deepcopy_and_pickle_keep_a_working_optimizer(spec, backend, device):
    """torch pickles only defaults, state and param_groups: the backend, the clipping setting, the GradScaler
    flag and the fp32 state of a bf16 param must survive copy.deepcopy and torch.save/torch.load of the optimizer
    object itself."""
    spec = SPECS[spec]
    params, opt = trained(spec, backend, device, dtype=torch.bfloat16, steps=1, max_grad_norm=5.0,
                          **spec.bf16_options)
    opt.max_grad_norm = None  # a setting changed after construction travels too
    buffer = io.BytesIO()
    torch.save(opt, buffer)
    buffer.seek(0)
    for clone in (copy.deepcopy(opt), torch.load(buffer, weights_only=False)):
        assert clone.backend == backend and clone.max_grad_norm is None
        assert clone._step_supports_amp_scaling == opt._step_supports_amp_scaling
        clone_params = clone.param_groups[0]["params"]
        set_grads(random_grads(SHAPES, torch.bfloat16, device), clone_params)
        clone.step()
        clone.load_state_dict(opt.state_dict())
        state = clone.state[clone_params[0]]
        assert set(spec.fp32_state) <= set(state)
        assert all(v.dtype == (torch.int16 if key == "master_remainder" else torch.float32) for key, v in state.items())
        assert ("master_remainder" in state) == bool(spec.bf16_options.get("master_weights"))  # a bf16 param's master
        assert state["step"].device == clone_params[0].device and state["step"].dtype == torch.float32


@pytest.mark.parametrize("max_grad_norm", [None, 1.0])
@pytest.mark.parametrize("spec", list(SPECS))
def test_a_step_over_a_thousand_params_sets_off_no_garbage_collection(spec, max_grad_norm):
    """A step holds no object per param that Python's garbage collector tracks (a tuple, a torch.Size): a thousand of
    them alive at once set off its collections, about three a step, which cost a fifth of the step's host time."""
    shapes = [(4,)] * 1000
    params = make_params([torch.randn(s) for s in shapes], torch.float32, "cpu")
    opt = SPECS[spec].ours(params, lr=1e-2, max_grad_norm=max_grad_norm, **SPECS[spec].options)
    set_grads(random_grads(shapes), params)
    opt.step()  # the first step makes the state and the kept op lists
    collections = []

    def count(phase, info):
        if phase == "start":
            collections.append(info["generation"])

    gc.collect()  # the count of new objects starts from 0, a step must not reach the threshold
    gc.callbacks.append(count)
    try:
        opt.step()
    finally:
        gc.callbacks.remove(count)
    assert collections == []



@pytest.mark.parametrize("spec", list(SPECS))
def test_params_on_two_devices_in_one_group_raise(spec):
    spec = SPECS[spec]
    on_cpu, on_meta = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3, device="meta"))
    with pytest.raises(ValueError, match="one device.*cpu, meta"):
        spec.ours([on_cpu, on_meta])
    opt = spec.ours([torch.nn.Parameter(torch.randn(2))], **spec.options)
    before = snapshot(opt)
    with pytest.raises(ValueError, match="one device"):
        opt.add_param_group({"params": [on_cpu, on_meta], "lr": 0.1})
    assert_identical(snapshot(opt), before)
    # and one group per device is fine
    opt.add_param_group({"params": [on_meta]})
    assert len(opt.param_groups) == 2


def test_a_triton_launch_makes_its_tensors_device_current(monkeypatch):
    """Triton launches on the current CUDA device: the ops' Triton kernels run with their tensors' device made
    current (as the C++ launchers' DeviceGuard does), whichever argument holds the first tensor."""
    entered = []

    @contextlib.contextmanager
    def device(where):
        entered.append(where)
        yield

    monkeypatch.setattr(torch.cuda, "device", device)
    calls = []
    launch = _library._on_the_tensors_device(lambda *args, **kwargs: calls.append((args, kwargs)))
    second = torch.empty(2, device="meta")
    launch([], [second, torch.empty(1)], 0.1, found_inf=None)
    launch(second, step=torch.empty(1))
    launch([], 0.1)  # no tensor: nothing to launch on
    assert entered == [second.device, second.device] and len(calls) == 3


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("spec", list(SPECS))
def test_params_on_the_second_gpu_step_as_on_the_first(spec):
    """Params on cuda:1 while cuda:0 is current: each backend steps them where they are, as on cuda:0."""
    spec = SPECS[spec]
    init = [torch.randn(s) for s in SHAPES]
    grads = [random_grads(SHAPES) for _ in range(2)]
    for backend in ("cuda", "triton"):
        results = []
        for device in ("cuda:0", "cuda:1"):
            params = make_params(init, torch.float32, device)
            opt = spec.ours(params, lr=1e-2, backend=backend, **spec.options)
            for step_grads in grads:
                set_grads([g.to(device) for g in step_grads], params)
                opt.step()
            results.append([p.detach().cpu() for p in params])
        assert torch.cuda.current_device() == 0
        assert_identical(*results)


@pytest.mark.parametrize("backend, device", CPU_BACKENDS)
@pytest.mark.parametrize("spec", list(SPECS))
def test_a_step_counts_as_an_inplace_write_for_autograd(spec, backend, device):
    """A step bumps its params' version counters, as torch's does: a retained graph's second backward, which would
    read the stepped weights as if they were those of its forward, is refused as torch refuses it."""
    spec = SPECS[spec]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    opt = spec.ours(model.parameters(), backend=backend, **spec.options)
    versions = [p._version for p in model.parameters()]
    loss = model(torch.randn(3, 4)).square().sum()
    loss.backward(retain_graph=True)
    opt.step()
    assert all(p._version > v for p, v in zip(model.parameters(), versions))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def assert_compiled_steps_match_eager(make_optimizer, dtype: torch.dtype, device: str,
                                      shapes=((3,), (70,), (130,)), float_lrs=None) -> torch.optim.Optimizer:
    """Dynamo traces step() of `make_optimizer(params)` into one graph (the op is opaque, its mutations come from
    the schema, and nothing in step() syncs with the host or branches on data): the first step creates the state,
    so the second compiles again (as torch's own optimizers do), and from then on one graph serves every step. The
    params and every state tensor equal those of eager steps bit for bit. `float_lrs`: a float lr set before each
    step, as a scheduler would. Returns the compiled side's optimizer."""
    torch._dynamo.reset()
    init = [torch.randn(s) for s in shapes]
    compiled, eager = make_params(init, dtype, device), make_params(init, dtype, device)
    compiled_opt, eager_opt = make_optimizer(compiled), make_optimizer(eager)

    @torch.compile(fullgraph=True)
    def step():
        compiled_opt.step()

    for i in range(4):
        if float_lrs is not None:
            for group in compiled_opt.param_groups + eager_opt.param_groups:
                group["lr"] = float_lrs[i]
        set_grads(random_grads(shapes, dtype, device), compiled, eager)
        with torch._dynamo.config.patch(error_on_recompile=i >= 2):
            step()
        eager_opt.step()
    for p, q in zip(compiled, eager):
        assert torch.equal(p, q)
        assert_identical(compiled_opt.state[p], eager_opt.state[q])
    return compiled_opt


@pytest.mark.parametrize("spec", list(SPECS))
def test_torch_compile_fullgraph_step_matches_eager(spec):
    spec = SPECS[spec]
    opt = assert_compiled_steps_match_eager(
        lambda params: spec.ours(params, lr=torch.tensor(1e-2), backend="cpu", **spec.options), torch.float32, "cpu")
    assert all(state["step"].item() == 4.0 for state in opt.state.values())


@pytest.mark.parametrize("backend, device", CPU_BACKENDS)
@pytest.mark.parametrize("spec", list(SPECS))
def test_torch_compile_float_lr_that_changes_is_an_input_of_the_graph(spec, backend, device):
    """A float lr changed before every step (a scheduler's): the ops take it as an fp64 tensor under torch.compile
    (ops/_library.py's step_scalars), so it is an input of the one graph, not a constant that recompiles per value,
    and the steps stay bit for bit the eager ones, which read the float (fp64 lrs that fp32 cannot hold exactly)."""
    spec = SPECS[spec]
    assert_compiled_steps_match_eager(lambda params: spec.ours(params, lr=0.1, backend=backend, **spec.options),
                                      torch.float32, device, float_lrs=[1e-2 / 3, 1e-3 / 7, 3e-3 / 11, 1e-4 / 13])


@pytest.mark.parametrize("backend, device", CPU_BACKENDS)
@pytest.mark.parametrize("spec", list(SPECS))
def test_float64_lr_tensor_steps_as_the_float_lr(spec, backend, device):
    """An fp64 lr tensor is read exactly, as torch's fused CPU Adam reads it: the steps equal the float lr's bit for
    bit (an fp32 tensor holds a rounded lr)."""
    spec = SPECS[spec]
    init = [torch.randn(s) for s in ((3,), (70,))]
    grads = [random_grads([t.shape for t in init], torch.float32, device) for _ in range(3)]
    results = []
    for lr in (1e-2 / 3, torch.tensor(1e-2 / 3, dtype=torch.float64)):
        params = make_params(init, torch.float32, device)
        opt = spec.ours(params, lr=lr, backend=backend, **spec.options)
        for step_grads in grads:
            set_grads(step_grads, params)
            opt.step()
        results.append(([p.detach() for p in params], [opt.state[p] for p in params]))
    assert_identical(*results)


@pytest.mark.parametrize("backend, device", CPU_BACKENDS)
@pytest.mark.parametrize("shape", [(1,), (1, 1)], ids=str)
@pytest.mark.parametrize("cls, options", [(fused_optim.AdamW, {}), (fused_optim.SGD, dict(momentum=0.9)),
                                          (fused_optim.Lion, {})], ids=["AdamW", "SGD", "Lion"])
def test_a_one_element_lr_tensor_of_any_shape_steps_as_a_0_dim_one(cls, options, shape, backend, device):
    """torch takes any one-element lr tensor; the torch backend once broadcast a (1, 1) lr into the params."""
    init = [torch.randn(s) for s in SHAPES]
    grads = random_grads(SHAPES, torch.float32, device)
    results = []
    for lr in (torch.tensor(1e-2), torch.full(shape, 1e-2)):
        params = make_params(init, torch.float32, device)
        opt = cls(params, lr=lr, backend=backend, **options)
        set_grads(grads, params)
        opt.step()
        results.append(([p.detach() for p in params], [opt.state[p] for p in params]))
    assert_identical(*results)


@pytest.mark.parametrize("backend, device", CPU_BACKENDS)
@pytest.mark.parametrize("spec", list(SPECS))
def test_a_group_marked_differentiable_steps_as_torchs_does(spec, backend, device):
    """torch reads `differentiable` from the optimizer's defaults, not the group's: a group marked differentiable in
    an optimizer that is not steps its leaf params without grad, as the other groups do."""
    spec = SPECS[spec]
    init = [torch.randn(s) for s in SHAPES]
    ours, theirs = make_params(init, torch.float32, device), make_params(init, torch.float32, device)

    def groups(params):
        return [dict(params=params[:1]), dict(params=params[1:], differentiable=True)]

    opt = spec.ours(groups(ours), lr=1e-2, backend=backend, **spec.options)
    torch_opt = spec.theirs(groups(theirs), lr=1e-2, **spec.options)
    step_both_and_compare(opt, torch_opt, ours, theirs, SHAPES, device, steps=1)


# One optimizer of each kind in each of its compact storage modes, on bf16 params: the state is kept as codes with
# block scales, master remainders or none at all (stochastic rounding), and step() picks its op variant and state
# lists from the mode, all of which dynamo must trace as it traces the fp32 step above.
STORAGE_MODES = {
    "AdamW-int8-amsgrad-master24": (fused_optim.AdamW, dict(moments="int8", master_weights=24, amsgrad=True,
                                                            weight_decay=0.1)),
    "Adam-bf16-master": (fused_optim.Adam, dict(moments="bf16", master_weights=True, weight_decay=0.1)),
    "AdamW-bf16-stochastic": (fused_optim.AdamW, dict(moments="bf16", stochastic_rounding=True)),
    "SGD-int8-master24": (fused_optim.SGD, dict(momentum=0.9, moments="int8", master_weights=24)),
    "SGD-stochastic": (fused_optim.SGD, dict(stochastic_rounding=True)),
    "Lion-int8-master": (fused_optim.Lion, dict(moments="int8", master_weights=True, weight_decay=0.1)),
}


@pytest.mark.parametrize("backend, device", CPU_BACKENDS)
@pytest.mark.parametrize("mode", list(STORAGE_MODES))
def test_torch_compile_fullgraph_step_matches_eager_in_every_storage_mode(mode, backend, device):
    """The compact modes on bf16 params (a block of 64 codes, a whole one and a partial one): codes, scales and
    remainders included in the state compared."""
    cls, options = STORAGE_MODES[mode]
    assert_compiled_steps_match_eager(lambda params: cls(params, lr=torch.tensor(1e-2), backend=backend, **options),
                                      torch.bfloat16, device)


@pytest.mark.parametrize("backend, device", [p for p in CPU_BACKENDS if p.values[0] != "cpu"])
@pytest.mark.parametrize("mode", list(STORAGE_MODES))
def test_a_backend_steps_non_contiguous_params_as_the_cpu_kernels_do(mode, backend, device):
    """bf16 params transposed and channels_last, in every storage mode: the same bits as the CPU kernels, params and
    state, random bits included (drawn in each tensor's memory order, as the kernels walk it). Without weight decay:
    Adam's coupled decay is an FMA in our kernels, and the torch backend leaves it to torch's own (README,
    Numerics)."""
    if backend == "torch" and mode == "Adam-bf16-master":
        pytest.skip("the torch backend steps fp32 masters with torch's fused Adam: within an ulp of our kernels, "
                    "not bit for bit, in any layout (the other master modes cover its layout)")
    cls, options = STORAGE_MODES[mode]
    options = {**options, "weight_decay": 0.0}
    init = [torch.randn(4, 3).t(), torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)]
    grads = [[torch.randn(t.shape) for t in init] for _ in range(3)]
    results = []
    for each in ("cpu", backend):
        params = [torch.nn.Parameter(t.to(torch.bfloat16)) for t in init]
        assert [p.stride() for p in params] == [t.stride() for t in init]
        opt = cls(params, lr=1e-2, backend=each, **options)
        for step_grads in grads:
            set_grads(step_grads, params)
            opt.step()
        results.append(([p.detach() for p in params], [opt.state[p] for p in params]))
    assert_identical(*results)


@pytest.mark.parametrize("backend, device", [p for p in CPU_BACKENDS if p.values[0] != "cpu"])
@pytest.mark.parametrize("cls", [fused_optim.AdamW, fused_optim.Lion], ids=lambda cls: cls.__name__)
def test_a_backend_forms_the_decoupled_decay_as_the_cpu_kernels_do(cls, backend, device):
    """1 - lr * weight_decay from the two doubles, rounded once to fp32 (adam.h, lion.h), on every backend. At this
    lr, with the weight decay rounded to fp32 first (as the Triton kernels took it), the factor falls an ulp apart
    and every param decays by the other one."""
    if backend == "torch" and cls is fused_optim.AdamW:
        pytest.skip("the torch backend steps AdamW with torch's fused kernel, which decays the param its own way "
                    "(README, Numerics)")
    lr, weight_decay = float.fromhex("0x1.7691ffd6ee179p-9"), 0.1
    fp32 = lambda x: torch.tensor(x, dtype=torch.float32).item()  # noqa: E731
    assert fp32(1.0 - lr * weight_decay) != fp32(1.0 - lr * fp32(weight_decay))  # the case this lr stands for
    init = [torch.randn(s) + 1.0 for s in SHAPES]
    grads = [random_grads(SHAPES, torch.float32, device) for _ in range(2)]
    results = []
    for each in ("cpu", backend):
        params = make_params(init, torch.float32, device)
        opt = cls(params, lr=lr, weight_decay=weight_decay, backend=each)
        for step_grads in grads:
            set_grads(step_grads, params)
            opt.step()
        results.append(([p.detach() for p in params], [opt.state[p] for p in params]))
    assert_identical(*results)


def assert_graph_replays_like_eager_steps(cls, options: dict, dtype: torch.dtype, backend: str) -> None:
    """A capturable step with a tensor lr, captured after warm-up steps on a side stream, replayed with new grads
    and a new lr each time, equals eager steps (the first step's rule read from the step count on the device)."""
    shapes = [(3,), (1023,), (4097,)]
    init = [torch.randn(s) for s in shapes]
    graphed, eager = make_params(init, dtype, "cuda"), make_params(init, dtype, "cuda")
    graphed_lr, eager_lr = torch.tensor(1e-2, device="cuda"), torch.tensor(1e-2, device="cuda")
    options = dict(options, **({"capturable": True} if "capturable" in signature(cls).parameters else {}))
    graphed_opt = cls(graphed, lr=graphed_lr, backend=backend, **options)
    eager_opt = cls(eager, lr=eager_lr, backend=backend, **options)
    for p in graphed:
        p.grad = torch.zeros_like(p)  # static grads: the graph reads these addresses
    warmup, replays = 3, 5
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            grads = random_grads(shapes, dtype, "cuda")
            for p, g in zip(graphed, grads):
                p.grad.copy_(g)
            set_grads(grads, eager)
            graphed_opt.step()
            eager_opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graphed_opt.step()
    for i in range(replays):
        grads = random_grads(shapes, dtype, "cuda")
        for p, g in zip(graphed, grads):
            p.grad.copy_(g)
        set_grads(grads, eager)
        graphed_lr.fill_(1e-2 / (i + 2))
        eager_lr.fill_(1e-2 / (i + 2))
        graph.replay()
        eager_opt.step()
    torch.cuda.synchronize()
    for p, q in zip(graphed, eager):
        assert torch.equal(p, q)
        assert graphed_opt.state[p]["step"].item() == warmup + replays
        assert_identical(graphed_opt.state[p], eager_opt.state[q])


@pytest.mark.cuda
@pytest.mark.parametrize("spec", list(SPECS))
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_graph_capture_replays_like_eager_steps(spec, backend):
    assert_graph_replays_like_eager_steps(SPECS[spec].ours, SPECS[spec].options, torch.float32, backend)


@pytest.mark.cuda
@pytest.mark.parametrize("mode", list(STORAGE_MODES))
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_graph_capture_replays_like_eager_steps_in_every_storage_mode(mode, backend):
    """The compact modes' steps replay too: their random streams are keyed by the step count on the device."""
    cls, options = STORAGE_MODES[mode]
    assert_graph_replays_like_eager_steps(cls, options, torch.bfloat16, backend)


@pytest.mark.cuda
@pytest.mark.parametrize("mode", list(STORAGE_MODES))
@pytest.mark.parametrize("backend", ["cuda", "triton", "torch"])
def test_a_step_makes_no_host_sync(mode, backend):
    """After a first step (kernels load, launch tables are sent), a step reads nothing on the host, in every storage
    mode and on every GPU backend: the torch backend's int8 dequantizing made its constant on the device, a copy the
    host waited for, once a moment a tensor a step."""
    cls, options = STORAGE_MODES[mode]
    params = make_params([torch.randn(s) for s in SHAPES], torch.bfloat16, "cuda")
    opt = cls(params, lr=1e-2, backend=backend, **options)
    set_grads(random_grads(SHAPES, torch.bfloat16, "cuda"), params)
    opt.step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_torchs_whole_network_capture_recipe(backend):
    """torch's whole-network recipe: zero_grad(set_to_none=True) before the capture, so backward makes the grads
    inside it at new addresses. The CUDA C++ step passes its pointers as kernel arguments and replays as eager
    steps; the Triton one, whose launch table would be copied from the host during the capture, refuses in one
    sentence (README) rather than failing in the capture."""
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4)).cuda()
    opt = fused_optim.AdamW(model.parameters(), lr=torch.tensor(1e-2, device="cuda"), backend=backend)
    static_x = torch.randn(8, 16, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            model(static_x).square().mean().backward()
            opt.step()
    torch.cuda.current_stream().wait_stream(side)
    opt.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    if backend == "triton":
        with pytest.raises(RuntimeError, match="warm-up step over the same tensors"):
            with torch.cuda.graph(graph):
                model(static_x).square().mean().backward()
                opt.step()
        return
    with torch.cuda.graph(graph):
        model(static_x).square().mean().backward()
        opt.step()
    eager = copy.deepcopy(model)
    eager_opt = fused_optim.AdamW(eager.parameters(), lr=torch.tensor(1e-2, device="cuda"), backend=backend)
    eager_opt.load_state_dict(opt.state_dict())
    for _ in range(3):
        static_x.copy_(torch.randn(8, 16, device="cuda"))
        graph.replay()
        eager_opt.zero_grad(set_to_none=True)
        eager(static_x).square().mean().backward()
        eager_opt.step()
    torch.cuda.synchronize()
    for p, q in zip(model.parameters(), eager.parameters()):
        assert torch.equal(p, q)


def test_a_triton_table_missed_during_a_capture_is_refused(monkeypatch):
    """A launch table not sent before (new tensors) would be copied from the host inside a capture, which a CUDA
    graph cannot record: one sentence instead."""
    from fused_optim.triton import _table

    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="warm-up step over the same tensors"):
        _table.device_table([0x7F0000001000, 0x7F0000002000, 1023, 0, 1], torch.device("cuda"))


# What users change around an optimizer once it has state: torch's optimizers read params, state and hooks afresh
# every step, so ours, which keep their op lists between steps (optim/_plan.py), must notice each change.


@pytest.mark.parametrize("spec", list(SPECS))
@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_a_param_put_in_anothers_place_is_stepped_as_torchs(spec, backend, device):
    """Model surgery after a step: `group["params"][0] = new_param` (same list, same length). The next steps
    update the new param (with state of its own) and leave the old one, as torch's do."""
    spec = SPECS[spec]
    ours = make_params([torch.randn(s) for s in SHAPES], torch.float32, device)
    theirs = make_params([p.detach() for p in ours], torch.float32, device)
    opt = spec.ours(ours, lr=1e-2, backend=backend, **spec.options)
    torch_opt = spec.theirs(theirs, lr=1e-2, foreach=False, **spec.options)
    set_grads(random_grads(SHAPES, device=device), ours, theirs)
    opt.step()
    torch_opt.step()
    old_ours, old_theirs = ours[0], theirs[0]
    old_value = old_ours.detach().clone()
    old_ours.grad = old_theirs.grad = None
    replacement = torch.randn(SHAPES[0])
    opt.param_groups[0]["params"][0] = ours[0] = make_params([replacement], torch.float32, device)[0]
    torch_opt.param_groups[0]["params"][0] = theirs[0] = make_params([replacement], torch.float32, device)[0]
    step_both_and_compare(opt, torch_opt, ours, theirs, SHAPES, device)
    assert torch.equal(old_ours, old_value)
    torch.testing.assert_close(old_ours, old_theirs, rtol=1e-6, atol=1e-6)
    assert ours[0] in opt.state


@pytest.mark.parametrize("spec", list(SPECS))
@pytest.mark.parametrize("backend, device", CPU_BACKENDS)
def test_a_param_held_twice_in_a_group_is_stepped_twice_as_torchs_for_loop(spec, backend, device):
    """torch warns of a group that holds a param twice, and its for-loop steps it twice, one after the other, each
    time from the state the other left. Ours stepped both in one op call, whose threads updated the param at once:
    the result varied from run to run. (The group is made to hold it twice after a first step: at SGD's first step
    torch's for-loop gives the second its own new buffer, which is not this rule.) On the CPU kernels, several
    chunks of 16 K elements share the threads; the interpreted Triton kernels take a smaller param (they run one
    program at a time)."""
    spec = SPECS[spec]
    shapes = [(1 << 17 if backend == "cpu" else 1 << 10,), (5,)]
    ours = make_params([torch.randn(s) for s in shapes], torch.float32, device)
    theirs = make_params([p.detach() for p in ours], torch.float32, device)
    opt = spec.ours(ours, lr=1e-2, backend=backend, **spec.options)
    torch_opt = spec.theirs(theirs, lr=1e-2, foreach=False, **spec.options)
    step_both_and_compare(opt, torch_opt, ours, theirs, shapes, device, steps=1)
    opt.param_groups[0]["params"].append(ours[0])
    torch_opt.param_groups[0]["params"].append(theirs[0])
    step_both_and_compare(opt, torch_opt, ours, theirs, shapes, device)


@pytest.mark.parametrize("spec", list(SPECS))
@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_a_param_whose_layout_changes_takes_its_state_along(spec, backend, device):
    """`model.to(memory_format=torch.channels_last)` after a step (a resume, say) gives a param new strides under
    the same Parameter. Its state follows (the kernels walk both as flat arrays) and the steps go on as torch's."""
    spec = SPECS[spec]
    shapes = [(4, 3, 3, 3), (5,)]
    ours = make_params([torch.randn(s) for s in shapes], torch.float32, device)
    theirs = make_params([p.detach() for p in ours], torch.float32, device)
    opt = spec.ours(ours, lr=1e-2, backend=backend, **spec.options)
    torch_opt = spec.theirs(theirs, lr=1e-2, foreach=False, **spec.options)
    step_both_and_compare(opt, torch_opt, ours, theirs, shapes, device, steps=2)
    for p in (ours[0], theirs[0]):
        p.data = p.data.to(memory_format=torch.channels_last)
    step_both_and_compare(opt, torch_opt, ours, theirs, shapes, device)
    assert all(value.stride() == ours[0].stride() for value in opt.state[ours[0]].values() if value.dim() == 4)


@pytest.mark.parametrize("moments", ["int8", "bf16"])
def test_int8_and_bf16_moments_follow_a_layout_change(moments, cpu_backend):
    """Moments stored in 8 or 16 bits keep their values through a layout change: beside a twin whose param kept its
    layout, on the same grads, they differ by their rounding only (int8 codes, whose blocks run along memory, are
    coded again; both round with random bits drawn by memory position)."""
    init = torch.randn(4, 3, 5, 5)
    params = make_params([init, init], torch.float32, "cpu")
    kept, moved = (fused_optim.AdamW([p], lr=1e-2, moments=moments, backend=cpu_backend) for p in params)
    for step in range(3):
        if step == 2:
            params[1].data = params[1].data.to(memory_format=torch.channels_last)
        set_grads([torch.randn_like(init)] * 2, params)
        kept.step()
        moved.step()
    assert all(value.stride() == params[1].stride() for value in moved.state[params[1]].values() if value.dim() == 4)
    kept_state, moved_state = kept.torch_state_dict()["state"][0], moved.torch_state_dict()["state"][0]
    for key in ("exp_avg", "exp_avg_sq"):
        scale = kept_state[key].abs().max().item()
        torch.testing.assert_close(moved_state[key], kept_state[key], rtol=0, atol=0.05 * scale)
    torch.testing.assert_close(params[1], params[0], rtol=0, atol=2e-3)


def test_int8_codes_load_into_a_param_of_another_layout():
    """An int8 checkpoint saved beside a contiguous param loads into the same param in channels_last: the codes'
    blocks run along memory, so they are coded again for the new layout rather than copied element by element."""
    saved_param = torch.nn.Parameter(torch.randn(4, 3, 5, 5))
    saved_opt = fused_optim.AdamW([saved_param], lr=1e-2, moments="int8", backend="cpu")
    saved_param.grad = torch.randn_like(saved_param)
    saved_opt.step()
    expected = saved_opt.torch_state_dict()["state"][0]
    p = torch.nn.Parameter(saved_param.detach().to(memory_format=torch.channels_last))
    opt = fused_optim.AdamW([p], lr=1e-2, moments="int8", backend="cpu")
    opt.load_state_dict(saved_opt.state_dict())
    assert opt.state[p]["exp_avg"].stride() == p.stride()
    loaded = opt.torch_state_dict()["state"][0]
    for key in ("exp_avg", "exp_avg_sq"):  # coded again to nearest: within a code's step of the block's scale
        torch.testing.assert_close(loaded[key], expected[key], rtol=0.05, atol=0.02 * expected[key].abs().max().item())


@pytest.mark.parametrize("spec", list(SPECS))
def test_a_strided_param_is_refused_before_anything_changes(spec):
    """The kernels step dense params (any order of dimensions); a strided view in a later group is refused at the
    first step, before the earlier group is stepped or any state is made."""
    spec = SPECS[spec]
    dense = torch.nn.Parameter(torch.randn(3))
    strided = torch.randn(8, 6)[:, ::2].detach().requires_grad_()
    opt = spec.ours([{"params": [dense]}, {"params": [strided]}], lr=1e-2, backend="cpu", **spec.options)
    dense.grad, strided.grad = torch.randn(3), torch.randn(8, 3)
    before = snapshot(opt)
    with pytest.raises(RuntimeError, match=r"dense params .* strides \(6, 2\)"):
        opt.step()
    assert_identical(snapshot(opt), before)


@pytest.mark.parametrize("spec", list(SPECS))
def test_dense_params_in_any_layout_are_stepped_as_torchs(spec):
    """Dense is any order of dimensions: transposed and channels_last params are stepped (their state in their
    layout), and so is an empty one whatever its strides."""
    spec = SPECS[spec]
    init = [torch.randn(4, 3).t(), torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last),
            torch.empty(3, 0)]
    ours = [torch.nn.Parameter(t.clone(memory_format=torch.preserve_format)) for t in init]
    theirs = [torch.nn.Parameter(t.clone(memory_format=torch.preserve_format)) for t in init]
    assert [p.stride() for p in ours] == [t.stride() for t in init]
    opt = spec.ours(ours, lr=1e-2, backend="cpu", **spec.options)
    torch_opt = spec.theirs(theirs, lr=1e-2, foreach=False, **spec.options)
    step_both_and_compare(opt, torch_opt, ours, theirs, [tuple(t.shape) for t in init], "cpu")


@pytest.mark.parametrize("spec", list(SPECS))
def test_load_state_dict_hooks_work_as_torchs(spec):
    """A pre hook's returned dict is what loads, and what a post hook sets stays, as with torch's optimizers."""
    spec = SPECS[spec]
    ours, opt = trained(spec, "cpu", "cpu")
    state_key = spec.fp32_state[0]

    def reset(optimizer, state_dict):
        state_dict = copy.deepcopy(state_dict)
        for state in state_dict["state"].values():
            state[state_key] = torch.zeros_like(state[state_key])
        return state_dict

    def halve(optimizer):
        for state in optimizer.state.values():
            state[state_key] = state[state_key] / 2

    results = []
    for cls, options in ((spec.ours, dict(backend="cpu")), (spec.theirs, dict(foreach=False))):
        for hook in ("pre", "post"):
            params = make_params([p.detach() for p in ours], torch.float32, "cpu")
            loader = cls(params, lr=1e-2, **spec.options, **options)
            if hook == "pre":
                loader.register_load_state_dict_pre_hook(reset)
            else:
                loader.register_load_state_dict_post_hook(halve)
            loader.load_state_dict(copy.deepcopy(opt.state_dict()))
            results.append([loader.state[p][state_key].float() for p in params])
    for ours_loaded, theirs_loaded in zip(results[:2], results[2:]):
        for value, expected in zip(ours_loaded, theirs_loaded):
            assert torch.equal(value, expected)
    assert all(not value.any() for value in results[0])


@pytest.mark.parametrize("spec", list(SPECS))
def test_a_state_dict_post_hook_may_key_the_state_by_name(spec):
    """A post hook that keys params by name (for checkpoints that outlive a model's param order) gets the whole
    state dict, and a pre hook that keys them back loads it, as with torch's optimizers; torch_state_dict() too."""
    spec = SPECS[spec]
    ours, opt = trained(spec, "cpu", "cpu")
    names = [f"layer{i}.weight" for i in range(len(ours))]

    def by_name(optimizer, state_dict):
        state_dict["state"] = {names[index]: state for index, state in state_dict["state"].items()}
        state_dict["param_groups"] = [{**group, "params": [names[i] for i in group["params"]]}
                                      for group in state_dict["param_groups"]]

    opt.register_state_dict_post_hook(by_name)
    for state_dict in (opt.state_dict(), opt.torch_state_dict()):
        assert set(state_dict["state"]) == set(names)
        assert state_dict["param_groups"][0]["params"] == names
    theirs = make_params([p.detach() for p in ours], torch.float32, "cpu")
    torch_opt = spec.theirs(theirs, lr=1e-2, foreach=False, **spec.options)

    def by_index(optimizer, state_dict):
        index = {name: i for i, name in enumerate(names)}
        return {"state": {index[name]: state for name, state in state_dict["state"].items()},
                "param_groups": [{**group, "params": [index[name] for name in group["params"]]}
                                 for group in state_dict["param_groups"]]}

    torch_opt.register_load_state_dict_pre_hook(by_index)
    torch_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    step_both_and_compare(opt, torch_opt, ours, theirs, SHAPES, "cpu")


def test_tensor_betas_of_an_added_group_are_read_as_the_constructors():
    """Betas given as tensors are read once, by the constructor and by add_param_group alike (README)."""
    opt = fused_optim.AdamW([torch.nn.Parameter(torch.randn(3))], betas=(torch.tensor(0.8), torch.tensor(0.9)))
    opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(2))],
                         "betas": (torch.tensor(0.7), torch.tensor(0.95))})
    assert opt.param_groups[0]["betas"] == (float(torch.tensor(0.8)), float(torch.tensor(0.9)))
    assert opt.param_groups[1]["betas"] == (float(torch.tensor(0.7)), float(torch.tensor(0.95)))
    with pytest.raises(ValueError, match=r"Tensor betas\[0\] must be 1-element"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(2))], "betas": (torch.ones(2), 0.9)})
    assert len(opt.param_groups) == 2
