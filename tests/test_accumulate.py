"""fused_optim.GradAccumulator and count_tokens, used as a training loop uses them.

The central claim (docs/accumulation-notes.md): summing each micro-batch's loss and dividing the accumulated
gradient once by the total token count gives the full batch's mean gradient however uneven the micro-batches are,
while the usual mean of per-micro-batch means does not. Both are checked against one full-batch backward in
float64 on micro-batches of 1, 9 and 30 counted tokens with ignore_index targets among them.

Then the mechanics: fp32 main grads for bf16/fp16 params (`p.main_grad`; `p.grad` only for fp32 params), hook
mode (each grad freed as soon as autograd made it), `accumulate()` freeing `.grad`, `zero_()`, clipping in
`finalize()` against torch's clip_grad_norm_, params that get no grad in some micro-batches, non-contiguous params,
a grad left without `accumulate()`, a newer hooked accumulator over the same params, params passed as torch's
optimizers take them, bad arguments. Every test runs on each backend of the gradient ops (conftest.cpu_backend).
"""

from __future__ import annotations

import copy
import gc
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import DispatchedOps

import fused_optim

IGNORE = -100
CLASSES = 11
FEATURES = 8
# (counted tokens, ignored tokens) per micro-batch: very uneven, as padding and packing make them
UNEVEN = [(1, 2), (9, 0), (30, 5)]


def make_model(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(FEATURES, 12), torch.nn.Tanh(),
                               torch.nn.Linear(12, CLASSES)).to(dtype)


def make_micro_batches(sizes=UNEVEN, dtype: torch.dtype = torch.float32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Inputs and targets; each micro-batch's ignored targets are scattered among its counted ones."""
    batches = []
    for counted, ignored in sizes:
        x = torch.randn(counted + ignored, FEATURES, dtype=dtype)
        y = torch.randint(0, CLASSES, (counted + ignored,))
        y[torch.randperm(counted + ignored)[:ignored]] = IGNORE
        batches.append((x, y))
    return batches


def full_batch_mean_grads(model: torch.nn.Module, batches, dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    """The gradient of the full batch's mean loss, from one backward in `dtype`."""
    model = copy.deepcopy(model).to(dtype)
    x = torch.cat([x for x, _ in batches]).to(dtype)
    y = torch.cat([y for _, y in batches])
    F.cross_entropy(model(x), y, ignore_index=IGNORE).backward()
    return [p.grad for p in model.parameters()]


def accumulate_sums(model, acc, batches, *, call_accumulate: bool = True) -> torch.Tensor:
    """The token-count loop of the docs: a summed loss per micro-batch; returns the summed token count."""
    tokens = 0
    for x, y in batches:
        F.cross_entropy(model(x), y, ignore_index=IGNORE, reduction="sum").backward()
        if call_accumulate:
            acc.accumulate()
        tokens = tokens + fused_optim.count_tokens(y, IGNORE)
    return tokens


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours.double() - reference).norm() / reference.norm())


def assert_fp32_close(ours: list[torch.Tensor], reference: list[torch.Tensor]) -> None:
    """fp32 results against a float64 reference: a few fp32 roundings away (relative to each tensor's norm)."""
    for got, expected in zip(ours, reference):
        assert got.dtype == torch.float32
        assert relative_error(got, expected) < 1e-6


# ------------------------------------------------------------------------------------------------------------------
# the normalisation


@pytest.mark.parametrize("tokens_as", ["tensor", "int"])
def test_token_count_gives_the_full_batch_mean_gradient(cpu_backend, tokens_as):
    model, batches = make_model(), make_micro_batches()
    expected = full_batch_mean_grads(model, batches)
    acc = fused_optim.GradAccumulator(model.parameters(), backend=cpu_backend)
    tokens = accumulate_sums(model, acc, batches)
    assert tokens.dtype == torch.int64 and int(tokens) == 40
    assert acc.finalize(num_tokens=tokens if tokens_as == "tensor" else int(tokens)) is None  # no max_norm
    assert_fp32_close([p.grad for p in model.parameters()], expected)
    for p in model.parameters():  # fp32 params: the main grad is handed out as .grad, not copied
        assert p.grad is p.main_grad


def test_mean_of_micro_batch_means_is_not_the_full_batch_mean(cpu_backend):
    # the usual loop, on the same data: loss.mean() / k per micro-batch; it is far from the full-batch gradient
    model, batches = make_model(), make_micro_batches()
    expected = full_batch_mean_grads(model, batches)
    for x, y in batches:
        (F.cross_entropy(model(x), y, ignore_index=IGNORE) / len(batches)).backward()
    mean_of_means = [p.grad.clone() for p in model.parameters()]
    assert relative_error(mean_of_means[0], expected[0]) > 0.5  # 1.2 to 2.9 on five seeds
    # and the token-count loop on the very same model and data is right
    model.zero_grad()
    acc = fused_optim.GradAccumulator(model.parameters(), backend=cpu_backend)
    acc.finalize(num_tokens=accumulate_sums(model, acc, batches))
    assert_fp32_close([p.grad for p in model.parameters()], expected)


def test_count_tokens():
    target = torch.tensor([[3, IGNORE, 7], [IGNORE, IGNORE, 0]])
    count = fused_optim.count_tokens(target)
    assert count.dtype == torch.int64 and count.shape == () and int(count) == 3
    assert int(fused_optim.count_tokens(target, ignore_index=0)) == 5
    # uint8 targets, which torch's losses take: with class weights, as indices (a uint8 index is a boolean mask)
    weight = torch.tensor([0.5, 2.0, 3.0])
    for uint8_target, weight_sum in ((torch.tensor([1, 1, 1]), 6.0), (torch.tensor([2, 1]), 5.0)):
        assert float(fused_optim.count_tokens(uint8_target.to(torch.uint8), weight=weight)) == weight_sum


def test_count_tokens_counts_uint8_class_156_and_sums_16_bit_weights_in_fp32():
    """-100 is 156 as a uint8, and the tokens' 16-bit weights add up past what fp16 holds (70,000 ones: inf, and a
    finalize that zeroed every grad) or bf16 counts exactly (1001 ones: 1000)."""
    uint8_target = torch.tensor([156, 3, 200], dtype=torch.uint8)
    assert int(fused_optim.count_tokens(uint8_target)) == 3
    assert float(fused_optim.count_tokens(uint8_target, weight=torch.ones(256))) == 3.0
    for dtype, tokens in ((torch.float16, 70000), (torch.bfloat16, 1001)):
        count = fused_optim.count_tokens(torch.zeros(tokens, dtype=torch.int64), weight=torch.ones(4, dtype=dtype))
        assert count.dtype == torch.float32 and float(count) == tokens


def test_count_tokens_is_what_torchs_mean_divides_by():
    """A loss summed with reduction="sum", over count_tokens, is torch's reduction="mean" loss: class-index targets
    with and without class weights (the weighted mean divides by the kept targets' weights), probability targets
    (their rows), and (N, C, d) shapes."""
    logits = torch.randn(4, 5, 3)
    index_target = torch.randint(0, 5, (4, 3))
    index_target[0, 1] = IGNORE
    weight = torch.rand(5) + 0.5
    probability_target = torch.randn(4, 5, 3).softmax(dim=1)
    for target, kwargs in ((index_target, {}), (index_target, {"weight": weight}), (probability_target, {}),
                           (probability_target[..., 0], {})):
        x = logits[..., 0] if target.dim() == 2 and target.is_floating_point() else logits
        ignore = {} if target.is_floating_point() else {"ignore_index": IGNORE}
        summed = torch.nn.functional.cross_entropy(x, target, reduction="sum", **ignore, **kwargs)
        mean = torch.nn.functional.cross_entropy(x, target, **ignore, **kwargs)
        torch.testing.assert_close(summed / fused_optim.count_tokens(target, IGNORE, **kwargs), mean)


def test_finalize_with_a_device_count_reads_nothing_on_the_host(cpu_backend):
    model, batches = make_model(), make_micro_batches()
    acc = fused_optim.GradAccumulator(model.parameters(), backend=cpu_backend)
    tokens = accumulate_sums(model, acc, batches)
    with DispatchedOps() as ops:
        acc.finalize(num_tokens=tokens, max_norm=0.5)
    assert "aten::_local_scalar_dense" not in ops.names


def test_without_a_count_the_grads_stay_sums(cpu_backend):
    model, batches = make_model(), make_micro_batches()
    expected = [g * 40 for g in full_batch_mean_grads(model, batches)]
    acc = fused_optim.GradAccumulator(model.parameters(), backend=cpu_backend)
    accumulate_sums(model, acc, batches)
    acc.finalize()
    assert_fp32_close([p.grad for p in model.parameters()], expected)


# ------------------------------------------------------------------------------------------------------------------
# low-precision params: fp32 main grads


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("use_hooks", [False, True], ids=["accumulate", "hooks"])
def test_low_precision_params_get_fp32_main_grads(cpu_backend, dtype, use_hooks):
    model = make_model(dtype)
    temperature = torch.nn.Parameter(torch.tensor([1.3]))  # one fp32 param among the low-precision ones
    params = [*model.parameters(), temperature]
    batches = make_micro_batches([(5, 1), (7, 2), (3, 0), (6, 3)], dtype)
    seen: list[dict[int, torch.Tensor]] = []  # each micro-batch's grads as autograd made them, by param
    # registered before the accumulator's hooks, so they run first and still see the grad
    hooks = [p.register_post_accumulate_grad_hook(lambda p: seen[-1].__setitem__(id(p), p.grad.clone()))
             for p in params] if use_hooks else []
    acc = fused_optim.GradAccumulator(params, backend=cpu_backend, use_hooks=use_hooks)
    tokens = 0
    for x, y in batches:
        seen.append({})
        F.cross_entropy(model(x).float() * temperature, y, ignore_index=IGNORE, reduction="sum").backward()
        if use_hooks:
            assert all(p.grad is None for p in params)
        else:
            seen[-1] = {id(p): p.grad.clone() for p in params}
            acc.accumulate()
        tokens = tokens + fused_optim.count_tokens(y, IGNORE)
    for hook in hooks:
        hook.remove()
    acc.finalize(num_tokens=tokens)
    for p in params:
        micro_grads = [grads[id(p)] for grads in seen]
        assert all(g.dtype == p.dtype for g in micro_grads)
        expected = torch.stack([g.double() for g in micro_grads]).sum(0) / int(tokens)
        assert p.main_grad.dtype == torch.float32 and p.main_grad.shape == p.shape
        assert relative_error(p.main_grad, expected) < 1e-6
        if p.dtype == torch.float32:
            assert p.grad is p.main_grad
        else:
            assert p.grad is None  # never rounded to the param's dtype
            # what autograd's own accumulation in the param's dtype would give is worse
            in_param_dtype = micro_grads[0].clone()
            for g in micro_grads[1:]:
                in_param_dtype += g
            assert relative_error(in_param_dtype / int(tokens), expected) > relative_error(p.main_grad, expected)


def test_fused_optimizer_steps_bf16_params_from_the_main_grads(cpu_backend):
    # fused_optim.AdamW reads p.main_grad: the same step as an fp32 AdamW given those grads, rounded once to bf16
    model = make_model(torch.bfloat16)
    master = copy.deepcopy(model).float()
    acc = fused_optim.GradAccumulator(model.parameters(), backend=cpu_backend)
    acc.finalize(num_tokens=accumulate_sums(model, acc, make_micro_batches(dtype=torch.bfloat16)))
    for p, q in zip(model.parameters(), master.parameters()):
        q.grad = p.main_grad.clone()
    fused_optim.AdamW(model.parameters(), lr=0.01, backend="torch").step()
    torch.optim.AdamW(master.parameters(), lr=0.01).step()
    for p, q in zip(model.parameters(), master.parameters()):
        torch.testing.assert_close(p, q.to(torch.bfloat16), rtol=2**-8, atol=0)


# ------------------------------------------------------------------------------------------------------------------
# hooks, freeing, zeroing


def test_hook_mode_frees_each_grad_and_matches_accumulate(cpu_backend):
    batches = make_micro_batches()
    model = make_model()
    twin = copy.deepcopy(model)
    hooked = fused_optim.GradAccumulator(model.parameters(), backend=cpu_backend, use_hooks=True)
    alive: list[int] = []  # how many .grad exist when each hook has run
    params = list(model.parameters())
    watchers = [p.register_post_accumulate_grad_hook(lambda p: alive.append(sum(q.grad is not None for q in params)))
                for p in params]
    tokens = 0
    for x, y in batches:
        F.cross_entropy(model(x), y, ignore_index=IGNORE, reduction="sum").backward()
        assert all(p.grad is None for p in params)
        hooked.accumulate()  # nothing to do
        tokens = tokens + fused_optim.count_tokens(y, IGNORE)
    # the accumulator's hook runs first (registered first) and frees the grad before the next param's arrives
    assert alive and max(alive) == 0
    for watcher in watchers:
        watcher.remove()
    hooked.finalize(num_tokens=tokens)

    plain = fused_optim.GradAccumulator(twin.parameters(), backend=cpu_backend)
    plain.finalize(num_tokens=accumulate_sums(twin, plain, batches))
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p.grad, q.grad)


def test_accumulate_frees_the_grads(cpu_backend):
    model, (batch, *_) = make_model(), make_micro_batches()
    acc = fused_optim.GradAccumulator(model.parameters(), backend=cpu_backend)
    F.cross_entropy(model(batch[0]), batch[1], ignore_index=IGNORE, reduction="sum").backward()
    grads = [p.grad.clone() for p in model.parameters()]
    acc.accumulate()
    assert all(p.grad is None for p in model.parameters())
    assert all(not hasattr(p, "main_grad") or p.main_grad is None for p in model.parameters())  # not before finalize
    for main_grad, grad in zip(acc.main_grads, grads):
        assert torch.equal(main_grad, grad)
    acc.accumulate()  # nothing new: changes nothing
    for main_grad, grad in zip(acc.main_grads, grads):
        assert torch.equal(main_grad, grad)


def test_zero_starts_the_next_step_afresh(cpu_backend):
    model, batches = make_model(), make_micro_batches()
    acc = fused_optim.GradAccumulator(model.parameters(), backend=cpu_backend)
    acc.finalize(num_tokens=accumulate_sums(model, acc, batches))
    first = [p.grad.clone() for p in model.parameters()]
    acc.zero_()
    for p in model.parameters():
        assert p.grad is None and getattr(p, "main_grad", None) is None
    assert all(float(flat.abs().max()) == 0 for flat in acc.flat_grads.values())
    acc.finalize(num_tokens=accumulate_sums(model, acc, batches))  # same data again: the same result, no leftover
    for p, expected in zip(model.parameters(), first):
        assert torch.equal(p.grad, expected)


def test_a_param_without_a_grad_in_a_later_step_is_left_alone(cpu_backend):
    """zero_() starts a new step: a param that had a grad in the last step and none in this one (an unused branch,
    an expert no token reached) gets no main grad from finalize(), so the optimizer leaves it where it is, as
    torch's leaves a param whose grad is None (weight decay would move it)."""
    used, unused = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    params = [*used.parameters(), *unused.parameters()]
    opt = fused_optim.AdamW(params, lr=0.1, weight_decay=0.1)
    acc = fused_optim.GradAccumulator(params, backend=cpu_backend)
    x = torch.randn(8, 4)
    (used(x) + unused(x)).sum().backward()
    acc.accumulate()
    acc.finalize()
    opt.step()
    opt.zero_grad()
    acc.zero_()
    before = [p.detach().clone() for p in unused.parameters()]
    used(x).sum().backward()
    acc.accumulate()
    acc.finalize()
    assert all(getattr(p, "main_grad", None) is None for p in unused.parameters())
    opt.step()
    assert all(torch.equal(p, q) for p, q in zip(unused.parameters(), before))


def test_zero_after_the_optimizer_zeroed_its_grads(cpu_backend):
    model, batches = make_model(), make_micro_batches()
    acc = fused_optim.GradAccumulator(model.parameters(), backend=cpu_backend)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    acc.finalize(num_tokens=accumulate_sums(model, acc, batches))
    opt.step()
    opt.zero_grad()
    acc.zero_()
    assert all(p.grad is None and p.main_grad is None for p in model.parameters())


def test_remove_hooks(cpu_backend):
    model, (batch, *_) = make_model(), make_micro_batches()
    acc = fused_optim.GradAccumulator(model.parameters(), backend=cpu_backend, use_hooks=True)
    acc.remove_hooks()
    F.cross_entropy(model(batch[0]), batch[1], ignore_index=IGNORE, reduction="sum").backward()
    assert all(p.grad is not None for p in model.parameters())  # autograd's grads stay
    assert all(float(flat.abs().max()) == 0 for flat in acc.flat_grads.values())
    grads = [p.grad.clone() for p in model.parameters()]
    acc.accumulate()  # the explicit call still works
    for main_grad, grad in zip(acc.main_grads, grads):
        assert torch.equal(main_grad, grad)


# ------------------------------------------------------------------------------------------------------------------
# clipping in finalize


@pytest.mark.parametrize("norm_type", [2.0, 1.0, float("inf")], ids=["l2", "l1", "inf"])
@pytest.mark.parametrize("max_norm", [0.05, 1e4], ids=["clips", "no-clip"])
def test_finalize_clips_as_torch_on_the_full_batch(cpu_backend, norm_type, max_norm):
    model, batches = make_model(), make_micro_batches()
    full = copy.deepcopy(model)
    x, y = torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])
    F.cross_entropy(full(x), y, ignore_index=IGNORE).backward()
    torch_norm = torch.nn.utils.clip_grad_norm_(full.parameters(), max_norm, norm_type)

    acc = fused_optim.GradAccumulator(model.parameters(), backend=cpu_backend)
    norm = acc.finalize(num_tokens=accumulate_sums(model, acc, batches), max_norm=max_norm, norm_type=norm_type)
    assert norm.dtype == torch.float32 and norm.shape == ()
    torch.testing.assert_close(norm, torch_norm, rtol=1e-5, atol=0)
    assert (max_norm < float(torch_norm)) == (max_norm == 0.05)  # the two cases are what they say
    for p, q in zip(model.parameters(), full.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-8)
    if max_norm < float(torch_norm):
        clipped = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in model.parameters()]), norm_type)
        # max_norm / (norm + 1e-6): a little under max_norm, as torch's
        expected_clipped = max_norm * float(torch_norm) / (float(torch_norm) + 1e-6)
        torch.testing.assert_close(clipped, torch.tensor(expected_clipped), rtol=1e-5, atol=0)


def test_finalize_of_no_params():
    acc = fused_optim.GradAccumulator([], backend="torch")
    assert acc.finalize(num_tokens=3) is None
    norm = acc.finalize(num_tokens=3, max_norm=1.0)
    assert torch.equal(norm, torch.tensor(0.0))


# ------------------------------------------------------------------------------------------------------------------
# which params, which layouts


@pytest.mark.parametrize("method", ["accumulate", "finalize", "release"])
def test_a_param_unfrozen_after_the_accumulator_was_made_is_refused(method):
    """A param left out as frozen would keep the micro-batches' summed grad, never divided by the token count, and
    be stepped from it: once it has a grad, the accumulator says so in one sentence (make a new one)."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    model[0].requires_grad_(False)
    acc = fused_optim.GradAccumulator(model.parameters(), backend="cpu")
    model(torch.randn(5, 4)).sum().backward()
    acc.accumulate()  # still frozen: fine
    model[0].requires_grad_(True)  # gradual unfreezing
    model(torch.randn(5, 4)).sum().backward()
    call = {"accumulate": lambda: acc.accumulate(), "finalize": lambda: acc.finalize(num_tokens=10),
            "release": lambda: acc.release(num_tokens=10)}[method]
    with pytest.raises(RuntimeError, match=rf"^GradAccumulator.{method}\(\): a param that did not require grad .* "
                                           "make a new GradAccumulator after unfreezing params"):
        call()
    fresh = fused_optim.GradAccumulator(model.parameters(), backend="cpu")
    fresh.accumulate()
    fresh.finalize(num_tokens=10)
    assert all(p.main_grad is not None for p in model.parameters())


def test_params_without_a_grad_in_some_micro_batches(cpu_backend):
    head_a, head_b, frozen = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    unused = torch.nn.Parameter(torch.randn(5))
    frozen.requires_grad_(False)
    ref_a, ref_b = copy.deepcopy(head_a), copy.deepcopy(head_b)
    params = [*head_a.parameters(), *head_b.parameters(), *frozen.parameters(), unused]
    acc = fused_optim.GradAccumulator(params, backend=cpu_backend)
    assert len(acc.params) == 4 + 1  # frozen params are left out
    xs = [torch.randn(6, 4) for _ in range(3)]
    (head_a(xs[0]) + frozen(xs[0])).square().sum().backward()  # head_b gets nothing
    acc.accumulate()
    head_b(xs[1]).square().sum().backward()  # head_a gets nothing
    acc.accumulate()
    head_a(xs[2]).square().sum().backward()
    acc.accumulate()
    acc.finalize(num_tokens=4)

    (ref_a(xs[0]) + frozen(xs[0])).square().sum().backward()
    ref_b(xs[1]).square().sum().backward()
    ref_a(xs[2]).square().sum().backward()
    for p, q in zip([*head_a.parameters(), *head_b.parameters()], [*ref_a.parameters(), *ref_b.parameters()]):
        torch.testing.assert_close(p.grad, q.grad / 4, rtol=1e-6, atol=1e-7)
    # as torch leaves them: no grad for params no micro-batch reached
    assert unused.grad is None and getattr(unused, "main_grad", None) is None
    assert all(p.grad is None for p in frozen.parameters())


def test_tied_params_are_accumulated_once(cpu_backend):
    weight = torch.nn.Parameter(torch.randn(3, 4))
    acc = fused_optim.GradAccumulator([{"params": [weight]}, {"params": [weight]}], backend=cpu_backend)
    assert acc.params == [weight]
    x = torch.randn(5, 4)
    (x @ weight.t()).square().sum().backward()
    expected = weight.grad.clone()
    acc.accumulate()
    acc.finalize()
    assert torch.equal(weight.grad, expected)


def test_non_contiguous_params(cpu_backend):
    transposed = torch.nn.Parameter(torch.randn(7, 5).t())  # dense, not contiguous
    channels_last = torch.nn.Parameter(torch.randn(3, 4, 2, 3).to(memory_format=torch.channels_last))
    strided = torch.randn(6, 10)[:, ::2].detach().requires_grad_()  # not dense: a gappy view as a leaf
    params = [transposed, channels_last, strided]
    acc = fused_optim.GradAccumulator(params, backend=cpu_backend)
    for p, main_grad in zip(params[:2], acc.main_grads[:2]):
        assert main_grad.stride() == p.stride()  # the param's layout, so the grads walk flat with it
    for main_grad in acc.main_grads:
        assert main_grad.data_ptr() % 64 == 0
    expected = [torch.zeros(p.shape, dtype=torch.float64) for p in params]
    for _ in range(3):
        weights = [torch.randn(p.shape) for p in params]
        sum((p * w).sin().sum() for p, w in zip(params, weights)).backward()
        for e, p in zip(expected, params):
            e += p.grad.double()
        acc.accumulate()
    acc.finalize(num_tokens=torch.tensor(3))
    for e, p in zip(expected, params):
        assert p.grad.shape == p.shape
        torch.testing.assert_close(p.grad.double(), e / 3, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_odd_sizes(cpu_backend, dtype):
    shapes = [(0,), (1,), (3,), (1023,), (4097,), (0, 3), (5, 7)]
    params = [torch.nn.Parameter(torch.randn(shape, dtype=dtype)) for shape in shapes]
    acc = fused_optim.GradAccumulator(params, backend=cpu_backend)
    expected = [torch.zeros(shape, dtype=torch.float64) for shape in shapes]
    for _ in range(3):
        weights = [torch.randn(shape, dtype=dtype) for shape in shapes]
        sum((p * w).sum() for p, w in zip(params, weights)).backward()
        for e, w in zip(expected, weights):
            e += w.double()
        acc.accumulate()
    norm = acc.finalize(num_tokens=3, max_norm=1e9)
    true_norm = float(torch.linalg.vector_norm(torch.cat([e.flatten() for e in expected]))) / 3
    assert math.isclose(float(norm), true_norm, rel_tol=1e-6)
    for e, p in zip(expected, params):
        assert p.main_grad.shape == p.shape
        torch.testing.assert_close(p.main_grad.double(), e / 3, rtol=1e-6, atol=1e-7)
    # the alignment padding between main grads stays zero (else it would count in the next norm)
    (flat,) = acc.flat_grads.values()
    assert float(flat.abs().sum()) == pytest.approx(sum(float(e.abs().sum()) / 3 for e in expected), rel=1e-6)


# ------------------------------------------------------------------------------------------------------------------
# bad arguments


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_main_grads_other_than_float32_are_refused(dtype):
    with pytest.raises(TypeError, match="float32"):
        fused_optim.GradAccumulator(make_model().parameters(), dtype=dtype)


def test_params_of_other_dtypes_are_refused():
    with pytest.raises(TypeError, match="float64"):
        fused_optim.GradAccumulator(make_model(torch.float64).parameters(), backend="torch")


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="backend"):
        fused_optim.GradAccumulator(make_model().parameters(), backend="gpu")


@pytest.mark.parametrize("use_hooks", [False, True])
def test_a_sparse_grad_is_refused_in_one_sentence_before_any_sum(use_hooks):
    embedding = torch.nn.Embedding(5, 3, sparse=True)
    acc = fused_optim.GradAccumulator(embedding.parameters(), use_hooks=use_hooks)
    with pytest.raises(RuntimeError, match=r"sparse grads \(nn.Embedding\(sparse=True\)\) are not supported"):
        embedding(torch.tensor([1, 3])).sum().backward()
        acc.accumulate()
    assert float(acc.main_grads[0].abs().max()) == 0


def test_params_as_torchs_optimizers_take_them():
    """A bare tensor is refused as torch's optimizers refuse it (iterated, it gave rows that never get a grad); a
    group's params may be one tensor, and named params count by their param; a non-leaf tensor is refused."""
    model = make_model()
    with pytest.raises(TypeError, match="params should be an iterable of Tensors or dicts, but got torch.FloatTensor"):
        fused_optim.GradAccumulator(model[0].weight)
    with pytest.raises(ValueError, match="non-leaf"):
        fused_optim.GradAccumulator([model[0].weight * 2])
    with pytest.raises(TypeError, match="params must be Tensors, not str"):
        fused_optim.GradAccumulator(["weight"])
    params = list(model.parameters())
    for given in (model.named_parameters(), [{"params": p} for p in params],
                  [{"params": list(model.named_parameters())}]):
        assert fused_optim.GradAccumulator(given).params == params


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(num_tokens=np.int64(0)), ValueError, "positive number of tokens, got 0"),
    (dict(num_tokens=True), TypeError, "num_tokens must be a number or a tensor, not bool"),
    (dict(num_tokens="5"), TypeError, "num_tokens must be a number or a tensor, not str"),
    (dict(num_tokens=torch.tensor([3, 4])), ValueError, r"one count, got a tensor of shape \(2,\)"),
    (dict(num_tokens=4, max_norm="1"), TypeError, "max_norm must be a number, not str"),
    (dict(num_tokens=4, max_norm=1.0, norm_type="2"), TypeError, "norm_type must be a number, not str"),
    (dict(num_tokens=4, max_norm=1.0, norm_type=0.0), ValueError, "norm_type must be positive or inf, got 0.0"),
    (dict(num_tokens=4, max_norm=1.0, norm_type=float("nan")), ValueError, "norm_type must be positive or inf"),
    (dict(num_tokens=10**400), ValueError, "positive number of tokens, got 1000"),
], ids=["numpy-zero", "bool", "str", "two-counts", "str-max-norm", "str-norm-type", "zero-norm-type",
        "nan-norm-type", "int-past-float"])
def test_finalize_refuses_bad_arguments_in_one_sentence_changing_nothing(kwargs, error, message):
    param = torch.nn.Parameter(torch.randn(3))
    acc = fused_optim.GradAccumulator([param])
    param.grad = torch.ones(3)
    acc.accumulate()
    param.grad = torch.full((3,), 2.0)  # left for finalize to take: still left after the refusal
    with pytest.raises(error, match=message):
        acc.finalize(**kwargs)
    assert torch.equal(acc.main_grads[0], torch.ones(3)) and torch.equal(param.grad, torch.full((3,), 2.0))
    if "num_tokens" in kwargs and "max_norm" not in kwargs:
        with pytest.raises(error, match=message):
            acc.release(kwargs["num_tokens"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_finalize_takes_a_grad_the_last_backward_left(cpu_backend, dtype):
    """The last micro-batch's accumulate() forgotten: finalize adds its grad (it was dropped, or, for an fp32
    param, written over by the main grad)."""
    model = make_model(dtype)
    batches = make_micro_batches(dtype=dtype)
    results = []
    for forget_last in (False, True):
        twin_model = copy.deepcopy(model)
        acc = fused_optim.GradAccumulator(twin_model.parameters(), backend=cpu_backend)
        tokens = 0
        for index, (x, y) in enumerate(batches):
            F.cross_entropy(twin_model(x), y, ignore_index=IGNORE, reduction="sum").backward()
            if not (forget_last and index == len(batches) - 1):
                acc.accumulate()
            tokens = tokens + fused_optim.count_tokens(y, IGNORE)
        acc.finalize(num_tokens=tokens)
        results.append([p.main_grad.clone() for p in twin_model.parameters()])
    for remembered, forgotten in zip(*results):
        assert torch.equal(remembered, forgotten)


def test_count_tokens_refuses_what_is_no_target():
    with pytest.raises(TypeError, match="target must be a Tensor, not list"):
        fused_optim.count_tokens([1, 2])
    with pytest.raises(TypeError, match="ignore_index must be an int, not NoneType"):
        fused_optim.count_tokens(torch.tensor([1, 2]), ignore_index=None)
    with pytest.raises(TypeError, match="ignore_index must be an int, not bool"):
        fused_optim.count_tokens(torch.tensor([1, 2]), ignore_index=True)


def test_a_newer_hooked_accumulator_takes_the_grads():
    """Two live accumulators with hooks over the same params: the newer takes each grad (the older one's hook ran
    first, took the grad and freed it, and the newer got zeros)."""
    model = make_model()
    older = fused_optim.GradAccumulator(model.parameters(), use_hooks=True)
    newer = fused_optim.GradAccumulator(model.parameters(), use_hooks=True)
    x, y = make_micro_batches()[1]
    F.cross_entropy(model(x), y, ignore_index=IGNORE, reduction="sum").backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(g.abs().sum() > 0 for g in newer.main_grads)
    assert all(not g.any() for g in older.main_grads)


def test_a_hooked_accumulator_takes_the_grads_again_once_a_newer_one_is_gone():
    """A short-lived second accumulator over the same params (a helper's, say): once it is collected, the first
    one's hooks take the grads again (they were left in .grad, summed in the params' dtype)."""
    model = make_model()
    older = fused_optim.GradAccumulator(model.parameters(), use_hooks=True)
    fused_optim.GradAccumulator(model.parameters(), use_hooks=True)  # collected at once
    gc.collect()
    x, y = make_micro_batches()[1]
    F.cross_entropy(model(x), y, ignore_index=IGNORE, reduction="sum").backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(g.abs().sum() > 0 for g in older.main_grads)


def test_a_python_count_over_an_int64_finalizes_as_a_float():
    param = torch.nn.Parameter(torch.randn(3))
    acc = fused_optim.GradAccumulator([param])
    param.grad = torch.full((3,), 2.0**64)
    acc.finalize(num_tokens=2**64)
    assert torch.equal(param.grad, torch.ones(3))


def test_a_python_count_past_fp32s_integers_divides_exactly():
    """A Python count is made an fp64 tensor on the device (a fill, no copy from the host, which on a GPU waited for
    the copy): 2^24 + 1 stays itself, where an fp32 tensor rounded it to 2^24."""
    param = torch.nn.Parameter(torch.randn(3))
    acc = fused_optim.GradAccumulator([param])
    param.grad = torch.full((3,), 3.0)
    acc.finalize(num_tokens=2**24 + 1)
    expected = 3.0 * torch.tensor(1 / (2**24 + 1), dtype=torch.float64).float()
    assert torch.equal(param.grad, expected.expand(3))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["cuda", "triton", "torch"])
def test_finalize_with_a_python_count_makes_no_host_sync(backend):
    model = make_model().cuda()
    acc = fused_optim.GradAccumulator(model.parameters(), backend=backend)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    acc.accumulate()
    acc.finalize(num_tokens=4096, max_norm=1.0)  # warm-up: kernels load
    acc.zero_()
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    acc.accumulate()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        acc.finalize(num_tokens=4096, max_norm=1.0)
    finally:
        torch.cuda.set_sync_debug_mode("default")
