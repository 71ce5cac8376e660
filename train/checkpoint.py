"""Training checkpoints: written atomically, read without executing code.

A checkpoint is a dict of tensors and plain Python values only (no pickled objects), so that
``torch.load(weights_only=True)`` reads it. It is written to a temporary file in the same folder,
flushed to disk, then renamed over the old one: a run killed at any moment (SIGKILL included)
leaves either the previous checkpoint or the new one, never a torn file. A write that fails (full
disk, read-only file system) raises `CheckpointWriteError`, whose one-line message says that the
previous file is intact. The temporary files of a killed writer are removed by the next run
(`remove_stale_temporaries`); the run's folder lock (`RunLock`) is what makes that safe.
"""

from __future__ import annotations

import datetime
import os
import random
import shutil
import socket
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.official import read_checkpoint
from train.files import open_nofollow, replace_atomically

LAST = "checkpoint-last.pth"
FORMAT = "crossmae-train-v1"
REQUIRED = ("format", "model", "optimizer", "step", "epoch", "batch_in_epoch")
SETTINGS = ("config", "args")  # the run's settings: "config" (plain data, train/config/), or "args" before it
LOCK = "run.lock"
_TMP_SUFFIX = ".tmp"


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; the file it would have replaced is untouched."""


def save_atomic(obj: dict[str, Any], path: str | os.PathLike) -> None:
    """Write ``obj`` to ``path`` via a fresh temporary file, flushed to disk, and an atomic rename
    (train/files.py: never through a planted symbolic link).

    Raises CheckpointWriteError (one line: the file, the reason, "the previous one is intact") when the
    folder cannot be written or fills up; the temporary file is removed then."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        replace_atomically(path, lambda f: torch.save(obj, f), durable=True)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as RuntimeError ("unexpected pos")
        raise CheckpointWriteError(_write_failure(path, e)) from e
    _fsync_dir(path.parent)


def _write_failure(path: Path, error: BaseException) -> str:
    cause = error  # torch.save wraps the OSError of a full disk in a RuntimeError: find the OSError
    while cause is not None and not (isinstance(cause, OSError) and cause.strerror):
        cause = cause.__cause__ or cause.__context__
    reason = cause.strerror if cause is not None else " ".join(str(error).split())[:160]
    try:
        free = shutil.disk_usage(path.parent).free
        reason += f"; {free / 2**20:.1f} MiB free there"
    except OSError:
        pass
    intact = f"the previous {path.name} is intact" if path.exists() else f"no earlier {path.name} existed"
    return f"could not write checkpoint {path} ({reason}): {intact}; free space or fix the folder, then resume"


# The run files written whole through train/files.py replace_atomically, as ``.<name>.<random>.tmp`` until renamed.
_RUN_FILES = ("*.pth", "metrics.jsonl", "loss.png", "reconstruction-*.png", "config.yaml", "backend_verdict.json")


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files a killed write of a run file (a checkpoint, the metrics, a picture, the
    settings) left in ``folder`` (call it holding the folder's RunLock, so that no live writer's file is
    touched); returns what was removed. Files of other names are left alone."""
    removed = []
    stale = {tmp for name in _RUN_FILES for tmp in Path(folder).glob(f".{name}.*{_TMP_SUFFIX}")}
    for tmp in sorted(stale):
        try:
            tmp.unlink()
            removed.append(tmp)
        except FileNotFoundError:
            pass
    return removed


class RunLockedError(RuntimeError):
    """Another live process holds the run folder's lock."""


class RunLock:
    """An exclusive lock on ``<folder>/run.lock`` for the life of this process: one run per folder.

    A POSIX record lock (``lockf``): the kernel drops it when the process dies, SIGKILL included, so
    it is never left stuck; it is not inherited by forked data-loader workers. The file holds the
    holder's pid, host, start time and command line, for the refusal message. Needs a file system
    with POSIX locks (local disks, NFSv4; not every network mount)."""

    def __init__(self, folder: str | os.PathLike):
        self.path = Path(folder) / LOCK
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise RunLockedError naming the holder; OSError if the file cannot be made."""
        import fcntl

        fd = open_nofollow(self.path, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "an unknown process"
            os.close(fd)
            raise RunLockedError(f"--output_dir {self.path.parent} is in use by another run ({holder}); "
                                 "wait for it to end, stop it, or choose another --output_dir") from None
        try:
            started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
            info = f"pid {os.getpid()} on {socket.gethostname()} since {started}: {' '.join(sys.argv)}"
            os.ftruncate(fd, 0)
            os.pwrite(fd, info.encode("utf-8", "replace")[:4000] + b"\n", 0)
        except OSError:
            os.close(fd)
            raise
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the lock; the file stays (unlinking it would race a waiter)
            self._fd = None


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_training_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint written by ``train.pretrain``; a foreign, truncated or malicious file is
    refused with an error naming it (nothing in the file is executed)."""
    ckpt = read_checkpoint(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path} is not a train.pretrain checkpoint (expected format {FORMAT!r}); "
                         "to start from released weights use model.load_official")
    missing = [k for k in REQUIRED if k not in ckpt]
    if not any(k in ckpt for k in SETTINGS):
        missing.append("config")
    if missing:
        raise ValueError(f"{path} lacks {missing}: incomplete checkpoint")
    return ckpt


def rng_state() -> dict[str, Any]:
    """Every RNG this process uses, as tensors and plain values (weights_only-loadable)."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuples(state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuples(x):
    return tuple(_as_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x
