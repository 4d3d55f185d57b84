"""code_root, the square root in every int8 code a GPU kernel writes (moment_int8.h for the CUDA C++ kernels,
fused_optim/triton/_exact_math.py for the Triton ones), read off the SASS that nvcc and Triton emit here without a
GPU.

On the GPU code_root is the correctly rounded root's fast path written out: MUFU.RSQ and two FMAs, for a q held in
[2^-60, 1]. It gives sqrtf's (tl.sqrt_rn's) bits only while (1) that is the very sequence the compiler emits for the
correctly rounded root and (2) [2^-60, 1] lies inside the range in which it takes that path. No CPU can run
MUFU.RSQ, so the tests on this machine cannot compare the roots themselves; this compares the two kernels'
instructions, value by value, and reads the range off the root's check.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parents[1]
NVCC = shutil.which("nvcc") or (os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc") if cpp_extension.CUDA_HOME else None)

CUDA_SOURCE = """
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


TRITON_SOURCE = """
import sys
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fused_optim.triton._exact_math import code_root
from fused_optim.triton._table import EXACT_ARITHMETIC


@triton.jit
def root_by_sqrt_rn(out_ptr, in_ptr):
    offsets = tl.arange(0, 128)
    tl.store(out_ptr + offsets, tl.sqrt_rn(tl.load(in_ptr + offsets)))


@triton.jit
def root_by_code_root(out_ptr, in_ptr):
    offsets = tl.arange(0, 128)
    tl.store(out_ptr + offsets, code_root(tl.load(in_ptr + offsets)))


for kernel in (root_by_sqrt_rn, root_by_code_root):
    source = ASTSource(fn=kernel, signature={"out_ptr": "*fp32", "in_ptr": "*fp32"})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={**EXACT_ARITHMETIC, "num_warps": 4})
    with open(sys.argv[1] + "/" + kernel.__name__ + ".cubin", "wb") as file:
        file.write(compiled.asm["cubin"])
"""


def sass(cubin: Path) -> dict[str, dict[int, str]]:
    """A cubin's kernels: their SASS instructions by address, in order, by name."""
    text = subprocess.run([cuobjdump(), "-sass", str(cubin)], check=True, capture_output=True, text=True).stdout
    bodies = re.split(r"Function : (\S+)", text)[1:]
    return {name: {int(match.group(1), 16): match.group(2) for line in body.splitlines()
                   if (match := INSTRUCTION.match(line))} for name, body in zip(bodies[::2], bodies[1::2])}


# nvcc for setup.py's WHEEL_CUDA_ARCHS, and Triton as its launcher compiles for an H100 (in a subprocess: the tests'
# TRITON_INTERPRET=1 would make its kernels interpreted, and code_root tl.sqrt_rn)
@pytest.fixture(scope="module", params=["nvcc-sm_80", "nvcc-sm_90", "nvcc-sm_100", "triton-sm_90"])
def kernels(request, tmp_path_factory) -> dict[str, dict[int, str]]:
    """The two kernels, by name: a root by the correctly rounded sqrt, and one by code_root."""
    folder = tmp_path_factory.mktemp("code_root")
    compiler, arch = request.param.split("-")
    if compiler == "triton":
        pytest.importorskip("triton")
        (folder / "roots.py").write_text(TRITON_SOURCE)
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        subprocess.run([sys.executable, str(folder / "roots.py"), str(folder)], check=True, env=env, timeout=300)
        return {**sass(folder / "root_by_sqrt_rn.cubin"), **sass(folder / "root_by_code_root.cubin")}
    if NVCC is None or not os.path.exists(NVCC):
        pytest.skip("nvcc not found")
    (folder / "roots.cu").write_text(CUDA_SOURCE)
    includes = [f"-I{p}" for p in cpp_extension.include_paths("cuda")] + [f"-I{ROOT / 'csrc' / 'include'}"]
    subprocess.run([NVCC, "-O3", f"-arch={arch}", "-std=c++20", "--fmad=false", "-cubin", *includes,
                    str(folder / "roots.cu"), "-o", str(folder / "roots.cubin")], check=True, capture_output=True)
    return sass(folder / "roots.cubin")


def kernel(kernels: dict[str, dict[int, str]], name: str) -> dict[int, str]:
    return next(body for mangled, body in kernels.items() if name in mangled)


def dataflow(instructions: list[str]) -> list[tuple[str, tuple[str, ...]]]:
    """The instructions as (opcode without .FTZ, operands), each register operand named by the instruction that
    wrote it ("in" for one written before): register allocation aside, equal lists compute the same values.
    - FTZ changes nothing here: every operand and result of the sequence is a normal number for a q in [2^-60, 1].
    - `FADD d, RZ, -x` (Triton 3.6's negation; 3.8 folds it into the FMA's operand) is -x, exactly for the x != 0
      here: it is no value of its own, and a product's sign may sit on either factor, in either order."""
    written, flow = {}, []
    for index, text in enumerate(instructions):
        opcode, _, rest = text.partition(" ")
        destination, *operands = [operand.strip() for operand in rest.split(",")]

        def name(operand: str) -> str:
            register = re.search(r"R\d+", operand)
            if register is None:
                return operand
            value = operand.replace(register.group(0), written.get(register.group(0), "in"))
            return value[2:] if value.startswith("--") else value

        operands = [name(operand) for operand in operands]
        if opcode.startswith("FADD") and operands[0] == "RZ" and operands[1].startswith("-"):
            written[destination] = operands[1]
            continue
        if opcode.startswith(("FMUL", "FFMA")):  # the product's factors: sorted, their signs on the first
            factors = [factor.lstrip("-") for factor in operands[:2]]
            negative = sum(factor.startswith("-") for factor in operands[:2]) % 2
            factors.sort()
            operands[:2] = ["-" + factors[0] if negative else factors[0], factors[1]]
        flow.append((opcode.replace(".FTZ", ""), tuple(operands)))
        written[destination] = f"v{len(flow) - 1}"
    return flow


def test_code_root_is_the_roots_fast_path_without_its_branch(kernels):
    by_sqrt, by_code_root = kernel(kernels, "root_by_sqrt"), list(kernel(kernels, "root_by_code_root").values())
    assert not [text for text in by_code_root if text.startswith(("CALL", "BSSY", "@"))], by_code_root
    # code_root: the clamp to 2^-60, then its arithmetic from MUFU.RSQ on
    start = next(i for i, text in enumerate(by_code_root) if text.startswith("MUFU.RSQ"))
    assert by_code_root[start - 1].startswith("FMNMX") and "8.6736173798840354721e-19" in by_code_root[start - 1]
    ours = [text for text in by_code_root[start:] if text.startswith(FLOAT_ARITHMETIC)]  # not the store's address
    # the root: its MUFU.RSQ, then from where its range check branches for a q in range up to the BSYNC
    addresses, texts = list(by_sqrt), list(by_sqrt.values())
    rsqrt = next(text for text in texts if text.startswith("MUFU.RSQ"))
    branch = next(text for text in texts if re.match(r"@!P\d BRA 0x", text))
    target = addresses.index(int(branch.split()[-1], 16))
    fast = texts[target:next(i for i in range(target, len(texts)) if texts[i].startswith("BSYNC"))]
    fast = [text for text in fast if text.startswith(FLOAT_ARITHMETIC)]
    assert dataflow(ours) == dataflow([rsqrt, *fast]), (ours, [rsqrt, *fast])


def test_code_roots_range_is_where_the_root_takes_its_fast_path(kernels):
    """The root's check: bits(q) - low > span (unsigned) sends q to the slow path; 2^-60 and 1 must pass."""
    texts = list(kernel(kernels, "root_by_sqrt").values())
    low = int(re.search(r"IADD3 R\d+, (?:PT, PT, )?R\d+, -(0x[0-9a-f]+), RZ", "\n".join(texts)).group(1), 16)
    span = int(re.search(r"ISETP\.GT\.U32\.AND P\d, PT, R\d+, (0x[0-9a-f]+), PT", "\n".join(texts)).group(1), 16)
    for q in (2.0**-60, 1.0):
        bits = struct.unpack("<I", struct.pack("<f", q))[0]
        assert (bits - low) % 2**32 <= span, q
