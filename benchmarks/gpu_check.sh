#!/usr/bin/env bash
# One call on a lent GPU machine (no network; Python 3.12 with torch 2.11 cu130 and Triton 3.6 installed):
#   1. builds the package with its CUDA extension (pip install --no-build-isolation --no-deps -e .; sm_90),
#   2. prints `fused-optim info` (and saves it as JSON),
#   3. runs the CUDA tests (`pytest tests -m cuda`) and tests/test_backend.py,
#   4. runs the AdamW benchmark (`python -m fused_optim bench --json`) and prints its table,
#   5. runs the cross-entropy benchmarks (`python -m fused_optim bench --ops ce,linear_ce --json`): bf16 and fp32,
#      ce at 8192x128256, linear_ce at 8192x4096x128256, torch.compile peers included,
#   6. runs the gradient-accumulation and clip + unscale + AdamW benchmarks
#      (`python -m fused_optim bench --ops accumulate,clip_adamw --json`): 256M elements / params,
#   7. runs the SGD and Lion benchmarks (`python -m fused_optim bench --ops sgd,lion --json`): 256M params,
#   8. trains the example GPT (`python -m fused_optim train --quick --compare --json`): 30 steps, fused_optim
#      beside torch, bf16 autocast,
#   9. times the CPU AdamW step with fp32 and with int8 moments on 1, 4 and all of the machine's cores, with
#      the kernel level the package loads there (benchmarks/cpu_moment_modes.py): whether int8 moments overtake
#      fp32 ones once the memory system is shared by more cores than the 2 of the development machines,
# in under 10 minutes. Each benchmark also draws its GB/s as a PNG (--plot), and the training run its loss curves,
# when matplotlib is installed. The benchmarks run even when the tests fail; the exit status is non-zero if any
# step did.
#
#   benchmarks/gpu_check.sh [OUT_DIR]
#
# OUT_DIR: the first argument, else $OUT (the device runner's output folder), else benchmarks/results/<device>,
# <device> being torch.cuda.get_device_name() lowercased, non-alphanumerics → '-' (nvidia-h100-80gb-hbm3).
# Writes OUT_DIR/gpu_check.log (everything printed), info.json, adamw.json, cross_entropy.json,
# accumulate_clip_adamw.json, sgd.json, train.json, cpu_moment_modes.json (and adamw.png, cross_entropy.png,
# accumulate_clip_adamw.png, sgd.png, train.png); commit them under benchmarks/results/<device>/. Environment:
# PYTHON (default python), BENCH_ARGS (extra arguments of every `bench` run, e.g. "--quick"), and the phase limits
# BUILD_TIMEOUT, TEST_TIMEOUT (each of its two runs), BENCH_TIMEOUT, CE_BENCH_TIMEOUT, STEP_BENCH_TIMEOUT,
# SGD_BENCH_TIMEOUT, TRAIN_TIMEOUT, CPU_TIMEOUT (seconds; 100, 80, 80, 85, 60, 45, 30, 40: at most 600 s in all, so
# the script fits one 10-minute device call; before the losses existed the first three phases took 55, 61 and 57 s
# on an H100). A phase that runs out is reported and the next one still runs.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-$(command -v python || command -v python3)}"
BUILD_TIMEOUT="${BUILD_TIMEOUT:-100}"  # the stable-ABI headers compile faster than ATen's did
TEST_TIMEOUT="${TEST_TIMEOUT:-80}"
BENCH_TIMEOUT="${BENCH_TIMEOUT:-80}"
CE_BENCH_TIMEOUT="${CE_BENCH_TIMEOUT:-85}"
STEP_BENCH_TIMEOUT="${STEP_BENCH_TIMEOUT:-60}"
SGD_BENCH_TIMEOUT="${SGD_BENCH_TIMEOUT:-45}"
TRAIN_TIMEOUT="${TRAIN_TIMEOUT:-30}"
CPU_TIMEOUT="${CPU_TIMEOUT:-40}"

slug="$("$PYTHON" - <<'PY'
import re, torch
name = torch.cuda.get_device_name() if torch.cuda.is_available() else "no-gpu"
print(re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-"))
PY
)"
OUT_DIR="${1:-${OUT:-benchmarks/results/$slug}}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
log="$OUT_DIR/gpu_check.log"
: > "$log"
exec > >(tee -a "$log") 2>&1

status=0
phase() { echo; echo "=== $* ($(date -u +%H:%M:%S)) ==="; }
elapsed() { echo "--- $1: exit $2, $(( $(date +%s) - $3 )) s"; }

phase "machine"
echo "device: $slug; out: $OUT_DIR; python: $PYTHON ($("$PYTHON" --version 2>&1))"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv 2>/dev/null || true
if [[ "$slug" == no-gpu ]]; then
    echo "gpu_check: no CUDA GPU is visible to torch; nothing to check." >&2
    exit 1
fi

phase "build: pip install --no-build-isolation --no-deps -e . (TORCH_CUDA_ARCH_LIST=9.0, MAX_JOBS=16)"
t0=$(date +%s)
rc=0
# PIP_BREAK_SYSTEM_PACKAGES: a system Python (PEP 668) would otherwise refuse; older pips ignore it.
TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 FUSED_OPTIM_BUILD_CUDA=1 PIP_BREAK_SYSTEM_PACKAGES=1 \
    timeout "$BUILD_TIMEOUT" "$PYTHON" -m pip install --no-build-isolation --no-deps --no-index -e . || rc=$?
elapsed build $rc $t0
if (( rc != 0 )); then
    echo "gpu_check: the build failed; nothing else can run." >&2
    exit 1
fi

phase "fused-optim info"
if command -v fused-optim > /dev/null; then
    fused-optim info || status=1
else
    "$PYTHON" -m fused_optim info || status=1
fi
"$PYTHON" -m fused_optim info --json > "$OUT_DIR/info.json" || status=1
# The CUDA extension must have been built and loaded (not a stale one from another torch).
"$PYTHON" -c 'import fused_optim, sys
error = fused_optim.backends()["extensions"]["cuda"]
sys.exit(error and f"gpu_check: the CUDA extension is {error}")' || status=1

phase "tests: pytest tests -m cuda; pytest tests/test_backend.py"
t0=$(date +%s)
test_rc=0
timeout "$TEST_TIMEOUT" "$PYTHON" -m pytest tests -m cuda -q -p no:cacheprovider || test_rc=$?
if (( test_rc == 5 )); then
    echo "gpu_check: warning: no test is marked cuda"
    test_rc=0
fi
if [[ -f tests/test_backend.py ]]; then
    timeout "$TEST_TIMEOUT" "$PYTHON" -m pytest tests/test_backend.py -q -p no:cacheprovider || test_rc=$?
fi
elapsed tests $test_rc $t0
(( test_rc == 0 )) || status=1

# plot NAME: PLOT=(--plot OUT_DIR/NAME.png) when matplotlib is there, else none (without matplotlib, --plot would
# stop the run before it measures)
plot() {
    PLOT=()
    if "$PYTHON" -c 'import matplotlib' 2> /dev/null; then PLOT=(--plot "$OUT_DIR/$1.png"); fi
}

phase "benchmark: python -m fused_optim bench --json $OUT_DIR/adamw.json ${BENCH_ARGS:-}"
t0=$(date +%s)
bench_rc=0
plot adamw
# shellcheck disable=SC2086  # BENCH_ARGS is a list of words
timeout "$BENCH_TIMEOUT" "$PYTHON" -m fused_optim bench --json "$OUT_DIR/adamw.json" "${PLOT[@]}" \
    ${BENCH_ARGS:-} || bench_rc=$?
elapsed bench $bench_rc $t0
(( bench_rc == 0 )) || status=1

phase "benchmark: python -m fused_optim bench --ops ce,linear_ce --json $OUT_DIR/cross_entropy.json ${BENCH_ARGS:-}"
t0=$(date +%s)
ce_bench_rc=0
plot cross_entropy
# shellcheck disable=SC2086  # BENCH_ARGS is a list of words
timeout "$CE_BENCH_TIMEOUT" "$PYTHON" -m fused_optim bench --ops ce,linear_ce --json "$OUT_DIR/cross_entropy.json" \
    "${PLOT[@]}" ${BENCH_ARGS:-} || ce_bench_rc=$?
elapsed ce-bench $ce_bench_rc $t0
(( ce_bench_rc == 0 )) || status=1

phase "benchmark: python -m fused_optim bench --ops accumulate,clip_adamw --json $OUT_DIR/accumulate_clip_adamw.json ${BENCH_ARGS:-}"
t0=$(date +%s)
step_bench_rc=0
plot accumulate_clip_adamw
# shellcheck disable=SC2086  # BENCH_ARGS is a list of words
timeout "$STEP_BENCH_TIMEOUT" "$PYTHON" -m fused_optim bench --ops accumulate,clip_adamw \
    --json "$OUT_DIR/accumulate_clip_adamw.json" "${PLOT[@]}" ${BENCH_ARGS:-} || step_bench_rc=$?
elapsed step-bench $step_bench_rc $t0
(( step_bench_rc == 0 )) || status=1

phase "benchmark: python -m fused_optim bench --ops sgd,lion --json $OUT_DIR/sgd.json ${BENCH_ARGS:-}"
t0=$(date +%s)
sgd_bench_rc=0
plot sgd
# shellcheck disable=SC2086  # BENCH_ARGS is a list of words
timeout "$SGD_BENCH_TIMEOUT" "$PYTHON" -m fused_optim bench --ops sgd,lion --json "$OUT_DIR/sgd.json" "${PLOT[@]}" \
    ${BENCH_ARGS:-} || sgd_bench_rc=$?
elapsed sgd-bench $sgd_bench_rc $t0
(( sgd_bench_rc == 0 )) || status=1

phase "train: python -m fused_optim train --quick --compare --json $OUT_DIR/train.json"
t0=$(date +%s)
train_rc=0
plot train
timeout "$TRAIN_TIMEOUT" "$PYTHON" -m fused_optim train --quick --compare --json "$OUT_DIR/train.json" \
    "${PLOT[@]}" || train_rc=$?
elapsed train $train_rc $t0
(( train_rc == 0 )) || status=1

phase "cpu: benchmarks/cpu_moment_modes.py, AdamW with fp32 and int8 moments on 1, 4 and $(nproc) threads"
t0=$(date +%s)
cpu_rc=0
# only the kernel level the package loads here: each level and thread count is a process of ~10 s (1 GB of tensors)
cpu_isa="$("$PYTHON" -c 'import fused_optim; print(fused_optim.backends()["cpu_isa"]["loaded"])')" || cpu_isa=""
timeout "$CPU_TIMEOUT" "$PYTHON" benchmarks/cpu_moment_modes.py --isas "$cpu_isa" --threads "1,4,$(nproc)" \
    --match 'AdamW, float32 params, moments=(fp32|int8)' --passes 1 --rounds 10 --kept 8 \
    --out "$OUT_DIR/cpu_moment_modes.json" || cpu_rc=$?
elapsed cpu $cpu_rc $t0
(( cpu_rc == 0 )) || status=1

phase "done: tests exit $test_rc, bench exit $bench_rc, ce bench exit $ce_bench_rc, step bench exit $step_bench_rc, sgd bench exit $sgd_bench_rc, train exit $train_rc, cpu exit $cpu_rc, status $status"
ls -l "$OUT_DIR"
exit $status
