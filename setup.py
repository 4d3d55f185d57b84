"""Builds fused_optim's C++ extensions (docs/design.md, Build).

- `fused_optim._C_cpu_<isa>`: the CPU kernels, always, once per instruction-set level of the machine's architecture
  (x86-64: baseline, avx2, avx512; aarch64: neon; others: baseline). fused_optim/_backend.py loads the widest one
  the running CPU has, so one build (a wheel too) runs at full speed on any CPU of the architecture.
- `fused_optim._C_cuda`: the CUDA kernels, when torch is a CUDA build and CUDA_HOME (nvcc) is found. A machine
  with no GPU builds it too: `torch.cuda.is_available()` plays no part.

Environment:
  FUSED_OPTIM_BUILD_CUDA=auto|0|1   auto (default) builds CUDA when it can; 1 fails loudly when it cannot.
  TORCH_CUDA_ARCH_LIST              GPU architectures (default: the visible GPU's, else 9.0; a wheel: 8.0, 9.0,
                                    10.0 and PTX for newer GPUs).
  MAX_JOBS                          parallel compile jobs (ninja).
  FUSED_OPTIM_CPU_ISAS              the CPU levels to build, comma-separated (default: all of the architecture's).
  FUSED_OPTIM_PTXAS_VERBOSE=1       print registers and spills of every CUDA kernel.
"""

import glob
import os
import platform
import runpy
import shutil
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
# csrc/include/fused_optim/: the math shared by CPU and CUDA; csrc/ops/: each op's C++ signature and checks
INCLUDE = [os.path.join(ROOT, "csrc", "include"), os.path.join(ROOT, "csrc")]


def sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


# The headers whose change rebuilds an extension (setuptools compares only these and the sources with the library)
HEADERS = sources("csrc/include/fused_optim/*.h") + sources("csrc/ops/*.h")
CPU_HEADERS = HEADERS + sources("csrc/cpu/*.h")
CUDA_HEADERS = HEADERS + sources("csrc/cuda/*.cuh")
WHEEL_CUDA_ARCHS = "8.0;9.0;10.0+PTX"


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


# The instruction-set levels the CPU kernels are built for, per architecture: name -> compiler flags. Never
# -march=native: a build must run on every CPU of its architecture (_backend.py picks the level at load time).
# x86-64-v3 is AVX2 + FMA + F16C (Haswell, Zen 1 on), x86-64-v4 AVX-512 F/BW/CD/DQ/VL (Skylake-X, Zen 4 on). No
# separate AVX512-BF16 level: the kernels round to bf16 in integer ops (exact round-to-nearest-even, NaN kept),
# where vcvtneps2bf16 would flush subnormals, so that level's code would be the avx512 code.
CPU_ISAS = {
    "x86_64": {"baseline": ["-march=x86-64"], "avx2": ["-march=x86-64-v3"], "avx512": ["-march=x86-64-v4"]},
    "aarch64": {"neon": ["-march=armv8-a"]},
}


def cpu_isas() -> dict[str, list[str]]:
    levels = CPU_ISAS.get(platform.machine().lower().replace("amd64", "x86_64").replace("arm64", "aarch64"),
                          {"baseline": []})
    wanted = os.environ.get("FUSED_OPTIM_CPU_ISAS", "all")
    if wanted == "all":
        return levels
    names = [name.strip() for name in wanted.split(",") if name.strip()]
    unknown = [name for name in names if name not in levels]
    if unknown or not names:
        sys.exit(f"FUSED_OPTIM_CPU_ISAS: {', '.join(unknown) or 'nothing'} is not a level of this architecture "
                 f"(levels: {', '.join(levels)}).")
    return {name: levels[name] for name in names}


# The kernels use LibTorch's stable ABI only (csrc/ops/torch_api.h), so the extensions load under every torch from
# STABLE_ABI_TARGET on; and they need no Python API of the build's Python either (py_limited_api: plain libraries
# loaded by torch.ops.load_library).
STABLE_ABI_FLAGS = runpy.run_path(os.path.join(ROOT, "fused_optim", "_stable_abi.py"))["STABLE_ABI_FLAGS"]


def extensions():
    # -fno-math-errno lets sqrt vectorise; -fno-trapping-math lets gcc compute both sides of a select of a group
    # constant (the update's branches), without which it left the bf16 and fp16 loops scalar. Neither changes a
    # result. No -ffast-math, and no contraction into FMAs: the update rounds each operation of torch's formulas on
    # its own, the same on every backend, and fp32 steps stay within an ulp of torch.optim.AdamW(foreach=False).
    cxx_flags = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off"]
    exts = [
        cpp_extension.CppExtension(
            f"fused_optim._C_cpu_{isa}",
            sources("csrc/registration.cpp") + sources("csrc/cpu/*.cpp"),
            include_dirs=INCLUDE,
            depends=CPU_HEADERS,
            extra_compile_args={"cxx": cxx_flags + isa_flags + STABLE_ABI_FLAGS},
            extra_link_args=["-fopenmp"],
            py_limited_api=True,
        )
        for isa, isa_flags in cpu_isas().items()
    ]
    build_cuda, reason = cuda_build_wanted()
    if build_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            if "bdist_wheel" in sys.argv:  # a wheel is for every GPU: Ampere, Hopper, Blackwell, PTX for newer ones
                os.environ["TORCH_CUDA_ARCH_LIST"] = WHEEL_CUDA_ARCHS
            elif not torch.cuda.is_available():
                os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"  # no GPU to ask: build for Hopper
        # --fmad=false: no a * b + c contracted into one FMA, as the CPU kernels are built (-ffp-contract=off), so
        # every backend rounds the same operations the same way and the optimizers step the same bits everywhere
        # (nvcc's division and square root are correctly rounded by default, as the CPU's)
        nvcc_flags = ["-O3", "-lineinfo", "--fmad=false"]
        if os.environ.get("FUSED_OPTIM_PTXAS_VERBOSE") == "1":
            nvcc_flags.append("-Xptxas=-v")
        exts.append(
            cpp_extension.CUDAExtension(
                "fused_optim._C_cuda",
                sources("csrc/cuda/*.cu") + sources("csrc/cuda/*.cpp"),
                include_dirs=INCLUDE,
                depends=CUDA_HEADERS,
                extra_compile_args={"cxx": ["-O3"] + STABLE_ABI_FLAGS, "nvcc": nvcc_flags + STABLE_ABI_FLAGS},
                py_limited_api=True,
            )
        )
    else:
        print(f"fused_optim: not building the CUDA extension: {reason}.", file=sys.stderr)
    return exts


# Written beside the extensions: the torch they were built under and its CUDA version (_backend.py refuses the CUDA
# kernels under a torch of another CUDA major version), and, for an in-place build, the stamp that tells
# `make build` the extensions are newer than their sources.
TORCH_RECORD = "_extensions_torch_version.txt"
BUILD_STAMP = os.path.join(ROOT, "fused_optim", ".extensions-built")


class BuildExtension(cpp_extension.BuildExtension.with_options(use_ninja=True)):
    """torch's ninja build, with each extension's objects in a folder of its own under build/temp.

    pip's editable install compiles in a throw-away folder, so `pip install -e .` and `setup.py build_ext --inplace`
    never shared an object; and the CPU levels compile the same sources with other flags, so in one folder each
    level overwrote the previous level's objects and ninja compiled everything again every time. With a fixed folder
    per extension, a change to one .cu file recompiles that file only, whichever command builds.
    """

    def build_extension(self, ext):
        shared_temp = self.build_temp
        self.build_temp = os.path.join(ROOT, "build", "temp", ext.name.rsplit(".", 1)[-1])
        try:
            super().build_extension(ext)
        finally:
            self.build_temp = shared_temp

    def run(self):
        super().run()
        package_dir = os.path.dirname(self.get_ext_fullpath(self.extensions[0].name))
        with open(os.path.join(package_dir, TORCH_RECORD), "w") as record:
            record.write(f"{torch.__version__}\n{torch.version.cuda or 'none'}\n")
        if self.inplace:
            with open(BUILD_STAMP, "w"):
                pass


if "bdist_wheel" in sys.argv:
    # A wheel packs whatever build/lib* holds: start it empty, so that no extension of an earlier build (another
    # FUSED_OPTIM_BUILD_CUDA or FUSED_OPTIM_CPU_ISAS) rides along. The objects in build/temp stay.
    for stale in glob.glob(os.path.join(ROOT, "build", "lib*")):
        shutil.rmtree(stale)

setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExtension})
