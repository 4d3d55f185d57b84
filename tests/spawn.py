"""Multi-process tests on the CPU: `run_workers` spawns gloo ranks once per test module and hands back what each
rank saved, so the tests themselves only read results (a spawn costs seconds: one per module, not one per test)."""

from __future__ import annotations

import datetime
import os
import socket
import sys
from collections.abc import Callable

import torch
import torch.distributed as dist

GLOO_AVAILABLE = dist.is_available() and dist.is_gloo_available()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, out_dir: str, work: Callable[[int, int], dict],
               backend: str) -> None:
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=120))
    try:
        results = work(rank, world_size)
    finally:
        dist.destroy_process_group()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    # Leave without the interpreter's finalization: gloo's worker threads can still hold work objects whose
    # destruction then takes the GIL of a dying interpreter and aborts the rank (SIGABRT, "terminate called without
    # an active exception"; seen in CI after every result was saved).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_workers(work: Callable[[int, int], dict], world_size: int, out_dir: str, backend: str = "gloo") -> list[dict]:
    """Runs `work(rank, world_size)` in `world_size` processes of the `backend` process group (gloo; nccl: one GPU
    a rank, cuda:rank its current device), on a fresh port each time, and returns each rank's dict (tensors in it
    saved from wherever they are: move GPU ones to the CPU). `work` must be a module-level function of a test module:
    the spawned interpreters import it by name, from this directory."""
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    old_path = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [tests_dir, old_path]))
    try:
        torch.multiprocessing.spawn(_rank_main, args=(world_size, free_port(), out_dir, work, backend),
                                    nprocs=world_size, join=True)
    finally:
        if old_path is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = old_path
    return [torch.load(os.path.join(out_dir, f"rank{rank}.pt"), weights_only=False) for rank in range(world_size)]
