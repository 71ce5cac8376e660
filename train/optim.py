"""Optimizer and learning-rate schedule of SPEC.md section 2."""

from __future__ import annotations

import math

import torch
from torch import nn

BASE_BATCH = 256


def scaled_lr(blr: float, eff_batch: int, mask_ratio: float, kept_mask_ratio: float) -> float:
    """lr = (kept_mask_ratio / mask_ratio) * blr * eff_batch / 256.

    CrossMAE scores only a fraction gamma/p of the masked patches, so the loss's variance grows by
    p/gamma and the rate shrinks by the same factor; for MAE the factor is 1.
    """
    return (kept_mask_ratio / mask_ratio) * blr * eff_batch / BASE_BATCH


def lr_at(epoch: float, lr: float, min_lr: float, warmup_epochs: float, epochs: float) -> float:
    """Linear warmup to ``lr``, then half-cycle cosine to ``min_lr``; ``epoch`` is fractional."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    progress = (epoch - warmup_epochs) / max(epochs - warmup_epochs, 1e-12)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weights with ndim >= 2 (matrices, convs, tokens); none on biases and norms."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW (0.9, 0.95); the fused implementation on CUDA, the multi-tensor one elsewhere."""
    fused = device.type == "cuda"
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.95),
                             fused=fused, foreach=None if fused else True)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
