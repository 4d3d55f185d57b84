"""fused_optim.Adam / fused_optim.AdamW against the float64 reference (fused_optim/reference.py) and against
torch.optim.Adam/AdamW(foreach=False), on every backend that runs here.

Sizes, and why: 1 and 3 are smaller than any vector width or block (all tail); 0 is an empty param, which must
be skipped without touching memory; 1023 is one short of a Triton block (1024), so the masked tail covers nearly
all of it; 4097 spans five Triton blocks, the last holding one element; (7, 13) is a 2-D param. They share one
group, so the multi-tensor bookkeeping (block starts, per-tensor scalars) is exercised too. The CPU kernel's
chunk boundary (16384) has its own test, since the Triton interpreter is too slow for sizes that large.

bf16 results must be rounded to nearest even on every backend. Triton's interpreter truncates in its own
fp32-to-bf16 cast (triton/runtime/interpreter.py, `cast_impl`), so the Triton kernel rounds bf16 in integer ops,
and these checks hold for the interpreted kernel too.

The drop-in contract every optimizer shares (torch's errors, state dicts both ways, copies, torch.compile, CUDA
graphs) is tests/test_optimizer_contract.py.
"""

from __future__ import annotations

import copy
import functools
import inspect
import io
import math
import re

import numpy as np
import pytest
import torch
from conftest import BACKEND_DEVICES, CPU_BACKENDS, TRITON_INTERPRETED, fuses_multiply_add, master_weight
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fused_optim
from fused_optim.master_remainder import join_master, round_like_master, split_master
from fused_optim.multiply_add import fma
from fused_optim.int8_moments import quantize
from fused_optim.ops.adam import adam_step
from fused_optim.reference import ReferenceAdam
from fused_optim.rounding import bf16_stochastic_round

SHAPES = [(1,), (3,), (0,), (1023,), (4097,), (7, 13)]
DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.bfloat16, id="bf16"),
    pytest.param(torch.float16, id="fp16"),
]
LOW_PRECISION = (torch.bfloat16, torch.float16)

# Option sets: each option on and off at least once, and all together. `cls` picks fused_optim.Adam/AdamW and
# torch.optim.Adam/AdamW alike; `lr_tensor` passes the lr as a one-element tensor.
OPTIONS = {
    "adam": dict(cls="Adam"),
    "adam-l2": dict(cls="Adam", weight_decay=0.1),
    "adam-decoupled": dict(cls="Adam", weight_decay=0.1, decoupled_weight_decay=True),
    "adam-amsgrad-maximize": dict(cls="Adam", amsgrad=True, maximize=True),
    "adamw-wd0": dict(cls="AdamW", weight_decay=0.0),
    "adamw": dict(cls="AdamW", weight_decay=0.1),
    "adamw-amsgrad": dict(cls="AdamW", weight_decay=0.1, amsgrad=True),
    "adamw-lr_tensor": dict(cls="AdamW", weight_decay=0.1, lr_tensor=True),
    "adam-everything": dict(cls="Adam", weight_decay=0.1, amsgrad=True, maximize=True, lr_tensor=True),
    "adamw-everything": dict(cls="AdamW", weight_decay=0.1, amsgrad=True, maximize=True, lr_tensor=True),
}


# ----------------------------------------------------------------------------------------------------------------
# helpers


def make_params(init: list[torch.Tensor], dtype: torch.dtype, device: str) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(x.to(device=device, dtype=dtype, copy=True)) for x in init]


def set_grads(grads: list[torch.Tensor], *param_lists: list[torch.Tensor]) -> None:
    for params in param_lists:
        for p, g in zip(params, grads):
            p.grad = g.to(device=p.device, dtype=p.dtype, copy=True)


def random_grads(shapes, dtype=torch.float32, device="cpu", generator=None) -> list[torch.Tensor]:
    """Fresh standard-normal grads (never zeros), rounded to the param dtype as autograd would hand them out."""
    return [torch.randn(s, generator=generator).to(device=device, dtype=dtype) for s in shapes]


def split_options(options: dict, lr: float):
    """(our class, torch's class, kwargs for both, the lr to give each optimizer, the lr the reference uses)."""
    kwargs = dict(options)
    name = kwargs.pop("cls")
    lr_tensor = kwargs.pop("lr_tensor", False)
    decoupled = name == "AdamW" or kwargs.get("decoupled_weight_decay", False)
    # A tensor lr is read in fp32 on the device: the reference gets that fp32 value.
    make_lr = (lambda: torch.tensor(lr)) if lr_tensor else (lambda: lr)
    ref_lr = float(torch.tensor(lr)) if lr_tensor else lr
    return getattr(fused_optim, name), getattr(torch.optim, name), kwargs, make_lr, ref_lr, decoupled


def reference_for(params, options, ref_lr, decoupled, **extra) -> ReferenceAdam:
    kwargs = {k: v for k, v in options.items() if k in ("weight_decay", "amsgrad", "maximize", "betas", "eps")}
    return ReferenceAdam(params, lr=ref_lr, decoupled_weight_decay=decoupled, **kwargs, **extra)


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().double().flatten().cpu() for t in tensors])


def errors(params, reference, keep: torch.Tensor | None = None) -> tuple[float, float]:
    """(max, mean) of |param - reference.params| over all elements, or over those `keep` marks (flat, bool); NaN
    counts as infinitely wrong."""
    diff = (flat(params) - flat(reference.params)).abs().nan_to_num(nan=math.inf)
    if keep is not None:
        diff = diff[keep]
    return (diff.max().item(), diff.mean().item()) if diff.numel() else (0.0, 0.0)


def ulp(dtype: torch.dtype, magnitude: float) -> float:
    """An upper bound of the spacing of `dtype` numbers of at most this magnitude."""
    return torch.finfo(dtype).eps * magnitude


def within_two_ulps(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, scale: torch.Tensor | None = None
                    ) -> torch.Tensor:
    """Elementwise |a - b| <= two ulps of `dtype` at the larger of the two, or of `scale` (subnormals: the smallest
    step).

    Two, not one: trajectories that part by one ulp above a power of two (say at 0.26, ulp 2^-9 in bf16) are
    two ulps apart once both have moved below it (ulp 2^-10). `scale`: the elements' magnitudes before the steps,
    for a param that an update brought from ~1e-2 to ~1e-4, where one ulp at the start is many at the end."""
    info = torch.finfo(dtype)
    magnitude = torch.maximum(a.abs(), b.abs())
    if scale is not None:
        magnitude = torch.maximum(magnitude, scale.abs())
    return (a - b).abs() <= 2 * info.eps * (magnitude + info.smallest_normal)


def snapshot(opt: torch.optim.Optimizer):
    """Everything a failed call must leave as it was: params, state (every entry, empty ones too), groups."""
    params = [p.detach().clone() for g in opt.param_groups for p in g["params"]]
    state = {id(p): {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()} for p, s in opt.state.items()}
    groups = [
        {k: ([id(p) for p in v] if k == "params" else v.clone() if torch.is_tensor(v) else copy.deepcopy(v))
         for k, v in g.items()}
        for g in opt.param_groups
    ]
    return {"params": params, "state": state, "groups": groups}


def resume_through_torch_save(params, opt, make_optimizer,
                              grads) -> tuple[list[torch.Tensor], torch.optim.Optimizer]:
    """`params` and `opt`'s state_dict through torch.save and torch.load, into fresh params and the optimizer
    `make_optimizer` makes of them, which then steps over `grads` (a list of each step's grads)."""
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in params], "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    resumed = [torch.nn.Parameter(p.clone()) for p in saved["params"]]
    resumed_opt = make_optimizer(resumed)
    resumed_opt.load_state_dict(saved["opt"])
    for step_grads in grads:
        set_grads(step_grads, resumed)
        resumed_opt.step()
    return resumed, resumed_opt


def assert_identical(a, b, path="") -> None:
    """Equal structure, and tensors equal bit for bit with the same dtype, shape and device."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b), path
        assert (a.dtype, a.shape, a.device) == (b.dtype, b.shape, b.device), path
        if a.device.type != "meta":
            assert torch.equal(a, b), f"{path} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{path}: keys {sorted(a, key=str)} != {sorted(b, key=str)}"
        for k in a:
            assert_identical(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


# ----------------------------------------------------------------------------------------------------------------
# correctness: the float64 reference and torch at the same dtype


@pytest.mark.interpreted_cover(1)
@pytest.mark.parametrize("options", list(OPTIONS.values()), ids=list(OPTIONS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_matches_reference_at_least_as_well_as_torch(backend, device, dtype, options):
    check_against_reference_and_torch(backend, device, dtype, options, SHAPES)


def check_against_reference_and_torch(backend, device, dtype, options, shapes, steps=10, lr=1e-2) -> None:
    """`steps` steps of ours and torch's at `dtype` on params of `shapes`, each compared with the float64 reference:
    ours never worse than torch (shared with tests/test_fuzz.py)."""
    ours_cls, torch_cls, kwargs, make_lr, ref_lr, decoupled = split_options(options, lr)
    init = [torch.randn(s) for s in shapes]
    ours, theirs = make_params(init, dtype, device), make_params(init, dtype, device)
    opt = ours_cls(ours, lr=make_lr(), backend=backend, **kwargs)
    torch_opt = torch_cls(theirs, lr=make_lr(), foreach=False, **kwargs)
    reference = reference_for(ours, kwargs, ref_lr, decoupled)
    # The same reference, its params rounded to the param dtype after every step: what an optimizer whose state
    # and math are exact, and whose only error is storing the param in a low-precision dtype, would produce.
    rounded = reference_for(ours, kwargs, ref_lr, decoupled)
    for _ in range(steps):
        grads = random_grads(shapes, dtype, device)
        set_grads(grads, ours, theirs)
        opt.step()
        torch_opt.step()
        reference.step(grads)
        rounded.step(grads)
        store_rounded(rounded, dtype)

    assert all(p.dtype == dtype and p.device.type == device for p in ours)
    assert torch.isfinite(flat(ours)).all()
    assert_at_least_as_accurate_as_peer(ours, theirs, reference, rounded, init, dtype, steps)


def store_rounded(reference, dtype: torch.dtype) -> None:
    """Rounds the reference's params to `dtype` in place after a step, as an optimizer storing them in that dtype
    does, and marks in reference.near_ties (per param, over all steps) the bf16/fp16 elements that were then within
    fp32's rounding of a tie between two `dtype` values: decimal hyperparameters put some exactly on one (a bf16
    param of 260/1024 times 1 - 0.01 * 0.1, minus 0.01, is 249.5/1024), and an fp32 update may round it either way."""
    if not hasattr(reference, "near_ties"):
        reference.near_ties = [torch.zeros_like(r, dtype=torch.bool) for r in reference.params]
    for r, near_tie in zip(reference.params, reference.near_ties):
        if dtype in LOW_PRECISION:
            near_tie |= (r * (1 + 2**-20)).to(dtype) != (r * (1 - 2**-20)).to(dtype)
        r.copy_(r.to(dtype).double())


def assert_at_least_as_accurate_as_peer(ours, peer, reference, rounded, init, dtype, steps,
                                        keep: torch.Tensor | None = None) -> None:
    """How every optimizer's accuracy test ends: our params and the peer's (torch's optimizer at the same dtype)
    after `steps` steps from `init`, against the float64 `reference` and `rounded` (the same reference with its
    params rounded to `dtype` after every step: what an optimizer whose only error is storing the param would
    produce); `keep` (flat, bool) leaves out elements where the reference itself is ambiguous.

    Never worse than the peer. In fp32 both compute the same formulas, perhaps in another order (torch's addcdiv
    forms (step_size * m) / denom and divides by double scalars; a kernel may fuse multiply-adds), so their errors
    are independent roundings of equal size and either may be a hair larger: half an ulp of the largest param on
    the max, 5 % on the mean. In bf16/fp16 torch keeps its state in the param dtype and we keep fp32, so ours can
    only be better; storing the param dominates both errors there, and fp16 torch often overflows, so the sharp
    check is the rounded reference's: matched almost everywhere, and elsewhere by an ulp or two (where fp32 and
    float64 fell on either side of a rounding boundary at some step)."""
    if flat(ours).numel() == 0:  # only empty params: nothing to compare, and nothing may have gone wrong
        return
    our_max, our_mean = errors(ours, reference, keep)
    peer_max, peer_mean = errors(peer, reference, keep)
    magnitude = flat(reference.params).abs().max().item()
    # (in bf16/fp16 the peer's roundings may by chance land nearer the float64 values than storing the param to
    # nearest does: no worse than the rounded reference is as accurate as such an optimizer can be)
    floor = errors(rounded.params, reference, keep)[0] if dtype in LOW_PRECISION else 0.0
    assert our_max <= max(peer_max + 0.5 * ulp(dtype, magnitude), floor), (our_max, peer_max, floor)
    if dtype == torch.float32 and flat(ours).numel() >= 1000:
        # over a few elements a mean is noise (the fuzz test's small draws)
        assert our_mean <= 1.05 * peer_mean + 1e-12, (our_mean, peer_mean)
    if dtype in LOW_PRECISION:
        keep = slice(None) if keep is None else keep
        ours_flat, rounded_flat = flat(ours)[keep], flat(rounded.params)[keep]
        matched = (ours_flat == rounded_flat)[flat(rounded.near_ties)[keep] == 0]
        assert matched.numel() == 0 or matched.double().mean() >= 0.99
        assert within_two_ulps(ours_flat, rounded_flat, dtype, flat(init)[keep]).all()
    else:  # fp32: a few roundings per step, accumulated over the steps
        assert our_max <= steps * 4 * ulp(dtype, magnitude)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_fp32_matches_torch_adamw_after_100_steps(backend, device):
    shapes = [(3,), (1023,), (1500,)]
    init = [torch.randn(s) for s in shapes]
    ours, theirs = make_params(init, torch.float32, device), make_params(init, torch.float32, device)
    opt = fused_optim.AdamW(ours, lr=1e-3, weight_decay=0.01, backend=backend)
    torch_opt = torch.optim.AdamW(theirs, lr=1e-3, weight_decay=0.01, foreach=False)
    reference = ReferenceAdam(ours, lr=1e-3, weight_decay=0.01, decoupled_weight_decay=True)
    for _ in range(100):
        grads = random_grads(shapes, device=device)
        set_grads(grads, ours, theirs)
        opt.step()
        torch_opt.step()
        reference.step(grads)
    # ~1e-6 relative to the params' scale (docs/design.md's numerics contract): the kernels follow torch's formulas,
    # so only one-ulp differences (torch's fused multiply-adds in lerp and addcmul, the fp64 bias corrections, the
    # fp32 lr) random-walk apart, about sqrt(100) ulps after 100 steps. A wrong formula is off by ~lr = 1e-3.
    diff = (flat(ours) - flat(theirs)).abs().max().item()
    assert diff <= 1e-6 * flat(theirs).abs().max().item(), diff
    our_max, our_mean = errors(ours, reference)
    torch_max, torch_mean = errors(theirs, reference)
    magnitude = flat(reference.params).abs().max().item()
    assert our_max <= torch_max + 0.5 * ulp(torch.float32, magnitude) and our_mean <= 1.05 * torch_mean


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES[:2], ids=["cpu", "torch"])
def test_cpu_chunk_boundaries(backend, device):
    """The CPU kernel cuts tensors into 16384-element chunks spread over threads: sizes around that."""
    shapes = [(16383,), (16385,), (40000,)]
    init = [torch.randn(s) for s in shapes]
    ours, theirs = make_params(init, torch.float32, device), make_params(init, torch.float32, device)
    opt = fused_optim.AdamW(ours, lr=1e-2, amsgrad=True, backend=backend)
    torch_opt = torch.optim.AdamW(theirs, lr=1e-2, amsgrad=True, foreach=False)
    step_both_and_compare(opt, torch_opt, ours, theirs, shapes, device)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_non_contiguous_param_and_grad(backend, device):
    """A transposed (dense, non-contiguous) param, and a grad whose strides differ from it."""
    base = torch.randn(33, 17)
    ours = torch.nn.Parameter(base.to(device).t())
    theirs = torch.nn.Parameter(base.to(device).t())
    assert not ours.is_contiguous()
    opt = fused_optim.AdamW([ours], lr=1e-2, backend=backend)
    torch_opt = torch.optim.AdamW([theirs], lr=1e-2, foreach=False)
    for _ in range(3):
        grad = torch.randn(17, 33, device=device)  # contiguous: other strides than the param
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        opt.step()
        torch_opt.step()
    assert opt.state[ours]["exp_avg"].stride() == ours.stride()
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_mixed_dtypes_in_one_group(backend, device):
    """fp32, bf16 and fp16 params in one group (fp32 first) give what one optimizer per param gives."""
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float32]
    init = [torch.randn(n) for n in (5, 300, 7, 2000)]
    together = [torch.nn.Parameter(x.to(device=device, dtype=d)) for x, d in zip(init, dtypes)]
    apart = [torch.nn.Parameter(x.to(device=device, dtype=d)) for x, d in zip(init, dtypes)]
    opt = fused_optim.AdamW(together, lr=1e-2, backend=backend)
    opts = [fused_optim.AdamW([p], lr=1e-2, backend=backend) for p in apart]
    for _ in range(3):
        set_grads([torch.randn(p.shape) for p in together], together, apart)
        opt.step()
        for o in opts:
            o.step()
    for p, q in zip(together, apart):
        assert p.dtype == q.dtype
        assert torch.equal(p, q)


@pytest.mark.parametrize("beta1", [0.9, 0.6, 0.5, 0.3, 0.0])
@pytest.mark.parametrize("backend, device", [p for p in BACKEND_DEVICES if p.values[0] != "torch"])
def test_first_moment_is_lerps_formula_rounded_operation_by_operation(backend, device, beta1):
    """exp_avg = lerp(exp_avg, grad, 1 - beta1) in fp32 by the formula of torch's lerp, each of its two forms (weight
    below 0.5, and from 0.5 on) rounded operation by operation: the kernels write both as base + coefficient *
    (grad - exp_avg). (torch's own lerp fuses the multiply-add: the torch backend's bits differ at 3 of these 5
    weights.)"""
    shapes = [(1,), (1023,)]
    params = make_params([torch.randn(s) for s in shapes], torch.float32, device)
    opt = fused_optim.AdamW(params, lr=1e-3, betas=(beta1, 0.999), backend=backend)
    for step in range(3):
        grads = random_grads(shapes, device=device)
        set_grads(grads, params)
        before = [opt.state[p]["exp_avg"].clone() if opt.state[p] else torch.zeros_like(p) for p in params]
        opt.step()
        weight = torch.tensor(1.0 - beta1, dtype=torch.float32)
        for p, m, g in zip(params, before, grads):
            d = g.to(device) - m
            expected = m + weight * d if weight < 0.5 else g.to(device) - d * (1.0 - weight)
            assert torch.equal(opt.state[p]["exp_avg"].view(torch.int32), expected.view(torch.int32)), (step, beta1)


def adam_h_update(param, grad, state, step, lr, decoupled, options, fused=True):
    """The new fp32 param of one csrc/include/fused_optim/adam.h step with `options` (Adam's keyword arguments),
    rounded operation by operation as the kernels round it (no FMA but the L2 term's, unless not `fused`), the
    moments updated in `state` (fp32 tensors) in place. The scalars are adam_scalars': fp32 roundings of doubles.
    In numpy, whose fp32 operations round one by one: torch's CPU division by a single number multiplies by its
    reciprocal."""
    f32 = np.float32
    beta1, beta2 = options.get("betas", (0.9, 0.999))
    weight_decay = options.get("weight_decay", 0.0)
    weight = f32(1.0 - beta1)
    coefficient = weight if weight < 0.5 else -(f32(1.0) - weight)
    step_size, param_decay = f32(lr / (1.0 - beta1**step)), f32(1.0 - lr * weight_decay if decoupled else 1.0)
    bias_correction2_sqrt = f32(math.sqrt(1.0 - beta2**step))
    p, g = param.numpy(), grad.float().numpy() * f32(-1.0 if options.get("maximize") else 1.0)
    m, v, max_v = (state[key].numpy() for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"))  # views of `state`
    if weight_decay and not decoupled and fused:
        g = fma(weight_decay, torch.from_numpy(p), torch.from_numpy(g)).numpy()
    elif weight_decay and not decoupled:
        g = f32(weight_decay) * p + g
    p = p * param_decay
    m[...] = (g if weight >= 0.5 else m) + coefficient * (g - m)
    v[...] = v * f32(beta2) + f32(1.0 - beta2) * g * g
    if options.get("amsgrad"):
        max_v[...] = np.maximum(max_v, v)
        v = max_v
    return torch.from_numpy(p - step_size * m / (np.sqrt(v) / bias_correction2_sqrt + f32(options.get("eps", 1e-8))))


@pytest.mark.parametrize("options", [OPTIONS["adamw"], OPTIONS["adam-everything"] | dict(lr_tensor=False),
                                     OPTIONS["adam-decoupled"] | dict(betas=(0.3, 0.99), eps=1e-3)],
                         ids=["adamw", "adam-l2-amsgrad-maximize", "adam-decoupled-beta1=0.3"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend, device", [p for p in BACKEND_DEVICES if p.values[0] != "torch"])
def test_steps_are_adam_h_rounded_operation_by_operation(backend, device, dtype, options):
    """Every step of the C++ and Triton kernels is adam_h_update's, bit for bit: the formula of adam.h with each
    operation rounded to fp32 in its order, the bias corrections taken in double. torch.optim.AdamW(foreach=False)
    on the CPU differs by an ulp in ~1 % of the params (its lerp and addcmul fuse a multiply-add), so the comparison
    with torch (test_fp32_matches_torch_adamw_after_100_steps) has a tolerance."""
    shapes = [(1,), (3,), (1023,), (4097,)]
    cls, _, kwargs, make_lr, lr, decoupled = split_options(options, 1e-2)
    params = make_params([torch.randn(s) for s in shapes], dtype, device)
    opt = cls(params, lr=make_lr(), backend=backend, **kwargs)
    fused = fuses_multiply_add(backend)
    models = [p.detach().float().cpu().clone() for p in params]
    states = [{key: torch.zeros_like(m) for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")} for m in models]
    for step in range(1, 11):
        grads = random_grads(shapes, dtype, device)
        set_grads(grads, params)
        opt.step()
        for i, (grad, state) in enumerate(zip(grads, states)):
            models[i] = adam_h_update(models[i], grad.cpu(), state, step, lr, decoupled, kwargs, fused).to(dtype)
            models[i] = models[i].float()
    for p, model, state in zip(params, models, states):
        assert torch.equal(p.detach().cpu().float(), model)
        for key in opt.state[p]:
            if key != "step":
                assert torch.equal(opt.state[p][key].cpu(), state[key]), key


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
@pytest.mark.parametrize("amsgrad", [False, True], ids=["adam", "amsgrad"])
@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_a_grad_whose_square_overflows_steps_as_torchs(backend, device, name, amsgrad):
    """|grad| above ~5.9e20 makes exp_avg_sq inf in fp32: torch's update m / (sqrt(inf) / c + eps) is then 0 and the
    param stays finite (the division by c = sqrt(1 - beta2^t) must keep inf / c = inf)."""
    init, grad = torch.tensor([1.0, -2.0, 0.5, 3.0]), torch.tensor([1e21, -3e30, 1.0, 0.0])
    ours, theirs = make_params([init], torch.float32, device), make_params([init], torch.float32, "cpu")
    opt = getattr(fused_optim, name)(ours, lr=1e-2, amsgrad=amsgrad, backend=backend)
    torch_opt = getattr(torch.optim, name)(theirs, lr=1e-2, amsgrad=amsgrad, foreach=False)
    set_grads([grad], ours, theirs)
    opt.step()
    torch_opt.step()
    assert torch.isfinite(ours[0]).all()
    torch.testing.assert_close(ours[0].cpu(), theirs[0], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_amsgrad_keeps_a_nan_second_moment_as_torchs(backend, device):
    """torch's amsgrad (torch.maximum, fused or not) keeps a NaN in max_exp_avg_sq; fmaxf dropped it, so the CPU and
    Triton kernels kept the old max. Also a NaN max already held stays, whatever the new second moment."""
    init = torch.randn(70)
    ours, theirs = make_params([init], torch.float32, device), make_params([init], torch.float32, "cpu")
    opt = fused_optim.Adam(ours, lr=1e-2, amsgrad=True, backend=backend)
    torch_opt = torch.optim.Adam(theirs, lr=1e-2, amsgrad=True, foreach=False)
    for nan_at in (3, None):  # a NaN grad at element 3, then finite grads: its max stays NaN
        grad = torch.randn(70)
        if nan_at is not None:
            grad[nan_at] = float("nan")
        set_grads([grad.to(device)], ours)
        set_grads([grad], theirs)
        opt.step()
        torch_opt.step()
    ours_max, theirs_max = opt.state[ours[0]]["max_exp_avg_sq"].cpu(), torch_opt.state[theirs[0]]["max_exp_avg_sq"]
    assert torch.equal(ours_max.isnan(), theirs_max.isnan()) and ours_max[3].isnan()
    torch.testing.assert_close(ours_max, theirs_max, equal_nan=True, rtol=1e-6, atol=0)


@pytest.mark.parametrize("betas", [(0.0, 0.999), (0.9, 0.0), (0.0, 0.0)], ids=["beta1=0", "beta2=0", "both=0"])
@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_zero_betas(backend, device, betas):
    """beta = 0 is allowed (0 <= beta < 1): the moment is the latest grad, and beta^t = 0 (the Triton kernel
    works from log(beta) = -inf)."""
    shapes = [(5,), (1500,)]
    init = [torch.randn(s) for s in shapes]
    ours = make_params(init, torch.float32, device)
    opt = fused_optim.Adam(ours, lr=1e-2, betas=betas, backend=backend)
    reference = ReferenceAdam(ours, lr=1e-2, betas=betas)
    for _ in range(3):
        grads = random_grads(shapes, device=device)
        set_grads(grads, ours)
        opt.step()
        reference.step(grads)
    # A few fp32 roundings per step. beta2 = 0 divides by the latest |grad|, which amplifies the rounding of
    # the update where that grad is small, so the bound scales with the largest param, not with 1.
    magnitude = flat(reference.params).abs().max().item()
    assert errors(ours, reference)[0] <= 3 * 4 * ulp(torch.float32, magnitude)


# ----------------------------------------------------------------------------------------------------------------
# state: what it holds, and that it survives state_dict round trips


@pytest.mark.parametrize("dtype, master", [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)],
                         ids=["fp32", "bf16", "bf16-master"])
@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_state_layout(backend, device, dtype, master):
    shapes = [(3,), (4, 5)]
    init = [torch.randn(s) for s in shapes]
    ours, theirs = make_params(init, dtype, device), make_params(init, dtype, device)
    opt = fused_optim.AdamW(ours, amsgrad=True, master_weights=master, backend=backend)
    torch_opt = torch.optim.AdamW(theirs, amsgrad=True, foreach=False)
    for _ in range(3):
        set_grads(random_grads(shapes, dtype, device), ours, theirs)
        opt.step()
        torch_opt.step()
    for p in ours:
        state = opt.state[p]
        assert state["step"].dtype == torch.float32 and state["step"].device == p.device
        assert state["step"].shape == () and state["step"].item() == 3.0
        # a bf16 param's master weight: its fp32 value's low half, an int16 remainder (fused_optim/master_remainder.py)
        for key, key_dtype in [("exp_avg", torch.float32), ("exp_avg_sq", torch.float32),
                               ("max_exp_avg_sq", torch.float32)] + ([("master_remainder", torch.int16)] if master else []):
            assert state[key].dtype == key_dtype, key
            assert state[key].shape == p.shape and state[key].stride() == p.stride() and state[key].device == p.device
    ours_sd, torch_sd = opt.state_dict(), torch_opt.state_dict()
    for i in range(len(shapes)):
        assert set(ours_sd["state"][i]) == set(torch_sd["state"][i]) | ({"master_remainder"} if master else set())
    # torch_state_dict(): the fp32 master as master_param, the rest as state_dict() has it
    for i, (p, state) in enumerate(opt.torch_state_dict()["state"].items()):
        assert set(state) == set(torch_sd["state"][i]) | ({"master_param"} if master else set())
        if master:
            assert torch.equal(state["master_param"], master_weight(opt, ours[i]))
    # the groups: torch's keys, and of ours only those not at their neutral values (a DCP checkpoint of torch's
    # optimizer then loads into ours: DCP asks for every key of the dict it loads into)
    for ours_group, torch_group in zip(ours_sd["param_groups"], torch_sd["param_groups"]):
        assert set(ours_group) - set(torch_group) == ({"master_weights"} if master else set())
        assert set(torch_group) <= set(ours_group)


def step_both_and_compare(opt, torch_opt, ours, theirs, shapes, device, steps=3) -> None:
    """Steps ours and torch's on the same grads (after a state_dict crossed between them, say): the params must
    stay together."""
    for _ in range(steps):
        set_grads(random_grads(shapes, device=device), ours, theirs)
        opt.step()
        torch_opt.step()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)


RESUME_KINDS = {
    "fp32": (torch.float32, {}),
    "bf16": (torch.bfloat16, {}),
    "bf16-master": (torch.bfloat16, {"master_weights": True}),
    "fp16-master": (torch.float16, {"master_weights": True}),
    "bf16-stochastic": (torch.bfloat16, {"stochastic_rounding": True}),
}


@pytest.mark.parametrize("kind", list(RESUME_KINDS))
@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_save_and_load_mid_run_continues_bit_exactly(backend, device, kind):
    """torch.save of our state_dict mid-run (read back with map_location="cpu", as a checkpoint loader would),
    loaded into a fresh optimizer over fresh params, continues exactly as the uninterrupted run: fp32 moments,
    the fp32 master copy and the stochastic-rounding seed all survive the trip."""
    dtype, extra = RESUME_KINDS[kind]
    shapes = [(3,), (1500,)]
    init = [torch.randn(s) for s in shapes]
    grads = [random_grads(shapes, dtype, device) for _ in range(6)]
    straight = make_params(init, dtype, device)
    # the two runs share a stochastic-rounding seed; the resumed optimizer draws its own and must take the saved one
    straight_opt = fused_optim.AdamW([{"params": straight, "seed": 99}], lr=1e-2, amsgrad=True, backend=backend,
                                     **extra)
    for g in grads:
        set_grads(g, straight)
        straight_opt.step()

    first = make_params(init, dtype, device)
    first_opt = fused_optim.AdamW([{"params": first, "seed": 99}], lr=1e-2, amsgrad=True, backend=backend, **extra)
    for g in grads[:3]:
        set_grads(g, first)
        first_opt.step()
    buffer = io.BytesIO()
    torch.save(first_opt.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, map_location="cpu")

    resumed = make_params([p.detach() for p in first], dtype, device)
    resumed_opt = fused_optim.AdamW(resumed, lr=1.0, backend=backend, **extra)
    resumed_opt.load_state_dict(saved)
    for i, p in enumerate(resumed):
        state = resumed_opt.state[p]
        assert state["step"].device == p.device and state["step"].dtype == torch.float32
        for key, value in saved["state"][i].items():
            # bf16 params keep fp32 moments, and their master as an int16 remainder; fp16 ones an fp32 copy
            assert state[key].dtype == (torch.int16 if key == "master_remainder" else torch.float32), key
            assert torch.equal(state[key].cpu(), value.to(state[key].dtype)), key
        assert (master_weight(resumed_opt, p) is not None) == ("master_weights" in extra and dtype != torch.float32)
    for g in grads[3:]:
        set_grads(g, resumed)
        resumed_opt.step()
    for p, q in zip(resumed, straight):
        assert torch.equal(p, q)
        assert_identical(resumed_opt.state[p], straight_opt.state[q])


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_torch_state_dict_gives_fp32_masters_and_either_form_resumes_exactly(backend, device):
    """torch_state_dict() joins each bf16 param's remainder into its fp32 master (`master_param`, as an fp32-master
    trainer keeps it); loaded back, it is split again and the run continues as from state_dict(), bit for bit.
    torch's AdamW loads it too. The compact state_dict() is 10 bytes a param (two fp32 moments, an int16
    remainder) against 12 with an fp32 copy."""
    shapes = [(3,), (1500,)]
    init = [torch.randn(s) for s in shapes]
    grads = [random_grads(shapes, torch.bfloat16, device) for _ in range(6)]
    params = make_params(init, torch.bfloat16, device)
    opt = fused_optim.AdamW(params, lr=1e-2, master_weights=True, backend=backend)
    for g in grads[:3]:
        set_grads(g, params)
        opt.step()
    compact, full = opt.state_dict(), opt.torch_state_dict()
    for i, p in enumerate(params):
        assert compact["state"][i]["master_remainder"].dtype == torch.int16 and "master_param" not in compact["state"][i]
        assert "master_remainder" not in full["state"][i]
        assert_identical(full["state"][i]["master_param"], master_weight(opt, p))
    assert "master_remainder" in opt.state[params[0]]  # the optimizer's own state is untouched
    torch.optim.AdamW(make_params(init, torch.float32, device)).load_state_dict(full)
    runs = []
    for saved in (compact, full):
        resumed = make_params([p.detach() for p in params], torch.bfloat16, device)
        if saved is full:  # a loaded fp32 master gives the param its rounding, whatever the param held
            with torch.no_grad():
                for p in resumed:
                    p.add_(1.0)
        resumed_opt = fused_optim.AdamW(resumed, lr=1e-2, master_weights=True, backend=backend)
        resumed_opt.load_state_dict(copy.deepcopy(saved))
        if saved is full:
            for p, q in zip(resumed, params):
                assert_identical(p.detach(), q.detach())
        for g in grads[3:]:
            set_grads(g, resumed)
            resumed_opt.step()
        runs.append([(p.detach(), master_weight(resumed_opt, p)) for p in resumed])
    assert_identical(runs[0], runs[1])


def test_a_master_remainder_of_the_wrong_kind_is_refused_unloaded():
    params = make_params([torch.randn(4)], torch.bfloat16, "cpu")
    opt = fused_optim.AdamW(params, master_weights=True)
    params[0].grad = torch.randn(4).bfloat16()
    opt.step()
    before = snapshot(opt)
    saved = copy.deepcopy(opt.state_dict())  # state_dict() shares the state's dicts
    saved["state"][0]["master_remainder"] = saved["state"][0]["master_remainder"].float()
    with pytest.raises(TypeError, match="a master remainder is int16 or int8, beside a bfloat16 param"):
        opt.load_state_dict(saved)
    assert_identical(snapshot(opt), before)


# ----------------------------------------------------------------------------------------------------------------
# GradScaler: grad_scale and found_inf read on the device


GRADSCALER_KINDS = {
    "fp32": (torch.float32, {}),
    "bf16": (torch.bfloat16, {}),
    "bf16-master": (torch.bfloat16, {"master_weights": True}),
    "bf16-24-bit-master": (torch.bfloat16, {"master_weights": 24}),
    "fp16-master": (torch.float16, {"master_weights": True}),  # an fp32 copy
    "bf16-stochastic": (torch.bfloat16, {"stochastic_rounding": True}),
}


@pytest.mark.parametrize("kind", list(GRADSCALER_KINDS))
@pytest.mark.parametrize("cls, options", [(fused_optim.AdamW, {"amsgrad": True}), (fused_optim.SGD, {"momentum": 0.9}),
                                          (fused_optim.Lion, {})], ids=["AdamW", "SGD", "Lion"])
@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_found_inf_skips_the_step(backend, device, cls, options, kind):
    dtype, extra = GRADSCALER_KINDS[kind]
    shapes = [(3,), (1500,)]
    params = make_params([torch.randn(s) for s in shapes], dtype, device)
    opt = cls(params, lr=1e-2, backend=backend, **options, **extra)
    set_grads(random_grads(shapes, dtype, device), params)
    opt.step()
    set_grads(random_grads(shapes, dtype, device), params)
    grads = [p.grad.clone() for p in params]
    before = snapshot(opt)
    opt.grad_scale = torch.tensor(1024.0, device=device)
    opt.found_inf = torch.tensor(1.0, device=device)
    opt.step()
    assert_identical(snapshot(opt), before)  # params, moments, master copies and step counts
    assert all(torch.equal(p.grad, g) for p, g in zip(params, grads))


@pytest.mark.parametrize("scale", [1024.0, 3.0], ids=["scale=1024", "scale=3"])
@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_grad_scale_equals_unscaled_step(backend, device, scale):
    shapes = [(3,), (1500,)]
    init = [torch.randn(s) for s in shapes]
    scaled, plain = make_params(init, torch.float32, device), make_params(init, torch.float32, device)
    scaled_opt = fused_optim.AdamW(scaled, lr=1e-2, backend=backend)
    plain_opt = fused_optim.AdamW(plain, lr=1e-2, backend=backend)
    for _ in range(3):
        grads = random_grads(shapes, device=device)
        set_grads(grads, plain)
        set_grads([g * scale for g in grads], scaled)
        scaled_opt.grad_scale = torch.tensor(scale, device=device)
        scaled_opt.found_inf = torch.tensor(0.0, device=device)
        scaled_opt.step()
        plain_opt.step()
    for p, q in zip(scaled, plain):
        if scale == 1024.0:  # a power of two: g * S / S is g exactly, so the steps agree bit for bit
            assert torch.equal(p, q)
        else:
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        assert scaled_opt.state[p]["step"].item() == 3.0


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_scaled_step_leaves_grads_alone(backend, device):
    """The op schema declares grads read-only (`Tensor[] grads`), and the backends must agree on what a step
    does to them: nothing."""
    shapes = [(3,), (1500,)]
    params = make_params([torch.randn(s) for s in shapes], torch.float32, device)
    opt = fused_optim.AdamW(params, lr=1e-2, backend=backend)
    set_grads([g * 1024 for g in random_grads(shapes, device=device)], params)
    grads = [p.grad.clone() for p in params]
    opt.grad_scale = torch.tensor(1024.0, device=device)
    opt.found_inf = torch.tensor(0.0, device=device)
    opt.step()
    for p, g in zip(params, grads):
        assert torch.equal(p.grad, g)


@pytest.mark.parametrize("backend, device", CPU_BACKENDS)
def test_grad_scaler_end_to_end(backend, device):
    try:
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=2)
    except (RuntimeError, ValueError) as error:
        pytest.skip(f"torch.amp.GradScaler('cpu') is not supported by this torch: {error}")
    if not scaler.is_enabled():
        pytest.skip("torch.amp.GradScaler('cpu') is disabled in this torch")
    torch_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=2)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    torch_model = copy.deepcopy(model)
    opt = fused_optim.AdamW(model.parameters(), lr=1e-2, backend=backend)
    torch_opt = torch.optim.AdamW(torch_model.parameters(), lr=1e-2, foreach=False)
    skipped_before = None
    for step in range(6):
        x = torch.randn(8, 16)
        if step == 3:
            x[0, 0] = math.inf  # this step's grads overflow: both must skip it and back off the scale
            skipped_before = [p.detach().clone() for p in model.parameters()]
        for m, o, s in ((model, opt, scaler), (torch_model, torch_opt, torch_scaler)):
            o.zero_grad()
            s.scale(m(x).square().mean()).backward()
            s.step(o)
            s.update()
        if step == 3:
            assert all(torch.equal(p, q) for p, q in zip(model.parameters(), skipped_before))
        assert scaler.get_scale() == torch_scaler.get_scale()
        assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")  # GradScaler cleans up
    for p, q in zip(model.parameters(), torch_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        assert opt.state[p]["step"].item() == torch_opt.state[q]["step"].item() == 5.0


# ----------------------------------------------------------------------------------------------------------------
# master weights and stochastic rounding: updates far below a bf16 ulp

TINY_N, TINY_STEPS, TINY_LR = 4096, 50, 4e-4


@functools.cache
def tiny_update_run(backend: str, device: str, mode: str):
    """Params in [1, 1.9) (bf16 ulp 2^-7 = 0.0078), positive grads ~1 so each Adam update is ~lr = 4e-4, 1/20
    of an ulp, for 50 steps: 0.02 in all, 2.5 ulps. Returns (start, final params, final master copy, float64
    reference started from the same bf16 values). Cached: several tests read the same runs."""
    generator = torch.Generator().manual_seed(1234)
    start = (1.0 + 0.9 * torch.rand(TINY_N, generator=generator)).bfloat16()
    param = torch.nn.Parameter(start.to(device, copy=True))
    opt = fused_optim.Adam([{"params": [param], "seed": 77}], lr=TINY_LR, backend=backend,
                           master_weights=mode == "master", stochastic_rounding=mode == "stochastic")
    reference = ReferenceAdam([param], lr=TINY_LR)
    for _ in range(TINY_STEPS):
        grad = 1.0 + 0.1 * torch.randn(TINY_N, generator=generator)
        param.grad = grad.to(device=device, dtype=torch.bfloat16)
        opt.step()
        reference.step([param.grad])
    master = master_weight(opt, param)
    return start.double(), param.detach().double().cpu(), None if master is None else master.double().cpu(), \
        reference.params[0].cpu()


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_plain_bf16_params_lose_tiny_updates(backend, device):
    start, final, _, reference = tiny_update_run(backend, device, "plain")
    assert (start - reference).mean() > 0.019  # the exact result moved 2.5 ulps...
    assert torch.equal(final, start)  # ...round-to-nearest lost every update


@pytest.mark.parametrize("options", [dict(cls="AdamW", weight_decay=0.1), dict(cls="Adam", weight_decay=0.1,
                                                                                  amsgrad=True, maximize=True),
                                     dict(cls="SGD", momentum=0.9, nesterov=True, weight_decay=0.1),
                                     dict(cls="SGD", momentum=0.9, dampening=0.1, moments="int8")],
                         ids=["adamw", "adam-l2-amsgrad-maximize", "sgd-nesterov", "sgd-int8"])
@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_master_remainders_step_the_fp32_trajectory_bit_for_bit(backend, device, options):
    """bf16 params with master_weights=True keep a 2-byte remainder, not a 4-byte fp32 copy, and lose nothing: over
    the same grads their masters are an fp32 run's params bit for bit (the trajectory an fp32 master copy follows);
    each param is its master rounded to nearest, ties away from zero: it differs from an fp32 copy's
    round-to-nearest-even param only on exact ties, by one ulp."""
    check_master_remainders(backend, device, options, SHAPES, steps=8)


def check_master_remainders(backend, device, options, shapes, steps) -> None:
    options = dict(options)
    cls = getattr(fused_optim, options.pop("cls"))
    init = [torch.randn(s).bfloat16() for s in shapes]
    grads = [random_grads(shapes, torch.bfloat16, device) for _ in range(steps)]
    fp32_params = make_params([x.float() for x in init], torch.float32, device)
    fp32_opt = cls(fp32_params, lr=1e-2, backend=backend, **options)
    params = make_params(init, torch.bfloat16, device)
    opt = cls(params, lr=1e-2, master_weights=True, backend=backend, **options)
    for step_grads in grads:
        set_grads([g.float() for g in step_grads], fp32_params)
        set_grads(step_grads, params)
        fp32_opt.step()
        opt.step()
    for p, expected in zip(params, fp32_params):
        assert set(opt.state[p]) == set(fp32_opt.state[expected]) | {"master_remainder"}
        assert opt.state[p]["master_remainder"].dtype == torch.int16
        assert_identical(master_weight(opt, p), expected.detach())
        assert_identical(p.detach(), round_like_master(expected.detach()))
        nearest_even = expected.detach().bfloat16()
        ties = p.detach() != nearest_even
        one_ulp = torch.finfo(torch.bfloat16).eps * expected.detach()[ties].abs()
        assert (p.detach()[ties].float() - nearest_even[ties].float()).abs().le(one_ulp).all()


@pytest.mark.parametrize("cls", ["AdamW", "Lion", "SGD"])
@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_24_bit_masters_are_the_fp32_step_rounded_to_24_bits(backend, device, cls):
    """master_weights=24: each bf16 param keeps an int8 remainder (1 byte), and after every step its master is the
    fp32 update of the previous master rounded to 24 bits (to nearest, ties away from zero), bit for bit: an fp32
    run whose params are so rounded after each step gives the same masters, on every backend."""
    check_24_bit_masters(backend, device, dict(cls=cls, weight_decay=0.1), SHAPES, steps=6)


def check_24_bit_masters(backend, device, options, shapes, steps) -> None:
    options = dict(options)
    optimizer = getattr(fused_optim, options.pop("cls"))
    init = [torch.randn(s).bfloat16() for s in shapes]
    grads = [random_grads(shapes, torch.bfloat16, device) for _ in range(steps)]
    emulated = make_params([x.float() for x in init], torch.float32, device)
    emulated_opt = optimizer(emulated, lr=1e-2, backend=backend, **options)
    params = make_params(init, torch.bfloat16, device)
    opt = optimizer(params, lr=1e-2, master_weights=24, backend=backend, **options)
    for step_grads in grads:
        set_grads([g.float() for g in step_grads], emulated)
        set_grads(step_grads, params)
        emulated_opt.step()
        opt.step()
        with torch.no_grad():
            for p in emulated:
                p.copy_(join_master(*split_master(p, 24)))
    for p, expected in zip(params, emulated):
        assert opt.state[p]["master_remainder"].dtype == torch.int8
        assert_identical(master_weight(opt, p), expected.detach())
        assert_identical(p.detach(), round_like_master(expected.detach(), 24))


@pytest.mark.parametrize("options, match", [
    (dict(master_weights=24, dtype=torch.float32), "master_weights=24 keeps a bfloat16 param's master"),
    (dict(master_weights=24, dtype=torch.float16), "every param of its group must be bfloat16"),
    (dict(master_weights=16, dtype=torch.bfloat16), "master_weights must be True .* or False, not 16"),
    (dict(master_weights=24.0, dtype=torch.bfloat16), "master_weights must be True .* or False, not 24.0"),
    (dict(master_weights=24, stochastic_rounding=True, dtype=torch.bfloat16), "alternatives"),
    (dict(stochastic_rounding="no", dtype=torch.bfloat16), "stochastic_rounding must be True or False, not 'no'"),
    (dict(stochastic_rounding=True, dtype=torch.float16), "stochastic_rounding=True rounds bfloat16 params"),
])
@pytest.mark.parametrize("cls", ["AdamW", "Lion", "SGD"])
def test_bad_master_weights_are_refused_with_nothing_allocated(options, match, cls):
    options = dict(options)
    dtype = options.pop("dtype")
    cls = getattr(fused_optim, cls)
    params = [torch.nn.Parameter(torch.randn(3).to(dtype))]
    with pytest.raises(ValueError, match=match):
        cls(params, **options)
    if dtype != torch.bfloat16:  # a group added later is checked too, and nothing of it stays
        opt = cls([torch.nn.Parameter(torch.randn(3).bfloat16())], **options)
        with pytest.raises(ValueError, match=match):
            opt.add_param_group({"params": params})
        assert len(opt.param_groups) == 1 and not opt.state


@pytest.mark.parametrize("option, value, dtype, match", [
    ("moments", "INT8", torch.bfloat16, "moments must be 'fp32' or 'bf16' or 'int8', not 'INT8'"),
    ("master_weights", "yes", torch.bfloat16, "master_weights must be True"),
    ("stochastic_rounding", 1, torch.bfloat16, "stochastic_rounding must be True or False, not 1"),
    ("stochastic_rounding", True, torch.float16, "stochastic_rounding=True rounds bfloat16 params"),
    ("master_weights", 24, torch.float16, "master_weights=24 keeps a bfloat16 param's master"),
])
def test_a_group_option_set_by_hand_to_a_bad_value_is_refused_at_the_step(option, value, dtype, match):
    """The README lets a group's storage options be set by hand between steps: a bad value, or one the params'
    dtype does not take, is refused at the next step in the constructor's words (they stepped silently: "INT8" as
    fp32 moments, fp16 params rounded to nearest under stochastic rounding), and nothing changes."""
    param = torch.nn.Parameter(torch.randn(70).to(dtype))
    opt = fused_optim.AdamW([param], lr=1e-2)
    param.grad = torch.randn(70).to(dtype)
    opt.step()
    before = (param.detach().clone(), copy.deepcopy(opt.state_dict()["state"]))
    opt.param_groups[0][option] = value
    with pytest.raises(ValueError, match=re.escape("AdamW: ") + match):
        opt.step()
    assert_identical((param.detach(), opt.state_dict()["state"]), before)


def test_24_bit_masters_save_compact_and_load_from_fp32_masters():
    params = make_params([torch.randn(1500)], torch.bfloat16, "cpu")
    opt = fused_optim.AdamW(params, lr=1e-2, master_weights=24)
    for _ in range(3):
        set_grads(random_grads([(1500,)], torch.bfloat16, "cpu"), params)
        opt.step()
    compact, full = opt.state_dict(), opt.torch_state_dict()
    assert compact["state"][0]["master_remainder"].dtype == torch.int8
    master = full["state"][0]["master_param"]
    assert_identical(master, master_weight(opt, params[0]))
    resumed = make_params([torch.zeros(1500)], torch.bfloat16, "cpu")
    resumed_opt = fused_optim.AdamW(resumed, lr=1e-2, master_weights=24)
    resumed_opt.load_state_dict(copy.deepcopy(full))  # an fp32 master: split into the param and an int8 remainder
    assert resumed_opt.state[resumed[0]]["master_remainder"].dtype == torch.int8
    assert_identical(master_weight(resumed_opt, resumed[0]), master)
    assert_identical(resumed[0].detach(), params[0].detach())


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_master_weights_track_fp32(backend, device):
    start, final, master, reference = tiny_update_run(backend, device, "master")
    # the fp32 copy follows the exact result (50 fp32 roundings of values below 2, 6e-8 at most each)
    assert (master - reference).abs().max() <= 50 * 6e-8
    # and the bf16 param is that master rounded to nearest (ties away from zero: its remainder's rounding), within
    # half an ulp (2^-8) of the exact result
    assert torch.equal(final, round_like_master(master.float()).double())
    assert (final - reference).abs().max() <= 2.0**-8 + 50 * 6e-8


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_stochastic_rounding_tracks_fp32_in_expectation(backend, device):
    start, final, master, reference = tiny_update_run(backend, device, "stochastic")
    assert master is None  # stochastic rounding keeps no copy
    moved = (start - reference).mean()
    assert moved > 0.019
    # unbiased: the mean over 4096 params is within a few % of the exact result's movement (its standard
    # error here is ~1%), while round-to-nearest loses all of it
    assert abs((final - reference).mean()) <= 0.05 * moved
    # and each param stays near the exact result: its rounding errors random-walk (about 1.5 ulps of standard
    # deviation after 50 steps that each round up with probability ~1/20), so a dozen ulps at the most
    assert (final - reference).abs().max() <= 12 * 2.0**-7


def test_stochastic_rounding_backends_agree():
    """Every backend draws the same bits (one hash of seed, tensor, step and element), so the stochastic
    results agree except where the backends' fp32 updates differ in the last bit across a threshold."""
    runs = {backend: tiny_update_run(backend, "cpu", "stochastic")[1] for backend in ("cpu", "torch", "triton")
            if backend != "triton" or TRITON_INTERPRETED}
    for backend, final in runs.items():
        assert (final == runs["cpu"]).double().mean() >= 0.99, backend


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_stochastic_rounding_is_deterministic_per_seed(backend, device):
    shapes = [(3,), (1500,)]
    init = [torch.randn(s).bfloat16() for s in shapes]
    runs = []
    for seed in (11, 11, 12):
        params = make_params(init, torch.bfloat16, device)
        opt = fused_optim.Adam([{"params": params, "seed": seed}], lr=1e-4, stochastic_rounding=True,
                               backend=backend)
        generator = torch.Generator().manual_seed(0)
        for _ in range(5):
            set_grads(random_grads(shapes, torch.bfloat16, device, generator), params)
            opt.step()
        runs.append(flat(params))
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


@pytest.mark.parametrize("cls", [fused_optim.AdamW, fused_optim.SGD])
@pytest.mark.parametrize("options", [{"stochastic_rounding": True}, {"moments": "bf16"}, {"moments": "int8"}])
def test_a_group_set_to_round_stochastically_by_hand_gets_the_seed_the_constructor_gives(cls, options):
    """A group whose options are set by hand to round with random bits (after steps without) gets its own seed at
    the next step, the one the constructor gives such a group: it drew with seed 0, as every other such group did."""
    shapes = [(5,), (5,)]
    extra = {"momentum": 0.9} if cls is fused_optim.SGD else {}
    made = [[torch.nn.Parameter(torch.randn(s).bfloat16())] for s in shapes]
    by_hand = cls([{"params": ps} for ps in made], **extra)
    for ps in made:
        ps[0].grad = torch.randn(5).bfloat16()
    by_hand.step()
    for group in by_hand.param_groups:
        group.update(options)
    by_hand.step()
    built = cls([{"params": ps} for ps in made], **options, **extra)
    seeds = [group["seed"] for group in by_hand.param_groups]
    assert seeds == [group["seed"] for group in built.param_groups] and seeds[0] != seeds[1]


@pytest.mark.parametrize("options", [{"stochastic_rounding": True}, {"moments": "bf16"}, {"moments": "int8"}])
def test_stochastic_rounding_seed_follows_the_manual_seed_and_draws_nothing(options):
    params = [torch.nn.Parameter(torch.randn(3).bfloat16())]
    other_params = [torch.nn.Parameter(torch.randn(4).bfloat16())]

    def seed(params: list) -> int:
        return fused_optim.AdamW(params, **options).param_groups[0]["seed"]

    torch.manual_seed(5)
    first = seed(params)
    drawn_after = torch.rand(3)  # the script's next random numbers are what they are without our optimizer
    torch.manual_seed(5)
    assert torch.equal(drawn_after, torch.rand(3))
    torch.manual_seed(5)
    assert seed(params) == first  # a seeded run draws the same bits
    assert seed(other_params) != first  # an optimizer over other params draws others
    torch.manual_seed(6)
    assert seed(params) != first
    # groups of params of the same shapes draw apart too: the group's index is in the hash
    two_groups = fused_optim.AdamW([{"params": params}, {"params": [torch.nn.Parameter(params[0].detach().clone())]}],
                                   **options)
    assert two_groups.param_groups[0]["seed"] != two_groups.param_groups[1]["seed"]


def test_bf16_stochastic_round_is_unbiased():
    n = 50_000
    step = torch.tensor(3.0)
    for below in (1.0, 3.0e-3, -250.0):
        lower = torch.tensor(below).bfloat16()
        spacing = (torch.tensor(lower.view(torch.int16).item() + 1, dtype=torch.int16).view(torch.bfloat16).float()
                   - lower.float()).item()
        for fraction in (0.1, 0.5, 0.9):
            x = torch.full((n,), lower.float().item() + fraction * spacing)
            rounded = bf16_stochastic_round(x, seed=3, tensor_index=1, step=step).double()
            up = rounded != lower.double()
            # only the two neighbours, the far one as often as the fraction says (4 sigma: 0.009)
            assert ((rounded == lower.double()) | (rounded == lower.double() + spacing)).all()
            assert abs(up.double().mean().item() - fraction) <= 0.01, (below, fraction)
            assert abs(rounded.mean().item() - x.double().mean().item()) <= 0.01 * abs(spacing)
    special = torch.tensor([math.inf, -math.inf, math.nan, 1.0, 0.0, -2.0])
    out = bf16_stochastic_round(special, 3, 1, step).float()
    assert torch.equal(out[[0, 1, 3, 4, 5]], special[[0, 1, 3, 4, 5]]) and out[2].isnan()  # exact values stay
    # the same (seed, tensor, step) draws the same bits; another step draws others
    x = torch.rand(1000)
    assert torch.equal(bf16_stochastic_round(x, 3, 1, step), bf16_stochastic_round(x, 3, 1, step))
    assert not torch.equal(bf16_stochastic_round(x, 3, 1, step), bf16_stochastic_round(x, 3, 1, step + 1))


def test_master_weights_and_stochastic_rounding_are_alternatives():
    with pytest.raises(ValueError, match="master_weights and stochastic_rounding"):
        fused_optim.AdamW([torch.nn.Parameter(torch.randn(3))], master_weights=True, stochastic_rounding=True)


ROUNDING_CASES = [  # fp32 values whose rounding to bf16 / fp16 is easy to get wrong
    1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, -(1.0 + 2.0**-8), 1.0 + 2.0**-8 + 2.0**-20,  # bf16 ties (to even), near-tie
    1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11, 2049.0 / 2048 + 2.0**-20,  # fp16 ties, near-tie
    3.0e38, 3.4028234663852886e38, 65504.0, 65520.0, 7.0e4,  # near or past each format's largest: to inf or not
    1.0e-40, 3.0e-7, 1.0e-8, -1.0e-8,  # subnormal, underflow (-0.0 is no case: p - 0 * u may give +0.0)
    math.inf, -math.inf, math.nan, 0.1, -2.5e-3, 1234.5678,
]


def step_with_lr_0(backend, device, param, master) -> None:
    """One adam_step_ of lr 0 over `param` with `master` as its master weight: the update writes the master's own
    value back, so the param's rounding of chosen fp32 values can be read."""
    zeros = torch.zeros(param.shape, device=device)
    adam_step([param], [torch.randn(param.shape).to(device=device, dtype=param.dtype)], [zeros.clone()],
              [zeros.clone()], [], [master], [torch.zeros((), device=device)], lr=0.0, beta1=0.9, beta2=0.999,
              eps=1e-8, weight_decay=0.0, decoupled_weight_decay=False, amsgrad=False, maximize=False, backend=backend)


@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")])
@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_low_precision_params_are_rounded_to_nearest_even(backend, device, dtype):
    """The param receives its fp32 result rounded to nearest even, as torch's `.to(dtype)` rounds it (an fp32
    master copy holds the chosen values)."""
    values = torch.tensor(ROUNDING_CASES, dtype=torch.float32, device=device)
    param = torch.zeros(len(ROUNDING_CASES), dtype=dtype, device=device)
    step_with_lr_0(backend, device, param, values.clone())
    expected = values.to(dtype)
    assert torch.equal(param.isnan(), expected.isnan())
    bits, expected_bits = param.view(torch.int16), expected.view(torch.int16)  # bit for bit
    mismatch = ~param.isnan() & (bits != expected_bits)
    assert not mismatch.any(), [(ROUNDING_CASES[i], param[i].item(), expected[i].item())
                                for i in mismatch.nonzero().flatten().tolist()]


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_a_master_remainder_holds_its_fp32_value_exactly(backend, device):
    """A bf16 param with an int16 master remainder: the kernel joins them into the fp32 master, and splits the
    result into the master rounded to nearest with ties away from zero (one ulp up from ties to even on the ties
    of ROUNDING_CASES) and the exact rest, bit for bit as fused_optim.master_remainder does."""
    values = torch.tensor(ROUNDING_CASES, dtype=torch.float32, device=device)
    param, remainder = split_master(torch.zeros_like(values))
    param, remainder = param.clone(), remainder.clone()
    start_param, start_remainder = split_master(values)
    param.copy_(start_param)
    remainder.copy_(start_remainder)
    step_with_lr_0(backend, device, param, remainder)
    joined = join_master(param, remainder)
    finite = ~values.isnan()
    assert torch.equal(joined[finite].view(torch.int32), values[finite].view(torch.int32))
    assert joined[~finite].isnan().all() and param[~finite].isnan().all()
    assert torch.equal(param[finite].view(torch.int16), round_like_master(values)[finite].view(torch.int16))
    assert (param != values.bfloat16())[finite].sum() == 2  # the two bf16 ties, 1 + 2^-8 and its negative


@pytest.mark.parametrize("bits", [32, 24])
def test_a_nan_master_with_its_payload_in_the_low_bits_splits_into_a_nan_param(bits):
    """The param takes the master's top 16 bits, which for a NaN whose payload lies in its low bits alone
    (0x7F800001, 0xFF800001) are an inf's: the split sets the quiet bit, so the param stays NaN."""
    master = torch.tensor([0x7F800001, -0x7FFFFF, 0x7FC00000], dtype=torch.int32).view(torch.float32)
    assert master.isnan().all()
    param, remainder = split_master(master, bits)
    assert param.isnan().all() and join_master(param, remainder).isnan().all()


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_master_weights_leave_fp32_params_alone(backend, device):
    init = [torch.randn(5)]
    ours, plain = make_params(init, torch.float32, device), make_params(init, torch.float32, device)
    opt = fused_optim.AdamW(ours, master_weights=True, backend=backend)
    plain_opt = fused_optim.AdamW(plain, backend=backend)
    set_grads(random_grads([(5,)], device=device), ours, plain)
    opt.step()
    plain_opt.step()
    assert "master_param" not in opt.state[ours[0]]
    assert torch.equal(ours[0], plain[0])


# ----------------------------------------------------------------------------------------------------------------
# bad input: torch's error type and words where torch has them, and nothing changed


def test_differentiable_with_max_grad_norm_is_rejected():
    """A differentiable step is torch's own update (tests/test_optim_db.py), which has no clipping."""
    with pytest.raises(ValueError, match="differentiable"):
        fused_optim.AdamW([torch.nn.Parameter(torch.randn(3))], differentiable=True, max_grad_norm=1.0)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_sparse_grad_raises_torchs_error_and_changes_nothing(backend, device):
    param = torch.nn.Parameter(torch.randn(4, 3, device=device))
    opt = fused_optim.Adam([param], backend=backend)
    param.grad = torch.randn(4, 3, device=device)
    opt.step()
    param.grad = torch.randn(4, 3, device=device).to_sparse()
    before = snapshot(opt)
    with pytest.raises(RuntimeError, match=re.escape(
            "Adam does not support sparse gradients, please consider SparseAdam instead")):
        opt.step()
    assert_identical(snapshot(opt), before)


@pytest.mark.parametrize("dtype", [torch.complex64, torch.float64], ids=["complex64", "float64"])
@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_complex_and_float64_params_step_as_torchs(backend, device, dtype):
    """Complex params run the kernels on their real views (torch's Adam does the same arithmetic), float64 ones
    torch's own fused Adam whatever the backend; both keep state of their own dtype, as torch does."""
    init = [torch.randn(7, 3, dtype=dtype), torch.randn(5, dtype=dtype)]
    ours, theirs = make_params(init, dtype, device), make_params(init, dtype, device)
    opt = fused_optim.AdamW(ours, lr=0.01, weight_decay=0.1, amsgrad=True, backend=backend)
    torch_opt = torch.optim.AdamW(theirs, lr=0.01, weight_decay=0.1, amsgrad=True, foreach=False)
    for _ in range(3):
        set_grads(random_grads([p.shape for p in ours], dtype, device), ours, theirs)
        opt.step()
        torch_opt.step()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q)
        assert opt.state[p]["exp_avg"].dtype == dtype


FIRST_STEP_FAILURES = {  # backend, param dtype, grad maker
    "sparse-grad": ("auto", torch.float32, lambda: torch.randn(3).to_sparse()),
    "cuda-backend-on-cpu": ("cuda", torch.float32, lambda: torch.randn(3)),
}


@pytest.mark.parametrize("failure", list(FIRST_STEP_FAILURES))
def test_failed_first_step_leaves_no_state(failure):
    """torch.optim checks grads and params before it creates any state; a first step that fails must leave the
    optimizer as it was: no state, so its state_dict is that of an optimizer that never stepped."""
    backend, dtype, make_grad = FIRST_STEP_FAILURES[failure]
    param = torch.nn.Parameter(torch.randn(3, dtype=dtype))
    opt = fused_optim.AdamW([param], backend=backend)
    param.grad = make_grad()
    with pytest.raises(Exception):
        opt.step()
    assert dict(opt.state) == {}
    assert opt.state_dict()["state"] == {}


def _trained(shapes, groups=1, steps=2):
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    per_group = len(params) // groups
    opt = fused_optim.AdamW([{"params": params[i * per_group:(i + 1) * per_group]} for i in range(groups)],
                            lr=1e-2, amsgrad=True)
    for _ in range(steps):
        set_grads(random_grads(shapes), params)
        opt.step()
    return params, opt


BAD_STATE_DICTS = {
    # (shapes of the params it was saved from, their number of groups, does torch raise the same at load time)
    "two-groups-for-one": ([(3,), (4,)], 2, True),
    "one-param-for-two": ([(3,)], 1, True),
    "wrong-shapes": ([(3,), (5,)], 1, False),
}


@pytest.mark.parametrize("kind", list(BAD_STATE_DICTS))
def test_bad_state_dict_raises_and_changes_nothing(kind):
    shapes, groups, torch_raises = BAD_STATE_DICTS[kind]
    _, source = _trained(shapes, groups)
    params, opt = _trained([(3,), (4,)])
    twin_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    twin = fused_optim.AdamW(twin_params, lr=1e-2, amsgrad=True)
    twin.load_state_dict(copy.deepcopy(opt.state_dict()))  # its own tensors: a live state_dict() shares them
    before = snapshot(opt)
    with pytest.raises(ValueError) as our_error:
        opt.load_state_dict(source.state_dict())
    assert_identical(snapshot(opt), before)
    if torch_raises:
        torch_opt = torch.optim.AdamW([torch.nn.Parameter(torch.randn(s)) for s in [(3,), (4,)]])
        with pytest.raises(ValueError) as torch_error:
            torch_opt.load_state_dict(source.state_dict())
        assert str(our_error.value) == str(torch_error.value)
    # and the optimizer goes on exactly as one that never saw the bad state dict
    grads = random_grads([(3,), (4,)])
    set_grads(grads, params, twin_params)
    opt.step()
    twin.step()
    assert all(torch.equal(p, q) for p, q in zip(params, twin_params))


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="backend must be one of auto, cuda, triton, cpu, torch; got 'gpu'"):
        fused_optim.AdamW([torch.nn.Parameter(torch.randn(3))], backend="gpu")


def test_cuda_backend_on_cpu_tensors_says_why_in_one_sentence():
    param = torch.nn.Parameter(torch.randn(3))
    opt = fused_optim.AdamW([param], backend="cuda")
    param.grad = torch.randn(3)
    before = param.detach().clone()
    with pytest.raises(RuntimeError) as error:
        opt.step()
    message = str(error.value)
    assert "cuda" in message.lower() and "cpu" in message
    assert re.fullmatch(r"[^\n]*?[.!]", message) and not re.search(r"[.!?]\s+\S", message), message
    assert torch.equal(param, before)


# ----------------------------------------------------------------------------------------------------------------
# the torch.optim API: groups, hooks, schedulers, closures, flags, signature


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_param_groups_with_different_hyperparameters(backend, device):
    shapes = [(3,), (1023,), (5,)]
    init = [torch.randn(s) for s in shapes]

    def groups(params):
        return [{"params": params[:2], "lr": 1e-2, "weight_decay": 0.0},
                {"params": params[2:], "lr": 3e-3, "weight_decay": 0.5, "amsgrad": True, "betas": (0.5, 0.9),
                 "eps": 1e-6, "maximize": True}]

    ours, theirs = make_params(init, torch.float32, device), make_params(init, torch.float32, device)
    opt = fused_optim.AdamW(groups(ours), backend=backend)
    torch_opt = torch.optim.AdamW(groups(theirs), foreach=False)
    for _ in range(4):
        set_grads(random_grads(shapes, device=device), ours, theirs)
        opt.step()
        torch_opt.step()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)


def test_add_param_group_matches_torch():
    init = [torch.randn(4), torch.randn(6)]
    ours, theirs = make_params(init, torch.float32, "cpu"), make_params(init, torch.float32, "cpu")
    opt = fused_optim.AdamW(ours[:1], lr=1e-2)
    torch_opt = torch.optim.AdamW(theirs[:1], lr=1e-2, foreach=False)
    for step in range(4):
        if step == 2:
            opt.add_param_group({"params": ours[1:], "lr": 5e-2, "amsgrad": True})
            torch_opt.add_param_group({"params": theirs[1:], "lr": 5e-2, "amsgrad": True})
        set_grads(random_grads([(4,), (6,)]), ours, theirs)
        opt.step()
        torch_opt.step()
    assert opt.param_groups[1]["weight_decay"] == 1e-2  # defaults fill the new group
    assert opt.state[ours[1]]["step"].item() == 2.0
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("set_to_none", [True, False], ids=["set_to_none", "zeros"])
def test_zero_grad_and_params_without_grads_match_torch(set_to_none):
    """Params without a grad are skipped (no update, no step count); zeroed grads still step, as in torch."""
    shapes = [(5,), (6,), (7,)]
    init = [torch.randn(s) for s in shapes]
    ours, theirs = make_params(init, torch.float32, "cpu"), make_params(init, torch.float32, "cpu")
    opt = fused_optim.AdamW(ours, lr=1e-2)
    torch_opt = torch.optim.AdamW(theirs, lr=1e-2, foreach=False)
    for step in range(5):
        grads = random_grads(shapes)
        for i, (p, q) in enumerate(zip(ours, theirs)):
            if step == 2 and i == 1:
                continue  # param 1 gets no fresh grad this step
            p.grad, q.grad = grads[i].clone(), grads[i].clone()
        opt.step()
        torch_opt.step()
        opt.zero_grad(set_to_none=set_to_none)
        torch_opt.zero_grad(set_to_none=set_to_none)
        assert all((p.grad is None) if set_to_none else torch.equal(p.grad, torch.zeros_like(p)) for p in ours)
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)
        assert opt.state[p]["step"].item() == torch_opt.state[q]["step"].item()
    assert opt.state[ours[1]]["step"].item() == (5.0 if not set_to_none else 4.0)
    # after zero_grad(set_to_none=True) a step touches nothing
    if set_to_none:
        before = snapshot(opt)
        opt.step()
        assert_identical(snapshot(opt), before)


def test_step_hooks_are_called():
    param = torch.nn.Parameter(torch.randn(3))
    opt = fused_optim.AdamW([param])
    calls = []
    pre = opt.register_step_pre_hook(lambda o, args, kwargs: calls.append(("pre", o.state.get(param, {}).get("step"))))
    post = opt.register_step_post_hook(lambda o, args, kwargs: calls.append(("post", o.state[param]["step"].item())))
    param.grad = torch.randn(3)
    opt.step()
    assert calls == [("pre", None), ("post", 1.0)]
    pre.remove()
    post.remove()
    opt.step()
    assert len(calls) == 2


SCHEDULERS = {
    "StepLR": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
    "LambdaLR": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step)),
}


@pytest.mark.parametrize("lr_tensor", [False, True], ids=["lr-float", "lr-tensor"])
@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
@pytest.mark.parametrize("backend, device", CPU_BACKENDS)
def test_lr_scheduler_matches_torch(backend, device, scheduler, lr_tensor):
    shapes = [(3,), (100,)]
    init = [torch.randn(s) for s in shapes]
    ours, theirs = make_params(init, torch.float32, device), make_params(init, torch.float32, device)
    make_lr = (lambda: torch.tensor(1e-2)) if lr_tensor else (lambda: 1e-2)
    opt = fused_optim.AdamW(ours, lr=make_lr(), backend=backend)
    torch_opt = torch.optim.AdamW(theirs, lr=make_lr(), foreach=False)
    schedule, torch_schedule = SCHEDULERS[scheduler](opt), SCHEDULERS[scheduler](torch_opt)
    lrs, torch_lrs = [], []
    for _ in range(6):
        set_grads(random_grads(shapes), ours, theirs)
        opt.step()
        torch_opt.step()
        schedule.step()
        torch_schedule.step()
        lrs.append(float(opt.param_groups[0]["lr"]))
        torch_lrs.append(float(torch_opt.param_groups[0]["lr"]))
    assert lrs == torch_lrs
    assert torch.is_tensor(opt.param_groups[0]["lr"]) == lr_tensor  # a tensor lr stays a tensor (filled in place)
    assert lrs[-1] < 1e-2 / 2  # the schedule did lower the lr
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)


def test_closure_returns_the_loss():
    model = torch.nn.Linear(4, 1)
    opt = fused_optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randn(8, 4)
    before = [p.detach().clone() for p in model.parameters()]

    def closure():
        opt.zero_grad()
        loss = model(x).square().mean()
        loss.backward()  # the closure runs with grad enabled, although step() itself is no_grad
        return loss

    loss = opt.step(closure)
    assert torch.is_tensor(loss) and loss.item() == pytest.approx(
        torch.nn.functional.linear(x, *before).square().mean().item())
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_foreach_fused_capturable_are_accepted_and_change_nothing():
    init = [torch.randn(50)]
    plain = make_params(init, torch.float32, "cpu")
    plain_opt = fused_optim.AdamW(plain, lr=1e-2)
    flagged = make_params(init, torch.float32, "cpu")
    flagged_opt = fused_optim.AdamW(flagged, lr=1e-2, fused=True, capturable=True)
    adam = fused_optim.Adam(make_params(init, torch.float32, "cpu"), foreach=True, capturable=True)
    assert flagged_opt.param_groups[0]["fused"] is True and adam.param_groups[0]["foreach"] is True
    for _ in range(2):
        set_grads(random_grads([(50,)]), plain, flagged)
        plain_opt.step()
        flagged_opt.step()
    assert torch.equal(plain[0], flagged[0])


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_signature_is_a_superset_of_torchs(name):
    ours = inspect.signature(getattr(fused_optim, name)).parameters
    theirs = inspect.signature(getattr(torch.optim, name)).parameters
    assert set(theirs) <= set(ours), set(theirs) - set(ours)
    for key, parameter in theirs.items():
        assert ours[key].default == parameter.default, key
        assert ours[key].kind == parameter.kind, key
    # the positional ones in torch's order
    positional = [k for k, p in theirs.items() if p.kind == p.POSITIONAL_OR_KEYWORD]
    assert [k for k, p in ours.items() if p.kind == p.POSITIONAL_OR_KEYWORD] == positional
    assert {"master_weights", "stochastic_rounding", "backend"} <= set(ours)


# ----------------------------------------------------------------------------------------------------------------
# the ops: opcheck, torch.compile


def _op_sample(kind: str):
    """Arguments of one op call over two small tensors, in the schema's order."""
    dtype = torch.bfloat16 if kind.startswith("bf16") else torch.float32
    amsgrad = kind in ("fp32-amsgrad", "grad-scale", "int8-moments")
    shapes = [(3,), (2, 17)]
    params = [torch.randn(s).to(dtype) for s in shapes]
    grads = [torch.randn(s).to(dtype) for s in shapes]
    exp_avgs = [0.1 * torch.randn(s) for s in shapes]
    exp_avg_sqs = [torch.rand(s) for s in shapes]
    max_sqs = [torch.rand(s) + 1 for s in shapes] if amsgrad else []
    masters = [p.float() + 1e-3 for p in params] if kind == "bf16-master" else []
    steps = [torch.tensor(4.0) for _ in shapes]
    moment_scales = []
    if kind == "int8-moments":  # exp_avg int8 codes, the others uint8, with their block scales
        quantized = [[quantize(t, signed) for t in tensors]
                     for tensors, signed in ((exp_avgs, True), (exp_avg_sqs, False), (max_sqs, False))]
        exp_avgs, exp_avg_sqs, max_sqs = ([codes for codes, _ in q] for q in quantized)
        moment_scales = [torch.stack([q[i][1] for q in quantized if q]) for i in range(len(shapes))]
    lr_tensor = {"lr-tensor": torch.tensor(1e-3),
                 "lr-tensor-fp64": torch.tensor(1e-3 / 3, dtype=torch.float64)}.get(kind)
    grad_scale = torch.tensor(4.0) if kind in ("grad-scale", "found-inf") else None
    found_inf = torch.tensor(1.0 if kind == "found-inf" else 0.0) if grad_scale is not None else None
    maximize = kind == "lr-tensor"  # one sample with maximize on
    decoupled = kind != "fp32-amsgrad"  # and one with Adam's coupled decay
    return (params, grads, exp_avgs, exp_avg_sqs, max_sqs, masters, steps, moment_scales, 1e-3, lr_tensor, 0.9,
            0.999, 1e-8,
            0.01, decoupled, amsgrad, maximize, kind == "bf16-stochastic", 123, grad_scale, found_inf)


OPS = [
    pytest.param("adam_step_", id="cpu"),
    pytest.param("adam_step_torch_", id="torch"),
    pytest.param("adam_step_triton_", id="triton-interpreted",
                 marks=pytest.mark.skipif(not TRITON_INTERPRETED, reason="Triton runs CPU tensors only interpreted")),
]


@pytest.mark.parametrize("kind", ["fp32-amsgrad", "bf16-master", "bf16-stochastic", "lr-tensor", "lr-tensor-fp64",
                                  "grad-scale", "found-inf", "int8-moments"])
@pytest.mark.parametrize("op_name", OPS)
def test_opcheck(op_name, kind):
    # All of opcheck's utils apply: the ops mutate only what their schema marks (Tensor(a!)[]), have a fake
    # impl (they return nothing), and AOT dispatch traces them as opaque mutating calls.
    op = getattr(torch.ops.fused_optim, op_name).default
    torch.library.opcheck(op, _op_sample(kind))


@pytest.mark.parametrize("op_name", OPS)
def test_op_reads_a_float64_lr_tensor_exactly_and_refuses_other_float64_scalars(op_name):
    """An fp64 lr_tensor (a compiled step's float lr) steps as the float lr does, bit for bit; grad_scale and
    found_inf stay fp32 beside fp32 params, refused in one sentence before anything is written."""
    op = getattr(torch.ops.fused_optim, op_name).default
    results = []
    for lr, lr_tensor in ((1e-3 / 3, None), (0.0, torch.tensor(1e-3 / 3, dtype=torch.float64))):
        torch.manual_seed(0)
        args = list(_op_sample("fp32-amsgrad"))
        args[8], args[9] = lr, lr_tensor
        op(*args)
        results.append(args[:7])
    assert_identical(*results)
    args = list(_op_sample("grad-scale"))
    args[19] = args[19].double()
    before = [[t.clone() for t in tensors] for tensors in args[:7]]
    with pytest.raises(RuntimeError, match="lr_tensor, grad_scale and found_inf must be one-element float32"):
        op(*args)
    assert_identical(args[:7], before)


def test_op_is_fake_tensor_traceable_on_meta():
    args = [[t.to("meta") for t in a] if isinstance(a, list) else a for a in _op_sample("fp32-amsgrad")]
    torch.ops.fused_optim.adam_step_.default(*args)  # the fake impl: no error, no output


def test_torch_compile_fullgraph_functional_step_matches_eager():
    """The functional entry point alone (no Optimizer machinery) compiles into one graph too, with the op's
    in-place writes to params, moments and step counts visible after the compiled call."""
    torch._dynamo.reset()
    shapes = [(3,), (100,)]
    init = [torch.randn(s) for s in shapes]

    def fresh():
        return ([x.clone() for x in init], [torch.zeros(s) for s in shapes], [torch.zeros(s) for s in shapes],
                [torch.zeros(()) for _ in shapes])

    def step(params, grads, exp_avgs, exp_avg_sqs, steps, lr):
        adam_step(params, grads, exp_avgs, exp_avg_sqs, [], [], steps, lr=lr, beta1=0.9, beta2=0.999, eps=1e-8,
                  weight_decay=0.01, decoupled_weight_decay=True, amsgrad=False, maximize=False, backend="cpu")

    compiled_step = torch.compile(step, fullgraph=True)
    compiled, eager = fresh(), fresh()
    lr = torch.tensor(1e-2)
    for _ in range(2):
        grads = random_grads(shapes)
        compiled_step(compiled[0], grads, *compiled[1:], lr)
        step(eager[0], grads, *eager[1:], lr)
    for a, b in zip(compiled, eager):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert compiled[3][0].item() == 2.0


# ----------------------------------------------------------------------------------------------------------------
# random configurations


@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(
    sizes=st.lists(st.integers(0, 300), min_size=1, max_size=3),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    decoupled=st.booleans(),
    weight_decay=st.sampled_from([0.0, 0.01, 0.3]),
    amsgrad=st.booleans(),
    maximize=st.booleans(),
    lr=st.floats(1e-4, 1e-1),
    lr_tensor=st.booleans(),
    betas=st.tuples(st.sampled_from([0.0, 0.5, 0.9]), st.sampled_from([0.9, 0.999, 0.9999])),
    steps=st.integers(1, 4),
    backend=st.sampled_from(["cpu", "torch"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_configs_match_reference(sizes, dtype, decoupled, weight_decay, amsgrad, maximize, lr, lr_tensor,
                                        betas, steps, backend, seed):
    generator = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(n, generator=generator).to(dtype)) for n in sizes]
    options = dict(weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize, betas=betas)
    opt = fused_optim.Adam(params, lr=torch.tensor(lr) if lr_tensor else lr, decoupled_weight_decay=decoupled,
                           backend=backend, **options)
    ref_lr = float(torch.tensor(lr))  # the kernels take the lr in fp32
    reference = ReferenceAdam(params, lr=ref_lr, decoupled_weight_decay=decoupled, **options)
    rounded = ReferenceAdam(params, lr=ref_lr, decoupled_weight_decay=decoupled, **options)
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
        # a few fp32 roundings per step of values of the params' size
        magnitude = flat(reference.params).abs().max().item() + lr
        assert (ours - flat(reference.params)).abs().max() <= steps * 4 * ulp(dtype, magnitude)
    else:
        # fp32 state and math: within an ulp or two of the reference rounded to the param dtype after each step
        assert within_two_ulps(ours, flat(rounded.params), dtype).all()


# ----------------------------------------------------------------------------------------------------------------
# copies, frozen params, unsupported dtypes, many tensors in one call


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_frozen_params_are_skipped_step_after_step(backend, device):
    """A param without a grad is left alone (no state), step after step, while the others match torch."""
    shapes = [(5,), (7,), (9,)]
    init = [torch.randn(s) for s in shapes]
    ours, theirs = make_params(init, torch.float32, device), make_params(init, torch.float32, device)
    opt = fused_optim.AdamW(ours, lr=1e-2, backend=backend)
    torch_opt = torch.optim.AdamW(theirs, lr=1e-2, foreach=False)
    for step in range(4):
        grads = random_grads(shapes, device=device)
        set_grads(grads, ours, theirs)
        if step < 2:  # the middle param is frozen for two steps, then trains
            ours[1].grad = theirs[1].grad = None
        opt.step()
        torch_opt.step()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)
    assert opt.state[ours[1]]["step"].item() == 2 and opt.state[ours[0]]["step"].item() == 4


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_op_refuses_a_step_count_of_the_wrong_dtype(backend, device):
    """The kernels read the step count through a raw pointer as fp32: any other dtype is refused, not misread."""
    p, g = torch.randn(8, device=device), torch.randn(8, device=device)
    m, v = torch.zeros(8, device=device), torch.zeros(8, device=device)
    step = torch.zeros((), dtype=torch.float64, device=device)
    before = p.clone()
    with pytest.raises(RuntimeError, match="step"):
        adam_step([p], [g], [m], [v], [], [], [step], lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                  decoupled_weight_decay=True, amsgrad=False, maximize=False, backend=backend)
    assert torch.equal(p, before) and step.item() == 0


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_many_tensors_of_mixed_dtypes_in_one_group_match_the_cpu_kernel(backend):
    """700 tensors, bf16 then fp32 then bf16 with stochastic rounding off and amsgrad on: the CUDA launcher splits
    them into several launches (320 tensors a table, a new launch at each dtype change); every tensor must come out
    as the CPU kernel computes it."""
    torch.manual_seed(0)
    sizes = [int(n) for n in torch.randint(0, 3000, (700,))]
    dtypes = [torch.bfloat16] * 200 + [torch.float32] * 300 + [torch.bfloat16] * 200
    init = [torch.randn(n) for n in sizes]
    grads = [torch.randn(n) for n in sizes]
    results = {}
    for which, device in ((backend, "cuda"), ("cpu", "cpu")):
        params = [torch.nn.Parameter(x.to(device=device, dtype=d)) for x, d in zip(init, dtypes)]
        opt = fused_optim.AdamW(params, lr=1e-2, amsgrad=True, backend=which)
        for _ in range(3):
            for p, g in zip(params, grads):
                p.grad = g.to(device=device, dtype=p.dtype)
            opt.step()
        results[which] = [p.detach().float().cpu() for p in params]
        assert all(opt.state[p]["step"].item() == 3 for p in params)
    # No multiply-add is contracted into an FMA on any backend (nvcc --fmad=false, Triton's EXACT_ARITHMETIC, the
    # CPU's -ffp-contract=off): the CPU's bits. (With the GPU compilers' contraction, 1.3% of the bf16 elements
    # came out one ulp apart on an H100.)
    for i, (ours, cpu) in enumerate(zip(results[backend], results["cpu"])):
        assert torch.equal(ours, cpu), f"tensor {i} ({dtypes[i]})"


@pytest.mark.parametrize("fused", [None, False, True])
def test_amp_scaling_flag_is_torchs(fused):
    """torch's GradScaler hands grad_scale/found_inf to an optimizer whose `_step_supports_amp_scaling` is set, and
    frameworks read the flag as "it unscales itself, so nothing may clip before it" (Lightning refuses
    gradient_clip_val then, even under bf16 with no scaler). As torch's AdamW: set with fused=True only."""
    ours = fused_optim.AdamW([torch.nn.Parameter(torch.randn(3))], fused=fused)
    theirs = torch.optim.AdamW([torch.nn.Parameter(torch.randn(3))], fused=fused)
    assert ours._step_supports_amp_scaling == getattr(theirs, "_step_supports_amp_scaling", False) == bool(fused)
