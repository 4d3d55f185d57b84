"""The CUDA kernels' loads and stores are 16 bytes wide, read off the PTX that nvcc emits here without a GPU.

A kernel that silently falls back to 4-byte accesses still passes every numerical test and runs at a third of the
bandwidth (nvcc once split the bf16 kernels' fp32 stores exactly so), so the width is checked on every machine
that has nvcc.
"""

import functools
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from torch.utils import cpp_extension

from fused_optim._stable_abi import STABLE_ABI_FLAGS

ROOT = Path(__file__).resolve().parents[1]
NVCC = shutil.which("nvcc") or (os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc") if cpp_extension.CUDA_HOME else None)


@functools.cache
def kernels_ptx(source: str) -> dict[str, str]:
    """The PTX body of every kernel in csrc/cuda/<source>, by mangled name (setup.py's flags: --fmad=false). Cached:
    nvcc takes up to 20 s a file here, and several tests read the same file's kernels."""
    if NVCC is None or not os.path.exists(NVCC):
        pytest.skip("nvcc not found")
    includes = [f"-I{p}" for p in cpp_extension.include_paths("cuda")]
    includes += [f"-I{ROOT / 'csrc' / 'include'}", f"-I{ROOT / 'csrc'}"]
    with tempfile.TemporaryDirectory() as out_dir:
        out = Path(out_dir) / (Path(source).stem + ".ptx")
        subprocess.run([NVCC, "-O3", "--fmad=false", "-arch=sm_90", "-std=c++20", "--expt-relaxed-constexpr", "-ptx",
                        *STABLE_ABI_FLAGS, *includes, str(ROOT / "csrc/cuda" / source), "-o", str(out)],
                       check=True, capture_output=True)
        ptx = out.read_text()
    kernels = {}
    for match in re.finditer(r"\.entry (\S+)\(", ptx):
        end = ptx.find(".entry", match.end())
        kernels[match.group(1)] = ptx[match.end(): end if end > 0 else None]
    return kernels


def kernels_of(source: str, kernel: str) -> dict[str, str]:
    """The kernels of csrc/cuda/<source> whose mangled names hold `kernel`."""
    return {name: body for name, body in kernels_ptx(source).items() if kernel in name}


# rounding.h's WriteBack, as nvcc mangles it (the template argument's value)
NEAREST, MASTER, REMAINDER, STOCHASTIC, REMAINDER8 = "0", "1", "2", "3", "4"


def template_arguments(names) -> dict[str, list[str]]:
    """Each mangled kernel name's template arguments, as c++filt spells them ("float", "c10::BFloat16", "false")."""
    if shutil.which("c++filt") is None:
        pytest.skip("c++filt not found")
    demangled = subprocess.run(["c++filt", *names], check=True, capture_output=True, text=True).stdout.splitlines()
    return {name: re.search(r"<(.*?)>\(", line).group(1).split(", ") for name, line in zip(names, demangled)}


def test_every_adam_kernel_moves_state_with_16_byte_accesses():
    kernels = kernels_of("adam.cu", "adam_kernel")
    # 7 (param, grad) dtype pairs x moment dtype x amsgrad x (nearest, master), and (stochastic, remainders of 16 and
    # 8 bits) for the 2 bf16 pairs
    assert len(kernels) == 80
    for name, (param_t, grad_t, moment_t, amsgrad, write) in template_arguments(list(kernels)).items():
        body, write = kernels[name], write[-1]  # "(fused_optim::WriteBack)2"
        moments = 2 + (amsgrad == "true")  # exp_avg, exp_avg_sq, [max_exp_avg_sq]
        fp32_arrays = (moments if moment_t == "float" else 0) + int(write == MASTER)
        # each fp32 array: two 16-byte loads and two 16-byte stores per 8 elements
        assert body.count("ld.global.v4.f32") >= 2 * fp32_arrays, name
        assert body.count("st.global.v4.f32") >= 2 * fp32_arrays, name
        # 16-bit arrays, 8 elements in one 16-byte access: bf16 moments, a 16-bit param, grad and int16 remainder
        stored = (moments if moment_t == "c10::BFloat16" else 0) + (param_t != "float") + (write == REMAINDER)
        loaded = stored + (grad_t != "float") - (param_t != "float" and write == MASTER)  # read from its master
        assert len(re.findall(r"ld\.global(?:\.\w+)*\.v4\.[bu]32", body)) >= loaded, name
        assert len(re.findall(r"st\.global(?:\.\w+)*\.v4\.[bu]32", body)) >= stored, name
        if write == REMAINDER8:  # the bf16 param in 16 bytes, its 8 int8 remainders in 8
            assert re.findall(r"ld\.global(?:\.\w+)*\.v2\.[bu]32", body), name
            assert re.findall(r"st\.global(?:\.\w+)*\.v2\.[bu]32", body), name
        assert "ld.local" not in body and "st.local" not in body, f"{name} uses local memory"


def test_every_int8_moment_adam_kernel_moves_codes_in_8_byte_accesses():
    """moments="int8" (adam_int8.cu): the codes of 8 elements in one 8-byte access per moment, params and grads as
    in adam.cu, the block's scale found by warp shuffles, nothing in local memory."""
    kernels = kernels_of("adam_int8.cu", "adam_int8_kernel")
    assert len(kernels) == 40  # 7 (param, grad) pairs x amsgrad x (nearest, master), and 3 bf16-only write-backs
    for name, (param_t, grad_t, amsgrad, write) in template_arguments(list(kernels)).items():
        body, write = kernels[name], write[-1]
        codes = 2 + (amsgrad == "true")
        assert len(re.findall(r"ld\.global(?:\.\w+)*\.v2\.[bu]32", body)) >= codes, name
        assert len(re.findall(r"st\.global(?:\.\w+)*\.v2\.[bu]32", body)) >= codes, name
        # the param (or its master) and the grad in 16-byte loads, the param in 16-byte stores
        assert len(re.findall(r"ld\.global(?:\.\w+)*\.v4\.[bfu]32", body)) >= 2, name
        stored = "st.global.v4.f32" if param_t == "float" else r"st\.global(?:\.\w+)*\.v4\.[bu]32"
        assert re.findall(stored, body), name
        assert body.count("shfl.sync.bfly") >= 3 * (2 + (amsgrad == "true")), name
        assert "ld.local" not in body and "st.local" not in body, f"{name} uses local memory"


@pytest.mark.parametrize("source, kernel, count", [
    ("sgd.cu", "sgd_int8_kernel", 40),  # Lion's 20 write-backs of param and grad dtypes x nesterov
    ("lion.cu", "lion_int8_kernel", 20),  # 7 (param, grad) pairs x (nearest, master), and 3 bf16-only write-backs
])
def test_every_single_moment_int8_kernel_moves_codes_in_8_byte_accesses(source, kernel, count):
    """SGD's momentum buffer and Lion's exp_avg with moments="int8" (int8_codes.cuh's step_signed_codes): the 8
    codes in one 8-byte access, param and grad in 16-byte ones, the block's scale by warp shuffles, nothing in local
    memory."""
    kernels = kernels_of(source, kernel)
    assert len(kernels) == count
    for name, body in kernels.items():
        assert re.findall(r"ld\.global(?:\.\w+)*\.v2\.[bu]32", body), name
        assert re.findall(r"st\.global(?:\.\w+)*\.v2\.[bu]32", body), name
        assert len(re.findall(r"ld\.global(?:\.\w+)*\.v4\.[bfu]32", body)) >= 2, name
        assert body.count("shfl.sync.bfly") >= 3, name
        assert "ld.local" not in body and "st.local" not in body, f"{name} uses local memory"


def test_cross_entropy_kernels_stream_rows_with_16_byte_accesses():
    # fp32, bf16, fp16 logits: the row is read (twice) and its gradient written in 16-byte vectors
    forward = kernels_of("cross_entropy.cu", "cross_entropy_forward_kernel")
    assert len(forward) == 3
    for name, body in forward.items():
        loads = re.findall(r"ld\.global(?:\.\w+)*\.v4\.\w+", body)
        stores = re.findall(r"st\.global(?:\.\w+)*\.v4\.\w+", body)
        assert len(loads) >= 2 and len(stores) >= 2, (name, loads, stores)  # pass 1, pass 2 / gradient, zeros
        assert "ld.local" not in body and "st.local" not in body, f"{name} uses local memory"


@pytest.mark.parametrize("kernel, stores", [("shard_stats_kernel", 0), ("shard_grad_kernel", 1)])
def test_vocab_parallel_kernels_stream_their_shard_with_16_byte_accesses(kernel, stores):
    # pass 1 reads the shard (its stats are one 16-byte store a row); pass 2 reads it and writes the gradient
    bodies = kernels_of("cross_entropy.cu", kernel)
    assert len(bodies) == 3  # fp32, bf16, fp16
    for name, body in bodies.items():
        assert re.findall(r"ld\.global(?:\.\w+)*\.v4\.\w+", body), name
        assert len(re.findall(r"st\.global(?:\.\w+)*\.v4\.\w+", body)) >= stores, name
        assert "ld.local" not in body and "st.local" not in body, f"{name} uses local memory"


def assert_single_moment_kernel_accesses(name: str, body: str, param_t: str, grad_t: str, state_width: int,
                                         write: str) -> None:
    """An SGD or Lion kernel's 16-byte accesses per 8 elements: an fp32 array (its moment or buffer, a master copy)
    takes two, a 16-bit one (a bf16 param or moment, a remainder) one; `state_width`: its moment's (0: none); `write`:
    the WriteBack's digit. Nothing in local memory."""
    loads = re.findall(r"ld\.global(?:\.\w+)*\.v4\.\w+", body)
    stores = re.findall(r"st\.global(?:\.\w+)*\.v4\.\w+", body)
    width = {"float": 2}
    master = {MASTER: 2, REMAINDER: 1}.get(write, 0)
    param_loads = 2 if write == MASTER else width.get(param_t, 1)  # the master copy is read instead of the param
    expected_loads = param_loads + width.get(grad_t, 1) + state_width + int(write == REMAINDER)
    if write == REMAINDER8:  # eight int8 remainders: one 8-byte load and store
        assert re.findall(r"ld\.global(?:\.\w+)*\.v2\.[bu]32", body), name
        assert re.findall(r"st\.global(?:\.\w+)*\.v2\.[bu]32", body), name
    expected_stores = width.get(param_t, 1) + state_width + master
    assert len(loads) >= expected_loads and len(stores) >= expected_stores, (name, loads, stores)
    assert "ld.local" not in body and "st.local" not in body, f"{name} uses local memory"


def test_every_sgd_kernel_moves_its_arrays_with_16_byte_accesses():
    kernels = kernels_of("sgd.cu", "sgd_kernel")
    # 20 (param, grad, write-back) triples as Lion's x (no momentum, and momentum and nesterov with an fp32 or a bf16
    # buffer)
    assert len(kernels) == 100
    for name, (param_t, grad_t, buffer_t, momentum, _, write) in template_arguments(list(kernels)).items():
        buffer = (2 if buffer_t == "float" else 1) if momentum == "true" else 0
        assert_single_moment_kernel_accesses(name, kernels[name], param_t, grad_t, buffer,
                                             write[-1])  # "(fused_optim::WriteBack)2"


def test_every_lion_kernel_moves_its_arrays_with_16_byte_accesses():
    kernels = kernels_of("lion.cu", "lion_kernel")
    # 7 (param, grad) dtype pairs (fp32 params take fp32, bf16 and fp16 grads; 16-bit params their own dtype's and
    # fp32) x 2 moment dtypes x (nearest, master), and (stochastic, remainders of 16 and 8 bits) for the 2 bf16 pairs
    assert len(kernels) == 40
    for name, (param_t, grad_t, moment_t, write) in template_arguments(list(kernels)).items():
        assert_single_moment_kernel_accesses(name, kernels[name], param_t, grad_t, 2 if moment_t == "float" else 1,
                                             write[-1])


def test_accumulate_kernels_move_grads_with_16_byte_accesses():
    kernels = kernels_of("accumulate.cu", "accumulate_kernel")
    assert len(kernels) == 3  # fp32, bf16, fp16 grads
    for name, body in kernels.items():
        # the fp32 main grad: two 16-byte loads and stores per 8 elements; the grad: one (16-bit) or two (fp32)
        assert body.count("ld.global.v4.f32") >= 2 and body.count("st.global.v4.f32") >= 2, name
        assert len(re.findall(r"ld\.global(?:\.\w+)*\.v4\.\w+", body)) >= 3, name
        assert "ld.local" not in body and "st.local" not in body, f"{name} uses local memory"


def test_total_norm_kernels_read_with_16_byte_loads():
    kernels = kernels_of("total_norm.cu", "block_partials_kernel")
    assert len(kernels) == 12  # 4 norm kinds x 3 dtypes
    for name, body in kernels.items():
        assert re.search(r"ld\.global(?:\.\w+)*\.v4\.\w+", body), name
        assert "ld.local" not in body and "st.local" not in body, f"{name} uses local memory"
