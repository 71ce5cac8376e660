"""Which model a file holds, and that model with its weights, for the analyses.

Two kinds of file:

- ours (``train.pretrain``'s ``checkpoint-last.pth``): its ``model_config`` is the configuration, its ``config``
  names the model;
- the authors' released CrossMAE / MAE files (or any bare state dict in their layout, which is ours): they hold
  ``"model"`` and maybe ``"args"`` (their argparse namespace). The configuration is read off the tensors where the
  tensors tell it (family, size, image size, decoder depth and width, inter-block mixing, decoder self-attention)
  and off ``args`` for what only training knew (mask ratio, prediction ratio, norm-pix); the rest is the
  registry's default for that size, and ``--model`` names the model outright.

Flags (``overrides``) win over both. The weights are loaded by ``model.load_official``, which checks every key and
shape: a file that does not fit the model is an error naming the keys.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

import torch

from model import ModelConfig, build_model, family_of, load_official
from model.autoencoders import MaskedEncoder
from model.registry import CONFIGS
from model.timm_format import encoder_geometry, read_weights, weights_entry
from train.checkpoint import FORMAT as TRAINING_FORMAT
from train.config import saved_settings

# What the analyses let a flag change: the masking (free for any weights), whether the outputs are norm-pix (the
# weights do not tell; MAE's visualisation checkpoints are pixel-loss ones) and the architecture (which must then
# match the file's weights, or loading names the keys that do not).
OVERRIDES = ("img_size", "patch_size", "mask_ratio", "kept_mask_ratio", "decoder_depth", "inter_block",
             "decoder_self_attn", "norm_pix_loss")
# Read off the authors' ``args`` when the file has them: training settings no tensor shows.
ARGS_SETTINGS = ("mask_ratio", "kept_mask_ratio", "norm_pix_loss")


@dataclass(frozen=True)
class ModelSpec:
    """The model an analysis builds: its registry name, its validated configuration, and where they came from."""

    name: str
    cfg: ModelConfig
    source: str  # "train.pretrain checkpoint", "released CrossMAE / MAE checkpoint or state dict", "registry"
    notes: tuple[str, ...] = ()  # how the configuration was found, for the report
    step: int | None = None  # our checkpoints' optimizer step
    epoch: int | None = None

    def describe(self) -> dict[str, Any]:
        """Plain values for a report."""
        cfg = {f.name: getattr(self.cfg, f.name) for f in fields(self.cfg)}
        cfg["feature_layers"] = None if cfg["feature_layers"] is None else list(cfg["feature_layers"])
        info = {"model": self.name, "source": self.source, "config": cfg, "notes": list(self.notes)}
        info.update({k: v for k, v in (("step", self.step), ("epoch", self.epoch)) if v is not None})
        return info


def read_model_file(path: str | os.PathLike) -> Mapping:
    """A checkpoint or ``.safetensors`` state dict, read without executing code; a missing, empty or truncated
    file raises FileNotFoundError / ValueError naming it."""
    checkpoint = read_weights(path)
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{path} holds a {type(checkpoint).__name__}, not a checkpoint dict")
    return checkpoint


def resolve_spec(checkpoint: Mapping | None, model_name: str | None = None, backend: str = "torch",
                 **overrides) -> ModelSpec:
    """The model to build for ``checkpoint`` (None: the registry's ``model_name``), with ``overrides`` (names of
    ``OVERRIDES``; None values are ignored) and ``backend``. Raises ValueError / KeyError naming what is wrong."""
    unknown = sorted(set(overrides) - set(OVERRIDES))
    if unknown:
        raise ValueError(f"unknown override(s) {unknown}; allowed: {list(OVERRIDES)}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if checkpoint is None:
        if model_name is None:
            raise ValueError("no checkpoint and no --model: name a model (one of " + ", ".join(CONFIGS) + ")")
        _check_name(model_name)
        return _configured(model_name, CONFIGS[model_name], overrides, backend, "registry", [])
    if checkpoint.get("format") == TRAINING_FORMAT:
        return _ours(checkpoint, model_name, overrides, backend)
    return _released(checkpoint, model_name, overrides, backend)


def load_model(spec: ModelSpec, checkpoint: Mapping | None, device: torch.device | str) -> MaskedEncoder:
    """``spec``'s model with the checkpoint's weights (every key checked; none: the model's initialisation), in
    eval mode on ``device``."""
    model = build_model(spec.cfg)
    if checkpoint is not None:
        load_official(model, weights_entry(checkpoint))
    return model.to(device).eval()


# -- resolution ---------------------------------------------------------------------------------------------

def _check_name(name: str) -> None:
    if name not in CONFIGS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(CONFIGS)}")


def _configured(name: str, base: ModelConfig, overrides: dict[str, Any], backend: str, source: str,
                notes: list[str], **info) -> ModelSpec:
    family = family_of(base)
    if not family.partial_prediction and overrides.get("kept_mask_ratio") is not None:
        notes.append(f"--kept_mask_ratio ignored: {family.name} predicts every masked patch")
        overrides = {k: v for k, v in overrides.items() if k != "kept_mask_ratio"}
    cfg = family.configure(base, backend=backend, **overrides)
    return ModelSpec(name, cfg, source, tuple(notes), **info)


def _ours(checkpoint: Mapping, model_name: str | None, overrides: dict[str, Any], backend: str) -> ModelSpec:
    saved = checkpoint.get("model_config")
    if not isinstance(saved, Mapping):
        raise ValueError("this train.pretrain checkpoint records no model_config (an older version wrote it), so "
                         "its configuration is unknown; save its 'model' entry alone and pass that with --model NAME")
    known = {f.name for f in fields(ModelConfig)}
    if set(saved) - known or "family" not in saved:
        raise ValueError(f"the checkpoint's model_config has fields this code does not know "
                         f"({sorted(set(saved) - known)}) or no family: written by another version")
    layers = saved.get("feature_layers")
    base = ModelConfig(**{**saved, "feature_layers": None if layers is None else tuple(layers)})
    name = saved_settings(checkpoint).get("model") or _registry_name(base.family, base.embed_dim, base.depth,
                                                                     base.patch_size)
    if model_name is not None and model_name != name:
        raise ValueError(f"--model {model_name}: the checkpoint was trained as {name}; omit --model")
    # Its backend is the training run's (triton on a GPU): the analysis chooses its own.
    return _configured(name, replace(base, backend="torch"), overrides, backend, "train.pretrain checkpoint",
                       ["configuration: the checkpoint's model_config"],
                       step=checkpoint.get("step"), epoch=checkpoint.get("epoch"))


def _registry_name(family: str, embed_dim: int, depth: int, patch_size: int) -> str:
    for name, cfg in CONFIGS.items():
        if (cfg.family, cfg.embed_dim, cfg.depth, cfg.patch_size) == (family, embed_dim, depth, patch_size):
            return name
    raise ValueError(f"no registered {family} model has a {embed_dim}-wide, {depth}-block encoder with "
                     f"{patch_size}-pixel patches: name one with --model")


def _released(checkpoint: Mapping, model_name: str | None, overrides: dict[str, Any], backend: str) -> ModelSpec:
    entry = weights_entry(checkpoint)
    if "decoder_blocks.0.cross_attn.q.weight" in entry:
        family = "crossmae"
    elif "decoder_embed.weight" in entry:
        family = "mae"
    else:
        raise ValueError("not a CrossMAE / MAE pre-training checkpoint: it has no decoder (neither "
                         "decoder_blocks.0.cross_attn.* nor decoder_embed.*); a classifier or timm file?")
    geometry = encoder_geometry(entry)
    notes = [f"family {family}, encoder {geometry['embed_dim']} wide x {geometry['depth']} blocks, "
             f"{geometry['patch_size']}-pixel patches at {geometry['img_size']} px: read off the tensors"]
    if model_name is None:
        model_name = _registry_name(family, geometry["embed_dim"], geometry["depth"], geometry["patch_size"])
        notes.append(f"model {model_name}: the registry's size of that shape (give --model to choose)")
    _check_name(model_name)
    inferred: dict[str, Any] = {"img_size": geometry["img_size"]}
    decoder_depth = 0
    while f"decoder_blocks.{decoder_depth}.norm1.weight" in entry:
        decoder_depth += 1
    inferred["decoder_depth"] = decoder_depth
    if family == "crossmae":
        inferred["inter_block"] = "wfm.linear.weight" in entry
        inferred["decoder_self_attn"] = "decoder_blocks.0.self_attn.qkv.weight" in entry
        if inferred["inter_block"]:
            k = entry["wfm.linear.weight"].shape[1]
            if k != geometry["depth"] + 1:
                raise ValueError(f"the inter-block mix reads {k} feature maps, not the {geometry['depth'] + 1} of "
                                 "'every encoder block and the input' (the released setting): a feature subset "
                                 "cannot be read off the tensors")
    args = checkpoint.get("args")
    from_args = {}
    for setting in ARGS_SETTINGS:
        value = args.get(setting) if isinstance(args, Mapping) else getattr(args, setting, None)
        if value is not None and not (setting == "kept_mask_ratio" and family == "mae"):
            from_args[setting] = value
    if from_args:
        notes.append(f"{', '.join(f'{k}={v}' for k, v in from_args.items())}: from the file's args")
    notes.append(f"decoder depth {decoder_depth}: counted; other settings: the registry's for {model_name}")
    if "norm_pix_loss" not in from_args and "norm_pix_loss" not in overrides:
        notes.append("norm_pix_loss: the file does not say; assumed on (pass --no-norm_pix_loss for pixel-loss "
                     "weights, e.g. MAE's visualisation checkpoints)")
    return _configured(model_name, CONFIGS[model_name], {**inferred, **from_args, **overrides}, backend,
                       "released CrossMAE / MAE checkpoint or state dict", notes, epoch=checkpoint.get("epoch"))


__all__ = ["ARGS_SETTINGS", "OVERRIDES", "ModelSpec", "load_model", "read_model_file", "resolve_spec"]
