"""The pre-training run's reconstruction grid (original | visible | predicted | pasted) for any checkpoint and any
images: ``train.visualize.save_reconstruction_grid`` under ``train.grids.grid_title``, the masks fixed per image
(train/analyze/inputs.py), with each image's PSNR on its hidden patches (train/analyze/psnr.py) beside it."""

from __future__ import annotations

import os

import torch

from model import family_of
from model.autoencoders import MaskedEncoder
from train.analyze.loading import ModelSpec
from train.analyze.psnr import psnr_db, reconstruction_mse
from train.grids import grid_title
from train.visualize import save_reconstruction_grid


def stage(spec: ModelSpec) -> str:
    """When in training the weights are from, for the caption."""
    if spec.step is not None:
        return f"step {spec.step}, epoch {spec.epoch}"
    if spec.epoch is not None:
        return f"released weights (epoch {spec.epoch})"
    return "weights as given"


@torch.no_grad()
def draw_reconstructions(model: MaskedEncoder, spec: ModelSpec, imgs: torch.Tensor, noise: torch.Tensor,
                         path: str | os.PathLike, heading: str = "images") -> list[dict]:
    """Write the grid of ``imgs`` (B, 3, H, W) under ``noise`` (B, L) to ``path``, its rows under ``heading``;
    returns each row's MSE and PSNR on its hidden patches."""
    title = grid_title(spec.cfg, spec.name, family_of(spec.cfg).partial_prediction, stage(spec))
    save_reconstruction_grid(model, imgs, noise, path, title=title, heading=heading)
    mse = reconstruction_mse(model, imgs, noise)
    return [{"row": r, "mse": m, "psnr_db": p} for r, (m, p) in enumerate(zip(mse.tolist(), psnr_db(mse).tolist(),
                                                                              strict=True))]
