"""Which kernels are built and usable here, and which one an op call runs.

`backend="auto"` picks, for CUDA tensors, the CUDA C++ kernels when the extension is built, else Triton, else
torch; for CPU tensors, the C++ CPU kernels when built, else torch. "triton" runs CPU tensors only under
`TRITON_INTERPRET=1` (the tests' way to check Triton kernels without a GPU). The environment variable
`FUSED_OPTIM_BACKEND` sets the default. Asking for a backend that cannot run raises `RuntimeError` saying why.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

BACKENDS = ("auto", "cuda", "triton", "cpu", "torch")

# Why each C++ extension is unusable (None: loaded). Filled by load_extensions().
_extension_errors: dict[str, str | None] = {}


def _load_extension(module: str) -> str | None:
    spec = importlib.util.find_spec(f"fused_optim.{module}")
    if spec is None or spec.origin is None:
        return "not built (install with `pip install --no-build-isolation -e .`)"
    try:
        torch.ops.load_library(spec.origin)
    except (OSError, RuntimeError) as error:
        return f"not loadable ({os.path.basename(spec.origin)}: {str(error).splitlines()[0]})"
    return None


def load_extensions() -> None:
    """Loads the C++ extensions once. Called after the op schemas are defined (fused_optim/ops)."""
    if not _extension_errors:
        _extension_errors["cpu"] = _load_extension("_C_cpu")
        _extension_errors["cuda"] = _load_extension("_C_cuda")


def extension_error(name: str) -> str | None:
    """None when the C++ extension `name` ("cpu" or "cuda") is loaded, else the reason it is not."""
    load_extensions()
    return _extension_errors[name]


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def triton_error() -> str | None:
    """None when Triton kernels can run here, else why not."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    if not torch.cuda.is_available() and not triton_interpreted():
        return "no CUDA GPU (set TRITON_INTERPRET=1 to run Triton kernels on the CPU, slowly)"
    return None


def default_backend() -> str:
    backend = os.environ.get("FUSED_OPTIM_BACKEND", "auto")
    check_backend_name(backend)
    return backend


def check_backend_name(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}.")


@functools.cache
def resolve(backend: str, device_type: str) -> str:
    """The concrete backend ("cuda", "triton", "cpu" or "torch") that runs tensors of `device_type`."""
    check_backend_name(backend)
    if backend == "auto":
        if device_type == "cuda":
            if extension_error("cuda") is None:
                return "cuda"
            return "triton" if triton_error() is None else "torch"
        if device_type == "cpu" and extension_error("cpu") is None:
            return "cpu"
        return "torch"
    if backend == "torch":
        return "torch"
    if backend == "triton":
        if device_type not in ("cuda", "cpu"):
            raise RuntimeError(f"backend 'triton' runs CUDA tensors (or CPU ones when interpreted), not {device_type}.")
        if triton_error() is not None:
            raise RuntimeError(f"backend 'triton' is unavailable: {triton_error()}.")
        if device_type == "cpu" and not triton_interpreted():
            raise RuntimeError("backend 'triton' runs CPU tensors only under TRITON_INTERPRET=1.")
        return "triton"
    # "cuda" or "cpu": the C++ extension of that name, for tensors on that device
    if device_type != backend:
        raise RuntimeError(f"backend {backend!r} runs {backend.upper()} tensors, but these are on {device_type}.")
    error = extension_error(backend)
    if error is not None:
        raise RuntimeError(f"backend {backend!r} is unavailable: the {backend.upper()} extension is {error}.")
    return backend
