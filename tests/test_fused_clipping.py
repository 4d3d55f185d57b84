"""Clipping, unscaling and the inf/NaN check folded into fused_optim's Adam/AdamW step (`max_grad_norm=`,
fused_optim.GradScaler), against the torch sequence they replace: `clip_grad_norm_` (after `scaler.unscale_`)
then torch.optim's step.

What is checked: several fp32 steps, clipping and not, equal torch's within a few fp32 roundings (the clip factor
reaches the grads as 1 / (grad_scale / clip_coef) instead of one multiply, the only difference); a step with an
inf/NaN grad leaves params and state bit-identical and counts itself in `skipped_steps`; max_grad_norm survives
pickling and state_dict loading; the fused scaler backs off and grows its scale exactly as torch's over a run with
inf steps and never dispatches torch's unscale-and-check op, and steps as torch's does where it is disabled, given
a closure or given grads torch's own update steps; torch's own GradScaler still drives our optimizers;
WarmupCosine waits for the skipped steps.
"""

from __future__ import annotations

import copy
import io
import math
import pickle

import pytest
import torch
from conftest import CPU_BACKENDS, DispatchedOps

import fused_optim
from fused_optim.lr_scheduler import WarmupCosine

SHAPES = [(7, 5), (5,), (3, 4, 2), (1,)]
UNSCALE_OP = "aten::_amp_foreach_non_finite_check_and_unscale_"
OPTIMIZERS = {"Adam": (fused_optim.Adam, torch.optim.Adam), "AdamW": (fused_optim.AdamW, torch.optim.AdamW)}
# fp32 steps of ours and torch's differ by roundings only: a step moves params by ~lr = 1e-2, a wrong factor
# by a good part of that
CLOSE = dict(rtol=1e-6, atol=1e-6)


def make_params() -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.randn(shape)) for shape in SHAPES]


def clone_params(params) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def param_groups(params) -> list[dict]:
    """Two groups, so the clipping norm must be the global one over both."""
    return [{"params": params[:2]}, {"params": params[2:], "lr": 0.03}]


def random_grads(step: int) -> list[torch.Tensor]:
    """Grads whose global norm changes a lot from step to step (1.6 to 40): some steps clip, some don't."""
    scale = [0.3, 5.0, 1.0, 8.0, 0.5, 3.0][step % 6]
    return [torch.randn(shape) * scale for shape in SHAPES]


def set_grads(params, grads) -> None:
    for p, g in zip(params, grads):
        p.grad = g.clone()


def snapshot(params, opt) -> list[torch.Tensor]:
    """Every param and state tensor, cloned."""
    tensors = [p.detach().clone() for p in params]
    for p in params:
        for key in sorted(opt.state[p]):
            tensors.append(opt.state[p][key].clone())
    return tensors


def assert_bit_identical(before: list[torch.Tensor], after: list[torch.Tensor]) -> None:
    assert len(before) == len(after)
    for a, b in zip(before, after):
        assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8) if a.dim() else a, b.view(torch.uint8)
                                                  if b.dim() else b)


# ------------------------------------------------------------------------------------------------------------------
# max_grad_norm = clip_grad_norm_ then step


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("max_grad_norm", [4.0, 1e-3, 1e6], ids=["sometimes", "always", "never"])
@pytest.mark.parametrize("amsgrad", [False, True], ids=["adam", "amsgrad"])
def test_max_grad_norm_is_clip_then_step(cpu_backend, name, max_grad_norm, amsgrad):
    ours_cls, torch_cls = OPTIMIZERS[name]
    ours = make_params()
    theirs = clone_params(ours)
    opt = ours_cls(param_groups(ours), lr=0.01, weight_decay=0.1, amsgrad=amsgrad, max_grad_norm=max_grad_norm,
                   backend=cpu_backend)
    torch_opt = torch_cls(param_groups(theirs), lr=0.01, weight_decay=0.1, amsgrad=amsgrad)
    clipped_steps = 0
    for step in range(6):
        grads = random_grads(step)
        set_grads(ours, grads)
        set_grads(theirs, grads)
        torch_norm = torch.nn.utils.clip_grad_norm_(theirs, max_grad_norm)
        torch_opt.step()
        opt.step()
        clipped_steps += float(torch_norm) > max_grad_norm
        assert opt.last_grad_norm.dtype == torch.float32 and opt.last_grad_norm.shape == ()
        torch.testing.assert_close(opt.last_grad_norm, torch_norm, rtol=4 * 2**-23, atol=0)
        for p, q, g in zip(ours, theirs, grads):
            torch.testing.assert_close(p, q, **CLOSE)
            assert torch.equal(p.grad, g)  # our grads are read, never written
    # each case is what its name says
    assert {4.0: 0 < clipped_steps < 6, 1e-3: clipped_steps == 6, 1e6: clipped_steps == 0}[max_grad_norm]
    assert float(opt.skipped_steps) == 0
    for p, q in zip(ours, theirs):  # and the moments followed torch's
        for key in ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ()):
            torch.testing.assert_close(opt.state[p][key], torch_opt.state[q][key], **CLOSE)
        assert float(opt.state[p]["step"]) == float(torch_opt.state[q]["step"]) == 6


def test_without_max_grad_norm_no_norm_is_taken():
    params = make_params()
    opt = fused_optim.AdamW(params, backend="torch")
    set_grads(params, random_grads(0))
    with DispatchedOps() as ops:
        opt.step()
    assert not any(name.startswith("fused_optim::total_norm") for name in ops.names)
    assert opt.last_grad_norm is None


def test_a_step_without_grads_records_a_norm_of_zero():
    """last_grad_norm is this step's: 0 where no param has a grad (clip_grad_norm_'s norm of no grads), not the
    previous step's."""
    params = make_params()
    opt = fused_optim.AdamW(params, max_grad_norm=1.0)
    set_grads(params, random_grads(0))
    opt.step()
    assert float(opt.last_grad_norm) > 0
    opt.zero_grad()
    opt.step()
    assert float(opt.last_grad_norm) == 0.0


def test_clipping_step_reads_nothing_on_the_host(cpu_backend):
    params = make_params()
    opt = fused_optim.AdamW(params, max_grad_norm=1.0, backend=cpu_backend)
    for step in range(2):  # the first step creates the state; the second is the steady one
        set_grads(params, random_grads(step))
        with DispatchedOps() as ops:
            opt.step()
        assert "aten::_local_scalar_dense" not in ops.names


# ------------------------------------------------------------------------------------------------------------------
# skipped steps


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("bad", [float("inf"), -float("inf"), float("nan")])
def test_a_non_finite_grad_skips_the_step(cpu_backend, name, bad):
    ours_cls = OPTIMIZERS[name][0]
    ours = make_params()
    untouched = clone_params(ours)  # the same run without the bad step
    opt = ours_cls(param_groups(ours), lr=0.01, max_grad_norm=2.0, backend=cpu_backend)
    twin_opt = ours_cls(param_groups(untouched), lr=0.01, max_grad_norm=2.0, backend=cpu_backend)
    for step in range(2):
        grads = random_grads(step)
        for params, optimizer in ((ours, opt), (untouched, twin_opt)):
            set_grads(params, grads)
            optimizer.step()
    before = snapshot(ours, opt)
    grads = random_grads(2)
    grads[2][1, 3, 0] = bad
    set_grads(ours, grads)
    opt.step()
    assert_bit_identical(before, snapshot(ours, opt))
    assert float(opt.skipped_steps) == 1 and float(twin_opt.skipped_steps) == 0
    assert not math.isfinite(float(opt.last_grad_norm))
    # after the skip the run goes on as if the bad step had never been
    for step in range(3, 5):
        grads = random_grads(step)
        for params, optimizer in ((ours, opt), (untouched, twin_opt)):
            set_grads(params, grads)
            optimizer.step()
    assert_bit_identical(snapshot(untouched, twin_opt), snapshot(ours, opt))
    assert float(opt.skipped_steps) == 1


@pytest.mark.parametrize("backend, device", CPU_BACKENDS)
def test_a_found_inf_of_two_skips_too(backend, device):
    # torch's GradScaler found an inf and the step's own norm check found it too: found_inf is 2, not 1, and every
    # backend must still skip (torch's fused kernel alone skips on exactly 1.0)
    params = make_params()
    opt = fused_optim.AdamW(params, lr=0.01, backend=backend)
    set_grads(params, random_grads(0))
    opt.step()
    before = snapshot(params, opt)
    set_grads(params, random_grads(1))
    opt.grad_scale = torch.tensor(2.0)
    opt.found_inf = torch.tensor(2.0)
    opt.step()
    assert_bit_identical(before, snapshot(params, opt))


# ------------------------------------------------------------------------------------------------------------------
# arguments, pickling, state_dict


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("value", [0.0, -1.0, float("nan")])
def test_max_grad_norm_must_be_positive(name, value):
    with pytest.raises(ValueError, match="max_grad_norm"):
        OPTIMIZERS[name][0](make_params(), max_grad_norm=value)


@pytest.mark.parametrize("how", ["pickle", "deepcopy", "torch.save"])
def test_pickling_keeps_max_grad_norm(how):
    params = make_params()
    opt = fused_optim.AdamW(params, max_grad_norm=0.25, backend="torch")
    set_grads(params, random_grads(1))
    opt.step()
    if how == "pickle":
        copied = pickle.loads(pickle.dumps(opt))
    elif how == "deepcopy":
        copied = copy.deepcopy(opt)
    else:
        buffer = io.BytesIO()
        torch.save(opt, buffer)
        buffer.seek(0)
        copied = torch.load(buffer, weights_only=False)
    assert copied.max_grad_norm == 0.25 and copied.backend == "torch"
    # and it clips: a copy's step is the original's step
    copied_params = copied.param_groups[0]["params"]
    grads = random_grads(3)
    set_grads(params, grads)
    set_grads(copied_params, grads)
    opt.step()
    copied.step()
    for p, q in zip(params, copied_params):
        assert torch.equal(p, q)
    torch.testing.assert_close(copied.last_grad_norm, opt.last_grad_norm, rtol=0, atol=0)


def test_state_dict_round_trip_keeps_max_grad_norm():
    params = make_params()
    opt = fused_optim.AdamW(params, lr=0.01, max_grad_norm=0.5, backend="torch")
    for step in range(2):
        set_grads(params, random_grads(step))
        opt.step()
    resumed_params = clone_params(params)
    resumed = fused_optim.AdamW(resumed_params, lr=0.01, max_grad_norm=0.5, backend="torch")
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert resumed.max_grad_norm == 0.5
    # a state_dict saved without clipping does not switch clipping off in the optimizer that loads it
    unclipped = fused_optim.AdamW(clone_params(params), lr=0.01, backend="torch")
    resumed.load_state_dict(unclipped.state_dict() | {"state": opt.state_dict()["state"]})
    assert resumed.max_grad_norm == 0.5
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
    for step in range(2, 4):
        grads = random_grads(step)
        set_grads(params, grads)
        set_grads(resumed_params, grads)
        opt.step()
        resumed.step()
        for p, q in zip(params, resumed_params):
            assert torch.equal(p, q)


# ------------------------------------------------------------------------------------------------------------------
# GradScaler


def make_scaler(cls=torch.amp.GradScaler) -> torch.amp.GradScaler:
    """A CPU scaler that grows after two good steps (so a short run both backs off and grows)."""
    try:
        scaler = cls("cpu", init_scale=2.0**12, growth_interval=2)
    except (RuntimeError, TypeError) as error:  # older torch: no CPU GradScaler
        pytest.skip(f"GradScaler('cpu') is not supported by this torch: {error}")
    if not scaler.is_enabled():
        pytest.skip("GradScaler('cpu') is disabled in this torch")
    return scaler


INF_STEPS = {1, 4, 5}


def scaled_run(model, opt, scaler, steps: int = 8, *, torch_clip: float | None = None, scheduler=None):
    """A short mixed-precision-style run: scaled loss, backward, an inf grad at the steps in INF_STEPS, the
    scaler's step and update. `torch_clip`: unscale_ and clip_grad_norm_ first, as torch's recipe does.
    Returns the scale after each step, the lr each step ran with, and the op names the scaler's steps dispatched."""
    scales, lrs, names = [], [], []
    for step in range(steps):
        inputs = torch.randn(6, 5)
        loss = model(inputs).square().mean()
        scaler.scale(loss).backward()
        if step in INF_STEPS:
            model.weight.grad[1, 2] = float("inf") if step != 5 else float("nan")
        with DispatchedOps() as ops:
            if torch_clip is not None:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), torch_clip)
            lrs.append(float(opt.param_groups[0]["lr"]))
            scaler.step(opt)
            scaler.update()
        names.extend(ops.names)
        opt.zero_grad()
        if scheduler is not None:
            scheduler.step()
        scales.append(float(scaler.get_scale()))
    return scales, lrs, names


def twin_models() -> tuple[torch.nn.Module, torch.nn.Module]:
    model = torch.nn.Linear(5, 3)
    return model, copy.deepcopy(model)


@pytest.mark.parametrize("clip", [None, 0.5], ids=["no-clip", "clip"])
def test_fused_scaler_matches_torch_scaler(cpu_backend, clip):
    ours, theirs = twin_models()
    opt = fused_optim.AdamW(ours.parameters(), lr=0.01, max_grad_norm=clip, backend=cpu_backend)
    torch_opt = torch.optim.AdamW(theirs.parameters(), lr=0.01)
    torch.manual_seed(1)
    our_scales, _, our_ops = scaled_run(ours, opt, make_scaler(fused_optim.amp.GradScaler))
    torch.manual_seed(1)
    their_scales, _, their_ops = scaled_run(theirs, torch_opt, make_scaler(), torch_clip=clip)
    assert our_scales == their_scales
    # backed off at each inf step, grown after two good ones: the run does exercise both
    assert our_scales == [2.0**12, 2.0**11, 2.0**11, 2.0**12, 2.0**11, 2.0**10, 2.0**10, 2.0**11]
    for p, q in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(p, q, **CLOSE)
    assert float(opt.skipped_steps) == len(INF_STEPS)
    assert UNSCALE_OP not in our_ops
    assert UNSCALE_OP in their_ops  # the recorder does see it when it runs


@pytest.mark.parametrize("scaler_cls", [torch.amp.GradScaler, fused_optim.amp.GradScaler])
def test_a_scaler_refuses_a_step_without_grads_as_torchs_does(scaler_cls):
    model = torch.nn.Linear(5, 3)
    opt = fused_optim.AdamW(model.parameters(), lr=0.01)
    scaler = make_scaler(scaler_cls)
    scaler.scale(model(torch.randn(2, 5)).sum())  # no backward: no grads
    with pytest.raises(AssertionError, match="No inf checks were recorded for this optimizer"):
        scaler.step(opt)
    assert float(scaler.get_scale()) == 2.0**12 and not opt.state


def test_fused_scaler_with_user_unscale_runs_torchs_path(cpu_backend):
    ours, theirs = twin_models()
    opt = fused_optim.AdamW(ours.parameters(), lr=0.01, fused=True, backend=cpu_backend)
    torch_opt = torch.optim.AdamW(theirs.parameters(), lr=0.01)
    torch.manual_seed(2)
    our_scales, _, our_ops = scaled_run(ours, opt, make_scaler(fused_optim.amp.GradScaler), torch_clip=0.5)
    torch.manual_seed(2)
    their_scales, _, _ = scaled_run(theirs, torch_opt, make_scaler(), torch_clip=0.5)
    assert our_scales == their_scales
    for p, q in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(p, q, **CLOSE)
    assert UNSCALE_OP in our_ops
    assert float(opt.skipped_steps) == len(INF_STEPS)


def test_fused_scaler_with_a_torch_optimizer_is_torchs_scaler():
    ours, theirs = twin_models()
    torch.manual_seed(3)
    our_scales, _, _ = scaled_run(ours, torch.optim.SGD(ours.parameters(), lr=0.1),
                                  make_scaler(fused_optim.amp.GradScaler))
    torch.manual_seed(3)
    their_scales, _, _ = scaled_run(theirs, torch.optim.SGD(theirs.parameters(), lr=0.1), make_scaler())
    assert our_scales == their_scales
    for p, q in zip(ours.parameters(), theirs.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("make_opt", [lambda ps: fused_optim.AdamW(ps, lr=0.01), lambda ps: torch.optim.AdamW(ps, lr=0.01)],
                         ids=["ours", "torch's"])
def test_a_disabled_fused_scaler_steps_as_torchs(make_opt):
    """enabled=False (as `enabled=use_amp` gives): step() is the optimizer's plain step, as with torch's scaler."""
    ours, theirs = twin_models()
    our_opt, their_opt = make_opt(list(ours.parameters())), make_opt(list(theirs.parameters()))
    our_scaler = fused_optim.GradScaler("cpu", enabled=False)
    their_scaler = torch.amp.GradScaler("cpu", enabled=False)
    for model, opt, scaler in ((ours, our_opt, our_scaler), (theirs, their_opt, their_scaler)):
        torch.manual_seed(5)
        for _ in range(3):
            scaler.scale(model(torch.randn(6, 5)).square().mean()).backward()
            assert scaler.step(opt) is None
            scaler.update()
            opt.zero_grad()
    for p, q in zip(ours.parameters(), theirs.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("inf", [False, True], ids=["finite", "inf"])
def test_a_closure_passed_to_step_takes_torchs_path(inf):
    """torch's scaler unscales the grads, then calls step(closure) only where they are finite: ours does the same,
    whether the closure comes by position or (refused, as torch refuses it) by name."""
    models = twin_models()
    runs = []
    for model, scaler in zip(models, (fused_optim.GradScaler("cpu"), torch.amp.GradScaler("cpu"))):
        opt = fused_optim.AdamW(model.parameters(), lr=0.01)
        calls = []
        torch.manual_seed(6)
        scaler.scale(model(torch.randn(6, 5)).square().mean()).backward()
        if inf:
            model.weight.grad[0, 0] = float("inf")
        result = scaler.step(opt, lambda: calls.append(1) or torch.tensor(5.0))
        with pytest.raises(RuntimeError, match="Closure use is not currently supported"):
            scaler.step(opt, closure=lambda: None)
        scaler.update()
        runs.append((result, calls, float(scaler.get_scale()), [p.detach().clone() for p in model.parameters()]))
    (our_result, our_calls, our_scale, our_params), (their_result, their_calls, their_scale, their_params) = runs
    assert our_calls == their_calls == ([] if inf else [1])
    assert (our_result is None) == (their_result is None) == inf
    assert our_scale == their_scale
    assert all(torch.equal(p, q) for p, q in zip(our_params, their_params))


@pytest.mark.parametrize("case", ["sparse", "differentiable"])
def test_grads_that_torchs_update_steps_take_torchs_path(case):
    """SGD's sparse grads and a differentiable group are stepped by torch's own update, which takes no scale: our
    scaler unscales and checks them first, as torch's does (it had refused the step)."""
    runs = []
    for scaler in (fused_optim.GradScaler("cpu", init_scale=2.0**12), torch.amp.GradScaler("cpu", init_scale=2.0**12)):
        torch.manual_seed(7)
        if case == "sparse":
            model = torch.nn.Embedding(10, 3, sparse=True)
            opt = fused_optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        else:  # torch's differentiable update writes the params in place with grad mode on: they take no grad
            model = torch.nn.Linear(5, 3).requires_grad_(False)
            opt = fused_optim.AdamW(model.parameters(), lr=0.01, differentiable=True)
        scales = []
        for step in range(4):
            if case == "sparse":
                scaler.scale(model(torch.randint(0, 10, (4,))).square().sum()).backward()
            else:
                for p in model.parameters():
                    p.grad = scaler.scale(torch.randn_like(p))
            if step == 1:
                model.weight.grad.mul_(float("inf"))
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
            scales.append(float(scaler.get_scale()))
        runs.append((scales, model.weight.detach().clone()))
    (our_scales, our_weight), (their_scales, their_weight) = runs
    assert our_scales == their_scales == [2.0**12, 2.0**11, 2.0**11, 2.0**11]
    assert torch.equal(our_weight, their_weight)

@pytest.mark.parametrize("clip", [None, 0.5], ids=["no-clip", "clip"])
def test_torch_scaler_drives_fused_adamw(cpu_backend, clip):
    ours, theirs = twin_models()
    # fused=True: torch's GradScaler hands the step its scale and inf flag, as it does torch's fused optimizers
    opt = fused_optim.AdamW(ours.parameters(), lr=0.01, max_grad_norm=clip, fused=True, backend=cpu_backend)
    torch_opt = torch.optim.AdamW(theirs.parameters(), lr=0.01)
    torch.manual_seed(4)
    our_scales, _, _ = scaled_run(ours, opt, make_scaler())
    torch.manual_seed(4)
    their_scales, _, _ = scaled_run(theirs, torch_opt, make_scaler(), torch_clip=clip)
    assert our_scales == their_scales
    for p, q in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(p, q, **CLOSE)
    assert float(opt.skipped_steps) == len(INF_STEPS)


def test_fused_scaler_state_dict_is_torchs():
    ours, theirs = twin_models()
    scaler, torch_scaler = make_scaler(fused_optim.amp.GradScaler), make_scaler()
    torch.manual_seed(5)
    scaled_run(ours, fused_optim.AdamW(ours.parameters(), backend="torch"), scaler, steps=3)
    torch.manual_seed(5)
    scaled_run(theirs, torch.optim.AdamW(theirs.parameters()), torch_scaler, steps=3)
    assert scaler.state_dict() == torch_scaler.state_dict()
    torch_scaler.load_state_dict(scaler.state_dict())
    assert torch_scaler.get_scale() == scaler.get_scale()


def accumulated_fp16_step(model, opt, scaler, *, inf: bool) -> None:
    """One scaled step of an fp16 model through GradAccumulator: the grads are main grads only (p.grad is None)."""
    acc = fused_optim.GradAccumulator(model.parameters(), backend=opt.backend)
    scaler.scale(model(torch.randn(5, 4).half()).float().square().sum()).backward()
    acc.accumulate()
    if inf:
        acc.main_grads[0][0, 0] = float("inf")
    acc.finalize(num_tokens=5)
    scaler.step(opt)
    scaler.update()


def test_fused_scaler_checks_main_grads(cpu_backend):
    model = torch.nn.Linear(4, 3).half()
    opt = fused_optim.AdamW(model.parameters(), lr=0.01, backend=cpu_backend)
    scaler = make_scaler(fused_optim.amp.GradScaler)
    accumulated_fp16_step(model, opt, scaler, inf=False)
    before = snapshot(list(model.parameters()), opt)
    accumulated_fp16_step(model, opt, scaler, inf=True)
    assert_bit_identical(before, snapshot(list(model.parameters()), opt))
    assert float(opt.skipped_steps) == 1 and scaler.get_scale() == 2.0**11


def test_torch_scaler_with_only_main_grads_says_so(cpu_backend):
    # torch's scaler checks .grad only: with none, it has nothing to check and nothing to back off from (without
    # fused=True its own unscale_ finds nothing either, and says "No inf checks were recorded")
    model = torch.nn.Linear(4, 3).half()
    opt = fused_optim.AdamW(model.parameters(), lr=0.01, fused=True, backend=cpu_backend)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="use fused_optim.GradScaler"):
        accumulated_fp16_step(model, opt, make_scaler(), inf=False)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    for state in opt.state.values():  # at most created, as a first step creates it: nothing taken
        assert float(state["step"]) == 0 and not state["exp_avg"].any() and not state["exp_avg_sq"].any()
    assert float(opt.skipped_steps) == 0


def test_our_scaler_after_unscale_with_only_main_grads_says_so(cpu_backend):
    # the user's unscale_ takes torch's path, which finds no .grad either: the refusal names what to do instead
    model = torch.nn.Linear(4, 3).bfloat16()
    opt = fused_optim.AdamW(model.parameters(), lr=0.01, backend=cpu_backend)
    accumulator = fused_optim.GradAccumulator(model.parameters(), backend=cpu_backend)
    scaler = make_scaler(fused_optim.amp.GradScaler)
    scaler.scale(model(torch.randn(2, 4).bfloat16()).float().sum()).backward()
    accumulator.accumulate()
    accumulator.finalize(num_tokens=2)
    scaler.unscale_(opt)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="use fused_optim.GradScaler without unscale_"):
        scaler.step(opt)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_torch_scaler_with_mixed_grads_still_skips_an_inf_main_grad(cpu_backend):
    # torch's scaler checks the fp32 param's .grad (finite) but not the bf16 param's main grad (inf): the step
    # checks that one itself and skips, rather than writing inf into the bf16 param
    fp32_param = torch.nn.Parameter(torch.randn(10))
    bf16_param = torch.nn.Parameter(torch.randn(10).bfloat16())
    accumulator = fused_optim.GradAccumulator([fp32_param, bf16_param], backend=cpu_backend)
    opt = fused_optim.AdamW([fp32_param, bf16_param], lr=0.1, fused=True, backend=cpu_backend)
    scaler = make_scaler()
    scaler.scale(fp32_param.sum() + bf16_param.float().sum()).backward()
    accumulator.accumulate()
    accumulator.finalize()
    bf16_param.main_grad[3] = float("inf")
    before = [fp32_param.detach().clone(), bf16_param.detach().clone()]
    scaler.step(opt)
    scaler.update()
    assert torch.equal(fp32_param, before[0]) and torch.equal(bf16_param, before[1])
    assert float(opt.skipped_steps) == 1


def mixed_accumulated_params(cpu_backend, scaler, opt_kwargs):
    """An fp32 param (its main grad is its .grad) and a bf16 one (a main grad only), one scaled backward,
    accumulated and finalized; returns the params and the optimizer, not yet stepped."""
    torch.manual_seed(0)
    fp32_param = torch.nn.Parameter(torch.randn(10))
    bf16_param = torch.nn.Parameter(torch.randn(10).bfloat16())
    accumulator = fused_optim.GradAccumulator([fp32_param, bf16_param], backend=cpu_backend)
    opt = fused_optim.SGD([fp32_param, bf16_param], lr=0.1, backend=cpu_backend, **opt_kwargs)
    scaler.scale(fp32_param.square().sum() + bf16_param.float().square().sum()).backward()
    accumulator.accumulate()
    accumulator.finalize(num_tokens=5)
    return [fp32_param, bf16_param], opt


@pytest.mark.parametrize("fused", [False, True], ids=["not-fused", "fused"])
def test_torch_scaler_with_mixed_grads_unscales_the_main_grads_too(cpu_backend, fused):
    # torch's scaler divides only .grad; the bf16 param's main grad is unscaled by the step, as without a scaler
    results = []
    for scaler in (make_scaler(), torch.amp.GradScaler("cpu", enabled=False)):
        params, opt = mixed_accumulated_params(cpu_backend, scaler, dict(fused=fused))
        scaler.step(opt)
        results.append([p.detach().clone() for p in params])
    assert_bit_identical(*results)


def test_torch_scalers_unscale_leaving_main_grads_scaled_is_refused(cpu_backend):
    scaler = make_scaler()
    params, opt = mixed_accumulated_params(cpu_backend, scaler, {})
    scaler.unscale_(opt)
    before = [p.detach().clone() for p in params]
    with pytest.raises(RuntimeError, match="unscaled only the .grad of SGD's params, not their GradAccumulator main"):
        scaler.step(opt)
    assert_bit_identical(before, [p.detach() for p in params])


def test_warmup_cosine_waits_for_the_skipped_steps(cpu_backend):
    model = torch.nn.Linear(5, 3)
    opt = fused_optim.AdamW(model.parameters(), lr=0.1, max_grad_norm=1.0, backend=cpu_backend)
    scheduler = WarmupCosine(opt, warmup_steps=2, total_steps=6, min_lr_ratio=0.1)
    _, lrs, _ = scaled_run(model, opt, make_scaler(fused_optim.amp.GradScaler), scheduler=scheduler)
    # the same schedule advanced only by the steps that were taken
    plain = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    plain_scheduler = WarmupCosine(plain, warmup_steps=2, total_steps=6, min_lr_ratio=0.1)
    expected = []
    for step in range(len(lrs)):
        expected.append(plain.param_groups[0]["lr"])
        if step not in INF_STEPS:
            plain.step()
            plain_scheduler.step()
    assert lrs == pytest.approx(expected, rel=1e-12)
    assert lrs[1] == lrs[2] and lrs[4] == lrs[5] == lrs[6]  # stood still over each skip


# fp64 and complex params: torch's own update steps them (fp64), or the kernels their real views (complex64); the
# global norm counts their grads in their own precision, a complex element by its modulus


def wide_params(dtype: torch.dtype) -> list[torch.nn.Parameter]:
    """An fp32 param beside one of `dtype` (the norm spans both), or that one alone."""
    return [torch.nn.Parameter(torch.randn(7, 5)), torch.nn.Parameter(torch.randn(3, 4, dtype=dtype))]


def wide_loss(params, step: int) -> torch.Tensor:
    """A loss whose grads are fresh random numbers of a size that changes a lot from step to step (some steps
    clip), with an inf in the last param's grad at step 2."""
    scale = [0.3, 5.0, float("inf"), 8.0, 0.5, 3.0][step]
    return sum((torch.view_as_real(p) if p.is_complex() else p).mul(torch.randn(p.shape + (2,) * p.is_complex())
                                                                     .to(p.real.dtype) * scale).sum()
               for p in params)


@pytest.mark.parametrize("scaler_cls", [None, torch.amp.GradScaler, fused_optim.amp.GradScaler],
                         ids=["no-scaler", "torch-scaler", "our-scaler"])
@pytest.mark.parametrize("alone", [False, True], ids=["beside-fp32", "alone"])
@pytest.mark.parametrize("name, dtype", [(name, dtype) for name in ("AdamW", "SGD", "Lion")
                                         for dtype in (torch.float64, torch.complex64)
                                         if not (name == "Lion" and dtype.is_complex)])  # Lion's params are real
def test_wide_params_with_clipping_are_clip_then_step(cpu_backend, name, dtype, alone, scaler_cls):
    # ours: max_grad_norm (under a scaler, or not); the twin: clip_grad_norm_ and a step where the norm is finite
    if scaler_cls is torch.amp.GradScaler and dtype.is_complex:
        pytest.skip("torch's GradScaler does not unscale complex grads (_amp_foreach_non_finite_check_and_unscale_)")
    cls = {"AdamW": fused_optim.AdamW, "SGD": fused_optim.SGD, "Lion": fused_optim.Lion}[name]
    kwargs = {"AdamW": dict(lr=0.01), "SGD": dict(lr=0.1, momentum=0.9), "Lion": dict(lr=0.01)}[name]
    ours = wide_params(dtype)[1 if alone else 0:]
    theirs = clone_params(ours)
    opt = cls(ours, max_grad_norm=1.0, backend=cpu_backend, **kwargs)
    twin = cls(theirs, backend=cpu_backend, **kwargs)
    scaler = make_scaler(scaler_cls) if scaler_cls is not None else None
    scales = []
    for step in range(6):
        torch.manual_seed(step)
        if scaler is None:
            wide_loss(ours, step).backward()
            opt.step()
        else:
            scaler.scale(wide_loss(ours, step)).backward()
            scaler.step(opt)
            scaler.update()
            scales.append(scaler.get_scale())
        torch.manual_seed(step)
        wide_loss(theirs, step).backward()
        if torch.isfinite(torch.nn.utils.clip_grad_norm_(theirs, 1.0)):
            twin.step()
        for optimizer in (opt, twin):
            optimizer.zero_grad()
        # the clip factor, folded into the grad scale, reaches fp64 params in fp64 (a rounding or two from torch's
        # fp64 multiply) and the kernels' params in fp32; beside fp32 grads the norm holds their fp32 part (ours an
        # ulp from torch's at times: SGD's fp64 steps follow it)
        for p, q in zip(ours, theirs):
            torch.testing.assert_close(p, q, **(dict(rtol=1e-13, atol=1e-13) if alone and p.dtype == torch.float64
                                                else CLOSE))
    assert scales in ([], [2.0**12, 2.0**13, 2.0**12, 2.0**12, 2.0**13, 2.0**13])  # backed off at the inf step
    # our step found the inf itself, but for torch's scaler, which finds it first and does not call our step
    assert float(opt.skipped_steps) == (scaler_cls is not torch.amp.GradScaler)
    assert opt.last_grad_norm.dtype == torch.float64
