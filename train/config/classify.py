"""The configuration of ``python -m train.finetune`` and ``python -m train.linprobe``: one config with per-command
defaults (RECIPES) and flags, their checks, and the values derived from them.

    resolved = parse_classify("finetune", sys.argv[1:])   # bad flags: one line on stderr, exit status 2
    resolved.config          # FinetuneConfig / LinprobeConfig (both ClassifyConfig), sizes filled in
    resolved.model_config    # the encoder's validated ModelConfig
    resolved.data_root       # the folder holding train/ and val/

Fine-tuning offers --layer_decay, --drop_path and the augmentations; probing offers --optimizer. Each keeps
the other's options fixed at its recipe's values (AdamW with no probe optimizer choice; no layer decay, drop
path or augmentation), so that one config type describes both. ``resolve_classify(mode, config)`` checks a
config built in-process (raising ConfigError). The classes check (train/ and val/ hold the same classes)
stays with the run, which reads the folders.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import torch

from model import ModelConfig, classifier_names
from model.registry import encoder_config
from model.timm_format import encoder_geometry, read_weights, weights_entry
from train.config import (
    ConfigError,
    Policy,
    blr_without_effect,
    check_ranges,
    generate_parser,
    option,
    parse_command_line,
    recipe_option,
    saved_settings,
    specialise,
    write_run_config,
)
from train.config.pretrain import BACKEND_CHOICES, BACKEND_HELP
from train.data import BACKENDS as DATA_BACKENDS
from train.data import resolve_data_path

MATCH, WARN, FREE = Policy.MATCH, Policy.WARN, Policy.FREE

# Defaults: the embedded digits demo (runs offline on a CPU). ImageNet recipes are configs/finetune/*.yaml and
# configs/linprobe/*.yaml.
DEMO_IMG_SIZE = 32
RECIPES = {
    "finetune": dict(batch_size=64, epochs=10, warmup_epochs=1, blr=4e-3, min_lr=1e-6, weight_decay=0.05,
                     layer_decay=0.75, drop_path=0.1, global_pool="avg", optimizer="adamw", mixup=0.0, cutmix=0.0,
                     smoothing=0.1, reprob=0.0, randaug=False, output_dir="output/finetune"),
    # The ImageNet recipe (blr 5e-4, mixup, CutMix, RandAugment, random erasing) is for 100 epochs of 1.28M images:
    # on 1,438 digits of 32 pixels in 220 steps its lr (1.25e-4 at batch 64) barely moves the head and its
    # augmentations hide most of a digit, so the demo trains at 8x the lr without them (README, issue #12).
    # MAE's probe is LARS at blr 0.1 on the cls token (configs/linprobe/); at the demo's scale (1,438 images,
    # batch 128) LARS barely moves the head, so the demo defaults to SGD on averaged tokens.
    "linprobe": dict(batch_size=128, epochs=10, warmup_epochs=1, blr=0.2, min_lr=0.0, weight_decay=0.0,
                     layer_decay=1.0, drop_path=0.0, global_pool="avg", optimizer="sgd", mixup=0.0, cutmix=0.0,
                     smoothing=0.0, reprob=0.0, randaug=False, output_dir="output/linprobe"),
}
FINETUNE_ONLY = ("layer_decay", "drop_path", "mixup", "cutmix", "smoothing", "reprob", "randaug")
LINPROBE_ONLY = ("optimizer",)
_FT = RECIPES["finetune"]  # the declared defaults; LinprobeConfig replaces them with RECIPES["linprobe"]


@dataclass(frozen=True)
class ClassifyModel:
    model: str = option("vit_tiny_patch8", f"encoder: one of {', '.join(classifier_names())}", MATCH)
    # Initial weights only: a resumed run continues from its own checkpoint.
    finetune: str | None = option(
        None, "pre-trained weights: a pre-training checkpoint (ours or the authors') or timm ViT weights "
              "(.safetensors / .pth, e.g. from train.export) (default: none, random initialisation)", FREE)
    img_size: int | None = option(
        None, f"input size (default: the --finetune checkpoint's, else {DEMO_IMG_SIZE})", MATCH, minimum=1)
    patch_size: int | None = option(
        None, "patch size (default: the --finetune checkpoint's, else the model's)", MATCH, minimum=1)
    global_pool: str = option(
        _FT["global_pool"], "features: average of the patch tokens + fc_norm, or the cls token after the final "
                            "norm", MATCH, choices=("avg", "token"))
    drop_path: float = option(_FT["drop_path"], "stochastic depth rate of the last block", MATCH)
    # The implementation, not the function computed: another value on resume is a warning only.
    backend: str = option("auto", BACKEND_HELP, WARN, choices=BACKEND_CHOICES)


@dataclass(frozen=True)
class ClassifyOptim:
    TITLE: ClassVar[str] = "optimisation"
    batch_size: int = option(_FT["batch_size"], "images per process and step", MATCH, minimum=1)
    accum_iter: int = option(1, "gradient accumulation steps", MATCH, minimum=1)
    # WARN, not MATCH: re-running a finished run with more epochs continues it (tests/test_classify.py).
    epochs: int = option(_FT["epochs"], "training epochs", WARN, minimum=1)
    warmup_epochs: float = option(_FT["warmup_epochs"], "linear lr warmup, in epochs", MATCH)
    blr: float = option(_FT["blr"], "base lr: lr = blr * eff_batch / 256", MATCH, minimum=0, finite=True,
                        relax=blr_without_effect)
    lr: float | None = option(None, "absolute lr (default: from --blr)", MATCH, minimum=0, finite=True)
    min_lr: float = option(_FT["min_lr"], "lr at the end of the cosine schedule", MATCH, minimum=0, finite=True)
    weight_decay: float = option(_FT["weight_decay"], "weight decay", MATCH, minimum=0, finite=True)
    layer_decay: float = option(
        _FT["layer_decay"], "layer-wise lr decay: the head trains at lr, block i of d at lr * layer_decay^(d - i), "
                            "the embeddings at lr * layer_decay^(d + 1)", MATCH)
    # Fine-tuning's value is "adamw" (fixed, not a choice); probing chooses.
    optimizer: str = option(_FT["optimizer"], "LARS (MAE's ImageNet probe) or SGD with momentum 0.9", MATCH,
                            choices=("lars", "sgd"))
    precision: str | None = option(None, "autocast dtype (default: bf16 on GPU, fp32 on CPU)", WARN,
                                   choices=("bf16", "fp32"))


@dataclass(frozen=True)
class ClassifyAugment:
    TITLE: ClassVar[str] = "augmentation"
    mixup: float = option(_FT["mixup"], "mixup alpha (0 = off)", MATCH)
    cutmix: float = option(_FT["cutmix"], "CutMix alpha (0 = off)", MATCH)
    smoothing: float = option(_FT["smoothing"], "label smoothing", MATCH)
    reprob: float = option(_FT["reprob"], "random erasing probability", MATCH)
    randaug: bool = option(_FT["randaug"], "RandAugment, 2 ops at magnitude 9 (std 0.5)", MATCH, negatable=True)


@dataclass(frozen=True)
class ClassifyData:
    data_path: str = option("digits", "folder with train/ and val/ image folders, or 'digits'", WARN)
    data_backend: str = option("auto", "image loader", WARN, choices=DATA_BACKENDS)
    num_workers: int = option(2, "loader workers (DALI threads)", WARN, minimum=0)
    scan_threads: int | None = option(None, "threads of the first scan of the image folder (default: every core "
                                            "this process may use)", FREE, minimum=1)


@dataclass(frozen=True)
class ClassifyRun:
    output_dir: str = option(_FT["output_dir"], "checkpoints and metrics.jsonl; a run resumes from the checkpoint "
                                                "found here", WARN)
    seed: int = option(0, "seed of the initialisation, data order and augmentation", MATCH)
    device: str | None = option(None, "training device (default: cuda if visible, else cpu)", WARN,
                                choices=("cuda", "cpu"))
    log_every: int = option(20, "log the running loss every N steps", WARN, minimum=1)
    config: str | None = recipe_option("configs/finetune/*.yaml, configs/linprobe/*.yaml")


@dataclass(frozen=True)
class ClassifyConfig:
    model: ClassifyModel = field(default_factory=ClassifyModel)
    optim: ClassifyOptim = field(default_factory=ClassifyOptim)
    augment: ClassifyAugment = field(default_factory=ClassifyAugment)
    data: ClassifyData = field(default_factory=ClassifyData)
    run: ClassifyRun = field(default_factory=ClassifyRun)


FinetuneConfig = specialise(ClassifyConfig, "FinetuneConfig", RECIPES["finetune"], hidden=LINPROBE_ONLY)
LinprobeConfig = specialise(ClassifyConfig, "LinprobeConfig", RECIPES["linprobe"], hidden=FINETUNE_ONLY)
CONFIGS: dict[str, type[ClassifyConfig]] = {"finetune": FinetuneConfig, "linprobe": LinprobeConfig}


@dataclass(frozen=True)
class ResolvedClassify:
    """A checked fine-tuning or probing configuration and what follows from it."""

    mode: str  # "finetune" or "linprobe"
    config: ClassifyConfig  # img_size (and patch_size with --finetune) filled in
    model_config: ModelConfig  # the encoder's, validated
    data_root: str  # holds train/ and val/


def build_parser(mode: str, defaults: Mapping[str, Any] | None = None) -> argparse.ArgumentParser:
    """The command line of ``python -m train.<mode>``; ``defaults`` replace the declared ones."""
    what = "Fine-tune" if mode == "finetune" else "Linear-probe"
    return generate_parser(CONFIGS[mode], prog=f"python -m train.{mode}", defaults=defaults,
                           description=f"{what} a pre-trained encoder on <data_path>/train, evaluating on "
                                       "<data_path>/val. The defaults are the digits demo's recipe (see the "
                                       f"README); ImageNet recipes are configs/{mode}/*.yaml.")


def parse_classify(mode: str, argv: list[str] | None = None) -> ResolvedClassify:
    """Parse and check the command line of ``python -m train.<mode>`` (``--config FILE`` included); impossible
    flags exit through ``parser.error`` (status 2) with one line, before any work."""
    return parse_command_line(CONFIGS[mode], lambda defaults: build_parser(mode, defaults), argv,
                              lambda config: resolve_classify(mode, config))


def resolve_classify(mode: str, config: ClassifyConfig) -> ResolvedClassify:
    """Check ``config`` as the command line of ``train.<mode>`` is checked and fill in the encoder's sizes;
    raises ConfigError (one line) for a configuration that cannot run."""
    if mode not in CONFIGS:
        raise ValueError(f"mode must be one of {sorted(CONFIGS)}, got {mode!r}")
    check_ranges(config)
    m, o, a = config.model, config.optim, config.augment
    if not 0 <= o.warmup_epochs <= o.epochs:
        raise ConfigError(f"--warmup_epochs must be in [0, --epochs={o.epochs}], got {o.warmup_epochs}")
    if not 0 < o.layer_decay <= 1:
        raise ConfigError(f"--layer_decay must be in (0, 1], got {o.layer_decay}")
    if not 0 <= a.smoothing < 1 or not 0 <= a.reprob <= 1:
        raise ConfigError("--smoothing must be in [0, 1) and --reprob in [0, 1]")
    if config.run.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA GPU is visible; use --device cpu")
    if m.finetune is not None and not Path(m.finetune).is_file():
        raise ConfigError(f"--finetune {m.finetune}: no such file")
    img_size, patch_size = resolve_encoder_size(m)
    try:
        root = resolve_data_path(config.data.data_path)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"--data_path: {e}") from e
    for split in ("train", "val"):
        if root is None or not (root / split).is_dir():
            raise ConfigError(f"--data_path {config.data.data_path}: expected the folders {split}/ (and train/, "
                              f"val/) inside {root}, each holding <class>/<image> files")
    sizes = {"img_size": img_size, "backend": m.backend}
    if patch_size is not None:
        sizes["patch_size"] = patch_size
    try:  # what create_classifier would build, checked without building it (ViT-H: ~18 s on a CPU)
        model_config = encoder_config(m.model, **sizes)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    filled = replace(config, model=replace(m, img_size=img_size, patch_size=patch_size))
    return ResolvedClassify(mode, filled, model_config, str(root))


def encoder_size_of(path: str | Path) -> tuple[int, int]:
    """(image size, patch size) the encoder in ``path`` was trained at: from the model config our
    pre-training checkpoints record, else read off its tensors (position-table rows, patch conv), which
    works for the authors' checkpoints and timm weights alike."""
    checkpoint = read_weights(path)
    cfg = checkpoint.get("model_config") if isinstance(checkpoint, Mapping) else None
    if isinstance(cfg, Mapping) and isinstance(cfg.get("img_size"), int) and isinstance(cfg.get("patch_size"), int):
        return cfg["img_size"], cfg["patch_size"]
    geometry = encoder_geometry(weights_entry(checkpoint))
    return geometry["img_size"], geometry["patch_size"]


def resolve_encoder_size(model: ClassifyModel) -> tuple[int, int | None]:
    """(img_size, patch_size) to build: the --finetune checkpoint's (their defaults), refusing values that
    contradict it (the position table and the patch conv only fit the size they were trained at); without
    a checkpoint, the flags' (img_size defaulting to the demo's, patch_size to the model's: None)."""
    if model.finetune is None:
        return (DEMO_IMG_SIZE if model.img_size is None else model.img_size), model.patch_size
    try:
        img_size, patch_size = encoder_size_of(model.finetune)
    except (KeyError, ValueError, TypeError) as e:
        raise ConfigError(f"--finetune {model.finetune}: {e}") from e
    for flag, given, saved in (("img_size", model.img_size, img_size), ("patch_size", model.patch_size, patch_size)):
        if given is not None and given != saved:
            raise ConfigError(f"--{flag} {given}: the encoder in {model.finetune} was pre-trained with {flag} "
                              f"{saved}; omit --{flag} (it defaults to the checkpoint's)")
    return img_size, patch_size


def write_resolved(resolved: ResolvedClassify) -> Path:
    """Write the resolved configuration to ``<output_dir>/config.yaml`` (rank 0, at start)."""
    return write_run_config(resolved.config, f"python -m train.{resolved.mode}")


__all__ = ["CONFIGS", "DEMO_IMG_SIZE", "FINETUNE_ONLY", "LINPROBE_ONLY", "RECIPES", "ClassifyAugment",
           "ClassifyConfig", "ClassifyData", "ClassifyModel", "ClassifyOptim", "ClassifyRun", "FinetuneConfig",
           "LinprobeConfig", "ResolvedClassify", "build_parser", "encoder_size_of",
           "parse_classify", "resolve_classify", "resolve_encoder_size", "saved_settings", "write_resolved"]
