"""fused_optim.clip_grad_norm_ against torch.nn.utils.clip_grad_norm_: the same signature, the same returned norm
(value and dtype) and the same clipped grads, over norm types (the kernels' 1, 2, 3.5, inf; torch's fallback for
0 and -inf), grad dtypes (fp32, bf16, fp16, mixed), clipping or not, and the ways of passing params (one tensor,
a generator, params without grads, none at all); non-finite grads (and fp16 grads whose norm is inf in fp16) with
and without error_if_nonfinite; and no host read during a clip (a TorchDispatchMode records every dispatched op).

Tolerances: our norm is summed in fp32 over all elements and rounded once to the grads' dtype; torch rounds each
tensor's norm to that dtype first, then the norm of the norms. So fp32 agrees to a few ulp, bf16/fp16 to about
two ulp of their own, and the clipped grads to the rounding of a coefficient computed in fp32 (ours) or in the
grads' dtype (torch's); both are also compared with the float64 truth.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from conftest import DispatchedOps, assert_signature_extends

import fused_optim

SHAPES = [(1,), (3,), (33, 5), (257,), (4, 3, 2)]
DTYPE_SETS = {  # the grads' dtypes, one per shape
    "fp32": [torch.float32] * len(SHAPES),
    "bf16": [torch.bfloat16] * len(SHAPES),
    "fp16": [torch.float16] * len(SHAPES),
    "mixed": [torch.float32, torch.bfloat16, torch.float16, torch.bfloat16, torch.float32],
}
# the unit roundoff of the returned norm's dtype (the promoted grads' dtype)
ULP = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
KERNEL_NORMS = [1.0, 2.0, float("inf"), 3.5]
TORCH_NORMS = [0.0, -float("inf")]  # not the kernels': fused_optim runs torch's


def make_params(dtypes, shapes=SHAPES) -> list[torch.nn.Parameter]:
    """Params with seeded grads of different scales per tensor (so no tensor dominates every norm)."""
    params = []
    for i, (shape, dtype) in enumerate(zip(shapes, dtypes)):
        p = torch.nn.Parameter(torch.randn(shape, dtype=dtype))
        p.grad = (torch.randn(shape) * 0.5 * (i + 1)).to(dtype)
        params.append(p)
    return params


def twin(params) -> list[torch.nn.Parameter]:
    """Copies of params with copies of their grads (Parameter's deepcopy drops the grad)."""
    copies = []
    for p in params:
        q = torch.nn.Parameter(p.detach().clone())
        q.grad = None if p.grad is None else p.grad.clone()
        copies.append(q)
    return copies


def float64_norm(params, norm_type: float) -> float:
    return float(torch.linalg.vector_norm(torch.cat([p.grad.double().flatten() for p in params]), norm_type))


def test_signature_extends_torchs():
    assert_signature_extends(fused_optim.clip_grad_norm_, torch.nn.utils.clip_grad_norm_)


@pytest.mark.parametrize("norm_type", KERNEL_NORMS + TORCH_NORMS, ids=lambda n: f"norm{n}")
@pytest.mark.parametrize("dtypes", list(DTYPE_SETS), ids=list(DTYPE_SETS))
@pytest.mark.parametrize("clips", [True, False], ids=["clips", "no-clip"])
def test_matches_torch(cpu_backend, norm_type, dtypes, clips):
    ours = make_params(DTYPE_SETS[dtypes])
    theirs, original = twin(ours), twin(ours)
    true_norm = float64_norm(ours, norm_type)
    max_norm = true_norm / 3 if clips else true_norm * 10 + 1
    expected = torch.nn.utils.clip_grad_norm_(theirs, max_norm, norm_type)
    norm = fused_optim.clip_grad_norm_(ours, max_norm, norm_type, backend=cpu_backend)

    assert norm.dtype == expected.dtype and norm.shape == expected.shape == () and norm.device == expected.device
    if norm_type in TORCH_NORMS:  # torch's own code ran: bit-identical
        assert torch.equal(norm, expected)
        for p, q in zip(ours, theirs):
            assert torch.equal(p.grad, q.grad)
        return
    # torch rounds each tensor's norm to its grad's dtype: as far off as the coarsest of them
    coarsest_ulp = max(ULP[d] for d in DTYPE_SETS[dtypes])
    assert math.isclose(float(norm), float(expected), rel_tol=4 * coarsest_ulp)
    # ours is rounded once from fp32: as close to the truth as a rounding to its dtype (plus fp32 summation)
    assert math.isclose(float(norm), true_norm, rel_tol=ULP[norm.dtype] + 1e-6)
    for p, q, before in zip(ours, theirs, original):
        assert p.grad.dtype == before.grad.dtype
        if not clips:  # a factor of exactly 1: untouched
            assert torch.equal(p.grad, before.grad)
            continue
        exact = before.grad.double() * (max_norm / (true_norm + 1e-6))
        torch_error = float((q.grad.double() - exact).abs().max())
        our_error = float((p.grad.double() - exact).abs().max())
        element_ulp = ULP[p.grad.dtype] * float(exact.abs().max())
        assert our_error <= max(torch_error, element_ulp) + 2 * ULP[torch.float32] * float(exact.abs().max())
    if clips:  # and the result has the norm asked for (a little under: max_norm / (norm + 1e-6), as torch's)
        clipped_norm = max_norm * true_norm / (true_norm + 1e-6)
        assert math.isclose(float64_norm(ours, norm_type), clipped_norm, rel_tol=4 * coarsest_ulp)


def test_zero_size_grads_count_for_nothing(cpu_backend):
    ours = make_params([torch.float32] * 3, [(0,), (5, 3), (0, 4)])
    theirs = twin(ours)
    expected = torch.nn.utils.clip_grad_norm_(theirs, 0.5)
    norm = fused_optim.clip_grad_norm_(ours, 0.5, backend=cpu_backend)
    torch.testing.assert_close(norm, expected, rtol=4 * ULP[torch.float32], atol=0)
    torch.testing.assert_close(ours[1].grad, theirs[1].grad, rtol=4 * ULP[torch.float32], atol=0)


def test_a_single_tensor(cpu_backend):
    (ours,) = make_params([torch.float32], [(40, 3)])
    (theirs,) = twin([ours])
    expected = torch.nn.utils.clip_grad_norm_(theirs, 0.1)
    norm = fused_optim.clip_grad_norm_(ours, 0.1, backend=cpu_backend)
    torch.testing.assert_close(norm, expected, rtol=4 * ULP[torch.float32], atol=0)
    torch.testing.assert_close(ours.grad, theirs.grad, rtol=4 * ULP[torch.float32], atol=0)


def test_a_generator(cpu_backend):
    ours = make_params(DTYPE_SETS["fp32"])
    theirs = twin(ours)
    expected = torch.nn.utils.clip_grad_norm_((p for p in theirs), 0.1)
    norm = fused_optim.clip_grad_norm_((p for p in ours), 0.1, backend=cpu_backend)
    torch.testing.assert_close(norm, expected, rtol=4 * ULP[torch.float32], atol=0)
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p.grad, q.grad, rtol=4 * ULP[torch.float32], atol=0)


def test_an_empty_generator_warns_as_torch(cpu_backend):
    with pytest.warns(UserWarning, match="empty generator") as ours:
        norm = fused_optim.clip_grad_norm_((p for p in []), 1.0, backend=cpu_backend)
    with pytest.warns(UserWarning, match="empty generator") as theirs:
        torch.nn.utils.clip_grad_norm_((p for p in []), 1.0)
    assert torch.equal(norm, torch.tensor(0.0))
    assert str(ours[0].message) == str(theirs[0].message)
    assert ours[0].filename == __file__  # stacklevel: the warning points at the caller, as torch's does


def test_params_without_grads_are_left_alone(cpu_backend):
    ours = make_params(DTYPE_SETS["fp32"])
    ours[1].grad = None
    ours[3].grad = None
    theirs = twin(ours)
    expected = torch.nn.utils.clip_grad_norm_(theirs, 0.2)
    norm = fused_optim.clip_grad_norm_(ours, 0.2, backend=cpu_backend)
    torch.testing.assert_close(norm, expected, rtol=4 * ULP[torch.float32], atol=0)
    assert ours[1].grad is None and ours[3].grad is None
    for p, q in zip(ours, theirs):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=4 * ULP[torch.float32], atol=0)


@pytest.mark.parametrize("params", ["empty-list", "no-grads"])
def test_nothing_to_clip_returns_zero(cpu_backend, params):
    ours = [] if params == "empty-list" else [torch.nn.Parameter(torch.randn(3))]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a list is not a generator: no warning
        norm = fused_optim.clip_grad_norm_(ours, 1.0, backend=cpu_backend)
    expected = torch.nn.utils.clip_grad_norm_(twin(ours), 1.0)
    assert torch.equal(norm, expected) and torch.equal(norm, torch.tensor(0.0))


def clip_non_finite_as_torch(ours, norm_type: float, backend: str) -> torch.Tensor:
    """Clips `ours`, whose norm is non-finite, and twins of them with torch's: the same error under
    error_if_nonfinite (no grad changed by it), then torch's norm and grads. Returns our norm."""
    theirs, original = twin(ours), twin(ours)
    with pytest.raises(RuntimeError) as their_error:
        torch.nn.utils.clip_grad_norm_(theirs, 1.0, norm_type, error_if_nonfinite=True)
    with pytest.raises(RuntimeError) as our_error:
        fused_optim.clip_grad_norm_(ours, 1.0, norm_type, error_if_nonfinite=True, backend=backend)
    assert str(our_error.value) == str(their_error.value)
    for p, before in zip(ours, original):  # nothing clipped before the error
        torch.testing.assert_close(p.grad, before.grad, rtol=0, atol=0, equal_nan=True)
    expected = torch.nn.utils.clip_grad_norm_(theirs, 1.0, norm_type)
    norm = fused_optim.clip_grad_norm_(ours, 1.0, norm_type, backend=backend)
    torch.testing.assert_close(norm, expected, rtol=0, atol=0, equal_nan=True)
    for p, q in zip(ours, theirs):  # scaled by the non-finite norm, as torch: zeros, and NaN where it was
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, equal_nan=True)
    return norm


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("norm_type", [2.0, 1.0, float("inf")], ids=lambda n: f"norm{n}")
def test_non_finite_grads(cpu_backend, bad, norm_type):
    ours = make_params(DTYPE_SETS["fp32"])
    ours[2].grad[4, 1] = bad
    norm = clip_non_finite_as_torch(ours, norm_type, cpu_backend)
    assert math.isnan(float(norm)) if math.isnan(bad) else float(norm) == math.inf


@pytest.mark.parametrize("norm_type", [2.0, 1.0], ids=lambda n: f"norm{n}")
def test_fp16_grads_whose_norm_passes_fp16s_range_as_torch(cpu_backend, norm_type):
    """Each grad below 65504 and the fp32 norm finite, but the norm in fp16 (what both return) inf: torch raises
    under error_if_nonfinite, and otherwise scales the grads by max_norm / inf, to zeros."""
    ours = make_params([torch.float16] * 2, [(3,), (2,)])
    for p in ours:
        p.grad.fill_(60000.0)
    assert float(clip_non_finite_as_torch(ours, norm_type, cpu_backend)) == math.inf
    assert not any(p.grad.any() for p in ours)


def test_error_message_names_the_norm_type_as_torch():
    for norm_type in (2, 2.0):
        ours = make_params(DTYPE_SETS["fp32"])
        ours[0].grad[0] = float("nan")
        theirs = twin(ours)
        with pytest.raises(RuntimeError) as their_error:
            torch.nn.utils.clip_grad_norm_(theirs, 1.0, norm_type, error_if_nonfinite=True)
        with pytest.raises(RuntimeError) as our_error:
            fused_optim.clip_grad_norm_(ours, 1.0, norm_type, error_if_nonfinite=True, backend="torch")
        assert str(our_error.value) == str(their_error.value)


@pytest.mark.parametrize("foreach", [None, False])
def test_foreach_is_accepted(cpu_backend, foreach):
    ours = make_params(DTYPE_SETS["mixed"])
    theirs = twin(ours)
    expected = torch.nn.utils.clip_grad_norm_(theirs, 0.3, foreach=foreach)
    norm = fused_optim.clip_grad_norm_(ours, 0.3, foreach=foreach, backend=cpu_backend)
    assert math.isclose(float(norm), float(expected), rel_tol=4 * ULP[torch.bfloat16])  # torch's bf16 norms


def test_unknown_backend_is_refused():
    params = make_params(DTYPE_SETS["fp32"])
    before = twin(params)
    with pytest.raises(ValueError, match="backend"):
        fused_optim.clip_grad_norm_(params, 0.1, backend="gpu")
    for p, q in zip(params, before):
        assert torch.equal(p.grad, q.grad)


@pytest.mark.parametrize("norm_type", KERNEL_NORMS, ids=lambda n: f"norm{n}")
def test_no_host_read(cpu_backend, norm_type):
    params = make_params(DTYPE_SETS["mixed"])
    with DispatchedOps() as ops:
        fused_optim.clip_grad_norm_(params, 0.1, norm_type, backend=cpu_backend)
    assert ops.names, "the recorder saw nothing"
    assert "aten::_local_scalar_dense" not in ops.names
    # error_if_nonfinite=True needs the norm's value, as in torch: the recorder does see that read
    with DispatchedOps() as ops:
        fused_optim.clip_grad_norm_(params, 0.1, norm_type, error_if_nonfinite=True, backend=cpu_backend)
    assert "aten::_local_scalar_dense" in ops.names

