"""The Triton AdamW, SGD, Lion, cross-entropy, gradient-accumulation and total-norm kernels compiled ahead of time for
the H100 (sm_90), with no GPU, and their PTX read.

When the host saw every address 16-byte aligned it passes ALIGNED=True, and the kernel's whole blocks must then
move 16 bytes per load and store (`ld.global.v4.b32`: 4 fp32 or 8 bf16); with ALIGNED=False the compiler cannot
assume that and must fall back to narrower accesses (for bf16, 2-byte `ld.global.b16`).

The compile runs in a subprocess without TRITON_INTERPRET: under the interpreter (set by conftest.py on machines
without a GPU) `@triton.jit` yields an InterpretedFunction, which `triton.compile` cannot take (it has no
`cache_key`), so the kernel must be imported afresh with the variable unset.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_COMPILE = r"""
import json, re, sys
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fused_optim.triton._table import EXACT_ARITHMETIC
from fused_optim.triton.adam import NEAREST, REMAINDER, REMAINDER8, _adam_kernel
from fused_optim.triton.adam import BLOCKS as ADAM_BLOCKS, MAX_REGISTERS as ADAM_MAX_REGISTERS
from fused_optim.triton.accumulate import _accumulate_kernel
from fused_optim.triton.cross_entropy import _cross_entropy_forward_kernel, _shard_grad_kernel, _shard_stats_kernel
from fused_optim.triton import lion, sgd
from fused_optim.triton.lion import _lion_kernel
from fused_optim.triton.sgd import _sgd_kernel
from fused_optim.triton.total_norm import NORM_2, _norm_partials_kernel

SIGNATURE = {  # the runtime arguments of _adam_kernel, in order
    "table_ptr": "*i64", "lr_bits": "i64", "lr_ptr": "*fp32", "grad_scale_ptr": "*fp32", "found_inf_ptr": "*fp32",
    "log_beta1_bits": "i64", "log_beta2_bits": "i64", "one_minus_beta1": "fp32", "beta2": "fp32",
    "one_minus_beta2": "fp32", "eps": "fp32", "weight_decay_bits": "i64", "seed": "i32", "first_tensor_index": "i32",
    "num_tensors": "i32",
}
results = {}

def accesses(ptx):
    return {"target": re.search(r"\.target\s+(\w+)", ptx).group(1),
            "loads": sorted(set(re.findall(r"ld\.global(?:\.\w+)*", ptx))),
            "stores": sorted(set(re.findall(r"st\.global(?:\.\w+)*", ptx))),
            "fmas": len(re.findall(r"\bfma\.rn\.f32", ptx)),
            "divisions": len(re.findall(r"\bdiv\.rn\.f32", ptx)),
            "approximate_divisions": len(re.findall(r"\bdiv\.(?:full|approx)(?:\.ftz)?\.f32", ptx))}

# rounded to nearest, and (bf16) through a master remainder: its int16 stream beside the param's
# and (fp32 and bf16 params) with bf16 moments
WRITES = (("fp32", tl.float32, NEAREST.value, tl.float32), ("bf16", tl.bfloat16, NEAREST.value, tl.float32),
          ("bf16-remainder", tl.bfloat16, REMAINDER.value, tl.float32),
          ("bf16-remainder24", tl.bfloat16, REMAINDER8.value, tl.float32),
          ("fp32-bf16-moments", tl.float32, NEAREST.value, tl.bfloat16),
          ("bf16-bf16-moments", tl.bfloat16, NEAREST.value, tl.bfloat16),
          ("fp32-int8-moments", tl.float32, NEAREST.value, tl.int8),
          ("bf16-remainder24-int8-moments", tl.bfloat16, REMAINDER8.value, tl.int8))
# Each write aligned and not, and fp32 params with a grad scale (aligned): the kernels' 1 / grad_scale.
VARIANTS = [(f"{name}-{'aligned' if aligned else 'unaligned'}", dtype, write, moment_dtype, aligned, False)
            for name, dtype, write, moment_dtype in WRITES for aligned in (True, False)]
VARIANTS.append(("fp32-grad-scale", tl.float32, NEAREST.value, tl.float32, True, True))

def compile_ptx(kernel, signature, constexprs, max_registers):
    source = ASTSource(fn=kernel, signature={**signature, **{k: "constexpr" for k in constexprs}},
                       constexprs=constexprs, attrs={(0,): [["tt.divisibility", 16]]})
    return triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options={**EXACT_ARITHMETIC, "maxnreg": max_registers}).asm["ptx"]

for name, dtype, write, moment_dtype, aligned, grad_scale in VARIANTS:
    constexprs = dict(PARAM_DTYPE=dtype, GRAD_DTYPE=dtype, MOMENT_DTYPE=moment_dtype, DECOUPLED=True, AMSGRAD=False,
                      MAXIMIZE=False, WRITE=write, HAS_LR_TENSOR=False, HAS_GRAD_SCALE=grad_scale,
                      HAS_FOUND_INF=False, ALIGNED=aligned, SEARCH_STEPS=1, COLUMNS=9, BLOCK=1024, BLOCKS=ADAM_BLOCKS)
    results[name] = accesses(compile_ptx(_adam_kernel, SIGNATURE, constexprs, ADAM_MAX_REGISTERS))

# The SGD kernel with momentum (param, grad and buffer streams, and a master's).
SGD_SIGNATURE = {"table_ptr": "*i64", "lr": "fp32", "lr_ptr": "*fp32", "grad_scale_ptr": "*fp32",
                 "found_inf_ptr": "*fp32", "momentum": "fp32", "one_minus_dampening": "fp32", "weight_decay": "fp32",
                 "seed": "i32", "first_tensor_index": "i32", "num_tensors": "i32"}
for name, dtype, write, buffer_dtype, aligned, grad_scale in VARIANTS:
    constexprs = dict(PARAM_DTYPE=dtype, GRAD_DTYPE=dtype, BUFFER_DTYPE=buffer_dtype, MOMENTUM=True, NESTEROV=False,
                      MAXIMIZE=False, WRITE=write, HAS_LR_TENSOR=False, HAS_GRAD_SCALE=grad_scale,
                      HAS_FOUND_INF=False, ALIGNED=aligned, SEARCH_STEPS=1, COLUMNS=7, BLOCK=1024, BLOCKS=sgd.BLOCKS)
    results[f"sgd-{name}"] = accesses(compile_ptx(_sgd_kernel, SGD_SIGNATURE, constexprs, sgd.MAX_REGISTERS))

# The Lion kernel (param, grad and moment streams).
LION_SIGNATURE = {"table_ptr": "*i64", "lr_bits": "i64", "lr_ptr": "*fp32", "grad_scale_ptr": "*fp32",
                  "found_inf_ptr": "*fp32", "beta1": "fp32", "one_minus_beta1": "fp32", "beta2": "fp32",
                  "one_minus_beta2": "fp32", "weight_decay_bits": "i64", "seed": "i32", "first_tensor_index": "i32",
                  "num_tensors": "i32"}
for name, dtype, write, moment_dtype, aligned, grad_scale in VARIANTS:
    constexprs = dict(PARAM_DTYPE=dtype, GRAD_DTYPE=dtype, MOMENT_DTYPE=moment_dtype, MAXIMIZE=False, WRITE=write,
                      HAS_LR_TENSOR=False, HAS_GRAD_SCALE=grad_scale, HAS_FOUND_INF=False, ALIGNED=aligned,
                      SEARCH_STEPS=1, COLUMNS=7, BLOCK=1024, BLOCKS=lion.BLOCKS)
    results[f"lion-{name}"] = accesses(compile_ptx(_lion_kernel, LION_SIGNATURE, constexprs, lion.MAX_REGISTERS))

# The cross-entropy kernel as Triton's launcher specialises it for a vocabulary and row stride that are multiples
# of 16 and 16-byte aligned tensors (what the divisibility attributes say).
CE_SIGNATURE = {"logits_ptr": None, "target_ptr": "*i64", "weight_ptr": "*fp32", "scales_ptr": "*fp32",
                "grad_ptr": None, "loss_ptr": "*fp32", "lse_ptr": "*fp32", "num_classes": "i32", "row_stride": "i32",
                "ignore_index": "i64", "label_smoothing": "fp32", "z_loss": "fp32", "softcap": "fp32"}
for name, pointer in (("fp32", "*fp32"), ("bf16", "*bf16")):
    constexprs = dict(HAS_WEIGHT=False, HAS_GRAD=True, SOFTCAP=False, GRAD_IS_BF16=name == "bf16", BLOCK=8192)
    signature = {**CE_SIGNATURE, "logits_ptr": pointer, "grad_ptr": pointer, **{k: "constexpr" for k in constexprs}}
    source = ASTSource(fn=_cross_entropy_forward_kernel, signature=signature, constexprs=constexprs,
                       attrs={(i,): [["tt.divisibility", 16]] for i in range(9)})
    ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8}).asm["ptx"]
    results[f"cross_entropy-{name}"] = accesses(ptx)
    # the two passes of a vocabulary-parallel row, over a shard of the same kind
    constexprs = dict(HAS_WEIGHT=False, SOFTCAP=False, BLOCK=8192)
    signature = {"logits_ptr": pointer, "target_ptr": "*i64", "weight_ptr": "*fp32", "stats_ptr": "*fp32",
                 "shard_classes": "i32", "row_stride": "i32", "class_start": "i64", "num_classes": "i64",
                 "ignore_index": "i64", "softcap": "fp32", **{k: "constexpr" for k in constexprs}}
    source = ASTSource(fn=_shard_stats_kernel, signature=signature, constexprs=constexprs,
                       attrs={(i,): [["tt.divisibility", 16]] for i in range(6)})
    results[f"shard_stats-{name}"] = accesses(
        triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8}).asm["ptx"])
    constexprs = dict(HAS_WEIGHT=False, SOFTCAP=False, GRAD_IS_BF16=name == "bf16", BLOCK=4096)
    signature = {"grad_ptr": pointer, "logits_ptr": pointer, "target_ptr": "*i64", "weight_ptr": "*fp32",
                 "coefs_ptr": "*fp32", "shard_classes": "i32", "row_stride": "i32", "class_start": "i64",
                 "ignore_index": "i64", "softcap": "fp32", **{k: "constexpr" for k in constexprs}}
    source = ASTSource(fn=_shard_grad_kernel, signature=signature, constexprs=constexprs,
                       attrs={(i,): [["tt.divisibility", 16]] for i in range(7)})
    results[f"shard_grad-{name}"] = accesses(triton.compile(source, target=GPUTarget("cuda", 90, 32)).asm["ptx"])

# The multi-tensor kernels of gradient accumulation (fp32 main grads += grads) and of the total norm's partials,
# for fp32 and bf16 grads, with and without the host's alignment promise.
for name, dtype in (("fp32", tl.float32), ("bf16", tl.bfloat16)):
    for aligned in (True, False):
        suffix = f"{name}-{'aligned' if aligned else 'unaligned'}"
        constexprs = dict(GRAD_DTYPE=dtype, ALIGNED=aligned, SEARCH_STEPS=1, COLUMNS=3, BLOCK=1024)
        signature = {"table_ptr": "*i64", "num_tensors": "i32", **{k: "constexpr" for k in constexprs}}
        source = ASTSource(fn=_accumulate_kernel, signature=signature, constexprs=constexprs,
                           attrs={(0,): [["tt.divisibility", 16]]})
        results[f"accumulate-{suffix}"] = accesses(triton.compile(source, target=GPUTarget("cuda", 90, 32)).asm["ptx"])
        constexprs = dict(DTYPE=dtype, NORM=NORM_2.value, ALIGNED=aligned, SEARCH_STEPS=1, COLUMNS=2, BLOCK=1024)
        signature = {"table_ptr": "*i64", "partials_ptr": "*fp64", "num_tensors": "i32", "p_bits": "i64",
                     **{k: "constexpr" for k in constexprs}}
        source = ASTSource(fn=_norm_partials_kernel, signature=signature, constexprs=constexprs,
                           attrs={(0,): [["tt.divisibility", 16]], (1,): [["tt.divisibility", 16]]})
        results[f"total_norm-{suffix}"] = accesses(triton.compile(source, target=GPUTarget("cuda", 90, 32)).asm["ptx"])
json.dump(results, sys.stdout)
"""


@pytest.fixture(scope="module")
def ptx_accesses() -> dict:
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, "-c", _COMPILE], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout)


OPTIMIZER_KERNELS = [(kernel, dtype) for kernel in ("", "sgd-", "lion-")
                     for dtype in ("fp32", "bf16", "bf16-remainder", "bf16-remainder24", "fp32-bf16-moments",
                                   "bf16-bf16-moments")]
OPTIMIZER_KERNEL_IDS = [f"{dtype}-{kernel.rstrip('-') or 'adam'}" for kernel, dtype in OPTIMIZER_KERNELS]


@pytest.mark.parametrize("kernel, dtype", OPTIMIZER_KERNELS, ids=OPTIMIZER_KERNEL_IDS)
def test_aligned_kernel_moves_16_bytes_per_access(ptx_accesses, dtype, kernel):
    accesses = ptx_accesses[f"{kernel}{dtype}-aligned"]
    assert accesses["target"] in ("sm_90", "sm_90a")  # Triton targets the arch-specific sm_90a
    assert "ld.global.v4.b32" in accesses["loads"], accesses
    assert "st.global.v4.b32" in accesses["stores"], accesses


@pytest.mark.parametrize("kernel, dtype", OPTIMIZER_KERNELS, ids=OPTIMIZER_KERNEL_IDS)
def test_unaligned_kernel_falls_back_to_narrow_accesses(ptx_accesses, dtype, kernel):
    accesses = ptx_accesses[f"{kernel}{dtype}-unaligned"]
    assert not [a for a in accesses["loads"] + accesses["stores"] if ".v2" in a or ".v4" in a], accesses
    narrow = "ld.global.b16" if dtype.startswith("bf16") else "ld.global.b32"
    assert narrow in accesses["loads"], accesses


@pytest.mark.parametrize("kernel, dtype", OPTIMIZER_KERNELS + [(k, "fp32-int8-moments") for k in ("", "sgd-", "lion-")],
                         ids=OPTIMIZER_KERNEL_IDS + ["int8-adam", "int8-sgd", "int8-lion"])
def test_optimizer_kernel_contracts_nothing_into_an_fma(ptx_accesses, kernel, dtype):
    """Launched with EXACT_ARITHMETIC, each multiply and add is rounded on its own, as on the CPU and in the CUDA C++
    kernels (nvcc --fmad=false): the same bits on every backend. Triton's default fused 48 of them in AdamW. (The fp64
    bias corrections keep the FMAs of libdevice's exp, which are its algorithm, not a contraction.) The explicit
    tl.fma, 8 elements a thread on each of the two paths (whole and partial blocks, BLOCK 1024), and nothing else:
    SGD's weight decay, momentum and param update, torch's add(alpha=)s rounded once as the CPU's fmaf does (three
    an element, with momentum and without Nesterov); Adam's division by sqrt(1 - beta2^t) (two) and each int8 code's
    root (two a moment), _exact_math.py's sequences, which need the FMA's single rounding."""
    per_element = {"": 2 + (4 if "int8" in dtype else 0), "sgd-": 3 + (2 if "int8" in dtype else 0),
                   "lion-": 2 if "int8" in dtype else 0}[kernel]
    assert ptx_accesses[f"{kernel}{dtype}-aligned"]["fmas"] == 8 * 2 * per_element


@pytest.mark.parametrize("kernel", ["", "sgd-", "lion-"], ids=["adam", "sgd", "lion"])
def test_optimizer_kernel_divides_correctly_rounded(ptx_accesses, kernel):
    """Every fp32 division of an optimizer kernel is correctly rounded (div.rn), as in adam.h, sgd.h and lion.h:
    Triton's `/` is the GPU's approximate division (div.full.f32, within 2 ulps), which the interpreter does not
    show. 1 / grad_scale was one, and max_grad_norm folds its clip coefficient, no power of two, into that scale."""
    scaled = ptx_accesses[f"{kernel}fp32-grad-scale"]
    assert scaled["divisions"] > ptx_accesses[f"{kernel}fp32-aligned"]["divisions"], scaled  # 1 / grad_scale
    variants = [name for name in ptx_accesses if name.startswith(kernel or ("fp32", "bf16"))]
    assert variants and not [name for name in variants if ptx_accesses[name]["approximate_divisions"]]


@pytest.mark.parametrize("kernel, dtype", [("", "fp32-int8-moments"), ("", "bf16-remainder24-int8-moments"),
                                           ("lion-", "fp32-int8-moments"), ("lion-", "bf16-remainder24-int8-moments"),
                                           ("sgd-", "fp32-int8-moments"), ("sgd-", "bf16-remainder24-int8-moments")])
def test_int8_moment_kernel_moves_16_bytes_per_access(ptx_accesses, kernel, dtype):
    """moments="int8": whole blocks keep 16-byte accesses (the tensor's last, partial block moves single bytes)."""
    accesses = ptx_accesses[f"{kernel}{dtype}-aligned"]
    assert "ld.global.v4.b32" in accesses["loads"] and "st.global.v4.b32" in accesses["stores"], accesses


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_cross_entropy_kernel_streams_rows_with_16_byte_accesses(ptx_accesses, dtype):
    accesses = ptx_accesses[f"cross_entropy-{dtype}"]
    assert "ld.global.v4.b32" in accesses["loads"], accesses
    assert "st.global.v4.b32" in accesses["stores"], accesses


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_cross_entropy_kernel_divides_its_row_scalars_correctly_rounded(ptx_accesses, dtype):
    """A row's 1 / sum, which scales every probability of the row, and label smoothing's share per class, are
    correctly rounded (div.rn), not the GPU's approximate division that Triton's `/` gives."""
    accesses = ptx_accesses[f"cross_entropy-{dtype}"]
    assert accesses["divisions"] >= 3 and accesses["approximate_divisions"] == 0, accesses


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_vocab_parallel_kernels_stream_their_shard_with_16_byte_accesses(ptx_accesses, dtype):
    assert "ld.global.v4.b32" in ptx_accesses[f"shard_stats-{dtype}"]["loads"], ptx_accesses[f"shard_stats-{dtype}"]
    grad = ptx_accesses[f"shard_grad-{dtype}"]
    assert "ld.global.v4.b32" in grad["loads"] and "st.global.v4.b32" in grad["stores"], grad


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_accumulate_kernel_moves_16_bytes_per_access_when_aligned(ptx_accesses, dtype):
    aligned, unaligned = ptx_accesses[f"accumulate-{dtype}-aligned"], ptx_accesses[f"accumulate-{dtype}-unaligned"]
    assert "ld.global.v4.b32" in aligned["loads"], aligned
    assert "st.global.v4.b32" in aligned["stores"], aligned
    assert not [a for a in unaligned["loads"] + unaligned["stores"] if ".v2" in a or ".v4" in a], unaligned
    narrow = "ld.global.b16" if dtype == "bf16" else "ld.global.b32"
    assert narrow in unaligned["loads"], unaligned


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_total_norm_kernel_reads_16_bytes_per_load_when_aligned(ptx_accesses, dtype):
    aligned, unaligned = ptx_accesses[f"total_norm-{dtype}-aligned"], ptx_accesses[f"total_norm-{dtype}-unaligned"]
    assert "ld.global.v4.b32" in aligned["loads"], aligned
    assert not [a for a in unaligned["loads"] if ".v2" in a or ".v4" in a], unaligned
    # one fp64 partial per program, nothing else written
    assert aligned["stores"] == ["st.global.b64"], aligned


def test_sass_per_element_counts_each_adamw_row():
    """benchmarks/sass_per_element.py (docs/results.md, "What the instructions allow"): a count for every AdamW row
    of the Triton kernels (and of the CUDA C++ ones where the extension is built), int8 moments dearer than fp32
    ones, and no fewer instructions an element than the fp32 update needs."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, os.path.join("benchmarks", "sass_per_element.py")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    per_element = {}
    for line in done.stdout.splitlines()[1:]:
        backend, _registers, count = line[64:].split()[:3]
        per_element.setdefault(backend, {})[line[:64].strip()] = float(count)
    assert set(per_element) <= {"triton", "cuda"} and len(per_element["triton"]) == 11, done.stdout
    for counts in per_element.values():
        assert len(counts) == 11, done.stdout
        fp32 = counts["AdamW, float32 params, moments=fp32"]
        assert 20 < fp32 < counts["AdamW, float32 params, moments=int8"], done.stdout
