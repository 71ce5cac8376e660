"""The run folder's checkpoints, for every trainer (pre-training, fine-tuning, probing).

``CheckpointManager`` holds the folder's lock for the life of the run, removes the temporaries a killed
save left behind, finds what to resume from (``--resume``, else ``checkpoint-last.pth``, else, when that
is unreadable or gone, the newest kept checkpoint), asks the trainer whether a found checkpoint continues
this run (a refusal is final: no fallback past it), sets superseded files aside instead of deleting
them, and writes atomically (train/checkpoint.py), from rank 0, never the same step twice.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from train.checkpoint import LAST, RunLock, RunLockedError, remove_stale_temporaries, save_atomic
from train.files import PlantedLinkError

logger = logging.getLogger("train")


@dataclass(frozen=True)
class Found:
    """A checkpoint to resume from: its file, its contents, and whether checkpoint-last.pth was unreadable."""

    path: Path
    state: dict[str, Any]
    last_unreadable: bool = False


def set_aside(path: Path, why: str) -> Path:
    """Rename ``path`` out of the way without deleting anything: ``<name>.<why>[.k]``."""
    aside = path.with_name(f"{path.name}.{why}")
    k = 1
    while aside.exists():
        aside, k = path.with_name(f"{path.name}.{why}.{k}"), k + 1
    path.rename(aside)
    return aside


class CheckpointManager:
    """Checkpoints of one run folder.

    ``read(path)`` reads a checkpoint of this trainer's format or raises ValueError naming the problem;
    ``kept_glob`` matches the kept checkpoints a run may fall back to, newest last in sorted order (None:
    no fallback). Only rank 0 (``is_main``) writes; every rank tracks what was saved.
    """

    def __init__(self, folder: str | Path, read: Callable[[Path], dict[str, Any]], *, is_main: bool = True,
                 kept_glob: str | None = "checkpoint-[0-9]*.pth"):
        self.folder, self.read, self.is_main, self.kept_glob = Path(folder), read, is_main, kept_glob
        self.last = self.folder / LAST
        self.lock: RunLock | None = None
        self.saved_step: int | None = None  # the step checkpoint-last.pth holds: one step is never written twice
        self.last_good: tuple[Path, int] | None = None  # (file, step) the run can be resumed from

    # -- the folder -----------------------------------------------------------------------------------

    def open(self) -> None:
        """Create (or check) the folder and take its lock, before any work: a path that is a file, a folder
        that cannot be created or written, or one another live run holds raises ValueError with the reason
        and the fix. Removes the temporaries of a killed save (safe: the lock is held)."""
        out = self.folder
        try:
            out.mkdir(parents=True, exist_ok=True)
        except FileExistsError as e:
            raise ValueError(f"--output_dir {out}: {e.filename} is a file, not a folder: choose another path") from e
        except OSError as e:
            raise ValueError(f"--output_dir {out} cannot be created ({e.strerror}): choose a writable place") from e
        lock = RunLock(out)
        try:
            lock.acquire()
        except RunLockedError as e:
            raise ValueError(str(e)) from e
        except PlantedLinkError as e:
            raise ValueError(e.strerror) from e
        except OSError as e:  # read-only, permission denied, full disk: the lock file is the write probe
            raise ValueError(f"--output_dir {out} is not writable ({e.strerror}): choose another folder or free "
                             "space") from e
        self.lock = lock
        removed = remove_stale_temporaries(out)
        if removed:
            logger.warning("removed %d temporary file(s) of an interrupted checkpoint write: %s", len(removed),
                           ", ".join(p.name for p in removed))

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    # -- resuming ------------------------------------------------------------------------------------

    def resume(self, resume: str | Path | None, accept: Callable[[dict[str, Any], Path], None]) -> Found | None:
        """The checkpoint this run continues from, or None for a fresh run. ``accept(state, path)`` raises
        ValueError when the checkpoint belongs to another experiment. When the run continues from another
        file than checkpoint-last.pth, that file is set aside (``.unreadable`` / ``.superseded``), since the
        next save would overwrite it."""
        found = self.find(resume)
        if found is None:
            return None
        accept(found.state, found.path)
        if self.last.exists() and not self.last.samefile(found.path) and self.is_main:
            aside = set_aside(self.last, "unreadable" if found.last_unreadable else "superseded")
            logger.warning("%s kept as %s: the run continues from %s", self.last.name, aside.name, found.path)
        step = found.state["step"]
        self.saved_step = step if found.path == self.last else None
        self.last_good = (found.path, step)
        return found

    def find(self, resume: str | Path | None = None) -> Found | None:
        """``resume``, else checkpoint-last.pth, else (unreadable or gone) the newest readable kept
        checkpoint, with a warning naming both; None when the folder holds no checkpoint. Raises ValueError
        when checkpoint-last.pth is unreadable and nothing is left to fall back to."""
        if resume is not None:
            return Found(Path(resume), self.read(Path(resume)))
        kept = sorted(self.folder.glob(self.kept_glob), reverse=True) if self.kept_glob else []
        if not self.last.exists() and not kept:
            return None
        problem = None
        if self.last.exists():
            try:
                return Found(self.last, self.read(self.last))
            except ValueError as e:
                problem = e
        for path in kept:
            try:
                state = self.read(path)
            except ValueError as e:
                logger.warning("%s", e)
                continue
            if problem is not None:
                logger.warning("%s is unreadable (%s); resuming from %s (step %d) instead", self.last, problem, path,
                               state["step"])
            else:
                logger.warning("%s is missing; resuming from %s (step %d), the newest kept checkpoint", self.last,
                               path, state["step"])
            return Found(path, state, last_unreadable=problem is not None)
        if problem is not None:
            fallback = "no kept checkpoint-<epoch>.pth" if self.kept_glob else "no other checkpoint"
            raise ValueError(f"{problem}; {fallback} in {self.folder} to fall back to: move {LAST} away to start "
                             "the run over, or --resume a good copy")
        return None

    # -- saving --------------------------------------------------------------------------------------

    def save(self, state: Callable[[], dict[str, Any]], step: int, keep_as: str | None = None) -> None:
        """Write checkpoint-last.pth (and a copy named ``keep_as``) holding ``state()`` at ``step``, unless
        that step is already saved and nothing is to be kept. ``state`` is called on every rank (it may be
        collective); only rank 0 writes. Raises CheckpointWriteError; the previous files stay intact."""
        if self.saved_step == step and keep_as is None:
            return
        contents = state()
        if self.is_main:
            save_atomic(contents, self.last)
            if keep_as is not None:
                save_atomic(contents, self.folder / keep_as)
        self.saved_step = step
        self.last_good = (self.last, step)

    def note(self) -> str:
        """Where the run can be resumed from, for messages at a stop."""
        if self.last_good is None:
            return "no checkpoint has been written yet"
        path, step = self.last_good
        return f"the last good checkpoint is {path} (step {step})"
