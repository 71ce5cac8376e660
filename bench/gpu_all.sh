#!/usr/bin/env bash
# Every GPU check of the project in ONE device call of at most GPU_ALL_BUDGET_S seconds (default 360: 6 minutes,
# inside the device's 10 minutes a call, and short enough that a rerun fits its 15 minutes a session):
#
#     bash bench/gpu_all.sh                                        # the default stages, in the order below
#     GPU_ALL_STAGES=env,trainer,table5 bash bench/gpu_all.sh      # some stages (always run in the order below)
#     GPU_ALL_BUDGET_S=900 bash bench/gpu_all.sh                   # more time: every stage's share grows with it
#     PYTHON=/opt/torch/.venv/bin/python3 bash bench/gpu_all.sh    # another interpreter (default: python3)
#
# Knobs: GPU_ALL_STAGES (comma-separated, default every stage but demo), GPU_ALL_BUDGET_S, PYTHON. $OUT is where
# everything goes (the device tool sets it; default a fresh /tmp folder). Nothing is installed (the GPU machine has
# no network): the repository is put on PYTHONPATH.
#
# No CUDA GPU through $PYTHON: the script ends at once, exit 3, with one line (nothing runs on a CPU under a
# healthy-looking summary). Stages, in the order a first contact must answer them, each run whatever happened to
# the one before:
#   env           nvidia-smi, the interpreter, versions of Python / torch / CUDA / triton / optional packages, pip
#                 list, commit
#   kernel_tests  tests/test_kernels_*.py on the GPU (not the compile-only tests/test_kernels_compile.py)
#   model         the rest of tests/ that concern the triton backend or the GPU (-k "triton or cuda or gpu"; not
#                 tests/test_gpu_script.py, this script's own CPU test)
#                 (both with pytest-xdist where installed, and then with TORCHINDUCTOR_COMPILE_THREADS=1; the
#                 stages that compile for speed keep inductor's default)
#   trainer       the real trainer, eager: python -m train.pretrain, ViT-B/16 CrossMAE, synthetic images, 30 steps
#                 of batch 256 (one epoch of 7,680 images), its default precision; --backend torch, --backend auto
#                 (the numbers + speed check: its backend_verdict.json is kept), --backend triton. --save_every 0
#                 --keep_every 0: the epoch's end writes checkpoint-last.pth once (no kept copy; the run's final
#                 save is then skipped, the same step), so no GPU time goes to writing checkpoints twice
#   table5        bench/test_table5.py + bench/test_train_step.py --benchmark, eager only: the ViT-B Table 5 rows
#                 (BENCH_SIZES="", torch vs triton), the end-to-end step (ViT-B, then ViT-L)
#   kernel_bench  bench/test_kernels.py --benchmark without the block-size sweep (KERNEL_BENCH_SWEEP=0)
#   compiled      bench/test_table5.py + bench/test_train_step.py --benchmark, BENCH_VARIANTS=triton+compile,
#                 BENCH_SIZES=L,H: the compiled ViT-B rows, then ViT-L/H, and the compiled step goal (the harness
#                 always puts the torch reference first, so its eager rows are measured again beside them)
#   demo          (only when named) the embedded default through the PyTorch loader (--data_backend torch)
#   sweep         bench/test_kernels.py's attention block-size sweep (about 40 compiles): last
#
# Time: every stage (and every run inside the trainer stage) gets a share of what is left of the budget, in
# proportion to its weight below (at least 10 s), and is cut when it overruns it (SIGTERM 5 s before the end of its
# share, SIGKILL at the end) so that later stages still run; time a stage does not use goes to the ones after it.
# With under 10 s left a stage is skipped. The shares at 360 s when each stage uses all of its own: env 10, kernel
# tests 55, model 30, trainer 75 (18 torch, 38 auto, 19 triton), table5 45, kernel bench 35, compiled 81, sweep
# what is left (26, more when earlier stages end early).
#
# Output: at most four files in $OUT (the device tool returns 8 at most), written as they are produced, so that a
# call killed at any moment returns what was done until then:
#   summary.txt      one line per stage: started, then passed / FAILED (exit N) / CUT at its limit / skipped
#   gpu_all.log      every stage's (and run's) full console output, streamed, one after the other; each begins
#                    with a line "##### NN_<label>: ..." and ends with "# exit ..." once done
#   results.tar.gz   results/, re-archived after every stage: <stage>/ every benchmark result of that stage
#                    (bench/results.py: BENCH_RESULTS_DIR), trainer_<backend>/ a run's metrics.jsonl and, where
#                    written, backend_verdict.json
#   results.tar.gz.part  only while the archive is being rewritten (renamed onto results.tar.gz when complete)
# Exit status: 0 when every stage that ran passed; 1 otherwise (a cut stage counts as not passed); 2 for bad knobs;
# 3 without a CUDA GPU.
set -u -o pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"

STAGE_ORDER=(env kernel_tests model trainer table5 kernel_bench compiled demo sweep)
DEFAULT_STAGES="env kernel_tests model trainer table5 kernel_bench compiled sweep"
declare -A WEIGHT=([env]=8 [kernel_tests]=55 [model]=30 [trainer]=75 [table5]=45 [kernel_bench]=35 [compiled]=80
    [demo]=25 [sweep]=25)
RESERVE_S=3  # kept back for the final summary and archive
KILL_GRACE_S=5  # a cut job gets SIGTERM this long before its limit, then SIGKILL at the limit
MIN_SHARE_S=10  # a share below this is raised to it (or to what is left): a stage must be able to start
MIN_JOB_S=10  # with less than this left, a job is skipped
PY="${PYTHON:-python3}"

# ---- knobs -----------------------------------------------------------------------------------------------------
BUDGET="${GPU_ALL_BUDGET_S:-360}"
if ! [[ "$BUDGET" =~ ^[0-9]+$ ]] || [ "$BUDGET" -lt 10 ]; then
    echo "gpu_all.sh: GPU_ALL_BUDGET_S=${BUDGET}: expected whole seconds >= 10, e.g. GPU_ALL_BUDGET_S=360" >&2
    exit 2
fi
declare -A SELECTED=()
IFS=', ' read -r -a requested <<<"${GPU_ALL_STAGES:-$DEFAULT_STAGES}"
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
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
SUMMARY="$OUT/summary.txt"
LOG="$OUT/gpu_all.log"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

# ---- no CUDA: one line, at once --------------------------------------------------------------------------------
read -r HAS_CUDA TORCH_VERSION < <("$PY" -c 'import torch; print(int(torch.cuda.is_available()), torch.__version__)' \
    2>/dev/null || echo "0 not-importable")
if [ "${HAS_CUDA:-0}" != 1 ]; then
    line="gpu_all.sh: no CUDA GPU through $PY (torch ${TORCH_VERSION:-not importable}): nothing run (exit 3)"
    echo "$line" | tee "$SUMMARY" >&2
    exit 3
fi

WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_all_work.XXXXXX")"  # never in $OUT: results/ (archived), runs/ (checkpoints)
RESULTS="$WORK/results"
mkdir -p "$RESULTS" "$WORK/runs"
export PY
export PYTHONUNBUFFERED=1  # logs stream line by line
export CROSSMAE_CACHE="$WORK/cache"  # a fresh cache: the auto run checks the card, whatever a warm machine kept
status=0
job_pid=""
job_start=0

note() { echo "$*" | tee -a "$SUMMARY" >>"$LOG"; echo "$*"; }

archive() {  # results/ into $OUT/results.tar.gz, replaced whole (a killed tar leaves the previous archive intact)
    tar -czf "$OUT/results.tar.gz.part" -C "$WORK" results 2>/dev/null \
        && mv -f "$OUT/results.tar.gz.part" "$OUT/results.tar.gz"
}

on_signal() {  # the call is being ended: stop the running job's process group, say so in the log, leave
    trap - TERM INT HUP
    if [ -n "$job_pid" ]; then
        kill -TERM -- "-$job_pid" 2>/dev/null
        for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 -- "-$job_pid" 2>/dev/null || break; sleep 0.3; done
        kill -KILL -- "-$job_pid" 2>/dev/null
        echo "# interrupted by SIG$1 after $((SECONDS - job_start)) s" >>"$LOG"
    fi
    note "== interrupted by SIG$1 at ${SECONDS} s; the log above is complete up to that moment"
    archive
    rm -rf "$WORK"
    exit "$2"  # 128 + the signal's number, as a shell reports a command killed by it
}
trap 'on_signal TERM 143' TERM
trap 'on_signal INT 130' INT
trap 'on_signal HUP 129' HUP

left_s() { echo $((BUDGET - RESERVE_S - SECONDS)); }

# run_job NAME LIMIT COMMAND...: COMMAND in its own process group under `timeout` (so that a cut also ends its
# children: xdist workers, DataLoader workers, compile workers), its output appended to the combined log under a
# header. Sets job_rc.
run_job() {
    local name="$1" limit="$2"
    shift 2
    job_start=$SECONDS
    printf '\n##### %s: started at %s s (%s), limit %s s\n# %s\n' "$name" "$SECONDS" "$(date -u '+%H:%M:%S UTC')" \
        "$limit" "$(echo "$*" | tr '\n' ' ' | cut -c1-300)" >>"$LOG"
    timeout -k "$KILL_GRACE_S" $((limit - KILL_GRACE_S)) "$@" >>"$LOG" 2>&1 </dev/null &
    job_pid=$!
    echo "   (running in process group $job_pid: $name, limit ${limit} s)" | tee -a "$SUMMARY"
    wait "$job_pid"
    job_rc=$?
    job_pid=""
    echo "# exit $job_rc after $((SECONDS - job_start)) s" >>"$LOG"
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

weight_left() {  # the weights of stage $1 and of the selected stages after it
    local total=0 seen=0 s
    for s in "${STAGE_ORDER[@]}"; do
        [ "$s" = "$1" ] && seen=1
        [ "$seen" -eq 1 ] && [ -n "${SELECTED[$s]+x}" ] && total=$((total + WEIGHT[$s]))
    done
    echo "$total"
}

# job LABEL LIMIT COMMAND...: one job, with its verdict in the summary; returns its exit status (0: passed).
job() {
    local label="$1" limit="$2"
    shift 2
    local name rc offset
    name="$(printf '%02d' "$STAGE_NO")_${label}"
    if [ "$limit" -lt "$MIN_JOB_S" ]; then
        note "== $label: skipped, only ${limit} s of GPU_ALL_BUDGET_S=${BUDGET} left for it"
        status=1
        return 1
    fi
    note "== $label: started at ${SECONDS} s, limit ${limit} s"
    offset=$(wc -c <"$LOG")
    run_job "$name" "$limit" "$@"
    rc=$job_rc
    [ "$rc" -eq 5 ] && [[ "$*" == *pytest* ]] && rc=0  # pytest's "no tests collected" is not a failure
    if [ "$job_rc" -eq 124 ] || [ "$job_rc" -eq 137 ]; then
        note "== $label: CUT at its limit of ${limit} s (exit $job_rc); total ${SECONDS} s"
    elif [ "$rc" -eq 0 ]; then
        note "== $label: passed in $((SECONDS - job_start)) s; total ${SECONDS} s"
    else
        note "== $label: FAILED (exit $job_rc) after $((SECONDS - job_start)) s; total ${SECONDS} s"
    fi
    tail -c +$((offset + 1)) "$LOG" | tail -n 12 | cut -c1-200
    [ "$rc" -eq 0 ] || status=1
    return "$rc"
}

keep_run_outputs() {  # LABEL PATTERN...: small outputs of a run in runs/, copied under results/; the run removed
    local label="$1"
    shift
    [ -d "$WORK/runs/$label" ] || return 0
    mkdir -p "$RESULTS/$label"
    for pattern in "$@"; do cp "$WORK/runs/$label"/$pattern "$RESULTS/$label/" 2>/dev/null; done
    rm -rf "${WORK:?}/runs/$label"
}

# bench ONE_STAGE_LABEL LIMIT PYTEST_ARGS...: a benchmark's pytest, its results under results/<label>/.
bench() {
    local label="$1" limit="$2"
    shift 2
    job "$label" "$limit" env BENCH_RESULTS_DIR="$RESULTS/$label" "$PY" -m pytest "$@" --benchmark -q -s -rfEs \
        -p no:cacheprovider
}

# The env stage's report, as a file: the stage runs it under the same timeout as any other job.
cat >"$WORK/environment.sh" <<'REPORT'
date -u; nproc; free -g 2>/dev/null | head -n 2; df -h . 2>/dev/null | tail -n 1
nvidia-smi || echo "nvidia-smi not found"
echo "interpreter: $PY -> $(command -v "$PY")"
"$PY" - <<'PY'
import platform
import sys

import torch

print("python", platform.python_version(), sys.executable, "torch", torch.__version__, "cuda", torch.version.cuda)
print("gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else "NONE", "count", torch.cuda.device_count())
for name in ("triton", "pytest", "xdist", "timm", "matplotlib", "nvidia.dali", "flash_attn", "xformers"):
    try:
        print(name, getattr(__import__(name, fromlist=["__version__"]), "__version__", "?"))
    except Exception as exc:
        print(name, "not importable:", type(exc).__name__)
PY
"$PY" -m pip list 2>/dev/null || echo "pip list failed"
git log -1 --oneline 2>/dev/null || echo "(no git metadata)"
REPORT

note "gpu_all.sh: stages $(for s in "${STAGE_ORDER[@]}"; do [ -n "${SELECTED[$s]+x}" ] && printf '%s ' "$s"; done)·" \
    "budget ${BUDGET} s · OUT=$OUT · $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
XDIST=()
XDIST_ENV=()
if "$PY" -c 'import xdist' 2>/dev/null; then
    XDIST=(-n 8)
    XDIST_ENV=(TORCHINDUCTOR_COMPILE_THREADS=1)  # 8 workers, each with a compile pool per core, would oversubscribe
fi
note "   python: $PY = $(command -v "$PY") ($("$PY" -c 'import sys; print(sys.executable, sys.version.split()[0])' \
    2>&1 | head -n 1)) · torch ${TORCH_VERSION:-?} · CUDA GPU: yes · pytest-xdist:" \
    "$([ ${#XDIST[@]} -gt 0 ] && echo 'yes (TORCHINDUCTOR_COMPILE_THREADS=1)' || echo no)"

STAGE_NO=0
for stage in "${STAGE_ORDER[@]}"; do
    STAGE_NO=$((STAGE_NO + 1))
    [ -z "${SELECTED[$stage]+x}" ] && continue
    limit=$(share "${WEIGHT[$stage]}" "$(weight_left "$stage")")
    case "$stage" in
        env)
            job env "$limit" bash "$WORK/environment.sh"
            ;;
        kernel_tests)
            files=()  # (--ignore does not apply to files named on the command line)
            for f in tests/test_kernels_*.py; do [ "$f" = tests/test_kernels_compile.py ] || files+=("$f"); done
            job kernel_tests "$limit" env ${XDIST_ENV[@]+"${XDIST_ENV[@]}"} "$PY" -m pytest "${files[@]}" \
                -p no:cacheprovider -v -rfEs --durations=15 ${XDIST[@]+"${XDIST[@]}"}
            ;;
        model)
            job model "$limit" env ${XDIST_ENV[@]+"${XDIST_ENV[@]}"} "$PY" -m pytest tests -p no:cacheprovider \
                --ignore-glob='tests/test_kernels_*' --ignore=tests/test_gpu_script.py -k "triton or cuda or gpu" \
                -v -rfEs --durations=15 \
                ${XDIST[@]+"${XDIST[@]}"}
            ;;
        trainer)
            # Three eager runs in the stage's share, auto's weighted double (its check runs both paths); time one
            # leaves goes to the next. torch first (the reference), auto second (the triton run would otherwise
            # fill the verdict cache first), triton last. Checkpoints stay in runs/; each run's metrics.jsonl and
            # backend_verdict.json are kept under results/.
            stage_end=$((SECONDS + limit))
            runs_left=4
            for run in "torch:1" "auto:2" "triton:1"; do
                IFS=: read -r backend run_w <<<"$run"
                label="trainer_${backend}"
                job "$label" "$(share "$run_w" "$runs_left" $((stage_end - SECONDS)))" "$PY" -m train.pretrain \
                    --model crossmae_vit_base_patch16 --data_backend synthetic --max_steps 30 --batch_size 256 \
                    --synthetic_images 7680 --backend "$backend" --log_every 10 --save_every 0 --keep_every 0 \
                    --output_dir "$WORK/runs/$label"
                runs_left=$((runs_left - run_w))
                keep_run_outputs "$label" "*.jsonl" backend_verdict.json
                archive
            done
            ;;
        table5)
            # ViT-B only, eager (BENCH_VARIANTS: the torch reference is always first), then the end-to-end step;
            # each skips what would overrun its part of the stage's share.
            BENCH_SIZES="" BENCH_VARIANTS=torch,triton BENCH_TABLE5_BUDGET_S=$((limit * 65 / 100)) \
                BENCH_TRAIN_STEP_BUDGET_S=$((limit * 20 / 100)) \
                bench table5 "$limit" bench/test_table5.py bench/test_train_step.py
            ;;
        kernel_bench)
            KERNEL_BENCH_SWEEP=0 bench kernel_bench "$limit" bench/test_kernels.py
            ;;
        compiled)
            BENCH_SIZES=L,H BENCH_VARIANTS=triton+compile BENCH_TABLE5_BUDGET_S=$((limit * 65 / 100)) \
                BENCH_TRAIN_STEP_BUDGET_S=$((limit * 20 / 100)) \
                bench compiled "$limit" bench/test_table5.py bench/test_train_step.py
            ;;
        demo)
            job demo "$limit" "$PY" -m train.pretrain --data_backend torch --max_steps 20 --save_every 0 \
                --keep_every 0 --output_dir "$WORK/runs/demo"
            keep_run_outputs demo "*.jsonl" "*.png" backend_verdict.json
            ;;
        sweep)
            bench sweep "$limit" bench/test_kernels.py -k attention_config_sweep
            ;;
    esac
    archive
done

archive
rm -rf "$WORK"
note "gpu_all.sh: done at ${SECONDS} s of ${BUDGET}; overall $([ "$status" -eq 0 ] && echo PASSED || echo 'NOT PASSED')"
# The numbers last, where a truncated console keeps them (read back from the archive: $WORK is gone).
for md in table5/table5_latest.md table5/train_step_latest.md compiled/train_step_latest.md; do
    text="$(tar -xzOf "$OUT/results.tar.gz" "results/$md" 2>/dev/null)" || continue
    echo; echo "# results/$md"
    case "$md" in
        */table5_latest.md) sed -n '/^## Backends side by side/,/^## Other sizes/p' <<<"$text" | head -n 30 ;;
        *) sed -n '/^| model | backend/,/^## Goals/p' <<<"$text" | head -n 20 ;;
    esac
done
echo; cat "$SUMMARY"
exit "$status"
