"""bench/gpu_all.sh on the CPU: what it leaves in $OUT when it finishes, when a stage overruns its share, and when
the call is killed mid-stage.

One test runs the real script (its env stage; the GPU-only stages skip themselves here). The others put a stub
`python` first on PATH, so that stages take exactly as long as the test needs (a stage that never ends, one that
ends at once) whatever the machine's speed or the state of the code the stages would run; everything the stub does
not recognise goes to the real interpreter.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "gpu_all.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="bench/gpu_all.sh needs bash and GNU timeout")

# A stand-in for `python` in the script's commands: "CUDA is available", no xdist; pytest of bench/test_kernels.py
# (the kernel_bench stage) prints a line and then hangs, a stage that can only end by being cut; the trainer and
# any other pytest print their arguments (and the budget the script exported) and succeed.
STUB = """#!/usr/bin/env bash
case "$*" in
    *torch.cuda.is_available*) echo 1 ;;
    *"import xdist"*) exit 1 ;;
    *"-m pytest"*bench/test_kernels.py*)
        echo "stub pytest started: $*"
        exec sleep 600 ;;
    *"-m pytest"*) echo "stub pytest: $* table5 budget ${{BENCH_TABLE5_BUDGET_S:-unset}}" ;;
    *"-m train.pretrain"*) echo "stub trainer: $*" ;;
    *) exec {python} "$@" ;;
esac
"""


def stub_env(tmp_path: Path, stages: str, budget: int) -> dict:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / "python"
    stub.write_text(STUB.format(python=sys.executable))
    stub.chmod(stub.stat().st_mode | stat.S_IXUSR)
    return dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", OUT=str(tmp_path / "out"),
                TMPDIR=str(tmp_path), GPU_ALL_STAGES=stages, GPU_ALL_BUDGET_S=str(budget))


def group_alive(group: int, wait_s: float) -> bool:
    """Whether process group ``group`` still has a process after up to ``wait_s`` seconds (zombies take a moment
    to be reaped)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return False
        if time.monotonic() > deadline:
            return True
        time.sleep(0.1)


def run_script(env: dict, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def test_finished_stages_leave_their_logs_in_out(tmp_path):
    """The real script with the issue's 60-second budget: the env stage's full log and the summary are in $OUT;
    stages that measure the GPU say why they did not run."""
    env = dict(os.environ, OUT=str(tmp_path / "out"), TMPDIR=str(tmp_path), GPU_ALL_STAGES="env,trainer,table5",
               GPU_ALL_BUDGET_S="60")
    proc = run_script(env, timeout=90)
    out = tmp_path / "out"
    summary = (out / "summary.txt").read_text()
    log = (out / "01_env.log").read_text()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "== env: passed" in summary and "torch" in log and log.rstrip().splitlines()[-1].startswith("# exit 0")
    for stage in ("trainer", "table5"):
        assert f"== {stage}: skipped, it measures the GPU and there is none" in summary
    assert "overall PASSED" in summary


def test_a_stage_over_its_share_is_cut_and_later_stages_still_run(tmp_path):
    env = stub_env(tmp_path, "kernel_bench,trainer,demo,table5", budget=40)
    start = time.monotonic()
    proc = run_script(env, timeout=60)
    elapsed = time.monotonic() - start
    out = tmp_path / "out"
    summary = (out / "summary.txt").read_text()
    assert proc.returncode == 1, summary  # a cut stage is not a pass
    assert re.search(r"== kernel_bench: CUT at its limit of 10 s", summary), summary
    bench_log = (out / "03_kernel_bench.log").read_text()
    assert "stub pytest started" in bench_log and "# exit 124" in bench_log
    # The trainer's four runs and Table 5 ran after the cut, with the commands the issue asks for.
    trainer_args = []
    for label, backend, compiled in (("trainer_torch", "torch", False), ("trainer_triton", "triton", False),
                                     ("trainer_torch_compile", "torch", True),
                                     ("trainer_triton_compile", "triton", True)):
        assert f"== {label}: passed" in summary, summary
        text = (out / f"05_{label}.log").read_text()
        assert "--model crossmae_vit_base_patch16 --data_backend synthetic --max_steps 30 --batch_size 256" in text
        assert f"--backend {backend}" in text and ("--compile" in text) == compiled
        trainer_args.append(shlex.split(text.split("stub trainer: -m train.pretrain", 1)[1].splitlines()[0]))
    demo = (out / "06_demo.log").read_text()
    assert "== demo: passed" in summary and "--data_backend torch --max_steps" in demo
    trainer_args.append(shlex.split(demo.split("stub trainer: -m train.pretrain", 1)[1].splitlines()[0]))
    table5 = (out / "07_table5.log").read_text()
    assert "== table5: passed" in summary and "bench/test_table5.py bench/test_train_step.py --benchmark" in table5
    assert re.search(r"table5 budget \d+", table5)  # the stage handed its share on to Table 5
    assert elapsed < 40, elapsed  # within the budget
    # The flags are the trainer's own (the script must not be the first to find out that one was renamed).
    from train.config.pretrain import build_parser

    parsed = [build_parser().parse_args(args) for args in trainer_args]
    assert [(p.model, p.data_backend, p.max_steps, p.batch_size) for p in parsed[:4]] == [
        ("crossmae_vit_base_patch16", "synthetic", 30, 256)] * 4
    assert [(p.backend, p.compile) for p in parsed[:4]] == [("torch", False), ("triton", False), ("torch", True),
                                                              ("triton", True)]
    assert parsed[4].data_backend == "torch" and parsed[4].data_path == "demo" and parsed[4].backend is None


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_killed_call_still_returns_what_it_had(tmp_path, sig):
    """Killed mid-stage (the device tool's limit), $OUT already holds the finished stages' logs and the running
    stage's partial log."""
    env = stub_env(tmp_path, "kernel_tests,kernel_bench", budget=120)  # the first ends at once, the second hangs
    out = tmp_path / "out"
    proc = subprocess.Popen(["bash", str(SCRIPT)], env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    bench_log = out / "03_kernel_bench.log"
    try:
        deadline = time.monotonic() + 30
        while not (bench_log.exists() and "stub pytest started" in bench_log.read_text()):
            assert time.monotonic() < deadline and proc.poll() is None, "kernel_bench never started"
            time.sleep(0.1)
        os.killpg(proc.pid, sig)
        proc.wait(timeout=20)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    summary = (out / "summary.txt").read_text()
    # The job ran in its own process group (so that a cut ends its children); after SIGKILL nothing could end it.
    group = int(re.search(r"running in process group (\d+): 03_kernel_bench.log", summary).group(1))
    if sig == signal.SIGKILL:
        os.killpg(group, signal.SIGKILL)
    else:
        assert not group_alive(group, wait_s=5), "the script's trap did not end the running job"
    tests_log = (out / "02_kernel_tests.log").read_text()
    assert "== kernel_tests: passed" in summary and tests_log.rstrip().splitlines()[-1].startswith("# exit 0")
    partial = bench_log.read_text()
    assert "stub pytest started" in partial and "# exit" not in partial
    if sig == signal.SIGTERM:
        assert "# interrupted by SIGTERM" in partial and "== interrupted by SIGTERM" in summary
