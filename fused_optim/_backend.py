"""Which kernels are built and usable here, and which one an op call runs.

`backend="auto"` picks, for CUDA tensors, the CUDA C++ kernels when the extension is built, else Triton, else
torch; for CPU tensors, the C++ CPU kernels when built, else torch. "triton" runs CPU tensors only under
`TRITON_INTERPRET=1` (the tests' way to check Triton kernels without a GPU). The environment variable
`FUSED_OPTIM_BACKEND` sets the default. Asking for a backend that cannot run raises `RuntimeError` saying why.

The CPU kernels are built once per instruction-set level (setup.py); the widest level the running CPU has is
loaded, so one build runs at full speed on any CPU of its architecture. `FUSED_OPTIM_CPU_ISA` forces a narrower one
(tests run the same contract on every level the machine runs).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import platform

import torch

from fused_optim._stable_abi import STABLE_ABI_TARGET

BACKENDS = ("auto", "cuda", "triton", "cpu", "torch")


def memoized(fn):
    """functools.cache for the backend lookups, with a plain dict: torch.compile traces a dict lookup silently, where
    it warns about every lru_cache-wrapped call in a compiled step."""
    results: dict = {}

    @functools.wraps(fn)
    def lookup(*args):
        if args not in results:
            results[args] = fn(*args)
        return results[args]

    lookup.cache_clear = results.clear
    return lookup


# Why each C++ extension is unusable (None: loaded). Filled by load_extensions().
_extension_errors: dict[str, str | None] = {}
# The instruction-set level of the CPU extension loaded (see cpu_isa()).
_loaded_cpu_isa: list[str] = []

# The CPU kernels' levels (setup.py builds one extension `_C_cpu_<level>` per level of the architecture), widest
# first, with the /proc/cpuinfo flags each needs: x86-64-v4 (AVX-512) and x86-64-v3 (AVX2, FMA, F16C, BMI, ...).
CPU_ISA_FLAGS = {
    "avx512": {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"},
    "avx2": {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"},
    "neon": set(),
    "baseline": set(),
}


# Written by setup.py beside the extensions: the torch they were built under, and its CUDA version ("none" for a CPU
# build of torch).
TORCH_RECORD = os.path.join(os.path.dirname(__file__), "_extensions_torch_version.txt")


def _release(version: str) -> tuple[int, ...]:
    """A version's (major, minor): "2.14.1+cu130" -> (2, 14)."""
    return tuple(int(part) for part in version.split("+")[0].split(".")[:2])


def built_for() -> tuple[str, str] | None:
    """(torch version, CUDA version or "none") of the build, or None when the build wrote no record."""
    try:
        with open(TORCH_RECORD) as record:
            lines = record.read().split()
    except OSError:
        return None
    return (lines[0], lines[1] if len(lines) > 1 else "none") if lines else None


def torch_mismatch(extension: str = "cpu") -> str | None:
    """Why a C++ extension ("cpu" or "cuda") must not be loaded under this torch, or None.

    The kernels use the stable ABI only, so any torch from STABLE_ABI_TARGET on loads them, whichever torch built
    them; the CUDA kernels also need the CUDA major version they were compiled with (their CUDA runtime library).
    """
    if _release(torch.__version__) < STABLE_ABI_TARGET:
        return (f"this torch {torch.__version__} is older than {'.'.join(map(str, STABLE_ABI_TARGET))}, the oldest "
                f"whose stable ABI the kernels are built for; the torch backend runs instead")
    record = built_for()
    if extension == "cuda" and record is not None and torch.version.cuda is not None and record[1] != "none":
        built_major, running_major = record[1].split(".")[0], torch.version.cuda.split(".")[0]
        if built_major != running_major:
            return (f"built with CUDA {record[1]}, not this torch's CUDA {torch.version.cuda} (rebuild it: "
                    f"pip install --no-build-isolation -e .); the torch backend runs instead")
    return None


def _load_extension(module: str) -> str | None:
    spec = importlib.util.find_spec(f"fused_optim.{module}")
    if spec is None or spec.origin is None:
        return "not built (install with `pip install --no-build-isolation -e .`)"
    mismatch = torch_mismatch("cuda" if module == "_C_cuda" else "cpu")
    if mismatch is not None:
        return f"not loaded: {mismatch}"
    try:
        torch.ops.load_library(spec.origin)
    except (OSError, RuntimeError) as error:
        return f"not loadable ({os.path.basename(spec.origin)}: {str(error).splitlines()[0]})"
    return None


@memoized
def cpu_info() -> tuple[str | None, frozenset[str] | None]:
    """The CPU's model name and feature flags ("flags" on x86, "Features" on aarch64) from /proc/cpuinfo; None for
    either where it is not there (not Linux)."""
    model, flags = None, None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model is None:
                    model = value.strip()
                elif key in ("flags", "Features") and flags is None:
                    flags = frozenset(value.split())
    except OSError:
        pass
    return model, flags


def cpu_name() -> str:
    """The CPU's model name where the OS gives one ("AMD EPYC 9R14 96-Core Processor"), else what `platform` knows
    (its processor(), often empty, or the architecture)."""
    return cpu_info()[0] or platform.processor() or platform.machine() or "unknown CPU"


@memoized
def cpu_isas_supported() -> tuple[str, ...]:
    """The levels of CPU_ISA_FLAGS this CPU (and its OS) runs, widest first: from /proc/cpuinfo's flags on Linux,
    else from torch's own CPU capability."""
    machine = platform.machine().lower()
    if machine in ("aarch64", "arm64"):
        return ("neon",)
    flags = cpu_info()[1]
    if flags is None:  # not Linux: torch's dispatch level ("AVX512", "AVX2", "DEFAULT", ...)
        capability = torch.backends.cpu.get_cpu_capability()
        return {"AVX512": ("avx512", "avx2", "baseline"), "AVX2": ("avx2", "baseline")}.get(capability, ("baseline",))
    return tuple(isa for isa in ("avx512", "avx2", "baseline") if CPU_ISA_FLAGS[isa] <= flags)


def cpu_isas_built() -> tuple[str, ...]:
    return tuple(isa for isa in CPU_ISA_FLAGS if importlib.util.find_spec(f"fused_optim._C_cpu_{isa}") is not None)


def _load_cpu_extension() -> str | None:
    """Loads the widest CPU extension this CPU runs (or the level FUSED_OPTIM_CPU_ISA names); None, or why not."""
    built, supported = cpu_isas_built(), cpu_isas_supported()
    forced = os.environ.get("FUSED_OPTIM_CPU_ISA")
    if forced:
        if forced not in CPU_ISA_FLAGS:
            return f"not loaded: FUSED_OPTIM_CPU_ISA={forced} is not one of {', '.join(CPU_ISA_FLAGS)}"
        if forced not in supported:
            return f"not loaded: FUSED_OPTIM_CPU_ISA={forced}, which this CPU does not run ({', '.join(supported)})"
        candidates = [forced]
    else:
        candidates = [isa for isa in supported if isa in built]
    if not candidates or candidates[0] not in built:
        return "not built (install with `pip install --no-build-isolation -e .`)" if not built else (
            f"not built for this CPU (built: {', '.join(built)}; this CPU runs: {', '.join(supported)})")
    error = _load_extension(f"_C_cpu_{candidates[0]}")
    if error is None:
        _loaded_cpu_isa.append(candidates[0])
    return error


def load_extensions() -> None:
    """Loads the C++ extensions once. Called after the op schemas are defined (fused_optim/ops)."""
    if not _extension_errors:
        _extension_errors["cpu"] = _load_cpu_extension()
        _extension_errors["cuda"] = _load_extension("_C_cuda")


def extension_error(name: str) -> str | None:
    """None when the C++ extension `name` ("cpu" or "cuda") is loaded, else the reason it is not."""
    load_extensions()
    return _extension_errors[name]


def cpu_isa() -> str | None:
    """The instruction-set level of the CPU kernels that run here ("avx512", "avx2", "neon", "baseline"), or None
    when the CPU extension is not loaded. FUSED_OPTIM_CPU_ISA (set before import) picks a narrower one."""
    load_extensions()
    return _loaded_cpu_isa[0] if _loaded_cpu_isa else None


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@memoized
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
    check_backend_name(backend, "FUSED_OPTIM_BACKEND")
    return backend


def check_backend_name(backend: str, name: str = "backend") -> None:
    """`name`: what gave it, said in the error (an argument, or the environment variable)."""
    if backend not in BACKENDS:
        raise ValueError(f"{name} must be one of {', '.join(BACKENDS)}; got {backend!r}.")


# A constant to torch.compile: it calls resolve while tracing and keeps the answer. Traced, the first call's insertion
# into the memo's dict made torch 2.11's dynamo fail its own guard ("Guard failed on the same frame it was created").
@torch.compiler.assume_constant_result
@memoized
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
