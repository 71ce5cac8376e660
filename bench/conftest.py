"""Benchmark-session switches shared by every file under bench/.

`pytest bench/ --benchmark` runs each benchmark at full size (on the GPU where one is there) and lets
it write its results under bench/results/; without the flag the same files run as quick smoke checks
(seconds, CPU is fine) and write nothing. Benchmark files read the switch from the `benchmark_full`
fixture, or mark tests that only make sense at full size with `@pytest.mark.full_benchmark`.
(The fixture is not called `benchmark`: pytest-benchmark owns that name.)
"""

import os
from pathlib import Path

import pytest
import torch

# Kernels are decorated when `kernels` is first imported: without CUDA they must run in Triton's CPU
# interpreter, which is read from the environment at that moment (as in tests/conftest.py).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def pytest_addoption(parser):
    parser.addoption("--benchmark", action="store_true", default=False,
                     help="run the benchmarks under bench/ at full size and write bench/results/ "
                          "(default: quick smoke checks that write nothing)")


def pytest_configure(config):
    config.addinivalue_line("markers", "full_benchmark: runs only with --benchmark (skipped in smoke mode)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--benchmark"):
        return
    skip = pytest.mark.skip(reason="full-size benchmark: pass --benchmark")
    for item in items:
        if "full_benchmark" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def benchmark_full(request) -> bool:
    """True with --benchmark (full size, write results), False for the quick smoke check."""
    return bool(request.config.getoption("--benchmark"))


@pytest.fixture(scope="session")
def results_dir() -> Path:
    """bench/results/, created on first use."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    return RESULTS_DIR
