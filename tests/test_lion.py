"""fused_optim.Lion against the float64 reference (fused_optim/reference.py) and against lion-pytorch's Lion at the
param's dtype (torch has no Lion; lion-pytorch is the reference implementation users swap out), on every backend
that runs here.

Sizes as in test_adam.py (SHAPES: all-tail, empty, one short of a Triton block, five blocks, 2-D) in one group. The
backends run the same fp32 operations in the same order (lion.h), so on the CPU they agree bit for bit, stochastic
rounding included (one hash of seed, tensor index and step count).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import BACKEND_DEVICES, CPU_BACKENDS, TRITON_INTERPRETED, master_weight
from test_adam import (DTYPES, SHAPES, assert_at_least_as_accurate_as_peer, assert_identical, errors, flat,
                       make_params, random_grads, resume_through_torch_save, set_grads, snapshot, store_rounded, ulp)
from test_adam_moments import run as run_with_bf16_moments
from test_optimizer_contract import assert_compiled_steps_match_eager
from test_sgd import split_options

try:
    import lion_pytorch
except ImportError:  # not on the GPU machines' image: the tests that compare with it are skipped there
    lion_pytorch = None

needs_lion_pytorch = pytest.mark.skipif(lion_pytorch is None, reason="lion-pytorch (the peer) is not installed")

import fused_optim
from fused_optim.int8_moments import dequantize, quantize
from fused_optim.master_remainder import round_like_master
from fused_optim.ops.lion import lion_step
from fused_optim.reference import ReferenceLion

# Each option on and off at least once, and all together; `lr_tensor` passes the lr as a one-element tensor.
OPTIONS = {
    "plain": dict(),
    "weight_decay": dict(weight_decay=0.5),
    "betas": dict(betas=(0.95, 0.98)),
    "maximize-lr_tensor": dict(maximize=True, lr_tensor=True),
    "everything": dict(betas=(0.8, 0.995), weight_decay=0.3, maximize=True, lr_tensor=True),
}


def run(backend, device, dtype, init, grads, steps=None, **kwargs) -> tuple[list[torch.Tensor], fused_optim.Lion]:
    """Our Lion over `grads` (one list per step) from params `init`; (params, optimizer)."""
    params = make_params(init, dtype, device)
    opt = fused_optim.Lion(params, backend=backend, **{"lr": 1e-2, **kwargs})
    for step_grads in grads[:steps]:
        set_grads(step_grads, params)
        opt.step()
    return params, opt


# ----------------------------------------------------------------------------------------------------------------
# correctness: the float64 reference and lion-pytorch at the same dtype


@pytest.mark.interpreted_cover(1)
@needs_lion_pytorch
@pytest.mark.parametrize("options", list(OPTIONS.values()), ids=list(OPTIONS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_matches_reference_at_least_as_well_as_lion_pytorch(backend, device, dtype, options):
    check_against_reference_and_lion_pytorch(backend, device, dtype, options, SHAPES)


def check_against_reference_and_lion_pytorch(backend, device, dtype, options, shapes, steps=5, lr=1e-2) -> None:
    """`steps` steps of ours and lion-pytorch's at `dtype` on params of `shapes`, each compared with the float64
    reference: ours never worse (shared with tests/test_fuzz.py)."""
    kwargs, make_lr, ref_lr = split_options(options, lr)
    init = [torch.randn(s) for s in shapes]
    ours, theirs = make_params(init, dtype, device), make_params(init, dtype, device)
    opt = fused_optim.Lion(ours, lr=make_lr(), backend=backend, **kwargs)
    peer = lion_pytorch.Lion(theirs, lr=ref_lr, **{k: v for k, v in kwargs.items() if k != "maximize"})
    reference = ReferenceLion(ours, lr=ref_lr, **kwargs)
    # The reference with its params rounded to the param dtype after every step: an optimizer whose only error is
    # storing the param in a low-precision dtype.
    rounded = ReferenceLion(ours, lr=ref_lr, **kwargs)
    for _ in range(steps):
        grads = random_grads(shapes, dtype, device)
        for p in ours:
            p.grad = torch.full_like(p, math.nan)  # poison: replaced below, so a kernel reading stale grads shows
        set_grads(grads, ours)
        set_grads([-g for g in grads] if kwargs.get("maximize") else grads, theirs)  # lion-pytorch has no maximize
        opt.step()
        peer.step()
        reference.step(grads)
        rounded.step(grads)
        store_rounded(rounded, dtype)

    assert all(p.dtype == dtype and p.device.type == device for p in ours)
    assert torch.isfinite(flat(ours)).all()
    for p in ours:
        state = opt.state[p]
        assert state["exp_avg"].dtype == torch.float32 and state["step"].item() == steps
        assert state["step"].device == p.device
    if flat(ours).numel() == 0:  # only empty params: nothing to compare, and nothing may have gone wrong
        return
    # only where every step's sign was definite in both references (their `ambiguous`: there fp32 and float64 may
    # take different signs, a 2·lr step apart)
    definite = ~(flat(reference.ambiguous).bool() | flat(rounded.ambiguous).bool())
    assert_at_least_as_accurate_as_peer(ours, theirs, reference, rounded, init, dtype, steps, keep=definite)
    magnitude = flat(reference.params).abs().max().item()
    # where a direction was within rounding of 0 a sign may differ, 2·lr a step; storing the param rounds each step
    assert (flat(ours) - flat(reference.params)).abs().max() <= 2 * lr * steps + steps * ulp(dtype, magnitude)


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_backends_agree_bit_for_bit(dtype):
    """The C++ CPU kernel, the Triton kernel (interpreted) and the torch ops run lion.h's operations in one order."""
    init = [torch.randn(s) for s in SHAPES]
    grads = [random_grads(SHAPES, dtype) for _ in range(5)]
    results = {backend: run(backend, device, dtype, init, grads, weight_decay=0.2, maximize=True)
               for backend, device in (p.values for p in CPU_BACKENDS)}
    (first_backend, (first_params, first_opt)), *others = results.items()
    for backend, (params, opt) in others:
        assert_identical([p.detach() for p in params], [p.detach() for p in first_params], f"{backend} params")
        assert_identical([opt.state[p]["exp_avg"] for p in params],
                         [first_opt.state[p]["exp_avg"] for p in first_params], f"{backend} vs {first_backend}")


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_master_weights_step_the_fp32_trajectory(backend, device):
    """bf16 params with master weights (an int16 remainder beside each): the masters follow an fp32 Lion's params
    bit for bit (same grads), and each param is its master rounded to nearest, ties away from zero."""
    init = [torch.randn(s) for s in SHAPES]
    grads = [random_grads(SHAPES, torch.bfloat16, device) for _ in range(5)]
    fp32_params, _ = run(backend, device, torch.float32, [x.bfloat16().float() for x in init],
                         [[g.float() for g in step] for step in grads], weight_decay=0.1)
    params, opt = run(backend, device, torch.bfloat16, init, grads, weight_decay=0.1, master_weights=True)
    for p, expected in zip(params, fp32_params):
        master = master_weight(opt, p)
        assert_identical(master, expected.detach())
        assert_identical(p.detach(), round_like_master(master))


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_stochastic_rounding_is_unbiased_and_reproducible(backend, device):
    """bf16 params rounded stochastically: the same seed gives the same bits, and the rounded params average to
    the fp32 result within sampling error; to nearest, a step under half a bf16 ulp would mostly vanish."""
    lr, shapes = 1e-3, [(65536,)]
    init = [torch.randn(s) for s in shapes]
    grads = [random_grads(shapes, torch.bfloat16, device)]
    fp32_params, _ = run(backend, device, torch.float32, [x.bfloat16().float() for x in init],
                         [[g.float() for g in grads[0]]], lr=lr)
    first, opt = run(backend, device, torch.bfloat16, init, grads, lr=lr, stochastic_rounding=True)
    params = make_params(init, torch.bfloat16, device)
    again = fused_optim.Lion(params, lr=lr, backend=backend, stochastic_rounding=True)
    again.param_groups[0]["seed"] = opt.param_groups[0]["seed"]
    set_grads(grads[0], params)
    again.step()
    assert_identical(params[0].detach(), first[0].detach())
    # the error along each element's update: stochastic rounding's averages to 0; nearest's is most of the step
    target = fp32_params[0].detach().double()
    direction = torch.sign(target - init[0].bfloat16().double())
    error = (first[0].detach().double() - target) * direction
    standard_error = error.std().item() / math.sqrt(error.numel())
    assert abs(error.mean().item()) < 5 * standard_error
    assert abs(error.mean().item()) < 0.05 * lr
    nearest = (target.bfloat16().double() - target) * direction
    assert nearest.mean().item() < -0.25 * lr


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_a_skipped_step_changes_nothing_and_grad_scale_unscales(backend, device):
    init = [torch.randn(s) for s in SHAPES]
    grads = random_grads(SHAPES, torch.float32, device)
    params = [x.to(device) for x in init]
    exp_avgs = [torch.randn_like(p) for p in params]
    steps = [torch.zeros((), device=device) for _ in params]
    before = [t.detach().clone() for t in (*params, *exp_avgs, *steps)]
    lion_step(params, grads, exp_avgs, [], steps, lr=0.1, beta1=0.9, beta2=0.99, weight_decay=0.1, maximize=False,
              found_inf=torch.ones((), device=device), backend=backend)
    assert_identical([t.detach() for t in (*params, *exp_avgs, *steps)], before)
    # a grad scale of 4 on grads 4x larger: the unscaled step, bit for bit
    expected = [x.to(device) for x in init]
    expected_avgs = [m.clone() for m in exp_avgs]
    lion_step(expected, grads, expected_avgs, [], [s.clone() for s in steps], lr=0.1, beta1=0.9, beta2=0.99,
              weight_decay=0.1, maximize=False, backend=backend)
    lion_step(params, [4 * g for g in grads], exp_avgs, [], steps, lr=0.1, beta1=0.9, beta2=0.99, weight_decay=0.1,
              maximize=False, grad_scale=torch.full((), 4.0, device=device), found_inf=torch.zeros((), device=device),
              backend=backend)
    assert_identical([p.detach() for p in params], [p.detach() for p in expected])
    assert_identical(exp_avgs, expected_avgs)
    assert all(s.item() == 1 for s in steps)


@pytest.mark.parametrize("backend, device", CPU_BACKENDS)
def test_max_grad_norm_clips_as_clip_grad_norm_then_step(backend, device):
    init = [torch.randn(s) for s in SHAPES]
    grads = [[10 * g for g in random_grads(SHAPES)] for _ in range(3)]
    ours, opt = run(backend, device, torch.float32, init, grads, max_grad_norm=1.0)
    theirs = make_params(init, torch.float32, device)
    plain = fused_optim.Lion(theirs, lr=1e-2, backend=backend)
    for step_grads in grads:
        set_grads(step_grads, theirs)
        norm = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
        plain.step()
    torch.testing.assert_close(flat(ours), flat(theirs), rtol=0, atol=1e-6)
    torch.testing.assert_close(opt.last_grad_norm.double(), norm.double(), rtol=1e-6, atol=0)


def test_float64_params_step_in_float64():
    init = [torch.randn(s) for s in SHAPES]
    grads = [random_grads(SHAPES, torch.float64) for _ in range(3)]
    params, opt = run("auto", "cpu", torch.float64, init, grads, weight_decay=0.1)
    reference = ReferenceLion(init, lr=1e-2, weight_decay=0.1)
    for step_grads in grads:
        reference.step(step_grads)
    torch.testing.assert_close(flat(params), flat(reference.params), rtol=0, atol=1e-12)
    assert all(opt.state[p]["exp_avg"].dtype == torch.float64 for p in params)


# ----------------------------------------------------------------------------------------------------------------
# state: state_dict round trips, resuming, copies


@pytest.mark.parametrize("backend, device", CPU_BACKENDS)
def test_resuming_from_a_state_dict_is_bit_identical(backend, device):
    init = [torch.randn(s) for s in SHAPES]
    grads = [random_grads(SHAPES, torch.bfloat16) for _ in range(6)]
    options = dict(weight_decay=0.1, master_weights=True)
    straight, straight_opt = run(backend, device, torch.bfloat16, init, grads, **options)
    halfway, halfway_opt = run(backend, device, torch.bfloat16, init, grads, steps=3, **options)
    resumed, resumed_opt = resume_through_torch_save(
        halfway, halfway_opt, lambda params: fused_optim.Lion(params, lr=1e-2, backend=backend, **options), grads[3:])
    assert_identical([p.detach() for p in resumed], [p.detach() for p in straight])
    assert_identical(resumed_opt.state_dict(), straight_opt.state_dict())
    copied = copy.deepcopy(resumed_opt)
    assert copied.backend == backend and copied.state_dict()["param_groups"] == resumed_opt.state_dict()["param_groups"]


@needs_lion_pytorch
@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_decoupled_weight_decay_divides_by_the_initial_lr_as_lion_pytorch(backend, device):
    """lion-pytorch's decoupled_weight_decay=True: each group's weight decay divided by the constructor's lr, so the
    decay follows the lr schedule's shape, not its scale (checked with the lr changed between steps)."""
    shapes = [(3,), (1023,)]
    init = [torch.randn(s) for s in shapes]
    ours, theirs = make_params(init, torch.float32, device), make_params(init, torch.float32, device)
    opt = fused_optim.Lion(ours, 1e-2, (0.9, 0.99), 0.1, False, True, backend=backend)  # lion-pytorch's positions
    peer = lion_pytorch.Lion(theirs, lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True)
    reference = ReferenceLion(ours, lr=1e-2, weight_decay=0.1 / 1e-2)
    for lr in (1e-2, 1e-2, 3e-3, 1e-3):
        for group in (*opt.param_groups, *peer.param_groups):
            group["lr"] = lr
        reference.lr = lr
        grads = random_grads(shapes, device=device)
        set_grads(grads, ours, theirs)
        opt.step()
        peer.step()
        reference.step(grads)
    assert opt.param_groups[0]["weight_decay"] == 0.1  # the group keeps the decay it was given, as lion-pytorch's
    definite = ~flat(reference.ambiguous).bool()
    our_max, _ = errors(ours, reference, definite)
    peer_max, _ = errors(theirs, reference, definite)
    magnitude = flat(reference.params).abs().max().item()
    assert our_max <= peer_max + 0.5 * ulp(torch.float32, magnitude)
    assert our_max <= 4 * 4 * ulp(torch.float32, magnitude)
    copied = copy.deepcopy(opt)  # a copy (a pickle too) decays as the original
    copied_params = copied.param_groups[0]["params"]
    set_grads(random_grads(shapes, device=device), ours, copied_params)
    opt.step()
    copied.step()
    assert_identical([p.detach() for p in copied_params], [p.detach() for p in ours])


@pytest.mark.parametrize("backend, device", CPU_BACKENDS)
def test_int8_moments_decayed_to_subnormals_do_not_move_params_that_never_had_a_grad(backend, device):
    """A block of int8 moments whose largest is subnormal (a moment decaying without grads) codes as zeros: 1 / its
    scale overflowed, its zeros became whole codes, and Lion's sign stepped params no grad ever reached by a full
    lr at every step (moment_int8.h's inverse_scale)."""
    param = torch.nn.Parameter(torch.zeros(65, device=device))
    opt = fused_optim.Lion([param], lr=0.1, moments="int8", backend=backend)
    for step in range(4):
        param.grad = torch.zeros(65, device=device)
        param.grad[0] = 1e-39 if step < 2 else 0.0
        opt.step()
    assert torch.equal(param[1:].detach(), torch.zeros(64, device=device))
    codes = opt.state[param]["exp_avg"]
    assert torch.equal(codes[1:], torch.zeros_like(codes[1:]))


def test_use_triton_picks_the_triton_backend():
    """lion-pytorch's use_triton=True: our Triton kernels; against another backend asked for, one sentence."""
    param = torch.nn.Parameter(torch.randn(3))
    assert fused_optim.Lion([param], use_triton=True).backend == "triton"
    assert fused_optim.Lion([param], use_triton=True, backend="triton").backend == "triton"
    with pytest.raises(ValueError, match="use_triton=True asks for backend 'triton', not 'cpu'"):
        fused_optim.Lion([param], use_triton=True, backend="cpu")


@needs_lion_pytorch
def test_the_signature_takes_lion_pytorchs_arguments_with_its_defaults():
    import inspect

    theirs = inspect.signature(lion_pytorch.Lion.__init__).parameters
    ours = inspect.signature(fused_optim.Lion.__init__).parameters
    assert list(ours)[:len(theirs)] == list(theirs)  # the same positions
    for name, parameter in theirs.items():
        assert ours[name].default == parameter.default, name


@needs_lion_pytorch
def test_a_lion_pytorch_state_loads_with_its_moment_in_fp32():
    """lion-pytorch keeps `exp_avg` in the param's dtype and no `step`: its state loads into ours in fp32 with a
    count of 0, and ours loads back into it."""
    shapes = [(5,), (2, 3)]
    theirs = make_params([torch.randn(s) for s in shapes], torch.bfloat16, "cpu")
    peer = lion_pytorch.Lion(theirs, lr=1e-3, weight_decay=0.1)
    set_grads(random_grads(shapes, torch.bfloat16), theirs)
    peer.step()
    ours = [torch.nn.Parameter(p.detach().clone()) for p in theirs]
    opt = fused_optim.Lion(ours, lr=1e-3, weight_decay=0.1)
    opt.load_state_dict(peer.state_dict())
    for p, q in zip(ours, theirs):
        assert opt.state[p]["exp_avg"].dtype == torch.float32
        assert torch.equal(opt.state[p]["exp_avg"], peer.state[q]["exp_avg"].float())
        assert opt.state[p]["step"].item() == 0
    set_grads(random_grads(shapes, torch.bfloat16), ours)
    opt.step()
    assert all(opt.state[p]["step"].item() == 1 for p in ours)
    peer.load_state_dict(opt.state_dict())
    assert all(peer.state[q]["exp_avg"].dtype == torch.bfloat16 for q in theirs)  # torch's loader casts to the param


# ----------------------------------------------------------------------------------------------------------------
# bad input: one sentence, nothing changed


@pytest.mark.parametrize("kwargs, message", [
    (dict(lr=-1e-3), "Invalid learning rate: -0.001"),
    (dict(betas=(1.5, 0.99)), "Invalid beta parameter at index 0: 1.5"),
    (dict(betas=(0.9, -0.1)), "Invalid beta parameter at index 1: -0.1"),
    (dict(betas=(0.9,)), "betas must be a pair"),
    (dict(betas=(0.9, 0.99, 0.5)), "betas must be a pair"),
    (dict(weight_decay=-0.1), "Invalid weight_decay value: -0.1"),
    (dict(lr=torch.tensor([1e-3, 1e-3])), "Tensor lr must be 1-element"),
    (dict(master_weights=True, stochastic_rounding=True), "master_weights and stochastic_rounding are alternatives"),
    (dict(max_grad_norm=0.0), "Invalid max_grad_norm value: 0.0"),
    (dict(lr=0.0, decoupled_weight_decay=True), "decoupled_weight_decay=True divides weight_decay by the lr, which "
                                                "must be > 0: 0.0"),
])
def test_bad_hyperparameters_raise_value_error(kwargs, message):
    param = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        fused_optim.Lion([param], **kwargs)


def test_betas_of_1_are_taken_as_lion_pytorchs_are():
    """lion-pytorch takes betas in [0, 1]: beta2 = 1 keeps the moment as it is, beta1 = 1 steps with its sign."""
    for betas in [(0.9, 1.0), (1.0, 0.99)]:
        assert fused_optim.Lion([torch.nn.Parameter(torch.randn(3))], betas=betas).param_groups[0]["betas"] == betas


@pytest.mark.parametrize("backend, device", CPU_BACKENDS)
def test_params_and_grads_lion_cannot_step_change_nothing(backend, device):
    params = make_params([torch.randn(3), torch.randn(4)], torch.float32, device)
    opt = fused_optim.Lion(params, lr=1e-2, backend=backend)
    set_grads(random_grads([(3,), (4,)]), params)
    opt.step()
    before = snapshot(opt)
    params[1].grad = torch.randn(4).to_sparse()
    with pytest.raises(RuntimeError, match="Lion does not support sparse gradients"):
        opt.step()
    params[1].grad_dtype = None  # autograd would refuse the float64 grad below
    params[1].grad = torch.randn(4, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="a grad must have its param's shape and device, and its param's dtype"):
        opt.step()
    assert_identical(snapshot(opt), before)
    complex_param = torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))
    complex_param.grad = torch.randn(3, dtype=torch.complex64)
    complex_opt = fused_optim.Lion([complex_param], backend=backend)
    with pytest.raises(TypeError, match="fused_optim.Lion steps float32, bfloat16, float16 and float64 params"):
        complex_opt.step()
    assert len(complex_opt.state) == 0


def test_torch_compile_fullgraph_step_matches_eager():
    assert_compiled_steps_match_eager(
        lambda params: fused_optim.Lion(params, lr=torch.tensor(1e-2), weight_decay=0.1, backend="cpu"),
        torch.float32, "cpu")


@pytest.mark.parametrize("master_weights", [False, 24])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend, device", CPU_BACKENDS)
def test_a_bf16_moment_follows_its_emulation(backend, device, dtype, master_weights):
    """moments="bf16": the fp32 step on the dequantized moment, rounded back stochastically (test_adam_moments.py)."""
    if master_weights and dtype != torch.bfloat16:
        pytest.skip("24-bit masters are for bf16 params")
    options = dict(cls="Lion", weight_decay=0.1, maximize=True)
    params, moments, emulated_params, emulated = run_with_bf16_moments(backend, options, dtype,
                                                                       master_weights=master_weights)
    assert moments["exp_avg"][0].dtype == torch.bfloat16
    assert_identical(moments, emulated)
    assert_identical([p.detach() for p in params], [p.detach() for p in emulated_params])


@needs_lion_pytorch
def test_a_bf16_moment_takes_two_bytes_and_round_trips():
    p = torch.nn.Parameter(torch.randn(1000))
    opt = fused_optim.Lion([p], lr=1e-3, moments="bf16")
    p.grad = torch.randn(1000)
    opt.step()
    assert opt.state[p]["exp_avg"].dtype == torch.bfloat16 and opt.state[p]["exp_avg"].element_size() == 2
    # a lion-pytorch (fp32) state loads rounded to nearest; ours goes out as fp32 and comes back the same
    theirs = lion_pytorch.Lion([p], lr=1e-3)
    theirs.load_state_dict(opt.torch_state_dict())
    assert torch.equal(theirs.state[p]["exp_avg"], opt.state[p]["exp_avg"].float())
    theirs.state[p]["exp_avg"].mul_(1.001)
    opt.load_state_dict(theirs.state_dict())
    assert torch.equal(opt.state[p]["exp_avg"], theirs.state[p]["exp_avg"].bfloat16())


@needs_lion_pytorch
def test_an_int8_moment_goes_out_as_fp32_and_comes_back_quantized():
    p = torch.nn.Parameter(torch.randn(1000))
    opt = fused_optim.Lion([p], lr=1e-3, moments="int8")
    p.grad = torch.randn(1000)
    opt.step()
    codes, scales = opt.state[p]["exp_avg"], opt.state[p]["moment_scales"][0]
    assert codes.dtype == torch.int8
    theirs = lion_pytorch.Lion([p], lr=1e-3)
    theirs.load_state_dict(opt.torch_state_dict())
    assert torch.equal(theirs.state[p]["exp_avg"], dequantize(codes, scales))
    theirs.state[p]["exp_avg"].mul_(1.5)
    opt.load_state_dict(theirs.state_dict())  # lion-pytorch's fp32 moment, quantized to nearest
    expected_codes, expected_scales = quantize(theirs.state[p]["exp_avg"], True)
    assert torch.equal(opt.state[p]["exp_avg"], expected_codes)
    assert torch.equal(opt.state[p]["moment_scales"][0], expected_scales)


# ----------------------------------------------------------------------------------------------------------------
# the ops: opcheck


def _op_sample(kind: str):
    """Arguments of one lion_step_ call over two small tensors, in the schema's order."""
    dtype = torch.bfloat16 if kind in ("bf16", "remainder", "stochastic") else torch.float32
    shapes = [(3,), (2, 70)]
    params = [torch.randn(s).to(dtype) for s in shapes]
    grads = [torch.randn(s).to(dtype) for s in shapes]
    exp_avgs = [torch.randn(s).to(torch.bfloat16 if kind == "bf16-moment" else torch.float32) for s in shapes]
    moment_scales = []
    if kind == "int8":  # moments="int8": codes and their block scales
        quantized = [quantize(m, True) for m in exp_avgs]
        exp_avgs, moment_scales = [codes for codes, _ in quantized], [scales[None] for _, scales in quantized]
    masters = [torch.zeros(s, dtype=torch.int16) for s in shapes] if kind == "remainder" else []
    steps = [torch.tensor(0.0), torch.tensor(3.0)]
    lr_tensor = torch.tensor(1e-2) if kind == "lr-tensor" else None
    grad_scale = torch.tensor(4.0) if kind in ("grad-scale", "found-inf") else None
    found_inf = torch.tensor(1.0 if kind == "found-inf" else 0.0) if grad_scale is not None else None
    return (params, grads, exp_avgs, masters, steps, moment_scales, 1e-2, lr_tensor, 0.9, 0.99, 0.1,
            kind == "lr-tensor", kind == "stochastic", 7, grad_scale, found_inf)


@pytest.mark.parametrize("kind", ["fp32", "bf16", "bf16-moment", "int8", "remainder", "stochastic", "lr-tensor",
                                  "grad-scale", "found-inf"])
@pytest.mark.parametrize("op_name", [
    pytest.param("lion_step_", id="cpu"),
    pytest.param("lion_step_torch_", id="torch"),
    pytest.param("lion_step_triton_", id="triton-interpreted",
                 marks=pytest.mark.skipif(not TRITON_INTERPRETED, reason="Triton runs CPU tensors only interpreted")),
])
def test_opcheck(op_name, kind):
    torch.library.opcheck(getattr(torch.ops.fused_optim, op_name).default, _op_sample(kind))
