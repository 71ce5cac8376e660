"""The encoder as an image classifier, for fine-tuning and linear probing.

The same patch embedding and blocks as the pre-training encoder (same parameter names, so a
pre-training checkpoint's encoder loads as is), without masking; global average pooling followed by
``fc_norm`` (the paper's fine-tuning) or the cls token after a final ``norm``. For linear probing the
head is a BatchNorm without affine parameters followed by the linear layer (MAE's recipe), and only
the head trains.

    clf = create_classifier("vit_base_patch16", num_classes=1000, drop_path=0.1)
    load_encoder(clf, read_checkpoint("checkpoint-last.pth"))     # ours, or the authors' released files
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import torch
from torch import nn

from model.autoencoders import PatchEmbed
from model.config import ModelConfig
from model.layers import Block, init_vit_weights, layer_norm, run_blocks, sincos_pos_table
from model.official import model_entry, short_list
from model.ops import check_backend, default_backend, ops_for
from model.registry import SIZES, encoder_config

ENCODER_KEYS = ("patch_embed.", "cls_token", "pos_embed", "blocks.")
POOLS = ("avg", "token")


def classifier_names() -> list[str]:
    """``vit_<size>_patch<p>`` for every size of the registry."""
    return list(SIZES)


class ViTClassifier(nn.Module):
    """``reference_ops``: on the fused backend, operations that run the reference implementation (model/ops.py)."""

    def __init__(self, cfg: ModelConfig, num_classes: int, global_pool: str = "avg", drop_path: float = 0.0,
                 linear_probe: bool = False, reference_ops: Collection[str] = ()):
        super().__init__()
        if global_pool not in POOLS:
            raise ValueError(f"global_pool must be one of {POOLS}, got {global_pool!r}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if not 0.0 <= drop_path < 1.0:
            raise ValueError(f"drop_path must be in [0, 1), got {drop_path}")
        self.cfg, self.global_pool, self.linear_probe = cfg, global_pool, linear_probe
        C = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, C)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, C))
        # Fine-tuning trains the position table (initialised to the fixed sin-cos one, as MAE does).
        self.pos_embed = nn.Parameter(sincos_pos_table(C, cfg.grid_size)[None])
        rates = torch.linspace(0, drop_path, cfg.depth).tolist()  # stochastic depth grows with depth
        ops = ops_for(cfg.backend, reference_ops)
        self.blocks = nn.ModuleList(Block(C, cfg.num_heads, cfg.mlp_ratio, ops, drop_path=r) for r in rates)
        if global_pool == "avg":
            self.fc_norm = layer_norm(C)
        else:
            self.norm = layer_norm(C)
        linear = nn.Linear(C, num_classes)
        if linear_probe:
            self.head = nn.Sequential(nn.BatchNorm1d(C, affine=False, eps=1e-6), linear)
        else:
            self.head = linear
        init_vit_weights(self)
        nn.init.trunc_normal_(linear.weight, std=0.01 if linear_probe else 2e-5)  # MAE's head initialisations

    def forward_tokens(self, imgs: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> every token (B, 1 + L, C) after the blocks, and after the final ``norm`` with
        token pooling: what timm's ``forward_features`` returns for the same weights."""
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:]
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        _, x = run_blocks(self.blocks, x)
        return x if self.global_pool == "avg" else self.norm(x)

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> pooled features (B, C) (timm's pre-logits)."""
        x = self.forward_tokens(imgs)
        if self.global_pool == "avg":
            return self.fc_norm(x[:, 1:].mean(dim=1))
        return x[:, 0]

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(imgs))

    def layer_id(self, name: str) -> int:
        """0 for the embeddings, i + 1 for block i, depth + 1 for the norms and the head."""
        if name.startswith(("cls_token", "pos_embed", "patch_embed")):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return self.cfg.depth + 1


def create_classifier(name: str, num_classes: int, global_pool: str = "avg", drop_path: float = 0.0,
                      linear_probe: bool = False, img_size: int | None = None, patch_size: int | None = None,
                      backend: str | None = None, reference_ops: Collection[str] = ()) -> ViTClassifier:
    """A classifier with the encoder of ``vit_<size>_patch<p>`` (or of any pre-training model name)."""
    overrides = {"backend": check_backend(backend or default_backend())}
    if img_size is not None:
        overrides["img_size"] = img_size
    if patch_size is not None:
        overrides["patch_size"] = patch_size
    cfg = encoder_config(name, **overrides)
    return ViTClassifier(cfg, num_classes, global_pool, drop_path, linear_probe, reference_ops)


def load_encoder(model: ViTClassifier, checkpoint: Mapping) -> list[str]:
    """Load a pre-trained encoder (our pre-training checkpoint, or the authors' released CrossMAE /
    MAE file, loaded) into a classifier; the head, and the pooling norm unless the checkpoint has a
    matching ``norm``, stay freshly initialised. Every encoder parameter must be present with its
    shape, else KeyError / ValueError naming the keys, and nothing is copied. Returns the names of
    the checkpoint entries that were not used (the decoder's)."""
    entry = model_entry(checkpoint)
    own = model.state_dict()
    wanted = [k for k in own if k.startswith(ENCODER_KEYS)]
    if model.global_pool == "token" and "norm.weight" in entry:
        wanted += ["norm.weight", "norm.bias"]
    missing = [k for k in wanted if k not in entry]
    if missing:
        raise KeyError(f"checkpoint lacks encoder entries {short_list(missing)}: is it a pre-training checkpoint of "
                       f"the same size ({model.cfg.embed_dim} wide, {model.cfg.depth} blocks)?")
    misshapen = [f"{k}: checkpoint {tuple(entry[k].shape)} vs model {tuple(own[k].shape)}"
                 for k in wanted if not isinstance(entry[k], torch.Tensor) or entry[k].shape != own[k].shape]
    if misshapen:
        raise ValueError(f"checkpoint entries with the wrong shape: {short_list(misshapen)} (image size and patch size "
                         "must match the pre-training run's)")
    with torch.no_grad():
        for k in wanted:
            own[k].copy_(entry[k])
    return sorted(set(entry) - set(wanted))
