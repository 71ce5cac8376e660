"""Reconstruction grids: original | masked | reconstruction | reconstruction with visible patches pasted."""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

from train.data import IMAGENET_MEAN, IMAGENET_STD


def to_uint8(imgs: torch.Tensor) -> np.ndarray:
    """ImageNet-normalised (B, 3, H, W) -> uint8 (B, H, W, 3)."""
    mean = torch.tensor(IMAGENET_MEAN, device=imgs.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=imgs.device).view(1, 3, 1, 1)
    pixels = (imgs.float() * std + mean).clamp(0, 1) * 255
    return pixels.round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def save_reconstruction_grid(model: torch.nn.Module, imgs: torch.Tensor, noise: torch.Tensor,
                             path: str | os.PathLike, gap: int = 2) -> None:
    """One row per image, four columns; masked-out areas show as the dataset's mean colour."""
    was_training = model.training
    model.eval()
    rec = model.reconstruct(imgs, noise)
    model.train(was_training)
    columns = [to_uint8(imgs), to_uint8(rec["masked"]), to_uint8(rec["reconstruction"]), to_uint8(rec["pasted"])]
    B, H, W, _ = columns[0].shape
    grid = np.full((B * (H + gap) - gap, 4 * (W + gap) - gap, 3), 255, dtype=np.uint8)
    for r in range(B):
        for c, col in enumerate(columns):
            grid[r * (H + gap): r * (H + gap) + H, c * (W + gap): c * (W + gap) + W] = col[r]
    tmp = f"{path}.tmp.png"
    Image.fromarray(grid).save(tmp)
    os.replace(tmp, path)
