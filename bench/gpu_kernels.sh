#!/usr/bin/env bash
# Everything about the Triton kernels that needs a GPU, in ONE call (fits the device tool's 10-minute limit):
#
#     bash bench/gpu_kernels.sh            # from anywhere; OUT=/some/dir to choose where logs and results go
#
# 1. environment.txt    nvidia-smi, Python / torch / triton / flash-attn / xformers versions
# 2. kernel_tests.log   pytest tests/test_kernels_*.py on the GPU: the fp32 reference checks compiled for real, the
#                       fp16 / bf16 tests at realistic shapes, flash-attn / xformers comparisons, torch.compile
#                       with inductor (at most KERNEL_TEST_TIMEOUT seconds, default 330). The sm_90 compile-only
#                       test is left out: on a GPU every kernel is compiled for real anyway.
# 3. kernel_bench.log   pytest bench/test_kernels.py --benchmark: bench/results/kernels_<gpu>.{json,md}, copied
#                       next to the logs (at most KERNEL_BENCH_TIMEOUT seconds, default 240; the block-size sweep
#                       runs last and every earlier result is already written if it is cut short)
# 5 files in $OUT (default bench/results/gpu_run). Exit status: non-zero if the tests or the benchmark failed.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results/gpu_run}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"

{
    date -u
    nvidia-smi || echo "nvidia-smi not found"
    "$PY" - <<'EOF'
import platform
import torch
import triton
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "triton", triton.__version__)
print("gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else "NONE")
for name in ("flash_attn", "xformers", "pytest"):
    try:
        print(name, __import__(name).__version__)
    except Exception as exc:
        print(name, "not importable:", type(exc).__name__)
EOF
} >"$OUT/environment.txt" 2>&1
cat "$OUT/environment.txt"

timeout "${KERNEL_TEST_TIMEOUT:-330}" "$PY" -m pytest tests/test_kernels_*.py -q -rfEs -p no:cacheprovider \
    -k "not compile_for_sm90" \
    >"$OUT/kernel_tests.log" 2>&1
tests_rc=$?
echo "== kernel tests (exit $tests_rc) =="
tail -n 40 "$OUT/kernel_tests.log"

timeout "${KERNEL_BENCH_TIMEOUT:-240}" "$PY" -m pytest bench/test_kernels.py --benchmark -q -s -p no:cacheprovider \
    >"$OUT/kernel_bench.log" 2>&1
bench_rc=$?
echo "== kernel benchmark (exit $bench_rc) =="
tail -n 60 "$OUT/kernel_bench.log"

cp bench/results/kernels_*.json bench/results/kernels_*.md "$OUT"/ 2>/dev/null || echo "no benchmark results written"
ls -l "$OUT"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
