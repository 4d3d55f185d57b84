"""Builds fused_optim's C++ extensions (DESIGN.md, Build).

- `fused_optim._C_cpu`: the CPU kernels, always.
- `fused_optim._C_cuda`: the CUDA kernels, when torch is a CUDA build and CUDA_HOME (nvcc) is found. A machine
  with no GPU builds it too: `torch.cuda.is_available()` plays no part.

Environment:
  FUSED_OPTIM_BUILD_CUDA=auto|0|1   auto (default) builds CUDA when it can; 1 fails loudly when it cannot.
  TORCH_CUDA_ARCH_LIST              GPU architectures (default: the visible GPU's, else 9.0).
  MAX_JOBS                          parallel compile jobs (ninja).
  FUSED_OPTIM_CPU_ARCH              -march for the CPU kernels (default: native; this is a from-source build).
  FUSED_OPTIM_PTXAS_VERBOSE=1       print registers and spills of every CUDA kernel.
"""

import glob
import os
import sys

from setuptools import setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:
    sys.exit(
        "fused_optim needs PyTorch installed first: pip install torch, then "
        "pip install --no-build-isolation -e . (a build-isolated torch would be a different torch)."
    )

ROOT = os.path.dirname(os.path.abspath(__file__))
INCLUDE = [os.path.join(ROOT, "csrc", "include")]


def sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


HEADERS = sources("csrc/include/fused_optim/*.h")


def cuda_build_wanted():
    """Whether to build the CUDA extension, or None with the reason when it is not."""
    setting = os.environ.get("FUSED_OPTIM_BUILD_CUDA", "auto").lower()
    if setting not in ("auto", "0", "1"):
        sys.exit(f"FUSED_OPTIM_BUILD_CUDA must be auto, 0 or 1, not {setting!r}.")
    if setting == "0":
        return False, "FUSED_OPTIM_BUILD_CUDA=0"
    if torch.version.cuda is None:
        reason = f"torch {torch.__version__} is not a CUDA build"
    elif cpp_extension.CUDA_HOME is None:
        reason = "no CUDA toolkit found (set CUDA_HOME to the directory holding bin/nvcc)"
    else:
        return True, ""
    if setting == "1":
        sys.exit(f"FUSED_OPTIM_BUILD_CUDA=1 but the CUDA extension cannot be built: {reason}.")
    return False, reason


def extensions():
    cpu_arch = os.environ.get("FUSED_OPTIM_CPU_ARCH", "native")
    # -fno-math-errno lets sqrt vectorise. No -ffast-math, and no contraction into FMAs: the update rounds
    # each operation as torch's CPU kernels do, so fp32 steps match torch.optim.AdamW(foreach=False) closely.
    cxx_flags = ["-O3", "-fopenmp", "-fno-math-errno", "-ffp-contract=off", f"-march={cpu_arch}"]
    exts = [
        cpp_extension.CppExtension(
            "fused_optim._C_cpu",
            sources("csrc/registration.cpp") + sources("csrc/cpu/*.cpp"),
            include_dirs=INCLUDE,
            depends=HEADERS,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
            py_limited_api=True,
        )
    ]
    build_cuda, reason = cuda_build_wanted()
    if build_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"  # no GPU to ask: build for Hopper
        nvcc_flags = ["-O3", "-lineinfo"]
        if os.environ.get("FUSED_OPTIM_PTXAS_VERBOSE") == "1":
            nvcc_flags.append("-Xptxas=-v")
        exts.append(
            cpp_extension.CUDAExtension(
                "fused_optim._C_cuda",
                sources("csrc/cuda/*.cu") + sources("csrc/cuda/*.cpp"),
                include_dirs=INCLUDE,
                depends=HEADERS,
                extra_compile_args={"cxx": ["-O3"], "nvcc": nvcc_flags},
                py_limited_api=True,
            )
        )
    else:
        print(f"fused_optim: not building the CUDA extension: {reason}.", file=sys.stderr)
    return exts


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
