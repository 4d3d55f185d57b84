"""Shared test set-up: which backends run here, per-test seeds, the `cuda` marker.

Without a CUDA GPU the Triton kernels run on CPU tensors through Triton's interpreter. Triton reads
TRITON_INTERPRET when a kernel is decorated, i.e. when fused_optim.triton is imported, so it is set here, before
anything imports fused_optim or triton.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import zlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fused_optim  # noqa: E402  (after TRITON_INTERPRET is set)

TRITON_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

# Backends that can run here: the three that run CPU tensors, plus the CUDA C++ one when a GPU is visible.
BACKENDS = ["cpu", "triton", "torch"] + (["cuda"] if HAS_CUDA else [])


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


def backend_devices_of(op_name: str) -> list:
    """BACKEND_DEVICES, the C++ ones ("cpu", "cuda") skipped while their kernel of `fused_optim::op_name` is not
    registered (an op whose kernels are still being written runs on the other backends, and on these once they land)."""
    fused_optim._backend.load_extensions()

    def with_kernel_check(param):
        backend = param.values[0]
        if backend not in ("cpu", "cuda"):
            return param
        registered = torch._C._dispatch_has_kernel_for_dispatch_key(f"fused_optim::{op_name}", backend.upper())
        skip = pytest.mark.skipif(not registered, reason=f"no {backend} kernel of fused_optim::{op_name} registered")
        return pytest.param(*param.values, id=param.id, marks=[*param.marks, skip])

    return [with_kernel_check(p) for p in BACKEND_DEVICES]


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


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one)")


def pytest_collection_modifyitems(config, items) -> None:
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


# ------------------------------------------------------------------------------------------------------------------
# The gradient ops (accumulate_grads_, total_norm) under GradAccumulator, clip_grad_norm_ and max_grad_norm: their
# C++ and Triton kernels may not be there yet; a backend without them is skipped, saying which, never failed.

GRAD_OPS = ("accumulate_grads_", "total_norm")
GRAD_OPS_TRITON_MODULES = ("fused_optim.triton.accumulate", "fused_optim.triton.total_norm")


def grad_ops_missing(backend: str) -> str | None:
    """Why `backend` cannot run the gradient ops on CPU tensors here, or None when it can."""
    if backend == "cpu":
        missing = [op for op in GRAD_OPS
                   if not torch._C._dispatch_has_kernel_for_dispatch_key(f"fused_optim::{op}", "CPU")]
        return f"no C++ CPU kernel for {', '.join(missing)} (not built or not written yet)" if missing else None
    if backend == "triton":
        if not TRITON_INTERPRETED:
            return "TRITON_INTERPRET is not 1 here"
        missing = [name for name in GRAD_OPS_TRITON_MODULES if importlib.util.find_spec(name) is None]
        return f"no Triton kernels yet ({', '.join(missing)})" if missing else None
    return None


@pytest.fixture(params=["cpu", "triton", "torch"])
def grad_backend(request) -> str:
    """Each backend that runs the gradient ops on CPU tensors here (the others are skipped with the reason)."""
    reason = grad_ops_missing(request.param)
    if reason is not None:
        pytest.skip(reason)
    return request.param


class DispatchedOps(TorchDispatchMode):
    """Records the name of every op dispatched while active (`with DispatchedOps() as ops: ...; ops.names`)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func._schema.name)
        return func(*args, **(kwargs or {}))
