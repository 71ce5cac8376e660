"""train.pretrain end to end on the CPU: outputs, resumption after SIGKILL, DDP, bad flags, failures."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from train import pretrain
from train.checkpoint import LAST, load_training_checkpoint
from train.step import TrainStep

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Small and quick: the tiny model on 32-pixel crops (16 patches of 8 pixels), the demo photos. Without the demo's
# k-NN monitor (two evaluations a run), except where a test puts it back (KNN_ON): tests/test_knn.py tests it.
QUICK = ["--img_size", "32", "--batch_size", "8", "--num_workers", "0", "--data_backend", "torch",
         "--log_every", "1", "--lr", "1e-3", "--warmup_epochs", "0", "--epochs", "3", "--recon_every", "1",
         "--knn_every", "0"]
KNN_ON = ["--knn_every", "10"]  # its default: on the digits, with the demo


def run_cli(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "train.pretrain", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600, **kwargs)


def losses(out: pathlib.Path) -> dict[int, float]:
    """Loss per step from metrics.jsonl (the k-NN monitor's records, which have none, passed over); a step logged
    twice (before a kill and after the resume) keeps its last value."""
    per_step = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            per_step[record["step"]] = record["loss"]
    return per_step


def test_default_run_writes_checkpoint_metrics_and_reconstructions(tmp_path):
    out = tmp_path / "run"
    result = run_cli(["--output_dir", str(out), "--max_steps", "6", *QUICK, *KNN_ON])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "effective batch 8" in result.stdout and "actual lr" in result.stdout
    ckpt = load_training_checkpoint(out / LAST)
    assert ckpt["step"] == 6
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 7))
    for r in steps:
        assert {"step", "epoch", "loss", "lr", "img_per_s", "data_wait"} <= set(r)
        assert r["loss"] > 0 and r["img_per_s"] > 0
    # The demo's k-NN monitor on the digits: the random encoder at step 0, then the run's end.
    knn = [r for r in records if "loss" not in r]
    assert [r["step"] for r in knn] == [0, 6] and all(0 <= r["knn_cls_top1"] <= 100 for r in knn)
    assert "step 0, before training: k-NN top-1/top-5: cls " in result.stdout
    png = out / "reconstruction-final.png"
    assert png.exists() and (out / "loss.png").exists()
    from PIL import Image

    with Image.open(png) as im:
        assert im.width > 4 * 32 and im.height > 8 * 32  # 4 columns, 8 images of 32 pixels
    # The demo's grid: 4 training images, then 4 crops of photos the run never trains on.
    assert "found 4 images in 2 folders" in result.stdout
    assert "finished: 6 steps (6 this run)" in result.stdout and "reconstruction-final.png, loss.png" in result.stdout


def test_killed_run_resumes_with_identical_losses(tmp_path):
    steps = 12
    common = ["--max_steps", str(steps), "--save_every", "2", *QUICK]
    straight = tmp_path / "straight"
    assert run_cli(["--output_dir", str(straight), *common]).returncode == 0
    reference = losses(straight)
    assert sorted(reference) == list(range(1, steps + 1))

    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "train.pretrain", "--output_dir", str(killed), *common],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (killed / "metrics.jsonl").exists() and len(losses(killed)) >= 5:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = load_training_checkpoint(killed / LAST)  # loadable whatever the moment of the kill
    assert 2 <= saved["step"] < steps

    resumed = run_cli(["--output_dir", str(killed), *common])  # the same command resumes
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resumed from {killed / LAST} at step {saved['step']}" in resumed.stdout
    assert losses(killed) == reference  # exactly, step by step


@pytest.mark.parametrize("backend,signum", [("torch", signal.SIGINT), ("dali", signal.SIGINT),
                                            ("torch", signal.SIGTERM)])
def test_ctrl_c_and_sigterm_save_and_exit_cleanly(tmp_path, backend, signum):
    """The signal goes to the whole process group, as a terminal (or a cluster's preemption) sends it:
    loader worker processes included."""
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # With the k-NN monitor: its loaders must leave nothing a stop signal could break (no idle worker processes).
    flags = [*QUICK, *KNN_ON, "--num_workers", "2", "--data_backend", backend, "--accum_iter", "8"]
    proc = subprocess.Popen([sys.executable, "-m", "train.pretrain", "--output_dir", str(out), "--max_steps", "500",
                             "--save_every", "0", *flags], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not ((out / "metrics.jsonl").exists() and len(losses(out)) >= 2):
        time.sleep(0.05)
    os.killpg(proc.pid, signum)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, output
    assert "Traceback" not in output
    ckpt = load_training_checkpoint(out / LAST)
    assert ckpt["step"] == max(losses(out))
    assert "run the same command to resume" in output


@pytest.mark.parametrize("flags,message", [
    (["--kept_mask_ratio", "0.9"], "kept_mask_ratio"),
    (["--model", "crossmae_vit_enormous_patch16"], "unknown model"),
    (["--data_path", "/nonexistent/imagenet"], "/nonexistent/imagenet"),
    (["--batch_size", "0"], "--batch_size"),
    (["--warmup_epochs", "50", "--epochs", "10"], "--warmup_epochs"),
    (["--precision", "fp16", "--device", "cpu"], "fp16"),
    (["--resume", "/nonexistent/ckpt.pth"], "/nonexistent/ckpt.pth"),
    (["--accum_iter", "0"], "--accum_iter"),
    (["--mask_ratio", "1.0"], "mask_ratio"),
])
def test_impossible_flags_are_rejected_before_any_work(tmp_path, flags, message, capsys):
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as exc:
        pretrain.main(["--output_dir", str(out), *flags])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, caplog):
    out = tmp_path / "run"
    args = ["--output_dir", str(out), "--max_steps", "10", "--save_every", "2", "--device", "cpu", *QUICK]
    original = TrainStep.__call__

    def poisoned(self, batches, step, lr=None):
        loss, waited = original(self, batches, step, lr)
        return (loss * float("nan") if step == 4 else loss), waited  # the 5th step goes wrong

    monkeypatch.setattr(TrainStep, "__call__", poisoned)
    assert pretrain.main(args) == 1
    assert "non-finite loss at step 5" in caplog.text
    assert load_training_checkpoint(out / LAST)["step"] == 4  # the last good one, not overwritten
    assert max(losses(out)) == 4


def test_malicious_resume_file_is_refused_without_running_it(tmp_path, capsys):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.pth"
    torch.save({"format": "crossmae-train-v1", "model": Payload()}, evil)
    assert pretrain.main(["--output_dir", str(tmp_path / "run"), "--resume", str(evil), *QUICK]) == 2
    assert not marker.exists()
    assert "evil.pth" in capsys.readouterr().out


def test_resume_from_elsewhere_never_overwrites_a_run(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / LAST).write_bytes(b"an earlier run's checkpoint")
    other = tmp_path / "other.pth"
    other.write_bytes(b"x")
    with pytest.raises(SystemExit):
        pretrain.main(["--output_dir", str(out), "--resume", str(other), *QUICK])
    assert "would overwrite" in capsys.readouterr().err
    assert (out / LAST).read_bytes() == b"an earlier run's checkpoint"


def test_resuming_with_other_settings_is_refused_and_keeps_the_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    assert pretrain.main(["--output_dir", str(out), "--max_steps", "2", *QUICK]) == 0
    before = (out / LAST).read_bytes()
    assert pretrain.main(["--output_dir", str(out), "--max_steps", "4", *QUICK, "--batch_size", "4"]) == 2
    assert "--batch_size 8 -> 4" in capsys.readouterr().out
    assert (out / LAST).read_bytes() == before


def test_truncated_last_checkpoint_is_an_error_and_is_kept(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / LAST).write_bytes(b"PK\x03\x04 not really a checkpoint")
    before = (out / LAST).read_bytes()
    assert pretrain.main(["--output_dir", str(out), "--max_steps", "2", *QUICK]) == 2
    assert "checkpoint-last.pth" in capsys.readouterr().out
    assert (out / LAST).read_bytes() == before


def test_ddp_two_cpu_processes(tmp_path):
    """torchrun with gloo: both ranks end with identical parameters and read disjoint shards.
    --standalone: torchrun picks a free port itself (a fixed one collides with any other run of the suite
    on the machine)."""
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"}
    with contextlib.ExitStack() as stack:
        # Hold the port the test once fixed (29533), as a parallel run of the suite would.
        busy = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        with contextlib.suppress(OSError):
            busy.bind(("", 29533))
            busy.listen()
        result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                 "2", str(ROOT / "tests" / "ddp_worker.py"),
                                 "--output_dir", str(out), "--max_steps", "3", *QUICK, *KNN_ON],
                                cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "terminate called" not in result.stderr  # gloo threads torn down under a live interpreter
    report = json.loads((out / "ddp_report.json").read_text())
    assert report["world_size"] == 2
    assert report["param_digests"][0] == report["param_digests"][1]
    files = [set(f) for f in report["files_read"]]
    assert files[0] and files[1] and not files[0] & files[1]
    assert load_training_checkpoint(out / LAST)["step"] == 3
