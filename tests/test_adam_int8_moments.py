"""Adam/AdamW, Lion and SGD with `moments="int8"`: each moment one companded byte an element, blocks of 64 sharing a
bf16 scale, dequantized, updated in fp32 and requantized stochastically in the same pass.

Every backend's codes and scales are checked bit for bit against its own fp32-moment optimizer whose moments are
set, before each step, to the dequantized values, and quantized after it by fused_optim/int8_moments.py with
rounding.py's random bits: what moments="int8" adds to the fp32 update (itself checked against float64 and torch
in test_adam.py) and nothing else. The codec itself is checked against float64 here.
"""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch
from conftest import BACKEND_DEVICES, CPU_BACKENDS
from test_adam import assert_identical, make_params, random_grads, set_grads, snapshot
from test_adam_moments import CHUNKED_SHAPES, state_bytes_per_param

import fused_optim
from fused_optim.int8_moments import BLOCK, dequantize, quantize, scale_count
from fused_optim.reference import ReferenceAdam
from fused_optim.rounding import moment_bits16

SHAPES = [(1,), (3,), (0,), (1023,), (33, 17), (130,)]
OPTIONS = [
    pytest.param(dict(cls="AdamW", weight_decay=0.01), id="adamw"),
    pytest.param(dict(cls="Adam", weight_decay=0.01, amsgrad=True, maximize=True), id="adam-l2-amsgrad-maximize"),
    pytest.param(dict(cls="Lion", weight_decay=0.1), id="lion"),
    pytest.param(dict(cls="Lion", betas=(0.8, 0.95), maximize=True), id="lion-betas-maximize"),
]
KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


# The codec (int8_moments.py; moment_int8.h is the same arithmetic)


def heavy_tailed(n: int, generator=None) -> torch.Tensor:
    """Values spread over orders of magnitude, as moments are: normal times log-normal."""
    return torch.randn(n, generator=generator) * torch.exp(2 * torch.randn(n, generator=generator))


def companded(x: torch.Tensor, scales: torch.Tensor, signed: bool) -> torch.Tensor:
    """In float64, s = 127 sqrt(|x| / scale) (255 sqrt(sqrt(x) / scale), the scale of the roots): the code unrounded."""
    kept = x.double().abs() if signed else x.double().sqrt()
    return (kept / scales.double().repeat_interleave(BLOCK)[: x.numel()]).sqrt() * (127 if signed else 255)


def round_up_probability(s: torch.Tensor, signed: bool) -> torch.Tensor:
    """How often a code s rounds up from c = floor(s) (moment_int8.h): a signed one where the value s^2 lies between
    c^2 and (c + 1)^2, so that the value is unbiased; a non-negative one by its fraction, so that the code is."""
    c = s.floor()
    return (s.square() - c.square()) / (2 * c + 1) if signed else s - c


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_codes_dequantize_within_one_step_of_the_float64_value(signed):
    generator = torch.Generator().manual_seed(0)
    x = heavy_tailed(64 * 50 + 7, generator)
    x = x if signed else x.square()
    codes, scales = quantize(x, signed, torch.randint(0, 1 << 16, x.shape, generator=generator))
    assert codes.dtype == (torch.int8 if signed else torch.uint8) and scales.shape == (scale_count(x.numel()),)
    # in float64: the companded value lies within one code of ours
    scale = scales.double().repeat_interleave(BLOCK)[: x.numel()]
    kept = x.double().abs() if signed else x.double().sqrt()
    assert ((codes.double().abs() - companded(x, scales, signed)).abs() < 1 + 1e-4).all()
    padded = torch.nn.functional.pad(kept, (0, scales.numel() * BLOCK - x.numel()))
    assert (scales.double() >= padded.view(-1, BLOCK).amax(1)).all()
    # a block's largest element keeps 1/127 (1/255) of its companded value's resolution: 2 % (1.6 %) of its value
    error = (dequantize(codes, scales).double() - x.double()).abs()
    assert (error <= 0.021 * (scale if signed else scale.square()) + 1e-30).all()


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_stochastic_codes_are_unbiased(signed):
    """A signed moment's draws average to its value (rounding the code itself without bias made small values come
    back too large: +12 % at 1e-4 of the block's largest); a non-negative one's to its code, on purpose
    (moment_int8.h's quantize_unsigned)."""
    generator = torch.Generator().manual_seed(1)
    x = heavy_tailed(4096, generator)
    x = x if signed else x.square()
    draws = 400
    values, codes = torch.zeros(x.numel(), dtype=torch.float64), torch.zeros(x.numel(), dtype=torch.float64)
    for _ in range(draws):
        drawn, scales = quantize(x, signed, torch.randint(0, 1 << 16, x.shape, generator=generator))
        values += dequantize(drawn, scales).double()
        codes += drawn.double().abs()
    s = companded(x, scales, signed)
    c = s.floor()
    if signed:  # in units of the gap between the values of the two codes a draw picks between
        scale = scales.double().repeat_interleave(BLOCK)[: x.numel()]
        bias = (values / draws - x.double()) / ((2 * c + 1) * scale / 127.0**2)
    else:  # in codes; a non-zero second moment keeps code 1, biased up below it by design
        bias = torch.where(c >= 1, codes / draws - s, 0.0)
    # 400 draws of a Bernoulli choice between the two: standard error <= 0.025 of their gap
    assert bias.abs().max() < 0.15
    assert bias.mean().abs() < 0.005  # over 4096 elements: 0.0004 a standard error


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_random_bits_0_round_every_code_down_65535_up_and_none_to_the_nearest(signed):
    x = heavy_tailed(64 * 20, torch.Generator().manual_seed(2))
    x = x if signed else x.square()
    down, scales = quantize(x, signed, torch.zeros(x.shape, dtype=torch.int32))
    up, _ = quantize(x, signed, torch.full(x.shape, 65535, dtype=torch.int32))
    nearest, _ = quantize(x, signed)
    s = companded(x, scales, signed)
    p = round_up_probability(s, signed)
    inside = (p > 1e-3) & (p < 1 - 1e-3) & (s - s.floor() > 1e-3)  # clear of fp32's rounding of s
    least = 0 if signed else 1  # a non-zero second moment keeps code 1
    assert inside.sum() > 0.8 * x.numel()
    assert torch.equal(down.double().abs()[inside], s.floor().clamp(min=least)[inside])
    assert torch.equal(up.double().abs()[inside], s.floor()[inside] + 1)
    assert torch.equal(up.double().sign()[inside], x.sign().double()[inside])
    clear = inside & ((p - 0.5).abs() > 1e-3)
    assert torch.equal(nearest.double().abs()[clear], (s.floor() + (p > 0.5)).clamp(min=least)[clear])
    if signed:  # the nearest value, not the nearest code
        assert ((p > 0.5) != (s - s.floor() > 0.5))[clear].any()


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_codes_take_correctly_rounded_roots(signed):
    """The kernels take IEEE's fp32 roots (sqrtf, tl.sqrt_rn); so must the torch twin, or a code moves where the
    random bits put its draw on a boundary (torch 2.14's CPU sqrt is one ulp off for about one fp32 value in seven).
    The same fp32 operations in numpy, whose root is IEEE's, with the bits that put each draw at (or just past) the
    boundary of rounding up: a fixed-point code one off moves it."""
    x = heavy_tailed(64 * 64 + 5, torch.Generator().manual_seed(3))
    x = x if signed else x.square()
    kept = x.numpy() if signed else np.sqrt(x.numpy())
    magnitude = np.abs(kept)
    padded = np.pad(magnitude, (0, scale_count(x.numel()) * BLOCK - x.numel()))
    scale_bits = (padded.view(np.uint32).reshape(-1, BLOCK).max(axis=1).astype(np.int64) + 0xFFFF) >> 16
    scale = (scale_bits.astype(np.uint32) << 16).view(np.float32)
    inverse = np.repeat(np.float32(1.0) / scale, BLOCK)[: x.numel()]
    fixed = np.sqrt(np.minimum(magnitude * inverse, np.float32(1.0))) * np.float32((127 if signed else 255) * 65536)
    fixed = fixed.astype(np.int64)
    whole = fixed >> 16
    even = np.arange(x.numel()) % 2 == 0
    if signed:  # rounds up where the draw (2^16 - bits) (2c + 1) 2^16 < f (s + c) 2^32
        odd = ((2 * whole + 1) << 16).astype(np.float32)
        above = (fixed & 0xFFFF).astype(np.float32) * (fixed + (whole << 16)).astype(np.float32)
        last = np.ceil(above.astype(np.float64) / odd.astype(np.float64)).astype(np.int64) - 1  # the largest that does
        draw = np.clip(np.where(even, last, last + 1), 1, 65536)
        bits = 65536 - draw
        code = whole + (draw.astype(np.float32) * odd < above)
        expected = np.where(kept < 0, -code, code)
    else:  # rounds up where fixed + bits reaches the next multiple of 2^16
        below, at = 0xFFFF - (fixed & 0xFFFF), (0x10000 - (fixed & 0xFFFF)) & 0xFFFF
        bits = np.where(even, below, at)
        expected = np.maximum((fixed + bits) >> 16, kept > 0)
    codes, scales = quantize(x, signed, torch.from_numpy(bits).to(torch.int32))
    assert np.array_equal(scales.view(torch.int16).numpy().astype(np.int64), scale_bits)
    assert np.array_equal(codes.numpy().astype(np.int64), expected)


def test_a_non_zero_second_moment_never_dequantizes_to_zero():
    x = torch.tensor([1.0, 1e-30, 0.0, 3e-38] + [1e-20] * 60)
    codes, scales = quantize(x, False, torch.zeros(x.shape, dtype=torch.int32))  # every draw rounds down
    values = dequantize(codes, scales)
    assert (values[x > 0] > 0).all() and values[2] == 0


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_a_second_moment_far_below_its_blocks_largest_keeps_a_code(backend, device):
    """One element of each block had a huge grad once and the others a small one later, then none: their
    exp_avg_sq sits far below the block's scale, yet never at code 0 (the update would divide by eps alone and
    move them by thousands of lrs), in a whole block (coded 16 lanes at a time) and in a tensor's last, partial
    block alike. Their last step is then within a few times fp32 AdamW's (~0.7 lr)."""
    n, lr = 100, 1e-3
    big, small = torch.zeros(n), torch.full((n,), 3e-4)
    big[0] = big[64] = 1000.0
    small[0] = small[64] = 0.0
    schedule = [big] + [torch.zeros(n)] * 59 + [small, torch.zeros(n)]
    last_steps = {}
    for moments in ("fp32", "int8"):
        param = torch.nn.Parameter(torch.zeros(n, device=device))
        opt = fused_optim.AdamW([param], lr=lr, weight_decay=0.0, moments=moments, backend=backend)
        for grad in schedule:
            before = param.detach().clone()
            param.grad = grad.to(device)
            opt.step()
        last_steps[moments] = (param.detach() - before).abs().cpu()
    codes = opt.state[param]["exp_avg_sq"].cpu()
    for block in (slice(1, 64), slice(65, 100)):
        assert (codes[block] > 0).all()
        assert last_steps["int8"][block].max() <= 10 * last_steps["fp32"][block].max()


def test_a_zero_block_and_a_nan_block():
    x = torch.cat([torch.zeros(64), torch.randn(64)])
    x[100] = float("nan")
    codes, scales = quantize(x, True)
    values = dequantize(codes, scales)
    assert (values[:64] == 0).all() and scales[0] == 0
    assert values[64:].isnan().all()  # an fp32 moment with a NaN stays NaN too: the block says so


NAN_PAYLOADS = [0x7FC00000, 0x7FFFFFFF, 0xFFFFFFFF, 0x7F800001]  # torch's, CUDA's, negative, signalling


def test_any_nan_makes_its_block_nan():
    """Every NaN bit pattern scales its block NaN: one above 0x7FFF0000 (CUDA's canonical NaN, an fp16 NaN widened)
    carried into the sign bit of (largest + 0xFFFF) >> 16 and gave the scale -0, a block of zeros."""
    for bits in NAN_PAYLOADS:
        x = torch.randn(128)
        x.view(torch.int32)[70] = torch.tensor(bits, dtype=torch.int64).to(torch.int32)
        for signed in (True, False):
            codes, scales = quantize(x if signed else x.abs(), signed)
            assert scales[1].isnan() and dequantize(codes, scales)[64:].isnan().all(), hex(bits)


@pytest.mark.parametrize("backend, device", CPU_BACKENDS)
@pytest.mark.parametrize("cls, options", [(fused_optim.AdamW, {}), (fused_optim.SGD, dict(momentum=0.9)),
                                          (fused_optim.Lion, {})], ids=["AdamW", "SGD", "Lion"])
def test_a_nan_grad_of_any_bits_makes_its_moment_blocks_nan(cls, options, backend, device):
    for bits in NAN_PAYLOADS:
        param = torch.nn.Parameter(torch.randn(128, device=device))
        opt = cls([param], lr=1e-3, moments="int8", backend=backend, **options)
        grad = torch.randn(128, device=device)
        grad.view(torch.int32)[70] = torch.tensor(bits, dtype=torch.int64).to(torch.int32)
        param.grad = grad
        opt.step()
        scales = opt.state[param]["moment_scales"].float()
        assert scales[..., 1].isnan().all() and not scales[..., 0].isnan().any(), (hex(bits), scales)


def test_a_block_of_subnormals_alone_becomes_zeros():
    """1 / scale would overflow below 2^-128: a block of subnormals alone (a moment decayed for thousands of steps
    without a grad) is flushed to zeros, as a flush-to-zero unit would, by the codec and the kernels alike."""
    for value in (3e-39, 1e-42):
        codes, scales = quantize(torch.full((64,), value), True)
        assert (codes == 0).all() and (dequantize(codes, scales) == 0).all()
    moments = []
    for backend in ("cpu", "torch"):
        param = torch.nn.Parameter(torch.zeros(64))
        opt = fused_optim.Lion([param], lr=1e-3, moments="int8", backend=backend)
        param.grad = torch.full((64,), 3e-37)  # exp_avg = (1 - 0.99) * grad: subnormal
        opt.step()
        moments.append(opt.state[param]["exp_avg"])
    assert (moments[0] == 0).all() and torch.equal(*moments)


def test_blocks_follow_memory_order():
    x = torch.randn(70, 3).t()  # not contiguous: blocks run down the 70 of memory order
    codes, scales = quantize(x, True)
    assert codes.stride() == x.stride()
    assert torch.equal(scales, quantize(x.t().contiguous().view(-1), True)[1])
    assert torch.equal(dequantize(codes, scales).t().contiguous(), dequantize(codes.t().contiguous(), scales))


# The optimizers


def run(backend, options, dtype, steps=3, master_weights=False, shapes=SHAPES, device="cpu"):
    """(params, our state) of a moments="int8" run, and (params, codes and scales) of its emulation: the same
    params, grads and rounding seed in every run."""
    torch.manual_seed(0)
    init = [torch.randn(s) for s in shapes]
    kwargs = dict(options)
    cls = getattr(fused_optim, kwargs.pop("cls"))
    if master_weights:
        kwargs["master_weights"] = master_weights
    params, emulated_params = make_params(init, dtype, device), make_params(init, dtype, device)
    opt = cls(params, lr=1e-2, moments="int8", backend=backend, **kwargs)
    fp32_opt = cls(emulated_params, lr=1e-2, backend=backend, **kwargs)
    seed = opt.param_groups[0]["seed"]
    signed = {key: signed for key, signed in cls._moment_keys.items()
              if key != "max_exp_avg_sq" or kwargs.get("amsgrad")}
    keys = list(signed)
    emulated = [{key: quantize(torch.zeros(s, device=device), signed[key]) for key in keys} for s in shapes]
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        grads = [(g * torch.exp(torch.randn(g.shape, generator=generator)).to(dtype)).to(device)  # many magnitudes
                 for g in random_grads(shapes, dtype, generator=generator)]
        set_grads(grads, params, emulated_params)
        opt.step()
        for i, p in enumerate(emulated_params):
            for key in keys if fp32_opt.state[p] else ():
                fp32_opt.state[p][key].copy_(dequantize(*emulated[i][key]))
        fp32_opt.step()
        for i, p in enumerate(emulated_params):
            state = fp32_opt.state[p]
            for row, key in enumerate(keys):
                bits = moment_bits16(seed, i, state["step"], row, p.numel())
                emulated[i][key] = quantize(state[key], signed[key], bits)
    ours = [{key: (opt.state[p][key], opt.state[p]["moment_scales"][row]) for row, key in enumerate(keys)}
            for p in params]
    return params, ours, emulated_params, emulated


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_int8_moments_follow_their_emulation(backend, device, dtype, options):
    params, moments, emulated_params, emulated = run(backend, options, dtype, device=device)
    assert_identical(moments, emulated)
    assert_identical([p.detach() for p in params], [p.detach() for p in emulated_params])


@pytest.mark.parametrize("options", [OPTIONS[0], OPTIONS[2]])
@pytest.mark.parametrize("master_weights", [True, 24])
@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_int8_moments_with_master_weights_follow_their_emulation(backend, device, master_weights, options):
    params, moments, emulated_params, emulated = run(backend, options, torch.bfloat16, master_weights=master_weights,
                                                     device=device)
    assert_identical(moments, emulated)
    assert_identical([p.detach() for p in params], [p.detach() for p in emulated_params])


@pytest.mark.parametrize("options", [dict(cls="AdamW", weight_decay=0.01), dict(cls="Lion"),
                                     dict(cls="SGD", momentum=0.9)], ids=["adamw", "lion", "sgd"])
@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_int8_moments_of_clipped_grads_follow_their_emulation(backend, device, options):
    """max_grad_norm folds the clip coefficient into the grads' multiplier, the path a GradScaler's scale takes
    too: every step here clips (the grads' norm is in the tens)."""
    params, moments, emulated_params, emulated = run(backend, dict(options, max_grad_norm=0.5), torch.float32,
                                                     device=device)
    assert_identical(moments, emulated)
    assert_identical([p.detach() for p in params], [p.detach() for p in emulated_params])


@pytest.mark.parametrize("options", [OPTIONS[0], OPTIONS[2], dict(cls="SGD", momentum=0.9)],
                         ids=["adamw", "lion", "sgd"])
def test_cpu_chunks_round_with_their_own_elements_bits(options):
    """The CPU kernel steps 16384-element chunks (on several threads), each drawing the random bits of its own
    elements: tensors of a few chunks, not a multiple of one, follow the emulation bit for bit."""
    params, moments, emulated_params, emulated = run("cpu", options, torch.float32, steps=2,
                                                     shapes=CHUNKED_SHAPES)
    assert_identical(moments, emulated)
    assert_identical([p.detach() for p in params], [p.detach() for p in emulated_params])


@pytest.mark.parametrize("options", [OPTIONS[1], OPTIONS[2]])
def test_backends_agree_on_the_codes(cpu_backend, options):
    """The same codes and scales from every backend (bf16 params: the fp32 update is the same on each)."""
    params, ours, *_ = run(cpu_backend, options, torch.bfloat16, shapes=[(1023,), (5, 70)])
    reference_params, reference, *_ = run("torch", options, torch.bfloat16, shapes=[(1023,), (5, 70)])
    assert_identical(ours, reference)


def test_int8_moments_keep_the_second_moment_decaying():
    """After one large grad, small grads make exp_avg_sq decay 0.1 % a step, a small fraction of a code: rounded to
    nearest the codes would stay; rounded stochastically they follow the float64 reference in the mean."""
    shape = (4096,)
    p = torch.nn.Parameter(torch.randn(shape))
    opt = fused_optim.AdamW([p], lr=1e-4, moments="int8", backend="cpu")
    reference = ReferenceAdam([p], lr=1e-4, decoupled_weight_decay=True, weight_decay=0.01)
    for step in range(300):
        grad = torch.randn(shape) * (1.0 if step == 0 else 0.01)
        p.grad = grad.clone()
        opt.step()
        reference.step([grad])
    state = opt.state[p]
    ours, exact = dequantize(state["exp_avg_sq"], state["moment_scales"][1]).double(), reference.exp_avg_sqs[0]
    assert abs(ours.mean() / exact.mean() - 1) < 0.02


def test_int8_adamw_trains_as_fp32_adamw():
    """A noisy least-squares problem: the int8 run's loss ends within 1 % of the fp32 run's."""
    generator = torch.Generator().manual_seed(0)
    a, target = torch.randn(256, 64, generator=generator), torch.randn(256, generator=generator)
    losses = {}
    for moments in ("fp32", "int8"):
        w = torch.nn.Parameter(torch.zeros(64))
        opt = fused_optim.AdamW([w], lr=1e-2, moments=moments)
        for _ in range(300):
            rows = torch.randint(0, 256, (32,), generator=generator)
            loss = (a[rows] @ w - target[rows]).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
        losses[moments] = (a @ w.detach() - target).square().mean().item()
    assert abs(losses["int8"] / losses["fp32"] - 1) < 0.01


def test_int8_moments_trade_state_with_torch_adamw():
    shapes = [(7,), (3, 40)]
    params = make_params([torch.randn(s) for s in shapes], torch.float32, "cpu")
    ours = fused_optim.AdamW(params, lr=1e-2, moments="int8", amsgrad=True)
    set_grads(random_grads(shapes), params)
    ours.step()
    # ours -> torch: fp32 moments, the dequantized values exactly, no scales
    theirs = torch.optim.AdamW(params, lr=1e-2, amsgrad=True)
    theirs.load_state_dict(ours.torch_state_dict())
    for p in params:
        assert "moment_scales" not in theirs.state[p]
        for row, key in enumerate(KEYS):
            assert torch.equal(theirs.state[p][key], dequantize(ours.state[p][key], ours.state[p]["moment_scales"][row]))
    # torch -> ours: its fp32 moments, quantized to nearest
    theirs.step()
    ours.load_state_dict(theirs.state_dict())
    for p in params:
        for row, key in enumerate(KEYS):
            codes, scales = quantize(theirs.state[p][key], row == 0)
            assert torch.equal(ours.state[p][key], codes)
            assert torch.equal(ours.state[p]["moment_scales"][row], scales)
    set_grads(random_grads(shapes), params)
    ours.step()  # and steps on


@pytest.mark.parametrize("target", ["fp32", "bf16"])
def test_an_int8_state_loads_into_another_storage_dequantized(target):
    params = make_params([torch.randn(100)], torch.float32, "cpu")
    ours = fused_optim.AdamW(params, moments="int8")
    set_grads(random_grads([(100,)]), params)
    ours.step()
    other = fused_optim.AdamW(params, moments=target)
    saved = ours.state_dict()
    saved["param_groups"][0]["moments"] = target  # a loaded group takes its saved settings, as torch's do
    other.load_state_dict(saved)
    state = other.state[params[0]]
    assert "moment_scales" not in state
    expected = dequantize(ours.state[params[0]]["exp_avg"], ours.state[params[0]]["moment_scales"][0])
    assert torch.equal(state["exp_avg"], expected.to(state["exp_avg"].dtype))


def test_a_loaded_groups_moments_win_and_fp32_ones_are_left_out():
    """README: as torch's options, a saved group's moments win (an int8 dict makes an fp32-built optimizer int8);
    a dict of fp32 moments leaves them out, so it loads into the moments the optimizer was built with."""
    params = make_params([torch.randn(100)], torch.float32, "cpu")
    int8 = fused_optim.AdamW(params, moments="int8")
    set_grads(random_grads([(100,)]), params)
    int8.step()
    built_fp32 = fused_optim.AdamW(params)
    built_fp32.load_state_dict(int8.state_dict())
    assert built_fp32.param_groups[0]["moments"] == "int8"
    assert built_fp32.state[params[0]]["exp_avg"].dtype == torch.int8
    fp32_dict = fused_optim.AdamW(params).state_dict()
    assert "moments" not in fp32_dict["param_groups"][0]
    int8.load_state_dict(fp32_dict)
    assert int8.param_groups[0]["moments"] == "int8"


def test_a_group_built_with_the_neutral_options_keeps_them_on_load():
    """A group holds neither fp32 moments nor master_weights=False (neutral: torch's keys alone), and neither does
    its state_dict(); loaded into an optimizer built alike, that group keeps them, not the optimizer's defaults (int8
    moments, masters), and the run resumes bit for bit."""
    def build():
        params = make_params([torch.randn(70), torch.randn(70), torch.randn(70), torch.randn(70)], torch.bfloat16,
                             "cpu")
        return params, fused_optim.AdamW([{"params": params[:2]}, {"params": params[2:], "moments": "fp32",
                                                                    "master_weights": False}],
                                         lr=1e-2, moments="int8", master_weights=True)

    torch.manual_seed(0)
    params, opt = build()
    grads = [random_grads([(70,)] * 4) for _ in range(3)]
    set_grads(grads[0], params)
    opt.step()
    resumed, resumed_opt = build()
    for p, q in zip(resumed, params):
        p.data.copy_(q.data)
    resumed_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # its own tensors, as from a checkpoint
    assert not resumed_opt.param_groups[1].keys() & {"moments", "master_weights"}
    assert resumed_opt.param_groups[1].keys() == opt.param_groups[1].keys()
    for step_grads in grads[1:]:
        set_grads(step_grads, params, resumed)
        opt.step()
        resumed_opt.step()
    assert all(torch.equal(p, q) for p, q in zip(params, resumed))
    assert_identical(resumed_opt.state_dict()["state"], opt.state_dict()["state"])


def test_int8_moments_and_24_bit_masters_hold_3_bytes_a_param():  # README's table of state per param
    def state_of(dtype, cls=fused_optim.AdamW, **options):
        p = torch.nn.Parameter(torch.randn(1 << 16).to(dtype))
        opt = cls([p], **options)
        p.grad = torch.randn_like(p)
        opt.step()
        return state_bytes_per_param(opt)

    step_bytes, scale_bytes = 4 / (1 << 16), 2 * 2 / BLOCK
    assert state_of(torch.float32, moments="int8") == 2 + scale_bytes + step_bytes
    assert state_of(torch.bfloat16, moments="int8", master_weights=24) == 3 + scale_bytes + step_bytes  # 3.06
    assert state_of(torch.bfloat16, moments="int8", master_weights=True) == 4 + scale_bytes + step_bytes
    # Lion: one moment
    assert state_of(torch.bfloat16, fused_optim.Lion, moments="int8", master_weights=24) == 2 + scale_bytes / 2 + step_bytes


def test_the_int8_checkpoint_is_under_45_percent_of_torch_adamw_with_fp32_masters():
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.Linear(512, 256)).to(torch.bfloat16)

    def checkpoint_bytes(model, opt) -> int:
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
        buffer = io.BytesIO()
        torch.save(opt.state_dict(), buffer)
        return buffer.getbuffer().nbytes

    ours = checkpoint_bytes(model, fused_optim.AdamW(model.parameters(), moments="int8", master_weights=24))
    masters = copy.deepcopy(model).float()  # torch's recipe: AdamW on fp32 master copies, saved with them
    theirs = checkpoint_bytes(masters, torch.optim.AdamW(masters.parameters())) + sum(
        p.numel() * 4 for p in masters.parameters())
    assert ours / theirs < 0.45


def test_a_bad_int8_state_is_refused_and_changes_nothing():
    params = make_params([torch.randn(100)], torch.float32, "cpu")
    opt = fused_optim.AdamW(params, moments="int8")
    set_grads(random_grads([(100,)]), params)
    opt.step()
    saved = opt.state_dict()
    before = snapshot(opt)
    broken = {**saved, "state": {0: {k: v for k, v in saved["state"][0].items() if k != "moment_scales"}}}
    with pytest.raises(TypeError, match=r"^loaded state dict's int8 moments of param 0 need their 'moment_scales'"):
        opt.load_state_dict(broken)
    broken["state"][0]["moment_scales"] = torch.zeros(2, 1, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match=r"shape \(2, 2\)"):
        opt.load_state_dict(broken)
    assert_identical(snapshot(opt), before)


def test_the_op_refuses_bad_scales_and_changes_nothing(cpu_backend):
    p = torch.randn(100)
    codes = [torch.zeros(100, dtype=torch.int8), torch.zeros(100, dtype=torch.uint8)]
    step = torch.zeros(1)
    good = torch.zeros(2, 2, dtype=torch.bfloat16)
    from fused_optim.ops.adam import adam_step
    for scales, message in [([torch.zeros(2, 3, dtype=torch.bfloat16)], "moment_scales must be"),
                            ([good.float()], "moment_scales must be"), ([], "state tensors|must be float32")]:
        before = [t.clone() for t in (p, *codes, step, good)]
        with pytest.raises(RuntimeError, match=message):
            adam_step([p], [torch.randn(100)], [codes[0]], [codes[1]], [], [], [step], scales, lr=1e-2, beta1=0.9,
                      beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled_weight_decay=True, amsgrad=False,
                      maximize=False, backend=cpu_backend)
        assert_identical([p, *codes, step, good], before)


def test_int8_moments_refuse_a_differentiable_group_in_one_sentence():
    with pytest.raises(ValueError, match=r"^moments='int8' does not take differentiable=True"):
        fused_optim.AdamW([torch.nn.Parameter(torch.randn(3))], moments="int8", differentiable=True)


def test_a_skipped_step_leaves_codes_and_scales_as_they_were(cpu_backend):
    """found_inf (GradScaler's inf/NaN check): nothing moves, though requantizing the dequantized moments would
    not give their codes back."""
    params = make_params([torch.randn(200), torch.randn(3, 70)], torch.bfloat16, "cpu")
    opt = fused_optim.AdamW(params, lr=1e-2, moments="int8", amsgrad=True, master_weights=24, backend=cpu_backend)
    set_grads(random_grads([(200,), (3, 70)], torch.bfloat16), params)
    opt.step()
    before = snapshot(opt)
    with torch.no_grad():
        lists = opt._gather(opt.param_groups[0], [p.grad for p in params], 0)["remainder24", 0]
        opt._update(opt.param_groups[0], "remainder24", lists, None, torch.tensor(1.0))
    assert_identical(snapshot(opt), before)


def test_gradient_release_steps_int8_moments_as_a_step_does():
    init = [torch.randn(100), torch.randn(7, 9)]
    models = []
    for release in (False, True):
        torch.manual_seed(0)
        params = make_params(init, torch.float32, "cpu")
        opt = fused_optim.AdamW(params, lr=1e-2, moments="int8", gradient_release=release)
        generator = torch.Generator().manual_seed(1)
        for _ in range(3):
            loss = sum((p * torch.randn(p.shape, generator=generator)).sum() for p in params)
            loss.backward()
            opt.step()
            opt.zero_grad()
        models.append((params, opt))
    (plain, plain_opt), (released, released_opt) = models
    for p, q in zip(plain, released):
        assert q.grad is None
        # the same updates, rounded with other random bits (each released param draws from its own stream): three
        # steps of lr 1e-2 each, apart by a small part of one
        assert torch.allclose(p, q, atol=3e-3)
        assert released_opt.state[q]["exp_avg"].dtype == torch.int8



# SGD's momentum buffer (moments="int8": the same codec, one signed moment)


@pytest.mark.parametrize("options", [dict(momentum=0.9, weight_decay=0.01), dict(momentum=0.9, nesterov=True),
                                     dict(momentum=0.8, dampening=0.1, maximize=True)], ids=["plain", "nesterov",
                                                                                             "dampening-maximize"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_int8_sgd_buffers_follow_their_emulation(backend, device, dtype, options):
    """As the Adam and Lion moments above: the buffer's first step takes the grad, so its first codes are the grad's."""
    params, moments, emulated_params, emulated = run(backend, dict(cls="SGD", **options), dtype, device=device)
    assert_identical(moments, emulated)
    assert_identical([p.detach() for p in params], [p.detach() for p in emulated_params])


def test_int8_sgd_state_trades_with_torch_sgd_and_resumes():
    shapes = [(7,), (3, 40)]
    params = make_params([torch.randn(s) for s in shapes], torch.float32, "cpu")
    ours = fused_optim.SGD(params, lr=1e-2, momentum=0.9, moments="int8")
    set_grads(random_grads(shapes), params)
    ours.step()
    saved = ours.state_dict()
    assert [saved["state"][0][k].dtype for k in ("momentum_buffer", "moment_scales")] == [torch.int8, torch.bfloat16]
    theirs = torch.optim.SGD(params, lr=1e-2, momentum=0.9)
    theirs.load_state_dict(ours.torch_state_dict())
    for p in params:
        state = ours.state[p]
        assert torch.equal(theirs.state[p]["momentum_buffer"], dequantize(state["momentum_buffer"],
                                                                          state["moment_scales"][0]))
    theirs.step()
    ours.load_state_dict(theirs.state_dict())  # torch's fp32 buffers, quantized to nearest
    for p in params:
        codes, scales = quantize(theirs.state[p]["momentum_buffer"], True)
        assert torch.equal(ours.state[p]["momentum_buffer"], codes)
        assert torch.equal(ours.state[p]["moment_scales"][0], scales)
    again = fused_optim.SGD(params, lr=1e-2, momentum=0.9, moments="int8")
    again.load_state_dict(ours.state_dict())  # ours, as saved: codes and scales as they are
    assert_identical(snapshot(again)["state"], snapshot(ours)["state"])


def test_int8_sgd_buffers_hold_1_byte_a_param():
    p = torch.nn.Parameter(torch.randn(1 << 16))
    opt = fused_optim.SGD([p], lr=1e-2, momentum=0.9, moments="int8")
    p.grad = torch.randn_like(p)
    opt.step()
    assert state_bytes_per_param(opt) == 1 + 2 / BLOCK + 4 / (1 << 16)
    # README's table: with bf16 params and 24-bit masters, one byte more
    q = torch.nn.Parameter(torch.randn(1 << 16).bfloat16())
    opt = fused_optim.SGD([q], lr=1e-2, momentum=0.9, moments="int8", master_weights=24)
    q.grad = torch.randn_like(q)
    opt.step()
    assert state_bytes_per_param(opt) == 2 + 2 / BLOCK + 4 / (1 << 16)


def test_int8_sgd_refuses_sparse_grads_in_one_sentence():
    embedding = torch.nn.Embedding(10, 3, sparse=True)
    opt = fused_optim.SGD(embedding.parameters(), lr=1e-2, momentum=0.9, moments="int8")
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match=r"^fused_optim.SGD\(moments='int8'\) does not take sparse gradients"):
        opt.step()
