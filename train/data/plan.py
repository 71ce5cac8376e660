"""What each rank reads in each epoch, and how each sample is cropped: decided in Python, up front.

Both image-folder backends (DALI and PyTorch/Pillow) take their samples from an `EpochPlan`, so they
read the same files in the same order with the same crop windows and flips. Every decision is a
pure function of (seed, epoch, file index), never of a running RNG state, which is what makes a
resumed run exact: batch k of epoch e is the same whether or not batches 0..k-1 were read first.

- Order: a permutation of all files from (seed, epoch) (training), or the sorted order (evaluation).
- Sharding: rank r takes every world_size-th entry of that order. Training drops the tail so every
  rank has the same number of full batches (static shape batch_size); evaluation pads the tail by
  repeating files from the start, so every rank has the same number of samples and nothing is lost
  (the last batch may be short; padded samples are counted twice, as with DistributedSampler).
- Training crop: RandomResizedCrop(scale (0.2, 1.0), ratio (3/4, 4/3)) window and a horizontal flip
  with probability 1/2, drawn from a counter-based hash of (seed, epoch, file index).
- Evaluation crop: the window that "resize the shorter side to img_size * 256/224, then center crop
  img_size" reads, i.e. a centered square of side shorter_side * 224/256. Cropping this window and
  resizing it to img_size equals resize-then-crop up to the resampling filter's footprint at the
  window border.
"""

from __future__ import annotations

import math

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_SCALE = (0.2, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
EVAL_RESIZE_RATIO = 256 / 224  # evaluation resizes the shorter side to img_size * this, then center-crops
RRC_ATTEMPTS = 10

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)
_STREAM_FLIP = 2 * RRC_ATTEMPTS + 2


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser: a bijective, well-mixed hash of uint64 (numpy wraps on overflow)."""
    x = (x + np.uint64(0x9E3779B97F4A7C15)) & _M64
    x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _M64
    x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _M64
    return x ^ (x >> np.uint64(31))


def hash_uniform(seed: int, epoch: int, ids: np.ndarray, streams: int) -> np.ndarray:
    """(len(ids), streams) float64 uniforms in [0, 1), a pure function of (seed, epoch, id, stream)."""
    key = _splitmix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))
    key = _splitmix64(key ^ np.uint64(epoch & 0xFFFFFFFFFFFFFFFF))
    x = _splitmix64(key ^ np.asarray(ids, dtype=np.uint64)[:, None])
    x = _splitmix64(x ^ np.arange(streams, dtype=np.uint64)[None, :])
    return (x >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def random_resized_crop_boxes(sizes: np.ndarray, rand: np.ndarray, scale: tuple[float, float] = CROP_SCALE,
                              ratio: tuple[float, float] = CROP_RATIO) -> np.ndarray:
    """RandomResizedCrop windows (x0, y0, w, h), int64 (n, 4), for images of `sizes` (n, 2) = (W, H).

    `rand` (n, 2 * RRC_ATTEMPTS + 2) uniforms. Up to RRC_ATTEMPTS tries of an area fraction uniform in
    `scale` and a log-uniform aspect ratio in `ratio`; the first window that fits is placed uniformly.
    If none fits: the whole image, clamped to the ratio range, centered.
    """
    width = sizes[:, 0:1].astype(np.float64)
    height = sizes[:, 1:2].astype(np.float64)
    area = width * height * (scale[0] + (scale[1] - scale[0]) * rand[:, :RRC_ATTEMPTS])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = np.exp(log_lo + (log_hi - log_lo) * rand[:, RRC_ATTEMPTS:2 * RRC_ATTEMPTS])
    w = np.round(np.sqrt(area * aspect))
    h = np.round(np.sqrt(area / aspect))
    fits = (w >= 1) & (h >= 1) & (w <= width) & (h <= height)
    first = np.argmax(fits, axis=1)
    rows = np.arange(len(sizes))
    w_ok, h_ok = w[rows, first], h[rows, first]

    # Fallback: the largest centered window whose aspect ratio lies in `ratio`.
    width, height = width[:, 0], height[:, 0]
    in_ratio = width / height
    w_fb = np.where(in_ratio < ratio[0], width, np.where(in_ratio > ratio[1], np.round(height * ratio[1]), width))
    h_fb = np.where(in_ratio < ratio[0], np.round(width / ratio[0]), height)
    w_fb, h_fb = np.clip(w_fb, 1, width), np.clip(h_fb, 1, height)

    found = fits.any(axis=1)
    w = np.where(found, w_ok, w_fb)
    h = np.where(found, h_ok, h_fb)
    x0 = np.where(found, np.floor(rand[:, -2] * (width - w + 1)), np.round((width - w) / 2))
    y0 = np.where(found, np.floor(rand[:, -1] * (height - h + 1)), np.round((height - h) / 2))
    return np.stack([x0, y0, w, h], axis=1).astype(np.int64)


def center_crop_boxes(sizes: np.ndarray, img_size: int, resize_ratio: float = EVAL_RESIZE_RATIO) -> np.ndarray:
    """The window (x0, y0, w, h) that resize-shorter-side-then-center-crop reads, int64 (n, 4)."""
    width, height = sizes[:, 0].astype(np.float64), sizes[:, 1].astype(np.float64)
    resize_to = int(img_size * resize_ratio)
    side = np.minimum(width, height) * img_size / resize_to
    side = np.clip(np.round(side), 1, np.minimum(width, height))
    x0 = np.round((width - side) / 2)
    y0 = np.round((height - side) / 2)
    return np.stack([x0, y0, side, side], axis=1).astype(np.int64)


class EpochPlan:
    """The files, crop windows and flips of every batch of every epoch on one rank (see module doc)."""

    def __init__(self, sizes: np.ndarray, batch_size: int, img_size: int, *, train: bool, rank: int = 0,
                 world_size: int = 1, seed: int = 0):
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.num_files = len(self.sizes)
        self.batch_size, self.img_size, self.train = batch_size, img_size, train
        self.rank, self.world_size, self.seed = rank, world_size, seed
        if train:
            self.samples_per_rank = self.num_files // (world_size * batch_size) * batch_size
            if self.samples_per_rank == 0:
                raise ValueError(f"batch_size={batch_size} x world_size={world_size} is more than the "
                                 f"{self.num_files} valid images: lower batch_size")
        else:
            self.samples_per_rank = math.ceil(self.num_files / world_size)
        self.num_batches = math.ceil(self.samples_per_rank / batch_size)
        self._cached_epoch, self._cached_order = None, None

    def order(self, epoch: int) -> np.ndarray:
        """This rank's file indices for `epoch`, int64 (samples_per_rank,)."""
        if self._cached_epoch != epoch:
            if self.train:
                perm = np.random.default_rng([self.seed & 0xFFFFFFFF, epoch]).permutation(self.num_files)
                used = perm[: self.samples_per_rank * self.world_size]
            else:
                total = self.samples_per_rank * self.world_size
                used = np.resize(np.arange(self.num_files), total)  # repeats from the start to pad
            self._cached_epoch, self._cached_order = epoch, used[self.rank::self.world_size].copy()
        return self._cached_order

    def batch(self, epoch: int, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(file indices (n,), windows (n, 4) int64 as x0, y0, w, h, flips (n,) int64) of batch `index`."""
        if not 0 <= index < self.num_batches:
            raise IndexError(f"batch {index} out of range: an epoch has {self.num_batches} batches on this rank")
        ids = self.order(epoch)[index * self.batch_size:(index + 1) * self.batch_size]
        if self.train:
            rand = hash_uniform(self.seed, epoch, ids, _STREAM_FLIP + 1)
            boxes = random_resized_crop_boxes(self.sizes[ids], rand[:, :_STREAM_FLIP])
            flips = (rand[:, _STREAM_FLIP] < 0.5).astype(np.int64)
        else:
            boxes = center_crop_boxes(self.sizes[ids], self.img_size)
            flips = np.zeros(len(ids), dtype=np.int64)
        return ids, boxes, flips
