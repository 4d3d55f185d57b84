"""fused_optim.backends(), backend choice (fused_optim/_backend.py) and the C++ extensions' registration.

The CUDA extension loads on a machine without a GPU, so CI checks here that it built and registered its kernels.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import HAS_CUDA, TRITON_INTERPRETED, DispatchedOps

import fused_optim
from fused_optim import _backend

PACKAGE_DIR = os.path.dirname(fused_optim.__file__)
ROOT = os.path.dirname(PACKAGE_DIR)
CPU_EXTENSION_BUILT = bool(glob.glob(os.path.join(PACKAGE_DIR, "_C_cpu*.so")))
CUDA_EXTENSION_BUILT = bool(glob.glob(os.path.join(PACKAGE_DIR, "_C_cuda*.so")))
ADAM_OPS = ["adam_step_", "adam_step_triton_", "adam_step_torch_"]
SGD_OPS = ["sgd_step_", "sgd_step_triton_", "sgd_step_torch_"]
CROSS_ENTROPY_OPS = ["cross_entropy_forward", "cross_entropy_forward_triton", "cross_entropy_forward_torch",
                     "cross_entropy_scale_grad_", "cross_entropy_scale_grad_triton_", "cross_entropy_scale_grad_torch_"]
GRAD_OPS = ["accumulate_grads_", "accumulate_grads_triton_", "accumulate_grads_torch_",
            "total_norm", "total_norm_triton", "total_norm_torch"]
# The ops with C++ kernels: the one name each extension registers (the Python ops add _triton and _torch twins).
CUDA_KERNEL_OPS = ["adam_step_", "sgd_step_", "cross_entropy_forward", "cross_entropy_scale_grad_", "accumulate_grads_", "total_norm"]
CPU_KERNEL_OPS = CUDA_KERNEL_OPS + ["triad_"]


@pytest.fixture
def fresh_caches(monkeypatch):
    """resolve() and triton_error() cache their answers: clear them around a test that changes what they read."""
    _backend.resolve.cache_clear()
    _backend.triton_error.cache_clear()
    yield monkeypatch
    _backend.resolve.cache_clear()
    _backend.triton_error.cache_clear()


def _ops_of_one_step(**kwargs) -> list[str]:
    param = torch.nn.Parameter(torch.randn(5))
    opt = fused_optim.AdamW([param], **kwargs)
    param.grad = torch.randn(5)
    with DispatchedOps() as recorder:
        opt.step()
    return [name for name in recorder.names if name.startswith("fused_optim::")]


def test_backends_report():
    info = fused_optim.backends()
    assert set(info) == {"versions", "device", "extensions", "backends", "default_backend", "auto", "cpu_threads",
                         "cpu_isa"}
    assert info["versions"]["torch"] == torch.__version__
    assert set(info["versions"]) == {"python", "torch", "torch_cuda", "triton"}
    assert set(info["backends"]) == {"cuda", "triton", "cpu", "torch"}
    # each backend: None when usable, else the reason as a sentence
    for name, reason in info["backends"].items():
        assert reason is None or (isinstance(reason, str) and reason), name
    assert info["backends"]["torch"] is None
    assert set(info["extensions"]) == {"cpu", "cuda"}
    assert info["default_backend"] in _backend.BACKENDS
    assert set(info["auto"]) == {"cpu", "cuda"}
    assert isinstance(info["cpu_threads"], int) and info["cpu_threads"] >= 1
    if not HAS_CUDA:  # the CPU's model name where Linux gives one, not just its architecture
        assert info["device"] == (_backend.cpu_info()[0] or info["device"]) and info["device"]
    if CPU_EXTENSION_BUILT:
        assert info["extensions"]["cpu"] is None and info["backends"]["cpu"] is None
        assert info["auto"]["cpu"] == "cpu"
    if TRITON_INTERPRETED or HAS_CUDA:
        assert info["backends"]["triton"] is None
    if not HAS_CUDA:
        assert "GPU" in info["backends"]["cuda"] or "not" in info["backends"]["cuda"]
        assert info["auto"]["cuda"].startswith("none")


def test_auto_runs_the_cpu_kernel_on_cpu_tensors():
    if not CPU_EXTENSION_BUILT:
        pytest.skip("the CPU extension is not built")
    assert _ops_of_one_step(backend="auto") == ["fused_optim::adam_step_"]


@pytest.mark.parametrize("name, op", [("torch", "adam_step_torch_"), ("cpu", "adam_step_"),
                                      ("triton", "adam_step_triton_")])
def test_environment_variable_sets_the_default(fresh_caches, name, op):
    if name == "triton" and not TRITON_INTERPRETED:
        pytest.skip("Triton runs CPU tensors only interpreted")
    fresh_caches.setenv("FUSED_OPTIM_BACKEND", name)
    assert fused_optim.AdamW([torch.nn.Parameter(torch.randn(2))]).backend == name
    assert fused_optim.backends()["default_backend"] == name
    assert _ops_of_one_step() == [f"fused_optim::{op}"]
    # an explicit backend= wins over the environment
    assert _ops_of_one_step(backend="torch") == ["fused_optim::adam_step_torch_"]


def test_info_reports_a_bad_environment_variable(fresh_caches, capsys):
    """`fused-optim info` is where a user looks for what is wrong: it says so (it raised with a traceback)."""
    from fused_optim.tools.cli import main

    fresh_caches.setenv("FUSED_OPTIM_BACKEND", "bogus")
    info = fused_optim.backends()
    assert (info["default_backend"].startswith("invalid: FUSED_OPTIM_BACKEND must be one of")
            and "'bogus'" in info["default_backend"])
    assert info["auto"]["cpu"].startswith("none (FUSED_OPTIM_BACKEND must be one of")
    assert main(["info"]) == 0 and "bogus" in capsys.readouterr().out


def test_environment_variable_with_an_unknown_name(fresh_caches):
    fresh_caches.setenv("FUSED_OPTIM_BACKEND", "gpu")
    param = torch.nn.Parameter(torch.randn(2))
    param.grad = torch.randn(2)
    with pytest.raises(ValueError, match="^FUSED_OPTIM_BACKEND must be one of auto, cuda, triton, cpu, torch; got"):
        fused_optim.AdamW([param]).step()


RESOLVED = [
    ("torch", "cpu", "torch"),
    ("torch", "meta", "torch"),
    ("torch", "cuda", "torch"),
    ("auto", "meta", "torch"),  # no kernel of ours for this device: torch's own
    pytest.param("auto", "cpu", "cpu", marks=pytest.mark.skipif(not CPU_EXTENSION_BUILT, reason="no CPU build")),
    pytest.param("cpu", "cpu", "cpu", marks=pytest.mark.skipif(not CPU_EXTENSION_BUILT, reason="no CPU build")),
    # CUDA tensors go to the CUDA extension when it is loaded, GPU or not (resolve() never asks the driver)
    pytest.param("auto", "cuda", "cuda", marks=pytest.mark.skipif(not CUDA_EXTENSION_BUILT, reason="no CUDA build")),
    pytest.param("cuda", "cuda", "cuda", marks=pytest.mark.skipif(not CUDA_EXTENSION_BUILT, reason="no CUDA build")),
    pytest.param("triton", "cpu", "triton", marks=pytest.mark.skipif(not TRITON_INTERPRETED, reason="not interpreted")),
]


@pytest.mark.parametrize("backend, device_type, expected", RESOLVED)
def test_resolve(backend, device_type, expected):
    assert _backend.resolve(backend, device_type) == expected


def _one_sentence(message: str) -> bool:
    return bool(re.fullmatch(r"[^\n]+[.!]", message)) and not re.search(r"[.!?]\s+[A-Z]", message)


@pytest.mark.parametrize("backend, device_type, words", [
    ("cuda", "cpu", "CUDA tensors"),
    ("cpu", "cuda", "CPU tensors"),
    ("cpu", "meta", "CPU tensors"),
    ("triton", "meta", "meta"),
])
def test_resolve_says_why_not_in_one_sentence(backend, device_type, words):
    with pytest.raises(RuntimeError) as error:
        _backend.resolve(backend, device_type)
    assert words in str(error.value)
    assert _one_sentence(str(error.value)), str(error.value)


def test_resolve_rejects_unknown_names():
    with pytest.raises(ValueError, match="backend must be one of auto, cuda, triton, cpu, torch; got 'gpu'"):
        _backend.resolve("gpu", "cpu")


def test_triton_on_cpu_tensors_needs_the_interpreter(fresh_caches):
    fresh_caches.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError) as error:
        _backend.resolve("triton", "cpu")
    assert "TRITON_INTERPRET" in str(error.value) and _one_sentence(str(error.value))
    if not HAS_CUDA:
        assert "TRITON_INTERPRET=1" in _backend.triton_error()
        # and auto does not pick Triton for CUDA tensors it could not run
        assert _backend.resolve("auto", "cuda") in ("cuda", "torch")


def test_a_missing_extension_is_a_reason_and_auto_falls_back(fresh_caches):
    reason = "not built (install with `pip install --no-build-isolation -e .`)"
    fresh_caches.setitem(_backend._extension_errors, "cpu", reason)
    with pytest.raises(RuntimeError, match=re.escape(reason)):
        _backend.resolve("cpu", "cpu")
    assert _backend.resolve("auto", "cpu") == "torch"
    assert fused_optim.backends()["backends"]["cpu"] == reason


def test_an_unloadable_extension_is_a_reason(fresh_caches, tmp_path):
    broken = tmp_path / "_C_broken.abi3.so"
    broken.write_bytes(b"not a shared library")
    spec = importlib.util.spec_from_file_location("fused_optim._C_broken", broken)
    fresh_caches.setattr(importlib.util, "find_spec", lambda name, *args: spec if name == "fused_optim._C_broken" else None)
    reason = _backend._load_extension("_C_broken")
    assert reason.startswith("not loadable (_C_broken.abi3.so: ")
    assert _backend._load_extension("_C_absent").startswith("not built")


@pytest.mark.skipif(not CPU_EXTENSION_BUILT, reason="fused_optim/_C_cpu*.so is not built")
def test_the_build_records_the_torch_and_cuda_it_was_built_under():
    assert _backend.built_for() == (torch.__version__, torch.version.cuda or "none")
    assert _backend.torch_mismatch("cpu") is None and _backend.torch_mismatch("cuda") is None


def _run_under_faked_torch(fake: str) -> list:
    """Runs one AdamW step in a process whose torch reports other versions (`fake`: statements run after import
    torch); returns [cpu extension error, cuda extension error, auto backend on the CPU, the param after the step]."""
    code = f"""
import json, torch
{fake}
import fused_optim
p = torch.nn.Parameter(torch.ones(3)); p.grad = torch.ones(3)
fused_optim.AdamW([p], lr=0.1).step()
info = fused_optim.backends()
print(json.dumps([info["extensions"]["cpu"], info["extensions"]["cuda"], info["auto"]["cpu"], p.tolist()]))
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    assert result[3] == pytest.approx([1 - 0.1 - 0.1 * 0.01] * 3, abs=1e-6)  # lr * (m_hat / sqrt(v_hat)) = lr; decay
    return result


@pytest.mark.skipif(not CPU_EXTENSION_BUILT, reason="fused_optim/_C_cpu*.so is not built")
def test_a_torch_older_than_the_stable_abi_target_refuses_the_extensions_and_torch_runs():
    cpu_error, cuda_error, auto, _ = _run_under_faked_torch('torch.__version__ = "2.9.1"')
    assert cpu_error.startswith("not loaded: this torch 2.9.1 is older than 2.10, the oldest whose stable ABI")
    assert _one_sentence(cpu_error + ".")
    if CUDA_EXTENSION_BUILT:
        assert cuda_error == cpu_error
    assert auto == "torch"


@pytest.mark.skipif(not CPU_EXTENSION_BUILT, reason="fused_optim/_C_cpu*.so is not built")
def test_another_torch_release_from_the_target_on_loads_the_extensions():
    # The kernels use the stable ABI only, so the version alone refuses nothing from 2.10 on (scripts/check_wheel.sh
    # runs a build under a really different torch).
    cpu_error, _, auto, _ = _run_under_faked_torch('torch.__version__ = "2.99.0"')
    assert cpu_error is None and auto == "cpu"


@pytest.mark.skipif(not CUDA_EXTENSION_BUILT or torch.version.cuda is None, reason="needs the CUDA extension built")
def test_a_torch_of_another_cuda_major_version_refuses_the_cuda_kernels_only():
    cpu_error, cuda_error, _, _ = _run_under_faked_torch('torch.version.cuda = "11.8"')
    assert cpu_error is None
    assert cuda_error.startswith(f"not loaded: built with CUDA {torch.version.cuda}, not this torch's CUDA 11.8")


@pytest.mark.parametrize("op", ADAM_OPS)
def test_every_op_is_defined_with_one_schema(op):
    schema = getattr(torch.ops.fused_optim, op).default._schema
    reference = torch.ops.fused_optim.adam_step_.default._schema
    assert [(a.name, str(a.type), a.alias_info is not None and a.alias_info.is_write) for a in schema.arguments] == \
        [(a.name, str(a.type), a.alias_info is not None and a.alias_info.is_write) for a in reference.arguments]
    written = {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}
    assert written == {"params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "master_params", "steps", "moment_scales"}
    assert len(schema.returns) == 0


@pytest.mark.parametrize("op", SGD_OPS)
def test_every_sgd_op_is_defined_with_one_schema(op):
    schema = getattr(torch.ops.fused_optim, op).default._schema
    reference = torch.ops.fused_optim.sgd_step_.default._schema
    assert [(a.name, str(a.type), a.alias_info is not None and a.alias_info.is_write) for a in schema.arguments] == \
        [(a.name, str(a.type), a.alias_info is not None and a.alias_info.is_write) for a in reference.arguments]
    written = {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}
    assert written == {"params", "momentum_buffers", "master_params", "steps", "moment_scales"}
    assert len(schema.returns) == 0


def _has_kernel(op: str, key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"fused_optim::{op}", key)


@pytest.mark.skipif(not CPU_EXTENSION_BUILT, reason="fused_optim/_C_cpu*.so is not built")
def test_cpu_extension_is_loaded_and_registered():
    assert _backend.extension_error("cpu") is None
    for op in CPU_KERNEL_OPS:
        assert _has_kernel(op, "CPU"), op


@pytest.mark.skipif(not CUDA_EXTENSION_BUILT, reason="fused_optim/_C_cuda*.so is not built")
def test_cuda_extension_is_loaded_and_registered_without_a_gpu():
    """The CI check that the CUDA build works: it loads here, GPU or not, and registers its kernel."""
    assert _backend.extension_error("cuda") is None
    for op in CUDA_KERNEL_OPS:
        assert _has_kernel(op, "CUDA"), op


def test_python_ops_are_registered():
    all_ops = ADAM_OPS + SGD_OPS + CROSS_ENTROPY_OPS + GRAD_OPS
    for op in (op for op in all_ops if op.rstrip("_").endswith("_triton")):
        assert _has_kernel(op, "CPU") and _has_kernel(op, "CUDA"), op
    for op in (op for op in all_ops if op.rstrip("_").endswith("_torch")):
        assert _has_kernel(op, "CompositeExplicitAutograd"), op
    for op in all_ops:  # fake impls, for torch.compile and meta tensors
        assert _has_kernel(op, "Meta"), op
