"""fused_optim.functional.linear_cross_entropy / fused_optim.LinearCrossEntropyLoss against the float64 reference
(reference.cross_entropy of x @ W.T + b) and against torch.nn.functional.linear_cross_entropy (torch 2.14) at the
same dtype: the loss and the gradients of the input, the projection and its bias, on every backend that runs here.

Sizes, and why: N = 13 rows, odd and prime, so chunks of 7 split them 7 + 6, chunks of 1 make 13 one-row chunks, and
chunks of 50 (more than N) one chunk; the default chunking (a byte budget) is forced to split them by a test of its
own. H = 16 in features, V = 37 classes (a partial Triton block, and not a multiple of any vector width); a second
shape (37, 32, 1000) for the CPU kernels gives the GEMMs and the fp32 accumulation of the weight gradient some
length. The projection is scaled so that the logits are ~4 * N(0, 1) as in test_cross_entropy.py; class weights
U(0.5, 1.5). Then torch's edges: its errors (F.linear's first, also for no rows), options (allow_retain_graph),
inference tensors, an lm head of no classes.
"""

from __future__ import annotations

import math
import re
import types

import pytest
import torch
import torch.nn.functional as F
from conftest import BACKEND_DEVICES, TRITON_INTERPRETED, assert_signature_extends

import fused_optim
import fused_optim.autograd.linear_cross_entropy as lce_autograd
import fused_optim.functional as FF
from fused_optim import _backend, reference

# torch 2.14 added F.linear_cross_entropy, its options and its module, the peers here. Under an older torch (the lent
# GPU machines run 2.11) the peer is torch's ops spelling the same loss, the options a stand-in holding the one field
# ours reads, and the tests that call torch's function or module themselves are skipped.
TORCH_HAS_LINEAR_CE = hasattr(F, "linear_cross_entropy")
LinearCrossEntropyOptions = getattr(torch.nn, "LinearCrossEntropyOptions", types.SimpleNamespace)
needs_torch_linear_ce = pytest.mark.skipif(not TORCH_HAS_LINEAR_CE,
                                           reason="compares with torch's linear_cross_entropy (torch 2.14+)")
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]
REDUCTIONS = ["none", "sum", "mean"]
FP32_EPS = torch.finfo(torch.float32).eps
CHUNKINGS = [None, 1, 7, 50]  # None: the default byte budget (one chunk at these sizes)
SHAPES = {"triton": [(13, 16, 37)], "cpu": [(13, 16, 37), (37, 32, 1000)], "torch": [(13, 16, 37), (37, 32, 1000)],
          "cuda": [(13, 16, 37), (37, 32, 1000)]}

# `ignored`: rows 2, 6, 10, ... target ignore_index. z_loss / softcap are ours only: their torch peer at the same
# dtype is torch's ops spelling the same formula (torch_peer below).
OPTIONS = {
    "plain": dict(),
    "bias": dict(bias=True),
    "weight+bias": dict(weight=True, bias=True),
    "label_smoothing": dict(label_smoothing=0.1),
    "ignored_rows": dict(ignored=True),
    "ignore_index=3": dict(ignored=True, ignore_index=3),  # a real class, ignored where it is the target
    "z_loss": dict(z_loss=1e-2),
    "softcap": dict(softcap=5.0, bias=True),
    "everything": dict(weight=True, bias=True, label_smoothing=0.1, ignored=True, z_loss=1e-3, softcap=30.0),
}
TORCH_OPTIONS = ("weight", "ignore_index", "label_smoothing")


# ----------------------------------------------------------------------------------------------------------------
# helpers


def make_case(num_rows, in_features, num_classes, dtype, device="cpu", *, bias=False, weight=False, ignored=False,
              ignore_index=None, label_smoothing=0.0, z_loss=0.0, softcap=None):
    """(input, linear_weight, linear_bias or None, target, keyword arguments)."""
    x = torch.randn(num_rows, in_features).to(device=device, dtype=dtype)
    linear_weight = (4 / math.sqrt(in_features) * torch.randn(num_classes, in_features)).to(device=device,
                                                                                             dtype=dtype)
    linear_bias = torch.randn(num_classes).to(device=device, dtype=dtype) if bias else None
    target = torch.randint(0, num_classes, (num_rows,), device=device)
    if ignored:
        target[2::4] = -100 if ignore_index is None else ignore_index
    kwargs = dict(weight=(torch.rand(num_classes) + 0.5).to(device=device, dtype=dtype) if weight else None,
                  ignore_index=ignore_index, label_smoothing=label_smoothing)
    if z_loss:
        kwargs["z_loss"] = z_loss
    if softcap:
        kwargs["softcap"] = softcap
    return x, linear_weight, linear_bias, target, kwargs


def reference_loss(x, linear_weight, linear_bias, target, reduction, weight=None, ignore_index=None, **kwargs):
    """float64 reference on float64 leaves: (loss, z-loss)."""
    logits = x @ linear_weight.t() + (linear_bias if linear_bias is not None else 0)
    return reference.cross_entropy(logits, target, None if weight is None else weight.double(),
                                   ignore_index=-100 if ignore_index is None else ignore_index, reduction=reduction,
                                   **kwargs)


def torch_peer(x, linear_weight, linear_bias, target, reduction, weight=None, ignore_index=None,
               label_smoothing=0.0, z_loss=0.0, softcap=None):
    """torch at the input's dtype: F.linear_cross_entropy itself when the options are torch's (and torch has it);
    else torch's ops spelling the reference's formula, every op at that dtype."""
    if not z_loss and softcap is None and TORCH_HAS_LINEAR_CE:
        return F.linear_cross_entropy(x, linear_weight, target, linear_bias=linear_bias, weight=weight,
                                      reduction=reduction, ignore_index=ignore_index,
                                      label_smoothing=label_smoothing)
    ignore_index = -100 if ignore_index is None else ignore_index
    logits = F.linear(x, linear_weight, linear_bias)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    loss = F.cross_entropy(logits, target, weight, ignore_index=ignore_index, reduction=reduction,
                           label_smoothing=label_smoothing)
    if not z_loss:
        return loss
    kept = target != ignore_index
    z_rows = torch.where(kept, z_loss * torch.logsumexp(logits, dim=1) ** 2, 0)
    z = {"none": z_rows, "sum": z_rows.sum(), "mean": z_rows.sum() / kept.sum()}[reduction]
    return loss + z


def options_for(chunk):
    return None if chunk is None else LinearCrossEntropyOptions(batch_chunk_size=chunk)


def max_error(ours, ref) -> float:
    if ref.numel() == 0:
        return 0.0
    return (ours.detach().double().cpu() - ref.detach().double().cpu()).abs().nan_to_num(nan=math.inf).max().item()


def magnitude(ref) -> float:
    return ref.detach().abs().max().item() if ref.numel() else 0.0


def random_grad_output(loss, dtype):
    """Per-row random for "none" (the recomputing backward), else a random scalar (the backward's scale)."""
    return torch.randn(loss.shape).to(device=loss.device, dtype=dtype)


# ----------------------------------------------------------------------------------------------------------------
# correctness


@pytest.mark.interpreted_cover(2)
@pytest.mark.parametrize("options", list(OPTIONS.values()), ids=list(OPTIONS))
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_matches_reference_at_least_as_well_as_torch(backend, device, dtype, reduction, options):
    for shape in SHAPES[backend]:
        x, linear_weight, linear_bias, target, kwargs = make_case(*shape, dtype, device, **options)
        inputs = [t for t in (x, linear_weight, linear_bias) if t is not None]
        torch_inputs = [t.clone().requires_grad_() for t in inputs]
        ref_inputs = [t.double().requires_grad_() for t in inputs]
        theirs = torch_peer(*torch_inputs[:2], torch_inputs[2] if linear_bias is not None else None, target,
                            reduction, **kwargs)
        ref, ref_z = reference_loss(*ref_inputs[:2], ref_inputs[2] if linear_bias is not None else None, target,
                                    reduction, **kwargs)
        grad_output = random_grad_output(theirs, dtype)
        torch_grads = torch.autograd.grad(theirs, torch_inputs, grad_output)
        ref_grads = torch.autograd.grad(ref, ref_inputs, grad_output.double())
        logits = x.double() @ linear_weight.double().t() + (linear_bias.double() if linear_bias is not None else 0)
        if "softcap" in kwargs:
            logits = kwargs["softcap"] * torch.tanh(logits / kwargs["softcap"])
        lse = torch.logsumexp(logits, dim=1).abs().max().item()
        eps = torch.finfo(dtype).eps
        for chunk in CHUNKINGS:
            ours_inputs = [t.clone().requires_grad_() for t in inputs]
            ours, z = FF.linear_cross_entropy(
                ours_inputs[0], ours_inputs[1], target, linear_bias=ours_inputs[2] if linear_bias is not None else None,
                reduction=reduction, options=options_for(chunk), backend=backend, return_z_loss=True, **kwargs)
            ours_grads = torch.autograd.grad(ours, ours_inputs, grad_output)
            what = f"{shape} chunk={chunk}"
            assert (ours.dtype, ours.shape) == (theirs.dtype, theirs.shape), what
            assert (z.dtype, z.shape) == (ours.dtype, ours.shape) and not z.requires_grad, what
            # The loss: as in test_cross_entropy.py, plus the logits' own rounding to bf16 (the same GEMM for both).
            loss_err, torch_loss_err = max_error(ours, ref), max_error(theirs, ref)
            rows = shape[0] if reduction == "sum" else 1
            slack = 2 * eps * magnitude(ref) + 2 * FP32_EPS * lse * rows
            assert loss_err <= 2 * torch_loss_err + slack, (what, loss_err, torch_loss_err)
            if dtype == torch.float32:
                assert loss_err <= 8 * FP32_EPS * max(magnitude(ref), lse) * rows, (what, loss_err)
                assert max_error(z, ref_z) <= 8 * FP32_EPS * max(magnitude(ref_z), 1e-30) * rows, what
            # The gradients: sums over rows (grad_W, grad_b) or classes (grad_x) of terms of the size of the
            # gradient of the logits; an fp32 rounding of lse relative in each (test_cross_entropy.py), and in
            # bf16 the rounding of the gradient of the logits to bf16 before both GEMMs, as torch's autograd does.
            for name, ours_g, torch_g, ref_g in zip(("input", "linear_weight", "linear_bias"), ours_grads,
                                                    torch_grads, ref_grads):
                assert (ours_g.dtype, ours_g.shape) == (torch_g.dtype, torch_g.shape), (what, name)
                err, torch_err, mag = max_error(ours_g, ref_g), max_error(torch_g, ref_g), magnitude(ref_g)
                slack = 2 * eps * (1 + lse) * mag if dtype == torch.float32 else 2 * eps * mag
                assert err <= 2 * torch_err + slack, (what, name, err, torch_err)
                if dtype == torch.float32:
                    assert err <= 16 * FP32_EPS * (1 + lse) * mag, (what, name, err)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_default_chunking_splits_rows_unevenly(backend, device, monkeypatch):
    """The default chunk is a byte budget of logits: shrunk to 5 rows of V = 37 fp32 logits, 13 rows run as
    5 + 5 + 3, and give what one chunk gives."""
    monkeypatch.setattr(lce_autograd, "DEFAULT_CHUNK_BYTES", 5 * 37 * 4)
    monkeypatch.setitem(lce_autograd.CHUNK_BYTES, "cuda", 5 * 37 * 4)
    assert lce_autograd.chunk_rows(13, 37, torch.float32, torch.device(device)) == 5
    x, linear_weight, linear_bias, target, kwargs = make_case(13, 16, 37, torch.float32, device, bias=True,
                                                              weight=True, ignored=True, label_smoothing=0.1)
    for reduction in REDUCTIONS:
        results = []
        for options in (None, options_for(13)):
            inputs = [t.clone().requires_grad_() for t in (x, linear_weight, linear_bias)]
            loss = FF.linear_cross_entropy(inputs[0], inputs[1], target, linear_bias=inputs[2], reduction=reduction,
                                           options=options, backend=backend, **kwargs)
            grad_output = torch.linspace(0.5, 1.5, loss.numel(), device=device).reshape(loss.shape)
            results.append((loss, torch.autograd.grad(loss, inputs, grad_output)))
        (chunked, chunked_grads), (whole, whole_grads) = results
        torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-6)
        for a, b in zip(chunked_grads, whole_grads):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not TORCH_HAS_LINEAR_CE, reason="torch.nn.functional.linear_cross_entropy is torch 2.14's")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradients_on_the_cpu_are_as_accurate_as_torchs_chunked_path(cpu_backend, dtype, reduction):
    """Mean errors against float64 over seeds, beside torch's chunked path (given options, as ours), with class
    weights and ignored rows. A chunk's logits and their gradient are fp32 on the CPU, also for bf16/fp16 inputs
    (torch's "accurate" policy there: a gradient rounded before the input gradient's GEMM doubled that error), and
    the target's term of the gradient, p_t s - s, is folded in after the GEMMs (rounded next to 1, it had made the
    fp32 gradients' errors 1.6-1.7x torch's)."""
    errors = {"ours": [0.0] * 3, "torch": [0.0] * 3}
    for seed in range(6):
        torch.manual_seed(seed)
        x, linear_weight, linear_bias, target, kwargs = make_case(64, 32, 256, dtype, bias=True, weight=True,
                                                                  ignored=True)
        grad_output = torch.rand(64, dtype=dtype) if reduction == "none" else None
        inputs = (x, linear_weight, linear_bias)
        ref_inputs = [t.double().requires_grad_() for t in inputs]
        ref, _ = reference_loss(*ref_inputs, target, reduction, weight=kwargs["weight"])
        ref_grads = torch.autograd.grad(ref, ref_inputs, None if grad_output is None else grad_output.double())
        for name, loss_fn in (("ours", lambda *a, **k: FF.linear_cross_entropy(*a, **k, backend=cpu_backend)),
                              ("torch", F.linear_cross_entropy)):
            leaves = [t.clone().requires_grad_() for t in inputs]
            loss = loss_fn(leaves[0], leaves[1], target, linear_bias=leaves[2], weight=kwargs["weight"],
                           reduction=reduction, options=LinearCrossEntropyOptions())
            for i, (grad, ref_grad) in enumerate(zip(torch.autograd.grad(loss, leaves, grad_output), ref_grads)):
                errors[name][i] += (grad.double() - ref_grad).abs().mean().item()
    for ours, theirs, name in zip(errors["ours"], errors["torch"], ("input", "linear_weight", "linear_bias")):
        assert ours <= 1.01 * theirs, (name, ours, theirs)


@pytest.mark.skipif(not TORCH_HAS_LINEAR_CE, reason="torch.nn.functional.linear_cross_entropy is torch 2.14's")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_chunks_in_the_inputs_dtype_are_as_accurate_as_torchs_compact_policy(monkeypatch, dtype, reduction):
    """A GPU keeps a bf16/fp16 chunk's logits and gradient in the input's dtype (chunk_dtype; torch's "compact"
    policy there): emulated on the CPU, the gradients' mean errors against float64 are no worse than torch's chunked
    path given acc_policy="compact" (0.56-0.87x measured on 2026-12-07)."""
    chosen = []
    monkeypatch.setattr(FF, "chunk_dtype", lambda input_dtype, device: chosen.append(input_dtype) or input_dtype)
    errors = {"ours": [0.0] * 3, "torch": [0.0] * 3}
    for seed in range(4):
        torch.manual_seed(seed)
        x, linear_weight, linear_bias, target, _ = make_case(64, 32, 256, dtype, bias=True, ignored=True)
        grad_output = torch.rand(64, dtype=dtype) if reduction == "none" else None
        inputs = (x, linear_weight, linear_bias)
        ref_inputs = [t.double().requires_grad_() for t in inputs]
        ref, _ = reference_loss(*ref_inputs, target, reduction)
        ref_grads = torch.autograd.grad(ref, ref_inputs, None if grad_output is None else grad_output.double())
        for name, loss_fn, options in (
                ("ours", lambda *a, **k: FF.linear_cross_entropy(*a, **k, backend="cpu"), LinearCrossEntropyOptions()),
                ("torch", F.linear_cross_entropy, LinearCrossEntropyOptions(acc_policy="compact"))):
            leaves = [t.clone().requires_grad_() for t in inputs]
            loss = loss_fn(leaves[0], leaves[1], target, linear_bias=leaves[2], reduction=reduction, options=options)
            for i, (grad, ref_grad) in enumerate(zip(torch.autograd.grad(loss, leaves, grad_output), ref_grads)):
                errors[name][i] += (grad.double() - ref_grad).abs().mean().item()
    assert chosen and set(chosen) == {dtype}  # the chunks did run in the input's dtype
    for ours, theirs, name in zip(errors["ours"], errors["torch"], ("input", "linear_weight", "linear_bias")):
        assert ours <= 1.01 * theirs, (name, ours, theirs)


@pytest.mark.skipif(not TORCH_HAS_LINEAR_CE, reason="torch.nn.functional.linear_cross_entropy is torch 2.14's")
def test_options_chunking_method_is_honoured_and_a_conflict_refused_as_torchs(monkeypatch):
    """"aspect_ratio:k" chunks as torch's rule says (here 6 rows, d = 8, V = 10: 4 rows), and given with a
    batch_chunk_size that differs, it is refused in torch's words."""
    x, linear_weight, _, target, _ = make_case(6, 8, 10, torch.float32)
    rows_seen = []
    chunk_rows = lce_autograd.chunk_rows
    monkeypatch.setattr(FF, "chunk_rows", lambda *args: rows_seen.append(chunk_rows(*args)) or rows_seen[-1])
    FF.linear_cross_entropy(x, linear_weight, target, options=LinearCrossEntropyOptions(chunking_method="aspect_ratio"))
    assert rows_seen == [4]
    conflict = LinearCrossEntropyOptions(batch_chunk_size=5, chunking_method="aspect_ratio")
    with pytest.raises(ValueError) as theirs:
        F.linear_cross_entropy(x, linear_weight, target, options=conflict)
    with pytest.raises(ValueError, match=re.escape(str(theirs.value))):
        FF.linear_cross_entropy(x, linear_weight, target, options=conflict)


# ----------------------------------------------------------------------------------------------------------------
# shapes, partial gradients, autograd contract


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
@needs_torch_linear_ce
def test_unbatched_input_matches_torch(backend, device):
    """(H,) input with a () target: a () loss whatever the reduction, as torch's."""
    x, linear_weight, linear_bias, _, kwargs = make_case(1, 16, 37, torch.float32, device, bias=True,
                                                         label_smoothing=0.1)
    x, target = x[0], torch.tensor(5, device=device)
    for reduction in REDUCTIONS:
        for chunk in (None, 1):
            ours_inputs = [t.clone().requires_grad_() for t in (x, linear_weight, linear_bias)]
            torch_inputs = [t.clone().requires_grad_() for t in (x, linear_weight, linear_bias)]
            ours = FF.linear_cross_entropy(ours_inputs[0], ours_inputs[1], target, linear_bias=ours_inputs[2],
                                           reduction=reduction, options=options_for(chunk), backend=backend,
                                           **kwargs)
            theirs = F.linear_cross_entropy(torch_inputs[0], torch_inputs[1], target, linear_bias=torch_inputs[2],
                                            reduction=reduction, **kwargs)
            assert (ours.dtype, ours.shape) == (theirs.dtype, theirs.shape) == (torch.float32, ())
            torch.testing.assert_close(ours, theirs)
            for a, b in zip(torch.autograd.grad(ours * 0.7, ours_inputs), torch.autograd.grad(theirs * 0.7,
                                                                                             torch_inputs)):
                assert a.shape == b.shape
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
@needs_torch_linear_ce
def test_unbatched_input_with_a_one_element_target_matches_torch(backend, device):
    """(H,) input with a (1,) target: a () loss for "none" too (it used to be (1,)), with torch's value; the gradients
    are those of the same () target (torch's own backward refuses the (1,) one: "size mismatch")."""
    x, linear_weight, _, _, _ = make_case(1, 16, 37, torch.float32, device)
    x, target = x[0], torch.tensor([5], device=device)
    for reduction in REDUCTIONS:
        ours_inputs = [t.clone().requires_grad_() for t in (x, linear_weight)]
        torch_inputs = [t.clone().requires_grad_() for t in (x, linear_weight)]
        ours, z = FF.linear_cross_entropy(*ours_inputs, target, reduction=reduction, backend=backend,
                                          return_z_loss=True)
        theirs = F.linear_cross_entropy(*torch_inputs, target, reduction=reduction)
        assert ours.shape == z.shape == theirs.shape == ()
        torch.testing.assert_close(ours, theirs)
        theirs = F.linear_cross_entropy(*torch_inputs, target[0], reduction=reduction)
        for a, b in zip(torch.autograd.grad(ours, ours_inputs), torch.autograd.grad(theirs, torch_inputs)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
@needs_torch_linear_ce
def test_strided_target_matches_torch(backend, device):
    """A target that is a strided view (a column of (N, 2) pairs) is taken as torch takes it: it used to be refused
    as not contiguous."""
    x, linear_weight, _, _, _ = make_case(13, 16, 37, torch.float32, device)
    pairs = torch.randint(0, 37, (13, 2), device=device)
    pairs[3, 1] = -100
    target = pairs[:, 1]
    assert not target.is_contiguous()
    for reduction in REDUCTIONS:
        ours_inputs = [t.clone().requires_grad_() for t in (x, linear_weight)]
        torch_inputs = [t.clone().requires_grad_() for t in (x, linear_weight)]
        ours = FF.linear_cross_entropy(*ours_inputs, target, reduction=reduction, options=options_for(7),
                                       backend=backend)
        theirs = F.linear_cross_entropy(*torch_inputs, target, reduction=reduction)
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
        grad_output = torch.randn(ours.shape, device=device)
        for a, b in zip(torch.autograd.grad(ours, ours_inputs, grad_output),
                        torch.autograd.grad(theirs, torch_inputs, grad_output)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


AUTOCAST_DTYPES = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]


@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16], ids=["fp32-input", "bf16-input"])
@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES)
@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
@needs_torch_linear_ce
def test_autocast_like_torch(backend, device, dtype, input_dtype):
    """Under torch.autocast torch multiplies in autocast's dtype and computes the loss from those logits in fp32: an
    fp32 loss (ours was rounded to the input's dtype), each gradient in its own tensor's dtype, and hidden states of
    another dtype than the (fp32) lm head taken too (ours refused to multiply them)."""
    x, linear_weight, linear_bias, target, _ = make_case(13, 16, 37, torch.float32, device, bias=True, ignored=True)
    x = x.to(input_dtype)
    for reduction in REDUCTIONS:
        ours_inputs = [t.clone().requires_grad_() for t in (x, linear_weight, linear_bias)]
        torch_inputs = [t.clone().requires_grad_() for t in (x, linear_weight, linear_bias)]
        with torch.autocast(device, dtype=dtype):
            ours = FF.linear_cross_entropy(ours_inputs[0], ours_inputs[1], target, linear_bias=ours_inputs[2],
                                           reduction=reduction, label_smoothing=0.1, backend=backend)
            theirs = F.linear_cross_entropy(torch_inputs[0], torch_inputs[1], target, linear_bias=torch_inputs[2],
                                            reduction=reduction, label_smoothing=0.1)
        assert ours.dtype == theirs.dtype == torch.float32
        # the fp32 loss of the same low-precision logits: far closer than one rounding to bf16 or fp16
        torch.testing.assert_close(ours, theirs, rtol=2**-12, atol=1e-5)
        grad_output = torch.rand(ours.shape, device=device) + 0.5
        for a, b in zip(torch.autograd.grad(ours, ours_inputs, grad_output),
                        torch.autograd.grad(theirs, torch_inputs, grad_output)):
            assert a.dtype == b.dtype
            # both through GEMMs in autocast's dtype: a few of its roundings
            torch.testing.assert_close(a.float(), b.float(), rtol=0, atol=4 * torch.finfo(dtype).eps * magnitude(b))


REQUIRES_GRAD = {  # which of (input, linear_weight, linear_bias) require grad
    "frozen-weight": (True, False, True),
    "weight-only": (False, True, False),
    "bias-only": (False, False, True),
    "nothing": (False, False, False),
}


@pytest.mark.parametrize("which", list(REQUIRES_GRAD))
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
@needs_torch_linear_ce
def test_only_some_inputs_require_grad(backend, device, reduction, which):
    x, linear_weight, linear_bias, target, kwargs = make_case(13, 16, 37, torch.float32, device, bias=True,
                                                              ignored=True)
    flags = REQUIRES_GRAD[which]
    ours_inputs = [t.clone().requires_grad_(f) for t, f in zip((x, linear_weight, linear_bias), flags)]
    torch_inputs = [t.clone().requires_grad_(f) for t, f in zip((x, linear_weight, linear_bias), flags)]
    ours = FF.linear_cross_entropy(ours_inputs[0], ours_inputs[1], target, linear_bias=ours_inputs[2],
                                   reduction=reduction, options=options_for(7), backend=backend, **kwargs)
    theirs = F.linear_cross_entropy(torch_inputs[0], torch_inputs[1], target, linear_bias=torch_inputs[2],
                                    reduction=reduction, **kwargs)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    assert ours.requires_grad == any(flags)
    if not any(flags):
        return
    grad_output = torch.randn(ours.shape, device=device)
    ours.backward(grad_output)
    theirs.backward(grad_output)
    for a, b, flag in zip(ours_inputs, torch_inputs, flags):
        assert (a.grad is None) == (not flag)
        if flag:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_second_backward_raises_for_scalar_reductions(backend, device, reduction):
    """"mean"/"sum" compute the gradients in the forward and scale them in place in the backward: a second
    backward (retain_graph=True) must raise rather than hand out gradients scaled twice."""
    x, linear_weight, _, target, _ = make_case(13, 16, 37, torch.float32, device)
    x.requires_grad_()
    loss = FF.linear_cross_entropy(x, linear_weight, target, reduction=reduction, backend=backend)
    (loss * 3.0).backward(retain_graph=True)
    first = x.grad.clone()
    with pytest.raises(RuntimeError, match="second time"):
        loss.backward()
    assert torch.equal(x.grad, first)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_none_reduction_recomputes_so_a_second_backward_works(backend, device):
    """"none" keeps only the inputs and recomputes in the backward: twice through it gives the same gradient
    twice (as torch's chunked op documents)."""
    x, linear_weight, _, target, _ = make_case(13, 16, 37, torch.float32, device)
    x.requires_grad_()
    loss = FF.linear_cross_entropy(x, linear_weight, target, reduction="none", options=options_for(7),
                                   backend=backend)
    grad_output = torch.randn(13, device=device)
    loss.backward(grad_output, retain_graph=True)
    once = x.grad.clone()
    loss.backward(grad_output)
    torch.testing.assert_close(x.grad, 2 * once)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_double_backward_raises(backend, device):
    """The gradients are computed outside autograd (in the forward for "mean"/"sum", recomputed for "none"), so they
    have no gradient themselves: a Hessian-vector product through the loss must raise, not leave its term out."""
    x, linear_weight, _, target, _ = make_case(13, 16, 37, torch.float32, device)
    for reduction in REDUCTIONS:
        hidden, torch_hidden = x.clone().requires_grad_(), x.clone().requires_grad_()
        loss = FF.linear_cross_entropy(torch.tanh(hidden), linear_weight, target, reduction=reduction,
                                       backend=backend).sum()
        torch_loss = F.cross_entropy(torch.tanh(torch_hidden) @ linear_weight.t(), target, reduction=reduction).sum()
        (grad,) = torch.autograd.grad(loss, hidden, create_graph=True)
        (torch_grad,) = torch.autograd.grad(torch_loss, torch_hidden, create_graph=True)
        torch.testing.assert_close(grad, torch_grad, rtol=1e-5, atol=1e-6)
        with pytest.raises(RuntimeError, match="linear_cross_entropy is differentiable once"):
            torch.autograd.grad((grad * torch.randn_like(grad)).sum(), hidden)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
@needs_torch_linear_ce
def test_empty_batch(backend, device, reduction):
    x = torch.randn(0, 16, device=device, requires_grad=True)
    linear_weight = torch.randn(37, 16, device=device, requires_grad=True)
    target = torch.zeros(0, dtype=torch.long, device=device)
    ours = FF.linear_cross_entropy(x, linear_weight, target, reduction=reduction, backend=backend)
    theirs = F.linear_cross_entropy(x, linear_weight, target, reduction=reduction)
    assert (ours.dtype, ours.shape) == (theirs.dtype, theirs.shape)
    torch.testing.assert_close(ours, theirs, equal_nan=True)
    grads = torch.autograd.grad(ours.sum(), (x, linear_weight))
    assert grads[0].shape == (0, 16) and torch.equal(grads[1], torch.zeros(37, 16, device=device))


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
@needs_torch_linear_ce
def test_every_target_ignored(backend, device):
    x, linear_weight, linear_bias, _, _ = make_case(5, 16, 37, torch.float32, device, bias=True)
    target = torch.full((5,), -100, device=device)
    for reduction in REDUCTIONS:
        inputs = [t.clone().requires_grad_() for t in (x, linear_weight, linear_bias)]
        ours = FF.linear_cross_entropy(inputs[0], inputs[1], target, linear_bias=inputs[2], reduction=reduction,
                                       label_smoothing=0.1, z_loss=1e-3, backend=backend)
        theirs = F.linear_cross_entropy(x, linear_weight, target, linear_bias=linear_bias, reduction=reduction,
                                        label_smoothing=0.1)
        torch.testing.assert_close(ours, theirs, equal_nan=True, rtol=0, atol=0)
        for grad in torch.autograd.grad(ours.sum(), inputs):
            assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_an_ignored_row_of_nan_input_gets_a_zero_gradient(backend, device):
    """The kernels leave an ignored row's gradient 0 whatever its logits; the fp32 chunks' target term (read apart
    from the kernel) must too, not 0 * NaN."""
    x, linear_weight, _, target, _ = make_case(5, 16, 37, torch.float32, device)
    x[2, 0], target[2] = math.nan, -100
    x.requires_grad_()
    FF.linear_cross_entropy(x, linear_weight, target, backend=backend).backward()
    assert torch.equal(x.grad[2], torch.zeros_like(x.grad[2])) and x.grad[[0, 1, 3, 4]].isfinite().all()


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
@needs_torch_linear_ce
def test_non_contiguous_input_and_weight(backend, device):
    """A transposed projection (an lm_head stored (H, V), used as .t()) and a row-strided input."""
    base_weight = torch.randn(16, 37, device=device, requires_grad=True)
    torch_base_weight = base_weight.detach().clone().requires_grad_()
    base_x = torch.randn(26, 16, device=device, requires_grad=True)
    torch_base_x = base_x.detach().clone().requires_grad_()
    target = torch.randint(0, 37, (13,), device=device)
    for reduction in REDUCTIONS:
        ours = FF.linear_cross_entropy(base_x[::2], base_weight.t(), target, reduction=reduction, backend=backend,
                                       options=options_for(7))
        theirs = F.linear_cross_entropy(torch_base_x[::2], torch_base_weight.t(), target, reduction=reduction)
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
        grad_output = torch.randn(ours.shape, device=device)
        ours.backward(grad_output)
        theirs.backward(grad_output)
    torch.testing.assert_close(base_weight.grad, torch_base_weight.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(base_x.grad, torch_base_x.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@needs_torch_linear_ce
def test_probability_targets_and_float64_match_torch(reduction):
    """Probability targets and float64 inputs run F.linear + torch's cross-entropy: torch's numbers."""
    x = torch.randn(5, 16, requires_grad=True)
    linear_weight = torch.randn(7, 16, requires_grad=True)
    target = torch.softmax(torch.randn(5, 7), dim=1)
    ours = FF.linear_cross_entropy(x, linear_weight, target, reduction=reduction, label_smoothing=0.1)
    theirs = F.linear_cross_entropy(x, linear_weight, target, reduction=reduction, label_smoothing=0.1)
    torch.testing.assert_close(ours, theirs)
    grad_output = torch.randn(ours.shape)
    for a, b in zip(torch.autograd.grad(ours, (x, linear_weight), grad_output),
                    torch.autograd.grad(theirs, (x, linear_weight), grad_output)):
        torch.testing.assert_close(a, b)
    x64, w64 = x.detach().double().requires_grad_(), linear_weight.detach().double().requires_grad_()
    class_target = torch.tensor([0, 6, -100, 2, 2])
    ours = FF.linear_cross_entropy(x64, w64, class_target, reduction=reduction)
    theirs = F.linear_cross_entropy(x64, w64, class_target, reduction=reduction)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("extras", [dict(), dict(z_loss=0.1, softcap=2.0, label_smoothing=0.2)],
                         ids=["plain", "everything"])
def test_gradcheck_float64(extras):
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    linear_weight = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    linear_bias = torch.randn(5, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 4, -100])
    for reduction in REDUCTIONS:
        assert torch.autograd.gradcheck(
            lambda a, w, b: FF.linear_cross_entropy(a, w, target, linear_bias=b, reduction=reduction, **extras),
            (x, linear_weight, linear_bias))


# ----------------------------------------------------------------------------------------------------------------
# bad input


def _bad_inputs(device):
    x, w, t = torch.randn(5, 16, device=device), torch.randn(37, 16, device=device), \
        torch.randint(0, 37, (5,), device=device)
    return {  # name: (input, linear_weight, target, kwargs for both, compare the messages)
        "in-features-mismatch": (x, torch.randn(37, 17, device=device), t, {}, True),
        "1d-linear-weight": (x[0], torch.randn(16, device=device), t[0], {}, True),
        "k-dim-linear-weight-unbatched-input": (x[0], torch.randn(37, 3, 16, device=device), t[:3], {}, True),
        "probability-target-with-ignore-index": (x, w, torch.rand(5, 37, device=device).softmax(1),
                                                 dict(ignore_index=-100), True),
        "batch-size-mismatch": (x, w, t[:4], {}, True),
        "bias-wrong-length": (x, w, t, dict(linear_bias=torch.randn(38, device=device)), True),
        "class-weight-wrong-length": (x, w, t, dict(weight=torch.rand(36, device=device)), False),
        "class-weight-float64": (x, w, t, dict(weight=torch.rand(37, dtype=torch.float64, device=device)), True),
        "int32-target": (x, w, t.int(), {}, True),
        "3d-input": (torch.randn(2, 5, 16, device=device), w, t, {}, True),
        "reduction-avg": (x, w, t, dict(reduction="avg"), True),
        "label_smoothing-2": (x, w, t, dict(label_smoothing=2.0), True),
        "float-ignore_index": (x, w, t, dict(ignore_index=1.0), True),
        "target-out-of-range": (x, w, torch.tensor([1, 2, 37, 0, -100], device=device), {}, True),
        # with gradients the fp32 chunks read the target logits before the kernel checks the classes
        "negative-target-with-grads": (x.clone().requires_grad_(), w.clone().requires_grad_(),
                                       torch.tensor([1, 2, -5, 0, -100], device=device), {}, True),
        # F.linear's checks come first, also for a batch of no rows (which has no chunk to run them)
        "bf16-input-fp32-weight-no-rows": (x[:0].bfloat16(), w, t[:0], {}, True),
        "fp64-bias-no-rows": (x[:0], w, t[:0], dict(linear_bias=torch.randn(37, dtype=torch.float64,
                                                                            device=device)), True),
        "bf16-input-and-int32-target": (x.bfloat16(), w, t.int(), {}, True),
        "ignore_index-past-int64": (x, w, t, dict(ignore_index=2**63), True),
    }


@pytest.mark.parametrize("case", list(_bad_inputs("cpu")))
@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
@needs_torch_linear_ce
def test_bad_input_raises_torchs_error(backend, device, case):
    x, linear_weight, target, kwargs, same_message = _bad_inputs(device)[case]
    if device == "cuda" and case in ("target-out-of-range", "negative-target-with-grads"):
        pytest.skip("on a GPU torch checks the class range with a device-side assert, which ends the process's CUDA "
                    "context (test_cross_entropy.py's bad-input test says more)")
    if backend == "triton" and case in ("target-out-of-range", "negative-target-with-grads"):
        pytest.skip("the Triton kernel cannot raise: it gives the row a NaN loss (tested below)")
    with pytest.raises(Exception) as torch_error:
        F.linear_cross_entropy(x, linear_weight, target, **kwargs)
    before = [x.clone(), linear_weight.clone()]
    with pytest.raises(Exception) as our_error:
        FF.linear_cross_entropy(x, linear_weight, target, backend=backend, **kwargs)
    assert type(our_error.value) is type(torch_error.value), (our_error.value, torch_error.value)
    if same_message:
        assert str(our_error.value) == str(torch_error.value)
    assert torch.equal(x, before[0]) and torch.equal(linear_weight, before[1])


def test_triton_out_of_range_target_gives_a_nan_loss():
    if not TRITON_INTERPRETED:
        pytest.skip("Triton runs CPU tensors only interpreted")
    x, linear_weight, _, _, _ = make_case(5, 16, 37, torch.float32)
    target = torch.tensor([1, 2, 37, 0, -100])
    x.requires_grad_()
    loss = FF.linear_cross_entropy(x, linear_weight, target, reduction="none", backend="triton")
    assert loss[2].isnan() and torch.isfinite(loss[[0, 1, 3, 4]]).all()
    # and so is that row's gradient, not one toward the class its target was clamped to (the fp32 chunks' target term)
    loss.nansum().backward()
    assert x.grad[2].isnan().all() and x.grad[[0, 1, 3, 4]].isfinite().all()


@needs_torch_linear_ce
def test_an_acc_dtype_torch_cannot_accumulate_in_is_refused_as_torchs():
    """acc_dtype: fp32 for fp16/bf16 inputs, or the inputs' own dtype (ours accumulates in fp32 either way); any other
    is torch's RuntimeError where its options would chunk, and ignored where they would not (label smoothing)."""
    for dtype, acc_dtype in ((torch.float32, torch.float64), (torch.bfloat16, torch.float16),
                             (torch.float32, torch.bfloat16)):
        x, linear_weight, _, target, _ = make_case(5, 16, 37, dtype)
        options = LinearCrossEntropyOptions(acc_dtype=acc_dtype)
        with pytest.raises(RuntimeError) as theirs:
            F.linear_cross_entropy(x, linear_weight, target, options=options)
        with pytest.raises(RuntimeError, match=re.escape(str(theirs.value))):
            FF.linear_cross_entropy(x, linear_weight, target, options=options)
        with pytest.warns(UserWarning, match="options"):  # torch's reference path: options ignored
            theirs = F.linear_cross_entropy(x, linear_weight, target, options=options, label_smoothing=0.1)
        ours = FF.linear_cross_entropy(x, linear_weight, target, options=options, label_smoothing=0.1)
        torch.testing.assert_close(ours, theirs)
    for dtype, acc_dtype in ((torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16)):
        x, linear_weight, _, target, _ = make_case(5, 16, 37, dtype)
        FF.linear_cross_entropy(x, linear_weight, target, options=LinearCrossEntropyOptions(acc_dtype=acc_dtype))


def test_torch_func_transforms_run_torchs_ops():
    """Per-sample gradients of the input and the lm head under vmap(grad): torch's own ops, torch's values."""
    x, linear_weight, linear_bias, target, _ = make_case(6, 5, 11, torch.float32, bias=True)

    def per_sample(loss_fn):
        def loss(x_row, weight, t):
            return loss_fn(x_row[None], weight, t[None], linear_bias=linear_bias, label_smoothing=0.1)
        return torch.func.vmap(torch.func.grad(loss, argnums=(0, 1)), in_dims=(0, None, 0))(x, linear_weight, target)

    ours, theirs = per_sample(FF.linear_cross_entropy), per_sample(F.linear_cross_entropy)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)


def test_elementwise_mean_is_mean():
    x, linear_weight, _, target, _ = make_case(5, 16, 37, torch.float32)
    with pytest.warns(UserWarning, match="elementwise_mean"):
        loss = FF.linear_cross_entropy(x, linear_weight, target, reduction="elementwise_mean")
    assert loss == FF.linear_cross_entropy(x, linear_weight, target, reduction="mean")


def test_options_of_another_type_are_refused():
    x, linear_weight, _, target, _ = make_case(5, 16, 37, torch.float32)
    with pytest.raises(TypeError, match="options must be a torch.nn.LinearCrossEntropyOptions or None, not int"):
        FF.linear_cross_entropy(x, linear_weight, target, options=4)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@needs_torch_linear_ce
def test_allow_retain_graph_backs_through_twice_as_torchs(cpu_backend, reduction):
    """LinearCrossEntropyOptions(allow_retain_graph=True): the gradients made in the forward are scaled into new
    tensors, so a second backward adds the same again, as torch's does (without it, the second one raises)."""
    x, linear_weight, linear_bias, target, _ = make_case(13, 16, 37, torch.float32, bias=True)
    options = LinearCrossEntropyOptions(allow_retain_graph=True)
    grads = []
    for loss_fn in (F.linear_cross_entropy, lambda *args, **kwargs: FF.linear_cross_entropy(*args, **kwargs,
                                                                                             backend=cpu_backend)):
        inputs = [t.clone().requires_grad_() for t in (x, linear_weight, linear_bias)]
        loss = loss_fn(inputs[0], inputs[1], target, linear_bias=inputs[2], reduction=reduction, options=options)
        loss.backward(torch.tensor(0.5), retain_graph=True)
        loss.backward(torch.tensor(2.0))
        grads.append([t.grad for t in inputs])
    for ours, theirs in zip(*reversed(grads)):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    inputs = [t.clone().requires_grad_() for t in (x, linear_weight)]
    loss = FF.linear_cross_entropy(*inputs, target, reduction=reduction, backend=cpu_backend)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="a second time"):
        loss.backward()


@needs_torch_linear_ce
def test_inference_tensors_with_a_trainable_bias_as_torchs(cpu_backend):
    """A frozen lm head made under inference_mode and a bias that trains, reduction='none': torch's loss takes
    them (ours refused to save the inference tensors for the backward)."""
    x, linear_weight, _, target, _ = make_case(13, 16, 37, torch.float32)
    with torch.inference_mode():
        x, linear_weight = x.clone(), linear_weight.clone()
    grad_output = torch.rand(13)
    bias = torch.randn(37)
    biases = [bias.clone().requires_grad_() for _ in range(2)]
    F.linear_cross_entropy(x, linear_weight, target, linear_bias=biases[0], reduction="none").backward(grad_output)
    FF.linear_cross_entropy(x, linear_weight, target, linear_bias=biases[1], reduction="none",
                            backend=cpu_backend).backward(grad_output)
    torch.testing.assert_close(biases[1].grad, biases[0].grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@needs_torch_linear_ce
def test_no_classes_as_torch(cpu_backend, reduction):
    """A (0, H) lm head, every row ignored: torch's loss (NaN mean, 0 sum, zero rows) and zero gradients (the
    Triton kernel read a target logit past the empty row; the torch backend's max had no element)."""
    x = torch.randn(5, 4, requires_grad=True)
    linear_weight = torch.randn(0, 4, requires_grad=True)
    target = torch.full((5,), -100)
    expected = F.linear_cross_entropy(x, linear_weight, target, reduction=reduction)
    loss = FF.linear_cross_entropy(x, linear_weight, target, reduction=reduction, backend=cpu_backend)
    torch.testing.assert_close(loss, expected, equal_nan=True)
    loss.sum().backward()
    assert not x.grad.any() and linear_weight.grad.shape == (0, 4)
    logits_loss = FF.cross_entropy(torch.randn(5, 0), target, reduction=reduction, backend=cpu_backend)
    torch.testing.assert_close(logits_loss, F.cross_entropy(torch.randn(5, 0), target, reduction=reduction),
                               equal_nan=True)


@pytest.mark.parametrize("kwargs", [dict(z_loss=-1.0), dict(softcap=0.0)], ids=["z_loss<0", "softcap=0"])
def test_bad_extras_raise_value_error(kwargs):
    x, linear_weight, _, target, _ = make_case(5, 16, 37, torch.float32)
    with pytest.raises(ValueError, match="z_loss must be a non-negative|softcap must be None or a positive"):
        FF.linear_cross_entropy(x, linear_weight, target, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# the module


@needs_torch_linear_ce
def test_module_signature_extends_torchs():
    assert_signature_extends(fused_optim.LinearCrossEntropyLoss, torch.nn.LinearCrossEntropyLoss)


@pytest.mark.parametrize("bias, class_weight", [(False, False), (True, False), (True, True)],
                         ids=["no-bias", "bias", "bias+class-weight"])
@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
@needs_torch_linear_ce
def test_module_loads_torchs_state_and_matches_its_forward(backend, device, bias, class_weight):
    weight = torch.rand(37, device=device) + 0.5 if class_weight else None
    kwargs = dict(bias=bias, weight=weight, label_smoothing=0.1, reduction="sum", device=device)
    theirs = torch.nn.LinearCrossEntropyLoss(16, 37, **kwargs)
    ours = fused_optim.LinearCrossEntropyLoss(16, 37, **kwargs, backend=backend)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert ("linear.bias" in ours.state_dict()) == bias
    ours.load_state_dict(theirs.state_dict())
    assert repr(ours) == repr(theirs)
    x = torch.randn(13, 16, device=device)
    target = torch.randint(0, 37, (13,), device=device)
    target[4] = -100
    ours_loss, torch_loss = ours(x, target), theirs(x, target)
    torch.testing.assert_close(ours_loss, torch_loss, rtol=1e-6, atol=1e-5)
    ours_loss.backward()
    torch_loss.backward()
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)
    # and the other way: torch's module loads ours
    fresh = torch.nn.LinearCrossEntropyLoss(16, 37, **kwargs)
    fresh.load_state_dict(ours.state_dict())


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
@needs_torch_linear_ce
def test_module_k_dimensional_out_features_like_torch(backend, device):
    """out_features=(3,): a (C, 3, H) projection and (N, 3) targets, which torch's module takes."""
    theirs = torch.nn.LinearCrossEntropyLoss(16, 37, out_features=(3,), bias=True, device=device)
    ours = fused_optim.LinearCrossEntropyLoss(16, 37, out_features=(3,), bias=True, device=device, backend=backend)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(5, 16, device=device)
    target = torch.randint(0, 37, (5, 3), device=device)
    torch.testing.assert_close(ours(x, target), theirs(x, target))


@pytest.mark.parametrize("kwargs, message", [
    (dict(weight=torch.rand(36)), "expected weight shape to be (37,), got (36,)"),
    (dict(label_smoothing=1.5), "expected label_smoothing to be in range [0, 1], got 1.5"),
], ids=["weight-wrong-length", "label_smoothing-1.5"])
@needs_torch_linear_ce
def test_module_constructor_errors_like_torch(kwargs, message):
    with pytest.raises(RuntimeError, match=re.escape(message)):
        torch.nn.LinearCrossEntropyLoss(16, 37, **kwargs)
    with pytest.raises(RuntimeError, match=re.escape(message)):
        fused_optim.LinearCrossEntropyLoss(16, 37, **kwargs)


def test_module_extras_pass_through():
    module = fused_optim.LinearCrossEntropyLoss(16, 37, bias=True, z_loss=1e-2, softcap=5.0, return_z_loss=True,
                                                reduction="none", backend="cpu")
    x = torch.randn(13, 16)
    target = torch.randint(0, 37, (13,))
    loss, z = module(x, target)
    expected = FF.linear_cross_entropy(x, module.linear.weight, target, linear_bias=module.linear.bias,
                                       reduction="none", z_loss=1e-2, softcap=5.0, return_z_loss=True,
                                       backend="cpu")
    assert torch.equal(loss, expected[0]) and torch.equal(z, expected[1])


@pytest.mark.skipif(_backend._release(torch.__version__) < (2, 12),
                    reason="torch.compile before torch 2.12 gives these zero gradients")
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_torch_compile_with_dynamic_batch_sizes_compiles_once(reduction):
    """The chunk loop is one op (chunks_op): a compiled loss serves every batch size with one graph, where a Python
    loop over the rows would compile anew for each size and, past dynamo's limit of 8, fail under fullgraph."""
    torch._dynamo.reset()
    weight = torch.randn(37, 16, requires_grad=True)

    def loss(x, target):
        return fused_optim.functional.linear_cross_entropy(x, weight, target, reduction=reduction,
                                                           label_smoothing=0.1).sum()

    compiled = torch.compile(loss, fullgraph=True, dynamic=True)
    for num_rows in (3, *range(4, 14)):
        x, target = torch.randn(num_rows, 16, requires_grad=True), torch.randint(0, 37, (num_rows,))
        with torch._dynamo.config.patch(error_on_recompile=num_rows > 3):
            compiled_loss = compiled(x, target)
        compiled_grads = torch.autograd.grad(compiled_loss, (x, weight))
        eager_loss = loss(x, target)
        eager_grads = torch.autograd.grad(eager_loss, (x, weight))
        torch.testing.assert_close(compiled_loss, eager_loss, rtol=4 * FP32_EPS, atol=0)
        for got, want in zip(compiled_grads, eager_grads):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
