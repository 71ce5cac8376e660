"""Transformer building blocks shared by the encoder, the CrossMAE decoder, the MAE decoder and the classifier.

Module and parameter names follow the authors' checkpoints (``attn.qkv``, ``cross_attn.kv``,
``mlp.fc1``...), so that ``load_official`` is a plain, fully checked state-dict copy.

Every module takes the model's operations at construction (a ``model.ops.ModelOps``: ``ops_for(backend)``,
one object shared by all the modules of a model) and calls them; ``model/ops.py`` is the only place that
knows both paths.

Blocks work on a residual stream whose last addition is left pending: a block returns ``(x, branch)``
with its output being ``x + branch``, and the next block adds ``branch`` inside its first LayerNorm
(``ops.add_layer_norm``), so that on the fused path each residual add costs no pass of its own.
``run_blocks`` drives a stack of them. The numbers are the same as ``x = x + f(norm(x))`` block by block.
"""

from __future__ import annotations

import torch
from torch import nn

from model.ops import ModelOps

LN_EPS = 1e-6


def layer_norm(dim: int) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=LN_EPS)


class Mlp(nn.Module):
    fp32_parameters = ("fc1.bias",)  # the fused path adds it inside its bias + GELU kernel, in fp32

    def __init__(self, dim: int, hidden: int, ops: ModelOps):
        super().__init__()
        self.ops = ops
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.mlp(x, self.fc1, self.fc2)  # fc2(gelu(fc1(x))), exact (erf) GELU


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

    def __init__(self, dim: int, num_heads: int, ops: ModelOps):
        super().__init__()
        self.num_heads = num_heads
        self.ops = ops
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, C // self.num_heads)
        return self.proj(self.ops.self_attention(qkv).reshape(B, N, C))


class CrossAttention(nn.Module):
    """Queries from the decoder (width D), keys and values from encoder features (width C_enc).

    The kv projection maps encoder width to decoder width: there is no separate decoder embedding.
    """

    def __init__(self, encoder_dim: int, dim: int, num_heads: int, ops: ModelOps):
        super().__init__()
        self.num_heads = num_heads
        self.ops = ops
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(encoder_dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        """x: (B, Nq, D) normalised queries; kv: (B, Nk, 2D), this block's projected keys and values
        (computed up front for all blocks by the decoder: they depend on the encoder only)."""
        B, Nq, D = x.shape
        H, d = self.num_heads, D // self.num_heads
        out = self.ops.cross_attention(self.q(x).view(B, Nq, H, d), kv.view(B, kv.shape[1], 2, H, d))
        return self.proj(out.reshape(B, Nq, D))


class Block(nn.Module):
    """Pre-norm ViT block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, ops: ModelOps, drop_path: float = 0.0):
        super().__init__()
        self.ops = ops
        self.norm1 = layer_norm(dim)
        self.attn = Attention(dim, num_heads, ops)
        self.norm2 = layer_norm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), ops)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, pending: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The block on the input ``x + pending``. Returns (input, x, branch): the input, materialised,
        and the output as ``x + branch`` with that last addition left to the caller."""
        inp, y = self.ops.add_layer_norm(x, pending, self.norm1)
        x, y = self.ops.add_layer_norm(inp, self.drop_path(self.attn(y)), self.norm2)
        return inp, x, self.drop_path(self.mlp(y))


class CrossAttentionBlock(nn.Module):
    """CrossMAE decoder block: [x + SelfAttn(LN0(x))], x + CrossAttn(LN1(x), kv), x + MLP(LN2(x))."""

    def __init__(self, encoder_dim: int, dim: int, num_heads: int, mlp_ratio: float, ops: ModelOps,
                 self_attn: bool = False):
        super().__init__()
        self.ops = ops
        if self_attn:
            self.norm0 = layer_norm(dim)
            self.self_attn = Attention(dim, num_heads, ops)
        else:
            self.norm0 = self.self_attn = None
        self.norm1 = layer_norm(dim)
        self.cross_attn = CrossAttention(encoder_dim, dim, num_heads, ops)
        self.norm2 = layer_norm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), ops)

    def forward(self, x: torch.Tensor, pending: torch.Tensor | None, kv: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """The block on ``x + pending`` with keys/values ``kv``; returns (x, branch), the output being
        ``x + branch`` (see ``Block``)."""
        if self.self_attn is not None:
            x, y = self.ops.add_layer_norm(x, pending, self.norm0)
            pending = self.self_attn(y)
        x, y = self.ops.add_layer_norm(x, pending, self.norm1)
        x, y = self.ops.add_layer_norm(x, self.cross_attn(y, kv), self.norm2)
        return x, self.mlp(y)


def run_blocks(blocks: nn.ModuleList, x: torch.Tensor, keep: tuple[int, ...] = (),
               final_norm: nn.LayerNorm | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Run ``blocks`` (``Block``s) on ``x``. Returns (features, out): the outputs of the blocks whose indices
    are in ``keep`` (ascending; -1 names the input ``x``), and the last block's output, passed through
    ``final_norm`` when one is given (its residual add then fuses with it)."""
    ops = blocks[0].ops
    features, pending = [], None
    for i, blk in enumerate(blocks):
        inp, x, pending = blk(x, pending)
        if i - 1 in keep:
            features.append(inp)  # block i's input is block i - 1's output
    if final_norm is not None:
        x, out = ops.add_layer_norm(x, pending, final_norm)
    else:
        x = out = ops.add(x, pending)
    if len(blocks) - 1 in keep:
        features.append(x)
    return features, out


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
