"""Model families and named sizes: ``create_model(name, **overrides)``, ``list_models()``, ``family_of(...)``.

``FAMILIES`` is the one place that tells CrossMAE and MAE apart: each family's autoencoder class, its defaults
and which arguments apply to it. A model name is ``<family>_<size>`` (``crossmae_vit_base_patch16``); S/B/L/H
follow SPEC.md's table (decoder head dim 32 throughout). The ``tiny`` size is ours: a small ViT on 64-pixel
crops with 8-pixel patches, sized for the CPU demo run of ``train.pretrain``.

A new family: its autoencoder class (model/autoencoders.py or a file of its own) and one ``Family`` entry here.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, replace
from typing import NamedTuple

from model.autoencoders import MAE, CrossMAE, MaskedEncoder
from model.config import ModelConfig
from model.ops import default_backend, resolve_backend


@dataclass(frozen=True)
class Family:
    """What a model family is made of and which arguments apply to it."""

    name: str
    autoencoder: type[MaskedEncoder]
    decoder_depth: int  # the default (the paper's and the released models')
    # Whether the decoder predicts only kept_mask_ratio of all patches (CrossMAE's partial reconstruction);
    # without it every masked patch is predicted and kept_mask_ratio always equals mask_ratio (MAE).
    partial_prediction: bool
    kept_mask_ratio: float  # the default
    # Whether the decoder cross-attends to encoder features, so that inter_block (IBA) and decoder_self_attn
    # apply; without it (MAE) both are off.
    cross_attention: bool
    inter_block: bool  # the default

    def configure(self, cfg: ModelConfig, **overrides) -> ModelConfig:
        """``cfg`` (of this family) with ``overrides``, validated, the family's rules applied."""
        if not self.partial_prediction:
            kept = overrides.pop("kept_mask_ratio", None)
            mask = overrides.get("mask_ratio", cfg.mask_ratio)
            if kept is not None and kept != mask:
                raise ValueError(f"kept_mask_ratio={kept} applies to {_families_with('partial_prediction')} only: "
                                 f"{self.name} predicts every masked patch, so it must equal mask_ratio={mask} or "
                                 "be left out")
            overrides["kept_mask_ratio"] = mask
        return self.check(cfg.with_overrides(**overrides))

    def check(self, cfg: ModelConfig) -> ModelConfig:
        """``cfg`` if it keeps this family's rules, else ValueError naming the argument."""
        if cfg.family != self.name:
            raise ValueError(f"a {cfg.family!r} configuration given to the {self.name!r} family")
        if not self.cross_attention:
            for name in ("inter_block", "decoder_self_attn"):
                if getattr(cfg, name):
                    raise ValueError(f"{name}=True applies to {_families_with('cross_attention')} only (a decoder "
                                     f"that cross-attends to the encoder); {self.name} decodes with self-attention")
        if not self.partial_prediction and cfg.kept_mask_ratio != cfg.mask_ratio:
            raise ValueError(f"kept_mask_ratio={cfg.kept_mask_ratio} must equal mask_ratio={cfg.mask_ratio} for "
                             f"{self.name}, which predicts every masked patch")
        return cfg


def _families_with(trait: str) -> str:
    return ", ".join(f.name for f in FAMILIES.values() if getattr(f, trait))


FAMILIES: dict[str, Family] = {
    "crossmae": Family("crossmae", CrossMAE, decoder_depth=12, partial_prediction=True, kept_mask_ratio=0.25,
                       cross_attention=True, inter_block=True),
    "mae": Family("mae", MAE, decoder_depth=8, partial_prediction=False, kept_mask_ratio=0.75,
                  cross_attention=False, inter_block=False),
}


class Size(NamedTuple):
    patch: int
    embed_dim: int
    depth: int
    num_heads: int
    decoder_embed_dim: int
    decoder_num_heads: int
    img_size: int = 224
    decoder_depth: int | None = None  # None: the family's


# The encoder sizes, by the name a classifier (model/classifier.py) is built from; the tiny one last.
SIZES = {
    "vit_small_patch16": Size(16, 384, 12, 6, 256, 8),
    "vit_base_patch16": Size(16, 768, 12, 12, 512, 16),
    "vit_large_patch16": Size(16, 1024, 24, 16, 512, 16),
    "vit_huge_patch14": Size(14, 1280, 32, 16, 512, 16),
    "vit_tiny_patch8": Size(8, 192, 6, 3, 128, 4, img_size=64, decoder_depth=4),
}


def _config(family: Family, size: Size) -> ModelConfig:
    return ModelConfig(
        family=family.name, img_size=size.img_size, patch_size=size.patch, embed_dim=size.embed_dim,
        depth=size.depth, num_heads=size.num_heads, decoder_embed_dim=size.decoder_embed_dim,
        decoder_num_heads=size.decoder_num_heads,
        decoder_depth=family.decoder_depth if size.decoder_depth is None else size.decoder_depth,
        inter_block=family.inter_block, kept_mask_ratio=family.kept_mask_ratio,
    )


CONFIGS = {f"{family.name}_{size_name}": _config(family, size)
           for family in FAMILIES.values() for size_name, size in SIZES.items()}


def list_models() -> list[str]:
    return list(CONFIGS)


def family_of(name_or_cfg: str | ModelConfig) -> Family:
    """The family of a configuration, of a model name (``mae_vit_base_patch16``) or the family named."""
    name = name_or_cfg.family if isinstance(name_or_cfg, ModelConfig) else name_or_cfg
    if name in CONFIGS:
        name = CONFIGS[name].family
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}: families are {', '.join(FAMILIES)}, models "
                         f"{', '.join(CONFIGS)}")
    return FAMILIES[name]


def get_config(name: str, **overrides) -> ModelConfig:
    """The validated configuration ``create_model(name, **overrides)`` would build."""
    if name not in CONFIGS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(CONFIGS)}")
    overrides.setdefault("backend", default_backend())
    return family_of(name).configure(CONFIGS[name], **overrides)


def encoder_config(name: str, **overrides) -> ModelConfig:
    """The configuration of the encoder ``name``: a size of ``SIZES`` (``vit_base_patch16``; its CrossMAE
    configuration, whose encoder every family shares) or any model name."""
    key = name if name in CONFIGS else f"crossmae_{name}"
    if key not in CONFIGS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(SIZES)} (or any pre-training model name)")
    return get_config(key, **overrides)


def build_model(cfg: ModelConfig, reference_ops: Collection[str] = ()) -> MaskedEncoder:
    """The autoencoder of ``cfg``'s family (``reference_ops``: see ``model.ops.ops_for``). ``cfg.backend`` "auto"
    is resolved here to the reference path: only a training run checks the fused path on its card (its shapes,
    precision and compile setting; train/backend_check.py) and then builds with "triton" and the ops it found
    failing. The model's ``cfg`` holds the backend it runs."""
    family = family_of(cfg)
    if cfg.backend == "auto":
        backend, _ = resolve_backend("auto")
        cfg = replace(cfg, backend=backend)
    return family.autoencoder(family.check(cfg.validated()), reference_ops)


def create_model(name: str, *, reference_ops: Collection[str] = (), **overrides) -> CrossMAE | MAE:
    """Build a model by name; keyword overrides as in ``ModelConfig`` (bad values raise ValueError; ``backend``
    defaults to "auto", see ``build_model``). ``reference_ops``: on the fused backend, operations that run the
    reference implementation (``model.ops``)."""
    return build_model(get_config(name, **overrides), reference_ops)
