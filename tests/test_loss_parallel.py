"""Vocabulary-parallel cross-entropy (fused_optim/autograd/vocab_parallel.py): logits sharded on the class dim and
lm-head weights sharded on their rows give the unsharded loss and gradient, on every backend that runs here.

Two levels:
- the two ops (cross_entropy_shard_stats, cross_entropy_shard_grad_) on shards of one process's logits, combined
  as the ranks combine them, against the unsharded forward op: every option, fp32 and bf16, 1, 3 and 10 shards of
  13 classes (10 shards: chunks of 2, so the last three are empty);
- `functional.cross_entropy`, `CrossEntropyLoss` and `linear_cross_entropy` on DTensors in 3 gloo processes (13
  classes: shards of 5, 5, 3; and 2 classes: 1, 1, 0), against the same calls on the whole tensors in this process.
  The loss must be a replicated DTensor, the gradient a DTensor sharded like the input, and the forward must issue
  one collective per call (per chunk of rows for the linear loss) and the backward none (one all-reduce for the
  linear loss's input gradient).
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from conftest import TRITON_INTERPRETED
from spawn import GLOO_AVAILABLE, run_workers

import fused_optim
import fused_optim.autograd.linear_cross_entropy as lce_autograd
import fused_optim.functional as FF
from fused_optim import _backend
from fused_optim.autograd.cross_entropy import reduction_scales
from fused_optim.autograd.vocab_parallel import combine
from fused_optim.ops import cross_entropy as ops

ROWS, CLASSES, HIDDEN = 9, 13, 6
IGNORE = -1
# every option of the loss; "ignored": every third row targets IGNORE
OPTIONS = {
    "plain": dict(),
    "ignored": dict(ignored=True),
    "label_smoothing": dict(label_smoothing=0.1),
    "weight": dict(weight=True),
    "z_loss": dict(z_loss=1e-2),
    "softcap": dict(softcap=5.0),
    "everything": dict(ignored=True, label_smoothing=0.1, weight=True, z_loss=1e-3, softcap=30.0),
    # logits around 1e4: each shard's smoothing term, against its own max, must combine without cancelling
    "offset": dict(label_smoothing=0.1, weight=True, offset=1e4),
    # a padded vocabulary: the last shard's classes (of 3 ranks) -inf, so that shard's stats are of -inf alone
    "masked": dict(masked=True, weight=True, z_loss=1e-3),
}
REDUCTIONS = ("mean", "sum", "none")
BACKENDS = ["cpu", "torch"] + (["triton"] if TRITON_INTERPRETED else [])
# torch 2.12 on gives the sharded logits a Shard(1) gradient; 2.11 a replicated one, gathered in the backward
SHARDED_GRADIENTS = _backend._release(torch.__version__) >= (2, 12)


def make_case(num_classes: int, dtype: torch.dtype, options: dict, seed: int = 0):
    """(logits, target, class weights or None, loss kwargs), the same in every process."""
    generator = torch.Generator().manual_seed(seed)
    logits = (4 * torch.randn(ROWS, num_classes, generator=generator) + options.get("offset", 0.0)).to(dtype)
    target = torch.randint(0, num_classes, (ROWS,), generator=generator)
    if options.get("masked"):
        start = [start for start, count in shard_bounds(num_classes, 3) if count][-1]
        logits[:, start:] = -math.inf
        target %= start
    if options.get("ignored"):
        target[1::3] = IGNORE
    weight = (torch.rand(num_classes, generator=generator) + 0.5).to(dtype) if options.get("weight") else None
    kwargs = dict(ignore_index=IGNORE, label_smoothing=options.get("label_smoothing", 0.0),
                  z_loss=options.get("z_loss", 0.0), softcap=options.get("softcap"))
    return logits, target, weight, kwargs


def shard_bounds(num_classes: int, ranks: int) -> list[tuple[int, int]]:
    chunk = -(-num_classes // ranks)
    return [(min(r * chunk, num_classes), min(chunk, max(0, num_classes - r * chunk))) for r in range(ranks)]


# ----------------------------------------------------------------------------------------------------------------
# the ops, on shards of one process's logits


def whole_and_sharded(backend, logits, target, weight32, scales, ranks, label_smoothing=0.0, z_loss=0.0,
                      softcap=0.0):
    """((loss, lse, grad) of the unsharded forward op, (loss, lse, grad) of the two shard ops over `ranks` shards
    combined as the ranks combine them), every gradient poisoned before the kernels write it."""
    options = (IGNORE, label_smoothing, z_loss, softcap)
    whole_grad = torch.full_like(logits, math.nan)
    whole_loss, whole_lse = ops.forward_op(backend, logits.device)(logits, target, weight32, scales, whole_grad,
                                                                   *options)
    bounds = shard_bounds(logits.shape[1], ranks)
    shard_weights = [weight32[start:start + size].contiguous() if weight32 is not None else None
                     for start, size in bounds]
    shards = [logits[:, start:start + size].contiguous() for start, size in bounds]
    stats = [ops.shard_stats_op(backend, logits.device)(shard, target, shard_weight, start, logits.shape[1], IGNORE,
                                                        softcap)
             for shard, shard_weight, (start, _) in zip(shards, shard_weights, bounds)]
    loss, lse, coefs = combine(torch.stack(stats), target, weight32, scales, logits.shape[1], IGNORE, label_smoothing,
                               z_loss, True)
    grads = []
    for shard, shard_weight, (start, _) in zip(shards, shard_weights, bounds):
        grads.append(torch.full_like(shard, math.nan))
        ops.shard_grad_op(backend, logits.device)(grads[-1], shard, target, shard_weight, coefs, start, IGNORE,
                                                  softcap)
    return (whole_loss, whole_lse, whole_grad), (loss, lse, torch.cat(grads, dim=1))


@pytest.mark.interpreted_cover(2)
@pytest.mark.parametrize("ranks", [1, 3, 10])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", OPTIONS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_shards_combine_into_the_whole_rows(backend, name, dtype, ranks):
    logits, target, weight, kwargs = make_case(CLASSES, dtype, OPTIONS[name])
    weight32 = weight.float() if weight is not None else None
    scales, _ = reduction_scales(target, weight32, CLASSES, "mean", IGNORE)
    (whole_loss, whole_lse, whole_grad), (loss, lse, grad) = whole_and_sharded(
        backend, logits, target, weight32, scales, ranks, kwargs["label_smoothing"], kwargs["z_loss"],
        kwargs["softcap"] or 0.0)
    torch.testing.assert_close(loss, whole_loss, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(lse, whole_lse, rtol=2e-6, atol=2e-6)
    # fp32: a few ulps of the probabilities; bf16: the same rounding but where the sums' order moved it by one ulp
    tolerance = dict(rtol=1e-6, atol=2e-7) if dtype == torch.float32 else dict(rtol=2**-8, atol=1e-6)
    torch.testing.assert_close(grad.float(), whole_grad.float(), **tolerance)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_shard_of_nans_makes_its_row_nan(backend):
    """A row whose logits in one shard are all NaN (or NaN among -inf) has a NaN loss, lse and gradient, as the whole
    row has: that shard's max is -inf, like a masked shard's, but its sum is NaN, which the combine must keep."""
    logits, target, _, _ = make_case(CLASSES, torch.float32, {})
    (start1, size1), (start2, size2) = shard_bounds(CLASSES, 3)[1:]
    logits[2, start1:start1 + size1] = math.nan
    logits[5, start2:start2 + size2] = -math.inf
    logits[5, start2] = math.nan
    scales, _ = reduction_scales(target, None, CLASSES, "sum", IGNORE)
    (whole_loss, _, whole_grad), (loss, lse, grad) = whole_and_sharded(backend, logits, target, None, scales, 3)
    nan_rows = torch.zeros(ROWS, dtype=torch.bool)
    nan_rows[[2, 5]] = True
    assert torch.equal(whole_loss.isnan(), nan_rows) and torch.equal(loss.isnan(), nan_rows)
    assert lse[nan_rows].isnan().all() and grad[nan_rows].isnan().all()
    torch.testing.assert_close(loss, whole_loss, rtol=2e-6, atol=2e-6, equal_nan=True)
    torch.testing.assert_close(grad, whole_grad, rtol=1e-6, atol=2e-7, equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_shard_grad_may_write_over_the_logits(backend):
    logits, target, _, _ = make_case(CLASSES, torch.float32, {})
    scales, _ = reduction_scales(target, None, CLASSES, "sum", IGNORE)
    stats = ops.shard_stats_op(backend, logits.device)(logits, target, None, 0, CLASSES, IGNORE, 0.0)
    _, _, coefs = combine(stats[None], target, None, scales, CLASSES, IGNORE, 0.0, 0.0, True)
    expected = torch.empty_like(logits)
    ops.shard_grad_op(backend, logits.device)(expected, logits, target, None, coefs, 0, IGNORE, 0.0)
    ops.shard_grad_op(backend, logits.device)(logits, logits, target, None, coefs, 0, IGNORE, 0.0)
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_a_target_outside_the_whole_vocabulary_is_refused(backend):
    logits, target, _, _ = make_case(CLASSES, torch.float32, {})
    target[2] = CLASSES  # in no shard: a silent 0 target logit without the check
    with pytest.raises(IndexError, match=f"Target {CLASSES} is out of bounds."):
        ops.shard_stats_op(backend, logits.device)(logits[:, :5].contiguous(), target, None, 0, CLASSES, IGNORE, 0.0)


@pytest.mark.skipif(not TRITON_INTERPRETED, reason="TRITON_INTERPRET is not 1 here")
def test_the_triton_kernels_give_a_target_outside_the_vocabulary_a_nan_loss():
    """The Triton kernels cannot raise: a kept target in no shard gives its row a NaN target logit, hence a NaN
    loss, as the unsharded Triton loss does. The combine's gather of its class weight is clamped, as the unsharded
    loss's: unclamped it failed there (an IndexError here; on a GPU a device-side assert, the process's CUDA context
    lost)."""
    logits, target, weight, _ = make_case(CLASSES, torch.float32, {"weight": True})
    target[2] = CLASSES
    scales, _ = reduction_scales(target, weight, CLASSES, "none", IGNORE)
    stats = [ops.shard_stats_op("triton", logits.device)(logits[:, start:start + size].contiguous(), target,
                                                          weight[start:start + size].contiguous(), start, CLASSES,
                                                          IGNORE, 0.0)
             for start, size in shard_bounds(CLASSES, 3)]
    loss, _, _ = combine(torch.stack(stats), target, weight, scales, CLASSES, IGNORE, 0.0, 0.0, True)
    assert loss[2].isnan() and loss[torch.arange(ROWS) != 2].isfinite().all()


@pytest.mark.parametrize("op_name", ["cross_entropy_shard_stats", "cross_entropy_shard_grad_"])
def test_opcheck(op_name):
    logits, target, weight, _ = make_case(CLASSES, torch.float32, {"weight": True})
    shard, shard_weight = logits[:, 4:9].contiguous(), weight[4:9].contiguous()
    if op_name == "cross_entropy_shard_stats":
        args = (shard, target, shard_weight, 4, CLASSES, IGNORE, 0.0)
    else:
        coefs = torch.rand(ROWS, 5)
        args = (torch.empty_like(shard), shard, target, shard_weight, coefs, 4, IGNORE, 0.0)
    torch.library.opcheck(getattr(torch.ops.fused_optim, op_name).default, args)


# ----------------------------------------------------------------------------------------------------------------
# on DTensors, in 3 gloo processes

WORLD = 3
VOCABS = (CLASSES, 2)  # shards of 5, 5, 3 classes; and of 1, 1, 0
CHUNK_ROWS = 4  # the linear loss in chunks of 4 rows: 3 chunks of the 9 rows
# (backend, classes, dtype, option, reduction): every option, reduction and vocabulary on the default CPU kernels
# (the ops' test above covers every option on each backend); every backend and bf16 with all options at once.
CASES = [("cpu", v, torch.float32, name, r) for v in VOCABS for name in OPTIONS for r in REDUCTIONS] + [
    (backend, v, dtype, "everything", r) for backend in BACKENDS for v in VOCABS
    for dtype in (torch.float32, torch.bfloat16) for r in REDUCTIONS if (backend, dtype) != ("cpu", torch.float32)]


def sharded_case(mesh, num_classes, dtype, options):
    from torch.distributed.tensor import Shard, distribute_tensor

    logits, target, weight, kwargs = make_case(num_classes, dtype, options)
    return distribute_tensor(logits, mesh, [Shard(1)]).requires_grad_(), target, weight, kwargs


def count_collectives(fn):
    """fn() and the number of functional collectives it issued."""
    import torch.distributed._functional_collectives as funcol

    count = 0
    originals = {name: getattr(funcol, name) for name in ("all_gather_single", "all_gather_tensor", "all_reduce")
                 if hasattr(funcol, name)}

    def counting(original):
        def counted(*args, **kwargs):
            nonlocal count
            count += 1
            return original(*args, **kwargs)
        return counted

    for name, original in originals.items():
        setattr(funcol, name, counting(original))
    try:
        result = fn()
    finally:
        for name, original in originals.items():
            setattr(funcol, name, original)
    return result, count


def work(rank: int, world: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    results = {}
    for backend, num_classes, dtype, name, reduction in CASES:
        logits, target, weight, kwargs = sharded_case(mesh, num_classes, dtype, OPTIONS[name])
        (loss, z), forward_collectives = count_collectives(lambda: FF.cross_entropy(
            logits, target, weight, reduction=reduction, return_z_loss=True, backend=backend, **kwargs))
        grad_output = torch.linspace(0.5, 1.5, ROWS).to(dtype) if reduction == "none" else None
        _, backward_collectives = count_collectives(lambda: loss.backward(
            DTensor.from_local(grad_output, mesh, [Replicate()]) if grad_output is not None else None))
        results[backend, num_classes, dtype, name, reduction] = {
            "loss": loss.full_tensor(), "z": z.full_tensor(), "grad": logits.grad.full_tensor(),
            "loss_placements": loss.placements, "grad_placements": logits.grad.placements,
            "collectives": (forward_collectives, backward_collectives)}
    for backend in BACKENDS:  # the linear loss: plain hidden states, a Shard(0) lm head and bias
        for reduction in REDUCTIONS:
            hidden, head, bias, target = linear_case()
            head = distribute_tensor(head, mesh, [Shard(0)]).requires_grad_()
            bias = distribute_tensor(bias, mesh, [Shard(0)]).requires_grad_()
            options = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=CHUNK_ROWS) \
                if hasattr(torch.nn, "LinearCrossEntropyOptions") else None
            loss, forward_collectives = count_collectives(lambda: FF.linear_cross_entropy(
                hidden, head, target, linear_bias=bias, reduction=reduction, label_smoothing=0.1, z_loss=1e-3,
                ignore_index=IGNORE, options=options, backend=backend))
            grad_output = torch.linspace(0.5, 1.5, ROWS) if reduction == "none" else None
            _, backward_collectives = count_collectives(lambda: loss.backward(
                DTensor.from_local(grad_output, mesh, [Replicate()]) if grad_output is not None else None))
            results[backend, "linear", reduction] = {
                "loss": loss.full_tensor(), "grad_input": hidden.grad, "grad_weight": head.grad.full_tensor(),
                "grad_bias": bias.grad.full_tensor(), "grad_weight_placements": head.grad.placements,
                "collectives": (forward_collectives, backward_collectives), "chunked": options is not None}
    # the default chunking (a byte budget, here a tiny one) sized by this rank's shard would run 2 chunks of the 9
    # rows on ranks of 5 classes and 3 on the rank of 3: as many all-gathers on every rank, or a collective mismatch
    chunk_bytes = lce_autograd.DEFAULT_CHUNK_BYTES
    lce_autograd.DEFAULT_CHUNK_BYTES = 5 * 4 * 5  # 5 rows of 5 fp32 classes
    try:
        hidden, head, bias, target = linear_case()
        head = distribute_tensor(head, mesh, [Shard(0)]).requires_grad_()
        loss, forward_collectives = count_collectives(lambda: FF.linear_cross_entropy(
            hidden, head, target, ignore_index=IGNORE))
        loss.backward()
        results["linear-default-chunks"] = {"loss": loss.full_tensor(), "grad_input": hidden.grad,
                                            "grad_weight": head.grad.full_tensor(), "collectives": forward_collectives}
    finally:
        lce_autograd.DEFAULT_CHUNK_BYTES = chunk_bytes
    for backend in BACKENDS:  # an empty batch (N = 0), which used to fail to reshape the gathered statistics
        for reduction in REDUCTIONS:
            logits = distribute_tensor(torch.randn(0, CLASSES), mesh, [Shard(1)]).requires_grad_()
            target = torch.zeros(0, dtype=torch.long)
            loss = FF.cross_entropy(logits, target, reduction=reduction, label_smoothing=0.1, z_loss=1e-3,
                                    backend=backend)
            loss.sum().backward()
            hidden = torch.randn(0, HIDDEN, requires_grad=True)
            head = distribute_tensor(torch.randn(CLASSES, HIDDEN), mesh, [Shard(0)]).requires_grad_()
            linear_loss = FF.linear_cross_entropy(hidden, head, target, reduction=reduction, backend=backend)
            linear_loss.sum().backward()
            results[backend, "empty", reduction] = {
                "loss": loss.full_tensor(), "grad": logits.grad.full_tensor(), "linear_loss": linear_loss.full_tensor(),
                "grad_input": hidden.grad, "grad_weight": head.grad.full_tensor()}
    # inplace_backward on logits computed from a DTensor: their local shard is a view autograd forbids writing in
    # place (it failed in backward), so the gradient takes a buffer of its own
    for inplace in (False, True):
        logits, target, _, _ = sharded_case(mesh, CLASSES, torch.float32, {})
        FF.cross_entropy(logits * 2, target, inplace_backward=inplace).backward()
        results["inplace", inplace] = logits.grad.full_tensor()
    # float64 logits, and logits every rank holds whole: torch's own ops on the DTensor (they were refused); rows
    # that overlap (an expanded (1, V)): a gradient buffer of their own (every row's gradient was written over one)
    whole, target, _, _ = make_case(CLASSES, torch.float32, {})
    for label, logits in {"float64": distribute_tensor(whole.double(), mesh, [Shard(1)]),
                          "replicated": distribute_tensor(whole, mesh, [Replicate()])}.items():
        logits.requires_grad_()
        loss = FF.cross_entropy(logits, target, label_smoothing=0.1)
        loss.backward()
        results[label] = {"loss": loss.full_tensor(), "grad": logits.grad.full_tensor(),
                          "loss_placements": loss.placements}
    for label, dtype, placement in (("linear float64", torch.float64, Shard(0)),
                                    ("linear replicated", torch.float32, Replicate())):
        hidden, head, bias, linear_target = linear_case()
        hidden = hidden.detach().to(dtype).requires_grad_()
        head = distribute_tensor(head.to(dtype), mesh, [placement]).requires_grad_()
        bias = distribute_tensor(bias.to(dtype), mesh, [placement]).requires_grad_()
        loss = FF.linear_cross_entropy(hidden, head, linear_target, linear_bias=bias, ignore_index=IGNORE,
                                       label_smoothing=0.1)
        loss.backward()
        results[label] = {"loss": loss.full_tensor(), "grad_input": hidden.grad, "grad_weight": head.grad.full_tensor(),
                          "grad_bias": bias.grad.full_tensor()}
    row = distribute_tensor(whole[:1], mesh, [Shard(1)]).requires_grad_()
    FF.cross_entropy(row.expand(ROWS, CLASSES), target).backward()
    results["expanded"] = row.grad.full_tensor()
    # the module, and the bad inputs
    logits, target, _, _ = sharded_case(mesh, CLASSES, torch.float32, {})
    results["module"] = fused_optim.CrossEntropyLoss(label_smoothing=0.1)(logits, target).full_tensor()
    errors = {}
    for label, fn in {
        "batch-sharded logits": lambda: FF.cross_entropy(
            distribute_tensor(torch.randn(6, CLASSES), mesh, [Shard(0)]), torch.zeros(6, dtype=torch.long)),
        "probability targets": lambda: FF.cross_entropy(logits, torch.rand(ROWS, CLASSES)),
        "sharded target": lambda: FF.cross_entropy(logits, distribute_tensor(target, mesh, [Shard(0)])),
    }.items():
        try:
            fn()
        except ValueError as error:
            errors[label] = str(error)
    results["errors"] = errors
    return results


def linear_case():
    generator = torch.Generator().manual_seed(7)
    hidden = torch.randn(ROWS, HIDDEN, generator=generator).requires_grad_()
    head = torch.randn(CLASSES, HIDDEN, generator=generator) / math.sqrt(HIDDEN)
    bias = torch.randn(CLASSES, generator=generator)
    target = torch.randint(0, CLASSES, (ROWS,), generator=generator)
    target[::4] = IGNORE
    return hidden, head, bias, target


pytestmark = pytest.mark.skipif(not GLOO_AVAILABLE, reason="torch.distributed with gloo is not available")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return run_workers(work, WORLD, str(tmp_path_factory.mktemp("loss_parallel")))


@functools.cache
def unsharded(backend, num_classes, dtype, name, reduction):
    logits, target, weight, kwargs = make_case(num_classes, dtype, OPTIONS[name])
    logits.requires_grad_()
    loss, z = FF.cross_entropy(logits, target, weight, reduction=reduction, return_z_loss=True, backend=backend,
                               **kwargs)
    loss.backward(torch.linspace(0.5, 1.5, ROWS).to(dtype) if reduction == "none" else None)
    return loss.detach(), z, logits.grad


@pytest.mark.parametrize("backend, num_classes, dtype, name, reduction", CASES,
                         ids=["-".join(map(str, case)).replace("torch.", "") for case in CASES])
def test_sharded_logits_give_the_unsharded_loss_and_gradient(ranks, backend, num_classes, dtype, name, reduction):
    from torch.distributed.tensor import Replicate, Shard

    loss, z, grad = unsharded(backend, num_classes, dtype, name, reduction)
    fp32 = dtype == torch.float32
    loss_tolerance = dict(rtol=2e-6, atol=2e-6) if fp32 else dict(rtol=2**-7, atol=1e-5)
    grad_tolerance = dict(rtol=1e-6, atol=2e-7) if fp32 else dict(rtol=2**-7, atol=1e-6)
    for result in ranks:
        got = result[backend, num_classes, dtype, name, reduction]
        assert got["loss_placements"] == (Replicate(),)
        # torch 2.11 hands the logits' gradient back replicated (an all-gather in the backward, the same values)
        assert got["grad_placements"] == ((Shard(1),) if SHARDED_GRADIENTS else (Replicate(),))
        torch.testing.assert_close(got["loss"], loss, **loss_tolerance)
        torch.testing.assert_close(got["z"], z, **loss_tolerance)
        torch.testing.assert_close(got["grad"].float(), grad.float(), **grad_tolerance)
        # one all-gather in the forward; the backward only scales (torch 2.11: and gathers the gradient)
        assert got["collectives"] == (1, 0 if SHARDED_GRADIENTS else 1)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_sharded_lm_head_gives_the_unsharded_linear_loss(ranks, backend, reduction):
    from torch.distributed.tensor import Shard

    hidden, head, bias, target = linear_case()
    head.requires_grad_(), bias.requires_grad_()
    loss = FF.linear_cross_entropy(hidden, head, target, linear_bias=bias, reduction=reduction, label_smoothing=0.1,
                                   z_loss=1e-3, ignore_index=IGNORE, backend=backend)
    loss.backward(torch.linspace(0.5, 1.5, ROWS) if reduction == "none" else None)
    for result in ranks:
        got = result[backend, "linear", reduction]
        torch.testing.assert_close(got["loss"], loss.detach(), rtol=2e-6, atol=2e-6)
        for key, want in (("grad_input", hidden.grad), ("grad_weight", head.grad), ("grad_bias", bias.grad)):
            torch.testing.assert_close(got[key], want, rtol=1e-5, atol=1e-6)
        assert got["grad_weight_placements"] == (Shard(0),)
        chunks = -(-ROWS // CHUNK_ROWS) if got["chunked"] else 1
        # one all-gather per chunk of rows (again in the backward of "none", which recomputes the chunks), and
        # one all-reduce of the input's gradient
        forward, backward = got["collectives"]
        assert forward == chunks
        assert backward == (1 if reduction != "none" else chunks + 1)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_an_empty_batch_gives_the_unsharded_loss(ranks, backend, reduction):
    """N = 0: NaN for "mean", 0 for "sum", an empty loss for "none", as the unsharded loss (and torch's); zero-size
    gradients of the logits and the hidden states, a zero one of the lm head."""
    target = torch.zeros(0, dtype=torch.long)
    want = FF.cross_entropy(torch.randn(0, CLASSES), target, reduction=reduction, backend=backend)
    want_linear = FF.linear_cross_entropy(torch.randn(0, HIDDEN), torch.randn(CLASSES, HIDDEN), target,
                                          reduction=reduction, backend=backend)
    for result in ranks:
        got = result[backend, "empty", reduction]
        for key, expected in (("loss", want), ("linear_loss", want_linear)):
            assert got[key].shape == expected.shape
            torch.testing.assert_close(got[key], expected, equal_nan=True, rtol=0, atol=0)
        assert got["grad"].shape == (0, CLASSES) and got["grad_input"].shape == (0, HIDDEN)
        assert torch.equal(got["grad_weight"], torch.zeros(CLASSES, HIDDEN))


def test_default_chunks_are_as_many_on_every_rank(ranks):
    hidden, head, bias, target = linear_case()
    head.requires_grad_()
    loss = FF.linear_cross_entropy(hidden, head, target, ignore_index=IGNORE)
    loss.backward()
    for result in ranks:
        got = result["linear-default-chunks"]
        assert got["collectives"] == 2  # ceil(9 / 5) chunks, each one all-gather
        torch.testing.assert_close(got["loss"], loss.detach(), rtol=2e-6, atol=2e-6)
        for key, want in (("grad_input", hidden.grad), ("grad_weight", head.grad)):
            torch.testing.assert_close(got[key], want, rtol=1e-5, atol=1e-6)


def test_the_module_and_the_bad_inputs(ranks):
    logits, target, _, _ = make_case(CLASSES, torch.float32, {})
    want = fused_optim.CrossEntropyLoss(label_smoothing=0.1)(logits, target)
    for result in ranks:
        torch.testing.assert_close(result["module"], want, rtol=2e-6, atol=2e-6)
        errors = result["errors"]
        assert "Shard(1)" in errors["batch-sharded logits"]
        assert "class index targets" in errors["probability targets"]
        assert "must be replicated" in errors["sharded target"]


def test_inplace_backward_on_computed_logits_gives_the_same_gradient(ranks):
    for result in ranks:
        torch.testing.assert_close(result["inplace", True], result["inplace", False], rtol=0, atol=0)


@pytest.mark.parametrize("label", ["float64", "replicated"])
def test_float64_and_replicated_logits_give_torchs_loss(ranks, label):
    from torch.distributed.tensor import Replicate

    whole, target, _, _ = make_case(CLASSES, torch.float32, {})
    logits = (whole.double() if label == "float64" else whole).requires_grad_()
    want = torch.nn.functional.cross_entropy(logits, target, label_smoothing=0.1)
    want.backward()
    for result in ranks:
        got = result[label]
        torch.testing.assert_close(got["loss"], want.detach(), rtol=0, atol=0)
        torch.testing.assert_close(got["grad"], logits.grad, rtol=0, atol=0)
        assert got["loss_placements"] == (Replicate(),)  # the gradient's are what torch's ops propagate


def test_overlapping_rows_get_a_gradient_each(ranks):
    whole, target, _, _ = make_case(CLASSES, torch.float32, {})
    row = whole[:1].clone().requires_grad_()
    torch.nn.functional.cross_entropy(row.expand(ROWS, CLASSES), target).backward()
    for result in ranks:
        torch.testing.assert_close(result["expanded"], row.grad, rtol=2e-6, atol=2e-7)


@pytest.mark.parametrize("label", ["linear float64", "linear replicated"])
def test_float64_and_replicated_lm_heads_give_torchs_loss(ranks, label):
    hidden, head, bias, target = linear_case()
    dtype = torch.float64 if "float64" in label else torch.float32
    hidden, head, bias = (t.detach().to(dtype).requires_grad_() for t in (hidden, head, bias))
    want = torch.nn.functional.cross_entropy(torch.nn.functional.linear(hidden, head, bias), target,
                                             ignore_index=IGNORE, label_smoothing=0.1)
    want.backward()
    for result in ranks:
        got = result[label]
        torch.testing.assert_close(got["loss"], want.detach(), rtol=0, atol=0)
        for key, tensor in (("grad_input", hidden), ("grad_weight", head), ("grad_bias", bias)):
            torch.testing.assert_close(got[key], tensor.grad, rtol=1e-6, atol=1e-7 if dtype == torch.float32 else 1e-15)
