"""moment_int8.h's code_root, the square root in every int8 code a CUDA kernel writes, read off the SASS nvcc emits
here without a GPU.

On the GPU code_root is sqrtf's fast path written out: MUFU.RSQ and two FMAs, for a q held in [2^-60, 1]. It gives
sqrtf's bits only while (1) that is the very sequence nvcc emits for sqrtf and (2) [2^-60, 1] lies inside the range
in which nvcc takes that path. No CPU can run MUFU.RSQ, so the tests on this machine cannot compare the roots
themselves; this compares the two kernels' instructions, value by value, and reads the range off sqrtf's check.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parents[1]
NVCC = shutil.which("nvcc") or (os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc") if cpp_extension.CUDA_HOME else None)

SOURCE = """
#include "fused_optim/moment_int8.h"
__global__ void root_by_sqrtf(float* out, const float* in) { out[threadIdx.x] = sqrtf(in[threadIdx.x]); }
__global__ void root_by_code_root(float* out, const float* in) {
  out[threadIdx.x] = fused_optim::code_root(in[threadIdx.x]);
}
"""
INSTRUCTION = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")  # /*address*/ text ;
FLOAT_ARITHMETIC = ("FMUL", "FFMA", "FADD", "MUFU")


def cuobjdump() -> str:
    """Triton's cuobjdump (the one benchmarks/sass_per_element.py runs), else the CUDA toolkit's."""
    try:
        import triton

        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        if os.path.exists(tool):
            return tool
    except ImportError:
        pass
    tool = os.path.join(os.path.dirname(NVCC), "cuobjdump")
    if not os.path.exists(tool):
        pytest.skip("cuobjdump not found")
    return tool


@pytest.fixture(scope="module", params=["sm_80", "sm_90", "sm_100"])  # setup.py's WHEEL_CUDA_ARCHS
def kernels(request, tmp_path_factory) -> dict[str, dict[int, str]]:
    """Each kernel's SASS instructions by address, in order, by name (the extension's flags that bear on
    arithmetic)."""
    if NVCC is None or not os.path.exists(NVCC):
        pytest.skip("nvcc not found")
    folder = tmp_path_factory.mktemp("code_root")
    (folder / "roots.cu").write_text(SOURCE)
    includes = [f"-I{p}" for p in cpp_extension.include_paths("cuda")] + [f"-I{ROOT / 'csrc' / 'include'}"]
    subprocess.run([NVCC, "-O3", f"-arch={request.param}", "-std=c++20", "--fmad=false", "-cubin", *includes,
                    str(folder / "roots.cu"), "-o", str(folder / "roots.cubin")], check=True, capture_output=True)
    sass = subprocess.run([cuobjdump(), "-sass", str(folder / "roots.cubin")], check=True, capture_output=True,
                          text=True).stdout
    bodies = re.split(r"Function : (\S+)", sass)[1:]
    return {name: {int(match.group(1), 16): match.group(2) for line in body.splitlines()
                   if (match := INSTRUCTION.match(line))} for name, body in zip(bodies[::2], bodies[1::2])}


def kernel(kernels: dict[str, dict[int, str]], name: str) -> dict[int, str]:
    return next(body for mangled, body in kernels.items() if name in mangled)


def dataflow(instructions: list[str]) -> list[tuple[str, tuple[str, ...]]]:
    """The instructions as (opcode without .FTZ, operands), each register operand named by the instruction that
    wrote it ("in" for one written before): register allocation aside, equal lists compute the same values. FTZ
    changes nothing here: every operand and result of the sequence is a normal number for a q in [2^-60, 1]."""
    written, flow = {}, []
    for index, text in enumerate(instructions):
        opcode, _, rest = text.partition(" ")
        destination, *operands = [operand.strip() for operand in rest.split(",")]

        def name(operand: str) -> str:
            register = re.search(r"R\d+", operand)
            return operand if register is None else operand.replace(register.group(0),
                                                                    written.get(register.group(0), "in"))

        flow.append((opcode.replace(".FTZ", ""), tuple(name(operand) for operand in operands)))
        written[destination] = f"v{index}"
    return flow


def test_code_root_is_sqrtfs_fast_path_without_its_branch(kernels):
    by_sqrtf, by_code_root = kernel(kernels, "root_by_sqrtf"), list(kernel(kernels, "root_by_code_root").values())
    assert not [text for text in by_code_root if text.startswith(("CALL", "BSSY", "@"))], by_code_root
    # code_root: the clamp to 2^-60, then its arithmetic from MUFU.RSQ on
    start = next(i for i, text in enumerate(by_code_root) if text.startswith("MUFU.RSQ"))
    assert by_code_root[start - 1].startswith("FMNMX") and "8.6736173798840354721e-19" in by_code_root[start - 1]
    ours = [text for text in by_code_root[start:] if text.startswith(FLOAT_ARITHMETIC)]  # not the store's address
    # sqrtf: its MUFU.RSQ, then from where its range check branches for a q in range up to the BSYNC
    addresses, texts = list(by_sqrtf), list(by_sqrtf.values())
    rsqrt = next(text for text in texts if text.startswith("MUFU.RSQ"))
    branch = next(text for text in texts if re.match(r"@!P\d BRA 0x", text))
    target = addresses.index(int(branch.split()[-1], 16))
    fast = texts[target:next(i for i in range(target, len(texts)) if texts[i].startswith("BSYNC"))]
    fast = [text for text in fast if text.startswith(FLOAT_ARITHMETIC)]
    assert dataflow(ours) == dataflow([rsqrt, *fast]), (ours, [rsqrt, *fast])


def test_code_roots_range_is_where_sqrtf_takes_its_fast_path(kernels):
    """sqrtf's check: bits(q) - low > span (unsigned) sends q to the slow path; 2^-60 and 1 must pass."""
    texts = list(kernel(kernels, "root_by_sqrtf").values())
    low = int(re.search(r"IADD3 R\d+, (?:PT, PT, )?R\d+, -(0x[0-9a-f]+), RZ", "\n".join(texts)).group(1), 16)
    span = int(re.search(r"ISETP\.GT\.U32\.AND P\d, PT, R\d+, (0x[0-9a-f]+), PT", "\n".join(texts)).group(1), 16)
    for q in (2.0**-60, 1.0):
        bits = struct.unpack("<I", struct.pack("<f", q))[0]
        assert (bits - low) % 2**32 <= span, q
