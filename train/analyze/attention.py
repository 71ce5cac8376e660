"""Where the decoder's queries look: attention split by key type, per decoder block, and CrossMAE's mixing weights.

MAE (a self-attention decoder over cls + all L patch tokens). Queries: the mask tokens (the hidden patches' rows).
Per decoder block, the softmax weight a query puts on each key type, summed over the keys of that type: the
visible tokens, the mask tokens (the query's own key among them), the cls token; averaged over heads, queries and
images. These ``mass`` values sum to 1 per block. Also:

- ``per_key``: each mass divided by the number of keys of that type (ViT-B/16 at 224, mask ratio 0.75: 49 visible,
  147 mask, 1 cls): the weight an average key of that type receives from one query;
- ``vs_uniform``: ``per_key`` times the number of keys (1 + L): 1 is what uniform attention would give.

Totals over blocks are sums (masses then sum to the number of blocks); means over blocks are given beside them.

CrossMAE (a cross-attention decoder whose keys are the cls token and the visible tokens of each block's mixed
encoder features, ``CrossMAE.decoder_kv``). Queries: the patches the model is trained to predict (``pred_ids``).
The same three numbers for the two key types, cls and patches; and the inter-block mixing weights W
(``FeatureMix``, decoder_depth x k): row j says how decoder block j's keys and values mix the encoder input and
the encoder blocks' outputs. With ``decoder_self_attn`` the queries' self-attention is not analysed.

How (the reference path, on any backend's model): the model runs its training forward pass with forward hooks on
every decoder block's attention module. A hook captures the module's inputs (the normalised query stream; for
cross-attention also the block's projected keys and values) and recomputes the probabilities in fp32 from the
block's own q / k projection weights: softmax(q k^T / sqrt(d)) written out, never the fused kernels or SDPA.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

from model import family_of
from model.autoencoders import MaskedEncoder
from model.layers import Attention, CrossAttention

KEY_TYPES = {"mae": ("visible", "mask", "cls"), "crossmae": ("cls", "patches")}


# -- probabilities, from the blocks' own weights ---------------------------------------------------------------

def softmax_weights(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """q (B, H, Nq, d), k (B, H, Nk, d) -> softmax(q k^T / sqrt(d)) over the keys, fp32 (B, H, Nq, Nk)."""
    q, k = q.float(), k.float()
    return torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, dim=-1)


def self_attention_weights(attn: Attention, y: torch.Tensor) -> torch.Tensor:
    """The attention probabilities of ``attn`` on its (normalised) input y (B, N, C): (B, H, N, N)."""
    B, N, C = y.shape
    H = attn.num_heads
    qkv = F.linear(y.float(), attn.qkv.weight.float(), attn.qkv.bias.float()).view(B, N, 3, H, C // H)
    return softmax_weights(qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2))


def cross_attention_weights(cross: CrossAttention, x: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
    """The attention probabilities of ``cross`` for its normalised queries x (B, Nq, D) on its block's projected
    keys/values kv (B, Nk, 2D) (keys first): (B, H, Nq, Nk)."""
    B, Nq, D = x.shape
    H = cross.num_heads
    q = F.linear(x.float(), cross.q.weight.float(), cross.q.bias.float()).view(B, Nq, H, D // H)
    k = kv.float().view(B, kv.shape[1], 2, H, D // H)[:, :, 0]
    return softmax_weights(q.transpose(1, 2), k.transpose(1, 2))


# -- key types ---------------------------------------------------------------------------------------------------

def mae_key_types(noise: torch.Tensor, len_keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For MAE's decoder sequence (cls, then the L patches in patch order): (one-hot key types (B, 1 + L, 3) in
    ``KEY_TYPES["mae"]`` order, query rows (B, 1 + L) bool: the mask tokens)."""
    B = noise.shape[0]
    shuffle_rank = torch.argsort(torch.argsort(noise, dim=1), dim=1)  # a patch's place in the shuffle
    hidden = shuffle_rank >= len_keep
    types = torch.cat([torch.full((B, 1), 2, device=noise.device), hidden.long()], dim=1)
    rows = torch.cat([torch.zeros(B, 1, dtype=torch.bool, device=noise.device), hidden], dim=1)
    return F.one_hot(types, 3).float(), rows


def crossmae_key_types(batch: int, n_keys: int, device: torch.device) -> torch.Tensor:
    """For CrossMAE's keys (cls, then the visible tokens): one-hot types (B, n_keys, 2), ``KEY_TYPES["crossmae"]``."""
    types = torch.ones(batch, n_keys, dtype=torch.long, device=device)
    types[:, 0] = 0
    return F.one_hot(types, 2).float()


class KeyMassTally:
    """Per decoder block, the head-averaged attention mass on each key type summed over the queries seen."""

    def __init__(self, depth: int, num_types: int):
        self.sums = torch.zeros(depth, num_types, dtype=torch.float64)
        self.queries = torch.zeros(depth, dtype=torch.float64)

    def add(self, block: int, weights: torch.Tensor, key_types: torch.Tensor,
            query_rows: torch.Tensor | None = None) -> None:
        """weights (B, H, Nq, Nk); key_types (B, Nk, T) one-hot; query_rows (B, Nq) bool (None: every row)."""
        per_query = weights.mean(dim=1) @ key_types  # (B, Nq, T)
        per_query = per_query[query_rows] if query_rows is not None else per_query.flatten(0, 1)
        self.sums[block] += per_query.double().sum(dim=0).cpu()
        self.queries[block] += per_query.shape[0]

    def masses(self) -> torch.Tensor:
        """(depth, T): the mean over queries (and images) of each block's mass per key type."""
        if not bool((self.queries > 0).all()):
            raise ValueError("no query was seen: no image was analysed")
        return self.sums / self.queries[:, None]


# -- the analysis ------------------------------------------------------------------------------------------------

@torch.no_grad()
def measure_attention(model: MaskedEncoder, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """Run ``model`` (eval mode) on ``batches`` of (images, masking noise) and return the analysis (module
    docstring) as plain values: ``blocks`` (one entry per decoder block), ``total_over_blocks``,
    ``mean_over_blocks``, the key and query counts, and for CrossMAE ``feature_mix``."""
    cfg = model.cfg
    cross = family_of(cfg).cross_attention
    family = "crossmae" if cross else "mae"
    types = KEY_TYPES[family]
    tally = KeyMassTally(cfg.decoder_depth, len(types))
    current: dict[str, torch.Tensor | None] = {}

    def hook_for(block: int):
        def hook(module, args, output):
            if cross:
                weights = cross_attention_weights(module, args[0], args[1])
                key_types = crossmae_key_types(weights.shape[0], weights.shape[-1], weights.device)
                tally.add(block, weights, key_types)
            else:
                tally.add(block, self_attention_weights(module, args[0]), current["key_types"], current["rows"])
        return hook

    modules = [blk.cross_attn if cross else blk.attn for blk in model.decoder_blocks]
    handles = [m.register_forward_hook(hook_for(j)) for j, m in enumerate(modules)]
    images = 0
    try:
        for imgs, noise in batches:
            if not cross:
                current["key_types"], current["rows"] = mae_key_types(noise, cfg.split.len_keep)
            model(imgs, noise)
            images += imgs.shape[0]
    finally:
        for h in handles:
            h.remove()
    masses = tally.masses()
    split = cfg.split
    if cross:
        keys = {"cls": 1, "patches": split.len_keep}
        queries = split.n_pred
    else:
        keys = {"visible": split.len_keep, "mask": cfg.num_patches - split.len_keep, "cls": 1}
        queries = cfg.num_patches - split.len_keep
    result = {"family": family, "images": images, "queries_per_image": queries, "keys": keys,
              "path": "reference: softmax(q k^T / sqrt(d)) in fp32 from each decoder block's own q/k weights and "
                      "its inputs captured by forward hooks",
              **summarise(masses, types, keys)}
    if cross:
        result["feature_mix"] = feature_mix(model)
        if cfg.decoder_self_attn:
            result["note"] = "decoder_self_attn: the queries' self-attention is not analysed, only cross-attention"
    return result


def summarise(masses: torch.Tensor, types: tuple[str, ...], keys: dict[str, int]) -> dict:
    """Per block and over blocks: ``mass``, ``per_key`` and ``vs_uniform`` for each key type."""
    n_keys = sum(keys.values())
    counts = torch.tensor([float(keys[t]) for t in types], dtype=torch.float64)

    def views(mass: torch.Tensor) -> dict[str, dict[str, float]]:
        per_key = mass / counts
        return {"mass": dict(zip(types, mass.tolist(), strict=True)),
                "per_key": dict(zip(types, per_key.tolist(), strict=True)),
                "vs_uniform": dict(zip(types, (per_key * n_keys).tolist(), strict=True))}

    return {"blocks": [{"block": j, **views(m)} for j, m in enumerate(masses)],
            "total_over_blocks": views(masses.sum(dim=0)),
            "mean_over_blocks": views(masses.mean(dim=0))}


def feature_mix(model: MaskedEncoder) -> dict | None:
    """CrossMAE's inter-block mixing weights W (decoder_depth, k), the name of each candidate feature map, and for
    each decoder block the candidate of largest |W|; None without inter-block mixing (every block then reads the
    last encoder block, normalised)."""
    cfg = model.cfg
    if not cfg.inter_block:
        return None
    names = (["input"] if cfg.use_input else []) + [f"block {i}" for i in cfg.feature_blocks]
    W = model.wfm.linear.weight.detach().float().cpu()
    return {"candidates": names, "W": W.tolist(),
            "strongest": [names[i] for i in W.abs().argmax(dim=1).tolist()]}
