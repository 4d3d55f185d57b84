"""fused_optim.backends(): what is built and usable here, and why not."""

from __future__ import annotations

import platform
from typing import Any

import torch

from fused_optim import _backend


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def _choice(device_type: str) -> str:
    try:
        return _backend.resolve(_backend.default_backend(), device_type)
    except (RuntimeError, ValueError) as error:  # ValueError: FUSED_OPTIM_BACKEND names no backend
        return f"none ({error})"


def _default_backend() -> str:
    try:
        return _backend.default_backend()
    except ValueError as error:  # reported, not raised: `fused-optim info` is where a user looks for what is wrong
        return f"invalid: {error}"


def backends() -> dict[str, Any]:
    """Versions, devices, each backend's availability (None when usable, else the reason), and what the default
    backend runs on CPU and CUDA tensors.

    >>> info = fused_optim.backends()
    >>> info["backends"]["torch"] is None
    True
    """
    cuda_available = torch.cuda.is_available()
    cuda_error = _backend.extension_error("cuda")
    if cuda_error is None and not cuda_available:
        cuda_error = "built and loaded, but no CUDA GPU is visible"
    return {
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torch_cuda": torch.version.cuda,
            "triton": _triton_version(),
        },
        "device": torch.cuda.get_device_name() if cuda_available else _backend.cpu_name(),
        "extensions": {"cpu": _backend.extension_error("cpu"), "cuda": _backend.extension_error("cuda")},
        "backends": {
            "cuda": cuda_error,
            "triton": _backend.triton_error(),
            "cpu": _backend.extension_error("cpu"),
            "torch": None,
        },
        "default_backend": _default_backend(),
        "auto": {"cpu": _choice("cpu"), "cuda": _choice("cuda") if cuda_available else "none (no CUDA GPU)"},
        "cpu_threads": torch.get_num_threads(),
        "cpu_isa": {"loaded": _backend.cpu_isa(), "built": list(_backend.cpu_isas_built()),
                    "supported": list(_backend.cpu_isas_supported())},
    }
