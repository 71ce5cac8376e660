"""One frozen configuration for both families, and its validation.

What depends on the family (its defaults, which arguments apply to it) is ``model.registry.FAMILIES``';
``model.registry.get_config`` applies both.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from model.masking import MaskSplit, check_ratios
from model.ops import check_backend


@dataclass(frozen=True)
class ModelConfig:
    family: str  # a name of model.registry.FAMILIES: "crossmae" or "mae"
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    decoder_embed_dim: int = 512
    decoder_depth: int = 12
    decoder_num_heads: int = 16
    mlp_ratio: float = 4.0
    mask_ratio: float = 0.75
    # CrossMAE's prediction ratio gamma, a fraction of ALL patches; MAE predicts every masked patch,
    # so for MAE it is always equal to mask_ratio.
    kept_mask_ratio: float = 0.25
    inter_block: bool = True  # CrossMAE: inter-block feature mixing (IBA); MAE: always off
    use_input: bool = True  # IBA: the encoder input is one of the candidate features
    feature_layers: tuple[int, ...] | None = None  # IBA: encoder block indices (negative from the end); None = all
    decoder_self_attn: bool = False  # CrossMAE ablation: self-attention among the queries
    norm_pix_loss: bool = True
    backend: str = "torch"

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def patch_dim(self) -> int:
        return self.patch_size**2 * self.in_chans

    @property
    def split(self) -> MaskSplit:
        return MaskSplit.from_ratios(self.num_patches, self.mask_ratio, self.kept_mask_ratio)

    @property
    def feature_blocks(self) -> tuple[int, ...]:
        """The encoder blocks whose outputs feed the IBA mix, as non-negative, ascending indices."""
        if self.feature_layers is None:
            return tuple(range(self.depth))
        return tuple(sorted(i % self.depth for i in self.feature_layers))

    @property
    def num_features(self) -> int:
        """k, the number of IBA candidate feature maps."""
        return len(self.feature_blocks) + int(self.use_input)

    def with_overrides(self, **overrides) -> ModelConfig:
        """This configuration with ``overrides`` (field names, the family excepted), validated. The family's own
        rules (e.g. MAE's kept_mask_ratio follows mask_ratio) are ``model.registry.get_config``'s."""
        known = {f.name for f in fields(self)} - {"family"}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown model argument(s) {unknown}; allowed: {sorted(known)}")
        if "feature_layers" in overrides and overrides["feature_layers"] is not None:
            overrides["feature_layers"] = tuple(int(i) for i in overrides["feature_layers"])
        return replace(self, **overrides).validated()

    def validated(self) -> ModelConfig:
        """Self, if every field is in range (the family's name and rules are checked by model.registry)."""
        for name in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads",
                     "decoder_embed_dim", "decoder_depth", "decoder_num_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size={self.img_size} must be a multiple of patch_size={self.patch_size}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim={self.embed_dim} must be divisible by num_heads={self.num_heads}")
        if self.decoder_embed_dim % self.decoder_num_heads:
            raise ValueError(f"decoder_embed_dim={self.decoder_embed_dim} must be divisible by "
                             f"decoder_num_heads={self.decoder_num_heads}")
        for name in ("embed_dim", "decoder_embed_dim"):
            if getattr(self, name) % 4:
                raise ValueError(f"{name}={getattr(self, name)} must be divisible by 4 (2-D sin-cos positions)")
        if not self.mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be > 0, got {self.mlp_ratio}")
        check_ratios(self.num_patches, self.mask_ratio, self.kept_mask_ratio)
        if self.feature_layers is not None:
            bad = [i for i in self.feature_layers if not -self.depth <= i < self.depth]
            if bad:
                raise ValueError(f"feature_layers entries must be in [-{self.depth}, {self.depth}) "
                                 f"(encoder depth {self.depth}), got {bad}")
            if len(set(self.feature_blocks)) != len(self.feature_layers):
                raise ValueError(f"feature_layers names a block twice: {self.feature_layers}")
        if self.inter_block and self.num_features == 0:
            raise ValueError("inter-block mixing needs at least one feature: give feature_layers or use_input=True")
        check_backend(self.backend)
        return self
