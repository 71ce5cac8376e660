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
from collections.abc import Collection

import torch
from torch import nn

from kernels.reference import denormalize_patches_reference
from model.config import ModelConfig
from model.layers import Block, CrossAttentionBlock, init_vit_weights, layer_norm, run_blocks, sincos_pos_table
from model.masking import MaskSplit, gather_tokens, split_ids
from model.ops import ops_for


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
    (``patch_embed``, ``cls_token``, ``pos_embed``, ``blocks``), as in the released checkpoints.

    ``reference_ops``: operations of ``model.ops.ModelOps`` that run the reference implementation on the fused
    backend (``model.ops.ops_for``). Every module of the model calls the one ops object made here."""

    def __init__(self, cfg: ModelConfig, reference_ops: Collection[str] = ()):
        super().__init__()
        self.cfg = cfg
        self.ops = ops_for(cfg.backend, reference_ops)
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, cfg.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        # Fixed, never trained: a buffer, so it gets no gradient and no optimizer state.
        self.register_buffer("pos_embed", sincos_pos_table(cfg.embed_dim, cfg.grid_size)[None])
        self.blocks = nn.ModuleList(
            Block(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio, self.ops) for _ in range(cfg.depth)
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

    def forward(self, imgs: torch.Tensor, noise: torch.Tensor | None = None) -> ModelOutput:
        """The training forward pass: loss, predictions, targets and ids (module docstring)."""
        return self.ops.with_compute_weights(self, self.loss_forward, imgs, noise)

    # -- encoder ----------------------------------------------------------------------------------

    def embed_visible(self, imgs: torch.Tensor, visible_ids: torch.Tensor) -> torch.Tensor:
        """Patch embedding + fixed position of the visible patches, cls prepended: (B, 1 + len_keep, C).

        The reference adds positions to all L patches and then gathers; gathering first gives the
        same numbers (the same elementwise sums) for a quarter of the additions.
        """
        x = self.ops.embed_patches(imgs, visible_ids, self.patch_embed)
        x = self.ops.stream(x + self.ops.gather_rows(self.pos_embed[0, 1:], visible_ids))
        # The cls token gets no position: the table's cls row is all zero.
        return torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)

    def encode(self, imgs: torch.Tensor, visible_ids: torch.Tensor, keep: tuple[int, ...],
               final_norm: nn.LayerNorm | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Run the encoder on the visible patches. Returns (features, out): the outputs of the blocks in
        ``keep`` (ascending; -1 names the encoder input) and the last block's output, through ``final_norm``
        if given. Blocks after the last one kept are not run (``keep`` must then name the last one run)."""
        x = self.embed_visible(imgs, visible_ids)
        n_run = max(keep) + 1
        if n_run == 0:  # IBA over the encoder input alone
            return [x], x
        return run_blocks(self.blocks[:n_run], x, keep, final_norm)

    # -- reconstruction and FLOPs -----------------------------------------------------------------

    def encoder_flops(self) -> int:
        """Forward FLOPs per image of the patch embedding (all L patches) and the encoder blocks."""
        cfg = self.cfg
        T, C = 1 + cfg.split.len_keep, cfg.embed_dim
        patch = 2 * cfg.num_patches * cfg.patch_dim * C
        return patch + self.blocks_run * block_flops(T, T, C, C, cfg.mlp_ratio, self_attn=True)

    @property
    def blocks_run(self) -> int:
        """Encoder blocks a forward pass runs: all of them (CrossMAE's IBA may stop earlier)."""
        return self.cfg.depth

    def _hidden_ids(self, noise: torch.Tensor) -> torch.Tensor:
        """Every patch the encoder does not see, ascending: (B, L - len_keep)."""
        return torch.argsort(noise, dim=1)[:, self.cfg.split.len_keep:].sort(dim=1).values

    def _reconstruction(self, imgs: torch.Tensor, pred: torch.Tensor, pred_ids: torch.Tensor,
                        visible_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        p, ops = self.cfg.patch_size, self.ops
        if self.cfg.norm_pix_loss:
            pred = denormalize_patches_reference(pred.float(), ops.target_patches(imgs, pred_ids, p, False))
        blank = torch.zeros_like(imgs)
        visible = ops.target_patches(imgs, visible_ids, p, False)
        masked = ops.paste_patches(visible, visible_ids, blank, p)
        return {
            "masked": masked,
            "reconstruction": ops.paste_patches(pred, pred_ids, blank, p),
            "pasted": ops.paste_patches(pred, pred_ids, masked, p),
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

    def __init__(self, cfg: ModelConfig, reference_ops: Collection[str] = ()):
        super().__init__(cfg, reference_ops)
        D = cfg.decoder_embed_dim
        if cfg.inter_block:
            self.dec_norms = nn.ModuleList(layer_norm(cfg.embed_dim) for _ in range(cfg.decoder_depth))
            self.wfm = FeatureMix(cfg.num_features, cfg.decoder_depth)
        else:
            self.norm = layer_norm(cfg.embed_dim)  # every block reads the last, normalised encoder output
        self.mask_token = nn.Parameter(torch.zeros(1, 1, D))
        self.register_buffer("decoder_pos_embed", sincos_pos_table(D, cfg.grid_size)[None])
        self.decoder_blocks = nn.ModuleList(
            CrossAttentionBlock(cfg.embed_dim, D, cfg.decoder_num_heads, cfg.mlp_ratio, self.ops,
                                self_attn=cfg.decoder_self_attn)
            for _ in range(cfg.decoder_depth)
        )
        self.decoder_norm = layer_norm(D)
        self.decoder_pred = nn.Linear(D, cfg.patch_dim)
        init_vit_weights(self)
        if cfg.inter_block:
            self.wfm.reset_parameters()

    @property
    def blocks_run(self) -> int:
        """Encoder blocks a forward pass runs: all, unless IBA reads only earlier ones."""
        cfg = self.cfg
        return max(cfg.feature_blocks, default=-1) + 1 if cfg.inter_block else cfg.depth

    def decoder_kv(self, imgs: torch.Tensor, visible_ids: torch.Tensor) -> list[torch.Tensor]:
        """Run the encoder; return every decoder block's projected keys and values, (B, 1 + len_keep, 2D)
        each: from the IBA mix of the candidate features, or from the last, normalised encoder output."""
        cfg = self.cfg
        kv_projections = [blk.cross_attn.kv for blk in self.decoder_blocks]
        if not cfg.inter_block:
            _, latent = self.encode(imgs, visible_ids, (cfg.depth - 1,), final_norm=self.norm)
            return self.ops.shared_kv(latent, kv_projections)
        features, _ = self.encode(imgs, visible_ids, ((-1,) if cfg.use_input else ()) + cfg.feature_blocks)
        return self.ops.mixed_kv(features, self.wfm.linear, self.dec_norms, kv_projections)

    def decode(self, kv: list[torch.Tensor], query_ids: torch.Tensor) -> torch.Tensor:
        """Predict the patches at ``query_ids`` (B, n): (B, n, p*p*3)."""
        x = self.ops.stream(self.ops.gather_rows(self.decoder_pos_embed[0, 1:], query_ids) + self.mask_token)
        pending = None
        for blk, kv_j in zip(self.decoder_blocks, kv, strict=True):
            x, pending = blk(x, pending, kv_j)
        _, y = self.ops.add_layer_norm(x, pending, self.decoder_norm)
        return self.decoder_pred(y)

    def loss_forward(self, imgs: torch.Tensor, noise: torch.Tensor | None) -> ModelOutput:
        noise = self.check_inputs(imgs, noise)
        visible_ids, pred_ids = split_ids(noise, self.split)
        pred = self.decode(self.decoder_kv(imgs, visible_ids), pred_ids)
        target = self.ops.target_patches(imgs, pred_ids, self.cfg.patch_size, self.cfg.norm_pix_loss)
        loss = self.ops.mse_loss(pred, target)
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
        pred = self.decode(self.decoder_kv(imgs, visible_ids), hidden_ids)
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

    No softmax and no bias. ``linear.weight`` (decoder_depth, k) keeps the checkpoint's key name; the
    mix itself is ``ops.mixed_kv``.
    """

    fp32_parameters = ("linear.weight",)  # the fused mix kernel reads W in fp32 (split into two halves)

    def __init__(self, num_features: int, decoder_depth: int):
        super().__init__()
        self.linear = nn.Linear(num_features, decoder_depth, bias=False)

    def reset_parameters(self) -> None:
        # SPEC: N(0, 1/sqrt(k)). (The authors' code draws this, then its model-wide xavier pass
        # redraws it uniformly with a nearly equal std: 0.283 against 0.277 for k = 13.)
        nn.init.normal_(self.linear.weight, std=1.0 / math.sqrt(self.linear.in_features))


class MAE(MaskedEncoder):
    """The MAE baseline: embed the visible tokens into the decoder width, append a mask token for
    every masked patch, restore patch order, add positions, self-attention decoder, predict all
    patches; the loss covers the masked ones."""

    def __init__(self, cfg: ModelConfig, reference_ops: Collection[str] = ()):
        super().__init__(cfg, reference_ops)
        D = cfg.decoder_embed_dim
        self.norm = layer_norm(cfg.embed_dim)
        self.decoder_embed = nn.Linear(cfg.embed_dim, D)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, D))
        self.register_buffer("decoder_pos_embed", sincos_pos_table(D, cfg.grid_size)[None])
        self.decoder_blocks = nn.ModuleList(
            Block(D, cfg.decoder_num_heads, cfg.mlp_ratio, self.ops) for _ in range(cfg.decoder_depth)
        )
        self.decoder_norm = layer_norm(D)
        self.decoder_pred = nn.Linear(D, cfg.patch_dim)
        init_vit_weights(self)

    def decode_all(self, imgs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Predictions for all L patches, in patch order: (B, L, p*p*3)."""
        len_keep = self.split.len_keep
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        _, latent = self.encode(imgs, ids_shuffle[:, :len_keep], (self.cfg.depth - 1,), final_norm=self.norm)
        x = self.decoder_embed(latent)
        B, _, D = x.shape
        # Shuffled order (visible, then masked), then restore patch order with a static gather.
        tokens = torch.cat([x[:, 1:], self.mask_token.to(x.dtype).expand(B, self.cfg.num_patches - len_keep, D)], 1)
        tokens = gather_tokens(tokens, ids_restore)
        x = self.ops.stream(torch.cat([x[:, :1], tokens], dim=1) + self.decoder_pos_embed)
        _, y = run_blocks(self.decoder_blocks, x, final_norm=self.decoder_norm)
        return self.decoder_pred(y)[:, 1:]

    def loss_forward(self, imgs: torch.Tensor, noise: torch.Tensor | None) -> ModelOutput:
        noise = self.check_inputs(imgs, noise)
        visible_ids, pred_ids = split_ids(noise, self.split)
        pred = gather_tokens(self.decode_all(imgs, noise), pred_ids)
        target = self.ops.target_patches(imgs, pred_ids, self.cfg.patch_size, self.cfg.norm_pix_loss)
        # The reference averages per-patch errors weighted by the mask; over the masked patches
        # alone this is the plain mean.
        loss = self.ops.mse_loss(pred, target)
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
