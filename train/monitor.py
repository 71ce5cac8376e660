"""What a run shows and records: a progress bar, log lines, ``metrics.jsonl``, optional TensorBoard."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import torch

logger = logging.getLogger("train")

# Dense bf16/fp16 tensor-core peaks (FLOP/s) for MFU; cards not listed get no MFU.
PEAK_FLOPS = {
    "H200": 989e12,
    "H100 SXM": 989e12,
    "H100 80GB HBM3": 989e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "A100": 312e12,
}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_FLOPS.items():
        if key in name:
            return value
    return None


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
        if not self.path.exists():
            return
        kept, dropped = [], []
        for line in self.path.read_text().splitlines(keepends=True):
            try:
                later = json.loads(line)["step"] > step
            except (ValueError, KeyError, TypeError):  # a line torn by a kill mid-write: not a record
                later = True
            (dropped if later else kept).append(line if line.endswith("\n") else line + "\n")
        if not dropped:
            return
        with open(self.path.with_name(self.path.name + ".superseded"), "a") as f:
            f.writelines(dropped)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, self.path)
        logger.info("metrics.jsonl: %d record(s) after step %d moved to %s.superseded (those steps run again)",
                    len(dropped), step, self.path.name)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
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
