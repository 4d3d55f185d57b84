"""fused_optim.SGD against the float64 reference (fused_optim/reference.py) and against torch.optim.SGD
(foreach=False), on every backend that runs here.

Sizes, as in test_adam.py: 1 and 3 are all tail; 0 is an empty param (skipped without touching memory, but its
step count still advances); 1023 is one short of a Triton block; 4097 spans five blocks, the last holding one
element; (7, 13) is 2-D. They share one group, so the multi-tensor bookkeeping is exercised too.

The first step with momentum takes the gradient as the buffer, decided on the device from the step count; a
skipped step (found_inf) must leave everything bit-identical, and a skipped first step must leave the buffer unset.

The drop-in contract every optimizer shares (torch's errors, state dicts both ways, copies, torch.compile, CUDA
graphs) is tests/test_optimizer_contract.py.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from conftest import (BACKEND_DEVICES, CPU_BACKENDS, TORCH_FUSES_MULTIPLY_ADD, TRITON_INTERPRETED,
                      assert_signature_extends, fuses_multiply_add, master_weight)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_adam import (DTYPES, SHAPES, assert_at_least_as_accurate_as_peer, assert_identical, flat, make_params,
                       random_grads, resume_through_torch_save, set_grads, snapshot, store_rounded, ulp,
                       within_two_ulps)
from test_adam_moments import run as run_with_bf16_moments

import fused_optim
from fused_optim.int8_moments import quantize
from fused_optim.master_remainder import split_master
from fused_optim.multiply_add import fma
from fused_optim.ops.sgd import sgd_step
from fused_optim.reference import ReferenceSGD

# Each option on and off at least once, and all together; `lr_tensor` passes the lr as a one-element tensor.
OPTIONS = {
    "plain": dict(),
    "weight_decay": dict(weight_decay=0.1),
    "momentum": dict(momentum=0.9),
    "dampening": dict(momentum=0.9, dampening=0.3),
    "nesterov": dict(momentum=0.9, nesterov=True),
    "maximize-lr_tensor": dict(maximize=True, lr_tensor=True),
    "everything": dict(momentum=0.8, nesterov=True, weight_decay=0.05, maximize=True, lr_tensor=True),
    "everything-dampened": dict(momentum=0.8, dampening=0.5, weight_decay=0.05, maximize=True, lr_tensor=True),
}
REFERENCE_KEYS = ("momentum", "dampening", "weight_decay", "nesterov", "maximize")


def split_options(options: dict, lr: float):
    """(kwargs for both optimizers, a maker of the lr each optimizer gets, the lr the reference uses)."""
    kwargs = dict(options)
    lr_tensor = kwargs.pop("lr_tensor", False)
    make_lr = (lambda: torch.tensor(lr)) if lr_tensor else (lambda: lr)
    return kwargs, make_lr, float(torch.tensor(lr)) if lr_tensor else lr  # a tensor lr is read in fp32


# ----------------------------------------------------------------------------------------------------------------
# correctness: the float64 reference and torch at the same dtype


@pytest.mark.interpreted_cover(1)
@pytest.mark.parametrize("options", list(OPTIONS.values()), ids=list(OPTIONS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_matches_reference_at_least_as_well_as_torch(backend, device, dtype, options):
    check_against_reference_and_torch(backend, device, dtype, options, SHAPES)


def check_against_reference_and_torch(backend, device, dtype, options, shapes, steps=6, lr=1e-2) -> None:
    """`steps` steps of ours and torch's at `dtype` on params of `shapes`, each compared with the float64 reference:
    ours never worse than torch (shared with tests/test_fuzz.py)."""
    kwargs, make_lr, ref_lr = split_options(options, lr)
    init = [torch.randn(s) for s in shapes]
    ours, theirs = make_params(init, dtype, device), make_params(init, dtype, device)
    opt = fused_optim.SGD(ours, lr=make_lr(), backend=backend, **kwargs)
    torch_opt = torch.optim.SGD(theirs, lr=make_lr(), foreach=False, **kwargs)
    reference = ReferenceSGD(ours, lr=ref_lr, **kwargs)
    # The reference with its params rounded to the param dtype after every step: an optimizer whose only error is
    # storing the param in a low-precision dtype.
    rounded = ReferenceSGD(ours, lr=ref_lr, **kwargs)
    for _ in range(steps):
        grads = random_grads(shapes, dtype, device)
        for p in ours:
            p.grad = torch.full_like(p, math.nan)  # poison: replaced below, so a kernel reading stale grads shows
        set_grads(grads, ours, theirs)
        opt.step()
        torch_opt.step()
        reference.step(grads)
        rounded.step(grads)
        store_rounded(rounded, dtype)

    assert all(p.dtype == dtype and p.device.type == device for p in ours)
    assert torch.isfinite(flat(ours)).all()
    assert_at_least_as_accurate_as_peer(ours, theirs, reference, rounded, init, dtype, steps)
    if "momentum" in kwargs:
        for p in ours:
            state = opt.state[p]
            assert state["momentum_buffer"].dtype == torch.float32 and state["step"].item() == steps
    else:
        assert len(opt.state) == 0  # torch keeps no state without momentum, nor do we


@pytest.mark.parametrize("options", [dict(momentum=0.9, nesterov=True, weight_decay=1e-3),
                                     dict(momentum=0.9, dampening=0.3, weight_decay=1e-2, maximize=True)],
                         ids=["nesterov", "dampening"])
@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_fp32_matches_torch_sgd_after_50_steps(backend, device, options):
    """Each add(other, alpha=) of torch's for-loop SGD is one FMA where its CPU kernels are vectorised, and two
    roundings where not (ATEN_CPU_CAPABILITY=default, a CPU without AVX2), and so is each of ours (multiply_add.h):
    the same bits, step after step, where both round alike. (Not yet compared on a GPU: within 1e-6 there.)"""
    shapes = [(3,), (1023,), (1500,)]
    init = [torch.randn(s) for s in shapes]
    ours, theirs = make_params(init, torch.float32, device), make_params(init, torch.float32, device)
    opt = fused_optim.SGD(ours, lr=1e-2, backend=backend, **options)
    torch_opt = torch.optim.SGD(theirs, lr=1e-2, foreach=False, **options)
    for _ in range(50):
        set_grads(random_grads(shapes, device=device), ours, theirs)
        opt.step()
        torch_opt.step()
    buffers = [opt.state[p]["momentum_buffer"] for p in ours]
    torch_buffers = [torch_opt.state[q]["momentum_buffer"] for q in theirs]
    if device == "cpu" and fuses_multiply_add(backend) == TORCH_FUSES_MULTIPLY_ADD:
        assert_identical([p.detach() for p in ours], [q.detach() for q in theirs])
        assert_identical(buffers, torch_buffers)
    else:
        diff = (flat(ours) - flat(theirs)).abs().max().item()
        assert diff <= 1e-6 * flat(theirs).abs().max().item(), diff
        torch.testing.assert_close(buffers, torch_buffers, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("options", ["momentum", "dampening", "everything"])
@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_fp32_error_is_torchs_over_50_large_steps(backend, device, options):
    """At lr 0.1 the param update's rounding dominates the error: rounded twice (p - lr * buf, as before
    multiply_add.h) the mean error against float64 was 1.09-1.10x torch's one FMA, beyond the contract's 1.05x."""
    if fuses_multiply_add(backend) != TORCH_FUSES_MULTIPLY_ADD:
        pytest.skip("the baseline kernels round as torch's on a CPU without FMA (tests/test_cpu_isa.py runs them so)")
    check_against_reference_and_torch(backend, device, torch.float32, OPTIONS[options], [(1500,), (7, 13)], steps=50,
                                      lr=0.1)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES[:2], ids=["cpu", "torch"])
def test_cpu_chunk_boundaries(backend, device):
    """The CPU kernel cuts tensors into 16384-element chunks spread over threads: sizes around that."""
    shapes = [(16383,), (16385,), (40000,)]
    init = [torch.randn(s) for s in shapes]
    ours, theirs = make_params(init, torch.float32, device), make_params(init, torch.float32, device)
    opt = fused_optim.SGD(ours, lr=1e-2, momentum=0.9, backend=backend)
    torch_opt = torch.optim.SGD(theirs, lr=1e-2, momentum=0.9, foreach=False)
    step_both_and_compare(opt, torch_opt, ours, theirs, shapes, device)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_non_contiguous_param_and_grad_and_mixed_dtypes(backend, device):
    """A transposed (dense, non-contiguous) param with a grad of other strides, and fp32/bf16/fp16 params in one
    group (with an fp32 grad for the bf16 one), each as an optimizer of its own would step it."""
    base = torch.randn(33, 17)
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float32]
    together = [torch.nn.Parameter(base.to(device).t())] + make_params([torch.randn(n) for n in (300, 7, 20)],
                                                                          torch.float32, device)
    for i, d in enumerate(dtypes[1:], 1):
        together[i] = torch.nn.Parameter(together[i].detach().to(d))
    apart = [torch.nn.Parameter(p.detach().clone()) for p in together]
    assert not together[0].is_contiguous() and not apart[0].is_contiguous()
    opt = fused_optim.SGD(together, lr=1e-2, momentum=0.9, backend=backend)
    opts = [fused_optim.SGD([p], lr=1e-2, momentum=0.9, backend=backend) for p in apart]
    for _ in range(3):
        grads = [torch.randn(p.shape[::-1]).t() if i == 0 else torch.randn(p.shape) for i, p in enumerate(together)]
        for i, (p, q, g) in enumerate(zip(together, apart, grads)):
            if i == 1:  # an fp32 main grad of a bf16 param
                p.main_grad, q.main_grad = g.to(device), g.to(device)
            else:
                p.grad, q.grad = g.to(device=device, dtype=p.dtype).contiguous(), g.to(device, p.dtype).contiguous()
        opt.step()
        for o in opts:
            o.step()
    assert opt.state[together[0]]["momentum_buffer"].stride() == together[0].stride()
    for p, q in zip(together, apart):
        assert p.dtype == q.dtype and torch.equal(p, q)


# ----------------------------------------------------------------------------------------------------------------
# state_dict interchange with torch.optim.SGD, both ways, mid-run


def step_both_and_compare(opt, torch_opt, ours, theirs, shapes, device, steps=3, dtype=torch.float32) -> None:
    """Steps ours and torch's on the same grads: the params must stay together."""
    for _ in range(steps):
        set_grads(random_grads(shapes, dtype, device), ours, theirs)
        opt.step()
        torch_opt.step()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("backend, device", CPU_BACKENDS)
def test_low_precision_state_dict_interchange(backend, device, dtype):
    """torch keeps a bf16 param's buffer in bf16: loaded into ours it becomes fp32 (the same values); ours loads
    into torch as torch's loader casts it."""
    shapes = [(5,), (300,)]
    theirs = make_params([torch.randn(s) for s in shapes], dtype, device)
    torch_opt = torch.optim.SGD(theirs, lr=1e-2, momentum=0.9, foreach=False)
    set_grads(random_grads(shapes, dtype, device), theirs)
    torch_opt.step()
    ours = make_params([q.detach() for q in theirs], dtype, device)
    opt = fused_optim.SGD(ours, backend=backend)
    opt.load_state_dict(torch_opt.state_dict())
    for p, q in zip(ours, theirs):
        assert opt.state[p]["momentum_buffer"].dtype == torch.float32
        assert torch.equal(opt.state[p]["momentum_buffer"], torch_opt.state[q]["momentum_buffer"].float())
    set_grads(random_grads(shapes, dtype, device), ours)
    opt.step()
    back = torch.optim.SGD(make_params([p.detach() for p in ours], dtype, device), foreach=False)
    back.load_state_dict(opt.state_dict())
    for p, q in zip(ours, back.param_groups[0]["params"]):
        buffer = back.state[q]["momentum_buffer"]
        assert buffer.dtype == dtype and torch.equal(buffer, opt.state[p]["momentum_buffer"].to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_save_and_load_mid_run_continues_bit_exactly(backend, device, dtype):
    """torch.save of our state_dict mid-run, read back with map_location="cpu", loaded into a fresh optimizer over
    fresh params, continues exactly as the uninterrupted run (a bf16 param's buffer stays fp32). The fp32 buffers'
    counts, which say only that a buffer is set, are not saved (torch's SGD keeps none): they count on from 1."""
    shapes = [(3,), (1500,)]
    init = [torch.randn(s) for s in shapes]
    grads = [random_grads(shapes, dtype, device) for _ in range(6)]
    straight = make_params(init, dtype, device)
    straight_opt = fused_optim.SGD(straight, lr=1e-2, momentum=0.9, nesterov=True, backend=backend)
    for g in grads:
        set_grads(g, straight)
        straight_opt.step()
    first = make_params(init, dtype, device)
    first_opt = fused_optim.SGD(first, lr=1e-2, momentum=0.9, nesterov=True, backend=backend)
    for g in grads[:3]:
        set_grads(g, first)
        first_opt.step()
    buffer = io.BytesIO()
    torch.save(first_opt.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, map_location="cpu")
    assert all(set(state) == {"momentum_buffer"} for state in saved["state"].values())
    resumed = make_params([p.detach() for p in first], dtype, device)
    resumed_opt = fused_optim.SGD(resumed, lr=1.0, backend=backend)
    resumed_opt.load_state_dict(saved)
    for g in grads[3:]:
        set_grads(g, resumed)
        resumed_opt.step()
    for p, q in zip(resumed, straight):
        assert torch.equal(p, q)
        assert float(resumed_opt.state[p].pop("step")) == 4 and float(straight_opt.state[q].pop("step")) == 6
        assert_identical(resumed_opt.state[p], straight_opt.state[q])


# ----------------------------------------------------------------------------------------------------------------
# skipped steps: found_inf (GradScaler) and non-finite grads with max_grad_norm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_skipped_first_step_leaves_no_buffer(backend, device, dtype):
    """A first step skipped for found_inf changes nothing, bit for bit; the state_dict reads as torch's after no
    step (no buffer), and the next step is the first: it equals a fresh optimizer's first step."""
    shapes = [(3,), (0,), (1500,)]
    init = [torch.randn(s) for s in shapes]
    skipped, fresh = make_params(init, dtype, device), make_params(init, dtype, device)
    opt = fused_optim.SGD(skipped, lr=1e-2, momentum=0.9, backend=backend)
    fresh_opt = fused_optim.SGD(fresh, lr=1e-2, momentum=0.9, backend=backend)
    set_grads(random_grads(shapes, dtype, device), skipped)
    grads = [p.grad.clone() for p in skipped]
    before = [p.detach().clone() for p in skipped]
    opt.grad_scale = torch.tensor(1024.0, device=device)
    opt.found_inf = torch.tensor(1.0, device=device)
    opt.step()
    del opt.grad_scale, opt.found_inf
    for p, b, g in zip(skipped, before, grads):
        assert torch.equal(p, b) and torch.equal(p.grad, g)
        assert opt.state[p]["step"].item() == 0
    assert opt.state_dict()["state"] == {}  # as torch.optim.SGD's after no step
    assert all(float(state["step"]) == 0 for state in opt.state.values())  # buffers made, none set
    assert opt.skipped_steps.item() == 1
    for _ in range(3):
        set_grads(random_grads(shapes, dtype, device), skipped, fresh)
        opt.step()
        fresh_opt.step()
    for p, q in zip(skipped, fresh):
        assert torch.equal(p, q)
        assert_identical(opt.state[p], fresh_opt.state[q])


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_found_inf_mid_run_changes_nothing(backend, device):
    shapes = [(3,), (1500,)]
    params = make_params([torch.randn(s) for s in shapes], torch.float32, device)
    opt = fused_optim.SGD(params, lr=1e-2, momentum=0.9, weight_decay=0.1, backend=backend)
    set_grads(random_grads(shapes, device=device), params)
    opt.step()
    set_grads(random_grads(shapes, device=device), params)
    grads = [p.grad.clone() for p in params]
    before = snapshot(opt)
    opt.grad_scale = torch.tensor(1024.0, device=device)
    opt.found_inf = torch.tensor(2.0, device=device)  # any non-zero value skips (StepGuard may add to it)
    opt.step()
    assert_identical(snapshot(opt), before)
    assert all(torch.equal(p.grad, g) for p, g in zip(params, grads))


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_grad_scale_equals_unscaled_step(backend, device):
    shapes = [(3,), (1500,)]
    init = [torch.randn(s) for s in shapes]
    scaled, plain = make_params(init, torch.float32, device), make_params(init, torch.float32, device)
    scaled_opt = fused_optim.SGD(scaled, lr=1e-2, momentum=0.9, backend=backend)
    plain_opt = fused_optim.SGD(plain, lr=1e-2, momentum=0.9, backend=backend)
    for _ in range(3):
        grads = random_grads(shapes, device=device)
        set_grads(grads, plain)
        set_grads([g * 1024 for g in grads], scaled)
        scaled_opt.grad_scale = torch.tensor(1024.0, device=device)
        scaled_opt.found_inf = torch.tensor(0.0, device=device)
        scaled_opt.step()
        plain_opt.step()
    for p, q in zip(scaled, plain):
        assert torch.equal(p, q)  # a power of two: g * S / S is g exactly


@pytest.mark.parametrize("backend, device", CPU_BACKENDS)
def test_non_finite_grad_with_max_grad_norm_skips_the_first_step(backend, device):
    shapes = [(5,), (300,)]
    init = [torch.randn(s) for s in shapes]
    params, fresh = make_params(init, torch.float32, device), make_params(init, torch.float32, device)
    opt = fused_optim.SGD(params, lr=1e-2, momentum=0.9, max_grad_norm=1.0, backend=backend)
    fresh_opt = fused_optim.SGD(fresh, lr=1e-2, momentum=0.9, max_grad_norm=1.0, backend=backend)
    set_grads(random_grads(shapes, device=device), params)
    params[1].grad[7] = math.nan
    opt.step()
    assert all(torch.equal(p, x) for p, x in zip(params, init))
    assert opt.skipped_steps.item() == 1 and not torch.isfinite(opt.last_grad_norm)
    assert opt.state_dict()["state"] == {}
    assert all(float(state["step"]) == 0 for state in opt.state.values())  # buffers made, none set
    grads = random_grads(shapes, device=device)
    set_grads(grads, params, fresh)
    opt.step()
    fresh_opt.step()
    assert all(torch.equal(p, q) for p, q in zip(params, fresh))
    # and the clip itself: the step used grads scaled to norm 1
    reference = ReferenceSGD(init, lr=1e-2, momentum=0.9)
    norm = flat(grads).norm().item()
    reference.step(grads, grad_scale=max(1.0, (norm + 1e-6) / 1.0))
    assert opt.last_grad_norm.item() == pytest.approx(norm, rel=1e-6)
    torch.testing.assert_close(flat(params), flat(reference.params), rtol=1e-6, atol=1e-7)


def make_scaler(cls, **kwargs):
    try:
        scaler = cls("cpu", **kwargs)
    except (RuntimeError, ValueError, TypeError) as error:
        pytest.skip(f"GradScaler('cpu') is not supported by this torch: {error}")
    if not scaler.is_enabled():
        pytest.skip("GradScaler('cpu') is disabled in this torch")
    return scaler


@pytest.mark.parametrize("scaler_cls", [torch.amp.GradScaler, fused_optim.GradScaler], ids=["torch", "ours"])
@pytest.mark.parametrize("backend, device", CPU_BACKENDS)
def test_grad_scaler_end_to_end(backend, device, scaler_cls):
    """Both GradScalers against torch.optim.SGD under torch's: the first step overflows (a skipped first step: no
    buffer), a later one too; params, buffers and scales must agree throughout."""
    scaler = make_scaler(scaler_cls, init_scale=2.0**12, growth_interval=2)
    torch_scaler = make_scaler(torch.amp.GradScaler, init_scale=2.0**12, growth_interval=2)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    torch_model = copy.deepcopy(model)
    opt = fused_optim.SGD(model.parameters(), lr=1e-2, momentum=0.9, fused=True, backend=backend)
    torch_opt = torch.optim.SGD(torch_model.parameters(), lr=1e-2, momentum=0.9, foreach=False)
    for step in range(6):
        x = torch.randn(8, 16)
        if step in (0, 3):
            x[0, 0] = math.inf  # this step's grads overflow: both must skip it and back off the scale
        before = [p.detach().clone() for p in model.parameters()]
        for m, o, s in ((model, opt, scaler), (torch_model, torch_opt, torch_scaler)):
            o.zero_grad()
            s.scale(m(x).square().mean()).backward()
            s.step(o)
            s.update()
        if step in (0, 3):
            assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
        if step == 0:
            assert opt.state_dict()["state"] == torch_opt.state_dict()["state"] == {}
        assert scaler.get_scale() == torch_scaler.get_scale()
    assert opt.skipped_steps.item() == 2
    for p, q in zip(model.parameters(), torch_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], torch_opt.state[q]["momentum_buffer"],
                                   rtol=1e-5, atol=1e-6)
        assert opt.state[p]["step"].item() == 4.0


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_main_grad_is_preferred_to_grad(backend, device):
    """A bf16 param's fp32 main_grad (GradAccumulator) is what the step uses; its .grad is ignored."""
    param = make_params([torch.randn(100)], torch.bfloat16, device)[0]
    start = param.detach().float()
    main_grad = torch.randn(100, device=device)
    param.main_grad, param.grad = main_grad, torch.full((100,), math.nan, dtype=torch.bfloat16, device=device)
    fused_optim.SGD([param], lr=1e-2, momentum=0.9, backend=backend).step()
    # the first step with momentum: p - lr * g in fp32, rounded once to bf16
    assert torch.equal(param, (start - 1e-2 * main_grad).bfloat16())


# ----------------------------------------------------------------------------------------------------------------
# bad input: torch's error type and words where torch has them, and nothing changed


def test_differentiable_with_clipping_and_bad_max_grad_norm_are_rejected():
    with pytest.raises(ValueError, match="differentiable"):
        fused_optim.SGD([torch.nn.Parameter(torch.randn(3))], differentiable=True, max_grad_norm=1.0)
    with pytest.raises(ValueError, match="max_grad_norm"):
        fused_optim.SGD([torch.nn.Parameter(torch.randn(3))], max_grad_norm=0.0)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_max_grad_norm_with_sparse_grads_is_refused_and_changes_nothing(backend):
    """torch's own update, which steps sparse grads, has no clipping: refused in one sentence, nothing moved."""
    embedding = torch.nn.Embedding(10, 4, sparse=True)
    before = embedding.weight.detach().clone()
    opt = fused_optim.SGD(embedding.parameters(), lr=1.0, momentum=0.9, max_grad_norm=1e-3, backend=backend)
    (embedding(torch.tensor([1, 2])).sum() * 100).backward()
    with pytest.raises(RuntimeError, match=r"max_grad_norm=...\) does not take sparse gradients"):
        opt.step()
    assert torch.equal(embedding.weight.detach(), before) and not opt.state


FIRST_STEP_FAILURES = {  # backend, param dtype, grad maker
    "cuda-backend-on-cpu": ("cuda", torch.float32, lambda: torch.randn(3)),
    "grad-of-wrong-shape": ("auto", torch.float32, lambda: torch.randn(4)),
}


@pytest.mark.parametrize("failure", list(FIRST_STEP_FAILURES))
def test_failed_first_step_raises_one_sentence_and_leaves_no_state(failure):
    backend, dtype, make_grad = FIRST_STEP_FAILURES[failure]
    param = torch.nn.Parameter(torch.randn(3, dtype=dtype))
    before = param.detach().clone()
    opt = fused_optim.SGD([param], lr=0.1, momentum=0.9, backend=backend)
    if failure == "grad-of-wrong-shape":
        param.grad = None
        param.main_grad = make_grad()  # autograd would refuse a .grad of the wrong shape
    else:
        param.grad = make_grad()
    with pytest.raises((RuntimeError, TypeError, ValueError)) as error:
        opt.step()
    assert "\n" not in str(error.value).strip()
    assert torch.equal(param, before)
    assert opt.state_dict()["state"] == {}  # a buffer the failed step created is unset and left out
    assert all(float(state["step"]) == 0 for state in opt.state.values())  # buffers made, none set


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_op_refuses_bad_state_and_changes_nothing(backend, device):
    """The kernels read the step count through a raw pointer as fp32 and the buffer as fp32 in the param's layout:
    anything else is refused, not misread."""
    p, g = torch.randn(8, device=device), torch.randn(8, device=device)
    good_buffer, good_step = torch.randn(8, device=device), torch.ones((), device=device)
    cases = {
        "step-float64": ([good_buffer], [torch.ones((), dtype=torch.float64, device=device)], 0.9),
        "buffer-fp16": ([good_buffer.half()], [good_step], 0.9),  # fp32 or bf16 (moments="bf16") only
        "buffer-shape": ([torch.randn(9, device=device)], [good_step], 0.9),
        "missing-state": ([], [], 0.9),
        "state-without-momentum": ([good_buffer], [good_step], 0.0),
    }
    for name, (buffers, steps, momentum) in cases.items():
        before = [t.clone() for t in [p, *buffers, *steps]]
        with pytest.raises(RuntimeError, match="step|buffer"):
            sgd_step([p], [g], buffers, steps, lr=1e-3, momentum=momentum, dampening=0.0, weight_decay=0.0,
                     nesterov=False, maximize=False, backend=backend)
        assert all(torch.equal(a, b) for a, b in zip([p, *buffers, *steps], before)), name


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_op_refuses_stochastic_rounding_of_other_than_bf16_params(backend, device):
    """Stochastic rounding rounds an fp32 result to bf16: an fp32 param would be rounded to a bf16 value, silently."""
    p = torch.full((4,), 1.0 + 2**-20, device=device)  # no bf16 value
    with pytest.raises(RuntimeError, match="stochastic rounding is for bfloat16 params"):
        sgd_step([p], [torch.ones(4, device=device)], [], [torch.zeros((), device=device)], lr=1e-3, momentum=0.0,
                 dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False, stochastic_rounding=True, seed=1,
                 backend=backend)
    assert torch.equal(p, torch.full((4,), 1.0 + 2**-20, device=device))


def test_bad_state_dict_raises_and_changes_nothing():
    params = [torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(4))]
    opt = fused_optim.SGD(params, lr=1e-2, momentum=0.9)
    set_grads(random_grads([(3,), (4,)]), params)
    opt.step()
    wrong = copy.deepcopy(opt.state_dict())
    wrong["state"][1]["momentum_buffer"] = torch.zeros(5)
    before = snapshot(opt)
    with pytest.raises(ValueError, match="momentum_buffer.*shape"):
        opt.load_state_dict(wrong)
    assert_identical(snapshot(opt), before)


# ----------------------------------------------------------------------------------------------------------------
# the torch.optim API: signature, groups, frozen params, copies


def test_signature_extends_torchs():
    assert_signature_extends(fused_optim.SGD, torch.optim.SGD)
    extras = list(__import__("inspect").signature(fused_optim.SGD).parameters)[-4:]
    assert extras == ["max_grad_norm", "grad_norm_group", "gradient_release", "backend"]


@pytest.mark.parametrize("flag", ["foreach", "fused"])
def test_foreach_and_fused_are_accepted_and_change_nothing(flag):
    init = [torch.randn(50)]
    plain, flagged = make_params(init, torch.float32, "cpu"), make_params(init, torch.float32, "cpu")
    plain_opt = fused_optim.SGD(plain, lr=1e-2, momentum=0.9)
    flagged_opt = fused_optim.SGD(flagged, lr=1e-2, momentum=0.9, **{flag: True})
    assert flagged_opt.param_groups[0][flag] is True
    for _ in range(2):
        set_grads(random_grads([(50,)]), plain, flagged)
        plain_opt.step()
        flagged_opt.step()
    assert torch.equal(plain[0], flagged[0])


def test_state_dict_has_torchs_keys():
    init = [torch.randn(4), torch.randn(6)]
    ours, theirs = make_params(init, torch.float32, "cpu"), make_params(init, torch.float32, "cpu")
    opt = fused_optim.SGD(ours, lr=1e-2, momentum=0.9)
    torch_opt = torch.optim.SGD(theirs, lr=1e-2, momentum=0.9)
    set_grads(random_grads([(4,), (6,)]), ours, theirs)
    opt.step()
    torch_opt.step()
    ours_sd, torch_sd = opt.state_dict(), torch_opt.state_dict()
    # torch's groups key for key: our moments="fp32" (torch's storage) is left out, and a group without it loads
    # with the optimizer's own
    assert ours_sd["param_groups"] == torch_sd["param_groups"]
    bf16 = fused_optim.SGD(make_params(init, torch.float32, "cpu"), lr=1e-2, momentum=0.9, moments="bf16")
    assert bf16.state_dict()["param_groups"][0]["moments"] == "bf16"
    bf16.load_state_dict(ours_sd)
    assert bf16.param_groups[0]["moments"] == "bf16"
    assert bf16.state_dict()["state"][0]["momentum_buffer"].dtype == torch.bfloat16
    for i in range(2):  # the counts of fp32 buffers say only "set", and torch's SGD keeps none
        assert set(ours_sd["state"][i]) == set(torch_sd["state"][i]) == {"momentum_buffer"}
    masters = fused_optim.SGD(make_params(init, torch.bfloat16, "cpu"), lr=1e-2, momentum=0.9, master_weights=True)
    set_grads(random_grads([(4,), (6,)]), masters.param_groups[0]["params"])
    masters.step()
    saved = masters.state_dict()["state"]  # beside master remainders as well
    assert all(set(state) == {"momentum_buffer", "master_remainder"} for state in saved.values())
    complex_param = torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))  # stepped as its real view
    complex_opt = fused_optim.SGD([complex_param], lr=1e-2, momentum=0.9)
    complex_param.grad = torch.randn(3, dtype=torch.complex64)
    complex_opt.step()
    assert set(complex_opt.state_dict()["state"][0]) == {"momentum_buffer"}


def test_a_buffer_torch_saved_as_none_loads_as_unset():
    """torch's SGD may save a param's buffer as None (it loads and steps such a dict): ours loads it as no state,
    and steps as torch does."""
    init = [torch.randn(3)]
    for momentum in (0.0, 0.9):
        ours, theirs = make_params(init, torch.float32, "cpu"), make_params(init, torch.float32, "cpu")
        opt = fused_optim.SGD(ours, lr=0.1, momentum=momentum)
        torch_opt = torch.optim.SGD(theirs, lr=0.1, momentum=momentum)
        saved = {"state": {0: {"momentum_buffer": None}}, "param_groups": torch_opt.state_dict()["param_groups"]}
        opt.load_state_dict(saved)
        torch_opt.load_state_dict(saved)
        assert not opt.state
        for _ in range(2):
            set_grads(random_grads([(3,)]), ours, theirs)
            opt.step()
            torch_opt.step()
        torch.testing.assert_close(ours[0], theirs[0], rtol=1e-6, atol=1e-7)
        assert set(opt.state_dict()["state"].get(0, {})) == ({"momentum_buffer"} if momentum else set())


@pytest.mark.parametrize("moments", ["fp32", "bf16", "int8"])
def test_a_buffer_reset_to_none_by_hand_starts_again_from_the_grad(moments):
    """`opt.state[p]["momentum_buffer"] = None` (a hand-made momentum reset) is torch's unset buffer: the next step
    starts the buffer again from the grad, the state_dict between says None as torch's does, and it loads both ways."""
    init = [torch.randn(5), torch.randn(2, 3)]
    ours, theirs = make_params(init, torch.float32, "cpu"), make_params(init, torch.float32, "cpu")
    opt = fused_optim.SGD(ours, lr=0.1, momentum=0.9, nesterov=True, moments=moments)
    torch_opt = torch.optim.SGD(theirs, lr=0.1, momentum=0.9, nesterov=True)
    set_grads(random_grads([p.shape for p in init]), ours, theirs)
    opt.step()
    torch_opt.step()
    for state in (*opt.state.values(), *torch_opt.state.values()):
        state["momentum_buffer"] = None
    saved = opt.state_dict()
    assert [state for state in saved["state"].values()] == [{"momentum_buffer": None}] * 2
    assert opt.torch_state_dict()["state"] == saved["state"]
    torch.optim.SGD(make_params(init, torch.float32, "cpu"), lr=0.1, momentum=0.9).load_state_dict(saved)
    for _ in range(2):
        set_grads(random_grads([p.shape for p in init]), ours, theirs)
        opt.step()
        torch_opt.step()
    for p, q in zip(ours, theirs):  # bf16 and int8 buffers round, within their resolution
        torch.testing.assert_close(p, q, **({} if moments == "fp32" else dict(rtol=1e-2, atol=1e-2)))
        if moments == "fp32":
            torch.testing.assert_close(opt.state[p]["momentum_buffer"], torch_opt.state[q]["momentum_buffer"])


def test_a_buffer_saved_beside_a_count_of_0_is_set():
    """A saved momentum buffer is set whatever count beside it says (0 here: a hand-made or foreign dict), as
    torch's SGD takes any saved buffer: the next step is momentum * buffer + grad."""
    ours, theirs = (make_params([torch.zeros(4)], torch.float32, "cpu") for _ in range(2))
    opt = fused_optim.SGD(ours, lr=1.0, momentum=0.9)
    torch_opt = torch.optim.SGD(theirs, lr=1.0, momentum=0.9)
    groups = torch_opt.state_dict()["param_groups"]
    opt.load_state_dict({"state": {0: {"momentum_buffer": torch.full((4,), 10.0), "step": torch.tensor(0.0)}},
                         "param_groups": groups})
    torch_opt.load_state_dict({"state": {0: {"momentum_buffer": torch.full((4,), 10.0)}}, "param_groups": groups})
    set_grads([torch.ones(4)], ours, theirs)
    opt.step()
    torch_opt.step()
    assert torch.equal(opt.state[ours[0]]["momentum_buffer"], torch_opt.state[theirs[0]]["momentum_buffer"])
    assert torch.equal(ours[0], theirs[0])


def test_a_buffer_torchs_update_made_after_a_skipped_step_is_kept():
    """A skipped first step (an inf found) leaves no buffer; torch's own update (a sparse grad) then makes one,
    which is saved and which the next dense step keeps (0.9 * 1 + 1 = 1.9 on the sparse grad's row)."""
    param = torch.nn.Parameter(torch.zeros(3, 2))
    opt = fused_optim.SGD([param], lr=0.1, momentum=0.9)
    opt.grad_scale, opt.found_inf = torch.tensor(1.0), torch.tensor(1.0)  # as torch.amp.GradScaler sets them
    param.grad = torch.ones(3, 2)
    opt.step()
    del opt.grad_scale, opt.found_inf
    param.grad = torch.sparse_coo_tensor([[0]], torch.ones(1, 2), (3, 2))
    opt.step()
    assert "momentum_buffer" in opt.state_dict()["state"][0]
    param.grad = torch.ones(3, 2)
    opt.step()
    torch.testing.assert_close(opt.state[param]["momentum_buffer"][0], torch.full((2,), 1.9))


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_nesterov_groups_torch_steps_step_as_torchs(backend, device):
    """torch checks Nesterov's momentum and dampening against the constructor's defaults only: a group of its own
    with dampening, or a momentum a scheduler (OneCycleLR's cycle_momentum) has taken to 0 (a plain SGD step), steps
    there, and ours too."""
    init = [torch.randn(5), torch.randn(1023)]
    ours, theirs = make_params(init, torch.float32, device), make_params(init, torch.float32, device)
    opts = [cls([{"params": ours_or_theirs[:1]}, {"params": ours_or_theirs[1:], "dampening": 0.3}], lr=0.1,
                momentum=0.9, nesterov=True, **extra)
            for cls, ours_or_theirs, extra in ((fused_optim.SGD, ours, {"backend": backend}),
                                               (torch.optim.SGD, theirs, {}))]
    for momentum in (0.9, 0.0, 0.0, 0.5):
        set_grads(random_grads([(5,), (1023,)], device=device), ours, theirs)
        for opt in opts:
            opt.param_groups[0]["momentum"] = momentum
            opt.step()
        for p, q in zip(ours, theirs):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("options", [{"moments": "bf16"}, {"moments": "int8"},
                                     {"moments": "int8", "master_weights": 24}, {"stochastic_rounding": True}])
def test_a_count_that_keys_random_bits_is_saved_and_resumes_bit_for_bit(options):
    """Where the buffer or the param rounds with random bits, the step count keys them: state_dict keeps it, and a
    resumed run steps as the uninterrupted one, bit for bit. torch_state_dict, torch's form, keeps no count. (An fp32
    buffer's count, beside master remainders too, says only "set": test_save_and_load_mid_run_continues_bit_exactly.)"""
    shapes = [(5,), (3, 70)]
    init = [torch.randn(s) for s in shapes]
    grads = [random_grads(shapes) for _ in range(4)]
    ours, resumed = make_params(init, torch.bfloat16, "cpu"), make_params(init, torch.bfloat16, "cpu")
    opt = fused_optim.SGD(ours, lr=1e-1, momentum=0.9, **options)
    for step_grads in grads[:2]:
        set_grads(step_grads, ours)
        opt.step()
    saved = copy.deepcopy(opt.state_dict())  # its own tensors, as from a checkpoint
    assert all(float(state["step"]) == 2 for state in saved["state"].values())
    assert all("step" not in state for state in opt.torch_state_dict()["state"].values())
    for p, q in zip(resumed, ours):
        p.data.copy_(q.data)
    resumed_opt = fused_optim.SGD(resumed, lr=1e-1, momentum=0.9, **options)
    resumed_opt.load_state_dict(saved)
    for step_grads in grads[2:]:
        set_grads(step_grads, ours, resumed)
        opt.step()
        resumed_opt.step()
    assert all(torch.equal(p, q) for p, q in zip(ours, resumed))


@pytest.mark.parametrize("backend, device", CPU_BACKENDS)
def test_tensor_weight_decay_and_lr_scheduler_match_torch(backend, device):
    """torch takes weight_decay as a tensor too, and schedulers change the lr (a float, or a tensor in place)."""
    shapes = [(3,), (100,)]
    init = [torch.randn(s) for s in shapes]
    ours, theirs = make_params(init, torch.float32, device), make_params(init, torch.float32, device)
    opt = fused_optim.SGD(ours, lr=torch.tensor(1e-2), momentum=0.9, weight_decay=torch.tensor(0.1), backend=backend)
    torch_opt = torch.optim.SGD(theirs, lr=torch.tensor(1e-2), momentum=0.9, weight_decay=torch.tensor(0.1),
                                foreach=False)
    schedules = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5) for o in (opt, torch_opt)]
    for _ in range(5):
        set_grads(random_grads(shapes, device=device), ours, theirs)
        opt.step()
        torch_opt.step()
        for schedule in schedules:
            schedule.step()
    assert float(opt.param_groups[0]["lr"]) == float(torch_opt.param_groups[0]["lr"]) == float(torch.tensor(1e-2 / 4))
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend, device", CPU_BACKENDS)
def test_param_groups_frozen_params_and_momentum_switched_on(backend, device):
    """Groups with their own options, a param without a grad for two steps, and momentum switched on mid-run:
    torch starts the buffer at that step, as we must."""
    shapes = [(3,), (1023,), (5,)]
    init = [torch.randn(s) for s in shapes]

    def groups(params):
        return [{"params": params[:2], "lr": 1e-2},
                {"params": params[2:], "lr": 3e-2, "momentum": 0.5, "nesterov": True, "maximize": True}]

    ours, theirs = make_params(init, torch.float32, device), make_params(init, torch.float32, device)
    opt = fused_optim.SGD(groups(ours), backend=backend)
    torch_opt = torch.optim.SGD(groups(theirs), foreach=False)
    for step in range(5):
        if step == 2:
            opt.param_groups[0]["momentum"] = torch_opt.param_groups[0]["momentum"] = 0.9
        set_grads(random_grads(shapes, device=device), ours, theirs)
        if step < 2:
            ours[2].grad = theirs[2].grad = None
        opt.step()
        torch_opt.step()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)
    assert opt.state[ours[0]]["step"].item() == 3 and opt.state[ours[2]]["step"].item() == 3


# ----------------------------------------------------------------------------------------------------------------
# the ops: opcheck, torch.compile


def _op_sample(kind: str):
    """Arguments of one op call over two small tensors, in the schema's order."""
    dtype = {"bf16": torch.bfloat16, "bf16-master": torch.bfloat16, "bf16-master24": torch.bfloat16,
             "bf16-stochastic": torch.bfloat16, "fp16-master": torch.float16}.get(kind, torch.float32)
    shapes = [(3,), (2, 17)]
    params = [torch.randn(s).to(dtype) for s in shapes]
    grads = [torch.randn(s).to(dtype) for s in shapes]
    momentum = 0.0 if kind in ("no-momentum", "bf16-stochastic") else 0.9
    stochastic_rounding = kind == "bf16-stochastic"
    buffer_dtype = torch.bfloat16 if kind == "bf16-buffers" else torch.float32  # moments="bf16"
    buffers = [torch.randn(s).to(buffer_dtype) for s in shapes] if momentum else []
    # a first step and a later one (stochastic rounding keys its stream by the count, with momentum or without)
    steps = [torch.tensor(0.0), torch.tensor(3.0)] if momentum or stochastic_rounding else []
    masters = []
    if kind.endswith("master") or kind.endswith("master24"):  # remainders of bf16 params, fp32 copies of fp16 ones
        masters = [split_master(p.float() + 1e-3 * torch.randn(p.shape), 24 if kind.endswith("24") else 32)[1]
                   if dtype == torch.bfloat16 else p.float() for p in params]
    moment_scales = []
    if kind == "int8-buffers":  # moments="int8": codes and their block scales
        quantized = [quantize(b, True) for b in buffers]
        buffers, moment_scales = [codes for codes, _ in quantized], [scales[None] for _, scales in quantized]
    lr_tensor = torch.tensor(1e-2) if kind == "lr-tensor" else None
    grad_scale = torch.tensor(4.0) if kind in ("grad-scale", "found-inf") else None
    found_inf = torch.tensor(1.0 if kind == "found-inf" else 0.0) if grad_scale is not None else None
    return (params, grads, buffers, masters, steps, moment_scales, 1e-2, lr_tensor, momentum, 0.0, 0.01,
            kind == "lr-tensor", kind == "grad-scale", stochastic_rounding, 7, grad_scale, found_inf)


OPS = [
    pytest.param("sgd_step_", id="cpu"),
    pytest.param("sgd_step_torch_", id="torch"),
    pytest.param("sgd_step_triton_", id="triton-interpreted",
                 marks=pytest.mark.skipif(not TRITON_INTERPRETED, reason="Triton runs CPU tensors only interpreted")),
]


@pytest.mark.parametrize("kind", ["fp32", "bf16", "bf16-buffers", "int8-buffers", "no-momentum", "lr-tensor",
                                  "grad-scale", "found-inf", "bf16-master", "bf16-master24", "fp16-master",
                                  "bf16-stochastic"])
@pytest.mark.parametrize("op_name", OPS)
def test_opcheck(op_name, kind):
    torch.library.opcheck(getattr(torch.ops.fused_optim, op_name).default, _op_sample(kind))


@pytest.mark.parametrize("op_name", [p.values[0] for p in OPS[:2]])
def test_ops_agree_on_one_call(op_name):
    """The first-step rule and the skip, op by op: the same call on the same inputs gives the reference's result."""
    args = _op_sample("fp32")
    params, grads, buffers, masters, steps = [[t.clone() for t in a] for a in args[:5]]
    getattr(torch.ops.fused_optim, op_name).default(params, grads, buffers, masters, steps, *args[5:])
    for i, (p, g, b) in enumerate(zip(args[0], args[1], args[2])):
        d = g.double() + 0.01 * p.double()
        buffer = d if i == 0 else 0.9 * b.double() + d  # tensor 0 is at its first step: the buffer is the grad
        torch.testing.assert_close(buffers[i].double(), buffer, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(params[i].double(), p.double() - 1e-2 * buffer, rtol=1e-6, atol=1e-7)
    assert [s.item() for s in steps] == [1.0, 4.0]


def test_op_is_fake_tensor_traceable_on_meta():
    args = [[t.to("meta") for t in a] if isinstance(a, list) else a for a in _op_sample("fp32")]
    torch.ops.fused_optim.sgd_step_.default(*args)  # the fake impl: no error, no output


def test_torch_compile_fullgraph_functional_step_matches_eager():
    """The functional entry point alone compiles into one graph, with the op's in-place writes to params, buffers
    and step counts (a first step, then a later one) visible after the compiled call."""
    torch._dynamo.reset()
    shapes = [(3,), (100,)]
    init = [torch.randn(s) for s in shapes]

    def fresh():
        return [x.clone() for x in init], [torch.zeros(s) for s in shapes], [torch.zeros(()) for _ in shapes]

    def step(params, grads, buffers, steps, lr):
        sgd_step(params, grads, buffers, steps, lr=lr, momentum=0.9, dampening=0.1, weight_decay=0.01,
                 nesterov=False, maximize=False, backend="cpu")

    compiled_step = torch.compile(step, fullgraph=True)
    compiled, eager = fresh(), fresh()
    lr = torch.tensor(1e-2)
    for _ in range(2):
        grads = random_grads(shapes)
        compiled_step(compiled[0], grads, *compiled[1:], lr)
        step(eager[0], grads, *eager[1:], lr)
    for a, b in zip(compiled, eager):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert compiled[2][0].item() == 2.0


@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(
    sizes=st.lists(st.integers(0, 300), min_size=1, max_size=3),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    momentum=st.sampled_from([0.0, 0.5, 0.9]),
    dampening=st.sampled_from([0.0, 0.5]),
    nesterov=st.booleans(),
    weight_decay=st.sampled_from([0.0, 0.01, 0.3]),
    maximize=st.booleans(),
    lr=st.floats(1e-4, 1e-1),
    lr_tensor=st.booleans(),
    steps=st.integers(1, 4),
    backend=st.sampled_from(["cpu", "torch"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_configs_match_reference(sizes, dtype, momentum, dampening, nesterov, weight_decay, maximize, lr,
                                        lr_tensor, steps, backend, seed):
    nesterov = nesterov and momentum > 0 and dampening == 0  # the only valid Nesterov settings
    generator = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(n, generator=generator).to(dtype)) for n in sizes]
    options = dict(momentum=momentum, dampening=dampening, nesterov=nesterov, weight_decay=weight_decay,
                   maximize=maximize)
    opt = fused_optim.SGD(params, lr=torch.tensor(lr) if lr_tensor else lr, backend=backend, **options)
    ref_lr = float(torch.tensor(lr)) if lr_tensor else lr
    reference = ReferenceSGD(params, lr=ref_lr, **options)
    rounded = ReferenceSGD(params, lr=ref_lr, **options)
    for _ in range(steps):
        grads = [torch.randn(n, generator=generator).to(dtype) for n in sizes]
        set_grads(grads, params)
        opt.step()
        reference.step(grads)
        rounded.step(grads)
        store_rounded(rounded, dtype)
    if not any(sizes):
        return
    ours = flat(params)
    if dtype == torch.float32:
        magnitude = flat(reference.params).abs().max().item() + 1.0
        assert (ours - flat(reference.params)).abs().max() <= steps * 4 * ulp(dtype, magnitude)
    else:
        assert within_two_ulps(ours, flat(rounded.params), dtype).all()


# ----------------------------------------------------------------------------------------------------------------
# CUDA only


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_many_tensors_of_mixed_dtypes_in_one_group_match_the_cpu_kernel(backend):
    """700 tensors, bf16 then fp32 then bf16, with momentum: several launches (table capacity, a new launch at each
    dtype change, step counts of empty tensors too); every tensor must come out as the CPU kernel computes it."""
    torch.manual_seed(0)
    sizes = [int(n) for n in torch.randint(0, 3000, (700,))]
    dtypes = [torch.bfloat16] * 200 + [torch.float32] * 300 + [torch.bfloat16] * 200
    init = [torch.randn(n) for n in sizes]
    grads = [torch.randn(n) for n in sizes]
    results = {}
    for which, device in ((backend, "cuda"), ("cpu", "cpu")):
        params = [torch.nn.Parameter(x.to(device=device, dtype=d)) for x, d in zip(init, dtypes)]
        opt = fused_optim.SGD(params, lr=1e-2, momentum=0.9, nesterov=True, backend=which)
        for _ in range(3):
            for p, g in zip(params, grads):
                p.grad = g.to(device=device, dtype=p.dtype)
            opt.step()
        results[which] = [p.detach().float().cpu() for p in params]
        assert all(opt.state[p]["step"].item() == 3 for p in params)
    # no multiply-add contracted anywhere (nvcc --fmad=false, Triton's EXACT_ARITHMETIC): the CPU's bits
    for i, (ours, cpu) in enumerate(zip(results[backend], results["cpu"])):
        assert torch.equal(ours, cpu), f"tensor {i} ({dtypes[i]})"


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend, device", CPU_BACKENDS)
def test_a_bf16_momentum_buffer_follows_its_emulation(backend, device, dtype, nesterov):
    """moments="bf16": the fp32 step on the dequantized buffer, rounded back stochastically (test_adam_moments.py);
    the first step's buffer is the grad itself, rounded."""
    options = dict(cls="SGD", momentum=0.9, nesterov=nesterov, weight_decay=0.01, maximize=not nesterov)
    params, buffers, emulated_params, emulated = run_with_bf16_moments(backend, options, dtype)
    assert buffers["momentum_buffer"][0].dtype == torch.bfloat16
    assert_identical(buffers, emulated)
    assert_identical([p.detach() for p in params], [p.detach() for p in emulated_params])


def test_a_bf16_momentum_buffer_trades_state_with_torch_sgd():
    p = torch.nn.Parameter(torch.randn(100))
    opt = fused_optim.SGD([p], lr=0.1, momentum=0.9, moments="bf16")
    p.grad = torch.randn(100)
    opt.step()
    assert opt.state[p]["momentum_buffer"].dtype == torch.bfloat16
    theirs = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    theirs.load_state_dict(opt.torch_state_dict())  # fp32: torch's SGD steps on from our bf16 values exactly
    assert torch.equal(theirs.state[p]["momentum_buffer"], opt.state[p]["momentum_buffer"].float())
    theirs.step()
    opt.load_state_dict(theirs.state_dict())  # torch's fp32 buffer, rounded to nearest
    assert torch.equal(opt.state[p]["momentum_buffer"], theirs.state[p]["momentum_buffer"].bfloat16())



# ----------------------------------------------------------------------------------------------------------------
# bf16 params: master weights and stochastic rounding, as AdamW's and Lion's

BF16_MODES = {
    "masters": dict(momentum=0.9, master_weights=True),
    "masters24-int8": dict(momentum=0.9, nesterov=True, master_weights=24, moments="int8"),
    "stochastic": dict(stochastic_rounding=True),
    "stochastic-bf16-buffer": dict(momentum=0.9, dampening=0.1, stochastic_rounding=True, moments="bf16"),
}


def run_bf16(backend, device, init, grads, steps=None, weight_decay=0.01,
             **options) -> tuple[list[torch.Tensor], fused_optim.SGD]:
    params = make_params(init, torch.bfloat16, device)
    opt = fused_optim.SGD(params, lr=1e-2, weight_decay=weight_decay, backend=backend, **options)
    for step_grads in grads[:steps]:
        set_grads(step_grads, params)
        opt.step()
    return params, opt


@pytest.mark.parametrize("weight_decay", [0.0, 0.37])
@pytest.mark.parametrize("mode", BF16_MODES)
def test_bf16_modes_agree_bit_for_bit_on_every_backend(mode, weight_decay):
    """The C++ kernel, the Triton kernel (interpreted) and the torch ops: the same params and state, bit for bit.
    The decay, the momentum and the param update are each one FMA (multiply_add.h), in every backend (one that
    rounds as torch's kernels do on a CPU without FMA sits out: the x86-64 baseline CPU kernels, and the torch ops
    under ATEN_CPU_CAPABILITY=default)."""
    init = [torch.randn(s) for s in SHAPES]
    grads = [random_grads(SHAPES, torch.bfloat16) for _ in range(4)]
    results = {backend: run_bf16(backend, device, init, grads, weight_decay=weight_decay, **BF16_MODES[mode])
               for backend, device in (p.values for p in CPU_BACKENDS) if fuses_multiply_add(backend)}
    (_, (first_params, first_opt)), *others = results.items()
    for backend, (params, opt) in others:
        assert_identical([p.detach() for p in params], [p.detach() for p in first_params], backend)
        assert_identical(opt.state_dict()["state"], first_opt.state_dict()["state"], backend)


@pytest.mark.parametrize("mode", BF16_MODES)
@pytest.mark.parametrize("backend, device", CPU_BACKENDS)
def test_bf16_modes_resume_from_a_state_dict_bit_identically(backend, device, mode):
    """Saved after 3 steps (masters as remainders, the count that keys stochastic rounding without momentum too)
    and loaded into a fresh optimizer: the last 3 steps as the uninterrupted run's."""
    init = [torch.randn(s) for s in SHAPES]
    grads = [random_grads(SHAPES, torch.bfloat16) for _ in range(6)]
    straight, straight_opt = run_bf16(backend, device, init, grads, **BF16_MODES[mode])
    halfway, halfway_opt = run_bf16(backend, device, init, grads, steps=3, **BF16_MODES[mode])
    resumed, resumed_opt = resume_through_torch_save(
        halfway, halfway_opt,
        lambda params: fused_optim.SGD(params, lr=1e-2, weight_decay=0.01, backend=backend, **BF16_MODES[mode]),
        grads[3:])
    assert_identical([p.detach() for p in resumed], [p.detach() for p in straight])
    assert_identical(resumed_opt.state_dict(), straight_opt.state_dict())


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_stochastic_rounding_keeps_tiny_updates_on_average(backend, device):
    """Plain SGD (no momentum, so torch would keep no state; we keep the count that keys the random stream) on bf16
    params with updates of 1/8 of an ulp: rounded stochastically they average to the fp32 result, the same seed
    gives the same bits; rounded to nearest, most of each update would vanish."""
    lr, shapes = 1e-3, [(65536,)]
    init = [(1.0 + torch.rand(s)).bfloat16().float() for s in shapes]  # in [1, 2): a bf16 ulp is 2^-7
    grads = [torch.randn(s).bfloat16().to(device) for s in shapes]
    fp32 = make_params(init, torch.float32, device)
    fp32_opt = fused_optim.SGD(fp32, lr=lr, backend=backend)
    set_grads([g.float() for g in grads], fp32)
    fp32_opt.step()
    results = []
    for _ in range(2):
        params = make_params(init, torch.bfloat16, device)
        opt = fused_optim.SGD(params, lr=lr, stochastic_rounding=True, backend=backend)
        set_grads(grads, params)
        opt.step()
        results.append(params[0].detach())
        assert set(opt.state[params[0]]) == {"step"} and opt.state[params[0]]["step"].item() == 1
    assert_identical(results[0], results[1])
    target = fp32[0].detach().double()
    direction = torch.sign(target - init[0].to(target))
    error = (results[0].double() - target) * direction
    assert abs(error.mean().item()) < 5 * error.std().item() / math.sqrt(error.numel())
    nearest = (target.bfloat16().double() - target) * direction
    assert nearest.mean().item() < -0.25 * (lr * grads[0].double().abs().mean().item())


def test_a_torch_sgd_state_loads_into_master_weights():
    """torch's SGD keeps no master: loaded into ours with master_weights=True, each master starts from its param,
    and our state (its remainders) loads back into torch's SGD, which ignores them."""
    shapes = [(5,), (3, 4)]
    init = [torch.randn(s) for s in shapes]
    theirs = make_params(init, torch.bfloat16, "cpu")
    torch_opt = torch.optim.SGD(theirs, lr=1e-2, momentum=0.9)
    set_grads(random_grads(shapes, torch.bfloat16), theirs)
    torch_opt.step()
    ours = make_params([p.detach().float() for p in theirs], torch.bfloat16, "cpu")
    opt = fused_optim.SGD(ours, lr=1e-2, momentum=0.9, master_weights=True)
    opt.load_state_dict(torch_opt.state_dict())
    for p in ours:
        assert opt.state[p]["master_remainder"].dtype == torch.int16
        assert_identical(master_weight(opt, p), p.detach().float())
    set_grads(random_grads(shapes, torch.bfloat16), ours)
    opt.step()
    torch_opt.load_state_dict(opt.state_dict())


@pytest.mark.parametrize("torchs_update", ["sparse grads", "differentiable group"])
def test_a_grad_scaler_with_a_group_torchs_update_steps_is_refused_before_any_group_steps(torchs_update):
    """torch's scaler with fused=True, which hands the step its scale, and torch's own update, which takes none
    (sparse grads, a differentiable group): refused in one sentence before the first group (dense, ours) is
    stepped, its inf check run, or any state made. (Without fused=True torch's scaler unscales the grads itself, and
    so does ours for such grads: tests/test_fused_clipping.py.)"""
    linear = torch.nn.Linear(4, 1)
    if torchs_update == "sparse grads":
        embedding = torch.nn.Embedding(10, 4, sparse=True)
        second = {"params": embedding.parameters()}
    else:
        embedding = torch.nn.Embedding(10, 4)
        second = {"params": embedding.parameters(), "differentiable": True}
    opt = fused_optim.SGD([{"params": linear.parameters()}, second], lr=0.1, momentum=0.9, backend="cpu", fused=True)
    scaler = make_scaler(torch.amp.GradScaler)
    before = [p.detach().clone() for p in (*linear.parameters(), embedding.weight)]
    scaler.scale(linear(embedding(torch.tensor([1, 2, 3]))).sum()).backward()
    with pytest.raises(RuntimeError, match=r"^SGD: a GradScaler does not step differentiable groups \(or SGD's sparse"):
        scaler.step(opt)
    assert all(torch.equal(p, q) for p, q in zip((*linear.parameters(), embedding.weight), before))
    assert not opt.state


def sparse_embedding_run(cls, steps, nesterov=False, state_dict=None, **options):
    """An SGD with momentum over a sparse embedding and a dense linear layer after `steps` steps (same seed: the same
    grads for every class), having first loaded a copy of `state_dict` if one is given (the loaders keep its tensors,
    which the updates then change)."""
    torch.manual_seed(0)
    embedding, linear = torch.nn.Embedding(10, 3, sparse=True), torch.nn.Linear(3, 1)
    params = [*embedding.parameters(), *linear.parameters()]
    opt = cls(params, lr=0.1, momentum=0.9, nesterov=nesterov, **options)
    if state_dict is not None:
        opt.load_state_dict(copy.deepcopy(state_dict))
    for step in range(steps):
        opt.zero_grad()
        linear(embedding(torch.tensor([step % 10, 3, 7]))).sum().backward()
        opt.step()
    return params, opt


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("saved_by, loaded_by", [(fused_optim.SGD, fused_optim.SGD),
                                                 (torch.optim.SGD, fused_optim.SGD),
                                                 (fused_optim.SGD, torch.optim.SGD)])
def test_a_sparse_momentum_buffer_saves_loads_and_steps_on_as_torchs(saved_by, loaded_by, nesterov):
    """torch's own update, which steps sparse grads, keeps their momentum buffer sparse; the buffer is saved so and
    loads back sparse (as torch's loader keeps it), into ours from torch's and ours and into torch's from ours, and
    the run goes on as torch's would (nesterov reads the sparse buffer beside the sparse grad)."""
    _, saved = sparse_embedding_run(saved_by, 2, nesterov)
    state_dict = saved.state_dict()
    assert state_dict["state"][0]["momentum_buffer"].is_sparse
    resumed, _ = sparse_embedding_run(loaded_by, 4, nesterov, state_dict=state_dict)
    expected, _ = sparse_embedding_run(torch.optim.SGD, 4, nesterov, state_dict=state_dict)
    # (the linear layer's kernel update is within an ulp of torch's, and its weight feeds the embedding's grads)
    torch.testing.assert_close([p.detach() for p in resumed], [p.detach() for p in expected])


def test_a_sparse_momentum_buffer_followed_by_a_dense_grad_is_made_dense_and_kept():
    """A sparse grad then a dense one on the same param: torch's update refuses the second (a sparse buffer beside a
    dense grad); ours makes the buffer dense for the kernels and steps on with the momentum it holds."""
    embedding = torch.nn.Embedding(4, 3, sparse=True)
    opt = fused_optim.SGD(embedding.parameters(), lr=0.1, momentum=0.9, backend="cpu")
    embedding(torch.tensor([1, 2])).sum().backward()
    opt.step()
    buffer = opt.state[embedding.weight]["momentum_buffer"]
    assert buffer.is_sparse
    expected_buffer = 0.9 * buffer.to_dense() + 1.0
    before = embedding.weight.detach().clone()
    embedding.weight.grad = torch.ones(4, 3)
    opt.step()
    assert_identical(opt.state[embedding.weight]["momentum_buffer"], expected_buffer)
    expected_param = fma(-0.1, expected_buffer, before) if fuses_multiply_add("cpu") else (
        before - 0.1 * expected_buffer)
    assert_identical(embedding.weight.detach(), expected_param)
