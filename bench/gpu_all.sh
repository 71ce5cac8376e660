#!/usr/bin/env bash
# Every GPU check of the project in ONE device call, inside ~9 minutes on one H100 / H200:
#
#     bash bench/gpu_all.sh          # $OUT: where the results go (the device tool sets it; else a fresh /tmp dir)
#
# Stages (GPU_ALL_STAGES, default "env,kernels,tests,bench"), each one run whatever happened to the previous:
#   env      nvidia-smi, Python / torch / CUDA / triton versions            -> environment.txt
#   kernels  bash bench/gpu_kernels.sh (the kernel author's script, not duplicated here): tests/test_kernels_*.py on
#            the GPU, then bench/test_kernels.py --benchmark; shorter timeouts than its defaults so that everything
#            fits one call: KERNEL_TEST_TIMEOUT (default 120 s; its own default is 330), KERNEL_BENCH_TIMEOUT
#            (default 60 s; its own 240). For the kernels' full run use bench/gpu_kernels.sh alone in another call.
#   tests    the rest of tests/ selected by -k "cuda or gpu or triton_backend" (GPU_ALL_TESTS=all: the whole of tests/), at most
#            TESTS_TIMEOUT (default 45) s. No DALI on the GPU image: tests needing it skip themselves.
#   bench    python -m pytest <bench files> --benchmark -q -s: Table 5 and the end-to-end step first, then the other
#            benchmark files (bench/test_kernels.py only when the kernels stage did not run it). The stage gets what
#            is left of GPU_ALL_BUDGET_S (default 540 s) minus 20 s for packing; inside it Table 5 gets
#            BENCH_TABLE5_BUDGET_S (default: the rest minus 100 s) and runs its configurations in priority order
#            (ViT-B first), recording the ones that would not fit as "skipped"; BENCH_TRAIN_STEP_BUDGET_S (default 40)
#            covers what the step benchmark must measure beyond Table 5 (ViT-L under torch.compile).
#            Narrow it with BENCH_SIZES ("" = ViT-B only, or e.g. "L"), BENCH_VARIANTS, BENCH_STEPS (see
#            bench/test_table5.py), or GPU_ALL_BENCH_FILES (a space-separated list of files, run in that order);
#            e.g. GPU_ALL_STAGES=env,bench gives the benchmarks the whole call. Two calls cover everything at full
#            size: `GPU_ALL_STAGES=env,kernels,tests KERNEL_TEST_TIMEOUT=330 KERNEL_BENCH_TIMEOUT=200`, then
#            `GPU_ALL_STAGES=env,bench` (a warm machine keeps the compile caches between the two).
#
# $OUT receives at most 8 files: gpu_all_results.tar.gz (every log, environment, bench/results/* of this machine),
# summary.txt, table5_latest.md, table5_latest.png, train_step_latest.md, data_loading.md and the newest
# kernels_*.md. Nothing is installed (no network there): the repository is put on PYTHONPATH.
# Exit status: 0 when every stage that ran passed.
set -u -o pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"
OUT="${OUT:-$(mktemp -d /tmp/gpu_all.XXXXXX)}"
mkdir -p "$OUT"
STAGE_DIR="$(mktemp -d /tmp/gpu_all_stage.XXXXXX)/gpu_all"  # logs; packed as gpu_all/ in the tarball
mkdir -p "$STAGE_DIR"
PY="${PYTHON:-python}"
export PYTHON="$PY"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
STAGES=",${GPU_ALL_STAGES:-env,kernels,tests,bench},"
TOTAL="${GPU_ALL_BUDGET_S:-540}"
SUMMARY="$STAGE_DIR/summary.txt"
status=0

has_stage() { [[ "$STAGES" == *",$1,"* ]]; }
note() { echo "$*" | tee -a "$SUMMARY"; }
finish_stage() {  # name, exit code; pytest's 5 ("no tests collected") is not a failure
    local rc=$2
    [ "$rc" -eq 5 ] && rc=0
    note "== $1: exit $2 after $((SECONDS - stage_start)) s (total ${SECONDS} s)"
    [ "$rc" -ne 0 ] && status=1
    return 0
}

note "gpu_all.sh: stages ${STAGES//,/ } · budget ${TOTAL} s · OUT=$OUT · $(date -u '+%Y-%m-%d %H:%M UTC')"

# ---- env ------------------------------------------------------------------------------------------------------
if has_stage env; then
    stage_start=$SECONDS
    {
        date -u
        nvidia-smi || echo "nvidia-smi not found"
        "$PY" - <<'EOF'
import platform
import torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
try:
    import triton
    print("triton", triton.__version__)
except Exception as exc:
    print("triton not importable:", type(exc).__name__, exc)
print("gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else "NONE",
      "count", torch.cuda.device_count())
for name in ("pytest", "pytest_benchmark", "matplotlib", "nvidia.dali", "flash_attn", "xformers"):
    try:
        module = __import__(name, fromlist=["__version__"])
        print(name, getattr(module, "__version__", "?"))
    except Exception as exc:
        print(name, "not importable:", type(exc).__name__)
EOF
        git -C "$REPO" log -1 --oneline 2>/dev/null || echo "(no git metadata)"
    } >"$STAGE_DIR/environment.txt" 2>&1
    env_rc=$?
    cat "$STAGE_DIR/environment.txt"
    cat "$STAGE_DIR/environment.txt" >>"$SUMMARY"
    finish_stage env "$env_rc"
fi

# ---- kernels: the kernel author's script ---------------------------------------------------------------------
if has_stage kernels; then
    stage_start=$SECONDS
    if [ -f bench/gpu_kernels.sh ]; then
        OUT="$STAGE_DIR/kernels" KERNEL_TEST_TIMEOUT="${KERNEL_TEST_TIMEOUT:-120}" \
            KERNEL_BENCH_TIMEOUT="${KERNEL_BENCH_TIMEOUT:-60}" bash bench/gpu_kernels.sh >"$STAGE_DIR/kernels.log" 2>&1
        kernels_rc=$?
        tail -n 30 "$STAGE_DIR/kernels.log"
        finish_stage "kernels (bench/gpu_kernels.sh)" "$kernels_rc"
    else
        note "== kernels: bench/gpu_kernels.sh not found, stage skipped"
        STAGES="${STAGES/,kernels,/,}"
    fi
fi

# ---- tests: the rest of the suite's GPU tests ------------------------------------------------------------------
if has_stage tests; then
    stage_start=$SECONDS
    ignore=()
    has_stage kernels && ignore=(--ignore-glob='tests/test_kernels_*')
    if [ "${GPU_ALL_TESTS:-gpu}" = "all" ]; then select=(); else select=(-k "cuda or gpu or triton_backend"); fi
    timeout -k 10 "${TESTS_TIMEOUT:-45}" "$PY" -m pytest tests -q -rfEs ${select[@]+"${select[@]}"} \
        ${ignore[@]+"${ignore[@]}"} \
        >"$STAGE_DIR/tests.log" 2>&1
    tests_rc=$?
    tail -n 25 "$STAGE_DIR/tests.log"
    finish_stage "tests (${GPU_ALL_TESTS:-gpu})" "$tests_rc"
fi

# ---- bench -----------------------------------------------------------------------------------------------------
if has_stage bench; then
    stage_start=$SECONDS
    left=$((TOTAL - SECONDS - 20))
    if [ "$left" -lt 60 ]; then
        note "== bench: only ${left} s left of GPU_ALL_BUDGET_S=${TOTAL}, stage skipped"
        status=1
    else
        export BENCH_TRAIN_STEP_BUDGET_S="${BENCH_TRAIN_STEP_BUDGET_S:-40}"
        export BENCH_TABLE5_BUDGET_S="${BENCH_TABLE5_BUDGET_S:-$((left - 100 > 30 ? left - 100 : 30))}"
        if [ -n "${GPU_ALL_BENCH_FILES:-}" ]; then
            read -r -a files <<<"$GPU_ALL_BENCH_FILES"
        else
            files=(bench/test_table5.py bench/test_train_step.py)
            for f in bench/test_*.py; do
                case "$f" in
                    bench/test_table5.py | bench/test_train_step.py) ;;
                    bench/test_kernels.py) has_stage kernels || files+=("$f") ;;
                    *) files+=("$f") ;;
                esac
            done
        fi
        note "== bench: ${files[*]} (stage limit ${left} s, Table 5 budget ${BENCH_TABLE5_BUDGET_S} s, train step budget ${BENCH_TRAIN_STEP_BUDGET_S} s)"
        timeout -k 10 "$left" "$PY" -m pytest "${files[@]}" --benchmark -q -s -rfEs 2>&1 | tee "$STAGE_DIR/bench.log" |
            grep -E --line-buffered '^\[(table5|train_step)\]|passed|failed|[0-9]+ error' | cut -c1-240
        bench_rc=${PIPESTATUS[0]}
        tail -n 15 "$STAGE_DIR/bench.log"
        finish_stage bench "$bench_rc"
    fi
fi

# ---- pack up ---------------------------------------------------------------------------------------------------
mkdir -p "$STAGE_DIR/results"
cp -r bench/results/. "$STAGE_DIR/results/" 2>/dev/null
note "stage exit summary above; overall status $status; $(date -u '+%H:%M:%S UTC'), ${SECONDS} s"
cp "$SUMMARY" "$OUT/summary.txt"
tar -czf "$OUT/gpu_all_results.tar.gz" -C "$(dirname "$STAGE_DIR")" "$(basename "$STAGE_DIR")"
for f in table5_latest.md table5_latest.png train_step_latest.md data_loading.md; do
    [ -f "bench/results/$f" ] && cp "bench/results/$f" "$OUT/"
done
newest_kernels="$(ls -t bench/results/kernels_*.md 2>/dev/null | head -n 1)"
[ -n "$newest_kernels" ] && cp "$newest_kernels" "$OUT/"
ls -l "$OUT"

# The numbers last, where a truncated console keeps them.
if [ -f bench/results/table5_latest.md ]; then
    echo; sed -n '/^## Backends side by side/,/^## Other sizes/p' bench/results/table5_latest.md | head -n 40
fi
if [ -f bench/results/train_step_latest.md ]; then
    echo; sed -n '/^| model | backend/,$p' bench/results/train_step_latest.md | head -n 40
fi
exit "$status"
