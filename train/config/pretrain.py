"""The configuration of ``python -m train.pretrain``: its flags, their checks, and the values derived from them.

    resolved = parse_pretrain(sys.argv[1:])     # bad flags: one line on stderr and exit status 2, before any work
    resolved.config                             # PretrainConfig, derived defaults filled in: what checkpoints store
    resolved.model_config                       # the validated ModelConfig the run builds
    resolved.data_root, resolved.data_backend, resolved.demo_recipe
    resolved.knn_root                           # the k-NN monitor's folder (train/, val/), None when it is off

``resolve_pretrain(config)`` does the same for a config built in-process (raising ConfigError). Nothing is
written back: the namespace parsed and the config given are left as they are.
"""

from __future__ import annotations

import argparse
import importlib.util
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import torch

from model import ModelConfig, family_of, get_config, list_models
from train.checkpoint import LAST
from train.config import (
    CONFIG_FILE,
    ConfigError,
    Policy,
    blr_without_effect,
    check_ranges,
    generate_parser,
    option,
    parse_command_line,
    recipe_option,
    saved_settings,
    write_run_config,
)
from train.data import BACKENDS as DATA_BACKENDS
from train.data import resolve_data_path

DEFAULT_MODEL = "crossmae_vit_tiny_patch8"
BLR = 1.5e-4  # the paper's base lr
# The demo recipe, for flags left unset with --data_path demo (logged when used). lr: the linear rule gives
# 1.25e-5 for a batch of 64, far too low for a 200-step run (the loss ended at 0.91 with it; 0.6 with 1e-3).
# Size: 48-pixel crops in 4-pixel patches (144 patches, 36 seen) instead of the tiny model's 64 / 8 (64
# patches): the grid then shows shapes rather than a coarse mosaic, at about twice the cost of a step.
DEMO_LR = 1e-3
DEMO_IMG_SIZE, DEMO_PATCH_SIZE = 48, 4
SYNTHETIC_IMAGES = 4096
# The k-NN monitor: every 10 epochs, the demo's summary period (10 epochs of 5 steps); with the demo, on the
# embedded digits unless --knn_data_path is given, so that a first run shows the number move from step 0's.
KNN_EVERY = 10
DEMO_KNN_DATA = "digits"
DEMO_KNN_MAX_TRAIN = 500  # of the digits' 1,438 train images: halves each evaluation's cost (~7 s on 2 cores)

BACKEND_CHOICES = ("torch", "triton", "auto")
BACKEND_HELP = ("model ops: torch (the PyTorch references), triton (the fused Triton kernels; on CUDA the run first "
                "checks their numbers and refuses if one fails) or auto (on a CUDA GPU: the fused kernels that pass "
                "that check and only if faster, the verdict cached per card and setting; elsewhere torch)")

PROG = "python -m train.pretrain"
DESCRIPTION = "Pre-train CrossMAE (or the MAE baseline)."

MATCH, WARN, FREE = Policy.MATCH, Policy.WARN, Policy.FREE


@dataclass(frozen=True)
class PretrainModel:
    model: str = option(DEFAULT_MODEL, f"one of: {', '.join(list_models())}", MATCH)
    img_size: int | None = option(
        None, f"input size (default: the model's; {DEMO_IMG_SIZE} for the demo, see --data_path)", MATCH)
    patch_size: int | None = option(
        None, f"patch size (default: the model's; {DEMO_PATCH_SIZE} for the demo, see --data_path)", MATCH)
    mask_ratio: float = option(0.75, "fraction of the patches the encoder does not see", MATCH)
    kept_mask_ratio: float = option(
        0.25, "CrossMAE's prediction ratio gamma (fraction of all patches); ignored for MAE", MATCH)
    decoder_depth: int | None = option(None, "decoder blocks (default: the model's: 12 CrossMAE, 8 MAE)", MATCH)
    norm_pix_loss: bool = option(True, "the loss compares each patch normalised by its own mean and std", MATCH,
                                 negatable=True)
    # The implementation, not the function computed: another value on resume is a warning only.
    backend: str = option("auto", BACKEND_HELP, WARN, choices=BACKEND_CHOICES)


@dataclass(frozen=True)
class PretrainOptim:
    TITLE: ClassVar[str] = "optimisation"
    # The data position a checkpoint saves counts batches of batch_size, in the order seed gives; these and
    # the schedule define the experiment (MATCH).
    batch_size: int = option(64, "per process, per accumulation step", MATCH, minimum=1)
    accum_iter: int = option(1, "micro-batches per optimizer step", MATCH, minimum=1)
    epochs: int = option(40, "passes over the data (the lr schedule's length)", MATCH, minimum=1)
    warmup_epochs: float = option(4, "linear lr warmup, then a half-cosine decay", MATCH)
    blr: float | None = option(
        None, f"base lr: lr = (gamma/p) * blr * eff_batch / 256 (default: {BLR}, the paper's)", MATCH, minimum=0,
        finite=True, relax=blr_without_effect)
    lr: float | None = option(
        None, f"absolute lr, overrides --blr (default: {DEMO_LR} for --data_path demo without --blr, else from "
              "--blr)", MATCH, minimum=0, finite=True)
    min_lr: float = option(0.0, "the lr the cosine decays to", MATCH, minimum=0, finite=True)
    weight_decay: float = option(0.05, "AdamW weight decay (not on norms and biases)", MATCH, minimum=0, finite=True)
    precision: str | None = option(None, "autocast dtype (default: bf16 on GPU, fp32 on CPU)", WARN,
                                   choices=("bf16", "fp16", "fp32"))
    compile: bool = option(False, "torch.compile the model", WARN)
    max_steps: int | None = option(
        None, "stop after this many optimizer steps in all (default: none, the whole schedule)", FREE, minimum=1)


@dataclass(frozen=True)
class PretrainData:
    data_path: str = option(
        "demo", "a folder of images, read recursively (flat or in sub-folders), 'demo' (the embedded photos; unless "
                f"given, the default model then runs at --img_size {DEMO_IMG_SIZE} --patch_size {DEMO_PATCH_SIZE} "
                f"and --lr {DEMO_LR}), or 'synthetic'", WARN)
    data_backend: str = option("auto", "auto: dali if it imports, else torch; synthetic: random images, no files",
                               WARN, choices=DATA_BACKENDS)
    synthetic_images: int = option(
        SYNTHETIC_IMAGES, "images per epoch of --data_backend synthetic (sets steps per epoch, hence the lr "
                          "schedule)", WARN, minimum=1)
    num_workers: int = option(2, "DALI threads or DataLoader worker processes", WARN, minimum=0)
    scan_threads: int | None = option(None, "threads of the first scan of the image folder (default: every core "
                                            "this process may use)", FREE, minimum=1)


@dataclass(frozen=True)
class PretrainRun:
    output_dir: str = option("output/pretrain", "checkpoints, metrics, pictures", WARN)
    resume: str | None = option(None, f"checkpoint to resume from (default: <output_dir>/{LAST})", FREE)
    init_encoder: str | None = option(  # unused when the run resumes
        None, "start the encoder from these weights: timm ViT (.safetensors or .pth, e.g. from train.export) or a "
              "pre-training checkpoint; ignored when the run resumes (default: none)", FREE)
    seed: int = option(0, "data order, crops, masks and initialisation", MATCH)
    device: str | None = option(None, "training device (default: cuda if available)", WARN, choices=("cuda", "cpu"))
    save_every: int = option(500, "write checkpoint-last every N steps (and per epoch)", WARN, minimum=0)
    keep_every: int = option(50, "keep checkpoint-<epoch>.pth every N epochs", WARN, minimum=0)
    log_every: int = option(10, "log every N steps (with the summary lines, the only host syncs)", WARN, minimum=1)
    recon_every: int = option(10, "reconstruction grid and loss curve every N epochs (and at the end)", WARN,
                              minimum=0)
    tensorboard: bool = option(False, "also write TensorBoard events", WARN)
    config: str | None = recipe_option("configs/pretrain/*.yaml")


@dataclass(frozen=True)
class PretrainKnn:
    """The online k-NN monitor (train/knn.py): it reads the encoder, never changes training (FREE on resume)."""

    TITLE: ClassVar[str] = "k-NN monitor"
    knn_data_path: str | None = option(
        None, "a labelled folder <root>/train/<class>/* and <root>/val/<class>/* (or 'digits', the embedded "
              "handwritten digits): the frozen encoder's features (cls token, average of the patch tokens) of the "
              "whole image are scored by a weighted k-NN from train to val, top-1/top-5 in the summary lines and "
              "metrics.jsonl (default: 'digits' with --data_path demo, else none: no monitor)", FREE)
    knn_every: int = option(KNN_EVERY, "k-NN evaluation every N epochs, at the run's end and at step 0 of a fresh run "
                                       "(the random encoder); 0: no monitor", FREE, minimum=0)
    knn_k: int = option(20, "neighbours that vote in the k-NN monitor (weights exp(cosine / 0.07))", FREE, minimum=1)
    knn_max_train: int | None = option(
        None, "at most N images of the k-NN monitor's train/ folder: the first N of a permutation drawn from --seed, "
              "in file order, for quick checks (default: all)", FREE, minimum=1)


@dataclass(frozen=True)
class PretrainConfig:
    model: PretrainModel = field(default_factory=PretrainModel)
    optim: PretrainOptim = field(default_factory=PretrainOptim)
    data: PretrainData = field(default_factory=PretrainData)
    run: PretrainRun = field(default_factory=PretrainRun)
    knn: PretrainKnn = field(default_factory=PretrainKnn)


@dataclass(frozen=True)
class ResolvedPretrain:
    """A checked pre-training configuration and what follows from it."""

    config: PretrainConfig  # derived defaults filled in (blr, the demo's lr and size, the model's sizes)
    model_config: ModelConfig  # validated: what the run builds
    data_backend: str  # effective: "synthetic" for --data_path synthetic, else as given ("auto" resolves later)
    data_root: str | None  # the image folder (the demo's, materialised), None for synthetic data
    demo_recipe: str  # the demo defaults used, as flags ("" when none): logged by the run
    knn_root: str | None = None  # the k-NN monitor's folder (train/ and val/), None when the monitor is off


def build_parser(defaults: dict[str, Any] | None = None) -> argparse.ArgumentParser:
    """The command line (``--help`` lists every flag with its default); ``defaults`` replace declared ones."""
    return generate_parser(PretrainConfig, prog=PROG, description=DESCRIPTION, defaults=defaults)


def parse_pretrain(argv: list[str] | None = None) -> ResolvedPretrain:
    """Parse and check the command line (``--config FILE`` included); impossible flags exit through
    ``parser.error`` (status 2) with one line, before any work."""
    return parse_command_line(PretrainConfig, build_parser, argv, resolve_pretrain)


def model_overrides(model: PretrainModel) -> dict[str, Any]:
    """The keyword overrides of ``model.get_config(model.model, ...)`` the flags ask for. --kept_mask_ratio
    reaches only a family that predicts a chosen fraction of the patches (CrossMAE's gamma); MAE predicts
    every masked one. (An unknown name keeps it: get_config then names the model.)"""
    overrides: dict[str, Any] = {"mask_ratio": model.mask_ratio, "norm_pix_loss": model.norm_pix_loss}
    if model.model not in list_models() or family_of(model.model).partial_prediction:
        overrides["kept_mask_ratio"] = model.kept_mask_ratio
    for name in ("img_size", "patch_size", "decoder_depth", "backend"):  # backend: "auto" stays unresolved
        if getattr(model, name) is not None:
            overrides[name] = getattr(model, name)
    return overrides


def resolve_pretrain(config: PretrainConfig) -> ResolvedPretrain:
    """Check ``config`` as the command line is checked and fill in its derived values; raises ConfigError
    (one line: the flag, the value, the fix) for a configuration that cannot run."""
    check_ranges(config)
    m, o, d, r = config.model, config.optim, config.data, config.run
    if not 0 <= o.warmup_epochs <= o.epochs:
        raise ConfigError(f"--warmup_epochs must be in [0, --epochs={o.epochs}], got {o.warmup_epochs}")
    lr, img_size, patch_size, demo = o.lr, m.img_size, m.patch_size, []
    if str(d.data_path) == "demo":
        if o.lr is None and o.blr is None:
            lr = DEMO_LR
            demo.append(f"--lr {DEMO_LR}")
        if m.model == DEFAULT_MODEL and m.img_size is None and m.patch_size is None:
            img_size, patch_size = DEMO_IMG_SIZE, DEMO_PATCH_SIZE
            demo.append(f"--img_size {DEMO_IMG_SIZE} --patch_size {DEMO_PATCH_SIZE}")
    knn_path, knn_max_train = config.knn.knn_data_path, config.knn.knn_max_train
    if knn_path is None and str(d.data_path) == "demo" and config.knn.knn_every > 0:
        knn_path, knn_max_train = DEMO_KNN_DATA, config.knn.knn_max_train or DEMO_KNN_MAX_TRAIN
        demo.append(f"--knn_data_path {DEMO_KNN_DATA}" + ("" if config.knn.knn_max_train else
                                                          f" --knn_max_train {DEMO_KNN_MAX_TRAIN}"))
    knn_root = _knn_root(knn_path) if knn_path is not None and config.knn.knn_every > 0 else None
    _check_machine(o.precision, r.device, r.tensorboard)
    _check_paths(r)
    model = replace(m, img_size=img_size, patch_size=patch_size)
    if m.model in list_models():
        base = get_config(m.model)
        img, patch = img_size or base.img_size, patch_size or base.patch_size
        if img % patch == 0 and (img // patch) ** 2 < 4:
            raise ConfigError(f"--img_size {img} with patch size {patch} gives {(img // patch) ** 2} patch(es); "
                              f"masking needs at least 4 (some visible, some predicted): use --img_size >= "
                              f"{2 * patch}")
    try:
        model_config = get_config(m.model, **model_overrides(model))
    except ValueError as e:
        raise ConfigError(str(e)) from e
    data_backend = d.data_backend
    if data_backend != "synthetic" and str(d.data_path) == "synthetic":
        if data_backend != "auto":
            raise ConfigError(f"--data_path synthetic needs --data_backend synthetic (or auto), got --data_backend "
                              f"{data_backend}, which reads image files")
        data_backend = "synthetic"
    data_root = None
    if data_backend != "synthetic":
        try:
            data_root = str(resolve_data_path(d.data_path))
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"--data_path: {e}") from e
    # The model's values are filled in, so that a resume compares what the run builds, not how it was asked.
    model = replace(model, img_size=model_config.img_size, patch_size=model_config.patch_size,
                    decoder_depth=model_config.decoder_depth, kept_mask_ratio=model_config.kept_mask_ratio,
                    backend=model_config.backend)
    filled = replace(config, model=model, optim=replace(o, lr=lr, blr=BLR if o.blr is None else o.blr),
                     data=replace(d, data_backend=data_backend),
                     knn=replace(config.knn, knn_data_path=knn_path, knn_max_train=knn_max_train))
    return ResolvedPretrain(filled, model_config, data_backend, data_root, " ".join(demo), knn_root)


def _knn_root(knn_path: str) -> str:
    """The k-NN monitor's folder, materialised ('digits'); it must hold train/ and val/."""
    expected = "pass a folder holding train/<class>/<image> and val/<class>/<image> (or 'digits')"
    try:
        root = resolve_data_path(knn_path)
    except FileNotFoundError:
        raise ConfigError(f"--knn_data_path {knn_path}: no such folder; {expected}") from None
    except ValueError as e:
        raise ConfigError(f"--knn_data_path {knn_path}: {e}") from e
    missing = [split for split in ("train", "val") if root is None or not (root / split).is_dir()]
    if missing:
        raise ConfigError(f"--knn_data_path {knn_path}: no {' or '.join(f'{s}/' for s in missing)} folder in it; "
                          f"{expected}")
    return str(root)


def _check_machine(precision: str | None, device: str | None, tensorboard: bool) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA GPU is visible; use --device cpu")
    if precision == "fp16" and (device == "cpu" or not torch.cuda.is_available()):
        raise ConfigError("--precision fp16 needs a CUDA GPU (loss scaling); use bf16 or fp32 on the CPU")
    if tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("--tensorboard needs the tensorboard package: pip install tensorboard")


def _check_paths(r: PretrainRun) -> None:
    out = Path(r.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output_dir {r.output_dir} is a file, not a folder: choose another path")
    if r.init_encoder is not None and not Path(r.init_encoder).is_file():
        raise ConfigError(f"--init_encoder {r.init_encoder}: no such file")
    if r.resume is not None:
        if not Path(r.resume).is_file():
            raise ConfigError(f"--resume {r.resume}: no such file")
        last = out / LAST
        # A kept checkpoint of this very run (same folder) may be resumed: that rewinds the run.
        own = out.is_dir() and Path(r.resume).resolve().parent.samefile(out)
        if last.exists() and not own and not last.samefile(r.resume):
            raise ConfigError(f"--output_dir {r.output_dir} already holds {LAST} of another run, which resuming "
                              f"from {r.resume} would overwrite: choose another --output_dir (or drop --resume to "
                              "continue it)")


def write_resolved(resolved: ResolvedPretrain) -> Path:
    """Write the resolved configuration to ``<output_dir>/config.yaml`` (rank 0, at start)."""
    return write_run_config(resolved.config, PROG)


__all__ = ["BACKEND_CHOICES", "BACKEND_HELP", "BLR", "CONFIG_FILE",
           "DEFAULT_MODEL", "DEMO_IMG_SIZE", "DEMO_KNN_DATA", "DEMO_KNN_MAX_TRAIN", "DEMO_LR", "DEMO_PATCH_SIZE",
           "KNN_EVERY",
           "SYNTHETIC_IMAGES", "PretrainConfig", "PretrainData", "PretrainKnn", "PretrainModel", "PretrainOptim",
           "PretrainRun", "ResolvedPretrain",
           "build_parser", "model_overrides", "parse_pretrain", "resolve_pretrain",
           "saved_settings", "write_resolved"]
