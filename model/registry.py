"""Named model sizes: ``create_model(name, **overrides)`` and ``list_models()``.

S/B/L/H follow SPEC.md's table (decoder head dim 32 throughout). The ``tiny`` pair is ours: a small
ViT on 64-pixel crops with 8-pixel patches, sized for the CPU demo run of ``train.pretrain``.
"""

from __future__ import annotations

from model.autoencoders import MAE, CrossMAE
from model.config import ModelConfig
from model.ops import default_backend

#            size: (patch, enc dim, depth, heads, dec dim, dec heads)
_SIZES = {
    "small": (16, 384, 12, 6, 256, 8),
    "base": (16, 768, 12, 12, 512, 16),
    "large": (16, 1024, 24, 16, 512, 16),
    "huge": (14, 1280, 32, 16, 512, 16),
}
CROSSMAE_DECODER_DEPTH = 12  # the paper's and the released models'
MAE_DECODER_DEPTH = 8


def _configs() -> dict[str, ModelConfig]:
    configs = {}
    for family, decoder_depth in (("crossmae", CROSSMAE_DECODER_DEPTH), ("mae", MAE_DECODER_DEPTH)):
        for size, (patch, dim, depth, heads, ddim, dheads) in _SIZES.items():
            configs[f"{family}_vit_{size}_patch{patch}"] = ModelConfig(
                family=family, patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads,
                decoder_embed_dim=ddim, decoder_num_heads=dheads, decoder_depth=decoder_depth,
                inter_block=family == "crossmae",
                kept_mask_ratio=0.25 if family == "crossmae" else 0.75,
            )
        configs[f"{family}_vit_tiny_patch8"] = ModelConfig(
            family=family, img_size=64, patch_size=8, embed_dim=192, depth=6, num_heads=3,
            decoder_embed_dim=128, decoder_num_heads=4, decoder_depth=4,
            inter_block=family == "crossmae", kept_mask_ratio=0.25 if family == "crossmae" else 0.75,
        )
    return configs


CONFIGS = _configs()


def list_models() -> list[str]:
    return list(CONFIGS)


def get_config(name: str, **overrides) -> ModelConfig:
    """The validated configuration ``create_model(name, **overrides)`` would build."""
    if name not in CONFIGS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(CONFIGS)}")
    overrides.setdefault("backend", default_backend())
    return CONFIGS[name].with_overrides(**overrides)


def create_model(name: str, **overrides) -> CrossMAE | MAE:
    """Build a model by name; keyword overrides as in ``ModelConfig`` (bad values raise ValueError)."""
    cfg = get_config(name, **overrides)
    return CrossMAE(cfg) if cfg.family == "crossmae" else MAE(cfg)
