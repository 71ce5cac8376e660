#!/usr/bin/env bash
# Every GPU check of the project in ONE device call of at most GPU_ALL_BUDGET_S seconds (default 420: 7 minutes,
# so that a rerun fits a 15-minute device budget):
#
#     bash bench/gpu_all.sh                                   # everything, in the order below
#     GPU_ALL_STAGES=env,trainer,demo bash bench/gpu_all.sh   # some stages (always run in the order below)
#     GPU_ALL_BUDGET_S=900 bash bench/gpu_all.sh              # more time: every stage's share grows with it
#
# Two knobs only: GPU_ALL_STAGES (comma-separated, default all) and GPU_ALL_BUDGET_S. $OUT is where everything goes
# (the device tool sets it; default a fresh /tmp folder). Nothing is installed (the GPU machine has no network):
# the repository is put on PYTHONPATH.
#
# Stages, each run whatever happened to the one before:
#   env           nvidia-smi, versions of Python / torch / CUDA / triton / optional packages, pip list, commit
#   kernel_tests  tests/test_kernels_*.py on the GPU, in parallel with pytest-xdist where installed (the compile-only
#                 tests/test_kernels_compile.py is left out: on a GPU every kernel is compiled for real)
#   kernel_bench  bench/test_kernels.py --benchmark: copy bandwidth; attention against every SDPA backend; the IBA
#                 mix; the gathers; the attention block-size sweep last
#   model         the rest of tests/ that concern the triton backend or the GPU (-k "triton or cuda or gpu"; not
#                 tests/test_gpu_script.py, this script's own CPU test): the model, triton against torch, on the GPU
#   trainer       the real trainer: python -m train.pretrain, ViT-B/16 CrossMAE, synthetic images, 30 steps of
#                 batch 256 (one epoch of 7,680 images), its default precision; --backend torch, --backend triton, then both with --compile
#   demo          the embedded default through the PyTorch loader (python -m train.pretrain --data_backend torch)
#   table5        bench/test_table5.py + bench/test_train_step.py --benchmark: ViT-B Table 5 rows, torch vs triton,
#                 eager; then the compiled rows; then ViT-S/L/H (each configuration that would not fit is recorded
#                 as skipped), and the end-to-end step goals
# Stages that measure the GPU (kernel_bench, trainer, table5) are skipped, with a note, where there is none.
#
# Time: every stage (and every run inside the trainer stage) gets a share of what is left of the budget, in
# proportion to its weight below (at least 10 s), and is cut when it overruns it (SIGTERM 5 s before
# the end of its share, SIGKILL at the end) so that later stages still run; time a stage does not use goes to the
# ones after it. With under 10 s left a stage is skipped. The default shares at 420 s, roughly: env 10 s, kernel
# tests 70, kernel bench 45, model 30, trainer 140 (23 + 23 eager, 47 + 47 compiled), demo 30, table5 95.
#
# Output, written into $OUT as it is produced (a call killed at any moment returns what was done until then):
#   summary.txt          one line per stage: started, then passed / FAILED (exit N) / CUT at its limit / skipped
#   NN_<stage>.log       each stage's (or run's) full console output, streamed; it ends with "# exit ..." once done
#   results/             every benchmark result (bench/results.py: BENCH_RESULTS_DIR), rewritten after each
#                        configuration; trainer_<run>/ the trainer runs' metrics.jsonl
# Exit status: 0 when every stage that ran passed; 1 otherwise (a cut stage counts as not passed); 2 for bad knobs.
set -u -o pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"

STAGE_ORDER=(env kernel_tests kernel_bench model trainer demo table5)
declare -A WEIGHT=([env]=10 [kernel_tests]=70 [kernel_bench]=45 [model]=30 [trainer]=140 [demo]=30 [table5]=95)
GPU_ONLY=" kernel_bench trainer table5 "
RESERVE_S=3  # kept back for the final summary
KILL_GRACE_S=5  # a cut job gets SIGTERM this long before its limit, then SIGKILL at the limit
MIN_SHARE_S=10  # a share below this is raised to it (or to what is left): a stage must be able to start
MIN_JOB_S=10  # with less than this left, a job is skipped

# ---- knobs -----------------------------------------------------------------------------------------------------
BUDGET="${GPU_ALL_BUDGET_S:-420}"
if ! [[ "$BUDGET" =~ ^[0-9]+$ ]] || [ "$BUDGET" -lt 10 ]; then
    echo "gpu_all.sh: GPU_ALL_BUDGET_S=${BUDGET}: expected whole seconds >= 10, e.g. GPU_ALL_BUDGET_S=420" >&2
    exit 2
fi
declare -A SELECTED=()
IFS=', ' read -r -a requested <<<"${GPU_ALL_STAGES:-${STAGE_ORDER[*]}}"
for name in "${requested[@]}"; do
    [ -z "$name" ] && continue
    if [ -z "${WEIGHT[$name]+x}" ]; then
        echo "gpu_all.sh: GPU_ALL_STAGES names an unknown stage '$name'; stages: ${STAGE_ORDER[*]}" \
            "(comma-separated, e.g. GPU_ALL_STAGES=env,trainer)" >&2
        exit 2
    fi
    SELECTED[$name]=1
done
if [ "${#SELECTED[@]}" -eq 0 ]; then
    echo "gpu_all.sh: GPU_ALL_STAGES='${GPU_ALL_STAGES:-}' selects no stage; stages: ${STAGE_ORDER[*]}" >&2
    exit 2
fi

OUT="${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_all.XXXXXX")}"
mkdir -p "$OUT/results"
OUT="$(cd "$OUT" && pwd)"
SCRATCH="$(mktemp -d "${TMPDIR:-/tmp}/gpu_all_scratch.XXXXXX")"  # checkpoints and other big files: never in $OUT
SUMMARY="$OUT/summary.txt"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1  # logs stream line by line
export BENCH_RESULTS_DIR="$OUT/results"
status=0
job_pid=""
job_log=""
job_start=0

note() { echo "$*" | tee -a "$SUMMARY"; }

on_signal() {  # the call is being ended: stop the running job's process group, say so in its log, leave
    trap - TERM INT HUP
    if [ -n "$job_pid" ]; then
        kill -TERM -- "-$job_pid" 2>/dev/null
        for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 -- "-$job_pid" 2>/dev/null || break; sleep 0.3; done
        kill -KILL -- "-$job_pid" 2>/dev/null
        [ -n "$job_log" ] && echo "# interrupted by SIG$1 after $((SECONDS - job_start)) s" >>"$job_log"
    fi
    note "== interrupted by SIG$1 at ${SECONDS} s; the logs above are complete up to that moment"
    rm -rf "$SCRATCH"
    exit "$2"  # 128 + the signal's number, as a shell reports a command killed by it
}
trap 'on_signal TERM 143' TERM
trap 'on_signal INT 130' INT
trap 'on_signal HUP 129' HUP

left_s() { echo $((BUDGET - RESERVE_S - SECONDS)); }

# run_job LOG LIMIT COMMAND...: COMMAND in its own process group under `timeout` (so that a cut also ends its
# children: xdist workers, DataLoader workers, compile workers), its output streamed into LOG. Sets job_rc.
run_job() {
    local log="$1" limit="$2"
    shift 2
    job_log="$log"
    job_start=$SECONDS
    printf '# %s\n# limit %s s, started %s\n' "$(echo "$*" | tr '\n' ' ' | cut -c1-300)" "$limit" \
        "$(date -u '+%H:%M:%S UTC')" >>"$log"
    timeout -k "$KILL_GRACE_S" $((limit - KILL_GRACE_S)) "$@" >>"$log" 2>&1 </dev/null &
    job_pid=$!
    note "   (running in process group $job_pid: $(basename "$log"), limit ${limit} s)"
    wait "$job_pid"
    job_rc=$?
    job_pid=""
    echo "# exit $job_rc after $((SECONDS - job_start)) s" >>"$log"
}

# share WEIGHT WEIGHT_LEFT [SECONDS]: WEIGHT's part of SECONDS (default: what is left of the budget), where
# WEIGHT_LEFT is the weight of everything still to run out of it; never more than what is left of the budget.
share() {
    local left pool
    left=$(left_s)
    pool="${3:-$left}"
    [ "$pool" -gt "$left" ] && pool=$left
    [ "$pool" -lt 0 ] && pool=0
    local s=$((pool * $1 / $2))
    [ "$s" -lt "$MIN_SHARE_S" ] && s=$MIN_SHARE_S
    [ "$s" -gt "$left" ] && s=$left
    echo "$s"
}

runs_here() {  # whether stage $1 is selected and can run on this machine
    [ -n "${SELECTED[$1]+x}" ] && { [ "$HAS_CUDA" = 1 ] || [[ "$GPU_ONLY" != *" $1 "* ]]; }
}

weight_left() {  # the weights of stage $1 and of the stages after it that will run
    local total=0 seen=0 s
    for s in "${STAGE_ORDER[@]}"; do
        [ "$s" = "$1" ] && seen=1
        [ "$seen" -eq 1 ] && runs_here "$s" && total=$((total + WEIGHT[$s]))
    done
    echo "$total"
}

# job LABEL LIMIT COMMAND...: one job, with its verdict in the summary; returns its exit status (0: passed).
job() {
    local label="$1" limit="$2"
    shift 2
    local log rc
    log="$OUT/$(printf '%02d' "$STAGE_NO")_${label}.log"
    if [ "$limit" -lt "$MIN_JOB_S" ]; then
        note "== $label: skipped, only ${limit} s of GPU_ALL_BUDGET_S=${BUDGET} left for it"
        status=1
        return 1
    fi
    note "== $label: started at ${SECONDS} s, limit ${limit} s"
    run_job "$log" "$limit" "$@"
    rc=$job_rc
    [ "$rc" -eq 5 ] && [[ "$*" == *pytest* ]] && rc=0  # pytest's "no tests collected" is not a failure
    if [ "$job_rc" -eq 124 ] || [ "$job_rc" -eq 137 ]; then
        note "== $label: CUT at its limit of ${limit} s (exit $job_rc); total ${SECONDS} s"
    elif [ "$rc" -eq 0 ]; then
        note "== $label: passed in $((SECONDS - job_start)) s; total ${SECONDS} s"
    else
        note "== $label: FAILED (exit $job_rc) after $((SECONDS - job_start)) s; total ${SECONDS} s"
    fi
    tail -n 12 "$log" | cut -c1-200
    [ "$rc" -eq 0 ] || status=1
    return "$rc"
}

keep_run_outputs() {  # LABEL PATTERN...: small outputs of a run in scratch, copied under results/; scratch emptied
    local label="$1"
    shift
    [ -d "$SCRATCH/$label" ] || return 0
    mkdir -p "$OUT/results/$label"
    for pattern in "$@"; do cp "$SCRATCH/$label"/$pattern "$OUT/results/$label/" 2>/dev/null; done
    rm -rf "${SCRATCH:?}/$label"
}

# The env stage's report, as a file: the stage runs it under the same timeout as any other job.
cat >"$SCRATCH/environment.sh" <<'REPORT'
date -u; nproc; free -g 2>/dev/null | head -n 2; df -h . 2>/dev/null | tail -n 1
nvidia-smi || echo "nvidia-smi not found"
python - <<'PY'
import platform

import torch

print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
print("gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else "NONE", "count", torch.cuda.device_count())
for name in ("triton", "pytest", "xdist", "timm", "matplotlib", "nvidia.dali", "flash_attn", "xformers"):
    try:
        print(name, getattr(__import__(name, fromlist=["__version__"]), "__version__", "?"))
    except Exception as exc:
        print(name, "not importable:", type(exc).__name__)
PY
python -m pip list 2>/dev/null || echo "pip list failed"
git log -1 --oneline 2>/dev/null || echo "(no git metadata)"
REPORT

note "gpu_all.sh: stages $(for s in "${STAGE_ORDER[@]}"; do [ -n "${SELECTED[$s]+x}" ] && printf '%s ' "$s"; done)·" \
    "budget ${BUDGET} s · OUT=$OUT · $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
HAS_CUDA="$(python -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)"
XDIST=()
if python -c 'import xdist' 2>/dev/null; then XDIST=(-n 8); fi
note "   CUDA GPU: $([ "$HAS_CUDA" = 1 ] && echo yes || echo 'none, GPU-only stages are skipped') ·" \
    "pytest-xdist: $([ ${#XDIST[@]} -gt 0 ] && echo yes || echo no)"

STAGE_NO=0
for stage in "${STAGE_ORDER[@]}"; do
    STAGE_NO=$((STAGE_NO + 1))
    [ -z "${SELECTED[$stage]+x}" ] && continue
    if [ "$HAS_CUDA" != 1 ] && [[ "$GPU_ONLY" == *" $stage "* ]]; then
        note "== $stage: skipped, it measures the GPU and there is none"
        continue
    fi
    limit=$(share "${WEIGHT[$stage]}" "$(weight_left "$stage")")
    case "$stage" in
        env)
            job env "$limit" bash "$SCRATCH/environment.sh"
            ;;
        kernel_tests)
            files=()  # (--ignore does not apply to files named on the command line)
            for f in tests/test_kernels_*.py; do [ "$f" = tests/test_kernels_compile.py ] || files+=("$f"); done
            job kernel_tests "$limit" python -m pytest "${files[@]}" -p no:cacheprovider -v -rfEs --durations=15 \
                ${XDIST[@]+"${XDIST[@]}"}
            ;;
        kernel_bench)
            job kernel_bench "$limit" python -m pytest bench/test_kernels.py --benchmark -q -s -rfEs \
                -p no:cacheprovider
            ;;
        model)
            job model "$limit" python -m pytest tests -p no:cacheprovider --ignore-glob='tests/test_kernels_*' \
                --ignore=tests/test_gpu_script.py -k "triton or cuda or gpu" -v -rfEs --durations=15 \
                ${XDIST[@]+"${XDIST[@]}"}
            ;;
        trainer)
            # Four runs in the stage's share, the compiled ones weighted double (compilation); time one leaves
            # goes to the next. Checkpoints stay in scratch; each run's metrics.jsonl is kept under results/.
            stage_end=$((SECONDS + limit))
            runs_left=6
            for run in "torch:1:" "triton:1:" "torch:2:--compile" "triton:2:--compile"; do
                IFS=: read -r backend run_w flag <<<"$run"
                label="trainer_${backend}${flag:+_compile}"
                job "$label" "$(share "$run_w" "$runs_left" $((stage_end - SECONDS)))" python -m train.pretrain \
                    --model crossmae_vit_base_patch16 --data_backend synthetic --max_steps 30 --batch_size 256 \
                    --synthetic_images 7680 --backend "$backend" ${flag:+"$flag"} --log_every 10 --output_dir "$SCRATCH/$label"
                runs_left=$((runs_left - run_w))
                keep_run_outputs "$label" "*.jsonl"
            done
            ;;
        demo)
            job demo "$limit" python -m train.pretrain --data_backend torch --max_steps 20 --output_dir "$SCRATCH/demo"
            keep_run_outputs demo "*.jsonl" "*.png"
            ;;
        table5)
            # Inside the stage's limit: Table 5 (its configurations in priority order, each skipped when it would
            # overrun its budget), then what the end-to-end step adds (ViT-L, mostly), then the reports.
            export BENCH_TABLE5_BUDGET_S=$((limit * 70 / 100)) BENCH_TRAIN_STEP_BUDGET_S=$((limit * 15 / 100))
            job table5 "$limit" python -m pytest bench/test_table5.py bench/test_train_step.py --benchmark -q -s \
                -rfEs -p no:cacheprovider
            unset BENCH_TABLE5_BUDGET_S BENCH_TRAIN_STEP_BUDGET_S
            ;;
    esac
done

rm -rf "$SCRATCH"
note "gpu_all.sh: done at ${SECONDS} s of ${BUDGET}; overall $([ "$status" -eq 0 ] && echo PASSED || echo 'NOT PASSED')"
# The numbers last, where a truncated console keeps them.
if [ -f "$OUT/results/table5_latest.md" ]; then
    echo; sed -n '/^## Backends side by side/,/^## Other sizes/p' "$OUT/results/table5_latest.md" | head -n 30
fi
if [ -f "$OUT/results/train_step_latest.md" ]; then
    echo; sed -n '/^| model | backend/,/^## Goals/p' "$OUT/results/train_step_latest.md" | head -n 20
fi
echo; cat "$SUMMARY"
exit "$status"
