#!/usr/bin/env bash
# Builds a wheel and checks it as a user gets it: installed into a fresh venv that has torch (this environment's,
# through a path entry) but no source tree on its path and no build of its own, it must report its kernels in
# `fused-optim info`, load the widest CPU level this machine runs, run every op once on the CPU, and pass the CPU
# contract tests against the installed package. Then the same wheel, unchanged, in a second venv with another torch
# release (OTHER_TORCH, default 2.11.0, the lent GPU machines' torch: the kernels use the LibTorch stable ABI, so a
# wheel built under one torch runs under every torch from 2.10 on): it must load its CPU kernels there too and pass
# the CPU op tests. And the sources must build against that torch's headers, as `pip install -e .` builds them on
# such a machine: the CPU kernels' baseline level, and the CUDA kernels (sm_90) where nvcc is found.
#
# Usage: scripts/check_wheel.sh [PYTHON]   (default: scripts/env.sh's). FUSED_OPTIM_BUILD_CUDA is honoured; CI
# builds the CPU kernels only (every x86-64 level), the CUDA wheel build is the same code with WHEEL_CUDA_ARCHS.
# OTHER_TORCH=none skips the second torch.
set -euo pipefail
# the venvs' torch is installed without .pyc files: let the first import write them (see the Makefile)
unset PYTHONDONTWRITEBYTECODE
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${1:-$("$root/scripts/env.sh")}"
other_torch="${OTHER_TORCH:-2.11.0}"
work="$(mktemp -d)"
# pytest-xdist processes for the test runs, as `make test` has them (0: in one process)
workers="${TEST_WORKERS:-$(n=$(nproc); echo $(( n < 8 ? n : 8 )))}"
trap 'rm -rf "$work"' EXIT

echo "check_wheel: building the wheel"
(cd "$root" && "$python" -m pip wheel -q --no-build-isolation --no-deps -w "$work/dist" .)
wheel="$(ls "$work"/dist/fused_optim-*.whl)"
extensions="$(unzip -Z1 "$wheel" | grep '\.so$' | xargs -n1 basename | sort | tr '\n' ' ')"
echo "check_wheel: $(basename "$wheel"): $extensions"
if [[ "$(uname -m)" == x86_64 ]]; then
    for level in baseline avx2 avx512; do
        [[ "$extensions" == *"_C_cpu_$level."* ]] || { echo "check_wheel: no $level CPU kernels in the wheel" >&2; exit 1; }
    done
fi
if [[ "${FUSED_OPTIM_BUILD_CUDA:-auto}" == 0 && "$extensions" == *_C_cuda* ]]; then
    echo "check_wheel: FUSED_OPTIM_BUILD_CUDA=0, yet the wheel holds a CUDA extension" >&2
    exit 1
fi

# Runs every op once from the wheel installed in venv $1, and checks the widest CPU level this machine runs loaded.
smoke_test() {
    local venv="$1" site
    site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    "$venv/bin/python" - "$site" <<'EOF'
import os, sys
import torch
import fused_optim
from fused_optim import _backend

site = sys.argv[1]
assert fused_optim.__file__.startswith(site), f"fused_optim came from {fused_optim.__file__}, not the wheel"
assert _backend.extension_error("cpu") is None, _backend.extension_error("cpu")
assert _backend.cpu_isa() == _backend.cpu_isas_supported()[0], (_backend.cpu_isa(), _backend.cpu_isas_supported())
torch.manual_seed(0)
params = [torch.nn.Parameter(torch.randn(1000)) for _ in range(3)]
for p in params:
    p.grad = torch.randn_like(p)
for opt in (fused_optim.AdamW(params), fused_optim.Adam(params, weight_decay=0.1), fused_optim.SGD(params, lr=0.1, momentum=0.9)):
    opt.step()
logits, target = torch.randn(8, 50, requires_grad=True), torch.randint(0, 50, (8,))
fused_optim.functional.cross_entropy(logits, target).backward()
fused_optim.functional.linear_cross_entropy(torch.randn(8, 16), torch.randn(50, 16, requires_grad=True), target).backward()
acc = fused_optim.GradAccumulator(params)
acc.accumulate()
acc.finalize(num_tokens=8, max_norm=1.0)
fused_optim.clip_grad_norm_(params, 1.0)
print(f"check_wheel: every op ran from {os.path.dirname(fused_optim.__file__)} on the {_backend.cpu_isa()} CPU kernels")
EOF
}

# A fresh venv that sees this environment's torch and test tools but not its site .pth files (so no editable
# install of this checkout leaks in).
"$python" -m venv "$work/venv"
site="$("$work/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
"$python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' > "$site/outer-environment.pth"
"$work/venv/bin/python" -m pip install -q --no-deps --no-index "$wheel"

cd "$work"  # not the checkout: `import fused_optim` must find the installed package
smoke_test "$work/venv"
"$work/venv/bin/fused-optim" info

"$work/venv/bin/python" -m pytest -q -p no:cacheprovider -n "$workers" --rootdir "$root" \
    "$root/tests/test_adam.py::test_matches_reference_at_least_as_well_as_torch" \
    "$root/tests/test_cross_entropy.py::test_matches_reference_at_least_as_well_as_torch" \
    "$root/tests/test_sgd.py" "$root/tests/test_total_norm.py" "$root/tests/test_accumulate_grads.py" \
    "$root/tests/test_backend.py" "$root/tests/test_cpu_isa.py::test_the_widest_level_this_cpu_runs_is_loaded"

if [[ "$other_torch" != none ]]; then
    # Its own torch first on the path, the outer environment after it for the test tools only.
    echo "check_wheel: the same wheel under torch $other_torch"
    "$python" -m venv "$work/other"
    other_site="$("$work/other/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    # NumPy < 2.3 there: Triton 3.6's interpreter (torch 2.11's Triton) takes int() of 1-element arrays, which NumPy
    # 2.3 made an error, so every interpreted Triton test would fail for the interpreter's sake
    "$work/other/bin/python" -m pip install -q --no-compile "torch==$other_torch" "numpy<2.3"
    "$python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' > "$other_site/zz-outer-environment.pth"
    "$work/other/bin/python" -m pip install -q --no-deps --no-index "$wheel"
    running="$("$work/other/bin/python" -c 'import torch; print(torch.__version__)')"
    [[ "$running" == "$other_torch"* ]] || { echo "check_wheel: the second venv runs torch $running" >&2; exit 1; }
    smoke_test "$work/other"
    # and the optimizers' compiled steps: torch 2.11's dynamo traces less Python than ours (it stopped at the plan cache)
    "$work/other/bin/python" -m pytest -q -p no:cacheprovider -n "$workers" --rootdir "$root" \
        "$root/tests/test_adam.py::test_matches_reference_at_least_as_well_as_torch" \
        "$root/tests/test_cross_entropy.py::test_matches_reference_at_least_as_well_as_torch" \
        "$root/tests/test_sgd.py" "$root/tests/test_total_norm.py" "$root/tests/test_accumulate_grads.py" \
        "$root/tests/test_optimizer_contract.py::test_torch_compile_fullgraph_step_matches_eager" \
        "$root/tests/test_optimizer_contract.py::test_torch_compile_fullgraph_step_matches_eager_in_every_storage_mode"

    # Out of the checkout, so that neither its extensions nor its build/temp objects are touched.
    echo "check_wheel: the sources built against torch $other_torch"
    mkdir "$work/src"
    tar -C "$root" --exclude='*.so' --exclude=__pycache__ -cf - setup.py pyproject.toml README.md csrc fused_optim \
        | tar -C "$work/src" -xf -
    (cd "$work/src" && PATH="$(dirname "$python"):$PATH" FUSED_OPTIM_BUILD_CUDA=auto FUSED_OPTIM_CPU_ISAS=baseline \
        TORCH_CUDA_ARCH_LIST=9.0 "$work/other/bin/python" setup.py -q build_ext --inplace)
    echo "check_wheel: built $(cd "$work/src/fused_optim" && ls -- *.so | tr '\n' ' ')"
fi
echo "check_wheel: passed"
