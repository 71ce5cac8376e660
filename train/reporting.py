"""What the pre-training loop reports: a record per logged step (``metrics.jsonl``, TensorBoard, the progress
bar or a log line), a summary line per group of epochs that stays on screen, and the run's final line. A k-NN
evaluation (train/knn.py) gets its own record, and its numbers join the next summary line (the step-0 baseline,
before any summary, a line of its own); its time is left out of the throughput figures.

Losses are summed on the device between log steps: the log steps (and the summaries) are the loop's only
host synchronisations. Means are taken across processes (collective under DDP: every rank calls them).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from train import distributed
from train.knn import KnnResult
from train.monitor import MetricsLog, ProgressBar

logger = logging.getLogger("train")

SUMMARY_MIN_STEPS = 50  # a summary line covers whole epochs and at least this many steps (or the run's end)


def format_duration(seconds: float) -> str:
    """2:05 or 1:02:05."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class _Span:
    """Loss (on the device), steps, data wait and wall time since a point of the run."""

    def __init__(self, device: torch.device, first_step: int):
        self.loss_sum = torch.zeros((), device=device)
        self.first_step, self.steps, self.waited, self.start = first_step, 0, 0.0, time.perf_counter()

    def add(self, loss: torch.Tensor, waited: float) -> None:
        self.loss_sum += loss
        self.steps += 1
        self.waited += waited

    def exclude(self, seconds: float) -> None:
        """Leave ``seconds`` spent on something else than training (an evaluation) out of the span's time."""
        self.start += seconds

    def elapsed(self) -> float:
        return max(time.perf_counter() - self.start, 1e-9)


class StepReporter:
    """Use as a context manager around the loop (it opens ``metrics.jsonl`` and the bar, and closes them)."""

    def __init__(self, out: Path, *, is_main: bool, tensorboard: bool, start_step: int, total_steps: int,
                 epochs: int, images_per_step: int, accum_iter: int, world_size: int, device: torch.device,
                 flops_per_image: float, peak_flops: float | None):
        self.out, self.is_main, self.tensorboard, self.device = out, is_main, tensorboard, device
        self.total_steps, self.epochs, self.accum_iter, self.world_size = total_steps, epochs, accum_iter, world_size
        self.images_per_step, self.flops_per_image, self.peak = images_per_step, flops_per_image, peak_flops
        self.start_step, self.started = start_step, time.perf_counter()
        self.window = _Span(device, start_step)  # since the last log step (restarted on entering)
        self.summary = _Span(device, start_step)  # since the last summary line (restarted on entering)
        self.loss_range: tuple[float | None, float | None] = (None, None)  # first and last logged loss, this run
        self.knn_unshown: tuple[int, KnnResult] | None = None  # the latest k-NN evaluation (step, result), unshown
        self.log: MetricsLog | None = None
        self.bar: ProgressBar | None = None

    def __enter__(self) -> StepReporter:
        self.log = MetricsLog(self.out, self.is_main, self.tensorboard, resume_step=self.start_step)
        self.bar = ProgressBar(self.total_steps, self.start_step, self.is_main)
        self.started = time.perf_counter()
        self.window = _Span(self.device, self.start_step)
        self.summary = _Span(self.device, self.start_step)
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()
        self.log.close()

    def step_done(self, loss: torch.Tensor, waited: float) -> None:
        self.window.add(loss, waited)
        self.summary.add(loss, waited)
        self.bar.advance()

    def log_step(self, step: int, epoch: float, lr: float) -> None:
        """One record for the steps since the last one (collective)."""
        w = self.window
        loss = distributed.mean_across_ranks(w.loss_sum / (w.steps * self.accum_iter)).item()
        elapsed = w.elapsed()
        img_per_s = w.steps * self.images_per_step / elapsed
        record = {"step": step, "epoch": round(epoch, 4), "loss": loss, "lr": lr, "img_per_s": round(img_per_s, 2),
                  "data_wait": round(w.waited / elapsed, 4)}
        if self.device.type == "cuda":
            record["max_mem_mb"] = round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)
            if self.peak:
                record["mfu"] = round(self.flops_per_image * img_per_s / (self.peak * self.world_size), 4)
        self.log.write(record)
        first = self.loss_range[0]
        self.loss_range = (loss if first is None else first, loss)
        stats = (f"epoch {record['epoch']:.2f}  loss {loss:.4f}  lr {lr:.2e}  {img_per_s:.0f} img/s  "
                 f"data wait {record['data_wait']:.0%}")
        self.bar.show(stats)
        if self.bar.progress is None:
            logger.info("step %d/%d  %s", step, self.total_steps, stats)
        self.window = _Span(self.device, step)

    def knn_done(self, step: int, epoch: float, result: KnnResult) -> None:
        """Record a k-NN evaluation (rank 0, which has its result): its own metrics.jsonl record; shown by the next
        summary line, or at once when no step ran yet this run (a fresh run's step-0 baseline)."""
        self.log.write({"step": step, "epoch": round(epoch, 4), **result.record()})
        self.window.exclude(result.seconds)
        self.summary.exclude(result.seconds)
        if step == self.start_step:
            logger.info("step %d, before training: %s on %d train / %d val images, k=%d", step, result.describe(),
                        result.num_train, result.num_val, result.k)
        else:
            self.knn_unshown = step, result

    def epoch_done(self, epoch: int, step: int, lr: float) -> None:
        """A summary line once the epochs since the last one hold enough steps, or at the run's end."""
        if step - self.summary.first_step >= SUMMARY_MIN_STEPS or step >= self.total_steps:
            self.summary_line(epoch, step, lr)

    def summary_line(self, epoch: int, step: int, lr: float) -> None:
        """One line that stays on screen above the bar (collective); a no-op when no step ran since the last."""
        s = self.summary
        if not s.steps:
            return
        loss = distributed.mean_across_ranks(s.loss_sum / (s.steps * self.accum_iter)).item()
        img_per_s = s.steps * self.images_per_step / s.elapsed()
        knn = ""
        if self.knn_unshown is not None:
            knn_step, result = self.knn_unshown
            knn = f"  {result.describe()}" + (f" at step {knn_step}" if knn_step != step else "")
            self.knn_unshown = None
        logger.info("epoch %d/%d  step %d/%d  loss %.4f (mean of steps %d-%d)  lr %.2e  %.0f img/s  elapsed %s%s",
                    epoch, self.epochs, step, self.total_steps, loss, s.first_step + 1, step, lr, img_per_s,
                    format_duration(time.perf_counter() - self.started), knn)
        self.summary = _Span(self.device, step)

    def final_line(self, step: int, written: list[str]) -> None:
        seconds = time.perf_counter() - self.started
        steps = step - self.start_step
        first, last = self.loss_range
        losses = f"loss {first:.4f} -> {last:.4f} (first and last logged)" if first is not None else "no loss logged"
        logger.info("finished: %d steps (%d this run) in %s, %d images seen this run; %s; files in %s: %s",
                    step, steps, format_duration(seconds), steps * self.images_per_step, losses, self.out,
                    ", ".join(name for name in written if (self.out / name).exists()))
