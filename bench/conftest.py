"""Benchmark-session switches shared by every file under bench/.

`pytest bench/ --benchmark` runs each benchmark at full size (on the GPU where one is there); without the flag
the same files run as quick smoke checks (seconds, CPU is fine). Either way results are written through
bench/results.py into the `results_dir` fixture's folder: bench/results/local/ (git-ignored) or
$BENCH_RESULTS_DIR, with a smoke/ subfolder for smoke checks; only `--benchmark --save-results` writes the
committed bench/results/. Benchmark files read the mode from the `benchmark_full` fixture, or mark tests that
only make sense at full size with `@pytest.mark.full_benchmark`. (The fixture is not called `benchmark`:
pytest-benchmark owns that name.)
"""

import os
from pathlib import Path

import pytest
import torch

from bench.results import resolve_results_dir  # imports no kernels: TRITON_INTERPRET can still be set below

# Kernels are decorated when `kernels` is first imported: without CUDA they must run in Triton's CPU
# interpreter, which is read from the environment at that moment (as in tests/conftest.py).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_addoption(parser):
    parser.addoption("--benchmark", action="store_true", default=False,
                     help="run the benchmarks under bench/ at full size (default: quick smoke checks)")
    parser.addoption("--save-results", action="store_true", default=False,
                     help="with --benchmark: write the committed bench/results/ (default: bench/results/local/, "
                          "git-ignored, or $BENCH_RESULTS_DIR)")


def pytest_configure(config):
    config.addinivalue_line("markers", "full_benchmark: runs only with --benchmark (skipped in smoke mode)")
    try:  # refuse a bad combination before anything runs, not after the first benchmark
        resolve_results_dir(config.getoption("--benchmark"), config.getoption("--save-results"))
    except ValueError as exc:
        raise pytest.UsageError(str(exc)) from None


def pytest_collection_modifyitems(config, items):
    if config.getoption("--benchmark"):
        return
    skip = pytest.mark.skip(reason="full-size benchmark: pass --benchmark")
    for item in items:
        if "full_benchmark" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def benchmark_full(request) -> bool:
    """True with --benchmark (full size), False for the quick smoke check."""
    return bool(request.config.getoption("--benchmark"))


@pytest.fixture(scope="session")
def results_dir(request, benchmark_full) -> Path:
    """Where this session's results go (bench/results.py: resolve_results_dir), created on first use."""
    path = resolve_results_dir(benchmark_full, bool(request.config.getoption("--save-results")))
    path.mkdir(parents=True, exist_ok=True)
    return path
