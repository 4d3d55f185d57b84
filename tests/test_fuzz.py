"""Differential fuzzing of every op against the float64 reference and torch: random configurations (sizes 0, 1 and
odd ones, dtypes, non-contiguous layouts, every option) drawn by hypothesis, each held to the same rule as the
fixed tests (ours never worse than torch at the same dtype; bit-exact where the op is exact).

The normal suite draws FUSED_OPTIM_FUZZ_EXAMPLES configurations per op (default 40: a few hundred in all);
`make fuzz` draws thousands. Draws are derandomized (seeded by the test), so a run is repeatable, and a failure
prints the configuration that failed. Backends: the C++ CPU kernels and torch's (the Triton interpreter is too slow
for thousands of draws; the fixed tests run it).

The compressed modes (int8 and bf16 moments, master remainders) are held to their emulations: the same backend's
fp32 optimizer with its state rounded as the mode stores it, bit for bit (tests/test_adam_int8_moments.py).
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import test_adam as adam_tests
import test_adam_int8_moments as int8_tests
import test_adam_moments as bf16_tests
import test_cross_entropy as cross_entropy_tests
import test_lion as lion_tests
import test_sgd as sgd_tests
from test_adam import assert_identical
from fused_optim.ops.accumulate import accumulate_grads
from fused_optim.ops.total_norm import total_norm

EXAMPLES = int(os.environ.get("FUSED_OPTIM_FUZZ_EXAMPLES", "40"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
BACKENDS = st.sampled_from(["cpu", "torch"])
DTYPES = st.sampled_from([torch.float32, torch.bfloat16, torch.float16])
# sizes: empty, one element, odd sizes around vector widths and blocks, and the CPU chunk boundary's neighbours
SIZES = st.one_of(st.sampled_from([0, 1, 3, 7, 15, 17, 1023, 1025, 16383, 16385]), st.integers(0, 5000))
SHAPES = st.lists(st.one_of(SIZES.map(lambda n: (n,)), st.tuples(st.integers(1, 40), st.integers(1, 40))),
                  min_size=1, max_size=4)


@FUZZ
@given(backend=BACKENDS, dtype=DTYPES, shapes=SHAPES, cls=st.sampled_from(["Adam", "AdamW"]),
       weight_decay=st.sampled_from([0.0, 0.1]), amsgrad=st.booleans(), maximize=st.booleans(),
       betas=st.sampled_from([(0.9, 0.999), (0.8, 0.95), (0.0, 0.99)]), lr=st.sampled_from([1e-3, 1e-2]),
       lr_tensor=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_adam(backend, dtype, shapes, cls, weight_decay, amsgrad, maximize, betas, lr, lr_tensor, seed):
    # beta2 = 0 is left to tests/test_adam.py::test_zero_betas: there an update is m / |g|, and one ulp of a tiny |g|
    # moves its worst element by more than the max-error rule below allows either implementation
    torch.manual_seed(seed)
    options = dict(cls=cls, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize, betas=betas,
                   lr_tensor=lr_tensor)
    adam_tests.check_against_reference_and_torch(backend, "cpu", dtype, options, shapes, steps=3, lr=lr)


@FUZZ
@given(backend=BACKENDS, dtype=DTYPES, shapes=SHAPES, momentum=st.sampled_from([0.0, 0.9]),
       dampening=st.sampled_from([0.0, 0.3]), nesterov=st.booleans(), weight_decay=st.sampled_from([0.0, 0.1]),
       maximize=st.booleans(), lr_tensor=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_sgd(backend, dtype, shapes, momentum, dampening, nesterov, weight_decay, maximize, lr_tensor, seed):
    torch.manual_seed(seed)
    nesterov = nesterov and momentum > 0 and dampening == 0  # torch's own rule, else a ValueError
    options = dict(momentum=momentum, dampening=dampening, nesterov=nesterov, weight_decay=weight_decay,
                   maximize=maximize, lr_tensor=lr_tensor)
    options = {k: v for k, v in options.items() if v or k == "lr_tensor"}
    sgd_tests.check_against_reference_and_torch(backend, "cpu", dtype, options, shapes, steps=3)


@lion_tests.needs_lion_pytorch
@FUZZ
@given(backend=BACKENDS, dtype=DTYPES, shapes=SHAPES, weight_decay=st.sampled_from([0.0, 0.1, 1.0]),
       betas=st.sampled_from([(0.9, 0.99), (0.95, 0.98), (0.0, 0.5)]), maximize=st.booleans(),
       lr=st.sampled_from([1e-4, 1e-2]), lr_tensor=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_lion(backend, dtype, shapes, weight_decay, betas, maximize, lr, lr_tensor, seed):
    torch.manual_seed(seed)
    options = dict(weight_decay=weight_decay, betas=betas, maximize=maximize, lr_tensor=lr_tensor)
    lion_tests.check_against_reference_and_lion_pytorch(backend, "cpu", dtype, options, shapes, steps=3, lr=lr)


@FUZZ
@given(backend=BACKENDS, dtype=DTYPES, rows=st.sampled_from([1, 2, 3, 17, 64]),
       classes=st.one_of(st.sampled_from([1, 2, 3, 1000, 1023, 4097]), st.integers(1, 3000)),
       reduction=st.sampled_from(["none", "sum", "mean"]), weight=st.booleans(), ignored=st.booleans(),
       label_smoothing=st.sampled_from([0.0, 0.1, 1.0]), ignore_index=st.sampled_from([-100, -1, 0]),
       seed=st.integers(0, 2**31 - 1))
def test_cross_entropy(backend, dtype, rows, classes, reduction, weight, ignored, label_smoothing, ignore_index,
                       seed):
    torch.manual_seed(seed)
    options = dict(weight=weight, ignored=ignored, label_smoothing=label_smoothing, ignore_index=ignore_index)
    cross_entropy_tests.check_against_reference_and_torch(backend, "cpu", dtype, reduction, options, (rows, classes))


# the optimizers that store moments ("SGD": its momentum buffer), with the options that change their update
OPTIMIZER_OPTIONS = st.one_of(
    st.fixed_dictionaries(dict(cls=st.sampled_from(["Adam", "AdamW"]), weight_decay=st.sampled_from([0.0, 0.1]),
                               amsgrad=st.booleans(), maximize=st.booleans(),
                               betas=st.sampled_from([(0.9, 0.999), (0.8, 0.95), (0.0, 0.99)]))),
    st.fixed_dictionaries(dict(cls=st.just("Lion"), weight_decay=st.sampled_from([0.0, 0.1]), maximize=st.booleans(),
                               betas=st.sampled_from([(0.9, 0.99), (0.0, 0.5)]))),
    st.fixed_dictionaries(dict(cls=st.just("SGD"), momentum=st.sampled_from([0.5, 0.9]),
                               weight_decay=st.sampled_from([0.0, 0.1]), maximize=st.booleans()),
                          optional=dict(nesterov=st.just(True), dampening=st.just(0.3))),
).filter(lambda options: not (options.get("nesterov") and options.get("dampening")))  # torch's rule for SGD


def master_weights_for(dtype: torch.dtype) -> st.SearchStrategy:
    """master_weights a param dtype takes: 24 keeps a bf16 param's master only."""
    if dtype == torch.float32:
        return st.just(False)
    return st.sampled_from([False, True, 24] if dtype == torch.bfloat16 else [False, True])


@FUZZ
@given(data=st.data(), backend=BACKENDS, dtype=DTYPES, shapes=SHAPES, moments=st.sampled_from(["int8", "bf16"]),
       steps=st.integers(1, 4), seed=st.integers(0, 2**31 - 1))
def test_compressed_moments(data, backend, dtype, shapes, moments, steps, seed):
    """int8 moments (AdamW, Adam, Lion, SGD's buffer) and bf16 ones (SGD keeps none) against their emulations."""
    int8 = moments == "int8"
    options = data.draw(OPTIMIZER_OPTIONS if int8 else OPTIMIZER_OPTIONS.filter(lambda o: o["cls"] != "SGD"),
                        label="options")
    master_weights = data.draw(master_weights_for(dtype), label="master_weights")
    torch.manual_seed(seed)
    run = int8_tests.run if int8 else bf16_tests.run
    params, stored, emulated_params, emulated = run(backend, options, dtype, steps, master_weights, shapes)
    assert_identical(stored, emulated)
    assert_identical([p.detach() for p in params], [p.detach() for p in emulated_params])


@FUZZ
@given(backend=BACKENDS, shapes=SHAPES, options=OPTIMIZER_OPTIONS, moments=st.sampled_from(["fp32", "int8"]),
       bits=st.sampled_from([16, 24]), steps=st.integers(1, 6), seed=st.integers(0, 2**31 - 1))
def test_master_remainders(backend, shapes, options, moments, bits, steps, seed):
    """bf16 params: a 16-bit remainder steps the fp32 trajectory, a 24-bit one the fp32 step rounded to 24 bits."""
    torch.manual_seed(seed)
    options = dict(options, moments=moments)
    check = adam_tests.check_master_remainders if bits == 16 else adam_tests.check_24_bit_masters
    check(backend, "cpu", options, shapes, steps)


@FUZZ
@given(backend=BACKENDS, dtype=DTYPES, rows=st.sampled_from([1, 2, 3, 17, 64]),
       classes=st.one_of(st.sampled_from([1, 2, 3, 1000, 4097]), st.integers(1, 3000)),
       reduction=st.sampled_from(["none", "sum", "mean"]), z_loss=st.sampled_from([0.0, 1e-4, 1e-2]),
       softcap=st.sampled_from([None, 2.0, 5.0, 30.0]), weight=st.booleans(), ignored=st.booleans(),
       label_smoothing=st.sampled_from([0.0, 0.1]), ignore_index=st.sampled_from([-100, -1, 0]),
       seed=st.integers(0, 2**31 - 1))
def test_cross_entropy_z_loss_and_softcap(backend, dtype, rows, classes, reduction, z_loss, softcap, weight, ignored,
                                          label_smoothing, ignore_index, seed):
    torch.manual_seed(seed)
    options = dict(weight=weight, ignored=ignored, label_smoothing=label_smoothing, ignore_index=ignore_index,
                   z_loss=z_loss, softcap=softcap)
    cross_entropy_tests.check_extras_against_reference(backend, "cpu", dtype, reduction, options, (rows, classes))


@FUZZ
@given(backend=BACKENDS, dtypes=st.lists(DTYPES, min_size=1, max_size=4), sizes=st.lists(SIZES, min_size=4,
                                                                                       max_size=4),
       transposed=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_accumulate_grads(backend, dtypes, sizes, transposed, seed):
    """main += grad is one fp32 addition of an exactly widened grad: bit for bit the float64 sum rounded to fp32."""
    torch.manual_seed(seed)
    main, grads = [], []
    for dtype, n in zip(dtypes, sizes):
        shape = (n, 3) if transposed else (n,)
        base = torch.randn(shape[::-1]).t() if transposed else torch.randn(shape)  # column-major when transposed
        main.append(base.clone() if not transposed else base.t().contiguous().t())
        grads.append(torch.randn(shape).to(dtype))
    expected = [(m.double() + g.double()).float() for m, g in zip(main, grads)]
    accumulate_grads(main, grads, backend=backend)
    for m, e in zip(main, expected):
        assert torch.equal(m, e)


@FUZZ
@given(backend=BACKENDS, dtypes=st.lists(DTYPES, min_size=1, max_size=4), sizes=st.lists(SIZES, min_size=4,
                                                                                       max_size=4),
       norm_type=st.sampled_from([1.0, 2.0, 3.5, math.inf, 0.5]), scale=st.sampled_from([1e-20, 1.0, 1e15]),
       seed=st.integers(0, 2**31 - 1))
def test_total_norm(backend, dtypes, sizes, norm_type, scale, seed):
    """The norm of every element as one vector, no worse than torch's vector_norm of the per-tensor norms."""
    torch.manual_seed(seed)
    tensors = [(torch.randn(n) * scale).to(dtype) for dtype, n in zip(dtypes, sizes)]
    flat = torch.cat([t.double().reshape(-1) for t in tensors])
    expected = torch.linalg.vector_norm(flat, norm_type).item() if flat.numel() else 0.0
    got = total_norm(tensors, norm_type, backend=backend).item()
    nonempty = [t for t in tensors if t.numel()]
    theirs = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(nonempty, norm_type, dtype=torch.float32)),
                                      norm_type).item() if nonempty else 0.0
    if not math.isfinite(expected) or expected == 0.0:
        assert got == expected or (math.isinf(expected) and math.isinf(got))
        return
    ours_error, torch_error = abs(got - expected) / expected, abs(theirs - expected) / expected
    assert ours_error <= torch_error + 2 * torch.finfo(torch.float32).eps, (ours_error, torch_error)


@pytest.mark.skipif(EXAMPLES < 1000, reason="the long run: make fuzz")
def test_the_long_run_draws_thousands():
    assert EXAMPLES >= 1000
