"""FSDP2 AdamW step benchmark: the optimizer step of a model sharded with `fully_shard`, ours against torch's fused
AdamW on the same mesh, with and without gradient clipping, in spawned ranks (gloo on the CPU, 2 ranks by default;
NCCL on GPUs, one rank per GPU).

  fsdp_adamw       `fused_optim.AdamW(...).step()` vs `torch.optim.AdamW(fused=True).step()` (and foreach=True)
  fsdp_clip_adamw  `fused_optim.AdamW(..., max_grad_norm=1.0).step()` (one norm pass and one all-reduce over the
                   mesh, folded into the update) vs `torch.nn.utils.clip_grad_norm_(params, 1.0)` + torch's fused
                   step

Workload: a stack of Linear(2048, 2048) layers (~4.2 M params each; 12 of them for the default 50 M), each sharded by
`fully_shard` and the stack too, fp32 params and grads (the grads set as DTensors like their params, no backward:
only the step is timed). Each rank runs one CPU thread per core it has (cores / ranks).

What is timed: one step on every rank, between two barriers (the slowest rank's time); the median over repeats.
Beside the time, each row counts the collectives one step issues (all-reduce, all-gather, reduce-scatter, functional
or c10d): ours 0 without clipping and 1 with it, whatever the number of tensors.

Bytes model: all ranks' shards together (on the CPU they share this machine's memory): AdamW fp32 28 B/param, with
clipping 32 B/param (the grads read twice).

Correctness, before timing: every implementation takes two steps from the same params and grads, and its params are
compared with torch's fused AdamW's (the for-loop's where torch has no fused AdamW) within `TOLERANCES`; a wrong one
is not timed.
"""

from __future__ import annotations

import functools
import math
import os
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

from fused_optim import _backend
from fused_optim.tools.bench.adamw import HPARAMS, _human
from fused_optim.tools.bench.clip_adamw import clip_adamw_bytes
from fused_optim.tools.bench.peers import Impl, derive, new_row
from fused_optim.tools.bench.registry import QUICK_SIZES, Benchmark
from fused_optim.tools.bench.timing import error_note

OPS = ("fsdp_adamw", "fsdp_clip_adamw")
WIDTH = 2048  # Linear(WIDTH, WIDTH) layers
MAX_GRAD_NORM = 1.0
CHECK_STEPS = 2
# (atol) of the params after the two checked steps against torch's: a thousandth of one update (lr)
TOLERANCES = {"fsdp_adamw": 1e-3 * HPARAMS["lr"], "fsdp_clip_adamw": 1e-3 * HPARAMS["lr"]}
GRAD_SCALE = 0.5  # grads N(0, 0.5^2): the global norm (~1e4 at 50 M params) is far above MAX_GRAD_NORM: clipped


def adamw_bytes(n_params: int) -> int:
    """28 B/param: grad read, param, exp_avg, exp_avg_sq read and written (fp32).

    >>> adamw_bytes(1)
    28
    """
    return n_params * (4 + 3 * (4 + 4))


@dataclass
class FSDPConfig:
    """What `run` measures: each op of `ops` at each total of `sizes` (params) on `world_size` ranks."""

    device: torch.device
    sizes: list[int]
    ops: tuple[str, ...] = OPS
    world_size: int = 2
    budget_s: float = 1.5
    seed: int = 0

    def describe(self) -> dict[str, Any]:
        return {"fsdp": {"ops": list(self.ops), "sizes": self.sizes, "world_size": self.world_size,
                         "backend": "nccl" if self.device.type == "cuda" else "gloo", "layer": [WIDTH, WIDTH],
                         "hparams": HPARAMS, "max_grad_norm": MAX_GRAD_NORM, "check_steps": CHECK_STEPS,
                         "tolerances": TOLERANCES, "budget_s": self.budget_s}}


def default_world_size(device: torch.device) -> int:
    return max(1, torch.cuda.device_count()) if device.type == "cuda" else 2


def count_tasks(config: FSDPConfig) -> int:
    return len(config.sizes) * len(config.ops)


def implementations(op: str) -> list[tuple[str, Callable, bool]]:
    """(name, make_step(model) -> step, baseline) of `op`'s implementations. torch's fused AdamW takes DTensors on
    the CPU and on GPUs (torch >= 2.4)."""
    import fused_optim

    def ours(clip: bool):
        def make(model):
            opt = fused_optim.AdamW(model.parameters(), **HPARAMS, max_grad_norm=MAX_GRAD_NORM if clip else None)
            return opt.step
        return make

    def torch_adamw(clip: bool, **options):
        def make(model):
            params = list(model.parameters())
            opt = torch.optim.AdamW(params, **HPARAMS, **options)
            if not clip:
                return opt.step

            def step():
                torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
                opt.step()
            return step
        return make

    clip = op == "fsdp_clip_adamw"
    # the baseline first: the others are checked against its params
    impls = [("torch fused", torch_adamw(clip, fused=True), True), ("fused_optim", ours(clip), False)]
    if not clip:
        impls.append(("torch foreach", torch_adamw(clip, foreach=True), False))
    return impls


class CountCollectives:
    """Counts the collectives (functional and c10d all-reduce / all-gather / reduce-scatter) issued while active."""

    NAMES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_tensor", "all_gather_single",
             "reduce_scatter_tensor")

    def __enter__(self) -> CountCollectives:
        import torch.distributed._functional_collectives as funcol

        self.count, self.saved = 0, []
        for module in (funcol, dist):
            for name in self.NAMES:
                if hasattr(module, name):
                    original = getattr(module, name)
                    self.saved.append((module, name, original))
                    setattr(module, name, self._counting(original))
        return self

    def _counting(self, original):
        @functools.wraps(original)
        def counted(*args, **kwargs):
            self.count += 1
            return original(*args, **kwargs)
        return counted

    def __exit__(self, *exc) -> None:
        for module, name, original in self.saved:
            setattr(module, name, original)


def _sharded_model(n_params: int, device: torch.device, seed: int, rank: int):
    """The layer stack under fully_shard, each rank's shards of params and grads drawn from `seed` (the same for
    every implementation)."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    width = min(WIDTH, max(16, math.isqrt(n_params)))  # narrower layers for sizes under one layer of WIDTH
    layers = max(1, round(n_params / (width * width + width)))
    with torch.device("meta"):
        model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    model.to_empty(device=device)
    generator = torch.Generator(device).manual_seed(seed * 1000 + rank)
    with torch.no_grad():
        for p in model.parameters():
            local = p.to_local()
            local.copy_(torch.randn(local.shape, device=device, generator=generator) * 0.02)
            grad = torch.randn(local.shape, device=device, generator=generator) * GRAD_SCALE
            p.grad = DTensor.from_local(grad, p.device_mesh, p.placements, shape=p.shape, stride=p.stride(),
                                        run_check=False)
    return model


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dist.barrier()


def _time(step: Callable[[], Any], device: torch.device, budget_s: float) -> list[float]:
    """Seconds of `step` on the slowest rank, repeated until `budget_s` is spent (the count agreed by all ranks)."""
    _synchronize(device)
    t0 = time.perf_counter()
    step()
    _synchronize(device)
    first = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
    dist.all_reduce(first, op=dist.ReduceOp.MAX)  # gloo and NCCL: on the CPU tensor for gloo
    repeats = int(min(50, max(5, budget_s / max(float(first), 1e-6))))
    times = []
    for _ in range(repeats):
        _synchronize(device)
        t0 = time.perf_counter()
        step()
        _synchronize(device)
        times.append(time.perf_counter() - t0)
    return times


def _rank(rank: int, world_size: int, port: int, config: FSDPConfig, out_path: str) -> None:
    device = torch.device("cuda", rank) if config.device.type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world_size)
    rows = []
    try:
        for n_params in config.sizes:
            for op in config.ops:
                rows += _case(op, n_params, device, config, rank)
    finally:
        dist.destroy_process_group()
    if rank == 0:
        torch.save(rows, out_path)
    # Leave without the interpreter's finalization, as tests/spawn.py's ranks do: gloo's worker threads can still hold
    # work objects whose destruction then aborts the rank ("terminate called without an active exception", SIGABRT;
    # seen once in the test suite after rank 0 had saved its rows), and spawn would report the run as failed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _case(op: str, n_params: int, device: torch.device, config: FSDPConfig, rank: int) -> list[dict[str, Any]]:
    clip = op == "fsdp_clip_adamw"
    expected = None
    rows = []
    auto = _backend.resolve("auto", device.type)
    for name, make, baseline in implementations(op):
        ours = name == "fused_optim"
        impl = Impl(f"fused_optim[{auto}]" if ours else name, None, baseline=baseline, auto=ours)
        model = _sharded_model(n_params, device, config.seed, rank)
        params = list(model.parameters())
        total = sum(p.numel() for p in params)
        row = new_row(op, f"{op} fp32 {_human(total)} on {config.world_size} ranks", impl, device,
                      dtype="float32", n_params=total, n_tensors=len(params),
                      bytes=clip_adamw_bytes(total) if clip else adamw_bytes(total))
        rows.append(row)
        try:
            step = make(model)
            grads = [p.grad.to_local().clone() for p in params]
            for _ in range(CHECK_STEPS):
                step()
                with torch.no_grad():  # the same grads again (torch's clip scales them in place)
                    for p, g in zip(params, grads):
                        p.grad.to_local().copy_(g)
            local = [p.detach().to_local() for p in params]
            if baseline:
                expected = [t.clone() for t in local]
            # every rank's shards against the baseline's, the worst over the ranks
            error = torch.tensor([max((float((a - b).abs().max()) for a, b in zip(local, expected) if a.numel()),
                                      default=0.0)], dtype=torch.float64)
            dist.all_reduce(error, op=dist.ReduceOp.MAX)
            row.update(max_abs_err=float(error), correct=float(error) <= TOLERANCES[op])
            if not row["correct"]:
                row["note"] = f"wrong result (max |error| {float(error):.3g} vs torch fused): not timed"
                continue
            with CountCollectives() as collectives:
                step()
            row["collectives_per_step"] = collectives.count
            times = sorted(_time(step, device, config.budget_s))
            quartile = len(times) // 4
            row.update(time_ms_median=times[len(times) // 2] * 1e3, n_timed=len(times),
                       time_ms_iqr=(times[-1 - quartile] - times[quartile]) * 1e3)
        except Exception as error:  # noqa: BLE001  (one failing peer must not end the benchmark)
            row["note"] = error_note(error)
        finally:
            del model
    return rows


def run(config: FSDPConfig, roof_gbps: float | None = None,
        on_task: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Spawns the ranks, measures every op x size of `config` and returns rank 0's rows (one per implementation)."""
    on_task = on_task or (lambda description: None)
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "rows.pt")
        torch.multiprocessing.spawn(_rank, args=(config.world_size, _free_port(), config, out_path),
                                    nprocs=config.world_size, join=True)
        rows = torch.load(out_path, weights_only=False)
    for op in config.ops:
        op_rows = [r for r in rows if r["op"] == op]
        for case in dict.fromkeys(r["case"] for r in op_rows):
            derive([r for r in op_rows if r["case"] == case], roof_gbps)
        on_task(f"{op}: {len(op_rows)} implementations")
    return rows


def _free_port() -> int:
    """A free TCP port on this host for the ranks' rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CAPTIONS = {
    "fsdp_adamw": "One AdamW step of an FSDP2-sharded model (fp32; all ranks on this machine): ms: median step time "
                  "of the slowest rank; GB/s by the bytes model over all ranks' shards (28 B/param); % of the roof; "
                  "× = torch fused's time / this one's; coll.: collectives one step issues.",
    "fsdp_clip_adamw": "As fsdp_adamw, with the global grad norm clipped to 1.0: ours AdamW(max_grad_norm=1.0), torch "
                       "clip_grad_norm_ + fused step; 32 B/param (the grads read twice); coll.: collectives one step "
                       "issues (ours: one all-reduce over the mesh).",
}


# The FSDP2 step: ~50 M params on the CPU (two ranks' shards of 25 M, past the cache)
SIZES = {"cpu": [50_000_000], "cuda": [256_000_000]}

BENCHMARK = Benchmark(
    ops=OPS, count_tasks=count_tasks, run=run,
    configure=lambda request: FSDPConfig(device=request.device,
                                         sizes=request.sizes_or(QUICK_SIZES if request.quick else SIZES),
                                         ops=request.selected(OPS), world_size=default_world_size(request.device),
                                         budget_s=request.budget_s),
)
