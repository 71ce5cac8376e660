"""The pre-training run's pictures: reconstruction grids of fixed images under fixed masks, and the loss curve.

The images are center crops spread over the dataset's sorted files (hence over its folders); with the demo,
the last ``VIS_HELDOUT`` are crops of held-out photos the run never trains on. The masks come from the run's
seed, so every grid of a run (and of its resumption) shows the same patches hidden.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from model import ModelConfig
from train.data import DataSourceLost, ImageIndex, build_loader
from train.visualize import save_loss_curve, save_reconstruction_grid

logger = logging.getLogger("train")

VIS_IMAGES = 8
VIS_HELDOUT = 4  # of VIS_IMAGES, drawn from the demo's held-out photos when the run reads the demo
LOSS_PLOT = "loss.png"


def grid_images(root: str | Path, count: int, img_size: int, backend: str, device: torch.device,
                index: ImageIndex | None = None) -> list[torch.Tensor]:
    """``count`` center crops (1, 3, H, W) spread over the sorted files of ``root`` (``index``: its scan, when the
    run already has it). A file that fails to decode despite the scan is passed over for the next one: a picture
    is no reason to stop a run."""
    vis = build_loader(root, batch_size=1, img_size=img_size, train=False, backend=backend, device=device,
                       num_workers=0, index=index)
    picks = [(i * len(vis)) // count for i in range(min(count, len(vis)))]
    imgs = []
    for first in picks:
        for index in range(first, min(first + 4, len(vis))):
            vis.set_epoch(0, start_batch=index)
            try:
                imgs.append(next(iter(vis))[0])
                break
            except DataSourceLost as e:  # a batch of one: the file, not the data source
                logger.warning("reconstruction grid: skipping %s (%s)", e.path, e.reason)
            except RuntimeError as e:
                logger.warning("reconstruction grid: skipping %s (%s)", vis.files[vis.batch_indices(0)[index][0]],
                               str(e).strip().splitlines()[-1][:200] if str(e).strip() else type(e).__name__)
    return imgs


def grid_title(cfg: ModelConfig, model_name: str, partial_prediction: bool, when: str) -> str:
    """A grid's caption: the model, the crops and patches, ``when`` (e.g. "step 200, epoch 40"), what is predicted
    and how norm-pix outputs are shown."""
    split, L = cfg.split, cfg.num_patches
    hidden = L - split.len_keep
    title = f"{model_name} on {cfg.img_size}-pixel crops, {cfg.patch_size}-pixel patches, {when}: "
    if partial_prediction and split.n_pred < hidden:
        title += (f"trained to predict {split.n_pred} of {L} patches, drawn predicting all {hidden} hidden ones "
                  "(the decoder's queries do not see each other).")
    else:
        title += f"predicting the {hidden} hidden patches of {L}."
    if cfg.norm_pix_loss:
        title += " Norm-pix output: each predicted patch shown with the true patch's mean and std."
    return title


class ReconstructionGrids:
    """Draws ``reconstruction-*.png`` and ``loss.png`` into the run folder (rank 0 only builds one)."""

    def __init__(self, model: nn.Module, cfg: ModelConfig, model_name: str, partial_prediction: bool,
                 out: Path, data_root: str | None, demo: bool, data_backend: str, device: torch.device, seed: int,
                 index: ImageIndex | None = None):
        self.model, self.cfg, self.model_name, self.out = model, cfg, model_name, out
        self.partial_prediction = partial_prediction
        self.heldout = 0  # how many of the grid's images (the last ones) the run does not train on
        self.batch = None
        if data_root is None:
            return
        heldout = []
        if demo:
            from train.data.demo import materialize_demo_heldout

            heldout = grid_images(materialize_demo_heldout(), VIS_HELDOUT, cfg.img_size, data_backend, device)
        imgs = grid_images(data_root, VIS_IMAGES - len(heldout), cfg.img_size, data_backend, device,
                           index) + heldout
        if not imgs:
            return
        self.heldout = len(heldout)
        imgs = torch.cat(imgs)
        g = torch.Generator().manual_seed(seed)
        self.batch = imgs, torch.rand(imgs.shape[0], cfg.num_patches, generator=g).to(device)

    def title(self, step: int, epoch: int) -> str:
        return grid_title(self.cfg, self.model_name, self.partial_prediction, f"step {step}, epoch {epoch}")

    def save(self, name: str, step: int, epoch: int) -> None:
        """The grid ``name`` (when the run has images to draw) and the loss curve."""
        if self.batch is not None:
            save_reconstruction_grid(self.model, *self.batch, self.out / name, heldout=self.heldout,
                                     title=self.title(step, epoch))
        save_loss_curve(self.out / "metrics.jsonl", self.out / LOSS_PLOT, norm_pix=self.cfg.norm_pix_loss)
