"""An independent, literal transcription of SPEC.md section 1, used only by the tests.

It works from a state dict with the official key names, written the way the specification reads
(and the way the authors' code computes): positions added to all patches before masking, explicit
softmax attention, IBA as a linear layer over a (B, T, C, k) stack, queries and targets picked
with a boolean mask in patch order, MAE's mask-weighted loss. Slow and data-dependent on purpose:
it shares no code with ``model/`` beyond the layer names.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-6


def _ln(x, sd, name):
    return F.layer_norm(x, x.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"], eps=EPS)


def _linear(x, sd, name):
    return x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]


def _heads(x, h):
    B, N, C = x.shape
    return x.reshape(B, N, h, C // h).permute(0, 2, 1, 3)


def _softmax_attention(q, k, v):
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    out = scores.softmax(dim=-1) @ v
    B, h, N, d = out.shape
    return out.permute(0, 2, 1, 3).reshape(B, N, h * d)


def _self_attention(x, sd, name, heads):
    B, N, C = x.shape
    qkv = _linear(x, sd, f"{name}.qkv").reshape(B, N, 3, C)
    out = _softmax_attention(*(_heads(qkv[:, :, i], heads) for i in range(3)))
    return _linear(out, sd, f"{name}.proj")


def _mlp(x, sd, name):
    return _linear(F.gelu(_linear(x, sd, f"{name}.fc1")), sd, f"{name}.fc2")


def _vit_block(x, sd, name, heads):
    x = x + _self_attention(_ln(x, sd, f"{name}.norm1"), sd, f"{name}.attn", heads)
    return x + _mlp(_ln(x, sd, f"{name}.norm2"), sd, f"{name}.mlp")


def _patchify(imgs, p):
    B, C, H, W = imgs.shape
    x = imgs.reshape(B, C, H // p, p, W // p, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(B, (H // p) * (W // p), p * p * C)


def _norm_pix(t):
    mean = t.mean(dim=-1, keepdim=True)
    var = t.var(dim=-1, keepdim=True)
    return (t - mean) / (var + EPS) ** 0.5


def _encoder(sd, cfg, imgs, noise, kept_mask_ratio):
    """Returns (list of block outputs with the input first, mask (B, L) 1 = predicted, ids_restore)."""
    p = cfg.patch_size
    x = F.conv2d(imgs, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=p)
    x = x.flatten(2).transpose(1, 2) + sd["pos_embed"][:, 1:]
    B, L, C = x.shape
    len_keep = int(L * (1 - cfg.mask_ratio))
    len_masked = int(L * (cfg.mask_ratio - kept_mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    x = torch.gather(x, 1, ids_shuffle[:, :len_keep, None].repeat(1, 1, C))
    mask = torch.ones(B, L)
    mask[:, : len_keep + len_masked] = 0
    mask = torch.gather(mask, 1, ids_restore)
    x = torch.cat([sd["cls_token"].expand(B, -1, -1), x], dim=1)
    outputs = [x]
    for i in range(cfg.depth):
        x = _vit_block(x, sd, f"blocks.{i}", cfg.num_heads)
        outputs.append(x)
    return outputs, mask, ids_restore


def crossmae_forward(sd, cfg, imgs, noise):
    """(loss, pred (B, n_pred, p*p*3) in ascending patch order, target) per SPEC.md."""
    outputs, mask, _ = _encoder(sd, cfg, imgs, noise, cfg.kept_mask_ratio)
    B = mask.shape[0]
    D = cfg.decoder_embed_dim
    sel = mask.bool()
    x = sd["decoder_pos_embed"][:, 1:].expand(B, -1, -1)[sel].reshape(B, -1, D) + sd["mask_token"]
    if cfg.inter_block:
        blocks = cfg.feature_layers if cfg.feature_layers is not None else range(cfg.depth)
        candidates = ([outputs[0]] if cfg.use_input else []) + [outputs[1 + (i % cfg.depth)] for i in sorted(
            i % cfg.depth for i in blocks)]
        stacked = torch.stack(candidates, dim=-1)  # (B, T, C, k)
        mixed = stacked @ sd["wfm.linear.weight"].T  # (B, T, C, depth)
        kv_inputs = [_ln(mixed[..., j], sd, f"dec_norms.{j}") for j in range(cfg.decoder_depth)]
    else:
        y = _ln(outputs[-1], sd, "norm")
        kv_inputs = [y] * cfg.decoder_depth
    h = cfg.decoder_num_heads
    for j in range(cfg.decoder_depth):
        name = f"decoder_blocks.{j}"
        if cfg.decoder_self_attn:
            x = x + _self_attention(_ln(x, sd, f"{name}.norm0"), sd, f"{name}.self_attn", h)
        q = _linear(_ln(x, sd, f"{name}.norm1"), sd, f"{name}.cross_attn.q")
        kv = _linear(kv_inputs[j], sd, f"{name}.cross_attn.kv")
        k, v = kv[..., :D], kv[..., D:]
        attn = _softmax_attention(_heads(q, h), _heads(k, h), _heads(v, h))
        x = x + _linear(attn, sd, f"{name}.cross_attn.proj")
        x = x + _mlp(_ln(x, sd, f"{name}.norm2"), sd, f"{name}.mlp")
    pred = _linear(_ln(x, sd, "decoder_norm"), sd, "decoder_pred")
    target = _patchify(imgs, cfg.patch_size)[sel].reshape(B, -1, pred.shape[-1])
    if cfg.norm_pix_loss:
        target = _norm_pix(target)
    return ((pred - target) ** 2).mean(), pred, target


def mae_forward(sd, cfg, imgs, noise):
    """(loss, pred of the masked patches in ascending order, target) per SPEC.md's MAE baseline."""
    outputs, mask, ids_restore = _encoder(sd, cfg, imgs, noise, cfg.mask_ratio)
    x = _linear(_ln(outputs[-1], sd, "norm"), sd, "decoder_embed")
    B, T, D = x.shape
    L = ids_restore.shape[1]
    tokens = torch.cat([x[:, 1:], sd["mask_token"].repeat(B, L + 1 - T, 1)], dim=1)
    tokens = torch.gather(tokens, 1, ids_restore[..., None].repeat(1, 1, D))
    x = torch.cat([x[:, :1], tokens], dim=1) + sd["decoder_pos_embed"]
    for j in range(cfg.decoder_depth):
        x = _vit_block(x, sd, f"decoder_blocks.{j}", cfg.decoder_num_heads)
    pred = _linear(_ln(x, sd, "decoder_norm"), sd, "decoder_pred")[:, 1:]
    target = _patchify(imgs, cfg.patch_size)
    if cfg.norm_pix_loss:
        target = _norm_pix(target)
    per_patch = ((pred - target) ** 2).mean(dim=-1)
    loss = (per_patch * mask).sum() / mask.sum()
    sel = mask.bool()
    return loss, pred[sel].reshape(B, -1, pred.shape[-1]), target[sel].reshape(B, -1, pred.shape[-1])
