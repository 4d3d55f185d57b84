"""Shared test set-up: which backends run here, per-test seeds, the `cuda` marker.

Without a CUDA GPU the Triton kernels run on CPU tensors through Triton's interpreter. Triton reads
TRITON_INTERPRET when a kernel is decorated, i.e. when fused_optim.triton is imported, so it is set here, before
anything imports fused_optim or triton.
"""

from __future__ import annotations

import inspect
import itertools
import os
import platform
import zlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fused_optim  # noqa: E402  (after TRITON_INTERPRET is set)
from fused_optim import _backend  # noqa: E402

TRITON_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

# Backends that can run here: the three that run CPU tensors, plus the CUDA C++ one when a GPU is visible.
BACKENDS = ["cpu", "triton", "torch"] + (["cuda"] if HAS_CUDA else [])


# Whether torch's CPU kernels round add(other, alpha=) once here: all but ATEN_CPU_CAPABILITY=default's.
TORCH_FUSES_MULTIPLY_ADD = torch.backends.cpu.get_cpu_capability() != "DEFAULT"


def fuses_multiply_add(backend: str) -> bool:
    """Whether `backend` rounds the optimizers' a * b + c once on CPU tensors (csrc/include/fused_optim/
    multiply_add.h): the Triton kernels always; the x86-64 baseline CPU kernels never, and the torch backend where
    torch's own kernels do not (TORCH_FUSES_MULTIPLY_ADD), as torch rounds on a CPU without FMA."""
    if backend == "torch":
        return TORCH_FUSES_MULTIPLY_ADD
    return not (backend == "cpu" and _backend.cpu_isa() == "baseline" and platform.machine() in ("x86_64", "AMD64"))


def device_of(backend: str) -> str:
    """The device whose tensors `backend` runs in these tests."""
    if backend == "cuda" or (backend == "triton" and not TRITON_INTERPRETED):
        return "cuda"
    return "cpu"


# (backend, device) pairs for tests that check the same thing on every kernel. The CUDA ones carry the `cuda`
# marker, so on a machine without a GPU they show up as skipped rather than vanish.
BACKEND_DEVICES = [
    pytest.param("cpu", "cpu", id="cpu"),
    pytest.param("torch", "cpu", id="torch"),
    pytest.param("triton", "cpu", id="triton-interpreted",
                 marks=pytest.mark.skipif(not TRITON_INTERPRETED, reason="TRITON_INTERPRET is not 1 here")),
    pytest.param("cuda", "cuda", id="cuda", marks=pytest.mark.cuda),
    pytest.param("triton", "cuda", id="triton-cuda", marks=pytest.mark.cuda),
]
# The backends for CPU tensors only (tests that need no GPU variant, or that are too slow to repeat).
CPU_BACKENDS = [p for p in BACKEND_DEVICES if p.values[1] == "cpu"]


def one_element_past_an_allocation(t: torch.Tensor) -> torch.Tensor:
    """A copy of t whose address is not 16-byte aligned (unless 1-byte elements): the Triton kernels' narrow path."""
    storage = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    return storage[1:].view(t.shape).copy_(t)


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    """Each backend that runs here, by name (on the device `device_of(backend)`)."""
    return request.param


@pytest.fixture(autouse=True)
def seed(request) -> int:
    """A fixed seed per test (from its id), so every test draws the same numbers however it is run."""
    value = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(value)
    return value


def assert_signature_extends(ours, torchs) -> None:
    """`ours` takes every argument of `torchs`, in the same order, kind and default, then its own extras."""
    ours_params, torch_params = inspect.signature(ours).parameters, inspect.signature(torchs).parameters
    assert list(ours_params)[:len(torch_params)] == list(torch_params)
    for name, param in torch_params.items():
        assert ours_params[name].default == param.default and ours_params[name].kind == param.kind, name


# FUSED_OPTIM_INTERPRETED_CASES=all (`make test-full`): every parametrization of an `interpreted_cover` test runs
# under the Triton interpreter too, not only the covering subset.
INTERPRETED_CASES = os.environ.get("FUSED_OPTIM_INTERPRETED_CASES", "cover")


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line(
        "markers", "interpreted_cover(strength): under the Triton interpreter, run only a subset of the test's "
                   "parametrizations in which every value (strength 1) or every pair of values of two parameters "
                   "(strength 2) appears; FUSED_OPTIM_INTERPRETED_CASES=all runs them all")


def covering_subset(cases: list[dict], strength: int) -> set[int]:
    """Indices of a few of `cases` (each {parameter: value}) such that every combination of `strength` parameters'
    values found in some case is found in a chosen one. Greedy, in a fixed order: the same on every run and in
    every pytest-xdist worker."""
    def combinations(case):
        names = sorted(case)
        return {tuple((name, repr(case[name])) for name in chosen)
                for k in range(1, strength + 1) for chosen in itertools.combinations(names, k)}

    covers = [combinations(case) for case in cases]
    uncovered = set().union(*covers)
    chosen: set[int] = set()
    while uncovered:
        best = max(range(len(cases)), key=lambda i: len(covers[i] & uncovered))
        chosen.add(best)
        uncovered -= covers[best]
    return chosen


def runs_interpreted(item) -> bool:
    params = getattr(item, "callspec", None) and item.callspec.params
    return bool(params) and TRITON_INTERPRETED and params.get("backend") == "triton" \
        and params.get("device", "cpu") == "cpu"


def skip_uncovered_interpreted_cases(items) -> None:
    """The Triton interpreter runs a kernel ~1000x slower than the GPU (a second a case, where the CPU kernels take
    milliseconds), so a test marked `interpreted_cover` runs there on a covering subset of its option matrix: each
    option still reaches the kernel, next to each dtype when the strength is 2. The other backends, and Triton on
    a GPU, run every case."""
    by_test: dict[str, list] = {}
    for item in items:
        if item.get_closest_marker("interpreted_cover") is not None and runs_interpreted(item):
            by_test.setdefault(item.nodeid.split("[")[0], []).append(item)
    skip = pytest.mark.skip(reason="not in the interpreter's covering subset (FUSED_OPTIM_INTERPRETED_CASES=all "
                                   "runs it)")
    for group in by_test.values():
        strength = group[0].get_closest_marker("interpreted_cover").args[0]
        cases = [{k: v for k, v in item.callspec.params.items() if k not in ("backend", "device")} for item in group]
        chosen = covering_subset(cases, strength)
        for i, item in enumerate(group):
            if i not in chosen:
                item.add_marker(skip)


def pytest_collection_modifyitems(config, items) -> None:
    if INTERPRETED_CASES != "all":
        skip_uncovered_interpreted_cases(items)
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(params=[pytest.param(p.values[0], id=p.id, marks=p.marks) for p in CPU_BACKENDS])
def cpu_backend(request) -> str:
    """Each backend that runs CPU tensors here, by name: for tests that build their own CPU tensors."""
    return request.param


class DispatchedOps(TorchDispatchMode):
    """Records the name of every op dispatched while active (`with DispatchedOps() as ops: ...; ops.names`)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func._schema.name)
        return func(*args, **(kwargs or {}))


def master_weight(optimizer, p: torch.Tensor) -> torch.Tensor | None:
    """A param's fp32 master weight, whichever form the optimizer keeps it in: the fp32 copy (fp16 params), or the
    bf16 param joined with its int16 remainder; None without one."""
    from fused_optim.master_remainder import join_master

    state = optimizer.state[p]
    if "master_remainder" in state:
        return join_master(p.detach(), state["master_remainder"])
    return state.get("master_param")
