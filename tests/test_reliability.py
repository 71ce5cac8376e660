"""train.pretrain under faults (issue #11): bad files, shared folders, full or read-only disks, kills
mid-write, corrupt checkpoints, interrupts. Real processes and signals where the fault involves them."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from child_process import output_after_ctrl_c, wait_for_line
from PIL import Image

from model import read_checkpoint
from train import pretrain
from train.checkpoint import LAST, LOCK, load_training_checkpoint, remove_stale_temporaries, save_atomic
from train.step import TrainStep

ROOT = Path(__file__).resolve().parents[1]
# 64 small images, 16 per batch: 4 steps per epoch; 16-pixel crops of the tiny model (4 patches), one
# decoder block. A step takes milliseconds; process start-up dominates.
FLAGS = ["--img_size", "16", "--batch_size", "16", "--num_workers", "0", "--data_backend", "torch",
         "--decoder_depth", "1", "--log_every", "1", "--lr", "1e-3", "--warmup_epochs", "0", "--epochs", "3",
         "--recon_every", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images") / "d"
    (root / "cls").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(64):
        pixels = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "cls" / f"{i:03d}.jpg", quality=80)
    return root


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """A scan cache of the test's own (children inherit it through the environment)."""
    monkeypatch.setenv("CROSSMAE_CACHE", str(tmp_path / "cache"))


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def cli(*args: str, prelude: str = "", **kwargs) -> subprocess.CompletedProcess:
    """``python -m train.pretrain ARGS`` (``prelude``: code run first in the child, e.g. a patch)."""
    return subprocess.run(child_command(args, prelude), cwd=ROOT, env=env(), capture_output=True, text=True,
                          timeout=300, **kwargs)


def child_command(args, prelude: str = "") -> list[str]:
    if not prelude:
        return [sys.executable, "-m", "train.pretrain", *args]
    code = f"import sys\n{prelude}\nfrom train import pretrain\nsys.exit(pretrain.main(sys.argv[1:]))"
    return [sys.executable, "-c", code, *args]


def popen(args, prelude: str = "", **kwargs) -> subprocess.Popen:
    return subprocess.Popen(child_command(args, prelude), cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


def steps_logged(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def one_line_error(result: subprocess.CompletedProcess, text: str) -> str:
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if text in line]
    assert len(lines) == 1, output
    return lines[0]


# -- 1. a DALI decode failure in the first batch of a pass ---------------------------------------------

def corrupt_keeping_stat(path: str) -> None:
    """Random bytes of the same size and mtime: the scan cache still vouches for the file."""
    st = os.stat(path)
    Path(path).write_bytes(np.random.default_rng(1).integers(0, 256, st.st_size, dtype=np.uint8).tobytes())
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_dali_bad_file_in_the_first_batch_and_the_reconstruction_images_is_skipped(images, tmp_path, capsys):
    pytest.importorskip("nvidia.dali")
    from train.data import build_loader

    data = tmp_path / "d"
    shutil.copytree(images, data)
    train_kw = dict(batch_size=16, img_size=16, train=True, backend="dali", num_workers=1, seed=0)
    vis_kw = dict(batch_size=1, img_size=16, train=False, backend="dali", num_workers=0)
    loader = build_loader(data, **train_kw)  # scans (and caches) the folder while every file is good
    first = loader.files[int(loader.plan.batch(0, 0)[0][0])]
    vis = build_loader(data, **vis_kw)
    vis_first = vis.files[int(vis.plan.batch(0, 0)[0][0])]
    assert first != vis_first
    corrupt_keeping_stat(first)
    corrupt_keeping_stat(vis_first)

    loader = build_loader(data, **train_kw)
    assert sum(1 for _ in loader) == len(loader) == 4  # the first prefetch fails, inside the guard
    assert first in loader.skipped

    # The trainer: the fixed reconstruction images and the first batch, with both files bad.
    status = pretrain.main(["--output_dir", str(tmp_path / "run"), "--data_path", str(data), "--max_steps", "2",
                            *FLAGS, "--data_backend", "dali", "--num_workers", "1", "--recon_every", "1"])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "reconstruction grid: skipping" in out and vis_first in out
    assert load_training_checkpoint(tmp_path / "run" / LAST)["step"] == 2


# -- 2. two runs into one folder -----------------------------------------------------------------------

def test_a_second_run_into_a_busy_folder_is_refused_and_a_killed_run_leaves_no_lock(images, tmp_path):
    out = tmp_path / "run"
    args = ["--output_dir", str(out), "--data_path", str(images), *FLAGS, "--epochs", "1000"]
    first = popen([*args, "--max_steps", "100000"])
    try:
        wait_for_line(first, "step 1/")
        second = cli(*args, "--max_steps", "2")
        assert second.returncode == 2
        line = one_line_error(second, "in use by another run")
        assert f"pid {first.pid} " in line and "choose another --output_dir" in line
        assert "found 64 images" not in second.stdout  # refused before the data scan
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    again = cli(*args, "--max_steps", "2")  # the kernel dropped the dead run's lock
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"pid {first.pid} " not in (out / LOCK).read_text()


# -- 3. full disk, unwritable folder, output path that is a file ---------------------------------------

def _mount_tmpfs(where: Path, size_bytes: int, read_only: bool = False) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    opts = f"size={size_bytes}" + (",ro" if read_only else "")
    if shutil.which("mount") is None:
        return False
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True)
    return result.returncode == 0


def _umount(where: Path) -> None:
    subprocess.run(["umount", str(where)], capture_output=True)


def test_a_full_disk_stops_with_one_line_and_keeps_the_previous_checkpoint(images, tmp_path):
    """On a tmpfs sized for 1.5 checkpoints where the machine lets us mount one; elsewhere, the same
    fault from a file-size limit (RLIMIT_FSIZE: writes beyond it fail with EFBIG)."""
    src = tmp_path / "src"
    common = ["--data_path", str(images), *FLAGS, "--save_every", "2"]
    assert cli("--output_dir", str(src), "--max_steps", "2", *common).returncode == 0
    size = (src / LAST).stat().st_size
    mnt = tmp_path / "small_disk"
    mounted = _mount_tmpfs(mnt, int(size * 1.5))
    try:
        out = mnt / "run" if mounted else tmp_path / "run"
        shutil.copytree(src, out)
        (out / LOCK).unlink(missing_ok=True)  # copied with the folder; no run holds it
        before = (out / LAST).read_bytes()
        limit = {}
        if not mounted:
            def limit_file_size():
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG
                resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, size // 2))
            limit = {"preexec_fn": limit_file_size}
        result = cli("--output_dir", str(out), "--max_steps", "4", *common, **limit)
        assert result.returncode == 1, result.stdout + result.stderr
        line = one_line_error(result, "could not write checkpoint")
        assert "the previous checkpoint-last.pth is intact" in line
        assert ("No space left on device" in line) if mounted else ("File too large" in line)
        assert (out / LAST).read_bytes() == before
        assert load_training_checkpoint(out / LAST)["step"] == 2
        assert not list(out.glob(".*.tmp"))
    finally:
        if mounted:
            _umount(mnt)


def test_an_unwritable_folder_or_a_file_as_output_dir_is_refused_before_any_work(images, tmp_path, capsys):
    afile = tmp_path / "a_file"
    afile.write_text("x")
    with pytest.raises(SystemExit) as exc:
        pretrain.main(["--output_dir", str(afile), "--data_path", str(images), *FLAGS])
    assert exc.value.code == 2 and "is a file, not a folder" in capsys.readouterr().err
    assert pretrain.main(["--output_dir", str(afile / "run"), "--data_path", str(images), *FLAGS]) == 2
    out = capsys.readouterr().out
    assert "cannot be created (Not a directory)" in out and "found 64 images" not in out

    ro = tmp_path / "read_only"
    if not _mount_tmpfs(ro, 1 << 20, read_only=True):
        pytest.skip("cannot mount a read-only tmpfs here (needs root); the file cases above ran")
    try:
        result = cli("--output_dir", str(ro / "run"), "--data_path", str(images), *FLAGS)
        assert result.returncode == 2
        one_line_error(result, "cannot be created (Read-only file system)")
        assert "found 64 images" not in result.stdout
        result = cli("--output_dir", str(ro), "--data_path", str(images), *FLAGS)
        assert result.returncode == 2
        one_line_error(result, "is not writable (Read-only file system)")
    finally:
        _umount(ro)


# -- 4. a zero-byte checkpoint ---------------------------------------------------------------------------

def test_a_zero_byte_checkpoint_is_a_clear_error(images, tmp_path, capsys):
    empty = tmp_path / "empty.pth"
    empty.touch()
    with pytest.raises(ValueError, match=r"empty\.pth: the file is empty \(0 bytes\)"):
        read_checkpoint(empty)  # what --finetune and load_official read with
    out = tmp_path / "run"
    out.mkdir()
    (out / LAST).touch()
    assert pretrain.main(["--output_dir", str(out), "--data_path", str(images), *FLAGS]) == 2
    assert "checkpoint-last.pth: the file is empty (0 bytes)" in capsys.readouterr().out
    assert (out / LAST).stat().st_size == 0  # kept as it was


# -- 5. temporary files of a save killed by SIGKILL ------------------------------------------------------

HANG_IN_SECOND_SAVE = """
import time, torch
_real_save, _calls = torch.save, []
def _save(obj, f, *args, **kwargs):
    _calls.append(1)
    if len(_calls) == 2:  # the second checkpoint: write a little, then hang until killed
        f.write(b"half a checkpoint"); f.flush()
        print("SAVING", flush=True)
        time.sleep(600)
    return _real_save(obj, f, *args, **kwargs)
torch.save = _save
"""


def test_a_save_killed_midway_leaves_a_temporary_file_that_the_next_run_removes(images, tmp_path):
    out = tmp_path / "run"
    args = ["--output_dir", str(out), "--data_path", str(images), *FLAGS, "--save_every", "2", "--max_steps", "6"]
    proc = popen(args, prelude=HANG_IN_SECOND_SAVE)
    wait_for_line(proc, "SAVING")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    leaked = list(out.glob(".checkpoint-last.pth.*.tmp"))
    assert len(leaked) == 1
    assert load_training_checkpoint(out / LAST)["step"] == 2  # the newest complete one, loadable

    result = cli(*args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "removed 1 temporary file(s) of an interrupted checkpoint write" in result.stdout
    assert f"resumed from {out / LAST} at step 2" in result.stdout
    assert not list(out.glob(".*.tmp"))


# -- 6. metrics.jsonl after a resume ---------------------------------------------------------------------

KILL_AFTER_LOGGING_STEP_5 = """
import os, signal
from train import monitor
_write = monitor.MetricsLog.write
def write(self, record):
    _write(self, record)
    if record["step"] == 5:
        os.kill(os.getpid(), signal.SIGKILL)
monitor.MetricsLog.write = write
"""


def test_metrics_hold_each_step_once_after_a_resume(images, tmp_path):
    out = tmp_path / "run"
    args = ["--output_dir", str(out), "--data_path", str(images), *FLAGS, "--save_every", "4", "--max_steps", "7"]
    killed = cli(*args, prelude=KILL_AFTER_LOGGING_STEP_5)
    assert killed.returncode == -signal.SIGKILL
    assert steps_logged(out) == [1, 2, 3, 4, 5]
    assert load_training_checkpoint(out / LAST)["step"] == 4  # step 5 was logged but never saved
    first_step_5 = json.loads((out / "metrics.jsonl").read_text().splitlines()[4])

    resumed = cli(*args)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert steps_logged(out) == [1, 2, 3, 4, 5, 6, 7]
    superseded = [json.loads(line) for line in (out / "metrics.jsonl.superseded").read_text().splitlines()]
    assert superseded == [first_step_5]  # kept aside, not lost
    again_step_5 = json.loads((out / "metrics.jsonl").read_text().splitlines()[4])
    assert again_step_5["loss"] == first_step_5["loss"]  # the step ran again, exactly


# -- 7. a corrupt checkpoint-last.pth ------------------------------------------------------------------

def test_a_corrupt_last_checkpoint_falls_back_to_the_newest_kept_one(images, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--output_dir", str(out), "--data_path", str(images), *FLAGS, "--keep_every", "1", "--batch_size", "32"]
    assert pretrain.main([*args, "--max_steps", "5"]) == 0  # epochs of 2 steps: kept at steps 2 and 4
    assert load_training_checkpoint(out / "checkpoint-0002.pth")["step"] == 4
    data = (out / LAST).read_bytes()
    (out / LAST).write_bytes(data[: len(data) // 2])
    capsys.readouterr()

    assert pretrain.main([*args, "--max_steps", "6"]) == 0
    out_text = capsys.readouterr().out
    warning = [line for line in out_text.splitlines() if "is unreadable" in line]
    assert len(warning) == 1 and "checkpoint-last.pth" in warning[0] and "checkpoint-0002.pth (step 4)" in warning[0]
    assert (out / f"{LAST}.unreadable").read_bytes() == data[: len(data) // 2]  # kept aside
    assert load_training_checkpoint(out / LAST)["step"] == 6
    assert steps_logged(out) == list(range(1, 7))

    # The hint that works: resume a kept checkpoint of this run, into its own folder.
    assert pretrain.main([*args, "--max_steps", "3", "--resume", str(out / "checkpoint-0001.pth")]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert load_training_checkpoint(out / LAST)["step"] == 3
    assert load_training_checkpoint(out / f"{LAST}.superseded")["step"] == 6  # the rewound one, kept


# -- 8. the small things ---------------------------------------------------------------------------------

def test_data_path_synthetic_runs_on_synthetic_data(tmp_path, capsys):
    args = ["--output_dir", str(tmp_path / "run"), *FLAGS, "--data_backend", "auto", "--max_steps", "1"]
    assert pretrain.main([*args, "--data_path", "synthetic"]) == 0
    assert "synthetic" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        pretrain.main([*args, "--data_path", "synthetic", "--data_backend", "torch"])
    err = capsys.readouterr().err
    assert "--data_path synthetic needs --data_backend synthetic" in err and "'None'" not in err


def test_non_finite_loss_before_any_checkpoint_names_none(images, tmp_path, monkeypatch, caplog):
    original = TrainStep.__call__

    def poisoned(self, batches, step, lr=None):
        loss, waited = original(self, batches, step, lr)
        return loss * float("nan"), waited

    monkeypatch.setattr(TrainStep, "__call__", poisoned)
    assert pretrain.main(["--output_dir", str(tmp_path / "run"), "--data_path", str(images), *FLAGS,
                          "--max_steps", "3"]) == 1
    assert "non-finite loss at step 1" in caplog.text
    assert "no checkpoint has been written yet" in caplog.text and "last good checkpoint" not in caplog.text
    assert not (tmp_path / "run" / LAST).exists()


def test_resume_refuses_another_recipe_and_warns_about_other_changes(images, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--output_dir", str(out), *FLAGS]
    assert pretrain.main([*args, "--data_path", str(images), "--max_steps", "2"]) == 0
    before = (out / LAST).read_bytes()
    capsys.readouterr()
    assert pretrain.main([*args, "--data_path", str(images), "--max_steps", "3", "--weight_decay", "0.1"]) == 2
    assert "--weight_decay 0.05 -> 0.1" in capsys.readouterr().out
    assert pretrain.main([*args, "--data_path", str(images), "--max_steps", "3", "--lr", "2e-3"]) == 2
    assert "--lr 0.001 -> 0.002" in capsys.readouterr().out
    assert pretrain.main([*args, "--data_path", str(images), "--max_steps", "3", "--decoder_depth", "2"]) == 2
    assert "--decoder_depth 1 -> 2" in capsys.readouterr().out  # the flag, compared by its resume policy
    assert (out / LAST).read_bytes() == before

    moved = tmp_path / "moved"
    shutil.copytree(images, moved)
    assert pretrain.main([*args, "--data_path", str(moved), "--max_steps", "3", "--blr", "1e-3"]) == 0
    text = capsys.readouterr().out
    assert "changed settings" in text and f"--data_path {str(images)!r} -> {str(moved)!r}" in text
    assert "--blr 0.00015 -> 0.001 (no effect: --lr is given)" in text


# A wrapper that sets the child's SIGINT disposition and execs it (same pid): the test decides how the run is
# launched, whatever pytest's own disposition (a background job of a non-interactive shell starts with SIGINT
# ignored, and children inherit that).
WITH_SIGINT = "import os, signal, sys\nsignal.signal(signal.SIGINT, getattr(signal, sys.argv[1]))\n" \
              "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])"
# A long start-up, made deterministic: every probe of the folder scan takes 0.2 s (and is counted in the file
# named by PROBE_COUNT), or the model build takes a minute. Each prints its marker once it is under way: the
# scan when its main thread waits for the probes (all queued; at the latest after 20 probes).
SLOW_SCAN = """
import os, time
from PIL import Image
_open, _count = Image.open, os.open(os.environ["PROBE_COUNT"], os.O_WRONLY | os.O_CREAT | os.O_APPEND)
_first = [True]
def _slow_open(*a, **k):
    os.write(_count, b".")
    time.sleep(0.2)
    if _first:  # at the first probe: the scan may still be queueing the others (issue 19, item 8)
        try:
            _first.pop()  # atomic: one thread of the scan's pool prints
            print("START-UP IS SLOW", flush=True)
        except IndexError:
            pass
    return _open(*a, **k)
Image.open = _slow_open
"""
SLOW_MODEL_BUILD = """
import time, torch
_reset = torch.nn.Linear.reset_parameters
def _slow_reset(self):
    print("START-UP IS SLOW", flush=True)
    time.sleep(60)
    _reset(self)
torch.nn.Linear.reset_parameters = _slow_reset
"""
SCANNED = 400  # images in the slow scan's folder: 40 s of probes on two threads


def popen_with_sigint(disposition: str, args, prelude: str = "", **env_extra) -> subprocess.Popen:
    """``popen`` with the child's SIGINT set to ``disposition`` ("SIG_DFL": a terminal's foreground job,
    "SIG_IGN": a background job) when it starts."""
    return subprocess.Popen([sys.executable, "-c", WITH_SIGINT, disposition, *child_command(args, prelude)[1:]],
                            cwd=ROOT, env={**env(), **env_extra}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


@pytest.mark.parametrize("phase,disposition", [("scan", "SIG_DFL"), ("model", "SIG_DFL"), ("model", "SIG_IGN")])
def test_ctrl_c_during_start_up_ends_the_run_at_once_without_a_traceback(images, tmp_path, phase, disposition):
    """One rule: a Ctrl-C stops the run, however it was launched. During a long start-up (a folder scan, a
    model build) it ends the process within about a second (20 s allowed for a loaded machine), with one line
    and no traceback; a scan does not run on through the probes it had not begun."""
    count = tmp_path / "probes"
    if phase == "scan":
        data = tmp_path / "many"
        (data / "cls").mkdir(parents=True)
        jpeg = next((images / "cls").iterdir()).read_bytes()
        for i in range(SCANNED):
            (data / "cls" / f"{i:03d}.jpg").write_bytes(jpeg)
    else:
        data = images
    args = ["--output_dir", str(tmp_path / "run"), "--data_path", str(data), *FLAGS]
    proc = popen_with_sigint(disposition, args, prelude=SLOW_SCAN if phase == "scan" else SLOW_MODEL_BUILD,
                             PROBE_COUNT=str(count))
    wait_for_line(proc, "START-UP IS SLOW")
    output = output_after_ctrl_c(proc, f"the {phase}")
    assert proc.returncode == 130, output
    assert "Traceback" not in output and "interrupted during start-up; nothing was saved" in output, output
    if phase == "scan":
        assert count.stat().st_size < SCANNED, "the scan probed every image after the Ctrl-C"


# Run by the child before anything else (PYTHONPATH): the import of one module (numpy inside torch's import, or
# torch itself) announces itself and then takes a minute, so that the Ctrl-C lands inside Python's imports.
SLOW_IMPORT_SITE = """
import sys, time
class _SlowImport:
    def find_spec(self, name, path=None, target=None):
        if name == {module!r}:
            print("IMPORTING {module}", flush=True)
            time.sleep(60)
        return None
sys.meta_path.insert(0, _SlowImport())
"""


@pytest.mark.parametrize("module,disposition", [("numpy", "SIG_DFL"), ("torch", "SIG_IGN")])
def test_ctrl_c_during_the_imports_ends_the_run_with_one_line(tmp_path, module, disposition):
    """Issue 19, item 8: a Ctrl-C while ``python -m train.pretrain`` imports torch (numpy inside it) ends the
    process at once with one line, never a KeyboardInterrupt traceback or an interrupt swallowed by a
    library's import; also when the shell started the job with SIGINT ignored."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SLOW_IMPORT_SITE.format(module=module))
    proc = subprocess.Popen([sys.executable, "-c", WITH_SIGINT, disposition, "-m", "train.pretrain",
                             "--output_dir", str(tmp_path / "run")], cwd=ROOT,
                            env={**env(), "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_line(proc, f"IMPORTING {module}")
    output = output_after_ctrl_c(proc, f"the import of {module}")
    assert proc.returncode == 130, output
    assert "Traceback" not in output and "interrupted during start-up; nothing was saved" in output, output
    assert not (tmp_path / "run").exists()


def test_a_double_ctrl_c_inside_a_step_ends_without_a_traceback(images, tmp_path):
    """The first Ctrl-C asks for a save at the end of the step; a second one interrupts at once."""
    out = tmp_path / "run"
    args = ["--output_dir", str(out), "--data_path", str(images), *FLAGS]
    # Long steps (64 micro-batches) so that both signals land inside one step.
    proc = popen_with_sigint("SIG_DFL", [*args, "--max_steps", "100000", "--epochs", "1000", "--accum_iter", "64",
                                         "--batch_size", "1", "--save_every", "2"])
    wait_for_line(proc, "step 3/")
    proc.send_signal(signal.SIGINT)
    wait_for_line(proc, "SIGINT received")  # the first was handled: the second interrupts at once
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, output
    assert "Traceback" not in output
    assert "interrupted: the step in progress is not saved" in output or "run the same command to resume" in output
    assert load_training_checkpoint(out / LAST)["step"] >= 2


def test_tiny_images_give_a_hint_that_works(tmp_path, capsys):
    with pytest.raises(SystemExit):
        pretrain.main(["--output_dir", str(tmp_path / "run"), "--img_size", "8"])
    err = capsys.readouterr().err
    assert "--img_size 8 with patch size 8 gives 1 patch(es)" in err and "use --img_size >= 16" in err
    assert "0.0000" not in err


def test_a_truncated_checkpoint_message_ends_with_its_sentence(tmp_path):
    path = tmp_path / "ckpt.pth"
    torch.save({"x": torch.zeros(1000)}, path)
    data = path.read_bytes()
    for cut in (len(data) // 2, len(data) - 10):  # the second: torch raises OSError (EINVAL), not RuntimeError
        path.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="truncated") as exc:
            read_checkpoint(path)
        assert str(exc.value).endswith(".)") or str(exc.value).endswith("Invalid argument)"), str(exc.value)


def test_checkpoints_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        save_atomic({"x": torch.zeros(1)}, tmp_path / "a.pth")
        assert (tmp_path / "a.pth").stat().st_mode & 0o777 == 0o644
        os.umask(0o027)
        save_atomic({"x": torch.zeros(1)}, tmp_path / "b.pth")
        assert (tmp_path / "b.pth").stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)


# -- issue 19: links planted in a shared run folder, and a damaged metrics.jsonl -------------------------------

@pytest.mark.parametrize("planted", ["run.lock", "metrics.jsonl.superseded", "metrics.jsonl"])
def test_a_symbolic_link_planted_in_the_run_folder_is_never_written_through(images, tmp_path, capsys, planted):
    out = tmp_path / "run"
    args = ["--output_dir", str(out), "--data_path", str(images), *FLAGS]
    assert pretrain.main([*args, "--max_steps", "2"]) == 0
    with open(out / "metrics.jsonl", "a") as f:  # a record the checkpoint does not hold: the resume supersedes it
        f.write(json.dumps({"step": 99, "loss": 1.0}) + "\n")
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    target = out / planted
    target.unlink(missing_ok=True)
    target.symlink_to(victim)
    status = pretrain.main([*args, "--max_steps", "3"])
    assert victim.read_text() == "precious\n"
    assert target.is_symlink()  # left for the user to look at, not replaced silently
    text = capsys.readouterr().out
    assert status in (1, 2) and f"{target} is a symbolic link" in text, text


def test_a_metrics_file_with_bytes_that_are_not_utf8_resumes_keeping_the_good_records(images, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--output_dir", str(out), "--data_path", str(images), *FLAGS]
    assert pretrain.main([*args, "--max_steps", "2"]) == 0
    with open(out / "metrics.jsonl", "ab") as f:
        f.write(b"\xff\xfe garbage \x80\n")
    assert pretrain.main([*args, "--max_steps", "3"]) == 0
    assert "1 damaged line(s)" in capsys.readouterr().out
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    assert (out / "metrics.jsonl.damaged").read_bytes() == b"\xff\xfe garbage \x80\n"


@pytest.mark.parametrize("flags, message", [
    (["--blr", "1e300", "--warmup_epochs", "0"], "beyond float32"),
    (["--lr", "1e-4", "--min_lr", "1"], "--min_lr 1 is above the lr"),
    (["--seed", "18446744073709551616"], "--seed 18446744073709551616 does not fit in 64 bits"),
])
def test_flags_that_pass_the_range_checks_but_cannot_train_are_refused_in_one_line(images, tmp_path, capsys, flags,
                                                                                    message):
    # Issue 19, item 5: these used to end in a traceback from inside AdamW, an lr climbing to a loss of 101
    # (exit 0), or "Overflow when unpacking long long" naming no flag.
    args = ["--output_dir", str(tmp_path / "run"), "--data_path", str(images), *FLAGS, "--max_steps", "2"]
    args = [a for a in args if a not in ("--lr", "1e-3")] + flags  # FLAGS' --lr would override --blr
    try:
        status = pretrain.main(args)
    except SystemExit as e:  # refused by the command line's checks
        status = e.code
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert status == 2 and message in text and "Traceback" not in text, text
    assert not (tmp_path / "run" / LAST).exists()


def test_a_batch_that_does_not_fit_in_memory_names_the_flag_to_lower(images, tmp_path, capsys, monkeypatch):
    # Issue 19, item 5: an allocator traceback; now one line naming --batch_size. The allocator's failure is
    # simulated at the first step (the CPU allocator raises a RuntimeError, a GPU's torch.OutOfMemoryError).
    def no_memory(self, batches, step, lr=None):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 10995116277760 bytes")

    monkeypatch.setattr(TrainStep, "__call__", no_memory)
    status = pretrain.main(["--output_dir", str(tmp_path / "run"), "--data_path", str(images), *FLAGS,
                            "--max_steps", "2"])
    text = capsys.readouterr().out
    assert status == 1 and "out of memory" in text and "lower --batch_size" in text, text


def test_a_start_scans_the_data_folder_once(images, tmp_path, monkeypatch):
    # Issue 19, start-up at scale: the reconstruction grid's loader scanned the folder a second time (about 22 s
    # per cached scan of ImageNet's 1.28M files); it now reuses the training loader's scan.
    import train.data

    scanned = []
    real_scan = train.data.scan_image_folder
    monkeypatch.setattr(train.data, "scan_image_folder",
                        lambda root, **kw: scanned.append(root) or real_scan(root, **kw))
    assert pretrain.main(["--output_dir", str(tmp_path / "run"), "--data_path", str(images), *FLAGS,
                          "--max_steps", "1"]) == 0
    assert scanned == [images]


def test_temporaries_of_every_run_file_a_killed_write_left_are_removed_and_nothing_else(tmp_path):
    # Whole run files go through a fresh `.<name>.<random>.tmp` (train/files.py): a kill mid-write leaves one.
    leftovers = [".checkpoint-last.pth.ab12.tmp", ".metrics.jsonl.cd34.tmp", ".loss.png.ef56.tmp",
                 ".reconstruction-ep0010.png.gh78.tmp", ".config.yaml.ij90.tmp", ".backend_verdict.json.kl12.tmp"]
    kept = [".notes.txt.mn34.tmp", "metrics.jsonl", "mine.tmp"]
    for name in leftovers + kept:
        (tmp_path / name).write_text("x")
    removed = remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == sorted(leftovers)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)


# -- issue 19, item 1: data that vanishes mid-run ------------------------------------------------------------

# Run first in the child: after the step named by FAULT_AT_STEP, the data goes away as FAULT says (the folder
# renamed, or a quarter of its files deleted), once.
DATA_FAULT = """
import os, pathlib, shutil
from train import reporting
_done, _step_done = [], reporting.StepReporter.step_done
def _step_done_then_fault(self, *a, **k):
    _step_done(self, *a, **k)
    self._steps_seen = getattr(self, "_steps_seen", self.start_step) + 1
    if self._steps_seen == int(os.environ["FAULT_AT_STEP"]) and not _done:
        _done.append(1)
        root = pathlib.Path(os.environ["FAULT_DATA"])
        if os.environ["FAULT"] == "renamed":
            root.rename(root.with_name(root.name + "-away"))
        else:
            for path in sorted(root.rglob("*.jpg"))[::4]:
                path.unlink()
reporting.StepReporter.step_done = _step_done_then_fault
"""


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


@pytest.mark.parametrize("backend", ["torch", "dali"])
@pytest.mark.parametrize("fault", ["renamed", "quarter deleted"])
def test_data_that_vanishes_mid_run_stops_it_saved_with_one_line(images, tmp_path, backend, fault):
    """The data folder renamed away, or a quarter of its files deleted, after step 3: the run saves its last
    complete step, says in one line what is missing and how to resume, and exits 1 (it did not: the torch
    backend trained to the end on mean-colour stand-ins, DALI died with a pipeline error, losing everything
    since the last checkpoint). With the data back, the same command resumes to the numbers of a run that never
    lost it."""
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    data = tmp_path / "data"
    for copy in range(4):  # 256 images: one epoch of 16 steps, so that lost files are met for the first time
        shutil.copytree(images / "cls", data / "cls", dirs_exist_ok=True,
                        copy_function=lambda src, dst, copy=copy: shutil.copy2(src, f"{dst[:-4]}-{copy}.jpg"))
    out = tmp_path / "run"
    args = ["--output_dir", str(out), "--data_path", str(data), *FLAGS, "--data_backend", backend,
            "--save_every", "0", "--epochs", "1"]
    faulty = subprocess.run(child_command(args, DATA_FAULT), cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**env(), "FAULT": fault, "FAULT_DATA": str(data), "FAULT_AT_STEP": "3"})
    output = faulty.stdout + faulty.stderr
    assert faulty.returncode == 1, output
    assert "Traceback" not in output
    lost = [line for line in output.splitlines() if "data source lost" in line and "ERROR" in line]
    assert len(lost) == 1, output
    assert "run the same command to resume" in lost[0]
    if fault == "renamed":
        assert f"the data folder {data} is gone" in lost[0], lost[0]
    else:
        assert "FileNotFoundError" in lost[0] and str(data) in lost[0], lost[0]
    saved = load_training_checkpoint(out / LAST)["step"]
    assert 3 <= saved < 16 and max(losses(out)) == saved, (saved, losses(out))  # the lost step is not kept
    if fault != "renamed":
        return
    (data.with_name("data-away")).rename(data)
    resumed = subprocess.run(child_command(args), cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    straight = tmp_path / "straight"
    subprocess.run(child_command([*args[:1], str(straight), *args[2:]]), cwd=ROOT, env=env(), check=True,
                   capture_output=True, timeout=300)
    assert losses(out) == losses(straight)
