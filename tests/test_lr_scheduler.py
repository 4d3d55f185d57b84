"""fused_optim.lr_scheduler.WarmupCosine against its closed form computed here in float64, alone and with torch's
schedulers, in both of its modes (float lr: chainable, host; tensor lr: closed form, on the device).

Schedules, and why: warmup 0 (the cosine starts at once), warmup == total (no cosine at all), a 1-step schedule,
odd lengths, min_lr_ratio 0 (the chainable form must fall back to the closed form once the factor is 0) and 1
(a constant after warmup). Every schedule runs past total_steps, where the lr must stay at the floor.

Skipped steps: most tests move an optimizer's skip counter themselves, to put skips exactly where they test them;
one runs fused_optim.AdamW under torch's GradScaler with an inf in a grad, the real path. The tensor-lr mode is
checked on the CPU for what a CUDA graph needs (no host read, the same device ops every step); the CUDA test
captures scheduler.step() in a graph. A scheduler stepped less often than the optimizer never moves back; a dict
kept in memory holds its position; a refused construction changes nothing; a group added later joins the schedule.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import warnings

import pytest
import torch
from torch.optim.lr_scheduler import ChainedScheduler, ExponentialLR, LinearLR, SequentialLR
from torch.utils._python_dispatch import TorchDispatchMode

import fused_optim
from fused_optim.lr_scheduler import WarmupCosine

SCHEDULES = [  # (warmup_steps, total_steps, min_lr_ratio)
    pytest.param(0, 10, 0.0, id="no-warmup"),
    pytest.param(5, 20, 0.1, id="warmup5-total20"),
    pytest.param(7, 13, 0.25, id="odd"),
    pytest.param(4, 4, 0.0, id="warmup-is-total"),
    pytest.param(1, 1, 0.5, id="one-step"),
    pytest.param(3, 9, 1.0, id="floor-1"),
]
BASE_LRS = (0.1, 3.0)  # two groups, so each must follow its own base lr


def factor(t: int, warmup: int, total: int, min_ratio: float) -> float:
    """The schedule's factor of the t-th optimizer step, in float64, straight from its definition."""
    if t < warmup:
        return (t + 1) / warmup
    if t >= total:
        return min_ratio
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * (t - warmup) / (total - warmup)))


def make_optimizer(lrs=BASE_LRS, *, tensor_lr=False, capturable=False, skipped_steps=False) -> torch.optim.Optimizer:
    """One group per lr, each with its own small param. Steps with no grads change nothing, which is all these tests
    need of an optimizer. `skipped_steps` gives torch's SGD fused_optim's skip counter, which the tests move
    themselves (fused_optim.AdamW, used for capturable=True, has its own)."""
    groups = [
        {"params": [torch.zeros(2, requires_grad=True)], "lr": torch.tensor(lr) if tensor_lr else lr}
        for lr in lrs
    ]
    if capturable:
        opt = fused_optim.AdamW(groups, capturable=True)
    else:
        opt = torch.optim.SGD(groups)
    if skipped_steps and not capturable:
        opt.skipped_steps = torch.zeros((), dtype=torch.float32)
    return opt


def lrs_of(opt) -> list[float]:
    return [float(group["lr"]) for group in opt.param_groups]


def run(opt, scheduler, steps: int, skip_at=()) -> list[list[float]]:
    """The lrs each of `steps` optimizer steps runs with; steps in `skip_at` count as skipped by the optimizer."""
    seen = []
    for i in range(steps):
        seen.append(lrs_of(opt))
        opt.step()
        if i in skip_at:
            opt.skipped_steps.add_(1)
        scheduler.step()
    return seen


def assert_lrs(seen, expected, rel=1e-12) -> None:
    assert len(seen) == len(expected)
    for i, (got, want) in enumerate(zip(seen, expected)):
        assert got == pytest.approx(want, rel=rel, abs=0), f"step {i}"


# ----------------------------------------------------------------------------------------------------------------
# the schedule


@pytest.mark.parametrize("warmup, total, min_ratio", SCHEDULES)
def test_schedule_matches_formula(warmup, total, min_ratio):
    opt = make_optimizer()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a plain loop raises none of torch's order warnings
        scheduler = WarmupCosine(opt, warmup, total, min_ratio)
        seen = run(opt, scheduler, total + 5)
    expected = [[base * factor(t, warmup, total, min_ratio) for base in BASE_LRS] for t in range(total + 5)]
    assert_lrs(seen, expected)
    assert scheduler.get_last_lr() == lrs_of(opt)
    assert all(lr > 0 for lr in seen[0])  # the first step always moves the weights
    assert scheduler.base_lrs == list(BASE_LRS)


def test_end_points():
    # exact values at the joints: the peak right after warmup, half way down the cosine, the floor
    opt = make_optimizer([1.0])
    seen = [lr for (lr,) in run(opt, WarmupCosine(opt, 4, 14, min_lr_ratio=0.2), 16)]
    assert seen[:5] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert seen[9] == pytest.approx(0.6, rel=1e-15)
    assert seen[14:] == [0.2, 0.2]


@pytest.mark.parametrize("saved_tensor_lr, tensor_lr", [(False, False), (True, True), (False, True), (True, False)],
                         ids=["float-lr", "tensor-lr", "float-lr-resumed-with-tensor", "tensor-lr-resumed-with-float"])
def test_state_dict_resume_continues_identically(saved_tensor_lr, tensor_lr):
    # skips before and after the checkpoint; the resumed optimizer counts its skips from 0 again, as a resumed
    # fused_optim optimizer does (skipped_steps is not part of its state_dict). A run saved with tensor lrs keeps
    # its position on the device alone; one resumed with float lrs takes it from there.
    warmup, total, min_ratio, split = 5, 20, 0.1, 8
    opt = make_optimizer(tensor_lr=tensor_lr, skipped_steps=True)
    scheduler = WarmupCosine(opt, warmup, total, min_ratio)
    straight = run(opt, scheduler, 25, skip_at={2, 11})

    opt = make_optimizer(tensor_lr=saved_tensor_lr, skipped_steps=True)
    scheduler = WarmupCosine(opt, warmup, total, min_ratio)
    first = run(opt, scheduler, split, skip_at={2})
    buffer = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "sched": scheduler.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    resumed_opt = make_optimizer(tensor_lr=tensor_lr, skipped_steps=True)
    resumed = WarmupCosine(resumed_opt, warmup, total, min_ratio)
    resumed_opt.load_state_dict(saved["opt"])
    for group in resumed_opt.param_groups:  # the resumed run's kind of lr, at the saved value
        group["lr"] = torch.tensor(float(group["lr"])) if tensor_lr else float(group["lr"])
    position = resumed._device_position
    resumed.load_state_dict(saved["sched"])
    if tensor_lr and saved_tensor_lr:  # copied into, not replaced: a captured scheduler.step() keeps its tensors
        assert resumed._device_position is position
    rest = run(resumed_opt, resumed, 25 - split, skip_at={11 - split})
    if saved_tensor_lr == tensor_lr:
        assert first + rest == straight
    else:  # the first steps ran with the other kind of lr: fp32 tensors against float64 numbers
        assert_lrs(first + rest, straight, rel=1e-6)


def test_state_dict_holds_no_optimizer():
    opt = make_optimizer()
    state = WarmupCosine(opt, 2, 10).state_dict()
    assert "optimizer" not in state
    assert (state["warmup_steps"], state["total_steps"], state["min_lr_ratio"]) == (2, 10, 0.0)


# ----------------------------------------------------------------------------------------------------------------
# with torch's schedulers (float lrs)


@pytest.mark.parametrize("min_ratio", [0.0, 0.3])
@pytest.mark.parametrize("first", ["warmup-cosine", "exponential"])
def test_chained_with_exponential_gives_the_product(first, min_ratio):
    warmup, total, gamma = 3, 12, 0.9
    opt = make_optimizer()
    ours = WarmupCosine(opt, warmup, total, min_ratio)
    exponential = ExponentialLR(opt, gamma=gamma)
    chained = ChainedScheduler([ours, exponential] if first == "warmup-cosine" else [exponential, ours])
    seen = run(opt, chained, total + 4)
    expected = [
        [base * factor(t, warmup, total, min_ratio) * gamma**t for base in BASE_LRS] for t in range(total + 4)
    ]
    if min_ratio == 0.0:  # past the end the factor is 0, and the closed form takes over: 0 either way
        assert all(lrs == [0.0, 0.0] for lrs in seen[total:])
    assert_lrs(seen, expected)


def test_sequential_after_linear():
    # LinearLR for 4 steps, then the warmup-cosine starting from its own step 0
    warmup, total, min_ratio, milestone = 2, 10, 0.1, 4
    opt = make_optimizer()
    linear = LinearLR(opt, start_factor=0.25, total_iters=4)
    ours = WarmupCosine(opt, warmup, total, min_ratio)
    sequential = SequentialLR(opt, [linear, ours], milestones=[milestone])
    seen = run(opt, sequential, milestone + total + 2)
    expected = [
        [base * (0.25 + 0.75 * t / 4) if t < milestone else base * factor(t - milestone, warmup, total, min_ratio)
         for base in BASE_LRS]
        for t in range(milestone + total + 2)
    ]
    assert_lrs(seen, expected)


def test_sequential_before_exponential():
    warmup, total, min_ratio, gamma = 3, 8, 0.5, 0.8
    opt = make_optimizer()
    ours = WarmupCosine(opt, warmup, total, min_ratio)
    exponential = ExponentialLR(opt, gamma=gamma)
    sequential = SequentialLR(opt, [ours, exponential], milestones=[total])
    seen = run(opt, sequential, total + 5)
    expected = [
        [base * factor(t, warmup, total, min_ratio) if t < total else base * gamma ** (t - total) for base in BASE_LRS]
        for t in range(total + 5)
    ]
    assert_lrs(seen, expected)


def test_closed_form_jump():
    # step(epoch) (deprecated in torch, still what older SequentialLR calls) jumps there in the closed form
    opt = make_optimizer()
    scheduler = WarmupCosine(opt, 3, 10, 0.1)
    run(opt, scheduler, 2)
    with pytest.warns(UserWarning):  # torch's deprecation of the epoch argument
        scheduler.step(7)
    assert_lrs([lrs_of(opt)], [[base * factor(7, 3, 10, 0.1) for base in BASE_LRS]])
    assert scheduler._get_closed_form_lr() == pytest.approx(lrs_of(opt), rel=1e-15)
    assert_lrs(run(opt, scheduler, 3), [[base * factor(t, 3, 10, 0.1) for base in BASE_LRS] for t in (7, 8, 9)])


# ----------------------------------------------------------------------------------------------------------------
# tensor lr: computed on the device


@pytest.mark.parametrize("warmup, total, min_ratio", SCHEDULES)
@pytest.mark.parametrize("mode", ["tensor-lr", "capturable"])
def test_tensor_lr_matches_float_lr(mode, warmup, total, min_ratio):
    float_opt = make_optimizer(skipped_steps=True)
    float_seen = run(float_opt, WarmupCosine(float_opt, warmup, total, min_ratio), total + 5, skip_at={0, 3})

    opt = make_optimizer(tensor_lr=mode == "tensor-lr", capturable=mode == "capturable", skipped_steps=True)
    scheduler = WarmupCosine(opt, warmup, total, min_ratio)
    lr_tensors = [group["lr"] for group in opt.param_groups]
    assert all(isinstance(lr, torch.Tensor) and lr.dtype == torch.float32 and lr.dim() == 0 for lr in lr_tensors)
    seen = run(opt, scheduler, total + 5, skip_at={0, 3})
    assert [group["lr"] for group in opt.param_groups] == lr_tensors  # the same objects: updated in place
    # fp32 lrs: one rounding of the float64 value (and of the base lr, held in fp32 too)
    assert_lrs(seen, float_seen, rel=2**-23)
    last = scheduler.get_last_lr()
    assert all(isinstance(lr, torch.Tensor) for lr in last)
    assert all(lr is not group["lr"] for lr, group in zip(last, opt.param_groups))


def test_mixed_float_and_tensor_groups():
    opt = make_optimizer()
    opt.param_groups[1]["lr"] = torch.tensor(BASE_LRS[1])
    seen = run(opt, WarmupCosine(opt, 2, 6, 0.1), 8)
    assert isinstance(opt.param_groups[0]["lr"], float) and isinstance(opt.param_groups[1]["lr"], torch.Tensor)
    assert_lrs(seen, [[base * factor(t, 2, 6, 0.1) for base in BASE_LRS] for t in range(8)], rel=2**-23)


@contextlib.contextmanager
def no_host_reads(monkeypatch):
    """Any read of a tensor's value on the host raises."""
    def refuse(*args, **kwargs):
        raise AssertionError("a tensor was read on the host")

    with monkeypatch.context() as patch:
        for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
            patch.setattr(torch.Tensor, name, refuse)
        yield


def test_tensor_lr_never_reads_the_host(monkeypatch):
    opt = make_optimizer(tensor_lr=True, skipped_steps=True)
    with no_host_reads(monkeypatch):
        scheduler = WarmupCosine(opt, 3, 10, 0.1)
        for i in range(12):
            opt.step()
            if i == 4:
                opt.skipped_steps.add_(1)
            scheduler.step()
        scheduler.load_state_dict(scheduler.state_dict())
        scheduler.step()
    # the float mode, with a skip counter, must read it: the patch does catch that
    float_opt = make_optimizer(skipped_steps=True)
    with no_host_reads(monkeypatch), pytest.raises(AssertionError, match="read on the host"):
        WarmupCosine(float_opt, 3, 10, 0.1)


def test_float_lr_reads_nothing_until_the_optimizer_can_skip(monkeypatch):
    """fused_optim's optimizers say when a step could have been skipped (a step with max_grad_norm or a GradScaler
    checked its grads): until then the float mode reads nothing from the device; from then on it reads the count."""
    model = torch.nn.Linear(4, 3)
    opt = fused_optim.AdamW(model.parameters(), lr=0.01)
    with no_host_reads(monkeypatch):
        scheduler = WarmupCosine(opt, 3, 10, 0.1)
        for _ in range(5):
            model(torch.randn(2, 4)).sum().backward()
            opt.step()
            scheduler.step()
    assert not opt.may_have_skipped and scheduler.last_epoch == 5
    opt.max_grad_norm = 1.0
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    assert opt.may_have_skipped
    with no_host_reads(monkeypatch), pytest.raises(AssertionError, match="read on the host"):
        scheduler.step()


class OpRecorder(TorchDispatchMode):
    """Each aten op with its non-tensor arguments, in order."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        constants = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if not isinstance(a, torch.Tensor)]
        self.ops.append((func, tuple(map(repr, constants))))
        return func(*args, **kwargs)


@pytest.mark.parametrize("mode", ["tensor-lr", "capturable"])
def test_tensor_lr_step_runs_the_same_device_ops_every_step(mode):
    # What a CUDA graph of scheduler.step() needs: the same ops with the same constants every step (no per-step
    # Python value baked in), and no value brought to the host (aten._local_scalar_dense is .item()'s op).
    opt = make_optimizer(tensor_lr=mode == "tensor-lr", capturable=mode == "capturable", skipped_steps=True)
    scheduler = WarmupCosine(opt, 3, 10, 0.1)
    records = []
    for i in range(14):  # through warmup, cosine and floor, with a skip
        opt.step()
        if i == 5:
            opt.skipped_steps.add_(1)
        with OpRecorder() as recorder:
            scheduler.step()
        records.append(recorder.ops)
    assert records[0], "no device ops recorded"
    assert all(ops == records[0] for ops in records)
    assert torch.ops.aten._local_scalar_dense.default not in {func for func, _ in records[0]}
    # and the recorder does see a host read where there is one
    float_opt = make_optimizer(skipped_steps=True)
    float_scheduler = WarmupCosine(float_opt, 3, 10, 0.1)
    float_opt.step()
    with OpRecorder() as recorder:
        float_scheduler.step()
    assert torch.ops.aten._local_scalar_dense.default in {func for func, _ in recorder.ops}


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["tensor-lr", "capturable"])
def test_scheduler_step_captured_in_a_cuda_graph(mode):
    warmup, total, min_ratio = 3, 10, 0.1
    params = [torch.zeros(4, device="cuda", requires_grad=True)]
    if mode == "tensor-lr":
        opt = torch.optim.SGD(params, lr=torch.tensor(0.5, device="cuda"))
    else:  # the scheduler puts the float lr on the params' device
        opt = torch.optim.AdamW(params, lr=0.5, capturable=True)
    opt.skipped_steps = torch.zeros((), dtype=torch.float32, device="cuda")
    scheduler = WarmupCosine(opt, warmup, total, min_ratio)
    lr = opt.param_groups[0]["lr"]
    assert lr.device.type == "cuda"
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up off the default stream, as torch.cuda.graphs asks
        scheduler.step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        scheduler.step()
    t = 1  # the capture recorded the kernels without running them
    for replay in range(total + 2):
        if replay == 4:  # the optimizer skipped this step
            opt.skipped_steps.add_(1)
        else:
            t += 1
        graph.replay()
        torch.cuda.synchronize()
        assert float(lr) == pytest.approx(0.5 * factor(t, warmup, total, min_ratio), rel=2**-23), f"replay {replay}"
    assert opt.param_groups[0]["lr"] is lr


# ----------------------------------------------------------------------------------------------------------------
# skipped steps


@pytest.mark.parametrize("tensor_lr", [False, True], ids=["float-lr", "tensor-lr"])
def test_skipped_steps_do_not_advance_the_schedule(tensor_lr):
    warmup, total, min_ratio = 4, 12, 0.1
    skip_at = {0, 1, 6}  # GradScaler's first steps are the usual skips
    opt = make_optimizer(tensor_lr=tensor_lr, skipped_steps=True)
    seen = run(opt, WarmupCosine(opt, warmup, total, min_ratio), 18, skip_at=skip_at)
    positions, t = [], 0
    for i in range(18):
        positions.append(t)
        t += i not in skip_at
    assert positions[:4] == [0, 0, 0, 1]
    expected = [[base * factor(t, warmup, total, min_ratio) for base in BASE_LRS] for t in positions]
    assert_lrs(seen, expected, rel=2**-23 if tensor_lr else 1e-12)


def make_scaler() -> torch.amp.GradScaler:
    try:
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    except (RuntimeError, TypeError) as error:  # older torch: no CPU GradScaler
        pytest.skip(f"GradScaler('cpu') is not supported by this torch: {error}")
    if not scaler.is_enabled():
        pytest.skip("GradScaler('cpu') is disabled in this torch")
    return scaler


def train(model, opt, scaler, scheduler, steps: int, skip_at=()) -> tuple[list[float], list[bool]]:
    """A few real steps of fused_optim.AdamW under a GradScaler; an inf in a grad at the steps in `skip_at`. Returns
    the lr each step ran with and whether it changed the weights."""
    lrs, moved = [], []
    for i in range(steps):
        before = model.weight.detach().clone()
        lrs.append(float(opt.param_groups[0]["lr"]))
        loss = model(torch.randn(8, 4)).square().mean()
        scaler.scale(loss).backward()
        if i in skip_at:
            model.weight.grad[0, 1] = float("inf")
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        scheduler.step()
        moved.append(not torch.equal(before, model.weight))
    return lrs, moved


@pytest.mark.parametrize("tensor_lr", [False, True], ids=["float-lr", "tensor-lr"])
def test_gradscaler_skip_does_not_advance_the_schedule(tensor_lr):
    # The real thing: fused_optim.AdamW counts the steps GradScaler skips, the schedule waits for them; then the
    # same run resumed from a checkpoint in the middle (the resumed optimizer's skip count starts from 0).
    warmup, total, min_ratio, steps, split = 3, 10, 0.1, 14, 6
    skip_at = {0, 4, 9}
    base = 0.01

    def fresh(model):
        opt = fused_optim.AdamW(model.parameters(), lr=torch.tensor(base) if tensor_lr else base, fused=True)
        return opt, make_scaler(), WarmupCosine(opt, warmup, total, min_ratio)

    opt, scaler, scheduler = fresh(model := torch.nn.Linear(4, 3))
    lrs, moved = train(model, opt, scaler, scheduler, steps, skip_at)
    assert moved == [i not in skip_at for i in range(steps)]
    assert float(opt.skipped_steps) == len(skip_at)
    positions = [i - sum(j < i for j in skip_at) for i in range(steps)]
    assert positions[:6] == [0, 0, 1, 2, 3, 3]
    expected = [[base * factor(t, warmup, total, min_ratio)] for t in positions]
    assert_lrs([[lr] for lr in lrs], expected, rel=2**-23 if tensor_lr else 1e-12)

    opt, scaler, scheduler = fresh(model := torch.nn.Linear(4, 3))
    first, _ = train(model, opt, scaler, scheduler, split, skip_at)
    checkpoint = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(),
                                "scaler": scaler.state_dict(), "sched": scheduler.state_dict()})
    model.load_state_dict(checkpoint["model"])
    opt, scaler, scheduler = fresh(model)
    opt.load_state_dict(checkpoint["opt"])
    scaler.load_state_dict(checkpoint["scaler"])
    scheduler.load_state_dict(checkpoint["sched"])
    rest, _ = train(model, opt, scaler, scheduler, steps - split, {i - split for i in skip_at if i >= split})
    assert first + rest == lrs


def test_skips_before_the_scheduler_do_not_count():
    opt = make_optimizer(skipped_steps=True)
    opt.skipped_steps.add_(5)
    seen = run(opt, WarmupCosine(opt, 2, 6), 3)
    assert_lrs(seen, [[base * factor(t, 2, 6, 0.0) for base in BASE_LRS] for t in range(3)])


@pytest.mark.parametrize("tensor_lr", [False, True], ids=["float-lr", "tensor-lr"])
def test_a_scheduler_stepped_less_often_than_the_optimizer_never_goes_back(tensor_lr):
    """A scheduler not stepped after the steps its caller saw skipped (the scale fell), or stepped once for several
    optimizer steps, sees more skips than one: its position stays, never below 0 (the warmup's lr there is 0, and
    negative below)."""
    warmup, total = 4, 12
    opt = make_optimizer(tensor_lr=tensor_lr, skipped_steps=True)
    scheduler = WarmupCosine(opt, warmup, total)
    seen, positions, t = [], [], 0
    # (optimizer steps, of which skipped) between two scheduler steps
    for steps, skipped in [(5, 4), (1, 0), (3, 2), (1, 0), (1, 1), (2, 0)]:
        for _ in range(steps):
            opt.step()
        opt.skipped_steps.add_(skipped)
        scheduler.step()
        t += max(0, 1 - skipped)
        seen.append(lrs_of(opt))
        positions.append(t)
    assert positions == [0, 1, 1, 2, 2, 3]
    expected = [[base * factor(t, warmup, total, 0.0) for base in BASE_LRS] for t in positions]
    assert_lrs(seen, expected, rel=2**-23 if tensor_lr else 1e-12)


@pytest.mark.parametrize("tensor_lr", [False, True], ids=["float-lr", "tensor-lr"])
def test_a_state_dict_kept_in_memory_holds_its_position(tensor_lr):
    """A rollback: the dict taken at step 3 and loaded back after more steps puts the schedule back at step 3
    (the tensor mode's device counters were the live tensors, which the later steps moved)."""
    opt = make_optimizer(tensor_lr=tensor_lr, skipped_steps=True)
    scheduler = WarmupCosine(opt, 4, 12)
    run(opt, scheduler, 3, skip_at={1})
    saved = scheduler.state_dict()
    lrs_then = lrs_of(opt)
    after = run(opt, scheduler, 4, skip_at={2})
    scheduler.load_state_dict(saved)
    for group, lr in zip(opt.param_groups, lrs_then):  # the optimizer rolled back too
        group["lr"] = torch.tensor(lr) if tensor_lr else lr
    assert run(opt, scheduler, 4, skip_at={2}) == after


def test_a_scheduler_built_at_a_last_epoch_goes_on_from_there():
    """torch's older way to resume (a scheduler built with last_epoch=k over groups that hold their initial_lr):
    its first lr is the uninterrupted run's at k + 1, from the closed form, not the group's lr times a factor."""
    param = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([param], lr=1.0)
    scheduler = WarmupCosine(opt, warmup_steps=2, total_steps=10)
    lrs = []
    for _ in range(6):
        opt.step()
        scheduler.step()
        lrs.append(opt.param_groups[0]["lr"])
    resumed = torch.optim.SGD([param], lr=lrs[4])  # the lr at position 5, as a checkpoint of it holds
    resumed.param_groups[0]["initial_lr"] = 1.0
    WarmupCosine(resumed, warmup_steps=2, total_steps=10, last_epoch=5)
    assert resumed.param_groups[0]["lr"] == pytest.approx(lrs[5], rel=1e-12)


def test_a_refused_construction_leaves_capturable_lrs_as_they_were():
    """torch's own check (a scheduler built at last_epoch >= 0 needs each group's initial_lr) runs after the float
    lrs of capturable groups were made tensors: they are given back."""
    opt = make_optimizer(capturable=True)
    with pytest.raises(KeyError, match="initial_lr"):
        WarmupCosine(opt, 2, 10, last_epoch=3)
    lrs = [group["lr"] for group in opt.param_groups]
    assert all(type(lr) is float for lr in lrs) and lrs == list(BASE_LRS)


@pytest.mark.parametrize("tensor_lr", [False, True], ids=["float-lr", "tensor-lr"])
@pytest.mark.parametrize("added_tensor_lr", [False, True], ids=["added-float", "added-tensor"])
def test_a_group_added_later_joins_the_schedule(tensor_lr, added_tensor_lr):
    """add_param_group mid-run (layers unfrozen as training goes): from the next scheduler step the new group's lr
    is its lr when added times the schedule's factor, as if it had been there from the start (it was left at its
    lr); the first groups go on as before."""
    warmup, total, added_at, added_lr = 3, 10, 5, 0.5
    opt = make_optimizer(tensor_lr=tensor_lr, skipped_steps=True)
    scheduler = WarmupCosine(opt, warmup, total)
    seen = run(opt, scheduler, added_at, skip_at={1})
    opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)],
                         "lr": torch.tensor(added_lr) if added_tensor_lr else added_lr})
    seen += [lrs[:2] for lrs in run(opt, scheduler, 8, skip_at={2})]
    added = [lrs[2] for lrs in run(opt, scheduler, 1)]
    positions = [0, 1, 1, 2, 3, 4, 5, 6, 6, 7, 8, 9, 10]
    expected = [[base * factor(t, warmup, total, 0.0) for base in BASE_LRS] for t in positions]
    rel = 2**-23 if tensor_lr or added_tensor_lr else 1e-12
    assert_lrs(seen, expected, rel=rel)
    assert added[0] == pytest.approx(added_lr * factor(11, warmup, total, 0.0), rel=rel, abs=0)
    assert scheduler.base_lrs[2] == added_lr


# ----------------------------------------------------------------------------------------------------------------
# arguments


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(warmup_steps=-1, total_steps=10), "warmup_steps must be >= 0"),
        (dict(warmup_steps=11, total_steps=10), "total_steps must be >= 1 and >= warmup_steps"),
        (dict(warmup_steps=0, total_steps=0), "total_steps must be >= 1"),
        (dict(warmup_steps=2.0, total_steps=10), "warmup_steps must be an int"),
        (dict(warmup_steps=2, total_steps=10.5), "total_steps must be an int"),
        (dict(warmup_steps=True, total_steps=10), "warmup_steps must be an int"),
        (dict(warmup_steps=2, total_steps=10, min_lr_ratio=-0.1), r"min_lr_ratio must be in \[0, 1\]"),
        (dict(warmup_steps=2, total_steps=10, min_lr_ratio=1.5), r"min_lr_ratio must be in \[0, 1\]"),
        (dict(warmup_steps=2, total_steps=10, min_lr_ratio=float("nan")), r"min_lr_ratio must be in \[0, 1\]"),
        (dict(warmup_steps=2, total_steps=10, min_lr_ratio="0.1"), "min_lr_ratio must be a float"),
    ],
)
def test_bad_arguments(kwargs, message):
    opt = make_optimizer(capturable=True)
    before = [{key: value for key, value in group.items() if key != "params"} for group in opt.param_groups]
    with pytest.raises(ValueError, match=message):
        WarmupCosine(opt, **kwargs)
    # nothing set: no initial_lr, and the float lrs of a capturable optimizer are still floats
    assert [{key: value for key, value in group.items() if key != "params"} for group in opt.param_groups] == before


def test_not_an_optimizer():
    with pytest.raises(TypeError, match="is not an Optimizer"):
        WarmupCosine(object(), 2, 10)
