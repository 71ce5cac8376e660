"""The part of an image-folder loader that does not depend on the backend: epochs, resumption, labels."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import torch

from train.data.index import ImageIndex
from train.data.plan import IMAGENET_MEAN, IMAGENET_STD, EpochPlan

logger = logging.getLogger("train.data")


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
    """

    backend = ""

    def __init__(self, index: ImageIndex, plan: EpochPlan, device: torch.device, with_labels: bool):
        self.index, self.plan, self.device, self.with_labels = index, plan, torch.device(device), with_labels
        self._bad: set[int] = set()  # files that failed at run time despite the scan: replaced in their batch

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
        """(file indices, windows (n, 4) as x0, y0, w, h, flips, labels), all int64, of one batch."""
        ids, boxes, flips = self.plan.batch(epoch, index)
        if self._bad:
            bad = np.isin(ids, list(self._bad))
            if bad.any():
                good = np.flatnonzero(~bad)
                # Keep the batch shape static: a failed file is replaced by a good file of the same batch.
                source = good[np.arange(bad.sum()) % len(good)] if len(good) else None
                if source is None:
                    raise RuntimeError(f"every file of batch {index} of epoch {epoch} failed to decode")
                ids, boxes, flips = ids.copy(), boxes.copy(), flips.copy()
                ids[bad], boxes[bad], flips[bad] = ids[source], boxes[source], flips[source]
        labels = self.index.labels[ids] if self.with_labels else ids.astype(np.int64)
        return ids, boxes, flips, labels

    def _mark_bad(self, ids: list[int], reason: str) -> None:
        self._bad.update(ids)
        logger.warning("skipping %d file(s) that failed to decode at run time (%s): %s",
                       len(ids), reason, [self.index.files[i] for i in ids])


def normalize_uint8(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float32 (B, 3, H, W) normalised with ImageNet mean/std, on `device`."""
    images = images.to(device, non_blocking=True)
    mean = torch.tensor(IMAGENET_MEAN, device=device).mul_(255).view(1, 3, 1, 1)
    inv_std = torch.tensor(IMAGENET_STD, device=device).mul_(255).reciprocal_().view(1, 3, 1, 1)
    return images.permute(0, 3, 1, 2).float().sub_(mean).mul_(inv_std).contiguous()
