"""The CPU kernels are built once per instruction-set level and the widest level this CPU runs is loaded
(fused_optim/_backend.py); FUSED_OPTIM_CPU_ISA forces a narrower one. The numerics contract holds on every level:
the same tests (every CPU kernel against the float64 reference and torch, cross-entropy's confident rows and long
sums included) run again, in a subprocess, on each other level this machine runs."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from fused_optim import _backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The contract subset: each CPU kernel against the float64 reference and torch at the same dtype.
CONTRACT_TESTS = [
    "tests/test_cross_entropy.py::test_matches_reference_at_least_as_well_as_torch",
    "tests/test_cross_entropy.py::test_z_loss_and_softcap_match_reference",
    "tests/test_cross_entropy.py::test_fp32_loss_of_confident_rows_is_not_worse_than_torch",
    "tests/test_cross_entropy.py::test_fp32_gradient_at_a_real_vocabulary_is_not_worse_than_torch",
    "tests/test_adam.py::test_matches_reference_at_least_as_well_as_torch",
    "tests/test_adam.py::test_fp32_matches_torch_adamw_after_100_steps",
    "tests/test_adam.py::test_steps_are_adam_h_rounded_operation_by_operation",
    "tests/test_adam.py::test_master_remainders_step_the_fp32_trajectory_bit_for_bit",
    "tests/test_adam.py::test_24_bit_masters_are_the_fp32_step_rounded_to_24_bits",
    "tests/test_sgd.py", "tests/test_adam_moments.py", "tests/test_adam_int8_moments.py", "tests/test_lion.py",
    "tests/test_total_norm.py",
    "tests/test_accumulate_grads.py",
    "tests/test_loss_parallel.py::test_shards_combine_into_the_whole_rows", "tests/test_conversions.py",
    "tests/test_fuzz.py", "tests/test_optim_db.py",
]


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": ROOT, **env}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=environment, capture_output=True, text=True,
                          timeout=120)


def test_the_widest_level_this_cpu_runs_is_loaded():
    built, supported = _backend.cpu_isas_built(), _backend.cpu_isas_supported()
    assert _backend.cpu_isa() == next(isa for isa in supported if isa in built)
    info = __import__("fused_optim").backends()["cpu_isa"]
    assert info == {"loaded": _backend.cpu_isa(), "built": list(built), "supported": list(supported)}


@pytest.mark.parametrize("isa, reason", [("sse9", "is not one of"), ("neon_or_avx512", "is not one of")])
def test_an_unknown_level_is_refused_with_the_reason(isa, reason):
    done = run_python("import fused_optim, json; print(json.dumps(fused_optim.backends()['extensions']['cpu']))",
                      FUSED_OPTIM_CPU_ISA=isa)
    assert done.returncode == 0, done.stderr
    assert reason in json.loads(done.stdout.splitlines()[-1])


def test_a_level_this_cpu_does_not_run_is_refused_and_torch_runs_instead():
    missing = next((isa for isa in _backend.CPU_ISA_FLAGS if isa not in _backend.cpu_isas_supported()), None)
    if missing is None:
        pytest.skip("this CPU runs every level")
    done = run_python("import fused_optim, json; info = fused_optim.backends(); "
                      "print(json.dumps([info['extensions']['cpu'], info['auto']['cpu']]))", FUSED_OPTIM_CPU_ISA=missing)
    error, auto = json.loads(done.stdout.splitlines()[-1])
    assert "which this CPU does not run" in error and auto == "torch"


OTHER_LEVELS = [isa for isa in _backend.cpu_isas_supported() if isa in _backend.cpu_isas_built()][1:]


@pytest.mark.parametrize("isa", OTHER_LEVELS or [pytest.param(None, marks=pytest.mark.skip(
    reason="one level built for this CPU"))])
def test_the_numerics_contract_holds_on_every_level(isa, tmp_path):
    """The contract subset on each other level, in a subprocess. The baseline kernels run on CPUs without AVX2,
    where torch's kernels are its "default" ones too (their add(alpha=) rounds twice, as multiply_add.h there):
    torch is compared as it runs on such a CPU. (Inductor's cache does not key its kernels by that capability: it
    reused another process's vectorised code, which its default build cannot compile. So a cache of its own.)"""
    environment = {**os.environ, "PYTHONPATH": ROOT, "FUSED_OPTIM_CPU_ISA": isa}
    if isa == "baseline":
        environment.update(ATEN_CPU_CAPABILITY="default", TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))
    check = subprocess.run([sys.executable, "-c", "from fused_optim import _backend; print(_backend.cpu_isa())"],
                           cwd=ROOT, env=environment, capture_output=True, text=True, timeout=120)
    assert check.stdout.split()[-1] == isa, check.stderr
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k",
                           "(cpu or fuzz or optim_db) and not triton", *CONTRACT_TESTS], cwd=ROOT, env=environment,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:]


@pytest.mark.parametrize("isa", _backend.cpu_isas_built())
def test_no_loop_calls_fmaf(isa):
    """Where a CPU has no FMA instruction (the x86-64 baseline) fmaf is a libm call, and a loop that calls it stays
    scalar (the baseline's cross-entropy took 4-6x as long, its AdamW step over bf16 params 3.4x): no function of any
    level's extension calls it (multiply_add.h fuses only where the CPU has the instruction)."""
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("objdump not found")
    library = importlib.util.find_spec(f"fused_optim._C_cpu_{isa}").origin
    listing = subprocess.run([objdump, "-d", "-C", "--no-show-raw-insn", library], check=True, capture_output=True,
                             text=True).stdout
    function, callers = None, set()
    for line in listing.splitlines():
        header = re.match(r"[0-9a-f]+ <(.*)>:$", line)
        if header:
            function = header.group(1)
        elif re.search(r"\bcall\s.*<fmaf@plt>", line):
            callers.add(function)
    assert not callers, sorted(callers)[:3]
