"""Transformer building blocks shared by the encoder, the CrossMAE decoder and the MAE decoder.

Module and parameter names follow the authors' checkpoints (``attn.qkv``, ``cross_attn.kv``,
``mlp.fc1``...), so that ``load_official`` is a plain, fully checked state-dict copy.

Every block takes a ``backend`` at construction ("torch" or "triton") and keeps it; the attention
call goes through ``model.ops.attention``, which is the only place that knows both paths.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model import ops

LN_EPS = 1e-6


def layer_norm(dim: int) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=LN_EPS)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU, as in the reference


class DropPath(nn.Module):
    """Stochastic depth per sample (fine-tuning only; pre-training uses rate 0)."""

    def __init__(self, rate: float = 0.0):
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rate == 0.0 or not self.training:
            return x
        keep = 1.0 - self.rate
        scale = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * scale / keep


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection."""

    def __init__(self, dim: int, num_heads: int, backend: str):
        super().__init__()
        self.num_heads = num_heads
        self.backend = backend
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, C // self.num_heads)
        out = ops.attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], self.backend)  # (B, N, H, d)
        return self.proj(out.reshape(B, N, C))


class CrossAttention(nn.Module):
    """Queries from the decoder (width D), keys and values from encoder features (width C_enc).

    The kv projection maps encoder width to decoder width: there is no separate decoder embedding.
    """

    def __init__(self, encoder_dim: int, dim: int, num_heads: int, backend: str):
        super().__init__()
        self.num_heads = num_heads
        self.backend = backend
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(encoder_dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        """x: (B, Nq, D) normalised queries; kv: (B, Nk, 2D), this block's projected keys and values
        (see ``CrossAttentionBlock.project_kv``)."""
        B, Nq, D = x.shape
        H, d = self.num_heads, D // self.num_heads
        q = self.q(x).view(B, Nq, H, d)
        kv = kv.view(B, kv.shape[1], 2, H, d)
        out = ops.attention(q, kv[:, :, 0], kv[:, :, 1], self.backend)
        return self.proj(out.reshape(B, Nq, D))


class Block(nn.Module):
    """Pre-norm ViT block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, backend: str, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = layer_norm(dim)
        self.attn = Attention(dim, num_heads, backend)
        self.norm2 = layer_norm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class CrossAttentionBlock(nn.Module):
    """CrossMAE decoder block: [x + SelfAttn(LN0(x))], x + CrossAttn(LN1(x), kv), x + MLP(LN2(x))."""

    def __init__(self, encoder_dim: int, dim: int, num_heads: int, mlp_ratio: float, backend: str,
                 self_attn: bool = False):
        super().__init__()
        if self_attn:
            self.norm0 = layer_norm(dim)
            self.self_attn = Attention(dim, num_heads, backend)
        else:
            self.norm0 = self.self_attn = None
        self.norm1 = layer_norm(dim)
        self.cross_attn = CrossAttention(encoder_dim, dim, num_heads, backend)
        self.norm2 = layer_norm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def project_kv(self, features: torch.Tensor) -> torch.Tensor:
        """Keys and values of this block from (B, Nk, C_enc) encoder features: (B, Nk, 2D).

        They depend on the encoder only, never on the queries, so the decoder may compute all
        blocks' projections up front (in one batched matmul on the fused path)."""
        return self.cross_attn.kv(features)

    def forward(self, x: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        if self.self_attn is not None:
            x = x + self.self_attn(self.norm0(x))
        x = x + self.cross_attn(self.norm1(x), kv)
        return x + self.mlp(self.norm2(x))


def init_vit_weights(model: nn.Module) -> None:
    """MAE's initialisation: xavier_uniform on every Linear and on the patch conv viewed as 2-D, zero
    biases, LayerNorm (1, 0), and N(0, 0.02) for the cls and mask tokens."""
    w = model.patch_embed.proj.weight
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    nn.init.zeros_(model.patch_embed.proj.bias)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    for name, p in model.named_parameters():
        if name in ("cls_token", "mask_token"):
            nn.init.normal_(p, std=0.02)


def sincos_pos_table(dim: int, grid_size: int, cls_row: bool = True) -> torch.Tensor:
    """MAE's fixed 2-D sin-cos position table, (grid_size**2 [+1], dim), float32.

    Patch n = row * grid_size + col. The first dim/2 channels encode the column, the last dim/2 the
    row; each half is [sin(pos * omega), cos(pos * omega)] with omega_i = 10000^(-i / (dim/4)).
    Computed in float64 and rounded once, like the reference. With ``cls_row`` an all-zero row for
    the cls token comes first.
    """
    if dim % 4 != 0:
        raise ValueError(f"embed dim must be divisible by 4 for the 2-D sin-cos table, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    coords = torch.arange(grid_size, dtype=torch.float64)
    row, col = torch.meshgrid(coords, coords, indexing="ij")

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega  # (L, dim/4)
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    table = torch.cat([encode(col), encode(row)], dim=1)
    if cls_row:
        table = torch.cat([table.new_zeros(1, dim), table], dim=0)
    return table.float()
