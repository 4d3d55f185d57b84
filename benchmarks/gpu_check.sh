#!/usr/bin/env bash
# One call on a lent GPU machine (no network; Python 3.12 with torch 2.11 cu130 and Triton 3.6 installed), in
# phases (PHASES selects some, in this order; default: all):
#   build   the package with its CUDA extension (pip install --no-build-isolation --no-deps -e .; sm_90), then
#           `fused-optim info` (saved as JSON too) and a check that the CUDA extension loaded,
#   tests   the CUDA tests (`pytest tests -m cuda`, on 12 processes when pytest-xdist is there) and
#           tests/test_backend.py,
#   modes   every optimizer x moment storage x master-weight mode, CUDA C++ and Triton, GB/s by its bytes model
#           against the copy roof (benchmarks/gpu_moment_modes.py),
#   launch  the Triton optimizer kernels at other launch shapes (BLOCK, NUM_WARPS, BLOCKS a program, a register
#           cap) for the int8 and stochastic-rounding rows, each checked bit for bit against today's shape
#           (benchmarks/gpu_triton_launch.py),
#   profile Nsight Compute (`ncu`, where the image has it) on an AdamW step of three rows (fp32 params with
#           int8 moments; bf16 params with int8 moments and 24-bit masters; bf16 moments with stochastic
#           rounding), CUDA C++ and Triton: speed of light, occupancy, warp stalls, instruction mix,
#   adamw   the AdamW benchmark (`python -m fused_optim bench --json`),
#   ce      the cross-entropy benchmarks (`--ops ce,linear_ce`): bf16 and fp32, ce at 8192x128256, linear_ce at
#           8192x4096x128256, torch.compile peers included,
#   steps   the gradient-accumulation and clip + unscale + AdamW benchmarks (`--ops accumulate,clip_adamw`),
#   sgd     the SGD and Lion benchmarks (`--ops sgd,lion`): 256M params,
#   train   the example GPT (`python -m fused_optim train --quick --compare --json`): 30 steps, fused_optim beside
#           torch, bf16 autocast,
#   cpu     the CPU AdamW step with fp32 and with int8 moments on 1, 4 and all of the machine's cores, with the
#           kernel level the package loads there (benchmarks/cpu_moment_modes.py): whether int8 moments overtake
#           fp32 ones once more cores than the 2 of the development machines share the memory system.
# Every phase but build runs even when an earlier one failed; the exit status is non-zero if any did. Each benchmark
# also draws its GB/s as a PNG (--plot), and the training run its loss curves, when matplotlib is installed.
#
#   benchmarks/gpu_check.sh [OUT_DIR]
#   PHASES=build,tests,modes,launch benchmarks/gpu_check.sh
#   PHASES=profile,ce,sgd,adamw,steps,train,cpu benchmarks/gpu_check.sh
#
# The phases after build need the build's extension in place (a second call on a machine still warm from the first
# can leave build out). OUT_DIR: the first argument, else $OUT (the device runner's output folder), else
# benchmarks/results/<device>, <device> being torch.cuda.get_device_name() lowercased, non-alphanumerics → '-'
# (nvidia-h100-80gb-hbm3). Writes OUT_DIR/gpu_check.log (appended to), info.json, adamw.json, cross_entropy.json,
# accumulate_clip_adamw.json, sgd.json, train.json, moment_modes.json, triton_launch.json, ncu_profile.txt,
# cpu_moment_modes.json (and PNGs); commit them
# under benchmarks/results/<device>/. Environment: PYTHON (default python), BENCH_ARGS (extra arguments of every
# `bench` run, e.g. "--quick") and each phase's limit in seconds, <PHASE>_TIMEOUT: BUILD 200, TESTS 150 (each of its
# two runs), MODES 75, LAUNCH 240, PROFILE 90, ADAMW 200, CE 120, STEPS 90, SGD 80, TRAIN 30, CPU 90. A phase that
# runs out is reported and the next one still runs. Wheels in .whl/ (carried to the machine, which has no network)
# are installed first: the test peers its image lacks, e.g. lion-pytorch (`pip download --no-deps -d .whl
# lion-pytorch`).
#
# All phases take longer than one device call may (600 s), so a lent machine gets two calls, the second at once
# while the machine is warm. On an H200 (2026-12-04) the phases took: build 93 s (16 cores), tests 98 s on 12
# processes + test_backend 43 s, modes 30 s, ce 86 s; adamw, steps, sgd and cpu ran past the limits they had then
# (110, 50, 45 and 40 s). A session's device time (900 s, start-up included) does not cover every phase, so the
# first call runs what issue 15 and the untested fixes need, and the second as much of the rest as is left:
#   PHASES=build,tests,modes,launch   then   PHASES=profile,ce,sgd,adamw,steps,train,cpu
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-$(command -v python || command -v python3)}"
PHASES=",${PHASES:-build,tests,modes,launch,profile,adamw,ce,steps,sgd,train,cpu},"

slug="$("$PYTHON" - <<'PY'
import re, torch
name = torch.cuda.get_device_name() if torch.cuda.is_available() else "no-gpu"
print(re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-"))
PY
)"
OUT_DIR="${1:-${OUT:-benchmarks/results/$slug}}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
exec > >(tee -a "$OUT_DIR/gpu_check.log") 2>&1

status=0
summary=()
selected() { [[ "$PHASES" == *",$1,"* ]]; }
phase() { echo; echo "=== $* ($(date -u +%H:%M:%S)) ==="; }
# run NAME SECONDS COMMAND...: one timed step of a phase, its exit status kept for the summary
run() {
    local name="$1" limit="$2" t0 rc=0
    shift 2
    t0=$(date +%s)
    timeout "$limit" "$@" || rc=$?
    echo "--- $name: exit $rc$( ((rc == 124)) && echo " (ran out of its $limit s)"), $(( $(date +%s) - t0 )) s"
    summary+=("$name $rc")
    (( rc == 0 )) || status=1
}
# plot NAME: PLOT=(--plot OUT_DIR/NAME.png) when matplotlib is there, else none (without matplotlib, --plot would
# stop the run before it measures)
plot() {
    PLOT=()
    if "$PYTHON" -c 'import matplotlib' 2> /dev/null; then PLOT=(--plot "$OUT_DIR/$1.png"); fi
}
# bench NAME OPS SECONDS: `python -m fused_optim bench --ops OPS`, its JSON and plot named NAME
bench() {
    local name="$1" ops="$2" limit="$3"
    phase "benchmark: python -m fused_optim bench --ops $ops --json $OUT_DIR/$name.json ${BENCH_ARGS:-}"
    plot "$name"
    # shellcheck disable=SC2086  # BENCH_ARGS is a list of words
    run "$name" "$limit" "$PYTHON" -m fused_optim bench --ops "$ops" \
        --json "$OUT_DIR/$name.json" "${PLOT[@]}" ${BENCH_ARGS:-}
}

phase "machine"
echo "device: $slug; out: $OUT_DIR; python: $PYTHON ($("$PYTHON" --version 2>&1)); phases: ${PHASES:1:-1}"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv 2>/dev/null || true
if [[ "$slug" == no-gpu ]]; then
    echo "gpu_check: no CUDA GPU is visible to torch; nothing to check." >&2
    exit 1
fi

if compgen -G ".whl/*.whl" > /dev/null; then
    phase "wheels: $(ls .whl)"
    PIP_BREAK_SYSTEM_PACKAGES=1 "$PYTHON" -m pip install -q --no-index --no-deps .whl/*.whl || status=1
fi

if selected build; then
    # the CPU kernels at the level this machine loads (and baseline): the phases here run no other
    cpu_isas="$("$PYTHON" -c 'from fused_optim._backend import cpu_isas_supported; print(cpu_isas_supported()[0])' \
                2> /dev/null)" || cpu_isas=""
    if [[ -z "$cpu_isas" ]]; then cpu_isas=all; elif [[ "$cpu_isas" != baseline ]]; then cpu_isas="baseline,$cpu_isas"; fi
    phase "build: pip install --no-build-isolation --no-deps -e . (TORCH_CUDA_ARCH_LIST=9.0, MAX_JOBS=$(nproc), \
FUSED_OPTIM_CPU_ISAS=$cpu_isas)"
    # PIP_BREAK_SYSTEM_PACKAGES: a system Python (PEP 668) would otherwise refuse; older pips ignore it.
    TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=$(nproc) FUSED_OPTIM_BUILD_CUDA=1 FUSED_OPTIM_CPU_ISAS="$cpu_isas" \
        PIP_BREAK_SYSTEM_PACKAGES=1 \
        run build "${BUILD_TIMEOUT:-200}" "$PYTHON" -m pip install --no-build-isolation --no-deps --no-index -e .
    if [[ "${summary[-1]}" != "build 0" ]]; then
        echo "gpu_check: the build failed; nothing else can run." >&2
        exit 1
    fi
    phase "fused-optim info"
    "$PYTHON" -m fused_optim info || status=1
    "$PYTHON" -m fused_optim info --json > "$OUT_DIR/info.json" || status=1
fi
# The CUDA extension must have been built and loaded (not a stale one from another torch).
"$PYTHON" -c 'import fused_optim, sys
error = fused_optim.backends()["extensions"]["cuda"]
sys.exit(error and f"gpu_check: the CUDA extension is {error}")' || status=1

if selected tests; then
    # -v: each test's outcome is in the log even when the run is stopped at its limit. Twelve processes share the
    # Triton and inductor compiles (most of this phase's time), each inductor compiling on one thread.
    parallel=()
    if "$PYTHON" -c 'import xdist' 2> /dev/null; then parallel=(-n 12); fi
    phase "tests: pytest tests -m cuda ${parallel[*]}; pytest tests/test_backend.py"
    TORCHINDUCTOR_COMPILE_THREADS=1 run tests "${TESTS_TIMEOUT:-150}" "$PYTHON" -m pytest tests -m cuda \
        "${parallel[@]}" -v -rfE --tb=short -p no:cacheprovider
    run test_backend "${TESTS_TIMEOUT:-150}" "$PYTHON" -m pytest tests/test_backend.py -q -p no:cacheprovider
fi

if selected modes; then
    phase "modes: benchmarks/gpu_moment_modes.py --out $OUT_DIR/moment_modes.json"
    run modes "${MODES_TIMEOUT:-75}" "$PYTHON" benchmarks/gpu_moment_modes.py --out "$OUT_DIR/moment_modes.json"
fi
if selected launch; then
    phase "launch: benchmarks/gpu_triton_launch.py --out $OUT_DIR/triton_launch.json"
    run launch "${LAUNCH_TIMEOUT:-240}" "$PYTHON" benchmarks/gpu_triton_launch.py --out "$OUT_DIR/triton_launch.json"
fi
if selected profile; then
    ncu="$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2> /dev/null | head -1)" \
        || ncu=""
    phase "profile: ${ncu:-ncu} on AdamW steps of gpu_moment_modes.py's int8 and stochastic-rounding rows"
    if [[ -z "$ncu" ]]; then
        echo "gpu_check: no ncu on this machine; nothing profiled."
    else
        # one step of each of the three rows on each backend: 6 kernels named *adam* (the Triton ones with their
        # compile before them), each replayed once a section
        run profile "${PROFILE_TIMEOUT:-90}" "$ncu" --kernel-name regex:adam \
            --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
            --section SchedulerStats --section InstructionStats --log-file "$OUT_DIR/ncu_profile.txt" \
            "$PYTHON" benchmarks/gpu_moment_modes.py --profile \
            --match 'float32 params, moments=int8$|moments=int8, master_weights=24|stochastic_rounding'
        tail -n 60 "$OUT_DIR/ncu_profile.txt" 2> /dev/null || true
    fi
fi
if selected adamw; then bench adamw adamw "${ADAMW_TIMEOUT:-200}"; fi
if selected ce; then bench cross_entropy ce,linear_ce "${CE_TIMEOUT:-120}"; fi
if selected steps; then bench accumulate_clip_adamw accumulate,clip_adamw "${STEPS_TIMEOUT:-90}"; fi
if selected sgd; then bench sgd sgd,lion "${SGD_TIMEOUT:-80}"; fi

if selected train; then
    phase "train: python -m fused_optim train --quick --compare --json $OUT_DIR/train.json"
    plot train
    run train "${TRAIN_TIMEOUT:-30}" "$PYTHON" -m fused_optim train --quick --compare --json "$OUT_DIR/train.json" \
        "${PLOT[@]}"
fi

if selected cpu; then
    phase "cpu: benchmarks/cpu_moment_modes.py, AdamW with fp32 and int8 moments on 1, 4 and $(nproc) threads"
    # only the kernel level the package loads here: each level and thread count is a process of ~10 s (1 GB of
    # tensors)
    cpu_isa="$("$PYTHON" -c 'import fused_optim; print(fused_optim.backends()["cpu_isa"]["loaded"])')" || cpu_isa=""
    run cpu "${CPU_TIMEOUT:-90}" "$PYTHON" benchmarks/cpu_moment_modes.py --isas "$cpu_isa" \
        --threads "1,4,$(nproc)" --match 'AdamW, float32 params, moments=(fp32|int8)' --passes 1 --rounds 10 \
        --kept 8 --out "$OUT_DIR/cpu_moment_modes.json"
fi

phase "done: ${summary[*]/%/,} status $status"
ls -l "$OUT_DIR"
exit $status
