"""Reconstruction PSNR on the hidden patches (the paper's Table 13), defined exactly.

For each image, with its fixed mask (train/analyze/inputs.py):

1. the model predicts every hidden patch (``model.reconstruct``: for CrossMAE all L - len_keep hidden patches,
   not only the kept_mask_ratio fraction it trains on, so that MAE and CrossMAE are scored on the same patches);
   norm-pix predictions are un-normalised with the true patch's mean and std, as the training's grids show them;
2. prediction and original go to pixel space: ImageNet mean/std un-normalised, clipped to [0, 1]
   (``train.visualize.to_pixels``);
3. MSE = the mean squared difference over every value (pixels x 3 channels) of the hidden patches of the image;
4. PSNR = 10 log10(1 / MSE) in dB (peak value 1).

Reported: the mean of the per-image PSNRs over the images with MSE > 0 (an image whose hidden patches are all
predicted exactly has PSNR +inf: it is counted in ``perfect_images`` and left out of that mean), the pooled PSNR
10 log10(1 / mean MSE) over all images (every image has the same number of hidden patches, so this is the PSNR of
all hidden values together), and the range, median and spread of the finite per-image PSNRs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from kernels.reference import gather_patches_reference
from model.autoencoders import MaskedEncoder
from train.visualize import to_pixels


def hidden_ids(noise: torch.Tensor, len_keep: int) -> torch.Tensor:
    """The patches the encoder does not see under ``noise`` (B, L): (B, L - len_keep), in shuffle order."""
    return torch.argsort(noise, dim=1)[:, len_keep:]


def hidden_patch_mse(imgs: torch.Tensor, predicted: torch.Tensor, ids: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Per image, the pixel-space MSE (steps 2-3 of the module docstring) between the normalised images ``imgs``
    and ``predicted`` (B, 3, H, W) over the patches ``ids`` (B, n): float64 (B,)."""
    true = gather_patches_reference(to_pixels(imgs), ids, patch_size)
    pred = gather_patches_reference(to_pixels(predicted), ids, patch_size)
    return (pred.double() - true.double()).square().mean(dim=(1, 2))


@torch.no_grad()
def reconstruction_mse(model: MaskedEncoder, imgs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Per image, the MSE of ``model``'s reconstruction of every hidden patch: float64 (B,) on the CPU."""
    reconstruction = model.reconstruct(imgs, noise)["reconstruction"]
    ids = hidden_ids(noise, model.cfg.split.len_keep)
    return hidden_patch_mse(imgs, reconstruction, ids, model.cfg.patch_size).cpu()


def psnr_db(mse: torch.Tensor) -> torch.Tensor:
    """10 log10(1 / mse), +inf where mse is 0."""
    return 10 * torch.log10(1 / mse.double())


def summarise_psnr(mse: torch.Tensor) -> dict:
    """The PSNR figures of per-image MSEs (module docstring), as plain values."""
    if mse.numel() == 0:
        raise ValueError("no image was scored")
    psnr = psnr_db(mse)
    finite = psnr[torch.isfinite(psnr)]
    summary = {"images": mse.numel(), "perfect_images": int((mse == 0).sum()),
               "mean_psnr_db": finite.mean().item() if finite.numel() else math.inf,
               "pooled_psnr_db": psnr_db(mse.mean()).item(), "mean_mse": mse.mean().item()}
    if finite.numel():
        summary.update(min_psnr_db=finite.min().item(), max_psnr_db=finite.max().item(),
                       median_psnr_db=finite.median().item(),
                       std_psnr_db=finite.std().item() if finite.numel() > 1 else 0.0)
    return summary


def measure_psnr(model: MaskedEncoder, batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> dict:
    """Score ``model`` (eval mode) on ``batches`` of (images, masking noise, image indices): the summary and the
    per-image list (index, MSE, PSNR), in the order given."""
    indices, errors = [], []
    for imgs, noise, index in batches:
        errors.append(reconstruction_mse(model, imgs, noise))
        indices += [int(i) for i in index]
    mse = torch.cat(errors) if errors else torch.zeros(0, dtype=torch.float64)
    summary = summarise_psnr(mse)
    split = model.cfg.split
    summary["hidden_patches_per_image"] = split.num_patches - split.len_keep
    summary["per_image"] = [{"index": i, "mse": m, "psnr_db": p}
                            for i, m, p in zip(indices, mse.tolist(), psnr_db(mse).tolist(), strict=True)]
    return summary
