"""PyTorch DataLoader + Pillow backend: the fallback when DALI does not import.

Same files, order, crop windows and flips as the DALI backend (both follow `EpochPlan`). Each worker
builds whole batches: decode (JPEGs at a reduced DCT scale when the window is much larger than the
output, as a GPU decoder's ROI decode would spare the work), crop + bicubic resize in one Pillow call
(antialiased), flip, to uint8 (B, H, W, 3). Normalisation to float NCHW happens on the training device.

A file that fails in a worker (deleted, damaged after the scan) becomes a mean-colour image (normalised ~0); the
worker returns the failed files with the batch, and the main process counts them (`FolderLoader._account`: one
warning line per batch, `loader.skipped`, DataSourceLost when the data is gone). A worker that dies is not a file
failure: the DataLoader raises as usual.
"""

from __future__ import annotations

import logging
import signal
import warnings
import weakref
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image, ImageOps

from train.data.folder import FolderLoader, describe_failure, normalize_uint8
from train.data.index import ImageIndex
from train.data.plan import IMAGENET_MEAN, EpochPlan

logger = logging.getLogger("train.data")

_MEAN_PIXEL = tuple(round(255 * m) for m in IMAGENET_MEAN)  # normalises to ~0: the stand-in for a failed file
_EXIF_ORIENTATION = 0x0112
_WORKER_TIMEOUT_S = 300  # a worker silent this long raises instead of hanging the run


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB the way DALI's decoders do it (16-bit scaled to 8-bit, alpha dropped)."""
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        scale = 255.0 / 65535.0 if im.mode.startswith("I;16") or arr.max(initial=0) > 255 else 1.0
        im = Image.fromarray(np.clip(arr * scale + 0.5, 0, 255).astype(np.uint8), "L")
    elif im.mode == "P":
        im = im.convert("RGBA")  # keeps palettes with transparency from warning
    return im.convert("RGB")


def load_crop(path: str, box: tuple[int, int, int, int], flip: bool, out_size: int, draft: bool = True) -> np.ndarray:
    """Decode `path`, crop window (x0, y0, w, h) (EXIF-oriented coordinates), resize bicubic, flip: uint8 HWC."""
    x0, y0, w, h = box
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Image.open(path) as im:
            is_jpeg = im.format in ("JPEG", "MPO")
            orientation = im.getexif().get(_EXIF_ORIENTATION, 1) if is_jpeg else 1  # as in the scan
            scale = 1.0
            if draft and is_jpeg and min(w, h) >= 2 * out_size:
                # Largest DCT reduction that keeps the window at least out_size wide: same result as
                # a full decode up to the reduced-scale IDCT's filtering, 2-8x less work.
                full_w = im.size[0]
                request = tuple(max(1, -(-n * out_size // min(w, h))) for n in im.size)
                im.draft(None, request)
                scale = im.size[0] / full_w
            if orientation != 1:
                im = ImageOps.exif_transpose(im)
            im = _to_rgb(im)
            width, height = im.size
            left, top = min(x0 * scale, width - 1), min(y0 * scale, height - 1)
            crop = (left, top, min((x0 + w) * scale, width), min((y0 + h) * scale, height))
            im = im.resize((out_size, out_size), Image.Resampling.BICUBIC, box=crop)
    if flip:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(im)


class _BatchDataset(torch.utils.data.Dataset):
    """Maps a batch description (file indices, paths, windows, flips, labels) to (uint8 (B, H, W, 3), int64 (B,),
    failed): `failed` lists (file index, reason) for each image whose file failed (a mean-colour image instead)."""

    def __init__(self, img_size: int, draft: bool):
        self.img_size, self.draft = img_size, draft

    def __getitem__(self, item):
        ids, paths, boxes, flips, labels = item
        out = np.empty((len(paths), self.img_size, self.img_size, 3), dtype=np.uint8)
        failed = []
        for k, path in enumerate(paths):
            try:
                out[k] = load_crop(path, tuple(int(v) for v in boxes[k]), bool(flips[k]), self.img_size, self.draft)
            except Exception as exc:  # never kill the epoch here: the main process decides (FolderLoader._account)
                failed.append((int(ids[k]), describe_failure(exc, path)))
                out[k] = _MEAN_PIXEL
        return torch.from_numpy(out), torch.from_numpy(np.asarray(labels, dtype=np.int64)), failed


class _PlanSampler(torch.utils.data.Sampler):
    """Yields the batch descriptions of the pass set up by `TorchLoader._iterate`, computed in the main process."""

    def __init__(self, loader: TorchLoader):
        # A weak reference: a cycle through the DataLoader would leave its workers to the garbage
        # collector, whose shutdown then waits out the workers' status timeout (seconds per worker).
        self.loader = weakref.proxy(loader)
        self.pass_ = (0, 0)

    def __iter__(self):
        epoch, start = self.pass_
        for b in range(start, len(self.loader)):
            ids, boxes, flips, labels = self.loader._batch(epoch, b)
            yield ids, [self.loader.files[i] for i in ids], boxes, flips, labels

    def __len__(self):
        return len(self.loader) - self.pass_[1]


def _ignore_interrupts(worker_id: int) -> None:
    """Ctrl-C in a terminal reaches the whole process group; the training process handles it (saves,
    then stops), so the workers keep serving batches until then instead of dying. SIGTERM gets its
    default action back (a forked worker inherits the trainer's handler), so that the DataLoader can
    always terminate a worker."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


class TorchLoader(FolderLoader):
    """Image-folder loader on torch.utils.data.DataLoader and Pillow (see FolderLoader for the contract)."""

    backend = "torch"
    stand_in = "mean-colour images"

    def __init__(self, index: ImageIndex, plan: EpochPlan, device: torch.device, with_labels: bool,
                 num_workers: int = 2, draft: bool = True, prefetch_factor: int = 2):
        super().__init__(index, plan, device, with_labels)
        self._sampler = _PlanSampler(self)
        workers = max(0, int(num_workers))
        self._loader = torch.utils.data.DataLoader(
            _BatchDataset(plan.img_size, draft), batch_size=None, sampler=self._sampler, num_workers=workers,
            pin_memory=self.device.type == "cuda", persistent_workers=workers > 0,
            prefetch_factor=prefetch_factor if workers > 0 else None, timeout=_WORKER_TIMEOUT_S if workers > 0 else 0,
            worker_init_fn=_ignore_interrupts)

    def _iterate(self, epoch: int, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self._sampler.pass_ = (epoch, start)
        for index, (images, labels, failed) in enumerate(self._loader, start):
            self._account(epoch, index, len(labels), failed)  # raises DataSourceLost instead of a lost batch
            yield normalize_uint8(images, self.device), labels.to(self.device, non_blocking=True)
