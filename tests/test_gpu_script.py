"""bench/gpu_all.sh on the CPU: that it stops at once without CUDA; what it leaves in $OUT when it finishes, when a
stage overruns its share, and when the call is killed mid-stage.

One test runs the real script, which must refuse this CUDA-less machine in seconds. The others put a stub `python3`
first on PATH (the script's default interpreter), so that "CUDA" is available and stages take exactly as long as
the test needs (a stage that never ends, one that ends at once) whatever the machine's speed or the state of the
code the stages would run; everything the stub does not recognise goes to the real interpreter.
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
import tarfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "gpu_all.sh"
MAX_FILES = 8  # what the device tool returns from $OUT at most

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None
                                or shutil.which("tar") is None, reason="bench/gpu_all.sh needs bash, GNU timeout, tar")

# A stand-in for `python3` in the script's commands: "CUDA is available", no xdist (unless STUB_XDIST=1); pytest of
# bench/test_kernels.py without the sweep (the kernel_bench stage) prints a line and then hangs, a stage that can only
# end by being cut; the trainer writes a metrics.jsonl, a backend_verdict.json and a checkpoint into its
# --output_dir; the trainer and any other pytest print their arguments (and the knobs the script exported) and
# succeed.
STUB = """#!/usr/bin/env bash
knobs="sizes=${{BENCH_SIZES-unset}} variants=${{BENCH_VARIANTS-unset}} table5=${{BENCH_TABLE5_BUDGET_S:-unset}}"
knobs="$knobs sweep=${{KERNEL_BENCH_SWEEP:-unset}} results=${{BENCH_RESULTS_DIR:-unset}}"
knobs="$knobs threads=${{TORCHINDUCTOR_COMPILE_THREADS:-unset}}"
case "$*" in
    *torch.cuda.is_available*) echo 1 ;;
    *"import xdist"*) [ "${{STUB_XDIST:-0}}" = 1 ] ;;
    *"-m pytest"*bench/test_kernels.py*attention_config_sweep*) echo "stub sweep: $* $knobs" ;;
    *"-m pytest"*bench/test_kernels.py*)
        echo "stub pytest started: $* $knobs"
        exec sleep 600 ;;
    *"-m pytest"*) echo "stub pytest: $* $knobs" ;;
    *"-m train.pretrain"*)
        echo "stub trainer: $*"
        out=""
        prev=""
        for arg in "$@"; do [ "$prev" = --output_dir ] && out="$arg"; prev="$arg"; done
        if [ -n "$out" ]; then
            mkdir -p "$out"
            echo '{{"step": 30}}' >"$out/metrics.jsonl"
            echo '{{"choice": "stub"}}' >"$out/backend_verdict.json"
            head -c 1000 /dev/zero >"$out/checkpoint-last.pth"
        fi ;;
    # The environment report (a script on stdin, pip list): fixed answers, so that no stage's time depends on how
    # long importing torch takes on a loaded machine.
    -) cat >/dev/null; echo "stub environment: python, torch (stub), cuda (stub)" ;;
    *"-m pip list"*) echo "stub pip list" ;;
    *) exec {python} "$@" ;;
esac
"""


def stub_env(tmp_path: Path, stages: str, budget: int) -> dict:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / "python3"
    stub.write_text(STUB.format(python=sys.executable))
    stub.chmod(stub.stat().st_mode | stat.S_IXUSR)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", OUT=str(tmp_path / "out"),
               TMPDIR=str(tmp_path), GPU_ALL_STAGES=stages, GPU_ALL_BUDGET_S=str(budget))
    env.pop("PYTHON", None)  # the script's default interpreter, python3: the stub
    return env


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


def sections(log: str) -> dict[str, str]:
    """The combined log's parts, by the name in their header ("##### NN_label: ..."), header line included."""
    parts = re.split(r"^(?=##### )", log, flags=re.MULTILINE)
    return {re.match(r"##### (\S+):", p).group(1): p for p in parts if p.startswith("##### ")}


def files_under(out: Path) -> list[Path]:
    return sorted(p for p in out.rglob("*") if not p.is_dir())


def test_without_cuda_the_script_stops_at_once_with_one_line(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU: the script would run for real")
    env = dict(os.environ, OUT=str(tmp_path / "out"), TMPDIR=str(tmp_path), PYTHON=sys.executable)
    start = time.monotonic()
    proc = run_script(env, timeout=60)
    elapsed = time.monotonic() - start
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert len(lines) == 1 and "no CUDA GPU" in lines[0] and sys.executable in lines[0], lines
    assert elapsed < 30, elapsed  # an import of torch, nothing else
    assert [p.name for p in files_under(tmp_path / "out")] == ["summary.txt"]
    assert not list(tmp_path.glob("gpu_all_work.*"))  # nothing left behind


def test_bad_knobs_exit_2(tmp_path):
    for knobs in ({"GPU_ALL_STAGES": "env,nope"}, {"GPU_ALL_BUDGET_S": "5"}, {"GPU_ALL_STAGES": ","}):
        env = dict(os.environ, OUT=str(tmp_path / "out"), TMPDIR=str(tmp_path), **knobs)
        proc = run_script(env, timeout=30)
        assert proc.returncode == 2 and "gpu_all.sh:" in proc.stderr, (knobs, proc.stderr)


def test_a_stubbed_cuda_run_returns_everything_in_few_files(tmp_path):
    """Every default stage under the issue's 60-second budget: a stage over its share is cut, the later ones still
    run, in the issue's order, and $OUT holds at most three files: the summary, the combined log with every
    stage's log in it, the archive of results/."""
    env = stub_env(tmp_path, "", budget=60)
    del env["GPU_ALL_STAGES"]
    start = time.monotonic()
    proc = run_script(env, timeout=90)
    elapsed = time.monotonic() - start
    out = tmp_path / "out"
    summary = (out / "summary.txt").read_text()
    assert proc.returncode == 1, summary  # a cut stage is not a pass
    assert elapsed < 60, elapsed  # within the budget
    assert [p.name for p in files_under(out)] == ["gpu_all.log", "results.tar.gz", "summary.txt"]
    assert len(files_under(out)) <= MAX_FILES
    assert f"python: python3 = {tmp_path / 'bin' / 'python3'}" in summary  # which interpreter ran

    log = sections((out / "gpu_all.log").read_text())
    order = ["01_env", "02_kernel_tests", "03_model", "04_trainer_torch", "04_trainer_auto", "04_trainer_triton",
             "05_table5", "06_kernel_bench", "07_compiled", "09_sweep"]
    assert list(log) == order, list(log)  # every stage's log, in the order a first contact needs them
    for name in order:
        label = name[3:]
        if name == "06_kernel_bench":
            assert re.search(r"== kernel_bench: CUT at its limit of \d+ s", summary), summary
            assert "stub pytest started" in log[name] and "sweep=0" in log[name]  # no sweep in the benchmark
            assert "# exit 124" in log[name]
        else:
            assert f"== {label}: passed" in summary, summary
            assert re.search(r"^# exit 0 after \d+ s$", log[name], re.MULTILINE), log[name]
    assert "demo" not in summary  # only when named
    assert "torch" in log["01_env"] and "interpreter: python3" in log["01_env"]
    assert "-k triton or cuda or gpu" in log["03_model"]
    assert re.search(r"sizes= variants=torch,triton table5=\d+", log["05_table5"])  # ViT-B eager rows
    assert "bench/test_table5.py bench/test_train_step.py --benchmark" in log["05_table5"]
    assert re.search(r"sizes=L,H variants=triton\+compile table5=\d+", log["07_compiled"])
    assert "stub sweep" in log["09_sweep"] and "--benchmark" in log["09_sweep"]

    # The trainer's runs: eager, torch / auto / triton, with the trainer's own flags (the script must not be the
    # first to find out that one was renamed), and no checkpoint written twice (--save_every 0 --keep_every 0).
    from train.config.pretrain import build_parser

    parsed = {}
    for backend in ("torch", "auto", "triton"):
        text = log[f"04_trainer_{backend}"]
        args = shlex.split(text.split("stub trainer: -m train.pretrain", 1)[1].splitlines()[0])
        parsed[backend] = build_parser().parse_args(args)
    assert {b: (p.model, p.data_backend, p.max_steps, p.batch_size, p.backend, p.compile, p.save_every, p.keep_every)
            for b, p in parsed.items()} == {
        b: ("crossmae_vit_base_patch16", "synthetic", 30, 256, b, False, 0, 0) for b in ("torch", "auto", "triton")}

    # results/ in the archive: each stage's benchmark folder, each run's metrics and verdict, no checkpoint.
    with tarfile.open(out / "results.tar.gz") as tar:
        names = set(tar.getnames())
    for backend in ("torch", "auto", "triton"):
        assert {f"results/trainer_{backend}/metrics.jsonl", f"results/trainer_{backend}/backend_verdict.json"} <= names
    assert not [n for n in names if n.endswith(".pth")], names
    for stage in ("table5", "kernel_bench", "compiled", "sweep"):
        assert f"results={tmp_path}" in log[next(n for n in order if n.endswith(stage))]
        assert re.search(rf"results=\S+/results/{stage}\b", (out / "gpu_all.log").read_text()), stage
    assert not list(tmp_path.glob("gpu_all_work.*"))  # the work folder (checkpoints) is removed


def test_demo_runs_when_named(tmp_path):
    env = stub_env(tmp_path, "demo", budget=30)
    proc = run_script(env, timeout=60)
    out = tmp_path / "out"
    summary = (out / "summary.txt").read_text()
    assert proc.returncode == 0, summary
    demo = sections((out / "gpu_all.log").read_text())["08_demo"]
    args = shlex.split(demo.split("stub trainer: -m train.pretrain", 1)[1].splitlines()[0])
    parsed = build_parser_args(args)
    assert parsed.data_backend == "torch" and parsed.data_path == "demo" and parsed.backend == "auto"
    with tarfile.open(out / "results.tar.gz") as tar:
        assert "results/demo/metrics.jsonl" in tar.getnames()


def build_parser_args(args: list[str]):
    from train.config.pretrain import build_parser

    return build_parser().parse_args(args)


def test_under_xdist_inductor_compiles_on_one_thread(tmp_path):
    """The correctness stages' 8 xdist workers compile with one thread each; the stages that compile for speed keep
    inductor's default."""
    env = dict(stub_env(tmp_path, "kernel_tests,model,compiled", budget=40), STUB_XDIST="1")
    proc = run_script(env, timeout=60)
    out = tmp_path / "out"
    log = sections((out / "gpu_all.log").read_text())
    assert proc.returncode == 0, (out / "summary.txt").read_text()
    for name in ("02_kernel_tests", "03_model"):
        assert "-n 8" in log[name] and "threads=1" in log[name], log[name]
    assert "-n 8" not in log["07_compiled"] and "threads=unset" in log["07_compiled"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_killed_call_still_returns_what_it_had(tmp_path, sig):
    """Killed mid-stage (the device tool's limit), $OUT already holds the finished stages' logs and the running
    stage's partial log, in the combined log."""
    env = stub_env(tmp_path, "kernel_tests,trainer,kernel_bench", budget=120)  # kernel_bench hangs
    out = tmp_path / "out"
    log_file = out / "gpu_all.log"
    proc = subprocess.Popen(["bash", str(SCRIPT)], env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not (log_file.exists() and "stub pytest started" in log_file.read_text()):
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
    group = int(re.search(r"running in process group (\d+): 06_kernel_bench", summary).group(1))
    if sig == signal.SIGKILL:
        os.killpg(group, signal.SIGKILL)
    else:
        assert not group_alive(group, wait_s=5), "the script's trap did not end the running job"
    log = sections(log_file.read_text())
    assert "== kernel_tests: passed" in summary
    assert re.search(r"^# exit 0 after \d+ s$", log["02_kernel_tests"], re.MULTILINE), log["02_kernel_tests"]
    partial = log["06_kernel_bench"]
    assert "stub pytest started" in partial and "# exit" not in partial
    with tarfile.open(out / "results.tar.gz") as tar:  # archived when the trainer stage ended
        assert "results/trainer_auto/backend_verdict.json" in tar.getnames()
    assert len(files_under(out)) <= MAX_FILES
    if sig == signal.SIGTERM:
        assert "# interrupted by SIGTERM" in partial and "== interrupted by SIGTERM" in summary
        assert not list(tmp_path.glob("gpu_all_work.*"))
