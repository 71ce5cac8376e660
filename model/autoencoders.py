"""CrossMAE and the MAE baseline, on one shared ViT encoder.

Read top to bottom: the encoder (``MaskedEncoder``), then CrossMAE (cross-attention decoder with
partial reconstruction and inter-block feature mixing), then MAE. SPEC.md section 1 is the
specification; comments point out where the authors' code behaves in a way that is easy to miss.

Forward contract (``../shared/API.md``): ``out = model(imgs, noise=None)`` returns a dict with
``loss``, ``pred`` (B, n_pred, p*p*3), ``target`` (same shape, after norm-pix), ``pred_ids``
(B, n_pred) in ascending patch order, and ``visible_ids`` (B, len_keep). The dict also allows
attribute access (``out.loss``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from model import ops
from model.config import ModelConfig
from model.layers import Block, CrossAttentionBlock, init_vit_weights, layer_norm, sincos_pos_table
from model.masking import (
    MaskSplit,
    denormalize_patches,
    gather_tokens,
    split_ids,
)


class ModelOutput(dict):
    """A dict whose entries can also be read as attributes (``out.loss``)."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        return self.proj(imgs).flatten(2).transpose(1, 2)  # (B, L, C)


class MaskedEncoder(nn.Module):
    """The ViT encoder shared by both families; its parameters sit at the top level of the model
    (``patch_embed``, ``cls_token``, ``pos_embed``, ``blocks``), as in the released checkpoints."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, cfg.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        # Fixed, never trained: a buffer, so it gets no gradient and no optimizer state.
        self.register_buffer("pos_embed", sincos_pos_table(cfg.embed_dim, cfg.grid_size)[None])
        self.blocks = nn.ModuleList(
            Block(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio, cfg.backend) for _ in range(cfg.depth)
        )

    # -- public helpers ---------------------------------------------------------------------------

    @property
    def split(self) -> MaskSplit:
        return self.cfg.split

    def draw_noise(self, imgs: torch.Tensor) -> torch.Tensor:
        return torch.rand(imgs.shape[0], self.cfg.num_patches, device=imgs.device)

    def check_inputs(self, imgs: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        cfg = self.cfg
        expected = (cfg.in_chans, cfg.img_size, cfg.img_size)
        if imgs.ndim != 4 or tuple(imgs.shape[1:]) != expected:
            raise ValueError(f"imgs must have shape (B, {', '.join(map(str, expected))}), got {tuple(imgs.shape)}")
        if noise is None:
            return self.draw_noise(imgs)
        if tuple(noise.shape) != (imgs.shape[0], cfg.num_patches):
            raise ValueError(f"noise must have shape (B, L) = ({imgs.shape[0]}, {cfg.num_patches}), "
                             f"got {tuple(noise.shape)}")
        return noise

    # -- encoder ----------------------------------------------------------------------------------

    def embed_visible(self, imgs: torch.Tensor, visible_ids: torch.Tensor) -> torch.Tensor:
        """Patch embedding + fixed position of the visible patches, cls prepended: (B, 1 + len_keep, C).

        The reference adds positions to all L patches and then gathers; gathering first gives the
        same numbers (the same elementwise sums) for a quarter of the additions.
        """
        if self.cfg.backend == "triton":
            # Embed only the visible patches: gather their pixels, then the conv as a matmul (a quarter
            # of the patch-embedding work at mask ratio 0.75).
            pixels = ops.target_patches(imgs, visible_ids, self.cfg.patch_size, False, "triton")
            w = self.patch_embed.proj.weight  # (C, c, p, q) -> (C, p*q*c), the pixel layout of `pixels`
            x = F.linear(pixels, w.permute(0, 2, 3, 1).reshape(w.shape[0], -1), self.patch_embed.proj.bias)
        else:
            x = gather_tokens(self.patch_embed(imgs), visible_ids)
        x = x + ops.gather_rows(self.pos_embed[0, 1:], visible_ids, self.cfg.backend)
        # The cls token gets no position: the table's cls row is all zero.
        return torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)

    def encode(self, imgs: torch.Tensor, visible_ids: torch.Tensor, keep: tuple[int, ...]) -> list[torch.Tensor]:
        """Run the encoder on the visible patches; return the outputs of the blocks in ``keep``
        (ascending; -1 names the encoder input). Blocks after the last one kept are not run."""
        x = self.embed_visible(imgs, visible_ids)
        features = [x] if -1 in keep else []
        for i in range(max(keep) + 1):
            x = self.blocks[i](x)
            if i in keep:
                features.append(x)
        return features

    # -- reconstruction and FLOPs -----------------------------------------------------------------

    def encoder_flops(self) -> int:
        """Forward FLOPs per image of the patch embedding (all L patches) and the encoder blocks."""
        cfg = self.cfg
        T, C = 1 + cfg.split.len_keep, cfg.embed_dim
        patch = 2 * cfg.num_patches * cfg.patch_dim * C
        return patch + self.blocks_run * block_flops(T, T, C, C, cfg.mlp_ratio, self_attn=True)

    @property
    def blocks_run(self) -> int:
        """Encoder blocks a forward pass runs: all, unless IBA reads only earlier ones."""
        cfg = self.cfg
        if cfg.family == "crossmae" and cfg.inter_block:
            return max(cfg.feature_blocks, default=-1) + 1
        return cfg.depth

    def _hidden_ids(self, noise: torch.Tensor) -> torch.Tensor:
        """Every patch the encoder does not see, ascending: (B, L - len_keep)."""
        return torch.argsort(noise, dim=1)[:, self.cfg.split.len_keep:].sort(dim=1).values

    def _reconstruction(self, imgs: torch.Tensor, pred: torch.Tensor, pred_ids: torch.Tensor,
                        visible_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        p, backend = self.cfg.patch_size, self.cfg.backend
        if self.cfg.norm_pix_loss:
            pred = denormalize_patches(pred.float(), ops.target_patches(imgs, pred_ids, p, False, backend))
        blank = torch.zeros_like(imgs)
        visible = ops.target_patches(imgs, visible_ids, p, False, backend)
        masked = ops.paste_patches(visible, visible_ids, blank, p, backend)
        return {
            "masked": masked,
            "reconstruction": ops.paste_patches(pred, pred_ids, blank, p, backend),
            "pasted": ops.paste_patches(pred, pred_ids, masked, p, backend),
        }


def block_flops(n_q: int, n_k: int, dim: int, kv_dim: int, mlp_ratio: float, self_attn: bool) -> int:
    """Forward FLOPs (2 per multiply-add) of one pre-norm block on n_q tokens attending to n_k.

    Self-attention: qkv, scores, weighted sum, proj, MLP. Cross-attention: q from the queries, kv from
    n_k encoder tokens of width kv_dim.
    """
    qkv = 2 * n_q * dim * 3 * dim if self_attn else 2 * n_q * dim * dim + 2 * n_k * kv_dim * 2 * dim
    attn = 2 * 2 * n_q * n_k * dim
    proj = 2 * n_q * dim * dim
    mlp = 2 * 2 * n_q * dim * int(dim * mlp_ratio)
    return qkv + attn + proj + mlp


class CrossMAE(MaskedEncoder):
    """CrossMAE: the decoder reconstructs only ``n_pred`` patches, each query (position + mask token)
    cross-attending to encoder features, never to the other queries (unless ``decoder_self_attn``)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        D = cfg.decoder_embed_dim
        if cfg.inter_block:
            self.dec_norms = nn.ModuleList(layer_norm(cfg.embed_dim) for _ in range(cfg.decoder_depth))
            self.wfm = FeatureMix(cfg.num_features, cfg.decoder_depth)
        else:
            self.norm = layer_norm(cfg.embed_dim)  # every block reads the last, normalised encoder output
        self.mask_token = nn.Parameter(torch.zeros(1, 1, D))
        self.register_buffer("decoder_pos_embed", sincos_pos_table(D, cfg.grid_size)[None])
        self.decoder_blocks = nn.ModuleList(
            CrossAttentionBlock(cfg.embed_dim, D, cfg.decoder_num_heads, cfg.mlp_ratio, cfg.backend,
                                self_attn=cfg.decoder_self_attn)
            for _ in range(cfg.decoder_depth)
        )
        self.decoder_norm = layer_norm(D)
        self.decoder_pred = nn.Linear(D, cfg.patch_dim)
        init_vit_weights(self)
        if cfg.inter_block:
            self.wfm.reset_parameters()

    def features(self, imgs: torch.Tensor, visible_ids: torch.Tensor) -> list[torch.Tensor]:
        """The encoder features the decoder reads: the IBA candidates, or just the last output."""
        cfg = self.cfg
        if not cfg.inter_block:
            return self.encode(imgs, visible_ids, (cfg.depth - 1,))
        return self.encode(imgs, visible_ids, ((-1,) if cfg.use_input else ()) + cfg.feature_blocks)

    def decoder_kv(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """Every decoder block's projected keys and values, (B, 1 + len_keep, 2D) each."""
        if self.cfg.backend == "triton":
            return self._decoder_kv_fused(features)
        if self.cfg.inter_block:
            mixed = self.wfm(features)  # (depth, B, T, C)
            return [blk.project_kv(norm(mixed[j]))
                    for j, (blk, norm) in enumerate(zip(self.decoder_blocks, self.dec_norms, strict=True))]
        y = self.norm(features[-1])
        return [blk.project_kv(y) for blk in self.decoder_blocks]

    def _decoder_kv_fused(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """The fused path: the IBA mix and its per-block LayerNorms in one kernel, then all blocks'
        kv projections as one batched matmul (without IBA: one matmul against the stacked weights)."""
        import kernels

        B, T, C = features[0].shape
        kv_weight = torch.stack([blk.cross_attn.kv.weight for blk in self.decoder_blocks])  # (depth, 2D, C)
        kv_bias = torch.stack([blk.cross_attn.kv.bias for blk in self.decoder_blocks])  # (depth, 2D)
        depth, two_d = kv_bias.shape
        if self.cfg.inter_block:
            dtype = ops.autocast_dtype(features[0])
            stacked = torch.stack([f.to(dtype) for f in features]).view(len(features), B * T, C)
            mixed = kernels.feature_mix_layernorm(
                stacked, self.wfm.linear.weight, torch.stack([n.weight for n in self.dec_norms]),
                torch.stack([n.bias for n in self.dec_norms]), eps=self.dec_norms[0].eps)  # (depth, B*T, C)
            kv = torch.baddbmm(kv_bias.unsqueeze(1), mixed, kv_weight.transpose(1, 2))  # (depth, B*T, 2D)
            return list(kv.view(depth, B, T, two_d).unbind(0))
        y = self.norm(features[-1])
        kv = F.linear(y, kv_weight.reshape(depth * two_d, C), kv_bias.reshape(-1)).view(B, T, depth, two_d)
        return list(kv.unbind(2))

    def decode(self, kv: list[torch.Tensor], query_ids: torch.Tensor) -> torch.Tensor:
        """Predict the patches at ``query_ids`` (B, n): (B, n, p*p*3)."""
        x = ops.gather_rows(self.decoder_pos_embed[0, 1:], query_ids, self.cfg.backend) + self.mask_token
        for blk, kv_j in zip(self.decoder_blocks, kv, strict=True):
            x = blk(x, kv_j)
        return self.decoder_pred(self.decoder_norm(x))

    def forward(self, imgs: torch.Tensor, noise: torch.Tensor | None = None) -> ModelOutput:
        noise = self.check_inputs(imgs, noise)
        visible_ids, pred_ids = split_ids(noise, self.split)
        pred = self.decode(self.decoder_kv(self.features(imgs, visible_ids)), pred_ids)
        target = ops.target_patches(imgs, pred_ids, self.cfg.patch_size, self.cfg.norm_pix_loss, self.cfg.backend)
        loss = (pred.float() - target).pow(2).mean()
        return ModelOutput(loss=loss, pred=pred, target=target, pred_ids=pred_ids, visible_ids=visible_ids)

    @torch.no_grad()
    def reconstruct(self, imgs: torch.Tensor, noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Images for visualisation, each (B, 3, H, W) in the input's normalised space: ``masked``
        (visible patches only), ``reconstruction`` (predicted patches only), ``pasted`` (visible
        patches of the input, predictions elsewhere).

        Queries are independent of each other, so every hidden patch is decoded here, not only the
        ``n_pred`` that training scores; with ``decoder_self_attn`` the queries interact and the
        predictions depend on how many are decoded together.
        """
        noise = self.check_inputs(imgs, noise)
        visible_ids, _ = split_ids(noise, self.split)
        hidden_ids = self._hidden_ids(noise)
        pred = self.decode(self.decoder_kv(self.features(imgs, visible_ids)), hidden_ids)
        return self._reconstruction(imgs, pred, hidden_ids, visible_ids)

    def flops_per_image(self, training: bool = True) -> int:
        """Matmul FLOPs per image (forward; x3 with ``training`` for forward + backward)."""
        cfg = self.cfg
        T, N, D, C = 1 + cfg.split.len_keep, cfg.split.n_pred, cfg.decoder_embed_dim, cfg.embed_dim
        per_block = block_flops(N, T, D, C, cfg.mlp_ratio, self_attn=False)
        if cfg.decoder_self_attn:
            per_block += 2 * N * D * 3 * D + 2 * 2 * N * N * D + 2 * N * D * D
        mix = 2 * cfg.decoder_depth * cfg.num_features * T * C if cfg.inter_block else 0
        total = self.encoder_flops() + mix + cfg.decoder_depth * per_block + 2 * N * D * cfg.patch_dim
        return 3 * total if training else total


class FeatureMix(nn.Module):
    """Inter-block attention's learned linear mix: decoder block j reads sum_i W[j, i] * f_i.

    No softmax and no bias. ``linear.weight`` (decoder_depth, k) keeps the checkpoint's key name.
    """

    def __init__(self, num_features: int, decoder_depth: int):
        super().__init__()
        self.linear = nn.Linear(num_features, decoder_depth, bias=False)

    def reset_parameters(self) -> None:
        # SPEC: N(0, 1/sqrt(k)). (The authors' code draws this, then its model-wide xavier pass
        # redraws it uniformly with a nearly equal std: 0.283 against 0.277 for k = 13.)
        nn.init.normal_(self.linear.weight, std=1.0 / math.sqrt(self.linear.in_features))

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        """k maps of (B, T, C) -> (decoder_depth, B, T, C), one matmul over the stacked maps."""
        stacked = torch.stack(features)  # (k, B, T, C)
        k = stacked.shape[0]
        weight = self.linear.weight.to(stacked.dtype)
        return (weight @ stacked.view(k, -1)).view(-1, *stacked.shape[1:])


class MAE(MaskedEncoder):
    """The MAE baseline: embed the visible tokens into the decoder width, append a mask token for
    every masked patch, restore patch order, add positions, self-attention decoder, predict all
    patches; the loss covers the masked ones."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        D = cfg.decoder_embed_dim
        self.norm = layer_norm(cfg.embed_dim)
        self.decoder_embed = nn.Linear(cfg.embed_dim, D)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, D))
        self.register_buffer("decoder_pos_embed", sincos_pos_table(D, cfg.grid_size)[None])
        self.decoder_blocks = nn.ModuleList(
            Block(D, cfg.decoder_num_heads, cfg.mlp_ratio, cfg.backend) for _ in range(cfg.decoder_depth)
        )
        self.decoder_norm = layer_norm(D)
        self.decoder_pred = nn.Linear(D, cfg.patch_dim)
        init_vit_weights(self)

    def decode_all(self, imgs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Predictions for all L patches, in patch order: (B, L, p*p*3)."""
        len_keep = self.split.len_keep
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        latent = self.norm(self.encode(imgs, ids_shuffle[:, :len_keep], (self.cfg.depth - 1,))[0])
        x = self.decoder_embed(latent)
        B, _, D = x.shape
        # Shuffled order (visible, then masked), then restore patch order with a static gather.
        tokens = torch.cat([x[:, 1:], self.mask_token.to(x.dtype).expand(B, self.cfg.num_patches - len_keep, D)], 1)
        tokens = gather_tokens(tokens, ids_restore)
        x = torch.cat([x[:, :1], tokens], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def forward(self, imgs: torch.Tensor, noise: torch.Tensor | None = None) -> ModelOutput:
        noise = self.check_inputs(imgs, noise)
        visible_ids, pred_ids = split_ids(noise, self.split)
        pred = gather_tokens(self.decode_all(imgs, noise), pred_ids)
        target = ops.target_patches(imgs, pred_ids, self.cfg.patch_size, self.cfg.norm_pix_loss, self.cfg.backend)
        # The reference averages per-patch errors weighted by the mask; over the masked patches
        # alone this is the plain mean.
        loss = (pred.float() - target).pow(2).mean()
        return ModelOutput(loss=loss, pred=pred, target=target, pred_ids=pred_ids, visible_ids=visible_ids)

    @torch.no_grad()
    def reconstruct(self, imgs: torch.Tensor, noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """As ``CrossMAE.reconstruct``: ``masked``, ``reconstruction``, ``pasted`` images."""
        noise = self.check_inputs(imgs, noise)
        visible_ids, pred_ids = split_ids(noise, self.split)
        pred = gather_tokens(self.decode_all(imgs, noise), pred_ids)
        return self._reconstruction(imgs, pred, pred_ids, visible_ids)

    def flops_per_image(self, training: bool = True) -> int:
        cfg = self.cfg
        T, L1, D = 1 + cfg.split.len_keep, cfg.num_patches + 1, cfg.decoder_embed_dim
        total = (self.encoder_flops() + 2 * T * cfg.embed_dim * D
                 + cfg.decoder_depth * block_flops(L1, L1, D, D, cfg.mlp_ratio, self_attn=True)
                 + 2 * L1 * D * cfg.patch_dim)
        return 3 * total if training else total
