"""Compute and parameters per image, encoder and decoder apart, for any model configuration (no weights needed).

MACs are the models' own FLOP counts halved (``flops_per_image``, ``encoder_flops`` and ``block_flops`` in
model/autoencoders.py: matmuls only, forward, 2 FLOPs per multiply-add; no LayerNorm, softmax, GELU or adds).
What the paper counts (SPEC.md section 3: ViT-B at 224, mask ratio 0.75) is reproduced by:

- decoder = everything after the encoder: MAE's decoder embedding (50 tokens), its blocks on all 1 + L tokens
  and its prediction head on all 1 + L tokens -> 5.37 GMACs; CrossMAE's inter-block mix (k maps of 50 tokens per
  decoder block), its blocks (q on the n_pred queries, kv on the 50 keys, attention, MLP) and its prediction head
  on the n_pred queries -> 2.07 (gamma 0.25) and 5.25 (gamma 0.75). Without the head MAE gives 5.30 and without
  the mix CrossMAE gives 2.06 and 5.24, so the paper counts both;
- encoder = its blocks on 1 + len_keep tokens plus the patch embedding of the len_keep visible patches ->
  4.32. ``encoder_flops`` counts the embedding of all L patches (what the reference path runs: it embeds every
  patch, then gathers the visible ones) -> 4.41; the fused path embeds only the visible ones, as the paper
  counts.

Parameters: the encoder's are the patch embedding, cls token, blocks and, where the model has one, the final
encoder LayerNorm (``norm``: MAE, CrossMAE without inter-block mixing); the decoder's are all the others (mask
token, mixing weights and their LayerNorms, blocks, head). The fixed sin-cos position tables are buffers, not
parameters.
"""

from __future__ import annotations

import torch

from model import build_model, get_config
from model.autoencoders import MaskedEncoder, block_flops
from train.analyze.loading import ModelSpec

ENCODER_PARAMETERS = ("patch_embed", "cls_token", "blocks", "norm")

# SPEC.md section 3 (the paper's Table 4 and text): ViT-B, 224 px, mask ratio 0.75, released decoder depths;
# (model name, kept_mask_ratio) -> GMACs per image (encoder, decoder) and parameters in millions (encoder, decoder).
PAPER = {
    ("mae_vit_base_patch16", 0.75): {"encoder_gmacs": 4.32, "decoder_gmacs": 5.37, "encoder_params_m": 85.6},
    ("crossmae_vit_base_patch16", 0.25): {"encoder_gmacs": 4.32, "decoder_gmacs": 2.07, "encoder_params_m": 85.6,
                                          "decoder_params_m": 41.4},
    ("crossmae_vit_base_patch16", 0.75): {"encoder_gmacs": 4.32, "decoder_gmacs": 5.25, "encoder_params_m": 85.6,
                                          "decoder_params_m": 41.4},
}
PAPER_SPECS = tuple(PAPER)


def paper_spec(name: str, kept_mask_ratio: float) -> ModelSpec:
    """One of the paper's configurations (``PAPER``) as the registry builds it."""
    return ModelSpec(name, get_config(name, kept_mask_ratio=kept_mask_ratio, backend="torch"), "registry")


def paper_figures(spec: ModelSpec) -> dict[str, float] | None:
    """The paper's figures for ``spec`` when it is exactly one of its configurations, else None."""
    key = (spec.name, spec.cfg.kept_mask_ratio)
    if key not in PAPER:
        return None
    reference = get_config(spec.name, kept_mask_ratio=spec.cfg.kept_mask_ratio, backend=spec.cfg.backend)
    return PAPER[key] if spec.cfg == reference else None


def count_cost(model: MaskedEncoder) -> dict[str, float | int]:
    """GMACs per image (forward) and parameters of ``model``, encoder and decoder apart (module docstring)."""
    cfg = model.cfg
    split, C = cfg.split, cfg.embed_dim
    encoder_blocks = model.blocks_run * block_flops(1 + split.len_keep, 1 + split.len_keep, C, C, cfg.mlp_ratio,
                                                    self_attn=True)
    visible_embedding = 2 * split.len_keep * cfg.patch_dim * C
    total = model.flops_per_image(training=False)
    decoder = total - model.encoder_flops()
    params = {"encoder": 0, "decoder": 0}
    for name, p in model.named_parameters():
        params["encoder" if name.split(".")[0] in ENCODER_PARAMETERS else "decoder"] += p.numel()
    return {
        "encoder_gmacs": (encoder_blocks + visible_embedding) / 2e9,
        "encoder_gmacs_all_patches_embedded": model.encoder_flops() / 2e9,
        "decoder_gmacs": decoder / 2e9,
        "total_gmacs": (encoder_blocks + visible_embedding + decoder) / 2e9,
        "encoder_params": params["encoder"], "decoder_params": params["decoder"],
        "encoder_params_m": params["encoder"] / 1e6, "decoder_params_m": params["decoder"] / 1e6,
        "encoder_blocks_run": model.blocks_run, "visible_tokens": split.len_keep, "predicted_tokens": split.n_pred,
    }


def measure_cost(specs: list[ModelSpec]) -> dict:
    """One row per configuration: its cost (``count_cost``, on a model built on the meta device: no memory, no
    weights) and, where it is one of the paper's, the paper's figures and whether ours round to them."""
    rows = []
    for spec in specs:
        with torch.device("meta"):
            model = build_model(spec.cfg)
        row = {"model": spec.name, "kept_mask_ratio": spec.cfg.kept_mask_ratio, "mask_ratio": spec.cfg.mask_ratio,
               "img_size": spec.cfg.img_size, "decoder_depth": spec.cfg.decoder_depth,
               "inter_block": spec.cfg.inter_block, "source": spec.source, **count_cost(model)}
        paper = paper_figures(spec)
        if paper is not None:
            row["paper"] = paper
            row["matches_paper"] = all(round(row[k], 1 if k.endswith("params_m") else 2) == v
                                       for k, v in paper.items())
        rows.append(row)
    return {"unit": "GMACs per image, forward (FLOPs / 2); parameters", "rows": rows}
