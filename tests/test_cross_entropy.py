"""fused_optim.functional.cross_entropy / fused_optim.CrossEntropyLoss against the float64 reference
(fused_optim/reference.py) and against torch.nn.functional.cross_entropy at the same dtype, on every backend that
runs here; and the ops under them (fused_optim::cross_entropy_forward*, cross_entropy_scale_grad*_) directly.

Sizes, and why (N rows of V classes):
- (1, 2): one row of the smallest vocabulary: everything is a masked tail (Triton's smallest block is 16).
- (37, 3): many short rows; 37 is odd and, with every third row ignored in some options, leaves 25 kept rows.
- (37, 1000): one Triton block (1024) with a 24-wide masked tail; the CPU kernel splits 37 rows of 1000 over its
  threads (32 rows a task).
- (5, 4099): one past a multiple of the vector widths, and over half of Triton's 8192-wide block masked.
- (3, 32000): a real vocabulary: four 8192-wide Triton pieces (the online max/sum rescale across pieces) and long
  fp32 sums in the CPU kernel. The Triton interpreter runs one program per row, so 3 rows cost it ~0.1 s.
Logits are 4 * N(0, 1): LLM-like logits, whose log-sum-exp (10 to 20) is far from 0, so its fp32 rounding shows,
and whose softmax is neither uniform nor one-hot. Class weights are U(0.5, 1.5) (never 0), in the logits' dtype
(torch requires that), and the reference gets the same rounded values.
"""

from __future__ import annotations

import math
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from conftest import BACKEND_DEVICES, CPU_BACKENDS, TRITON_INTERPRETED, assert_signature_extends
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import fused_optim
import fused_optim.functional as FF
from fused_optim import _backend, reference

# torch 2.12 and later: torch.compile gives the losses right gradients (before, zero ones, and fused_optim.functional
# refuses them), and torch's int32-target message is the one ours repeats
TORCH_2_12 = _backend._release(torch.__version__) >= (2, 12)
DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.bfloat16, id="bf16"),
    pytest.param(torch.float16, id="fp16"),
]
LOW_PRECISION = (torch.bfloat16, torch.float16)
REDUCTIONS = ["none", "sum", "mean"]
SHAPES = [(1, 2), (37, 3), (37, 1000), (5, 4099), (3, 32000)]
# Triton's interpreter runs each row's program in Python (~15 ms a row, whatever the vocabulary): 13 rows still
# hold ignored rows among kept ones, an odd count and every block-boundary case the vocabularies above give.
INTERPRETED_ROWS = 13


def shapes_for(backend: str, device: str, shapes=SHAPES) -> list[tuple[int, int]]:
    if backend == "triton" and device == "cpu":
        return [(min(rows, INTERPRETED_ROWS), vocab) for rows, vocab in shapes]
    return shapes
FP32_EPS = torch.finfo(torch.float32).eps

# Options torch has too. `ignored`: every third row (1, 4, 7, ...) targets ignore_index, so N = 1 keeps its row
# and "mean" stays finite.
OPTIONS = {
    "plain": dict(),
    "weight": dict(weight=True),
    "label_smoothing": dict(label_smoothing=0.1),
    "weight+label_smoothing": dict(weight=True, label_smoothing=0.1),
    "ignored_rows": dict(ignored=True),
    "ignore_index=-1+weight+label_smoothing": dict(ignored=True, ignore_index=-1, weight=True, label_smoothing=0.1),
}

# Options only we have: checked against the reference alone. z_loss = 1e-2 makes z_loss * lse^2 (~2) as large as
# the cross-entropy, so an error in its gradient shows; softcap = 5 puts most 4 * N(0, 1) logits on tanh's bend,
# 30 (Gemma 2's value) leaves them nearly linear.
EXTRA_OPTIONS = {
    "z_loss": dict(z_loss=1e-2),
    "softcap": dict(softcap=5.0),
    "everything": dict(z_loss=1e-3, softcap=30.0, label_smoothing=0.1, weight=True, ignored=True),
}


# ----------------------------------------------------------------------------------------------------------------
# helpers


def make_case(num_rows, num_classes, dtype, device="cpu", *, weight=False, ignored=False, ignore_index=-100,
              label_smoothing=0.0, **extra):
    """(logits, target, class weights or None, keyword arguments for every implementation)."""
    logits = (4 * torch.randn(num_rows, num_classes)).to(device=device, dtype=dtype)
    target = torch.randint(0, num_classes, (num_rows,), device=device)
    if ignored:
        target[1::3] = ignore_index
    class_weight = (torch.rand(num_classes) + 0.5).to(device=device, dtype=dtype) if weight else None
    return logits, target, class_weight, dict(ignore_index=ignore_index, label_smoothing=label_smoothing, **extra)


def reference_loss(logits, target, weight, reduction, **kwargs):
    """The float64 reference: (loss, z-loss), differentiable in `logits` (a float64 leaf)."""
    return reference.cross_entropy(logits, target, None if weight is None else weight.double(),
                                   reduction=reduction, **kwargs)


def random_grad_output(loss: torch.Tensor):
    """A non-uniform incoming gradient for "none" (the per-row scale path), else None (a plain backward)."""
    return torch.randn(loss.shape).to(loss) if loss.dim() > 0 else None


def grad_of(loss, inputs, grad_output):
    if grad_output is not None:
        return torch.autograd.grad(loss, inputs, grad_output)
    return torch.autograd.grad(loss, inputs)


def max_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| over all elements (0 when empty); NaN counts as infinitely wrong."""
    if ref.numel() == 0:
        return 0.0
    diff = (ours.detach().double().cpu() - ref.detach().double().cpu()).abs()
    return diff.nan_to_num(nan=math.inf).max().item()


def magnitude(ref: torch.Tensor) -> float:
    return ref.detach().abs().max().item() if ref.numel() else 0.0


def max_lse(logits: torch.Tensor, softcap=None) -> float:
    z = logits.detach().double()
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    return torch.logsumexp(z, dim=1).abs().max().item() if z.numel() else 0.0


def gradient_unit(target, weight, reduction, grad_output, ignore_index=-100, z_loss=0.0, lse=0.0, **_) -> float:
    """The size of the terms that make up d loss / d logits, p * coef - [j == t] * coef_t: the reduction's scale
    (1, an incoming gradient, or 1 / the summed target weights) times the largest class weight, plus the z-loss's
    2 * z_loss * lse times its own scale. A gradient element may be much smaller (p_t - 1 with p_t near 1 cancels),
    but its rounding error is relative to these terms."""
    kept = target != ignore_index
    if not kept.any():
        return 0.0
    w_max = weight.double().abs().max().item() if weight is not None else 1.0
    if reduction == "none":
        scale = grad_output.double().abs().max().item()
        ce_scale = z_scale = scale
    elif reduction == "sum":
        ce_scale = z_scale = 1.0
    else:
        safe = torch.where(kept, target, 0)
        w_t = (weight.double()[safe] if weight is not None
               else torch.ones(len(target), dtype=torch.float64, device=target.device))
        ce_scale = 1.0 / (w_t * kept).sum().item()
        z_scale = 1.0 / kept.sum().item()
    return ce_scale * w_max + 2 * z_loss * lse * z_scale


def assert_within_ulps(ours, ref, dtype, ulps, slack, what):
    """|ours - ref| <= ulps * eps(dtype) * |ref| + slack, element by element (subnormals: one step more)."""
    info = torch.finfo(dtype)
    ref = ref.detach().double().cpu()
    bound = ulps * info.eps * ref.abs() + slack + info.eps * info.smallest_normal
    diff = (ours.detach().double().cpu() - ref).abs().nan_to_num(nan=math.inf)
    bad = diff > bound
    assert not bad.any(), f"{what}: {bad.sum().item()} elements off, worst {(diff - bound).max().item():.3g} over"


# ----------------------------------------------------------------------------------------------------------------
# 1. correctness: the float64 reference, and torch at the same dtype


@pytest.mark.interpreted_cover(2)
@pytest.mark.parametrize("options", list(OPTIONS.values()), ids=list(OPTIONS))
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_matches_reference_at_least_as_well_as_torch(backend, device, dtype, reduction, options):
    for shape in shapes_for(backend, device):
        check_against_reference_and_torch(backend, device, dtype, reduction, options, shape)


def check_against_reference_and_torch(backend, device, dtype, reduction, options, shape) -> None:
    """Loss and gradient of ours and torch's at `dtype` on a (N, V) case, each compared with the float64 reference:
    ours never worse than torch (shared with tests/test_fuzz.py)."""
    logits, target, weight, kwargs = make_case(*shape, dtype, device, **options)
    ours_x, torch_x = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ref_x = logits.double().requires_grad_()
    ours = FF.cross_entropy(ours_x, target, weight, reduction=reduction, backend=backend, **kwargs)
    theirs = F.cross_entropy(torch_x, target, weight, reduction=reduction, **kwargs)
    ref, _ = reference_loss(ref_x, target, weight, reduction, **kwargs)
    grad_output = random_grad_output(ours)
    (ours_grad,), (torch_grad,) = grad_of(ours, ours_x, grad_output), grad_of(theirs, torch_x, grad_output)
    (ref_grad,) = grad_of(ref, ref_x, None if grad_output is None else grad_output.double())

    assert (ours.dtype, ours.shape, ours.device) == (theirs.dtype, theirs.shape, theirs.device), shape
    assert (ours_grad.dtype, ours_grad.shape) == (torch_grad.dtype, torch_grad.shape), shape
    if not torch.isfinite(ref).all():  # "mean" over rows all ignored: NaN, as torch's; the gradient stays zero
        assert torch.equal(ours.isnan(), ref.isnan()) and not ours_grad.any(), shape
        return
    eps, lse = torch.finfo(dtype).eps, max_lse(logits)

    # The loss. Both are a handful of fp32 roundings of values of the loss's size, and in bf16/fp16 one final
    # rounding (ours exactly one); either may land a rounding step the other side of the reference, so two
    # ulps of slack. The kernels also form each row's loss as lse - z_t from an lse rounded to fp32, so a
    # confident row (loss << lse) carries an ulp of lse: tolerated here (once per row summed), and pinned by
    # test_fp32_loss_of_confident_rows_is_not_worse_than_torch. Against the reference alone too, as torch's
    # fp16 loss sometimes overflows to inf.
    loss_err, torch_loss_err, loss_mag = max_error(ours, ref), max_error(theirs, ref), magnitude(ref)
    rows = int((target != kwargs["ignore_index"]).sum()) if reduction == "sum" else 1
    slack = 2 * eps * loss_mag + 2 * FP32_EPS * lse * rows
    assert loss_err <= 2 * torch_loss_err + slack, (shape, loss_err, torch_loss_err)
    if dtype in LOW_PRECISION:  # computed in fp32, rounded once to the dtype: within one ulp of the value
        assert_within_ulps(ours, ref, dtype, 1, 8 * FP32_EPS * (loss_mag + lse), f"loss {shape}")
    else:
        assert loss_err <= 8 * eps * max(loss_mag, lse), (shape, loss_err)

    # The gradient. In fp32 the Triton and torch kernels form p = exp(z - lse) from an lse rounded to fp32 (half
    # an ulp of lse, 1e-6 relative at lse ~ 16), where torch divides exp(z - max) by the sum, and the CPU
    # kernel's row sums lose as much at V = 32000: that relative error of p is the fp32 slack. In bf16/fp16,
    # ours is rounded once ("sum"/"mean") or twice (per-row scale of "none") from fp32, torch's in its own
    # low-precision ops: one ulp of the largest gradient of slack.
    grad_err, torch_grad_err = max_error(ours_grad, ref_grad), max_error(torch_grad, ref_grad)
    unit = gradient_unit(target, weight, reduction, grad_output, **kwargs)
    # (+ the fp32 math's own slack: V = 1 gives an exact 0 from C + B·W - B·w - C only up to its roundings)
    slack = eps * (1 + lse) * unit if dtype == torch.float32 else eps * magnitude(ref_grad) + FP32_EPS * unit
    assert grad_err <= 2 * torch_grad_err + slack, (shape, grad_err, torch_grad_err)
    if dtype in LOW_PRECISION:
        assert_within_ulps(ours_grad, ref_grad, dtype, 2, 4 * FP32_EPS * (1 + lse) * unit, f"grad {shape}")
    else:
        assert grad_err <= 4 * eps * (1 + lse) * unit, (shape, grad_err)


@pytest.mark.parametrize("backend, device", CPU_BACKENDS)
def test_fp32_gradient_at_a_real_vocabulary_is_not_worse_than_torch(backend, device):
    """docs/design.md: "our error is never worse than torch's own implementation at the same dtype". Over a 32000-wide
    vocabulary both the mean and the max error of the fp32 gradient must be within 25% of torch's (+ half an ulp of
    the largest gradient on the max). Each p_j = exp(z_j - max) / sum carries the relative error of its row's sum,
    which grows with the terms each fp32 accumulator adds up: 8 lanes of 4000 terms gave ~5e-6 here, twice torch's
    16-lane kernel, where a pairwise sum (torch.sum's) gives ~4e-8. The means are over 480 000 gradients: no luck
    in either direction."""
    num_rows, num_classes = 15, 32000
    logits, target, _, _ = make_case(num_rows, num_classes, torch.float32, device)
    ours_x, torch_x, ref_x = logits.clone().requires_grad_(), logits.clone().requires_grad_(), \
        logits.double().requires_grad_()
    (ours_grad,) = torch.autograd.grad(FF.cross_entropy(ours_x, target, reduction="sum", backend=backend), ours_x)
    (torch_grad,) = torch.autograd.grad(F.cross_entropy(torch_x, target, reduction="sum"), torch_x)
    (ref_grad,) = torch.autograd.grad(reference_loss(ref_x, target, None, "sum")[0], ref_x)
    ours_diff, torch_diff = (ours_grad.double() - ref_grad).abs(), (torch_grad.double() - ref_grad).abs()
    ours_mean, torch_mean = ours_diff.mean().item(), torch_diff.mean().item()
    ours_max, torch_max = ours_diff.max().item(), torch_diff.max().item()
    assert ours_mean <= 1.25 * torch_mean, (ours_mean, torch_mean)
    assert ours_max <= 1.25 * torch_max + 0.5 * FP32_EPS * magnitude(ref_grad), (ours_max, torch_max)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_fp32_loss_of_confident_rows_is_not_worse_than_torch(backend, device):
    """Rows whose target logit stands 12 above the largest other one (well-learned tokens) have per-row losses of
    1e-5 to 1e-4 here, which reduction="none" hands to users (per-token log-probs, perplexity). The exact loss is
    log(1 + sum_j exp(z_j - z_t)): (max - z_t) + log(sum exp(z - max)) keeps its error relative to it, while
    lse - z_t, with lse ~ 25 rounded to fp32, loses ulp(25)/2 ~ 1e-6 on each row, 6 times torch's error here and
    up to 3% of the loss. The gradient's target element p_t - 1 = exp(z_t - lse) - 1 suffers the same way."""
    logits = 4 * torch.randn(37, 1000, device=device)
    target = torch.randint(0, 1000, (37,), device=device)
    logits[torch.arange(37), target] = logits.max(dim=1).values + 12
    assert_rows_not_worse_than_torch(logits, target, backend, torch.ones(37, device=device))


def assert_rows_not_worse_than_torch(logits, target, backend, grad_output, weight=None, **kwargs):
    """Per-row losses (reduction="none") and the gradient of grad_output . loss against the float64 reference: our
    errors at most twice torch's, plus two ulps of the loss (half an ulp of 1 for the gradient)."""
    x, torch_x, ref_x = logits.clone().requires_grad_(), logits.clone().requires_grad_(), \
        logits.double().requires_grad_()
    ours = FF.cross_entropy(x, target, weight, reduction="none", backend=backend, **kwargs)
    theirs = F.cross_entropy(torch_x, target, weight, reduction="none", **kwargs)
    ref, _ = reference_loss(ref_x, target, weight, "none", **kwargs)
    loss_err, torch_loss_err = max_error(ours, ref), max_error(theirs, ref)
    assert loss_err <= 2 * torch_loss_err + 2 * FP32_EPS * magnitude(ref), (loss_err, torch_loss_err)
    (grad,) = torch.autograd.grad(ours, x, grad_output)
    (torch_grad,) = torch.autograd.grad(theirs, torch_x, grad_output)
    (ref_grad,) = torch.autograd.grad(ref, ref_x, grad_output.double())
    grad_err, torch_grad_err = max_error(grad, ref_grad), max_error(torch_grad, ref_grad)
    assert grad_err <= 2 * torch_grad_err + 0.5 * FP32_EPS, (grad_err, torch_grad_err)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_scalar_grad_output_scales_the_gradient(backend, device, dtype):
    """A scalar loss whose incoming gradient is not 1 (loss * 0.37, or a GradScaler's 1024): the backward scales the
    stored gradient; with a power of two exactly, so bit for bit what the unscaled backward gives, times it."""
    logits, target, weight, kwargs = make_case(37, 1000, dtype, device, weight=True, ignored=True,
                                               label_smoothing=0.1)
    grads = {}
    for scale in (1.0, 1024.0, 0.37):
        for reduction in ("sum", "mean"):
            x = logits.clone().requires_grad_()
            loss = FF.cross_entropy(x, target, weight, reduction=reduction, backend=backend, **kwargs)
            (loss * scale).backward()
            grads[scale, reduction] = x.grad
    for reduction in ("sum", "mean"):
        unscaled = grads[1.0, reduction]
        assert torch.equal(grads[1024.0, reduction], unscaled * 1024)
        # 0.37 is rounded to the dtype by autograd's multiply, then the fp32 scale of the gradient is rounded once
        expected = (unscaled.float() * torch.tensor(0.37, dtype=dtype).float()).to(dtype)
        assert torch.equal(grads[0.37, reduction], expected), reduction


@pytest.mark.parametrize("weight", [False, True])
@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_the_mean_divides_the_sum_once_as_torch(backend, device, weight):
    """reduction="mean" is the fp32 sum divided by the kept weight (a quotient rounds once, as torch's mean does,
    where a product with the rounded reciprocal rounds twice): bit for bit our sum over it, for counts that are not
    powers of two."""
    for seed in range(8):
        torch.manual_seed(seed)
        logits, target, class_weight, kwargs = make_case(37, 100, torch.float32, device, weight=weight, ignored=True)
        loss = {reduction: FF.cross_entropy(logits, target, class_weight, reduction=reduction, backend=backend,
                                            **kwargs) for reduction in ("sum", "mean")}
        kept = target != kwargs.get("ignore_index", -100)
        # (summed as the loss sums it: over every row, an ignored one's weight 0)
        divisor = torch.where(kept, class_weight[target.clamp(0)], 0.0).sum() if weight else kept.sum().float()
        assert torch.equal(loss["mean"], loss["sum"] / divisor), seed


# ----------------------------------------------------------------------------------------------------------------
# 2. z-loss and soft-capping: the reference only (torch has neither)


@pytest.mark.interpreted_cover(2)
@pytest.mark.parametrize("options", list(EXTRA_OPTIONS.values()), ids=list(EXTRA_OPTIONS))
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_z_loss_and_softcap_match_reference(backend, device, dtype, reduction, options):
    for shape in shapes_for(backend, device, [(1, 2), (37, 1000), (3, 32000)]):
        check_extras_against_reference(backend, device, dtype, reduction, options, shape)


def check_extras_against_reference(backend, device, dtype, reduction, options, shape) -> None:
    logits, target, weight, kwargs = make_case(*shape, dtype, device, **options)
    x, ref_x = logits.clone().requires_grad_(), logits.double().requires_grad_()
    loss, z = FF.cross_entropy(x, target, weight, reduction=reduction, backend=backend, return_z_loss=True,
                               **kwargs)
    ref, ref_z = reference_loss(ref_x, target, weight, reduction, **kwargs)
    grad_output = random_grad_output(loss)
    (grad,) = grad_of(loss, x, grad_output)
    (ref_grad,) = grad_of(ref, ref_x, None if grad_output is None else grad_output.double())

    # z: the z-loss alone, reduced like the loss, in its dtype and shape, detached
    assert (z.dtype, z.shape) == (loss.dtype, loss.shape) and not z.requires_grad and z.grad_fn is None
    # and the loss without return_z_loss is the same loss
    plain = FF.cross_entropy(logits.clone().requires_grad_(), target, weight, reduction=reduction,
                             backend=backend, **kwargs)
    assert torch.allclose(plain.detach(), loss.detach(), rtol=0, atol=0, equal_nan=True)
    if not torch.isfinite(ref).all():  # "mean" over rows all ignored: NaN, as torch's; the gradient stays zero
        assert torch.equal(loss.isnan(), ref.isnan()) and torch.equal(z.isnan(), ref_z.isnan()) and not grad.any()
        return

    eps, lse = torch.finfo(dtype).eps, max_lse(logits, kwargs.get("softcap"))
    loss_mag, z_mag = magnitude(ref), magnitude(ref_z)
    unit = gradient_unit(target, weight, reduction, grad_output, lse=lse, **kwargs)
    # In fp32 a few roundings of values of the size of lse^2 (z) and of the loss; in bf16/fp16 one rounding
    # of an fp32 value. The fp32 tanh of the soft-cap is within a few ulps too. Triton compiled for a GPU takes
    # exp and log from the hardware's approximations (ex2.approx, lg2.approx): a loss of 6e-6 came out 1.3x
    # past 8 ulps on an H200, hence 32 there.
    if dtype not in LOW_PRECISION and backend == "triton" and device == "cuda":
        eps *= 4
    if dtype in LOW_PRECISION:
        assert_within_ulps(loss, ref, dtype, 1, 8 * FP32_EPS * (loss_mag + lse * lse), f"loss {shape}")
        assert_within_ulps(z, ref_z, dtype, 1, 8 * FP32_EPS * z_mag, f"z {shape}")
        assert_within_ulps(grad, ref_grad, dtype, 2, 8 * FP32_EPS * (1 + lse) * unit, f"grad {shape}")
    else:
        # The log of a row's sum (>= 1) is within eps/2 of exact however small the loss (torch's as ours): an
        # absolute eps in the loss and in each row's lse, which the z-loss (z_loss * lse^2) carries as
        # 2 z_loss |lse| eps: what moving every row's lse by eps (every logit by eps) does to the reference's z.
        _, moved_z = reference_loss(ref_x.detach() + eps, target, weight, reduction, **kwargs)
        assert max_error(loss, ref) <= 8 * eps * max(loss_mag, lse) + eps, shape
        assert max_error(z, ref_z) <= 8 * (eps * z_mag + max_error(moved_z, ref_z)), shape
        assert max_error(grad, ref_grad) <= 8 * eps * (1 + lse) * unit, shape


def test_z_loss_is_zero_without_the_option_and_not_differentiable():
    logits, target, _, _ = make_case(5, 11, torch.float32)
    x = logits.clone().requires_grad_()
    loss, z = FF.cross_entropy(x, target, return_z_loss=True)
    assert z.item() == 0.0 and not z.requires_grad and loss.requires_grad
    with pytest.raises(RuntimeError, match="does not require grad"):
        z.backward()


# ----------------------------------------------------------------------------------------------------------------
# 3. semantics torch defines: ignored targets, empty batches, shapes, strides, target dtypes, fallbacks


@pytest.mark.parametrize("options", ["plain", "weight+label_smoothing+z_loss"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_every_target_ignored(backend, device, reduction, options):
    """"sum" gives 0, "mean" gives NaN (0/0, like torch), "none" zeros; the gradient is zero, never NaN."""
    logits, _, weight, kwargs = make_case(
        6, 300, torch.float32, device, **({} if options == "plain" else dict(weight=True, label_smoothing=0.1)))
    target = torch.full((6,), -100, device=device)
    extra = {} if options == "plain" else dict(z_loss=1e-3)
    x, torch_x = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ours = FF.cross_entropy(x, target, weight, reduction=reduction, backend=backend, **kwargs, **extra)
    theirs = F.cross_entropy(torch_x, target, weight, reduction=reduction, **kwargs)
    torch.testing.assert_close(ours, theirs, equal_nan=True, rtol=0, atol=0)
    if reduction == "mean":
        assert ours.isnan()
    ours.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_a_nan_or_inf_logit_makes_its_rows_loss_nan_as_torchs(backend, device, dtype, label_smoothing):
    """A NaN or +inf logit in a kept row, in a vocabulary of 37 (rows read element by element on a GPU: their
    stride is no multiple of 16 bytes) and of 64 (whole vectors, one of NaNs alone): that row's loss is NaN, as
    torch's, and the others' are not (the CUDA kernel's online sum once skipped a NaN)."""
    for classes in (37, 64):
        logits = torch.randn(6, classes).to(device=device, dtype=dtype)
        logits[0, 5], logits[1, classes - 1], logits[2, 8:16], logits[3, 0] = math.nan, math.nan, math.nan, math.inf
        logits[4, 16:24] = -math.inf  # masked logits alone: nothing
        target = torch.tensor([1, 2, 3, 4, 5, 6], device=device)
        ours = FF.cross_entropy(logits, target, reduction="none", label_smoothing=label_smoothing, backend=backend)
        theirs = F.cross_entropy(logits.float(), target, reduction="none", label_smoothing=label_smoothing)
        assert ours.isnan().tolist() == theirs.isnan().tolist() == [True, True, True, True, False, False], classes


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_a_logit_far_above_the_rest_anywhere_in_a_row_is_its_max(backend, device):
    """A row's largest logit in each place a kernel gathers it from (lane 15 of a 16-lane vector, the second vector,
    the scalar tail), 30 and 100 above the rest: only the true max keeps exp from overflowing (exp(100) is inf in
    fp32) and a confident row's loss from cancelling; the loss is as precise as torch's, the gradient finite."""
    classes = 1000
    for position in (15, 31, classes - 1):
        for gap in (30.0, 100.0):
            logits = torch.randn(2, classes)
            logits[:, position] = logits.max() + gap
            target = torch.full((2,), position)
            x = logits.to(device).requires_grad_()
            ours = FF.cross_entropy(x, target.to(device), reduction="none", backend=backend)
            ours.sum().backward()
            theirs = F.cross_entropy(logits, target, reduction="none")
            exact = reference.cross_entropy(logits.double(), target, reduction="none")[0]
            error, torch_error = (ours.cpu().double() - exact).abs().max(), (theirs.double() - exact).abs().max()
            assert error <= 2 * torch_error + 2 * 2**-23 * exact.abs().max(), (position, gap)
            assert torch.isfinite(x.grad).all(), (position, gap)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_a_nan_coming_back_to_ignored_rows_gives_them_a_zero_gradient(backend, device, label_smoothing):
    """reduction="none" with a per-sequence mean, one sequence all padding: its rows get 0 / 0 = NaN from above.
    torch gives ignored rows a zero gradient whatever comes in, so no NaN reaches the model; nor does ours (cross
    entropy, and linear + cross-entropy, whose "none" backward scales the same rows)."""
    torch.manual_seed(0)
    hidden, linear = torch.randn(6, 8, device=device), torch.randn(50, 8, device=device)
    target = torch.tensor([3, 7, 11, -100, -100, -100], device=device)

    def per_sequence_mean(losses):
        tokens = (target != -100).view(2, 3).sum(1)
        return (losses.view(2, 3).sum(1) / tokens)[0]  # the padding sequence's mean is NaN: not used

    grads = []
    for loss in (lambda h, w: FF.cross_entropy(h @ w.t(), target, reduction="none", label_smoothing=label_smoothing,
                                               backend=backend),
                 lambda h, w: FF.linear_cross_entropy(h, w, target, reduction="none",
                                                      label_smoothing=label_smoothing, backend=backend),
                 lambda h, w: F.cross_entropy(h @ w.t(), target, reduction="none", label_smoothing=label_smoothing)):
        h, w = hidden.clone().requires_grad_(), linear.clone().requires_grad_()
        per_sequence_mean(loss(h, w)).backward()
        assert not h.grad.isnan().any() and not w.grad.isnan().any()
        grads.append((h.grad, w.grad))
    for ours in grads[:2]:
        torch.testing.assert_close(ours, grads[2])
    assert torch.equal(grads[0][0][3:], torch.zeros(3, 8, device=device))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_empty_batch(backend, device, reduction):
    x = torch.randn(0, 7, device=device, requires_grad=True)
    target = torch.zeros(0, dtype=torch.long, device=device)
    ours = FF.cross_entropy(x, target, reduction=reduction, backend=backend, label_smoothing=0.1, z_loss=1e-3)
    theirs = F.cross_entropy(x, target, reduction=reduction, label_smoothing=0.1)
    assert (ours.dtype, ours.shape) == (theirs.dtype, theirs.shape)
    torch.testing.assert_close(ours, theirs, equal_nan=True)
    (grad,) = torch.autograd.grad(ours.sum(), x)
    assert grad.shape == (0, 7)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_no_classes_at_positions_give_torchs_loss(backend, device, reduction):
    """(N, 0, d1, d2) logits with every target ignored: torch's nan, 0 or zeros (reshape(-1, 0) raised)."""
    x = torch.randn(2, 0, 3, 2, device=device)
    target = torch.full((2, 3, 2), -100, device=device)
    ours = FF.cross_entropy(x, target, reduction=reduction, backend=backend)
    theirs = F.cross_entropy(x, target, reduction=reduction)
    assert (ours.dtype, ours.shape) == (theirs.dtype, theirs.shape)
    torch.testing.assert_close(ours, theirs, equal_nan=True)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_unbatched_and_k_dimensional_inputs_match_torch(backend, device, reduction):
    """(C,) logits with a () target, and (N, C, d1, d2) with (N, d1, d2) targets (one row per position, some
    ignored): torch's shapes, values and gradients."""
    weight = torch.rand(7, device=device) + 0.5
    cases = [
        (torch.randn(7, device=device), torch.tensor(3, device=device)),
        (torch.randn(3, 7, 2, 5, device=device), torch.randint(0, 7, (3, 2, 5), device=device)),
    ]
    cases[1][1][0, 1, ::2] = -100
    for logits, target in cases:
        for kwargs in (dict(), dict(weight=weight, label_smoothing=0.1)):
            x, torch_x = logits.clone().requires_grad_(), logits.clone().requires_grad_()
            ours = FF.cross_entropy(x, target, reduction=reduction, backend=backend, **kwargs)
            theirs = F.cross_entropy(torch_x, target, reduction=reduction, **kwargs)
            assert (ours.dtype, ours.shape) == (theirs.dtype, theirs.shape), logits.shape
            torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
            grad_output = torch.randn(ours.shape, device=device)
            (grad,), (torch_grad,) = torch.autograd.grad(ours, x, grad_output), \
                torch.autograd.grad(theirs, torch_x, grad_output)
            assert grad.shape == logits.shape
            torch.testing.assert_close(grad, torch_grad, rtol=1e-5, atol=1e-6)


def _views(device):
    """Non-contiguous (N=6, V=7) views of a (12, 14) tensor, as models hand logits over: the first three are copied
    before the kernel (classes not adjacent, or rows that overlap), the last two go to it as they are (rows 14 and
    28 apart, not 7)."""
    base = torch.randn(12, 14, device=device)
    return {
        "transposed": base[:7, :6].t(),  # stride (1, 14)
        "every-other-class": base[:6, ::2],  # stride (14, 2)
        "expanded-row": base[:1, :7].expand(6, 7),  # stride (0, 1): one row read six times
        "padded-vocab": base[:6, :7],  # a vocabulary padded to 14 and sliced back: stride (14, 1)
        "every-other-row": base[::2, 3:10],  # stride (28, 1)
    }


@pytest.mark.parametrize("view", ["transposed", "every-other-class", "expanded-row", "padded-vocab", "every-other-row"])
@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_non_contiguous_logits(backend, device, view):
    logits = _views(device)[view]
    assert logits.shape == (6, 7) and not logits.is_contiguous()
    target = torch.randint(0, 7, (6,), device=device)
    target[2] = -100
    for reduction in REDUCTIONS:
        # the same view of a tensor that requires grad (a parameter, or a model's padded output)
        base = logits._base.detach().clone().requires_grad_()
        torch_base = logits._base.detach().clone().requires_grad_()
        ours_view = base.as_strided(logits.shape, logits.stride(), logits.storage_offset())
        torch_view = torch_base.as_strided(logits.shape, logits.stride(), logits.storage_offset())
        ours = FF.cross_entropy(ours_view, target, reduction=reduction, backend=backend, label_smoothing=0.1)
        theirs = F.cross_entropy(torch_view, target, reduction=reduction, label_smoothing=0.1)
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
        grad_output = torch.randn(ours.shape, device=device)
        ours.backward(grad_output)
        theirs.backward(grad_output)
        torch.testing.assert_close(base.grad, torch_base.grad, rtol=1e-5, atol=1e-6)
        # and without a gradient, straight through
        no_grad = FF.cross_entropy(logits, target, reduction=reduction, backend=backend)
        torch.testing.assert_close(no_grad, F.cross_entropy(logits, target, reduction=reduction))


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_uint8_targets_like_torch(backend, device):
    """torch takes class indices as int64 or uint8 ("expected target dtype to be Long or Byte")."""
    logits = torch.randn(5, 300, device=device, requires_grad=True)
    target = torch.randint(0, 255, (5,), dtype=torch.uint8, device=device)
    for reduction in REDUCTIONS:
        ours = FF.cross_entropy(logits, target, reduction=reduction, backend=backend)
        theirs = F.cross_entropy(logits, target, reduction=reduction)
        torch.testing.assert_close(ours, theirs)
        torch.testing.assert_close(torch.autograd.grad(ours.sum(), logits)[0],
                                   torch.autograd.grad(theirs.sum(), logits)[0])


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_probability_targets_differentiate_the_class_weights_as_torch(reduction):
    """torch's loss of probability targets is made of differentiable ops, so a class weight that requires grad gets
    one (its class-index loss refuses such a weight); ours runs that loss, module and function alike."""
    logits, target = torch.randn(5, 7, requires_grad=True), torch.softmax(torch.randn(5, 7), 1)
    weight = torch.nn.Parameter(torch.rand(7) + 0.5)
    grads = []
    for loss in (F.cross_entropy(logits, target, weight=weight, reduction=reduction, label_smoothing=0.1),
                 FF.cross_entropy(logits, target, weight=weight, reduction=reduction, label_smoothing=0.1),
                 fused_optim.CrossEntropyLoss(weight=weight, reduction=reduction, label_smoothing=0.1)(logits, target)):
        grads.append(torch.autograd.grad(loss.sum(), (logits, weight)))
    for ours in grads[1:]:
        assert all(torch.equal(a, b) for a, b in zip(ours, grads[0]))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_probability_targets_and_float64_logits_match_torch(reduction):
    """Both run torch's cross-entropy plus our extras in torch ops: torch's values and gradients exactly."""
    weight = torch.rand(7) + 0.5
    for kwargs in (dict(), dict(weight=weight, label_smoothing=0.2)):
        logits = torch.randn(5, 7, requires_grad=True)
        for target in (torch.softmax(torch.randn(5, 7), 1), torch.rand(5, 7)):  # a distribution, or any weights
            ours = FF.cross_entropy(logits, target, reduction=reduction, **kwargs)
            theirs = F.cross_entropy(logits, target, reduction=reduction, **kwargs)
            assert (ours.dtype, ours.shape) == (theirs.dtype, theirs.shape)
            assert torch.equal(ours, theirs)
            grad_output = torch.randn(ours.shape)
            assert torch.equal(torch.autograd.grad(ours, logits, grad_output)[0],
                               torch.autograd.grad(theirs, logits, grad_output)[0])
        logits64 = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
        target = torch.tensor([1, -100, 6, 0, 3])
        kwargs64 = {k: (v.double() if torch.is_tensor(v) else v) for k, v in kwargs.items()}
        ours = FF.cross_entropy(logits64, target, reduction=reduction, **kwargs64)
        theirs = F.cross_entropy(logits64, target, reduction=reduction, **kwargs64)
        assert ours.dtype == torch.float64 and torch.equal(ours, theirs)
    no_classes = torch.randn(3, 0, requires_grad=True)
    ours = FF.cross_entropy(no_classes, torch.zeros(3, 0), reduction=reduction)
    theirs = F.cross_entropy(no_classes, torch.zeros(3, 0), reduction=reduction)
    assert ours.shape == theirs.shape
    assert torch.equal(ours.isnan(), theirs.isnan()) and torch.equal(ours.signbit(), theirs.signbit())


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_float64_fallback_matches_reference_with_extras(reduction):
    """float64 logits with class targets, z-loss and soft-cap: the composite path gives the reference's numbers."""
    logits = 4 * torch.randn(6, 9, dtype=torch.float64)
    target = torch.tensor([0, 8, -100, 3, 3, 5])
    weight = torch.rand(9, dtype=torch.float64) + 0.5
    kwargs = dict(label_smoothing=0.1, z_loss=1e-2, softcap=5.0)
    x, ref_x = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    loss, z = FF.cross_entropy(x, target, weight, reduction=reduction, return_z_loss=True, **kwargs)
    ref, ref_z = reference_loss(ref_x, target, weight, reduction, **kwargs)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(z, ref_z, rtol=1e-12, atol=1e-12)
    grad_output = torch.randn(loss.shape, dtype=torch.float64)
    torch.testing.assert_close(torch.autograd.grad(loss, x, grad_output)[0],
                               torch.autograd.grad(ref, ref_x, grad_output)[0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("extras", [dict(), dict(z_loss=0.1), dict(softcap=2.0),
                                    dict(z_loss=0.1, softcap=2.0, label_smoothing=0.2)],
                         ids=["plain", "z_loss", "softcap", "everything"])
@pytest.mark.parametrize("target_kind", ["class", "probability"])
def test_gradcheck_float64(target_kind, extras):
    """The torch-op fallback is differentiable like any torch code: finite differences agree (small doubles)."""
    logits = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    if target_kind == "class":
        target = torch.tensor([0, 4, -100, 2])
    else:
        target = torch.softmax(torch.randn(4, 5, dtype=torch.float64), 1)
    weight = torch.rand(5, dtype=torch.float64) + 0.5
    for reduction in REDUCTIONS:
        assert torch.autograd.gradcheck(
            lambda x: FF.cross_entropy(x, target, weight, reduction=reduction, **extras), (logits,))


@pytest.mark.parametrize("size_average, reduce", [(None, False), (False, None), (True, True), (False, True),
                                                  (True, None)])
def test_legacy_size_average_and_reduce(size_average, reduce):
    logits, target, _, _ = make_case(5, 7, torch.float32)
    target[1] = -100
    with warnings.catch_warnings(record=True) as ours_warnings:
        warnings.simplefilter("always")
        ours = FF.cross_entropy(logits, target, size_average=size_average, reduce=reduce)
    with warnings.catch_warnings(record=True) as torch_warnings:
        warnings.simplefilter("always")
        theirs = F.cross_entropy(logits, target, size_average=size_average, reduce=reduce)
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs)
    assert [str(w.message) for w in ours_warnings] == [str(w.message) for w in torch_warnings]
    assert len(torch_warnings) == 1  # the deprecation warning


def test_torch_func_transforms_and_forward_mode_ad_run_torchs_ops():
    """Under vmap, grad, jvp, hessian and a dual tensor the loss takes torch's own ops, as torch's loss does: per-sample
    gradients (Opacus' vmap(grad)), a forward under vmap, Jacobian-vector products and Hessians are torch's."""
    logits, target, weight, _ = make_case(6, 11, torch.float32, weight=True)
    target[2] = -100  # its own "mean" under vmap: 0 / 0, NaN, as torch's
    options = dict(weight=weight, label_smoothing=0.1)
    per_sample = [torch.func.vmap(torch.func.grad(lambda x, t: loss_fn(x[None], t[None], **options)))(logits, target)
                  for loss_fn in (FF.cross_entropy, F.cross_entropy)]
    assert torch.equal(*per_sample)
    with torch.no_grad():
        # (with class weights and smoothing torch's own loss cannot be vmapped: masked_select)
        losses = [torch.func.vmap(lambda x, t: loss_fn(x, t, label_smoothing=0.1))(logits, target)
                  for loss_fn in (FF.cross_entropy, F.cross_entropy)]
    torch.testing.assert_close(*losses, rtol=0, atol=0, equal_nan=True)
    tangent = torch.randn_like(logits)
    ours, theirs = (torch.func.jvp(lambda x: loss_fn(x, target, **options), (logits,), (tangent,))
                    for loss_fn in (FF.cross_entropy, F.cross_entropy))
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(logits, tangent)
        assert torch.equal(torch.autograd.forward_ad.unpack_dual(FF.cross_entropy(dual, target, **options)).tangent,
                           theirs[1])
    hessians = [torch.func.hessian(lambda x: loss_fn(x, target, **options))(logits)
                for loss_fn in (FF.cross_entropy, F.cross_entropy)]
    assert torch.equal(*hessians)


def test_elementwise_mean_is_mean_with_torchs_warning():
    """torch still takes reduction="elementwise_mean" for "mean", with a deprecation warning: so do we, in the
    function and the module."""
    logits, target, _, _ = make_case(5, 7, torch.float32)
    losses, messages = [], []
    for loss_fn in (lambda: F.cross_entropy(logits, target, reduction="elementwise_mean"),
                    lambda: FF.cross_entropy(logits, target, reduction="elementwise_mean"),
                    lambda: fused_optim.CrossEntropyLoss(reduction="elementwise_mean")(logits, target)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            losses.append(loss_fn())
        messages.append([str(w.message) for w in caught])
    assert losses[1] == losses[0] == losses[2]
    assert messages[1] == messages[2] == messages[0] and len(messages[0]) == 1


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_masked_and_huge_logits(backend, device):
    """-inf logits (a masked, padded vocabulary) add nothing and get a zero gradient; logits of 1e4 in fp32 (exp
    overflows without the max) and a row of -inf (NaN, as torch) behave like torch's."""
    logits = 4 * torch.randn(5, 300, device=device)
    logits[:, 250:] = -math.inf
    logits[3] *= 2500  # up to ~4e4
    target = torch.tensor([1, 2, -100, 3, 249], device=device)
    for label_smoothing in (0.0, 0.1):  # smoothing over -inf logits: an infinite loss, as torch's
        x, torch_x = logits.clone().requires_grad_(), logits.clone().requires_grad_()
        ours = FF.cross_entropy(x, target, reduction="none", backend=backend, label_smoothing=label_smoothing)
        theirs = F.cross_entropy(torch_x, target, reduction="none", label_smoothing=label_smoothing)
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-5)
        ours.sum().backward()
        theirs.sum().backward()
        assert torch.isfinite(x.grad).all()
        if label_smoothing == 0:  # (smoothing's -eps / V * sum_j log p_j does reach masked logits)
            assert (x.grad[:, 250:] == 0).all()
        torch.testing.assert_close(x.grad, torch_x.grad, rtol=1e-5, atol=1e-6)
    all_masked = logits.clone()
    all_masked[0] = -math.inf
    ours = FF.cross_entropy(all_masked, target, reduction="none", backend=backend)
    theirs = F.cross_entropy(all_masked, target, reduction="none")
    torch.testing.assert_close(ours, theirs, equal_nan=True)
    assert ours[0].isnan()


@pytest.mark.parametrize("offset", [1e3, 3e4])
@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_label_smoothing_keeps_its_precision_when_the_logits_share_an_offset(backend, device, offset):
    """Logits around 1e3 or 3e4 (an unnormalised head, no softcap) with label smoothing and class weights: the
    smoothing term sum_j w_j (lse - z_j) summed as W * lse - sum_j w_j z_j would cancel, losing ulps of W * lse
    (1e-4 of the loss at 1e4); summed as W * log(sum) + sum_j w_j (max - z_j), all terms >= 0, it is as
    precise as torch's."""
    logits = 3 * torch.randn(13, 1000, device=device) + offset
    target = torch.randint(0, 1000, (13,), device=device)
    weight = torch.rand(1000, device=device) + 0.5
    assert_rows_not_worse_than_torch(logits, target, backend, torch.rand(13, device=device), weight,
                                     label_smoothing=0.1)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_an_infinite_weight_on_a_class_no_target_takes_gives_torchs_finite_loss(backend, device):
    """Inverse-frequency class weights give a class absent from the data the weight 1 / 0 = inf. Without label
    smoothing no term of the loss or gradient holds it: torch's loss and gradient are finite, and so are ours (the
    smoothing terms are left out, not multiplied by 0 to a NaN), for cross_entropy and linear_cross_entropy. An
    ignored row adds nothing either, though its ignore_index (4 here) clamps to that class in the gather of the kept
    targets' weights."""
    counts = torch.tensor([30.0, 10.0, 5.0, 0.0], device=device)
    weight = 1 / counts
    target = torch.tensor([0, 1, 2, 4, 0, 1, 2], device=device)
    logits = torch.randn(7, 4, device=device)
    x, torch_x = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ours = FF.cross_entropy(x, target, weight, ignore_index=4, backend=backend)
    theirs = F.cross_entropy(torch_x, target, weight, ignore_index=4)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(x.grad, torch_x.grad)
    hidden, head = torch.randn(7, 3, device=device), torch.randn(4, 3, device=device)
    h, w = hidden.clone().requires_grad_(), head.clone().requires_grad_()
    loss = FF.linear_cross_entropy(h, w, target, weight=weight, ignore_index=4, backend=backend)
    loss.backward()
    torch_h, torch_w = hidden.clone().requires_grad_(), head.clone().requires_grad_()
    torch_loss = F.cross_entropy(torch_h @ torch_w.T, target, weight, ignore_index=4)
    torch_loss.backward()
    torch.testing.assert_close(loss, torch_loss)
    torch.testing.assert_close(h.grad, torch_h.grad)
    torch.testing.assert_close(w.grad, torch_w.grad)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_negative_label_smoothing_like_torch(backend, device):
    """torch accepts a label_smoothing below 0 (it checks only <= 1) and then smooths nothing: its loss and gradient
    are plain cross-entropy. A drop-in must give torch's numbers, the same on every backend."""
    logits, target, _, _ = make_case(5, 7, torch.float32, device)
    x, torch_x = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ours = FF.cross_entropy(x, target, label_smoothing=-0.1, backend=backend)
    theirs = F.cross_entropy(torch_x, target, label_smoothing=-0.1)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(torch.autograd.grad(ours, x)[0], torch.autograd.grad(theirs, torch_x)[0])


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_strided_targets_like_torch(backend, device):
    """A target that is a view with strides (a column of (N, 2) pairs; a transposed (d, N) map of K-dimensional
    logits) is taken as torch takes it: it used to be refused as not contiguous."""
    pairs = torch.randint(0, 7, (6, 2), device=device)
    pairs[2, 0] = -100
    spatial = torch.randint(0, 7, (3, 4), device=device).t()  # (4, 3), stride (1, 4)
    cases = [(torch.randn(6, 7, device=device), pairs[:, 0]), (torch.randn(4, 7, 3, device=device), spatial),
             (torch.randn(6, 7, device=device), pairs.to(torch.uint8)[:, 1])]
    for logits, target in cases:
        assert not target.is_contiguous()
        for reduction in REDUCTIONS:
            x, torch_x = logits.clone().requires_grad_(), logits.clone().requires_grad_()
            ours = FF.cross_entropy(x, target, reduction=reduction, backend=backend, label_smoothing=0.1)
            theirs = F.cross_entropy(torch_x, target, reduction=reduction, label_smoothing=0.1)
            assert ours.shape == theirs.shape
            torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
            grad_output = torch.randn(ours.shape, device=device)
            torch.testing.assert_close(torch.autograd.grad(ours, x, grad_output)[0],
                                       torch.autograd.grad(theirs, torch_x, grad_output)[0], rtol=1e-5, atol=1e-6)


def _autocast_logits(device, dtype):
    """Logits an autocast Linear gives (in its dtype), large enough that their summed loss (~3e5) overflows fp16 and
    is rounded by whole units in bf16; and targets with some ignored."""
    layer = torch.nn.Linear(8, 37, device=device)
    with torch.autocast(device, dtype=dtype):
        logits = layer(200 * torch.randn(64, 8, device=device))
    target = torch.randint(0, 37, (64,), device=device)
    target[::5] = -100
    return logits.detach(), target


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_autocast_loss_is_float32_like_torch(backend, device, dtype):
    """Under torch.autocast torch's cross-entropy returns an fp32 loss; ours computes it in fp32 too and does not
    round it to the logits' dtype (that overflowed fp16), while their gradient keeps their dtype. Both are held to
    the float64 reference, ours to fp32's precision: on an H200 (torch 2.11) torch's loss of bf16 logits was off by up
    to 0.36 % there, as if rounded to bf16 on the way, so it is no yardstick for ours."""
    logits, target = _autocast_logits(device, dtype)
    assert logits.dtype == dtype
    weight = torch.rand(37, device=device) + 0.5  # fp32 class weights
    for reduction in REDUCTIONS:
        x, torch_x = logits.clone().requires_grad_(), logits.clone().requires_grad_()
        ref_x = logits.double().requires_grad_()
        with torch.autocast(device, dtype=dtype):
            ours, z = FF.cross_entropy(x, target, weight, reduction=reduction, label_smoothing=0.1, backend=backend,
                                       return_z_loss=True)
            theirs = F.cross_entropy(torch_x, target, weight, reduction=reduction, label_smoothing=0.1)
        want, _ = reference.cross_entropy(ref_x, target, weight, reduction=reduction, label_smoothing=0.1)
        assert ours.dtype == z.dtype == theirs.dtype == torch.float32
        assert torch.isfinite(ours).all()
        # the fp32 loss of these logits: far closer than one rounding to bf16 or fp16
        torch.testing.assert_close(ours.double(), want.detach(), rtol=1e-5, atol=1e-3)
        grad_output = torch.rand(ours.shape, device=device) + 0.5
        (grad,), (torch_grad,), (want_grad,) = (torch.autograd.grad(ours, x, grad_output),
                                                torch.autograd.grad(theirs, torch_x, grad_output),
                                                torch.autograd.grad(want, ref_x, grad_output.double()))
        assert grad.dtype == torch_grad.dtype == dtype
        # one rounding to the logits' dtype, and no further from the reference than torch's
        our_error, torch_error = ((g.double() - want_grad).abs().max().item() for g in (grad, torch_grad))
        assert our_error <= max(torch_error, torch.finfo(dtype).eps * want_grad.abs().max().item() + 1e-6)


# ----------------------------------------------------------------------------------------------------------------
# 4. inplace_backward


class _LargeAllocations(TorchDispatchMode):
    """Records every op run, and the storage of every op output of at least `numel` elements (meta tensors, from
    the argument checks, aside). It sees a non-inplace gradient buffer as an (N, V) `aten.empty_like`."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.storages, self.ops = numel, [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.append(str(func))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and t.device.type != "meta" and t.numel() >= self.numel:
                self.storages.append((str(func), t.untyped_storage().data_ptr()))
        return out


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_inplace_backward_writes_the_gradient_over_the_logits(backend, device, reduction):
    # H = 8 < N = 37: the only (N, V)-sized tensors are the logits and the gradient, not grad_W (H, V)
    hidden = torch.randn(37, 8, device=device)
    head = torch.randn(8, 1000, device=device, requires_grad=True)
    torch_head = head.detach().clone().requires_grad_()
    target = torch.randint(0, 1000, (37,), device=device)
    target[::5] = -100
    weight = torch.rand(1000, device=device) + 0.5
    logits = hidden @ head
    storage = logits.untyped_storage().data_ptr()
    seen = []
    logits.register_hook(lambda g: seen.append(g.untyped_storage().data_ptr()))
    with _LargeAllocations(logits.numel()) as allocations:
        loss = FF.cross_entropy(logits, target, weight, reduction=reduction, label_smoothing=0.1, z_loss=1e-3,
                                inplace_backward=True, backend=backend)
        grad_output = random_grad_output(loss)
        loss.backward(grad_output)
    # the same loss through the float64 reference's autograd, down to the head
    torch_logits = hidden @ torch_head
    reference.cross_entropy(torch_logits, target, weight, reduction=reduction, label_smoothing=0.1,
                            z_loss=1e-3)[0].float().backward(grad_output)
    torch.testing.assert_close(head.grad, torch_head.grad, rtol=1e-5, atol=1e-5)
    # the gradient autograd handed on is the logits' own storage, and nothing else of their size was made, in the
    # forward or in the backward (the matmul's backward ran under the mode too)
    assert seen == [storage]
    assert "aten.mm.default" in allocations.ops
    if backend != "torch":  # the torch fallback op computes in (N, V) fp32 temporaries by design
        assert all(ptr == storage for _, ptr in allocations.storages), allocations.storages
    # and the logits now hold d loss / d logits (times the incoming gradient)
    x = (hidden @ torch_head.detach()).requires_grad_()
    ref = reference.cross_entropy(x, target, weight, reduction=reduction, label_smoothing=0.1, z_loss=1e-3)[0]
    (ref_grad,) = grad_of(ref, x, None if grad_output is None else grad_output.double())
    torch.testing.assert_close(logits.detach(), ref_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_inplace_backward_refuses_logits_saved_by_another_op(backend, device):
    hidden = torch.randn(5, 8, device=device)
    head = torch.randn(8, 11, device=device, requires_grad=True)
    target = torch.randint(0, 11, (5,), device=device)
    logits = hidden @ head
    aux = (logits ** 2).sum()  # pow saves its input for the backward
    loss = FF.cross_entropy(logits, target, inplace_backward=True, backend=backend)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss + aux).backward()


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_inplace_backward_never_overwrites_a_leaf(backend, device):
    logits = torch.randn(5, 11, device=device, requires_grad=True)
    before = logits.detach().clone()
    target = torch.randint(0, 11, (5,), device=device)
    FF.cross_entropy(logits, target, inplace_backward=True, backend=backend).backward()
    assert torch.equal(logits.detach(), before)
    torch_logits = before.clone().requires_grad_()
    F.cross_entropy(torch_logits, target).backward()
    torch.testing.assert_close(logits.grad, torch_logits.grad)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_inplace_backward_under_no_grad_leaves_the_logits_alone(backend, device):
    """Under torch.no_grad() no backward can come, so nothing may be written over the logits (an evaluation that
    reuses training logits for a metric loss, then for an argmax)."""
    hidden = torch.randn(5, 8, device=device)
    head = torch.randn(8, 11, device=device, requires_grad=True)
    target = torch.randint(0, 11, (5,), device=device)
    logits = hidden @ head  # non-leaf, requires grad: made before the no_grad block
    before = logits.detach().clone()
    with torch.no_grad():
        loss = FF.cross_entropy(logits, target, inplace_backward=True, backend=backend)
    assert torch.equal(logits.detach(), before)
    torch.testing.assert_close(loss, F.cross_entropy(before, target))


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_inplace_backward_through_a_padded_vocab_view(backend, device):
    """Non-leaf logits of a padded vocabulary, sliced back (rows 14 apart, 7 classes): the gradient goes into the
    view in place and reaches the padded tensor's producer with zeros in the padding."""
    hidden = torch.randn(6, 4, device=device)
    head = torch.randn(4, 14, device=device, requires_grad=True)
    torch_head = head.detach().clone().requires_grad_()
    target = torch.randint(0, 7, (6,), device=device)
    FF.cross_entropy((hidden @ head)[:, :7], target, inplace_backward=True, backend=backend).backward()
    F.cross_entropy((hidden @ torch_head)[:, :7], target).backward()
    torch.testing.assert_close(head.grad, torch_head.grad)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_inplace_backward_never_writes_over_a_view_of_a_leaf(backend, device):
    """Logits sliced from a parameter (a view of a leaf is no leaf itself): the gradient gets a buffer of its own,
    and the parameter keeps its values."""
    table = torch.randn(6, 14, device=device, requires_grad=True)
    values = table.detach().clone()
    torch_table = table.detach().clone().requires_grad_()
    target = torch.randint(0, 7, (6,), device=device)
    FF.cross_entropy(table[:, :7], target, inplace_backward=True, backend=backend).backward()
    F.cross_entropy(torch_table[:, :7], target).backward()
    assert torch.equal(table.detach(), values)
    torch.testing.assert_close(table.grad, torch_table.grad)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_inplace_backward_on_views_autograd_forbids_writing_gets_its_own_buffer(backend, device):
    """One of several views an op returned (chunk) and a view a custom Function returned (a module's full backward
    hook): autograd forbids writing them in place, so the gradient takes a buffer of its own; torch's gradient."""
    hidden = torch.randn(6, 4, device=device)
    head = torch.randn(4, 9, device=device, requires_grad=True)
    torch_head = head.detach().clone().requires_grad_()
    target = torch.randint(0, 9, (3,), device=device)
    first, _ = (hidden @ head).chunk(2)
    FF.cross_entropy(first, target, inplace_backward=True, backend=backend).backward()
    F.cross_entropy((hidden @ torch_head).chunk(2)[0], target).backward()
    torch.testing.assert_close(head.grad, torch_head.grad)

    loss = fused_optim.CrossEntropyLoss(inplace_backward=True, backend=backend)
    seen = []
    loss.register_full_backward_hook(lambda module, grad_input, grad_output: seen.append(grad_input[0].shape))
    head.grad = None
    loss(hidden[:3] @ head, target).backward()
    torch_head.grad = None
    F.cross_entropy(hidden[:3] @ torch_head, target).backward()
    torch.testing.assert_close(head.grad, torch_head.grad)
    assert seen == [(3, 9)]


# ----------------------------------------------------------------------------------------------------------------
# 5. bad input: torch's exception (and words where torch's are stable), and the logits untouched


def _bad_inputs(device):
    x = torch.randn(5, 7, device=device)
    t = torch.tensor([1, 2, 3, 4, 5], device=device)
    return {  # name: (target, kwargs for both, our extra kwargs, compare the messages)
        "target-too-large": (torch.tensor([1, 2, 7, 3, -100], device=device), {}, {}, True),
        "target-negative": (torch.tensor([1, 2, -1, 3, 0], device=device), {}, {}, True),
        "batch-size-mismatch": (t[:4], {}, {}, True),
        "weight-wrong-length": (t, dict(weight=torch.rand(6, device=device)), {}, False),
        "weight-2d": (t, dict(weight=torch.rand(7, 1, device=device)), {}, False),
        "weight-float64": (t, dict(weight=torch.rand(7, dtype=torch.float64, device=device)), {}, True),
        "float-target-wrong-shape": (torch.rand(5, 6, device=device), {}, {}, False),
        "class-target-2d": (torch.randint(0, 7, (5, 2), device=device), {}, {}, False),
        # torch 2.11's message was another ("expected scalar type Long but found Int"); ours is 2.12's and later's
        "int32-target": (t.int(), {}, {}, TORCH_2_12),
        "reduction-avg": (t, dict(reduction="avg"), {}, True),
        "label_smoothing-1.5": (t, dict(label_smoothing=1.5), {}, True),
        "float-ignore_index": (t, dict(ignore_index=1.0), {}, True),
        "bool-ignore_index": (t, dict(ignore_index=True), {}, True),
        "list-target": ([1, 2, 3, 4, 5], {}, {}, True),
        "list-weight": (t, dict(weight=[1.0] * 7), {}, True),
    }, x


BAD_INPUTS = list(_bad_inputs("cpu")[0])


@pytest.mark.parametrize("case", BAD_INPUTS)
@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_bad_input_raises_torchs_error(backend, device, case):
    cases, logits = _bad_inputs(device)
    target, kwargs, extra, same_message = cases[case]
    if case.startswith("target-") and device == "cuda":
        pytest.skip("on a GPU torch checks the class range with a device-side assert, which ends the process's CUDA "
                    "context; so do our CUDA kernels, and the Triton ones give the row a NaN loss")
    if backend == "triton" and case.startswith("target-"):
        pytest.skip("the Triton kernel cannot raise: it gives the row a NaN loss (test_triton_out_of_range...)")
    if case == "int32-target" and device == "cuda" and not TORCH_2_12:
        pytest.skip("torch 2.11's CUDA nll_loss raises NotImplementedError for int32 targets; ours is torch 2.12's "
                    "check, made before any kernel")
    with pytest.raises(Exception) as torch_error:
        F.cross_entropy(logits, target, **kwargs)
    # non-leaf logits with inplace_backward: the case where a half-done call would leave them changed
    base = logits.clone().requires_grad_()
    x = base * 1.0
    before = x.detach().clone()
    with pytest.raises(Exception) as our_error:
        FF.cross_entropy(x, target, backend=backend, inplace_backward=True, **kwargs, **extra)
    assert type(our_error.value) is type(torch_error.value), (our_error.value, torch_error.value)
    if same_message:
        assert str(our_error.value) == str(torch_error.value)
    assert torch.equal(x.detach(), before)


# (input shape, target shape, target dtype, extra kwargs for both): class-index targets torch refuses, each raising
# what torch raises, in the order torch checks (the shape before the dtype, the dtype before the class weights)
BAD_TARGETS = {
    "0-d-target-of-a-batch": ((4, 5), (), torch.int64, {}),
    "2x2-target-of-4-rows": ((4, 5), (2, 2), torch.int64, {}),
    "4x1-target": ((4, 5), (4, 1), torch.int64, {}),
    "1x1-target-of-1d-logits": ((5,), (1, 1), torch.int64, {}),
    "2-targets-of-1d-logits": ((5,), (2,), torch.int64, {}),
    "int32-2-targets-of-1d-logits": ((5,), (2,), torch.int32, {}),
    "0-d-target-of-an-empty-batch": ((0, 5), (), torch.int64, {}),
    "uint8-spatial-target": ((2, 5, 3), (2, 3), torch.uint8, {}),
    "uint8-4d-target": ((2, 5, 3, 2), (2, 3, 2), torch.uint8, dict(reduction="none")),
    "uint8-empty-spatial-none": ((0, 5, 3), (0, 3), torch.uint8, dict(reduction="none")),
    "spatial-target-wrong-size": ((2, 5, 3), (2, 4), torch.int64, {}),
    "4d-target-wrong-dims": ((2, 5, 3, 2), (2, 6), torch.int64, {}),
    "4d-target-wrong-size": ((2, 5, 3, 2), (2, 2, 3), torch.int64, {}),
    "4d-int32-target-wrong-size": ((2, 5, 3, 2), (2, 2, 3), torch.int32, {}),
    "int-target-shaped-like-logits": ((4, 5), (4, 5), torch.int64, dict(label_smoothing=1.5)),
    "int32-target-wrong-batch": ((4, 5), (3,), torch.int32, {}),
    "int32-target-wrong-weight": ((4, 5), (4,), torch.int32, dict(weight=torch.rand(6))),
    "spatial-weight-wrong-length": ((2, 5, 3), (2, 3), torch.uint8, dict(weight=torch.rand(6))),
    "uint8-spatial-float64-weight": ((2, 5, 3), (2, 3), torch.uint8, dict(weight=torch.rand(5, dtype=torch.float64))),
}


@pytest.mark.parametrize("backend", [p.values[0] for p in CPU_BACKENDS])
def test_bad_target_shapes_raise_torchs_error(backend):
    for name, (input_shape, target_shape, target_dtype, kwargs) in BAD_TARGETS.items():
        if target_dtype == torch.int32 and not TORCH_2_12:
            continue  # torch 2.11 reads int32 class indices past its other checks; 2.12 on refuses them first, as ours
        logits = torch.randn(input_shape)
        target = torch.randint(0, 2, target_shape, dtype=target_dtype)
        with pytest.raises(Exception) as torch_error:
            F.cross_entropy(logits, target, **kwargs)
        with pytest.raises(Exception) as our_error:
            FF.cross_entropy(logits, target, backend=backend, **kwargs)
        assert type(our_error.value) is type(torch_error.value), (name, our_error.value, torch_error.value)
        assert str(our_error.value) == str(torch_error.value), name


def test_targets_torch_takes_are_taken():
    """The other side of the checks above: shapes torch computes a loss for (a (1,) target of (C,) logits, a
    (C, 1) class weight of K-dimensional logits, uint8 targets of an empty K-dimensional batch) give torch's loss."""
    cases = [(torch.randn(5), torch.tensor([3]), {}), (torch.randn(2, 5, 3), torch.randint(0, 5, (2, 3)),
                                                        dict(weight=torch.rand(5, 1) + 0.5)),
             (torch.randn(0, 5, 3), torch.zeros(0, 3, dtype=torch.uint8), dict(reduction="sum"))]
    for logits, target, kwargs in cases:
        ours, theirs = FF.cross_entropy(logits, target, **kwargs), F.cross_entropy(logits, target, **kwargs)
        assert ours.shape == theirs.shape
        torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("kwargs, message", [
    (dict(z_loss=-1e-4), "z_loss must be a non-negative float, got -0.0001."),
    (dict(z_loss=math.nan), "z_loss must be a non-negative float, got nan."),
    (dict(softcap=0.0), "softcap must be None or a positive float, got 0.0."),
    (dict(softcap=-30.0), "softcap must be None or a positive float, got -30.0."),
], ids=["z_loss<0", "z_loss=nan", "softcap=0", "softcap<0"])
def test_bad_extras_raise_value_error(kwargs, message):
    logits = torch.randn(5, 7, requires_grad=True)
    x = logits * 1.0
    before = x.detach().clone()
    with pytest.raises(ValueError, match=re.escape(message)):
        FF.cross_entropy(x, torch.randint(0, 7, (5,)), inplace_backward=True, **kwargs)
    assert torch.equal(x.detach(), before)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_an_infinite_softcap_caps_nothing(backend, device):
    """softcap * tanh(x / softcap) tends to x: an infinite cap is no cap (it gave inf * tanh(0), a NaN loss)."""
    logits = 4 * torch.randn(5, 7, device=device)
    target = torch.randint(0, 7, (5,), device=device)
    capped = FF.cross_entropy(logits, target, softcap=math.inf, backend=backend)
    assert torch.equal(capped, FF.cross_entropy(logits, target, backend=backend))


@pytest.mark.parametrize("label_smoothing", [0.0, 0.3])
@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_kept_targets_all_weighted_zero_give_torchs_nan(backend, device, label_smoothing):
    """The mean over kept targets whose class weights are all 0 is torch's 0 / 0: a NaN loss and NaN gradients.
    With label smoothing ours gave inf (the smoothing term, which is not 0, over 0)."""
    logits = torch.randn(2, 5, device=device, requires_grad=True)
    target, weight = torch.tensor([1, 3], device=device), torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0], device=device)
    losses, grads = [], []
    for fn, extra in ((FF.cross_entropy, {"backend": backend}), (F.cross_entropy, {})):
        logits.grad = None
        loss = fn(logits, target, weight, label_smoothing=label_smoothing, **extra)
        loss.backward()
        losses.append(loss.detach())
        grads.append(logits.grad)
    torch.testing.assert_close(losses[0], losses[1], equal_nan=True)
    torch.testing.assert_close(grads[0], grads[1], equal_nan=True)


def test_triton_out_of_range_target_gives_that_row_a_nan_loss():
    if not TRITON_INTERPRETED:
        pytest.skip("Triton runs CPU tensors only interpreted")
    logits = torch.randn(5, 7, requires_grad=True)
    target = torch.tensor([1, 2, 7, 3, -100])
    ours = FF.cross_entropy(logits, target, reduction="none", backend="triton")
    assert ours[2].isnan()
    good = torch.tensor([True, True, False, True, True])
    torch.testing.assert_close(ours[good], F.cross_entropy(logits[good], target[good], reduction="none"))
    assert FF.cross_entropy(logits, target, backend="triton").isnan()


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="backend must be one of auto, cuda, triton, cpu, torch; got 'gpu'"):
        FF.cross_entropy(torch.randn(3, 4), torch.tensor([0, 1, 2]), backend="gpu")


# ----------------------------------------------------------------------------------------------------------------
# 6. autograd contract and the module


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_second_backward_raises(backend, device, reduction):
    """The stored gradient is scaled in place by the first backward: a second one (retain_graph=True) must raise,
    never hand out a gradient scaled twice."""
    logits = torch.randn(5, 11, device=device, requires_grad=True)
    loss = FF.cross_entropy(logits, torch.randint(0, 11, (5,), device=device), reduction=reduction, backend=backend)
    loss.sum().backward(retain_graph=True)
    first = logits.grad.clone()
    with pytest.raises(RuntimeError, match="second time"):
        loss.sum().backward()
    assert torch.equal(logits.grad, first)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_double_backward_raises(backend, device):
    """The gradient is computed outside autograd, so it has no gradient itself: a Hessian-vector product or a gradient
    penalty through the loss must raise, never leave the loss's second-order term out. Gradients taken with
    create_graph=True are still the right first-order ones."""
    w1, w2 = torch.randn(3, 4, device=device), torch.randn(4, 5, device=device)
    h, target = torch.randn(6, 3, device=device), torch.randint(0, 5, (6,), device=device)
    for reduction in REDUCTIONS:
        ours_w1, torch_w1 = w1.clone().requires_grad_(), w1.clone().requires_grad_()
        ours = FF.cross_entropy(torch.tanh(h @ ours_w1) @ w2, target, reduction=reduction, backend=backend).sum()
        theirs = F.cross_entropy(torch.tanh(h @ torch_w1) @ w2, target, reduction=reduction).sum()
        (grad,), (torch_grad,) = (torch.autograd.grad(ours, ours_w1, create_graph=True),
                                  torch.autograd.grad(theirs, torch_w1, create_graph=True))
        torch.testing.assert_close(grad, torch_grad, rtol=1e-5, atol=1e-6)
        with pytest.raises(RuntimeError, match="cross_entropy is differentiable once"):
            torch.autograd.grad((grad * torch.randn_like(grad)).sum(), ours_w1)  # a Hessian-vector product
    logits = torch.randn(6, 5, device=device, requires_grad=True)
    (grad,) = torch.autograd.grad(FF.cross_entropy(logits, target, backend=backend), logits, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiable once"):
        grad.pow(2).sum().backward()  # a gradient penalty


@pytest.mark.parametrize("loss", ["cross_entropy", "linear_cross_entropy"])
def test_the_gradient_the_forward_makes_is_saved_as_activations_are(loss):
    """The gradient computed in the forward is held as a saved tensor, as torch's loss holds its log-probabilities:
    saved-tensor hooks (activation offloading: save_on_cpu) get it, and under activation checkpointing it is
    dropped after the forward and made again in the backward, with the same gradients."""
    hidden, head = torch.randn(8, 5), torch.randn(11, 5)
    target = torch.randint(0, 11, (8,))

    def run(h, w):
        if loss == "cross_entropy":
            return FF.cross_entropy(h @ w.T, target, label_smoothing=0.1)
        return FF.linear_cross_entropy(h, w, target, label_smoothing=0.1)

    h, w = hidden.clone().requires_grad_(), head.clone().requires_grad_()
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t.shape) or t, lambda t: t):
        run(h, w).backward()
    made = {(8, 11)} if loss == "cross_entropy" else {(8, 5), (11, 5)}  # d logits; d hidden and d head
    assert made <= set(packed)
    checkpointed_h, checkpointed_w = hidden.clone().requires_grad_(), head.clone().requires_grad_()
    torch.utils.checkpoint.checkpoint(run, checkpointed_h, checkpointed_w, use_reentrant=False).backward()
    assert torch.equal(checkpointed_h.grad, h.grad) and torch.equal(checkpointed_w.grad, w.grad)


def test_module_is_a_drop_in_for_torchs():
    assert_signature_extends(fused_optim.CrossEntropyLoss, torch.nn.CrossEntropyLoss)
    weight = torch.rand(7) + 0.5
    ours, theirs = fused_optim.CrossEntropyLoss(weight), torch.nn.CrossEntropyLoss(weight)
    assert isinstance(ours, torch.nn.CrossEntropyLoss)
    assert list(ours.state_dict()) == list(theirs.state_dict()) == ["weight"]
    assert torch.equal(ours.state_dict()["weight"], theirs.state_dict()["weight"])
    assert repr(ours) == repr(theirs)
    fresh = fused_optim.CrossEntropyLoss(torch.ones(7))
    fresh.load_state_dict(theirs.state_dict())
    assert torch.equal(fresh.weight, weight)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_module_forward_matches_torch_and_functional(backend, device):
    weight = torch.rand(7, device=device) + 0.5
    logits = torch.randn(9, 7, device=device, requires_grad=True)
    target = torch.randint(0, 7, (9,), device=device)
    target[3] = 2
    kwargs = dict(weight=weight, ignore_index=2, reduction="sum", label_smoothing=0.1)
    ours = fused_optim.CrossEntropyLoss(**kwargs, backend=backend)(logits, target)
    theirs = torch.nn.CrossEntropyLoss(**kwargs)(logits, target)
    torch.testing.assert_close(ours, theirs)
    module = fused_optim.CrossEntropyLoss(**kwargs, z_loss=1e-2, softcap=5.0, return_z_loss=True, backend=backend)
    loss, z = module(logits, target)
    functional = FF.cross_entropy(logits, target, **kwargs, z_loss=1e-2, softcap=5.0, return_z_loss=True,
                                  backend=backend)
    assert torch.equal(loss, functional[0]) and torch.equal(z, functional[1])


# ----------------------------------------------------------------------------------------------------------------
# 7. the ops: opcheck, the fake impl, the scale op's contract

OPS = [
    pytest.param("", id="cpu"),
    pytest.param("_torch", id="torch"),
    pytest.param("_triton", id="triton-interpreted",
                 marks=pytest.mark.skipif(not TRITON_INTERPRETED, reason="Triton runs CPU tensors only interpreted")),
]


def _forward_sample(kind: str):
    """Arguments of one cross_entropy_forward call over (5, 37) logits, in the schema's order."""
    dtype = torch.bfloat16 if "bf16" in kind else torch.float32
    logits = (4 * torch.randn(5, 37)).to(dtype).requires_grad_("requires-grad" in kind)
    target = torch.tensor([3, -100, 0, 36, 17])
    weight = torch.rand(37) + 0.5 if "weight" in kind else None
    scales = torch.tensor([0.25, 0.25, weight.sum().item() if weight is not None else 37.0])
    grad = torch.full_like(logits, math.nan) if "grad" in kind else None
    softcap = 5.0 if "softcap" in kind else 0.0
    return (logits, target, weight, scales, grad, -100, 0.1, 1e-3, softcap)


@pytest.mark.parametrize("kind", ["fp32", "fp32-grad", "fp32-weight-grad", "bf16-grad-softcap", "bf16-weight",
                                  "fp32-requires-grad"])
@pytest.mark.parametrize("suffix", OPS)
def test_opcheck_forward(suffix, kind):
    # the op mutates only `grad` (Tensor(a!)?), its fake impl gives the outputs' shapes and dtypes, and AOT
    # dispatch traces it; logits that require grad give outputs that do not, on every twin (no op has a formula)
    op = getattr(torch.ops.fused_optim, f"cross_entropy_forward{suffix}").default
    torch.library.opcheck(op, _forward_sample(kind))
    sample = _forward_sample(kind)
    assert not any(output.requires_grad for output in op(*sample)), sample[0].requires_grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("suffix", OPS)
def test_opcheck_scale_grad(suffix, dtype):
    op = getattr(torch.ops.fused_optim, f"cross_entropy_scale_grad{suffix}_").default
    torch.library.opcheck(op, (torch.randn(5, 37).to(dtype), torch.tensor([1.0, 2.0, 1.0, 0.5, -3.0])))
    torch.library.opcheck(op, (torch.randn(5, 37).to(dtype), torch.tensor([0.5])))


@pytest.mark.parametrize("suffix", OPS)
def test_forward_op_overwrites_a_poisoned_grad_buffer(suffix):
    """Every element of `grad` is written, ignored rows with zeros: a NaN-filled buffer comes out finite, and as
    the same op writing into a fresh one gives."""
    op = getattr(torch.ops.fused_optim, f"cross_entropy_forward{suffix}")
    args = list(_forward_sample("fp32-weight-grad"))
    loss, lse = op(*args)
    grad = args[4]
    assert torch.isfinite(grad).all() and (grad[1] == 0).all() and loss[1] == 0 and lse[1] == 0
    args[4] = torch.zeros_like(grad)
    op(*args)
    assert torch.equal(args[4], grad)
    # the fake impl on meta tensors: (N,) fp32 loss and lse
    meta = [a.to("meta") if torch.is_tensor(a) else a for a in args]
    loss_meta, lse_meta = op(*meta)
    assert (loss_meta.shape, loss_meta.dtype, lse_meta.shape, lse_meta.dtype) == ((5,), torch.float32, (5,),
                                                                                  torch.float32)


def _signaling_nan(dtype):
    bits = {torch.float32: (torch.int32, 0x7F800001), torch.bfloat16: (torch.int16, 0x7F81),
            torch.float16: (torch.int16, 0x7C01)}[dtype]
    return torch.tensor(bits[1], dtype=bits[0]).view(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("suffix", OPS)
def test_scale_grad_leaves_rows_scaled_by_one_bit_identical(suffix, dtype):
    op = getattr(torch.ops.fused_optim, f"cross_entropy_scale_grad{suffix}_")
    int_type = torch.int32 if dtype == torch.float32 else torch.int16
    # 37 classes: one partial Triton block. Special values among the random ones: signed zero, infinities, NaN,
    # a subnormal and the largest value. Not a bf16 subnormal for interpreted Triton: the interpreter's own
    # bf16-to-fp32 cast (triton/runtime/interpreter.py, _convert_float) loses them, a GPU's is a shift.
    grad = torch.randn(6, 37).to(dtype)
    info = torch.finfo(dtype)
    tiny = info.smallest_normal * (1 if suffix == "_triton" and dtype == torch.bfloat16 else 0.25)
    grad[:, :6] = torch.tensor([-0.0, math.inf, -math.inf, math.nan, tiny, info.max]).to(dtype)
    row_scale = torch.tensor([1.0, 0.5, 1.0, -3.0, 1.0, 1e-3])
    expected = (grad.float() * row_scale[:, None]).to(dtype)
    out = grad.clone()
    op(out, row_scale)
    keep = row_scale == 1
    assert torch.equal(out[keep].view(int_type), grad[keep].view(int_type))
    # scaled rows: the fp32 product rounded once, bit for bit (a NaN stays a NaN, whatever its payload)
    assert torch.equal(out[~keep].isnan(), expected[~keep].isnan())
    assert torch.equal(out[~keep].nan_to_num(0.0).view(int_type), expected[~keep].nan_to_num(0.0).view(int_type))
    # one value for every row
    out = grad.clone()
    op(out, torch.tensor([0.25]))
    expected = (grad.float() * 0.25).to(dtype)
    assert torch.equal(out.nan_to_num(0.0).view(int_type), expected.nan_to_num(0.0).view(int_type))
    out = grad.clone()
    op(out, torch.tensor([1.0]))
    assert torch.equal(out.view(int_type), grad.view(int_type))


@pytest.mark.parametrize("suffix", [p for p in OPS if p.values[0] != "_torch"])
def test_scale_grad_kernels_do_not_touch_rows_scaled_by_one(suffix):
    """The kernels skip those rows altogether (no read, no write): a signalling NaN, which any arithmetic would
    quieten, survives bit for bit. (The torch fallback multiplies every row, bit-identically for all but these.)"""
    op = getattr(torch.ops.fused_optim, f"cross_entropy_scale_grad{suffix}_")
    for dtype in (torch.float32, torch.bfloat16):
        grad = torch.randn(3, 37).to(dtype)
        grad[:, 5] = _signaling_nan(dtype)
        int_type = torch.int32 if dtype == torch.float32 else torch.int16
        before = grad.view(int_type).clone()
        op(grad, torch.tensor([1.0, 2.0, 1.0]))
        assert torch.equal(grad[0].view(int_type), before[0]) and torch.equal(grad[2].view(int_type), before[2])


# ----------------------------------------------------------------------------------------------------------------
# 8. torch.compile


@pytest.mark.skipif(not TORCH_2_12, reason="torch.compile before torch 2.12 gives these zero gradients")
@pytest.mark.parametrize("inplace_backward", [False, True])
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_torch_compile_fullgraph_matches_eager(backend, inplace_backward):
    """Linear -> our CrossEntropyLoss compiles into one graph (no host sync, no data-dependent branch) and gives
    eager's loss and gradients. Dynamo cannot trace `loss.backward()` itself, so the backward runs outside, through
    the compiled forward's autograd graph. The logits are the README's `logits.view(-1, vocab)`: a view, which
    eager writes the gradient over where autograd allows it, and the graph gives a buffer of its own."""
    torch._dynamo.reset()
    compiled_model, eager_model = torch.nn.Linear(16, 37), torch.nn.Linear(16, 37)
    eager_model.load_state_dict(compiled_model.state_dict())
    loss_fn = fused_optim.CrossEntropyLoss(label_smoothing=0.1, z_loss=1e-3, inplace_backward=inplace_backward,
                                           backend=backend)

    def forward(model, x, target):
        return loss_fn(model(x).view(-1, 37), target.view(-1))

    compiled = torch.compile(forward, fullgraph=True)
    for step in range(2):
        x, target = torch.randn(3, 3, 16), torch.randint(0, 37, (3, 3))
        target[0, 2] = -100
        compiled_model.zero_grad()
        eager_model.zero_grad()
        with torch._dynamo.config.patch(error_on_recompile=step >= 1):  # one graph serves every step
            compiled_loss = compiled(compiled_model, x, target)
        eager_loss = forward(eager_model, x, target)
        compiled_loss.backward()
        eager_loss.backward()
        # the compiled graph may sum the per-row losses in another order: an ulp
        torch.testing.assert_close(compiled_loss, eager_loss, rtol=2 * FP32_EPS, atol=0)
        for p, q in zip(compiled_model.parameters(), eager_model.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7)


@pytest.mark.skipif(not TORCH_2_12, reason="torch.compile before torch 2.12 gives these zero gradients")
def test_torch_compile_with_inplace_backward_and_two_losses_on_the_same_logits_matches_torch():
    """Eager refuses a second loss over logits the first overwrote (at the backward: the version counter); a compiled
    graph keeps no counter, so there the gradient gets a buffer of its own and both losses read the logits."""
    torch._dynamo.reset()
    x, target = torch.randn(5, 6), torch.tensor([0, 1, 2, 3, 4])

    def two_losses(loss_fn, x, **kwargs):
        logits = 2 * x
        return loss_fn(logits, target, **kwargs) + loss_fn(logits, target.flip(0), **kwargs)

    theirs = x.clone().requires_grad_()
    expected = two_losses(F.cross_entropy, theirs)
    expected.backward()
    ours = x.clone().requires_grad_()
    loss = torch.compile(two_losses, fullgraph=True)(FF.cross_entropy, ours, inplace_backward=True)
    loss.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(ours.grad, theirs.grad)


@pytest.mark.skipif(not TORCH_2_12, reason="torch.compile before torch 2.12 gives these zero gradients")
def test_torch_compile_fullgraph_under_autocast():
    """Under autocast the compiled loss is eager's: fp32, in one graph (the autocast state is read while tracing)."""
    torch._dynamo.reset()
    model = torch.nn.Linear(16, 37)
    loss_fn = fused_optim.CrossEntropyLoss(label_smoothing=0.1, backend="cpu")

    def forward(x, target):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return loss_fn(model(x), target)

    x, target = torch.randn(9, 16), torch.randint(0, 37, (9,))
    compiled_loss = torch.compile(forward, fullgraph=True)(x, target)
    (compiled_grad,) = torch.autograd.grad(compiled_loss, model.weight)
    eager_loss = forward(x, target)
    (eager_grad,) = torch.autograd.grad(eager_loss, model.weight)
    assert compiled_loss.dtype == eager_loss.dtype == torch.float32
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=2 * FP32_EPS, atol=0)
    torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-6, atol=1e-7)


@pytest.mark.skipif(TORCH_2_12, reason="torch 2.12 and later compile the losses' gradients right")
@pytest.mark.parametrize("loss", ["cross_entropy", "linear_cross_entropy"])
def test_torch_compile_before_2_12_refuses_gradients_and_falls_back_to_eager(loss):
    """Under torch < 2.12 the compiled backward got the gradient buffers unwritten: fullgraph=True must fail with our
    sentence, not train on zeros; without fullgraph, dynamo runs the loss eagerly and the gradients are eager's."""
    torch._dynamo.reset()
    x, weight = torch.randn(9, 16), torch.randn(37, 16)
    target = torch.randint(0, 37, (9,))

    def forward(w):
        if loss == "cross_entropy":
            return FF.cross_entropy(x @ w.t(), target, backend="cpu")
        return FF.linear_cross_entropy(x, w, target, backend="cpu")

    with pytest.raises(Exception, match="cannot be differentiated inside torch.compile"):
        torch.compile(forward, fullgraph=True)(weight.clone().requires_grad_())
    compiled_w, eager_w = weight.clone().requires_grad_(), weight.clone().requires_grad_()
    torch.compile(forward)(compiled_w).backward()
    forward(eager_w).backward()
    assert compiled_w.grad.abs().sum() > 0
    torch.testing.assert_close(compiled_w.grad, eager_w.grad, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------------------------------------------
# 9. random configurations


@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(
    num_rows=st.integers(1, 40),
    num_classes=st.integers(2, 600),
    reduction=st.sampled_from(REDUCTIONS),
    label_smoothing=st.sampled_from([0.0, 0.05, 0.5, 1.0]),
    ignore_fraction=st.sampled_from([0.0, 0.3, 0.9]),
    ignore_index=st.sampled_from([-100, 0]),  # 0: a real class, ignored wherever it is the target
    weighted=st.booleans(),
    z_loss=st.sampled_from([0.0, 1e-3]),
    softcap=st.sampled_from([None, 10.0]),
    scale=st.sampled_from([0.1, 4.0, 30.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_configs_match_reference(num_rows, num_classes, reduction, label_smoothing, ignore_fraction,
                                        ignore_index, weighted, z_loss, softcap, scale, seed):
    generator = torch.Generator().manual_seed(seed)
    logits = scale * torch.randn(num_rows, num_classes, generator=generator)
    target = torch.randint(0, num_classes, (num_rows,), generator=generator)
    target[torch.rand(num_rows, generator=generator) < ignore_fraction] = ignore_index
    target[0] = num_classes - 1  # one kept row: "mean" stays finite
    weight = torch.rand(num_classes, generator=generator) + 0.5 if weighted else None
    kwargs = dict(ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap)
    x, ref_x = logits.clone().requires_grad_(), logits.double().requires_grad_()
    loss = FF.cross_entropy(x, target, weight, reduction=reduction, backend="cpu", **kwargs)
    ref, _ = reference_loss(ref_x, target, weight, reduction, **kwargs)
    grad_output = random_grad_output(loss)
    (grad,) = grad_of(loss, x, grad_output)
    (ref_grad,) = grad_of(ref, ref_x, None if grad_output is None else grad_output.double())
    # a few fp32 roundings of values of the size of the loss, lse (and z_loss * lse^2); the gradient's through p
    lse = max_lse(logits, softcap)
    assert max_error(loss, ref) <= 16 * FP32_EPS * max(magnitude(ref), lse + z_loss * lse * lse)
    unit = gradient_unit(target, weight, reduction, grad_output, lse=lse, **kwargs)
    assert max_error(grad, ref_grad) <= 8 * FP32_EPS * (1 + lse) * unit


@pytest.mark.parametrize("loss", ["CrossEntropyLoss", "LinearCrossEntropyLoss"])
def test_torch_export_keeps_the_loss_differentiable(loss):
    """torch.export keeps a graph's forward ops alone, so an exported loss is torch's own ops (the fused op's gradient
    would be lost, silently where another term carries a gradient): the exported module's loss and gradients are
    eager's."""
    torch.manual_seed(0)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(16, 37)
            self.ce = fused_optim.CrossEntropyLoss(label_smoothing=0.1, backend="cpu")
            self.linear_ce = fused_optim.LinearCrossEntropyLoss(16, 37, backend="cpu")

        def forward(self, x, target):
            if loss == "CrossEntropyLoss":
                return self.ce(self.head(x), target) + 1e-3 * x.square().mean()
            return self.linear_ce(x, target)

    model, x, target = Model(), torch.randn(8, 16, requires_grad=True), torch.randint(0, 37, (8,))
    exported = torch.export.export(model, (x, target)).module()
    results = []
    for module in (model, exported):
        loss_value = module(x, target)
        results.append((loss_value, *torch.autograd.grad(loss_value, [x, *module.parameters()], allow_unused=True)))
    for ours, eager in zip(results[1], results[0]):
        torch.testing.assert_close(ours, eager)


@pytest.mark.parametrize("loss", ["cross_entropy", "CrossEntropyLoss", "linear_cross_entropy"])
def test_torch_fx_traces_the_loss_as_one_call(loss):
    """torch.fx.symbolic_trace of a model that calls the loss, as it traces torch's: the loss dispatches
    __torch_function__ for the tracer's proxies (it raised TypeError on them), and the traced module computes eager's
    loss."""
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(16, 37)
            self.ce = fused_optim.CrossEntropyLoss(label_smoothing=0.1, backend="cpu")

        def forward(self, x, target):
            if loss == "cross_entropy":
                return FF.cross_entropy(self.head(x), target, label_smoothing=0.1, backend="cpu")
            if loss == "CrossEntropyLoss":
                return self.ce(self.head(x), target)
            return FF.linear_cross_entropy(x, self.head.weight, target, linear_bias=self.head.bias, backend="cpu")

    model = Model()
    traced = torch.fx.symbolic_trace(model)
    called = {node.target for node in traced.graph.nodes if node.op == "call_function"}
    assert called & {FF.cross_entropy, FF.linear_cross_entropy}
    x, target = torch.randn(8, 16), torch.randint(0, 37, (8,))
    torch.testing.assert_close(traced(x, target), model(x, target), rtol=0, atol=0)
