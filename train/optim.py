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


FLOAT32_MAX = 3.4028234663852886e38


def check_lr(lr: float, min_lr: float, given: str) -> float:
    """Refuse a learning rate the optimizer cannot use (beyond float32: AdamW's state is float32) or a schedule
    that would rise at its end (``min_lr`` above the peak); ``given`` names the flag the lr came from."""
    if not lr < FLOAT32_MAX:
        raise ValueError(f"{given} gives lr {lr:.3g}, beyond float32 (the optimizer's state): use a smaller value")
    if min_lr > lr:
        raise ValueError(f"--min_lr {min_lr:g} is above the lr {lr:.3g} ({given}): the cosine schedule decays from "
                         "the lr to --min_lr; lower --min_lr")
    return lr


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
    """AdamW (0.9, 0.95) over ``param_groups``: the fused implementation when ``device`` is a GPU (one kernel per
    step), the multi-tensor one elsewhere. The choice follows ``device``, not where the parameters are: the step
    ledger (bench/ledger/) passes a CUDA device to count, on CPU parameters, the optimizer a GPU trainer runs."""
    fused = device.type == "cuda"
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.95),
                             fused=fused, foreach=None if fused else True)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's lr to ``lr`` times its ``lr_scale`` (layer-wise decay; 1 when the group has none)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def layer_decay_groups(model: nn.Module, weight_decay: float, layer_decay: float,
                       no_decay: tuple[str, ...] = ("pos_embed", "cls_token")) -> list[dict]:
    """Parameter groups for fine-tuning with layer-wise lr decay: a parameter of layer i (0 = the
    embeddings, depth + 1 = the head, see ``ViTClassifier.layer_id``) gets ``lr_scale =
    layer_decay ** (depth + 1 - i)``. No weight decay on vectors and on ``no_decay`` names."""
    top = model.cfg.depth + 1
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        layer = model.layer_id(name)
        decay = p.ndim >= 2 and name not in no_decay
        group = groups.setdefault((layer, decay), {
            "params": [], "weight_decay": weight_decay if decay else 0.0, "lr_scale": layer_decay ** (top - layer),
            "layer": layer,
        })
        group["params"].append(p)
    return [groups[k] for k in sorted(groups)]


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al. 2017), as MAE's linear probe
    uses it: for matrices the update (gradient + weight decay) is scaled by
    ``trust * ||w|| / ||update||``; vectors (biases, norms) take plain momentum SGD."""

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if p.ndim > 1:
                    update = update.add(p, alpha=group["weight_decay"])
                    w_norm, u_norm = torch.norm(p), torch.norm(update)
                    one = torch.ones_like(w_norm)
                    trust = torch.where(w_norm > 0, torch.where(u_norm > 0, group["trust_coefficient"] * w_norm
                                                                / u_norm, one), one)
                    update = update * trust
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(group["momentum"]).add_(update)
                p.add_(buf, alpha=-group["lr"])
        return loss
