"""The part of an image-folder loader that does not depend on the backend: epochs, resumption, labels, and the
accounting of files that fail at run time.

Files that fail at run time (deleted, damaged or unreadable after the up-front scan): both backends replace a
failed image within its batch (DALI by another file of the batch, torch by a mean-colour image), list the file in
`loader.skipped`, and log at most one warning line per batch (a count and the first paths). Every batch a loader
is about to yield is counted in `loader.failures`, a window over the last `FAILURE_WINDOW_BATCHES` (16) batches.
The loader raises `DataSourceLost` from its iterator, instead of yielding the batch, when

- over that window more than `FAILURE_SHARE_LIMIT` (10%) of the images failed and at least
  `FAILURE_COUNT_MIN` (8) did: a handful of bad files in a large folder never stops a run, a quarter of the
  folder gone does within a few batches;
- every image of a batch failed (nothing is left to stand in for them), or
- a file failed and the data folder itself (`index.root`) is gone (renamed, moved, unmounted).

The message is one line: why, how many of how many images failed in the last N batches, the first failed file
with its reason, and whether the data folder is still there. A trainer catches it, drops the unfinished step,
saves the last complete one and exits non-zero; the same command resumes once the data is back.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from train.data.index import ImageIndex
from train.data.plan import IMAGENET_MEAN, IMAGENET_STD, EpochPlan

logger = logging.getLogger("train.data")

FAILURE_WINDOW_BATCHES = 16  # the window: the last this many batches a loader was about to yield
FAILURE_SHARE_LIMIT = 0.10  # the data source is lost when more than this share of the window's images failed...
FAILURE_COUNT_MIN = 8  # ...and at least this many did
_PATHS_SHOWN = 3  # paths named in a warning line; the full list is `loader.skipped`


class DataSourceLost(RuntimeError):
    """The training data went away mid-run (see the module docstring for when): raised by a loader's iterator
    instead of the batch that crossed the line, with a one-line message. Attributes: `failed`, `images`,
    `batches` (the window's counts, that batch included), `path` and `reason` (the first failed file in the
    window and why), `root` (the data folder) and `root_exists`."""

    def __init__(self, message: str, *, failed: int, images: int, batches: int, path: str, reason: str,
                 root: str, root_exists: bool):
        super().__init__(message)
        self.failed, self.images, self.batches = failed, images, batches
        self.path, self.reason, self.root, self.root_exists = path, reason, root, root_exists


class FailureWindow:
    """How many of the images of the last `batches` batches failed to load, and the first failed file among them."""

    def __init__(self, batches: int = FAILURE_WINDOW_BATCHES, share: float = FAILURE_SHARE_LIMIT,
                 min_count: int = FAILURE_COUNT_MIN):
        self.share, self.min_count = share, min_count
        self._recent: deque[tuple[int, int, tuple[str, str] | None]] = deque(maxlen=batches)
        self.total_failed = 0  # over the loader's life, not only the window

    def add(self, images: int, failed: int, first: tuple[str, str] | None) -> None:
        """Count one batch: `images` in it, `failed` of them failed, `first` = (path, reason) of the first failure."""
        self._recent.append((images, failed, first))
        self.total_failed += failed

    @property
    def batches(self) -> int:
        return len(self._recent)

    @property
    def images(self) -> int:
        return sum(n for n, _, _ in self._recent)

    @property
    def failed(self) -> int:
        return sum(f for _, f, _ in self._recent)

    @property
    def first(self) -> tuple[str, str] | None:
        """(path, reason) of the earliest failure still in the window."""
        return next((first for _, _, first in self._recent if first is not None), None)

    def exceeded(self) -> bool:
        failed = self.failed
        return failed >= self.min_count and failed > self.share * self.images

    def limit(self) -> str:
        """The rule, in words."""
        return f"more than {self.share:.0%} of the images, at least {self.min_count}, in {self._recent.maxlen} batches"


def describe_failure(exc: BaseException, path: str) -> str:
    """Why a file failed, without its path (which the messages name apart): 'FileNotFoundError: No such file or
    directory', 'UnidentifiedImageError: cannot identify image file'."""
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    text = " ".join(str(text).replace(repr(path), "").replace(path, "").split()).strip(" :")
    return f"{type(exc).__name__}: {text[:160]}" if text else type(exc).__name__


class EpochPasses:
    """The pass bookkeeping every loader shares: `set_epoch(e, start_batch=k)` chooses what the next
    `iter()` yields (batches k.. of epoch e); a pass without it runs the epoch after the previous one.
    Subclasses give `__len__` (batches per epoch) and `_iterate(epoch, start)`."""

    epoch = 0
    _next_pass = (0, 0)

    def __len__(self) -> int:
        raise NotImplementedError

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Make the next pass yield batches start_batch.. of `epoch` (0 <= start_batch <= len(self))."""
        if epoch < 0:
            raise ValueError(f"epoch={epoch}: must be >= 0")
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch={start_batch}: must be in [0, {len(self)}] (batches per epoch)")
        self._next_pass = (int(epoch), int(start_batch))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch, start = self._next_pass
        self._next_pass = (epoch + 1, 0)
        self.epoch = epoch
        return self._iterate(epoch, start)

    def _iterate(self, epoch: int, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        raise NotImplementedError


class FolderLoader(EpochPasses):
    """Iterates (images, labels) batches of an `ImageIndex` following an `EpochPlan`.

    Resumption guarantee: `set_epoch(e, start_batch=k)` makes the next pass yield exactly batches
    k, k+1, ... of epoch e, with the same files, crop windows and flips (hence, for a given backend,
    the same pixels) as an uninterrupted pass over epoch e, for the same (seed, batch_size, rank,
    world_size, img_size) and the same folder contents. A pass without a preceding set_epoch runs the
    epoch after the previous pass (epoch 0 first).

    labels: the class index (`with_labels=True`) or the file's index in `files` (`with_labels=False`:
    pre-training needs no classes, and the index identifies each sample for logging and checks).

    Files that fail at run time (see the module docstring): replaced within their batch, listed in `skipped`,
    counted in `failures` (a FailureWindow); the iterator raises DataSourceLost when the data source is lost.
    """

    backend = ""
    stand_in = "other images of their batch"  # what replaces a failed image, for the warnings

    def __init__(self, index: ImageIndex, plan: EpochPlan, device: torch.device, with_labels: bool):
        self.index, self.plan, self.device, self.with_labels = index, plan, torch.device(device), with_labels
        # Files that failed at run time despite the scan (file index -> reason): replaced in their batch.
        self._bad: dict[int, str] = {}
        self.failures = FailureWindow()  # the last batches' failed images: decides DataSourceLost

    # ------------------------------------------------------------------ public
    @property
    def num_images(self) -> int:
        return len(self.index.files)

    @property
    def classes(self) -> list[str]:
        return self.index.classes

    @property
    def files(self) -> list[str]:
        return self.index.files

    @property
    def skipped(self) -> list[str]:
        return self.index.skipped + [self.index.files[i] for i in sorted(self._bad)]

    @property
    def batch_size(self) -> int:
        return self.plan.batch_size

    def __len__(self) -> int:
        return self.plan.num_batches

    def batch_indices(self, epoch: int) -> list[np.ndarray]:
        """The file indices (into `files`) of each batch of `epoch` on this rank, before any replacement."""
        return [self.plan.batch(epoch, b)[0] for b in range(len(self))]

    # ------------------------------------------------------------------ for backends
    def _batch(self, epoch: int, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(file indices, windows (n, 4) as x0, y0, w, h, flips, labels), all int64, of one batch.

        Files known to be bad are replaced by good files of the same batch (the batch shape stays static). A
        batch with no good file left is returned as planned: the backend fails on it again and raises
        DataSourceLost (torch: when that batch comes; DALI: when its prefetch fails, a few batches earlier)."""
        ids, boxes, flips = self.plan.batch(epoch, index)
        if self._bad:
            bad = np.isin(ids, list(self._bad))
            good = np.flatnonzero(~bad)
            if bad.any() and len(good):
                source = good[np.arange(bad.sum()) % len(good)]
                ids, boxes, flips = ids.copy(), boxes.copy(), flips.copy()
                ids[bad], boxes[bad], flips[bad] = ids[source], boxes[source], flips[source]
        labels = self.index.labels[ids] if self.with_labels else ids.astype(np.int64)
        return ids, boxes, flips, labels

    def _mark_bad(self, failed: dict[int, str]) -> None:
        """Remember files that failed (file index -> reason; a file's first reason is kept): replaced from now on."""
        for i, reason in failed.items():
            self._bad.setdefault(int(i), reason)

    def _account(self, epoch: int, index: int, images: int, failed: Sequence[tuple[int, str]]) -> None:
        """Count batch `index` of `epoch`, which the backend is about to yield: `images` images, of which those in
        `failed` (one (file index, reason) per failed image) did not load. Marks those files bad, logs one line if
        any failed, and raises DataSourceLost instead of letting the batch through if the data source is lost."""
        first = None
        if failed:
            self._mark_bad(dict(reversed(failed)))  # reversed: the first reason of a file listed twice wins
            first = (self.index.files[failed[0][0]], failed[0][1])
        self.failures.add(images, len(failed), first)
        if not failed:
            return
        cause = self._lost_cause(epoch, index, images, len(failed))
        if cause:
            raise self._lost(cause)
        paths = list(dict.fromkeys(self.index.files[i] for i, _ in failed))
        more = f" and {len(paths) - _PATHS_SHOWN} more" if len(paths) > _PATHS_SHOWN else ""
        w = self.failures
        logger.warning("epoch %d batch %d: %d of %d images failed to load, replaced by %s (first: %s): %s%s; "
                       "%d of %d in the last %d batches (the run stops at %s)", epoch, index, len(failed), images,
                       self.stand_in, failed[0][1], ", ".join(paths[:_PATHS_SHOWN]), more, w.failed, w.images,
                       w.batches, w.limit())

    def _lost_cause(self, epoch: int, index: int, images: int, failed: int) -> str | None:
        """Why the data source counts as lost after a batch with `failed` of `images` images failed, or None."""
        if not os.path.isdir(self.index.root):
            return f"the data folder {self.index.root} is gone (renamed, moved or unmounted?)"
        if failed >= images:
            return f"every image of batch {index} of epoch {epoch} failed to load"
        if self.failures.exceeded():
            return f"too many images failed to load ({self.failures.limit()})"
        return None

    def _lost(self, cause: str) -> DataSourceLost:
        w, root = self.failures, self.index.root
        path, reason = w.first or ("?", "?")
        root_exists = os.path.isdir(root)
        where = f"; the data folder {root} is there: files in it were deleted or damaged" if root_exists else ""
        batches = f"{w.batches} batch" + ("es" if w.batches != 1 else "")
        return DataSourceLost(f"data source lost: {cause}; {w.failed} of {w.images} images failed in the last "
                              f"{batches}, first {path} ({reason}){where}",
                              failed=w.failed, images=w.images, batches=w.batches, path=path, reason=reason,
                              root=str(root), root_exists=root_exists)


def normalize_uint8(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float32 (B, 3, H, W) normalised with ImageNet mean/std, on `device`."""
    images = images.to(device, non_blocking=True)
    mean = torch.tensor(IMAGENET_MEAN, device=device).mul_(255).view(1, 3, 1, 1)
    inv_std = torch.tensor(IMAGENET_STD, device=device).mul_(255).reciprocal_().view(1, 3, 1, 1)
    return images.permute(0, 3, 1, 2).float().sub_(mean).mul_(inv_std).contiguous()
