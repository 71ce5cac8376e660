"""Plain PyTorch references for every op in `kernels/`: same signatures, layouts and output dtypes.

They define the semantics the Triton kernels are tested against, serve as the benchmarks' baselines, and are
the fallback when Triton cannot run (CPU tensors without TRITON_INTERPRET=1). They are written for clarity:
they compute in fp32 and materialise intermediates. Autograd of these functions is the gradient reference.
"""

import math

import torch
import torch.nn.functional as F


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v per (batch, head) in fp32. q (B, Lq, H, d), k / v (B, Lk, H, d) -> (B, Lq, H, d)."""
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * scale
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v.float())
    return out.to(q.dtype).contiguous()


def self_attention_reference(qkv: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """attention_reference on the slices of a packed qkv (B, N, 3, H, d) -> (B, N, H, d)."""
    return attention_reference(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], scale)


def cross_attention_reference(q: torch.Tensor, kv: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """attention_reference of q (B, Nq, H, d) over a packed kv (B, Nk, 2, H, d) (keys, values) -> (B, Nq, H, d)."""
    return attention_reference(q, kv[:, :, 0], kv[:, :, 1], scale)


def feature_mix_layernorm_reference(
    feats: torch.Tensor,
    weight: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float = 1e-6,
) -> torch.Tensor:
    """out[j] = LayerNorm_j(sum_i weight[j, i] * feats[i]) in fp32.

    feats (k, N, C), weight (depth, k), ln_weight / ln_bias (depth, C) -> (depth, N, C) in feats.dtype.
    """
    mixed = torch.einsum("jk,knc->jnc", weight.float(), feats.float())
    normed = F.layer_norm(mixed, (mixed.shape[-1],), eps=eps)
    out = normed * ln_weight.float()[:, None, :] + ln_bias.float()[:, None, :]
    return out.to(feats.dtype)


def layer_norm_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm over the last dimension in fp32: x (..., C), weight / bias (C,) -> shaped like x, in x.dtype."""
    normed = F.layer_norm(x.float(), (x.shape[-1],), weight.float(), bias.float(), eps)
    return normed.to(x.dtype)


def add_layer_norm_reference(
    x: torch.Tensor,
    branch: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """h = x + branch added in fp32 and stored in x.dtype; y = layer_norm_reference(h). Returns (h, y)."""
    h = (x.float() + branch.float()).to(x.dtype)
    return h, layer_norm_reference(h, weight, bias, eps)


def bias_gelu_reference(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """gelu(x + bias) with the exact (erf) GELU, in fp32. x (..., N), bias (N,) -> x's shape, x.dtype."""
    return F.gelu(x.float() + bias.float()).to(x.dtype)


def mse_loss_reference(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean((pred - target)**2) in fp32 over all elements: a 0-dim fp32 tensor. pred, target of one shape."""
    return (pred.float() - target.float()).pow(2).mean()


def gather_rows_reference(table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """out[b, t] = table[ids[b, t]]. table (L, D), ids (B, n) -> (B, n, D)."""
    return table[ids]


def patchify_reference(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, c, H, W) -> (B, L, p*p*c) in patch layout (h, w, p, q, c): rows, then columns, then channel."""
    B, c, H, W = imgs.shape
    p = patch_size
    x = imgs.reshape(B, c, H // p, p, W // p, p)
    x = x.permute(0, 2, 4, 3, 5, 1)  # (B, h, w, p, q, c)
    return x.reshape(B, (H // p) * (W // p), p * p * c)


def unpatchify_reference(patches: torch.Tensor, img_size: tuple[int, int], patch_size: int) -> torch.Tensor:
    """Inverse of patchify_reference: (B, L, p*p*c) -> (B, c, H, W)."""
    B, _, P = patches.shape
    H, W = img_size
    p = patch_size
    c = P // (p * p)
    x = patches.reshape(B, H // p, W // p, p, p, c)
    x = x.permute(0, 5, 1, 3, 2, 4)  # (B, c, h, p, w, q)
    return x.reshape(B, c, H, W)


def gather_target_patches_reference(
    imgs: torch.Tensor,
    ids: torch.Tensor,
    patch_size: int,
    norm_pix: bool = True,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Patches of imgs at ids, optionally normalised per patch by mean and unbiased variance.

    imgs (B, c, H, W), ids (B, n) -> targets (B, n, p*p*c) in imgs.dtype, mean and var (B, n, 1) fp32
    (statistics of the raw patch, returned whether or not norm_pix is set). No gradient.
    """
    with torch.no_grad():
        patches = patchify_reference(imgs, patch_size).float()
        target = torch.gather(patches, 1, ids[..., None].expand(-1, -1, patches.shape[-1]))
        mean, var = patch_stats_reference(target)
        if norm_pix:
            target = (target - mean) / (var + eps) ** 0.5
        return target.to(imgs.dtype), mean, var


def patch_stats_reference(patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-patch mean and unbiased variance over the last dim, keepdim."""
    return patches.mean(dim=-1, keepdim=True), patches.var(dim=-1, keepdim=True, unbiased=True)


def normalize_patches_reference(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Norm-pix targets, the authors' expression: each patch by its own mean and unbiased variance,
    (t - mean) / (var + eps) ** 0.5."""
    mean, var = patch_stats_reference(patches)
    return (patches - mean) / (var + eps) ** 0.5


def denormalize_patches_reference(pred: torch.Tensor, target_patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Undo ``normalize_patches_reference`` on predictions, with the statistics of the true patches."""
    mean, var = patch_stats_reference(target_patches)
    return pred * (var + eps) ** 0.5 + mean


def gather_patches_reference(imgs: torch.Tensor, ids: torch.Tensor, patch_size: int) -> torch.Tensor:
    """The raw patches of imgs (B, c, H, W) at ids (B, n): (B, n, p*p*c) in imgs.dtype, layout (h, w, p, q, c).

    Differentiable in imgs (autograd scatter-adds the patch gradients, duplicate ids included).
    """
    patches = patchify_reference(imgs, patch_size)
    return torch.gather(patches, 1, ids[..., None].expand(-1, -1, patches.shape[-1]))


def scatter_patches_reference(
    patches: torch.Tensor,
    ids: torch.Tensor,
    img_size: int | tuple[int, int],
    patch_size: int,
    base: torch.Tensor | None = None,
) -> torch.Tensor:
    """Paste patches (B, n, p*p*c) at patch indices ids (B, n) into an image (B, c, H, W).

    On top of `base` (B, c, H, W) if given, else zeros. ids must be distinct within each row here (with duplicate
    ids torch.scatter picks an unspecified winner; the Triton op keeps the last one).
    """
    if isinstance(img_size, int):
        img_size = (img_size, img_size)
    B, _, P = patches.shape
    p = patch_size
    c = P // (p * p)
    if base is None:
        base = patches.new_zeros((B, c, *img_size))
    base_patches = patchify_reference(base, p).to(patches.dtype)
    pasted = base_patches.scatter(1, ids[..., None].expand(-1, -1, P), patches)
    return unpatchify_reference(pasted, img_size, p)
