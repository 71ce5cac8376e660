"""The images an analysis reads and the masks it hides them with.

Images are evaluation crops, as fine-tuning evaluates (train/data/plan.py): the shorter side resized to
img_size * 256/224, the centre img_size square, ImageNet mean/std. A folder is read in its sorted order (the
first ``max_images`` files); image i's mask is drawn from its own generator, seeded by (seed, i), so two
checkpoints are compared on the same patches whatever the batch size or device.

That generator is numpy's (``default_rng([seed, i])``: the pair goes whole into its seed sequence), not a
``torch.Generator``: torch's CPU generator keeps only the low 32 bits of its seed, so any packing of (seed, i) into
one torch seed either collides (seed * 2**32 + i gives every seed the same masks) or has to be hashed down.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from train.data import build_loader, resolve_data_path
from train.data.folder import normalize_uint8
from train.data.index import probe_image
from train.data.plan import center_crop_boxes
from train.data.torch_loader import load_crop


def fixed_noise(seed: int, indices: Sequence[int], num_patches: int, device: torch.device | str) -> torch.Tensor:
    """The masking noise (len(indices), num_patches) float32 of the images ``indices``: image i's row is
    ``num_patches`` uniform draws of ``numpy.random.default_rng([seed, i])``, made on the host, then moved to
    ``device`` (the same masks on every device and for every batching)."""
    if seed < 0 or any(int(i) < 0 for i in indices):
        raise ValueError(f"--seed and image indices must be >= 0, got seed {seed}")
    rows = [np.random.default_rng([seed, int(i)]).random(num_patches, dtype=np.float32) for i in indices]
    return torch.from_numpy(np.stack(rows) if rows else np.zeros((0, num_patches), np.float32)).to(device)


class ImageSource:
    """The images of one analysis: the image files ``files`` given one by one (image i is the i-th), or the first
    ``max_images`` (all with None) of the sorted images under ``data_path`` (a folder, read recursively, or
    "demo"); iterate for (evaluation crops (B, 3, H, W) on ``device``, image indices (B,)) in batches of at most
    ``batch_size``."""

    def __init__(self, img_size: int, batch_size: int, device: torch.device | str,
                 data_path: str | os.PathLike | None = None, files: Sequence[str] = (),
                 max_images: int | None = None):
        if max_images is not None and max_images < 1:
            raise ValueError(f"--max_images must be >= 1, got {max_images}")
        self.img_size, self.batch_size, self.device = img_size, batch_size, torch.device(device)
        self.data_path, self.loader = data_path, None
        if files:
            self.files = [str(f) for f in files][:max_images]
            return
        if data_path is None:
            raise ValueError("no images: give --data_path FOLDER (or 'demo') or --images FILE ...")
        try:
            root = resolve_data_path(data_path)
        except FileNotFoundError:
            raise FileNotFoundError(f"--data_path {data_path}: no such folder; give a folder of images (read "
                                    "recursively) or 'demo'") from None
        if root is None or not root.is_dir():
            raise ValueError(f"--data_path {data_path}: not a folder of images")
        batch = min(batch_size, max_images or batch_size)
        self.loader = build_loader(root, batch_size=batch, img_size=img_size, train=False, backend="torch",
                                   device=self.device, num_workers=0)
        self.files = self.loader.files[:max_images]

    def describe(self, seed: int) -> dict:
        """Which images, cropped how, masked how: for a report."""
        return {"data_path": None if self.data_path is None else str(self.data_path), "images": len(self.files),
                "crop": f"evaluation crop: shorter side to {self.img_size} * 256/224, centre {self.img_size} px",
                "masks": f"image i: noise = numpy.random.default_rng([seed, i]).random(L, float32) with seed {seed}; "
                         "the first len_keep patches of argsort(noise) visible", "files": self.files}

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.loader is None:
            for start in range(0, len(self.files), self.batch_size):
                chunk = self.files[start:start + self.batch_size]
                yield load_image_files(chunk, self.img_size, self.device), torch.arange(start, start + len(chunk))
            return
        self.loader.set_epoch(0)
        seen = 0
        for imgs, indices in self.loader:
            take = min(imgs.shape[0], len(self.files) - seen)
            yield imgs[:take], indices[:take].cpu()
            seen += take
            if seen >= len(self.files):
                return

    def masked(self, seed: int, num_patches: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(images, their masking noise ``fixed_noise``, their indices) batches."""
        for imgs, indices in self:
            yield imgs, fixed_noise(seed, indices.tolist(), num_patches, self.device), indices


def load_image_files(paths: Sequence[str | os.PathLike], img_size: int, device: torch.device | str) -> torch.Tensor:
    """The evaluation crops (len(paths), 3, H, W) of image files given one by one; an unreadable file raises
    ValueError naming it."""
    crops = []
    for path in paths:
        path = str(path)
        if not Path(path).is_file():
            raise FileNotFoundError(f"image file not found: {path}")
        try:
            size = np.array([probe_image(path)], dtype=np.int64)
            box = tuple(int(v) for v in center_crop_boxes(size, img_size)[0])
            crops.append(load_crop(path, box, flip=False, out_size=img_size))
        except Exception as e:  # the scan's decode errors are private to it; any failure here is this file's
            raise ValueError(f"cannot read image {path}: {type(e).__name__}: {e}") from e
    return normalize_uint8(torch.from_numpy(np.stack(crops)), torch.device(device))
