"""ViT encoders in timm's ``VisionTransformer`` layout: the key mapping both ways, every key checked.

Our encoder's parameter names are the authors', and those are timm's (``cls_token``, ``pos_embed``,
``patch_embed.proj``, ``blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``), so the tensors
themselves cross unchanged. Three things differ, and this module is where they are handled:

- The position table. The pre-training encoder's is a fixed sin-cos buffer whose cls row is zero, and
  the cls token gets no position; timm's ``pos_embed`` (1, 1 + L, C) includes a cls row that timm adds
  to the cls token. Exporting our table as is (zero row) gives timm the same sums. Importing timm
  weights into a pre-training encoder folds timm's cls row into ``cls_token`` and zeroes the row, so the
  encoder computes exactly what timm's does; a classifier keeps timm's table as is (it adds the row).
- The final norm. timm's class-token layout has ``norm`` on every token; its average-pooled layout
  (``global_pool="avg"``) has ``fc_norm`` after pooling instead. A CrossMAE encoder pre-trained with
  inter-block mixing has no final LayerNorm at all, so it exports as the average-pooled layout with
  ``fc_norm`` initialised to identity (weight 1, bias 0), which fine-tuning trains; the export metadata
  says so. No other weights are invented.
- The head: never exported (the class count is the downstream task's); imported only on request.

    state, meta = to_timm(read_checkpoint("checkpoint-last.pth"))       # -> timm keys, model name, kwargs
    unused = load_encoder_weights(model, "model.safetensors")          # timm / ours / the authors' files in
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from model.classifier import ViTClassifier, load_encoder
from model.layers import sincos_pos_table
from model.official import check_entries, read_checkpoint, short_list
from model.registry import CONFIGS

POOLS = ("auto", "token", "avg")
BLOCK_KEYS = ("norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
              "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
              "mlp.fc2.weight", "mlp.fc2.bias")
# timm's registered ViTs whose layout ours maps onto: name -> (patch, width, depth, heads). Other shapes
# (the tiny demo model, other patch sizes) use the closest name with keyword overrides.
TIMM_ARCHS = {
    "vit_tiny_patch16_224": (16, 192, 12, 3),
    "vit_small_patch16_224": (16, 384, 12, 6),
    "vit_base_patch16_224": (16, 768, 12, 12),
    "vit_large_patch16_224": (16, 1024, 24, 16),
    "vit_huge_patch14_224": (14, 1280, 32, 16),
}
TIMM_IMG_SIZE = 224
ENCODER_PREFIXES = ("cls_token", "pos_embed", "patch_embed.", "blocks.")


# -- timm's layout ----------------------------------------------------------------------------------

def timm_shapes(embed_dim: int, depth: int, patch_size: int, img_size: int, mlp_hidden: int, in_chans: int = 3,
                final_norm: str | None = "norm") -> dict[str, tuple[int, ...]]:
    """The keys and shapes of timm's ``VisionTransformer`` state dict in timm's order, without the head.
    ``final_norm``: "norm" (class-token layout), "fc_norm" (average-pooled layout) or None (neither)."""
    C, L = embed_dim, (img_size // patch_size) ** 2
    shapes = {"cls_token": (1, 1, C), "pos_embed": (1, 1 + L, C),
              "patch_embed.proj.weight": (C, in_chans, patch_size, patch_size), "patch_embed.proj.bias": (C,)}
    per_block = dict(zip(BLOCK_KEYS, [(C,), (C,), (3 * C, C), (3 * C,), (C, C), (C,), (C,), (C,),
                                      (mlp_hidden, C), (mlp_hidden,), (C, mlp_hidden), (C,)], strict=True))
    for i in range(depth):
        shapes.update({f"blocks.{i}.{k}": s for k, s in per_block.items()})
    if final_norm is not None:
        shapes.update({f"{final_norm}.weight": (C,), f"{final_norm}.bias": (C,)})
    return shapes


def timm_architecture(patch_size: int, embed_dim: int, depth: int, num_heads: int, img_size: int,
                      mlp_ratio: float, pool: str, in_chans: int = 3) -> tuple[str, dict[str, Any]]:
    """The timm model name and the ``timm.create_model`` keywords that build this encoder's layout with
    no head (``num_classes=0``: timm loads a checkpoint strictly, so a head missing from the file would
    be an error; ``model.reset_classifier(n)`` adds one)."""
    shape = (patch_size, embed_dim, depth, num_heads)
    exact = [n for n, a in TIMM_ARCHS.items() if a == shape]
    same_width = [n for n, a in TIMM_ARCHS.items() if a[1:2] == shape[1:2] and a[3] == num_heads]
    name = (exact or same_width or ["vit_base_patch16_224"])[0]
    kwargs: dict[str, Any] = {}
    for field, ours, theirs in zip(("patch_size", "embed_dim", "depth", "num_heads"), shape, TIMM_ARCHS[name],
                                   strict=True):
        if ours != theirs:
            kwargs[field] = ours
    if img_size != TIMM_IMG_SIZE:
        kwargs["img_size"] = img_size
    if mlp_ratio != 4.0:
        kwargs["mlp_ratio"] = mlp_ratio
    if in_chans != 3:
        kwargs["in_chans"] = in_chans
    kwargs["num_classes"] = 0
    if pool == "avg":
        kwargs["global_pool"] = "avg"
    return name, kwargs


# -- export -----------------------------------------------------------------------------------------

def encoder_geometry(entry: Mapping) -> dict[str, int]:
    """Width, depth, patch size, image size, MLP width and input channels, read off an encoder's tensors."""
    needed = ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight")
    missing = [k for k in needed if not isinstance(entry.get(k), torch.Tensor)]
    if missing:
        raise KeyError(f"not a ViT encoder state dict: no tensor {short_list(missing)} (expected a pre-training "
                       "checkpoint, ours or the authors', or a timm VisionTransformer state dict)")
    depth = 0
    while f"blocks.{depth}.norm1.weight" in entry:
        depth += 1
    _, in_chans, p, _ = entry["patch_embed.proj.weight"].shape
    L = entry["pos_embed"].shape[1] - 1
    grid = round(L**0.5)
    if grid * grid != L:
        raise ValueError(f"pos_embed has {L} patch rows, not a square grid: cannot tell the image size")
    return {"embed_dim": int(entry["cls_token"].shape[-1]), "depth": depth, "patch_size": int(p),
            "img_size": grid * int(p), "mlp_hidden": int(entry["blocks.0.mlp.fc1.weight"].shape[0]),
            "in_chans": int(in_chans)}


def heads_from_registry(geometry: Mapping[str, int]) -> int | None:
    """The head count of a registry size with this width, depth and patch (the authors' files do not
    record it, and no tensor shape shows it)."""
    for cfg in CONFIGS.values():
        if (cfg.embed_dim, cfg.depth, cfg.patch_size) == (geometry["embed_dim"], geometry["depth"],
                                                           geometry["patch_size"]):
            return cfg.num_heads
    return None


def to_timm(entry: Mapping, num_heads: int | None = None, pool: str = "auto",
            img_size: int | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A pre-training checkpoint's encoder (ours or the authors'; the ``"model"`` entry or the whole
    checkpoint) in timm's layout. Returns (state dict in timm's key order, metadata: timm model name and
    ``create_model`` keywords, geometry, the final norm and where it came from, notes).

    ``pool``: "token" (timm's default layout: ``norm``, which the encoder must have: MAE, or CrossMAE
    without inter-block mixing), "avg" (``fc_norm``: the checkpoint's if it has one, else identity), or
    "auto" (token when the encoder has a final norm, else avg). ``img_size``: export the fixed sin-cos
    position table for another image size (only when the checkpoint's table is that fixed table).
    ``num_heads``: needed only when neither the checkpoint's ``model_config`` nor the registry tells it."""
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
    model_config = entry.get("model_config") if isinstance(entry.get("model_config"), Mapping) else None
    entry = weights_entry(entry)
    g = encoder_geometry(entry)
    C = g["embed_dim"]
    has_norm = "norm.weight" in entry
    if pool == "auto":
        pool = "token" if has_norm else "avg"
    if pool == "token" and not has_norm:
        raise ValueError("--pool token needs the encoder's final LayerNorm (timm's `norm`), and this checkpoint "
                         "has none (a CrossMAE encoder trained with inter-block mixing ends without one): export "
                         "with --pool avg, timm's average-pooled layout, whose fc_norm fine-tuning trains")
    shapes = timm_shapes(C, g["depth"], g["patch_size"], g["img_size"], g["mlp_hidden"], g["in_chans"],
                         final_norm=None)
    foreign = [k for k in entry if k.startswith(("patch_embed.", "blocks.")) and k not in shapes]
    check_entries(entry, shapes, ignored=[k for k in entry if k not in shapes and k not in foreign],
                  hint="the encoder blocks must be plain pre-norm ViT blocks, as create_model builds them")
    heads = num_heads or (model_config or {}).get("num_heads") or heads_from_registry(g)
    if not heads or C % heads:
        raise ValueError(f"cannot tell the number of attention heads of this {C}-wide, {g['depth']}-block encoder "
                         f"(got {heads!r}): pass num_heads (train.export --num_heads N)")
    state = {k: entry[k] for k in shapes}
    notes = []
    table = entry["pos_embed"]
    sincos = sincos_pos_table(C, g["img_size"] // g["patch_size"])[None].to(table.dtype)
    is_sincos = not table.is_meta and torch.allclose(table.float(), sincos.float(), atol=1e-6, rtol=0)
    if img_size is not None and img_size != g["img_size"]:
        if img_size % g["patch_size"]:
            raise ValueError(f"img_size={img_size} must be a multiple of the patch size {g['patch_size']}")
        if not is_sincos:
            raise ValueError(f"the checkpoint's position table is not the fixed sin-cos one, so it cannot be remade "
                             f"exactly for img_size={img_size}; export at its own size, {g['img_size']}")
        state["pos_embed"] = sincos_pos_table(C, img_size // g["patch_size"])[None].to(table.dtype)
        notes.append(f"position table remade (fixed 2-D sin-cos) for {img_size} px; the encoder was pre-trained "
                     f"at {g['img_size']} px")
        g["img_size"] = img_size
    if is_sincos:
        notes.append("pos_embed is the fixed 2-D sin-cos table with an all-zero cls row (never trained)")
    if g["img_size"] != TIMM_IMG_SIZE:
        notes.append(f"image size {g['img_size']} px, not {TIMM_IMG_SIZE}: pos_embed holds "
                     f"{(g['img_size'] // g['patch_size']) ** 2} patch rows, so timm must be built with "
                     f"img_size={g['img_size']} (in timm_kwargs)")
    if pool == "token":
        state["norm.weight"], state["norm.bias"] = entry["norm.weight"], entry["norm.bias"]
        final = "norm: the encoder's final LayerNorm, pre-trained"
    elif "fc_norm.weight" in entry:  # a classifier's or an earlier export's: carried over as it is
        w, b = entry["fc_norm.weight"], entry["fc_norm.bias"]
        state["fc_norm.weight"], state["fc_norm.bias"] = w, b
        identity = not w.is_meta and bool((w == 1).all() and (b == 0).all())
        final = ("fc_norm: the checkpoint's, identity (weight 1, bias 0), not trained" if identity
                 else "fc_norm: the checkpoint's (trained by fine-tuning)")
    else:
        dtype = entry["cls_token"].dtype
        state["fc_norm.weight"], state["fc_norm.bias"] = torch.ones(C, dtype=dtype), torch.zeros(C, dtype=dtype)
        final = ("fc_norm: identity (weight 1, bias 0), NOT pre-trained: " + (
            "the encoder was pre-trained with inter-block mixing and has no final LayerNorm; "
            if not has_norm else "timm applies it after pooling, where the encoder's per-token norm does not fit; ")
            + "fine-tuning trains it")
        if has_norm:
            notes.append("the encoder's pre-trained final norm is not exported (--pool token keeps it)")
    mlp_ratio = g["mlp_hidden"] / C
    name, kwargs = timm_architecture(g["patch_size"], C, g["depth"], heads, g["img_size"], mlp_ratio, pool,
                                     g["in_chans"])
    dropped = sorted({k.split(".")[0] for k in entry if k not in state})
    meta = {"timm_model": name, "timm_kwargs": kwargs, "global_pool": pool, "final_norm": final,
            "img_size": g["img_size"], "patch_size": g["patch_size"], "embed_dim": C, "depth": g["depth"],
            "num_heads": heads, "mlp_ratio": mlp_ratio, "in_chans": g["in_chans"], "num_tensors": len(state),
            "not_exported": dropped, "notes": notes}
    return {k: v.detach().contiguous() for k, v in state.items()}, meta


# -- import -----------------------------------------------------------------------------------------

def weights_entry(checkpoint: Mapping) -> Mapping:
    """The state dict inside a checkpoint: ``"model"`` (ours, the authors'), ``"state_dict"`` (timm's
    training script), or the mapping itself (a bare state dict, a safetensors file)."""
    if not isinstance(checkpoint, Mapping):
        raise TypeError(f"expected a state dict (a mapping of names to tensors), got {type(checkpoint).__name__}")
    for key in ("model", "state_dict"):
        if isinstance(checkpoint.get(key), Mapping):
            return checkpoint[key]
    return checkpoint


def read_weights(path: str | os.PathLike) -> Mapping:
    """A ``.safetensors`` file (as timm and the hub write them) or a PyTorch checkpoint, read without
    executing code from it; errors name the file."""
    path = os.fspath(path)
    if not path.endswith(".safetensors"):
        return read_checkpoint(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found: {path}")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"cannot read {path}: truncated, corrupt or not a safetensors file ({e})") from e


def load_timm(model: nn.Module, state: Mapping, with_head: bool = False) -> list[str]:
    """Copy a timm ``VisionTransformer`` state dict (class-token or average-pooled layout) into a
    classifier (``create_classifier``) or a pre-training model's encoder (``create_model``) of the same
    width, depth, patch and image size. Every key is checked first: a missing, unexpected, misshapen or
    non-tensor one raises KeyError / ValueError naming it, and nothing is copied. ``norm`` fills the
    model's token-pooling / pre-decoder norm and ``fc_norm`` a classifier's average-pooling one where the
    model has them; the head is copied only ``with_head`` (a classifier of the file's class count).
    Returns the file's keys that were not used."""
    state = weights_entry(state)
    classifier = isinstance(model, ViTClassifier)
    cfg = model.cfg
    own = dict(model.named_parameters()) | dict(model.named_buffers())
    shapes = timm_shapes(cfg.embed_dim, cfg.depth, cfg.patch_size, cfg.img_size,
                         model.blocks[0].mlp.fc1.out_features, cfg.in_chans, final_norm=None)
    norms = {f"{n}.{p}": (cfg.embed_dim,) for n in ("norm", "fc_norm") for p in ("weight", "bias")}
    ignored = [k for k in state if k.startswith("head.")] if not with_head else []
    if with_head:
        if not classifier or not isinstance(model.head, nn.Linear):
            raise ValueError("with_head needs a fine-tuning classifier (a plain linear head)")
        shapes |= {"head.weight": tuple(model.head.weight.shape), "head.bias": tuple(model.head.bias.shape)}
    size = f"{cfg.embed_dim} wide, {cfg.depth} blocks, patch {cfg.patch_size}"
    check_entries(state, shapes | norms, optional=norms, ignored=ignored,
                  hint=f"is it a plain timm VisionTransformer of the model's size ({size}) with a class token and "
                       "no extras (register tokens, layer scale, qk-norm)?",
                  shape_hint=f"the model is {size} at {cfg.img_size} px; the image size must match the file's "
                             "position table (pass --img_size)")
    plan = {k: state[k] for k in shapes}
    if not classifier:  # the encoder adds no position to its cls token: fold timm's cls row in
        plan["cls_token"] = state["cls_token"] + state["pos_embed"][:, :1].to(state["cls_token"].dtype)
        plan["pos_embed"] = torch.cat([torch.zeros_like(state["pos_embed"][:, :1]), state["pos_embed"][:, 1:]], 1)
    # A classifier has `norm` only with token pooling and `fc_norm` only with average pooling, as timm's
    # two layouts do; a pre-training model has `norm` where its decoder reads the normalised last block.
    for name in ("norm", "fc_norm"):
        if f"{name}.weight" in state and f"{name}.weight" in own:
            plan[f"{name}.weight"], plan[f"{name}.bias"] = state[f"{name}.weight"], state[f"{name}.bias"]
    with torch.no_grad():
        for k, v in plan.items():
            own[k].copy_(v)
    used = set(plan)
    return sorted(k for k in state if k not in used)


def load_encoder_weights(model: nn.Module, source: str | os.PathLike | Mapping) -> list[str]:
    """Initialise ``model``'s encoder (a classifier, or a pre-training model) from a file or a loaded
    checkpoint in any of the layouts this project meets: timm's (``.safetensors`` or ``.pth``, as
    ``train.export`` writes it or timm saves it), or a pre-training checkpoint, ours or the authors'
    (told apart by its ``mask_token``). Every key is checked; returns the keys not used."""
    checkpoint = read_weights(source) if isinstance(source, (str, os.PathLike)) else source
    entry = weights_entry(checkpoint)
    if "mask_token" not in entry:
        return load_timm(model, entry)
    if isinstance(model, ViTClassifier):
        return load_encoder(model, entry)
    # A pre-training model from a pre-training checkpoint: the encoder part, through the same checks.
    g = encoder_geometry(entry)
    keys = timm_shapes(g["embed_dim"], g["depth"], g["patch_size"], g["img_size"], g["mlp_hidden"], g["in_chans"],
                       final_norm="norm" if "norm.weight" in entry else None)
    encoder = {k: entry[k] for k in keys if k in entry}  # what is missing, load_timm names
    load_timm(model, encoder)
    return sorted(k for k in entry if k not in encoder)
