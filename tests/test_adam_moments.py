"""Adam/AdamW with `moments="bf16"`: the moments stored as bf16, updated in fp32 and rounded back stochastically.

The rounding draws its bits from a hash of (seed, tensor, step, moment, element) that every backend computes alike,
so each backend is checked bit for bit against its own fp32-moment optimizer whose moments are set, before each
step, to the dequantized bf16 values and rounded after it with fused_optim/rounding.py's stochastic rounding: what
moments="bf16" adds to the fp32 update (itself checked against float64 and torch in test_adam.py) and nothing else.
"""

from __future__ import annotations

import io

import pytest
import torch
from conftest import CPU_BACKENDS
from test_adam import assert_identical, make_params, random_grads, set_grads, snapshot

import fused_optim
from fused_optim.reference import ReferenceAdam
from fused_optim.rounding import bf16_stochastic_round

SHAPES = [(1,), (3,), (0,), (1023,), (33, 17)]
OPTIONS = [
    pytest.param(dict(cls="AdamW", weight_decay=0.01), id="adamw"),
    pytest.param(dict(cls="Adam", weight_decay=0.01, amsgrad=True, maximize=True), id="adam-l2-amsgrad-maximize"),
]
MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
CHUNKED_SHAPES = [(16385,), (3, 13339)]  # past the CPU kernel's 16384-element chunks


def run(backend, options, dtype, steps=3, master_weights=False, shapes=SHAPES):
    """(params, bf16 moments per key) of a moments="bf16" run, and (params, moments) of its emulation. `options`
    names the class ("AdamW", "Adam", "Lion": one moment, or "SGD": its momentum buffer) and its arguments."""
    init = [torch.randn(s) for s in shapes]
    kwargs = dict(options)
    name = kwargs.pop("cls")
    cls = getattr(fused_optim, name)
    if master_weights:
        kwargs["master_weights"] = master_weights
    params, emulated_params = make_params(init, dtype, "cpu"), make_params(init, dtype, "cpu")
    opt = cls(params, lr=1e-2, moments="bf16", backend=backend, **kwargs)
    fp32_opt = cls(emulated_params, lr=1e-2, backend=backend, **kwargs)
    seed = opt.param_groups[0]["seed"]
    keys = {"Lion": ("exp_avg",), "SGD": ("momentum_buffer",)}.get(
        name, MOMENT_KEYS if kwargs.get("amsgrad") else MOMENT_KEYS[:2])
    emulated = {key: [torch.zeros_like(p, dtype=torch.bfloat16) for p in params] for key in keys}
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        grads = random_grads(shapes, dtype, generator=generator)
        set_grads(grads, params, emulated_params)
        opt.step()
        for i, p in enumerate(emulated_params):
            for key in keys if fp32_opt.state[p] else ():
                fp32_opt.state[p][key].copy_(emulated[key][i])
        fp32_opt.step()
        for i, p in enumerate(emulated_params):
            state = fp32_opt.state[p]
            for moment, key in enumerate(keys):
                emulated[key][i] = bf16_stochastic_round(state[key], seed, i, state["step"], moment)
    ours = {key: [opt.state[p][key] for p in params] for key in keys}
    return params, ours, emulated_params, emulated


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend, device", CPU_BACKENDS)
def test_bf16_moments_follow_their_emulation(backend, device, dtype, options):
    params, moments, emulated_params, emulated = run(backend, options, dtype)
    assert_identical(moments, emulated)
    assert_identical([p.detach() for p in params], [p.detach() for p in emulated_params])


@pytest.mark.parametrize("master_weights", [True, 24])
@pytest.mark.parametrize("backend, device", CPU_BACKENDS)
def test_bf16_moments_with_master_weights_follow_their_emulation(backend, device, master_weights):
    params, moments, emulated_params, emulated = run(backend, OPTIONS[0].values[0], torch.bfloat16,
                                                     master_weights=master_weights)
    assert_identical(moments, emulated)
    assert_identical([p.detach() for p in params], [p.detach() for p in emulated_params])


@pytest.mark.parametrize("options", [*(p.values[0] for p in OPTIONS), dict(cls="Lion"), dict(cls="SGD", momentum=0.9)],
                         ids=["adamw", "adam-l2-amsgrad-maximize", "lion", "sgd"])
def test_cpu_chunks_round_with_their_own_elements_bits(options):
    """The CPU kernel steps 16384-element chunks (on several threads), each drawing the random bits of its own
    elements: tensors of a few chunks, not a multiple of one, follow the emulation bit for bit."""
    params, moments, emulated_params, emulated = run("cpu", options, torch.float32, steps=2, shapes=CHUNKED_SHAPES)
    assert_identical(moments, emulated)
    assert_identical([p.detach() for p in params], [p.detach() for p in emulated_params])


def test_bf16_moments_keep_the_second_moment_decaying():
    """The reason for stochastic rounding: after one large grad, small grads make exp_avg_sq decay by 0.1 % a step,
    under half a bf16 ulp. Rounded to nearest it would stay where it was; rounded stochastically it follows the
    float64 reference in the mean (4096 elements: a standard error well under 1 %)."""
    shape = (4096,)
    p = torch.nn.Parameter(torch.randn(shape))
    opt = fused_optim.AdamW([p], lr=1e-4, moments="bf16", backend="cpu")
    reference = ReferenceAdam([p], lr=1e-4, decoupled_weight_decay=True, weight_decay=0.01)
    for step in range(300):
        grad = torch.randn(shape) * (1.0 if step == 0 else 0.01)
        p.grad = grad.clone()
        opt.step()
        reference.step([grad])
        if step == 0:
            first = reference.exp_avg_sqs[0].clone()
    ours, exact = opt.state[p]["exp_avg_sq"].double(), reference.exp_avg_sqs[0]
    assert exact.mean() < 0.8 * first.mean()  # the reference decayed to ~77 % (rounded to nearest: stuck at 100 %)
    assert abs(ours.mean() / exact.mean() - 1) < 0.01
    # each element's rounding errors random-walk: a few % after 300 steps
    assert ((ours - exact).abs() / exact).median() < 0.06


@pytest.mark.parametrize("cls, moments", [(fused_optim.AdamW, "bf16"), (fused_optim.AdamW, "int8"),
                                           (fused_optim.Lion, "bf16"), (fused_optim.Lion, "int8")],
                         ids=["adamw-bf16", "adamw-int8", "lion-bf16", "lion-int8"])
def test_compressed_moments_resume_bit_for_bit_and_save_as_they_are(cls, moments):
    """bf16 moments save as bf16, int8 ones as their codes and scales; a run resumed from the save goes on bit
    for bit (the rounding seed comes back with the group)."""
    keys = {key: signed for key, signed in cls._moment_keys.items() if key != "max_exp_avg_sq"}
    if moments == "bf16":
        saved_dtypes = dict.fromkeys(keys, torch.bfloat16)
    else:
        saved_dtypes = {**{key: torch.int8 if signed else torch.uint8 for key, signed in keys.items()},
                        "moment_scales": torch.bfloat16}
    shapes = [(5,), (300,)]
    init = [torch.randn(s) for s in shapes]
    grads = [random_grads(shapes, torch.bfloat16) for _ in range(6)]
    runs = []
    for resume in (False, True):
        params = make_params(init, torch.bfloat16, "cpu")
        torch.manual_seed(0)  # the group's seed: the same in both runs, and the resumed run takes it from the save
        opt = cls(params, lr=1e-2, moments=moments, master_weights=24)
        for step, g in enumerate(grads):
            if resume and step == 3:
                buffer = io.BytesIO()
                torch.save(opt.state_dict(), buffer)
                saved = torch.load(io.BytesIO(buffer.getvalue()))
                assert {key: saved["state"][0][key].dtype for key in saved_dtypes} == saved_dtypes
                params = [torch.nn.Parameter(p.detach().clone()) for p in params]
                opt = cls(params, lr=1e-2, moments=moments, master_weights=24)
                opt.load_state_dict(saved)
            set_grads(g, params)
            opt.step()
        runs.append(snapshot(opt)["state"].values())
    assert_identical(list(runs[0]), list(runs[1]))


def test_bf16_moments_trade_state_with_torch_adamw():
    params = make_params([torch.randn(7), torch.randn(3, 4)], torch.float32, "cpu")
    ours = fused_optim.AdamW(params, lr=1e-2, moments="bf16")
    set_grads(random_grads([(7,), (3, 4)]), params)
    ours.step()
    # ours -> torch: fp32 moments, the bf16 values exactly
    theirs = torch.optim.AdamW(params, lr=1e-2)
    theirs.load_state_dict(ours.torch_state_dict())
    for p in params:
        assert theirs.state[p]["exp_avg"].dtype == torch.float32
        assert torch.equal(theirs.state[p]["exp_avg"], ours.state[p]["exp_avg"].float())
    # torch -> ours: its fp32 moments, rounded to nearest
    theirs.step()
    ours.load_state_dict(theirs.state_dict())
    for p in params:
        for key in ("exp_avg", "exp_avg_sq"):
            assert ours.state[p][key].dtype == torch.bfloat16
            assert torch.equal(ours.state[p][key], theirs.state[p][key].bfloat16())


def state_bytes_per_param(opt) -> float:
    """Bytes of persistent optimizer state per param, counted from the tensors held (step counts included)."""
    tensors = [t for state in opt.state.values() for t in state.values() if torch.is_tensor(t)]
    numel = sum(p.numel() for group in opt.param_groups for p in group["params"])
    return sum(t.numel() * t.element_size() for t in tensors) / numel


def test_bf16_moments_halve_the_moments_bytes():  # README's table of state per param
    def state_of(dtype, cls=fused_optim.AdamW, **options):
        p = torch.nn.Parameter(torch.randn(1 << 16).to(dtype))
        opt = cls([p], **options)
        p.grad = torch.randn_like(p)
        opt.step()
        return state_bytes_per_param(opt)

    step_bytes = 4 / (1 << 16)
    assert state_of(torch.float32) == 8 + step_bytes
    assert state_of(torch.float32, moments="bf16") == 4 + step_bytes
    assert state_of(torch.bfloat16, moments="bf16", master_weights=True) == 6 + step_bytes
    assert state_of(torch.bfloat16, moments="bf16", master_weights=24) == 5 + step_bytes
    assert state_of(torch.bfloat16, fused_optim.Lion, moments="bf16", master_weights=24) == 3 + step_bytes


@pytest.mark.parametrize("cls", [fused_optim.AdamW, fused_optim.Adam, fused_optim.Lion, fused_optim.SGD],
                         ids=lambda c: c.__name__)
@pytest.mark.parametrize("moments", ["int4", "fp16", "BF16", None, 16])
def test_an_unknown_moments_storage_is_refused_in_one_sentence(moments, cls):
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match=r"^moments must be 'fp32' or 'bf16' or 'int8', not "):
        cls([p], moments=moments)
