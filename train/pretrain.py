"""Pre-train CrossMAE (or the MAE baseline).

    python -m train.pretrain            # embedded default: a tiny CrossMAE on the demo photos, a few CPU minutes

    # ViT-B/16, the paper's recipe, one GPU (effective batch 4096 = 256 x 16 accumulation steps):
    python -m train.pretrain --model crossmae_vit_base_patch16 --data_path /data/imagenet/train \\
        --batch_size 256 --accum_iter 16 --epochs 800 --warmup_epochs 40 --blr 1.5e-4 \\
        --mask_ratio 0.75 --kept_mask_ratio 0.25 --output_dir runs/crossmae_b

    # the same on 8 GPUs (256 x 2 x 8 = 4096):
    torchrun --nproc_per_node=8 -m train.pretrain --model crossmae_vit_base_patch16 \\
        --data_path /data/imagenet/train --batch_size 256 --accum_iter 2 --output_dir runs/crossmae_b

Running the same command again resumes from ``<output_dir>/checkpoint-last.pth`` (from the newest
kept ``checkpoint-<epoch>.pth`` if that file is unreadable); ``--resume PATH`` resumes from another
file. One run at a time may use an output folder (``run.lock``); a resumed run refuses other model,
batch, seed or optimisation settings and warns about other changed flags. The learning rate is
``(kept_mask_ratio / mask_ratio) * blr * eff_batch / 256`` unless ``--lr`` is given; the effective
batch is batch_size x accum_iter x world size.

Each epoch runs ``len(loader) // accum_iter`` optimizer steps (a tail shorter than one step is not
read). The data order, crops and masks are pure functions of (seed, epoch, position, rank), so a
resumed run reads exactly the batches an uninterrupted run would have read from that step on.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import logging
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from model import MAE, CrossMAE, ModelConfig, get_config, list_models
from model.official import short_list
from model.timm_format import load_encoder_weights
from train import distributed
from train.checkpoint import (
    FORMAT,
    LAST,
    CheckpointWriteError,
    RunLock,
    RunLockedError,
    load_training_checkpoint,
    remove_stale_temporaries,
    rng_state,
    save_atomic,
    set_rng_state,
)
from train.data import BACKENDS as DATA_BACKENDS
from train.data import build_loader, resolve_data_path
from train.monitor import MetricsLog, ProgressBar, peak_flops, setup_logging
from train.optim import build_optimizer, lr_at, scaled_lr, set_lr
from train.visualize import save_loss_curve, save_reconstruction_grid

logger = logging.getLogger("train")

DEFAULT_MODEL = "crossmae_vit_tiny_patch8"
VIS_IMAGES = 8
VIS_HELDOUT = 4  # of VIS_IMAGES, drawn from the demo's held-out photos when the run reads the demo
BLR = 1.5e-4  # the paper's base lr
# The demo recipe, for flags left unset with --data_path demo (logged when used). lr: the linear rule gives
# 1.25e-5 for a batch of 64, far too low for a 200-step run (the loss ended at 0.91 with it; 0.6 with 1e-3).
# Size: 48-pixel crops in 4-pixel patches (144 patches, 36 seen) instead of the tiny model's 64 / 8 (64
# patches): the grid then shows shapes rather than a coarse mosaic, at about twice the cost of a step.
DEMO_LR = 1e-3
DEMO_IMG_SIZE, DEMO_PATCH_SIZE = 48, 4
SYNTHETIC_IMAGES = 4096
LOSS_PLOT = "loss.png"
SUMMARY_MIN_STEPS = 50  # a summary line covers whole epochs and at least this many steps (or the run's end)
# Flags a resumed run must share with the run that wrote the checkpoint (besides the model config): they
# fix the meaning of the saved data position (batches of batch_size, in the order seed gives) or the
# optimisation recipe; another value would make it another experiment.
EXPERIMENT_FLAGS = ("batch_size", "accum_iter", "seed", "blr", "lr", "min_lr", "weight_decay", "warmup_epochs",
                    "epochs")
# Flags that only shape the model (compared through the config) or that a resume is expected to change.
MODEL_FLAGS = ("model", "img_size", "patch_size", "decoder_depth", "mask_ratio", "kept_mask_ratio", "norm_pix_loss",
               "backend")
NOT_COMPARED = ("resume", "max_steps", "data_root", "init_encoder", "demo_recipe")  # init_encoder: unused on resume
# Model config fields that change the implementation, not the function it computes: a warning only.
CONFIG_IMPLEMENTATION = ("backend",)


class DefaultsOnceHelpFormatter(argparse.HelpFormatter):
    """Every flag's help ends with its default, once: ``(default: X)`` is appended unless the help already
    states the default itself (written as "(default: ...)" where the value needs words, e.g. "the model's",
    or as ``%(default)s``, which BooleanOptionalAction adds on some Python versions)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if "(default" in help_text or "%(default)" in help_text or action.default is argparse.SUPPRESS:
            return help_text
        return f"{help_text} (default: %(default)s)".lstrip()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.pretrain", description=__doc__.split("\n")[0],
                                formatter_class=DefaultsOnceHelpFormatter)
    m = p.add_argument_group("model")
    m.add_argument("--model", default=DEFAULT_MODEL, help=f"one of: {', '.join(list_models())}")
    m.add_argument("--img_size", type=int, default=None,
                   help=f"input size (default: the model's; {DEMO_IMG_SIZE} for the demo, see --data_path)")
    m.add_argument("--patch_size", type=int, default=None,
                   help=f"patch size (default: the model's; {DEMO_PATCH_SIZE} for the demo, see --data_path)")
    m.add_argument("--mask_ratio", type=float, default=0.75, help="fraction of the patches the encoder does not see")
    m.add_argument("--kept_mask_ratio", type=float, default=0.25,
                   help="CrossMAE's prediction ratio gamma (fraction of all patches); ignored for MAE")
    m.add_argument("--decoder_depth", type=int, default=None,
                   help="decoder blocks (default: the model's: 12 CrossMAE, 8 MAE)")
    m.add_argument("--norm_pix_loss", action=argparse.BooleanOptionalAction, default=True,
                   help="the loss compares each patch normalised by its own mean and std")
    m.add_argument("--backend", choices=("torch", "triton"), default=None,
                   help="model ops: the PyTorch references or the fused Triton kernels (default: triton on CUDA "
                        "when the kernels import, else torch)")
    o = p.add_argument_group("optimisation")
    o.add_argument("--batch_size", type=int, default=64, help="per process, per accumulation step")
    o.add_argument("--accum_iter", type=int, default=1, help="micro-batches per optimizer step")
    o.add_argument("--epochs", type=int, default=40, help="passes over the data (the lr schedule's length)")
    o.add_argument("--warmup_epochs", type=float, default=4, help="linear lr warmup, then a half-cosine decay")
    o.add_argument("--blr", type=float, default=None,
                   help=f"base lr: lr = (gamma/p) * blr * eff_batch / 256 (default: {BLR}, the paper's)")
    o.add_argument("--lr", type=float, default=None,
                   help=f"absolute lr, overrides --blr (default: {DEMO_LR} for --data_path demo without --blr, "
                        "else from --blr)")
    o.add_argument("--min_lr", type=float, default=0.0, help="the lr the cosine decays to")
    o.add_argument("--weight_decay", type=float, default=0.05, help="AdamW weight decay (not on norms and biases)")
    o.add_argument("--precision", choices=("bf16", "fp16", "fp32"), default=None,
                   help="autocast dtype (default: bf16 on GPU, fp32 on CPU)")
    o.add_argument("--compile", action="store_true", help="torch.compile the model")
    o.add_argument("--max_steps", type=int, default=None,
                   help="stop after this many optimizer steps in all (default: none, the whole schedule)")
    d = p.add_argument_group("data")
    d.add_argument("--data_path", default="demo",
                   help="a folder of images, read recursively (flat or in sub-folders), 'demo' (the embedded "
                        f"photos; unless given, the default model then runs at --img_size {DEMO_IMG_SIZE} "
                        f"--patch_size {DEMO_PATCH_SIZE} and --lr {DEMO_LR}), or 'synthetic'")
    d.add_argument("--data_backend", choices=DATA_BACKENDS, default="auto",
                   help="auto: dali if it imports, else torch; synthetic: random images, no files")
    d.add_argument("--synthetic_images", type=int, default=SYNTHETIC_IMAGES,
                   help="images per epoch of --data_backend synthetic (sets steps per epoch, hence the lr schedule)")
    d.add_argument("--num_workers", type=int, default=2, help="DALI threads or DataLoader worker processes")
    r = p.add_argument_group("run")
    r.add_argument("--output_dir", default="output/pretrain", help="checkpoints, metrics, pictures")
    r.add_argument("--resume", default=None, help=f"checkpoint to resume from (default: <output_dir>/{LAST})")
    r.add_argument("--init_encoder", default=None,
                   help="start the encoder from these weights: timm ViT (.safetensors or .pth, e.g. from "
                        "train.export) or a pre-training checkpoint; ignored when the run resumes (default: none)")
    r.add_argument("--seed", type=int, default=0, help="data order, crops, masks and initialisation")
    r.add_argument("--device", choices=("cuda", "cpu"), default=None,
                   help="training device (default: cuda if available)")
    r.add_argument("--save_every", type=int, default=500, help="write checkpoint-last every N steps (and per epoch)")
    r.add_argument("--keep_every", type=int, default=50, help="keep checkpoint-<epoch>.pth every N epochs")
    r.add_argument("--log_every", type=int, default=10,
                   help="log every N steps (with the summary lines, the only host syncs)")
    r.add_argument("--recon_every", type=int, default=10,
                   help="reconstruction grid and loss curve every N epochs (and at the end)")
    r.add_argument("--tensorboard", action="store_true", help="also write TensorBoard events")
    return p


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> ModelConfig:
    """Reject impossible flags before any work; returns the validated model config."""
    minimum = {"batch_size": 1, "accum_iter": 1, "epochs": 1, "log_every": 1, "num_workers": 0,
               "save_every": 0, "keep_every": 0, "recon_every": 0, "synthetic_images": 1}
    for name, low in minimum.items():
        if getattr(args, name) < low:
            p.error(f"--{name} must be >= {low}, got {getattr(args, name)}")
    if not 0 <= args.warmup_epochs <= args.epochs:
        p.error(f"--warmup_epochs must be in [0, --epochs={args.epochs}], got {args.warmup_epochs}")
    if args.max_steps is not None and args.max_steps < 1:
        p.error(f"--max_steps must be >= 1, got {args.max_steps}")
    for name in ("blr", "lr", "min_lr", "weight_decay"):
        value = getattr(args, name)
        if value is not None and (value < 0 or not math.isfinite(value)):
            p.error(f"--{name} must be a finite number >= 0, got {value}")
    demo = []
    if str(args.data_path) == "demo":
        if args.lr is None and args.blr is None:
            args.lr = DEMO_LR
            demo.append(f"--lr {DEMO_LR}")
        if args.model == DEFAULT_MODEL and args.img_size is None and args.patch_size is None:
            args.img_size, args.patch_size = DEMO_IMG_SIZE, DEMO_PATCH_SIZE
            demo.append(f"--img_size {DEMO_IMG_SIZE} --patch_size {DEMO_PATCH_SIZE}")
    args.demo_recipe = " ".join(demo)  # logged by the run
    if args.blr is None:
        args.blr = BLR
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU is visible; use --device cpu")
    if args.precision == "fp16" and (args.device == "cpu" or not torch.cuda.is_available()):
        p.error("--precision fp16 needs a CUDA GPU (loss scaling); use bf16 or fp32 on the CPU")
    if args.tensorboard and importlib.util.find_spec("tensorboard") is None:
        p.error("--tensorboard needs the tensorboard package: pip install tensorboard")
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        p.error(f"--output_dir {args.output_dir} is a file, not a folder: choose another path")
    if args.init_encoder is not None and not Path(args.init_encoder).is_file():
        p.error(f"--init_encoder {args.init_encoder}: no such file")
    if args.resume is not None:
        if not Path(args.resume).is_file():
            p.error(f"--resume {args.resume}: no such file")
        last = out / LAST
        # A kept checkpoint of this very run (same folder) may be resumed: that rewinds the run.
        own = out.is_dir() and Path(args.resume).resolve().parent.samefile(out)
        if last.exists() and not own and not last.samefile(args.resume):
            p.error(f"--output_dir {args.output_dir} already holds {LAST} of another run, which resuming from "
                    f"{args.resume} would overwrite: choose another --output_dir (or drop --resume to continue it)")
    if args.model in list_models():
        base = get_config(args.model)
        img, patch = args.img_size or base.img_size, args.patch_size or base.patch_size
        if img % patch == 0 and (img // patch) ** 2 < 4:
            p.error(f"--img_size {img} with patch size {patch} gives {(img // patch) ** 2} patch(es); masking needs "
                    f"at least 4 (some visible, some predicted): use --img_size >= {2 * patch}")
    try:
        cfg = get_config(args.model, **model_overrides(args))
    except ValueError as e:
        p.error(str(e))
    if args.data_backend != "synthetic" and str(args.data_path) == "synthetic":
        if args.data_backend != "auto":
            p.error(f"--data_path synthetic needs --data_backend synthetic (or auto), got --data_backend "
                    f"{args.data_backend}, which reads image files")
        args.data_backend = "synthetic"
    if args.data_backend != "synthetic":
        try:
            args.data_root = str(resolve_data_path(args.data_path))
        except (FileNotFoundError, ValueError) as e:
            p.error(f"--data_path: {e}")
    else:
        args.data_root = None
    return cfg


def open_output_dir(output_dir: str | Path) -> RunLock:
    """Create (or check) the run folder and take its lock, before any work: a path that is a file, a
    folder that cannot be created or written, or a folder another live run holds raises ValueError
    with the reason and the fix. Removes the temporary files a killed run's save left behind."""
    out = Path(output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError as e:
        raise ValueError(f"--output_dir {out}: {e.filename} is a file, not a folder: choose another path") from e
    except OSError as e:
        raise ValueError(f"--output_dir {out} cannot be created ({e.strerror}): choose a writable place") from e
    lock = RunLock(out)
    try:
        lock.acquire()
    except RunLockedError as e:
        raise ValueError(str(e)) from e
    except OSError as e:  # read-only, permission denied, full disk: the lock file is the write probe
        raise ValueError(f"--output_dir {out} is not writable ({e.strerror}): choose another folder or free "
                         "space") from e
    removed = remove_stale_temporaries(out)
    if removed:
        logger.warning("removed %d temporary file(s) of an interrupted checkpoint write: %s", len(removed),
                       ", ".join(p.name for p in removed))
    return lock


def config_dict(cfg: ModelConfig) -> dict[str, Any]:
    """The model config as plain values (tuples as lists, as a checkpoint gives them back)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(cfg).items()}


def model_overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, Any] = {"mask_ratio": args.mask_ratio, "norm_pix_loss": args.norm_pix_loss}
    if not args.model.startswith("mae"):
        overrides["kept_mask_ratio"] = args.kept_mask_ratio
    for name in ("img_size", "patch_size", "decoder_depth", "backend"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    return overrides


class StopRequest:
    """SIGINT / SIGTERM ask the loop to save and leave at the next step boundary; a second Ctrl-C
    interrupts at once."""

    def __init__(self):
        self.requested = False
        self.previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("%s received: saving a checkpoint at the end of this step, then exiting",
                       signal.Signals(signum).name)

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def noise_seed(seed: int, rank: int, step: int, micro: int, accum: int) -> int:
    """The masking noise of every micro-batch is seeded by where it is, not by a running RNG."""
    return ((seed * 1_000_003 + rank) * 1_000_000_007 + step * accum + micro) % (2**63 - 1)


class Trainer:
    """The pre-training loop and its state. ``state_dict()`` / ``load_state_dict()`` are the one pair
    that builds and reads a checkpoint; ``save()`` is the one way it is written."""

    def __init__(self, args: argparse.Namespace, cfg: ModelConfig, dist_info: distributed.DistInfo):
        self.args, self.cfg, self.dist = args, cfg, dist_info
        self.device = dist_info.device
        self.out = Path(args.output_dir)
        self.precision = args.precision or ("bf16" if self.device.type == "cuda" else "fp32")
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[self.precision]

        self.loader = build_loader(args.data_root, batch_size=args.batch_size, img_size=cfg.img_size, train=True,
                                   backend=args.data_backend, device=self.device, rank=dist_info.rank,
                                   world_size=dist_info.world_size, seed=args.seed, num_workers=args.num_workers,
                                   num_images=args.synthetic_images if args.data_backend == "synthetic" else None)
        self.batches_per_epoch = (len(self.loader) // args.accum_iter) * args.accum_iter
        if self.batches_per_epoch < 1:
            raise ValueError(f"{args.data_path} yields {len(self.loader)} batches of {args.batch_size} per "
                             f"process and epoch, fewer than --accum_iter={args.accum_iter}: lower --batch_size "
                             "or --accum_iter")
        self.steps_per_epoch = self.batches_per_epoch // args.accum_iter
        self.vis_heldout = 0  # how many of the grid's images (the last ones) the run does not train on
        self.vis_batch = self._vis_batch() if dist_info.is_main else None

        torch.manual_seed(args.seed + dist_info.rank)
        self.model = (CrossMAE(cfg) if cfg.family == "crossmae" else MAE(cfg)).to(self.device)
        if args.init_encoder:
            self._init_encoder(args.init_encoder)
        self.eff_batch = args.batch_size * args.accum_iter * dist_info.world_size
        self.lr = args.lr if args.lr is not None else scaled_lr(args.blr, self.eff_batch, cfg.mask_ratio,
                                                                cfg.kept_mask_ratio)
        self.optimizer = build_optimizer(self.model, self.lr, args.weight_decay, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.step = self.epoch = self.batch_in_epoch = 0
        self.saved_step = None  # the step checkpoint-last.pth holds, so that one step is never written twice
        self.last_good: tuple[Path, int] | None = None  # (file, step) a stopped run can be resumed from
        self.loss_range: tuple[float | None, float | None] = (None, None)  # first and last logged loss, this run
        self.started = (time.perf_counter(), 0)  # (time, step) at the start of the loop
        self.total_steps = args.epochs * self.steps_per_epoch
        if args.max_steps is not None:
            self.total_steps = min(self.total_steps, args.max_steps)
        self._resume()

        net = self.model
        if dist_info.enabled:
            net = DistributedDataParallel(net, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.ddp = net if dist_info.enabled else None
        self.net = torch.compile(net) if args.compile else net
        self.noise_gen = torch.Generator(device=self.device)
        self.flops_per_image = self.model.flops_per_image(training=True)
        self.peak = peak_flops(self.device)

    # -- setup ----------------------------------------------------------------------------------------

    def _vis_batch(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Fixed images (center crops spread over the dataset's sorted order, hence over its folders)
        and fixed masks for the reconstruction grids; with the demo, the last VIS_HELDOUT are crops of
        the held-out photos, which the run never trains on."""
        if self.args.data_root is None:
            return None
        heldout = []
        if str(self.args.data_path) == "demo":
            from train.data.demo import materialize_demo_heldout

            heldout = self._vis_images(materialize_demo_heldout(), VIS_HELDOUT)
        imgs = self._vis_images(self.args.data_root, VIS_IMAGES - len(heldout)) + heldout
        if not imgs:
            return None
        self.vis_heldout = len(heldout)
        imgs = torch.cat(imgs)
        g = torch.Generator().manual_seed(self.args.seed)
        return imgs, torch.rand(imgs.shape[0], self.cfg.num_patches, generator=g).to(self.device)

    def _vis_images(self, root: str | Path, count: int) -> list[torch.Tensor]:
        """``count`` center crops (1, 3, H, W) spread over the sorted files of ``root``."""
        vis = build_loader(root, batch_size=1, img_size=self.cfg.img_size, train=False,
                           backend=self.args.data_backend, device=self.device, num_workers=0)
        picks = [(i * len(vis)) // count for i in range(min(count, len(vis)))]
        imgs = []
        for first in picks:
            # A file that fails to decode despite the scan is passed over for the next one: a picture
            # is no reason to stop a run.
            for index in range(first, min(first + 4, len(vis))):
                vis.set_epoch(0, start_batch=index)
                try:
                    imgs.append(next(iter(vis))[0])
                    break
                except RuntimeError as e:
                    logger.warning("reconstruction grid: skipping %s (%s)", vis.files[vis.batch_indices(0)[index][0]],
                                   str(e).strip().splitlines()[-1][:200] if str(e).strip() else type(e).__name__)
        return imgs

    def _init_encoder(self, path: str) -> None:
        """A fresh run's encoder from timm-layout or pre-training weights, every key checked; a resumed run
        continues from its own checkpoint instead."""
        if self.args.resume is not None or (self.out / LAST).exists():
            logger.info("--init_encoder %s not used: the run resumes from its checkpoint", path)
            return
        try:
            unused = load_encoder_weights(self.model, path)
        except KeyError as e:  # KeyError's str() quotes the message; the run reports ValueErrors cleanly
            raise ValueError(f"--init_encoder {path}: {e.args[0]}") from e
        except ValueError as e:
            raise ValueError(f"--init_encoder {path}: {e}") from e
        logger.info("encoder initialised from %s (%d entries not used: %s)", path, len(unused), short_list(unused))

    def _resume(self) -> None:
        path, ckpt, last_unreadable = self._find_checkpoint()
        if ckpt is None:
            return
        self.load_state_dict(ckpt, source=path)
        last = self.out / LAST
        if last.exists() and not last.samefile(path):
            # The run continues from an older file; the next save would overwrite checkpoint-last.pth.
            if self.dist.is_main:
                aside = self._set_aside(last, "unreadable" if last_unreadable else "superseded")
                logger.warning("%s kept as %s: the run continues from %s", last.name, aside.name, path)
        self.saved_step = self.step if path == last else None
        self.last_good = (path, self.step)
        logger.info("resumed from %s at step %d (epoch %d, batch %d)", path, self.step, self.epoch,
                    self.batch_in_epoch)

    def _find_checkpoint(self) -> tuple[Path, dict | None, bool]:
        """(file, checkpoint or None, whether checkpoint-last.pth is unreadable) to resume from:
        --resume, else checkpoint-last.pth, else (unreadable or gone) the newest kept
        checkpoint-<epoch>.pth of the folder, with a warning naming both."""
        last = self.out / LAST
        if self.args.resume is not None:
            return Path(self.args.resume), load_training_checkpoint(self.args.resume), False
        kept = sorted(self.out.glob("checkpoint-[0-9]*.pth"), reverse=True)
        if not last.exists() and not kept:
            return last, None, False
        problem = None
        if last.exists():
            try:
                return last, load_training_checkpoint(last), False
            except ValueError as e:
                problem = e
        for path in kept:
            try:
                ckpt = load_training_checkpoint(path)
            except ValueError as e:
                logger.warning("%s", e)
                continue
            if problem is not None:
                logger.warning("%s is unreadable (%s); resuming from %s (step %d) instead", last, problem, path,
                               ckpt["step"])
            else:
                logger.warning("%s is missing; resuming from %s (step %d), the newest kept checkpoint", last,
                               path, ckpt["step"])
            return path, ckpt, problem is not None
        if problem is not None:
            raise ValueError(f"{problem}; no kept checkpoint-<epoch>.pth in {self.out} to fall back to: move "
                             f"{LAST} away to start the run over, or --resume a good copy")
        return last, None, False

    @staticmethod
    def _set_aside(path: Path, why: str) -> Path:
        """Rename ``path`` out of the way without deleting anything: ``<name>.<why>[.k]``."""
        aside = path.with_name(f"{path.name}.{why}")
        k = 1
        while aside.exists():
            aside, k = path.with_name(f"{path.name}.{why}.{k}"), k + 1
        path.rename(aside)
        return aside

    # -- state ---------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs, as tensors and plain values. Collective under DDP (it
        gathers every rank's RNG state): all ranks call it."""
        return {
            "format": FORMAT,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "world_size": self.dist.world_size,
            "rng": distributed.all_gather_objects(rng_state()),
            "args": dict(vars(self.args)),
            "model_config": config_dict(self.cfg),
            "data": {"num_images": self.loader.num_images, "backend": self.loader.backend},
        }

    def load_state_dict(self, state: dict[str, Any], source: str | Path = "the checkpoint") -> None:
        """Continue the run ``state`` describes. Raises ValueError (nothing loaded) if it was written by
        another experiment (model config, batch, seed, optimisation recipe, number of processes); logs
        a warning for every other changed setting."""
        refused, warned = self.compare(state)
        if refused:
            raise ValueError(f"{source} was written by a run with other settings ({', '.join(refused)}): resuming "
                             "would not continue that run; repeat its flags, or use another --output_dir")
        if warned:
            logger.warning("resuming %s with changed settings: %s", source, ", ".join(warned))
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        states = state.get("rng", [])
        if len(states) == self.dist.world_size:
            set_rng_state(states[self.dist.rank])

    def compare(self, state: dict[str, Any]) -> tuple[list[str], list[str]]:
        """(differences that make another experiment, differences only worth a warning) between the
        run that wrote ``state`` and this one, each as "name old -> new"."""
        refused, warned = [], []
        saved_cfg, cfg = state.get("model_config") or {}, config_dict(self.cfg)
        for key in sorted(set(saved_cfg) | set(cfg)):
            if saved_cfg.get(key) != cfg.get(key):
                change = f"model {key} {saved_cfg.get(key)!r} -> {cfg.get(key)!r}"
                (warned if key in CONFIG_IMPLEMENTATION else refused).append(change)
        if state.get("world_size", 1) != self.dist.world_size:
            refused.append(f"processes {state.get('world_size', 1)} -> {self.dist.world_size}")
        saved_args, args = state["args"], vars(self.args)
        for key in EXPERIMENT_FLAGS:
            if saved_args.get(key) == args.get(key):
                continue
            if key == "blr" and saved_args.get("lr") is not None and args.get("lr") is not None:
                warned.append(f"--blr {saved_args.get(key)!r} -> {args.get(key)!r} (no effect: --lr is given)")
            else:
                refused.append(f"--{key} {saved_args.get(key)!r} -> {args.get(key)!r}")
        for key in sorted(set(saved_args) | set(args)):
            if key in EXPERIMENT_FLAGS or key in MODEL_FLAGS or key in NOT_COMPARED:
                continue
            if saved_args.get(key) != args.get(key):
                warned.append(f"--{key} {saved_args.get(key)!r} -> {args.get(key)!r}")
        saved_images = state.get("data", {}).get("num_images")
        if saved_images is not None and saved_images != self.loader.num_images:
            warned.append(f"images {saved_images} -> {self.loader.num_images} (the data order differs from the "
                          "run's so far)")
        return refused, warned

    # -- checkpoints and pictures --------------------------------------------------------------------

    def save(self, keep: bool = False) -> None:
        """Write checkpoint-last.pth (and checkpoint-<epoch>.pth when ``keep``), from rank 0. Collective.
        Raises CheckpointWriteError when the folder cannot take it; the previous files stay intact."""
        if self.saved_step == self.step and not keep:
            return
        state = self.state_dict()
        if not self.dist.is_main:
            self.saved_step = self.step
            self.last_good = (self.out / LAST, self.step)
            return
        save_atomic(state, self.out / LAST)
        self.saved_step = self.step
        self.last_good = (self.out / LAST, self.step)
        if keep:
            save_atomic(state, self.out / f"checkpoint-{self.epoch:04d}.pth")

    def checkpoint_note(self) -> str:
        """Where the run can be resumed from, for messages at a stop."""
        if self.last_good is None:
            return "no checkpoint has been written yet"
        path, step = self.last_good
        return f"the last good checkpoint is {path} (step {step})"

    def close(self) -> None:
        """Drop the DDP wrapper, which holds the process group, so that ``distributed.shutdown`` really
        ends the group (its threads) before the interpreter exits."""
        self.net = self.ddp = None

    def reconstruction(self, name: str) -> None:
        """The reconstruction grid ``name`` and ``loss.png``, from rank 0."""
        if self.vis_batch is not None:
            split, L = self.cfg.split, self.cfg.num_patches
            hidden = L - split.len_keep
            title = (f"{self.args.model} on {self.cfg.img_size}-pixel crops, {self.cfg.patch_size}-pixel patches, "
                     f"step {self.step}, epoch {self.epoch}: ")
            if self.cfg.family == "crossmae" and split.n_pred < hidden:
                title += (f"trained to predict {split.n_pred} of {L} patches, drawn predicting all {hidden} hidden "
                          "ones (the decoder's queries do not see each other).")
            else:
                title += f"predicting the {hidden} hidden patches of {L}."
            if self.cfg.norm_pix_loss:
                title += " Norm-pix output: each predicted patch shown with the true patch's mean and std."
            save_reconstruction_grid(self.model, *self.vis_batch, self.out / name, heldout=self.vis_heldout,
                                     title=title)
        save_loss_curve(self.out / "metrics.jsonl", self.out / LOSS_PLOT, norm_pix=self.cfg.norm_pix_loss)

    # -- the loop ------------------------------------------------------------------------------------

    def forward_backward(self, imgs: torch.Tensor, micro: int) -> torch.Tensor:
        accum = self.args.accum_iter
        self.noise_gen.manual_seed(noise_seed(self.args.seed, self.dist.rank, self.step, micro, accum))
        noise = torch.rand(imgs.shape[0], self.cfg.num_patches, generator=self.noise_gen, device=self.device)
        last = micro == accum - 1
        sync = self.ddp.no_sync() if self.ddp is not None and not last else contextlib.nullcontext()
        with sync:
            with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
                loss = self.net(imgs, noise)["loss"]
            self.scaler.scale(loss / accum).backward()
        return loss.detach()

    def optimizer_step(self, batches) -> tuple[torch.Tensor, float]:
        """One optimizer step over accum_iter micro-batches: (summed loss on device, seconds spent
        waiting for data)."""
        args = self.args
        lr = lr_at(self.epoch + self.batch_in_epoch / self.batches_per_epoch, self.lr, args.min_lr,
                   args.warmup_epochs, args.epochs)
        set_lr(self.optimizer, lr)
        loss_sum, waited = None, 0.0
        for micro in range(args.accum_iter):
            t0 = time.perf_counter()
            imgs, _ = next(batches)
            waited += time.perf_counter() - t0
            loss = self.forward_backward(imgs, micro)
            loss_sum = loss if loss_sum is None else loss_sum + loss
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum, waited

    def run(self) -> int:
        args, is_main = self.args, self.dist.is_main
        self.out.mkdir(parents=True, exist_ok=True)
        n_params = sum(p.numel() for p in self.model.parameters())
        logger.info("model %s: %.2fM parameters, %.2f GFLOP per image per training step; backend %s, precision %s",
                    args.model, n_params / 1e6, self.flops_per_image / 1e9, self.cfg.backend, self.precision)
        logger.info("data: %s backend, %d images, %d steps per epoch", self.loader.backend, self.loader.num_images,
                    self.steps_per_epoch)
        logger.info("base lr %.3g, actual lr %.3g, effective batch %d (%d x %d accumulation x %d processes)",
                    args.blr, self.lr, self.eff_batch, args.batch_size, args.accum_iter, self.dist.world_size)
        if getattr(args, "demo_recipe", ""):
            logger.info("demo recipe (flags not given): %s, %d-pixel crops in %d patches", args.demo_recipe,
                        self.cfg.img_size, self.cfg.num_patches)
        self._backend_notice()
        if self.step >= self.total_steps:
            logger.info("nothing to do: the run is already at step %d of %d", self.step, self.total_steps)
            return 0
        log = MetricsLog(self.out, is_main, args.tensorboard, resume_step=self.step)
        bar = ProgressBar(self.total_steps, self.step, is_main)
        self.started = (time.perf_counter(), self.step)
        try:
            with StopRequest() as stop:
                status = self._loop(log, bar, stop)
        finally:
            bar.close()
            log.close()
        if status == 0 and is_main:
            self.reconstruction("reconstruction-final.png")
            self._final_summary()
        return status

    def _backend_notice(self) -> None:
        """--backend triton where Triton cannot run (a CPU without TRITON_INTERPRET=1): the model's ops fall
        back to the PyTorch references, which the run says once instead of claiming the kernels."""
        if self.cfg.backend != "triton":
            return
        import kernels

        if not kernels.triton_can_run(torch.empty(0, device=self.device)):
            logger.warning("--backend triton: Triton kernels cannot run on %s here (no CUDA GPU, TRITON_INTERPRET "
                           "unset), so the PyTorch reference ops run instead (same results, usually slower); use "
                           "--backend torch to say so, or a GPU for the kernels", self.device)

    def _final_summary(self) -> None:
        seconds = time.perf_counter() - self.started[0]
        steps = self.step - self.started[1]
        first, last = self.loss_range
        losses = f"loss {first:.4f} -> {last:.4f} (first and last logged)" if first is not None else "no loss logged"
        written = [LAST, "metrics.jsonl", "reconstruction-final.png", LOSS_PLOT]
        logger.info("finished: %d steps (%d this run) in %s, %d images seen this run; %s; files in %s: %s",
                    self.step, steps, format_duration(seconds), steps * self.eff_batch, losses, self.out,
                    ", ".join(name for name in written if (self.out / name).exists()))

    def _loop(self, log: MetricsLog, bar: ProgressBar, stop: StopRequest) -> int:
        """0 when done, 130 when stopped on request (saved), 1 on a non-finite loss (not saved)."""
        args = self.args
        loss_sum = torch.zeros((), device=self.device)
        summary = Summary(self.device, self.step)
        bad_step = torch.full((), -1, dtype=torch.long, device=self.device)  # first step with a non-finite loss
        window = Window()
        self.net.train()
        while self.step < self.total_steps:
            self.loader.set_epoch(self.epoch, start_batch=self.batch_in_epoch)
            batches = iter(self.loader)
            while self.batch_in_epoch < self.batches_per_epoch and self.step < self.total_steps:
                try:
                    loss, waited = self.optimizer_step(batches)
                except Exception:
                    if not stop.requested:
                        raise
                    # The signal also ended the loader (e.g. SIGTERM to the process group): drop the
                    # unfinished step, whose gradients were never applied, and save the last complete one.
                    logger.warning("data loading stopped with the signal; the unfinished step is dropped")
                    self.optimizer.zero_grad(set_to_none=True)
                    return self._save_and_stop(bad_step)
                loss_sum += loss
                summary.add(loss)
                bad_step = torch.where((bad_step < 0) & ~torch.isfinite(loss), self.step, bad_step)
                self.step += 1
                self.batch_in_epoch += args.accum_iter
                window.tick(waited)
                bar.advance()

                at_log = self.step % args.log_every == 0 or self.step == self.total_steps
                # One process decides alone; several agree at log steps, so that all save the same step.
                stopping = self._stop_agreed(stop.requested) if at_log or not self.dist.enabled else False
                if at_log or stopping:
                    if not self._log(log, bar, loss_sum, bad_step, window):
                        return 1
                    loss_sum.zero_()
                    window = Window()
                if stopping:
                    return self._save_and_stop(bad_step)
                if args.save_every and self.step % args.save_every == 0 and not self._checked_save(bad_step):
                    return 1
            if self.batch_in_epoch >= self.batches_per_epoch:  # the epoch is complete
                self.epoch += 1
                self.batch_in_epoch = 0
                keep = args.keep_every > 0 and (self.epoch % args.keep_every == 0 or self.epoch == args.epochs)
                if not self._checked_save(bad_step, keep=keep):
                    return 1
                if self.dist.is_main and args.recon_every and self.epoch % args.recon_every == 0:
                    self.reconstruction(f"reconstruction-ep{self.epoch:04d}.png")
                if self.step - summary.first_step >= SUMMARY_MIN_STEPS or self.step >= self.total_steps:
                    self._summary_line(summary)
                    summary = Summary(self.device, self.step)
        if summary.steps:  # --max_steps ended the run inside an epoch
            self._summary_line(summary)
        return 0 if self._checked_save(bad_step) else 1

    def _summary_line(self, summary: Summary) -> None:
        """One line that stays on screen above the bar: the epochs just finished. Collective under DDP."""
        loss = distributed.mean_across_ranks(summary.loss_sum / (summary.steps * self.args.accum_iter)).item()
        seconds = time.perf_counter() - summary.start
        img_per_s = summary.steps * self.eff_batch / max(seconds, 1e-9)
        logger.info("epoch %d/%d  step %d/%d  loss %.4f (mean of steps %d-%d)  lr %.2e  %.0f img/s  elapsed %s",
                    self.epoch, self.args.epochs, self.step, self.total_steps, loss, summary.first_step + 1,
                    self.step, self.optimizer.param_groups[0]["lr"], img_per_s,
                    format_duration(time.perf_counter() - self.started[0]))

    def _save_and_stop(self, bad_step: torch.Tensor) -> int:
        if not self._checked_save(bad_step):
            return 1
        logger.warning("stopped at step %d; checkpoint saved to %s; run the same command to resume",
                       self.step, self.out / LAST)
        return 130

    def _stop_agreed(self, requested: bool) -> bool:
        """Whether any process was asked to stop (all processes agree, so they save at the same step)."""
        if not self.dist.enabled:
            return requested
        return distributed.mean_across_ranks(torch.tensor(float(requested), device=self.device)).item() > 0

    def _checked_save(self, bad_step: torch.Tensor, keep: bool = False) -> bool:
        """Save unless a non-finite loss was seen (then the last good checkpoint stays as it is)."""
        if self._report_non_finite(bad_step):
            return False
        self.save(keep=keep)
        return True

    def _report_non_finite(self, bad_step: torch.Tensor) -> bool:
        """True (and an error naming the step) if any process has seen a non-finite loss."""
        seen = distributed.mean_across_ranks((bad_step >= 0).float()).item() > 0
        if seen:
            where = f"step {int(bad_step.item()) + 1}" if bad_step.item() >= 0 else "another process's step"
            logger.error("non-finite loss at %s: stopping without saving; %s", where, self.checkpoint_note())
        return seen

    def _log(self, log: MetricsLog, bar: ProgressBar, loss_sum, bad_step, window: Window) -> bool:
        if self._report_non_finite(bad_step):
            return False
        args = self.args
        loss = distributed.mean_across_ranks(loss_sum / (window.steps * args.accum_iter)).item()
        elapsed = window.elapsed()
        img_per_s = window.steps * args.accum_iter * args.batch_size * self.dist.world_size / elapsed
        record = {"step": self.step, "epoch": round(self.epoch + self.batch_in_epoch / self.batches_per_epoch, 4),
                  "loss": loss, "lr": self.optimizer.param_groups[0]["lr"], "img_per_s": round(img_per_s, 2),
                  "data_wait": round(window.waited / elapsed, 4)}
        if self.device.type == "cuda":
            record["max_mem_mb"] = round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)
            if self.peak:
                record["mfu"] = round(self.flops_per_image * img_per_s / (self.peak * self.dist.world_size), 4)
        log.write(record)
        first = self.loss_range[0]
        self.loss_range = (loss if first is None else first, loss)
        stats = (f"epoch {record['epoch']:.2f}  loss {loss:.4f}  lr {record['lr']:.2e}  {img_per_s:.0f} img/s  "
                 f"data wait {record['data_wait']:.0%}")
        bar.show(stats)
        if bar.progress is None:
            logger.info("step %d/%d  %s", self.step, self.total_steps, stats)
        return True


class Summary:
    """The loss (summed on the device: no host sync per step), steps and time since the last summary line."""

    def __init__(self, device: torch.device, first_step: int):
        self.loss_sum = torch.zeros((), device=device)
        self.first_step, self.steps, self.start = first_step, 0, time.perf_counter()

    def add(self, loss: torch.Tensor) -> None:
        self.loss_sum += loss
        self.steps += 1


def format_duration(seconds: float) -> str:
    """2:05 or 1:02:05."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Window:
    """Wall time, data wait and steps since the last log line."""

    def __init__(self):
        self.start = time.perf_counter()
        self.waited = 0.0
        self.steps = 0

    def tick(self, waited: float) -> None:
        self.waited += waited
        self.steps += 1

    def elapsed(self) -> float:
        return max(time.perf_counter() - self.start, 1e-9)


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status: 0 done, 1 stopped by a fault (non-finite loss, a failed
    write), 2 refused (flags, folder, checkpoint), 130 interrupted."""
    trainer = None
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        cfg = check_args(parser, args)
        is_main = int(os.environ.get("RANK", 0)) == 0
        setup_logging(is_main)
        lock, clean = None, False
        try:
            try:
                lock = open_output_dir(args.output_dir) if is_main else None
                dist_info = distributed.init_distributed(args.device)
                trainer = Trainer(args, cfg, dist_info)
            except (FileNotFoundError, ValueError) as e:
                logger.error("%s", e)
                return 2
            status = trainer.run()
            clean = True  # every rank ends here together
            return status
        except OSError as e:  # a full disk or a folder gone read-only mid-run; CheckpointWriteError says more
            logger.error("%s", e if isinstance(e, CheckpointWriteError) else
                         f"cannot write {e.filename or 'an output file'} ({e.strerror or e}); "
                         f"{trainer.checkpoint_note() if trainer else 'nothing was saved'}")
            return 1
        finally:
            if trainer is not None:
                trainer.close()
            distributed.shutdown(sync=clean)
            if lock is not None:
                lock.release()
    except KeyboardInterrupt:
        # Ctrl-C before the loop's handler is installed (start-up), or a second Ctrl-C inside it.
        if trainer is None:
            print("interrupted during start-up; nothing was saved", file=sys.stderr)
        else:
            print(f"interrupted: the step in progress is not saved; {trainer.checkpoint_note()}; run the same "
                  "command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    distributed.exit_process(main())
