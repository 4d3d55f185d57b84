"""GradAccumulator under torch.distributed: two gloo processes on the CPU, a DDP model, and ranks whose micro-batches
hold different numbers of tokens (rank 0: three micro-batches of 1, 9 and 30 counted tokens; rank 1: two of 4 and
17), with ignore_index targets among them.

Two loops, as docs/accumulation-notes.md describes them:
- A: DDP's usual pattern, `no_sync()` on all micro-batches but the last, `accumulate()` after each backward. DDP
  replaces the last micro-batch's grads by their mean over the ranks; `finalize()` sums over the ranks again.
- B: hook mode (`use_hooks=True`), every micro-batch under `no_sync()`: `finalize()` does the only all-reduce.
  And hook mode with the last micro-batch synced (the docs allow a synced last one): the accumulator's hook frees
  each grad as autograd makes it, before DDP's reducer reads it; the result must still be B's.
Both must leave on every rank the gradient of the global batch's mean loss (one float64 backward over all ranks'
data, here), identical on the two ranks, with the token count all-reduced to the global count; and clipping in
`finalize()` must use the global norm.

The workers run once per module (spawned, ~10 s) for every backend that runs here; the tests read their results.
"""

from __future__ import annotations

import contextlib
import functools

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from conftest import TRITON_INTERPRETED
from spawn import GLOO_AVAILABLE, run_workers
from token_batches import IGNORE, classifier, rank_micro_batches

import fused_optim

WORLD = 2
# (counted, ignored) tokens of each micro-batch, per rank: different counts and different numbers of micro-batches
RANK_BATCHES = [[(1, 2), (9, 0), (30, 5)], [(4, 1), (17, 3)]]
GLOBAL_TOKENS = sum(counted for batches in RANK_BATCHES for counted, _ in batches)
MAX_NORM = 0.05  # below the gradient's norm: finalize clips
PATTERNS = ("no-sync-then-sync", "hooks", "hooks-then-sync")
BACKENDS = ("cpu", "torch") + (("triton",) if TRITON_INTERPRETED else ())

pytestmark = pytest.mark.skipif(not GLOO_AVAILABLE, reason="torch.distributed with gloo is not available")


def run_pattern(rank: int, pattern: str, backend: str) -> dict:
    """One accumulation step on this rank; returns its finalized grads, norm and the counts all-reduced."""
    model = torch.nn.parallel.DistributedDataParallel(classifier())
    acc = fused_optim.GradAccumulator(model.parameters(), backend=backend, use_hooks=pattern.startswith("hooks"))
    mine = rank_micro_batches(RANK_BATCHES)[rank]
    tokens = torch.zeros((), dtype=torch.int64)
    for i, (x, y) in enumerate(mine):
        synced = pattern.endswith("then-sync") and i == len(mine) - 1
        with contextlib.nullcontext() if synced else model.no_sync():
            F.cross_entropy(model(x), y, ignore_index=IGNORE, reduction="sum").backward()
        acc.accumulate()
        tokens += fused_optim.count_tokens(y, IGNORE)

    reduced_counts = []  # what finalize all-reduces besides the grads: the token count
    all_reduce = dist.all_reduce

    def recording_all_reduce(tensor, *args, **kwargs):
        result = all_reduce(tensor, *args, **kwargs)
        if tensor.dim() == 0:
            reduced_counts.append(float(tensor))
        return result

    dist.all_reduce = recording_all_reduce
    try:
        norm = acc.finalize(num_tokens=tokens, max_norm=MAX_NORM)
    finally:
        dist.all_reduce = all_reduce
    return {"grads": [p.grad.clone() for p in model.module.parameters()], "norm": norm.clone(),
            "local_tokens": int(tokens), "reduced_counts": reduced_counts}


def refused_release() -> str:
    """What constructing a gradient_release optimizer over a DDP model's params says: its hooks would step each
    param with its local grad, before DDP's all-reduce."""
    model = torch.nn.parallel.DistributedDataParallel(classifier())
    try:
        fused_optim.SGD(model.parameters(), lr=0.1, gradient_release=True)
    except RuntimeError as error:
        hooks = sum(len(p._post_accumulate_grad_hooks or {}) for p in model.parameters())
        return f"{error} (hooks left: {hooks})"
    return "accepted"


def ddp_replicas(rank: int) -> dict:
    """DDP with each rank's torch seeded differently (as scripts do for dropout and data): the modes that round
    stochastically must still round alike on every rank, so that the replicas stay equal."""
    results = {}
    for mode, options in {"int8 moments": dict(moments="int8"), "bf16 moments": dict(moments="bf16")}.items():
        model = torch.nn.parallel.DistributedDataParallel(classifier())
        torch.manual_seed(1234 + rank)
        opt = fused_optim.AdamW(model.parameters(), lr=1e-2, **options)
        for x, y in rank_micro_batches(RANK_BATCHES)[rank][:2]:  # as many steps on each rank
            F.cross_entropy(model(x), y, ignore_index=IGNORE).backward()
            opt.step()
            opt.zero_grad()
        results[mode] = [p.detach().clone() for p in model.parameters()]
    return results


def a_rank_without_tokens(rank: int) -> list[float]:
    """Rank 1's Python token count is 0 (all its targets ignored): a count, which the ranks' sum divides, and rank
    0's 4 tokens alone make the mean (was: rank 1 raised and rank 0 hung in the all-reduce)."""
    param = torch.nn.Parameter(torch.zeros(2))
    acc = fused_optim.GradAccumulator([param])
    param.grad = torch.full((2,), 8.0 if rank == 0 else 0.0)
    acc.finalize(num_tokens=4 if rank == 0 else 0)
    return param.grad.tolist()


def work(rank: int, world: int, backends: tuple[str, ...]) -> dict:
    results = {(backend, pattern): run_pattern(rank, pattern, backend) for backend in backends for pattern in PATTERNS}
    results["no tokens"] = a_rank_without_tokens(rank)
    results["release"] = refused_release()
    results["replicas"] = ddp_replicas(rank)
    return results


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict]:
    """Each rank's results, from one spawn of the two workers for every backend that runs here."""
    return run_workers(functools.partial(work, backends=BACKENDS), WORLD, str(tmp_path_factory.mktemp("distributed")))


def global_mean_grads_clipped() -> tuple[list[torch.Tensor], float]:
    """The global batch's mean-loss gradient in float64 from one backward over every rank's data, its norm, and
    that gradient clipped to MAX_NORM."""
    model = classifier().double()
    data = [batch for rank_data in rank_micro_batches(RANK_BATCHES) for batch in rank_data]
    x = torch.cat([x for x, _ in data]).double()
    y = torch.cat([y for _, y in data])
    F.cross_entropy(model(x), y, ignore_index=IGNORE).backward()
    norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM))
    return [p.grad for p in model.parameters()], norm


@pytest.mark.parametrize("pattern", PATTERNS)
def test_every_rank_gets_the_global_mean_gradient(results, cpu_backend, pattern):
    expected, expected_norm = global_mean_grads_clipped()
    assert expected_norm > MAX_NORM  # clipping happened
    rank_results = [results[rank][(cpu_backend, pattern)] for rank in range(WORLD)]
    for result in rank_results:
        assert abs(float(result["norm"]) - expected_norm) <= 1e-6 * expected_norm
        for got, want in zip(result["grads"], expected):
            assert got.dtype == torch.float32
            assert float((got.double() - want).norm() / want.norm()) < 1e-6
    for got0, got1 in zip(rank_results[0]["grads"], rank_results[1]["grads"]):
        assert torch.equal(got0, got1)  # an all-reduce gives every rank the same bits


@pytest.mark.parametrize("pattern", PATTERNS)
def test_the_token_count_is_all_reduced(results, cpu_backend, pattern):
    for rank in range(WORLD):
        result = results[rank][(cpu_backend, pattern)]
        assert result["local_tokens"] == sum(counted for counted, _ in RANK_BATCHES[rank])
        assert result["reduced_counts"] == [GLOBAL_TOKENS]


def test_the_ranks_token_counts_do_differ():
    # what makes a per-rank mean (DDP's ÷ world size) wrong here
    local = [sum(counted for counted, _ in batches) for batches in RANK_BATCHES]
    assert local[0] != local[1]


def test_a_rank_may_count_no_tokens(results):
    assert [rank_results["no tokens"] for rank_results in results] == [[2.0, 2.0]] * WORLD


def test_gradient_release_is_refused_across_processes(results):
    for rank_results in results:
        assert rank_results["release"] == (
            "SGD: gradient_release=True is single-process only: it steps each param with its local grad inside "
            "backward, before DDP (or any all-reduce) could average it over the ranks (hooks left: 0)")


def test_ddp_replicas_round_alike_whatever_each_ranks_torch_seed(results):
    for mode, params in results[0]["replicas"].items():
        assert all(torch.equal(a, b) for a, b in zip(params, results[1]["replicas"][mode])), mode
