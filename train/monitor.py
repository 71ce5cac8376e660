"""What a run shows and records: a progress bar, log lines, ``metrics.jsonl``, optional TensorBoard."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from train.cards import peak_flops as peak_flops  # MFU's card peaks: the one table, train/cards.py
from train.files import open_for_append, open_nofollow, replace_atomically

logger = logging.getLogger("train")


def setup_logging(is_main: bool) -> None:
    """Log lines of the ``train`` package (data loading included) to stdout; rank 0 at INFO, others
    at WARNING. The root logger is left alone, so an embedding program keeps its own handlers."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"))
    train_logger = logging.getLogger("train")
    for old in list(train_logger.handlers):
        train_logger.removeHandler(old)
    train_logger.addHandler(handler)
    train_logger.setLevel(logging.INFO if is_main else logging.WARNING)


class MetricsLog:
    """Appends one JSON object per logged step to ``metrics.jsonl`` (rank 0 only); mirrors scalars
    to TensorBoard when asked.

    ``resume_step``: the step the run starts from. Records of later steps (logged after the last
    checkpoint by a run that was then killed) are moved to ``metrics.jsonl.superseded``, since they
    are logged again, so that the file holds each step once."""

    def __init__(self, output_dir: Path, enabled: bool, tensorboard: bool, resume_step: int = 0):
        self.path = output_dir / "metrics.jsonl"
        self.enabled = enabled
        self.writer = None
        if enabled:
            self._drop_after(resume_step)
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ValueError("--tensorboard needs the tensorboard package: pip install tensorboard") from e
            # purge_step: TensorBoard hides the events of steps >= it that an earlier, killed run wrote
            self.writer = SummaryWriter(log_dir=str(output_dir / "tensorboard"), purge_step=resume_step + 1)

    def _drop_after(self, step: int) -> None:
        """Set aside the records of steps after ``step`` (to ``.superseded``) and any damaged line (torn by a
        kill mid-write, or bytes that are not a JSON record: to ``.damaged``), keeping the good ones."""
        if not os.path.lexists(self.path):
            return
        with os.fdopen(open_nofollow(self.path, os.O_RDONLY), "rb") as f:
            content = f.read()
        kept, dropped, damaged = [], [], []
        for line in content.splitlines(keepends=True):
            line = line if line.endswith(b"\n") else line + b"\n"
            try:
                later = json.loads(line.decode("utf-8"))["step"] > step
            except (ValueError, KeyError, TypeError):  # UnicodeDecodeError is a ValueError
                damaged.append(line)
                continue
            (dropped if later else kept).append(line)
        for lines, suffix in ((dropped, "superseded"), (damaged, "damaged")):
            if lines:
                with open_for_append(self.path.with_name(f"{self.path.name}.{suffix}"), binary=True) as f:
                    f.writelines(lines)
        if not dropped and not damaged:
            return
        replace_atomically(self.path, lambda f: f.writelines(kept))
        if dropped:
            logger.info("metrics.jsonl: %d record(s) after step %d moved to %s.superseded (those steps run again)",
                        len(dropped), step, self.path.name)
        if damaged:
            logger.warning("metrics.jsonl: %d damaged line(s) (not a JSON record) moved to %s.damaged; the %d good "
                           "record(s) are kept", len(damaged), self.path.name, len(kept))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open_for_append(self.path) as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self.writer is not None:
            for key, value in record.items():
                if key not in ("step", "epoch") and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"train/{key}", value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class ProgressBar:
    """A rich progress bar on a terminal (rank 0); nothing otherwise: log lines carry the numbers.

    While the bar is live, the ``train`` logger's console handlers write through rich's console, so that
    log lines (the per-epoch summaries, warnings) print above the bar and stay on screen instead of being
    drawn over by it."""

    def __init__(self, total_steps: int, done_steps: int, enabled: bool, label: str = "pretrain"):
        self.progress = None
        self._redirected: list[tuple[logging.StreamHandler, object]] = []
        if not (enabled and sys.stdout.isatty()):
            return
        from rich import progress as rp

        self.progress = rp.Progress(rp.TextColumn(f"[bold]{label}"), rp.BarColumn(), rp.MofNCompleteColumn(),
                                    rp.TextColumn("{task.fields[stats]}"), rp.TimeElapsedColumn(), rp.TextColumn("eta"),
                                    rp.TimeRemainingColumn())
        self.task = self.progress.add_task("steps", total=total_steps, completed=done_steps, stats="")
        terminal = (sys.stdout, sys.stderr)
        self.progress.start()  # from here on sys.stdout / sys.stderr print above the live bar
        for handler in logging.getLogger("train").handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream in terminal:
                old = handler.setStream(sys.stdout if handler.stream is terminal[0] else sys.stderr)
                self._redirected.append((handler, old))

    def advance(self) -> None:
        if self.progress is not None:
            self.progress.advance(self.task)

    def show(self, stats: str) -> None:
        if self.progress is not None:
            self.progress.update(self.task, stats=stats)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            for handler, old in self._redirected:
                handler.setStream(old)
            self._redirected.clear()
            self.progress = None
