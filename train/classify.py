"""Fine-tuning and linear probing of a pre-trained encoder: one loop, two recipes.

``train.finetune`` (SPEC.md section 2, paper Table 11): AdamW (0.9, 0.999), layer-wise lr decay,
drop path, RandAugment, mixup / CutMix with label smoothing, random erasing, global average pooling
+ fc_norm. Its defaults are the digits demo's small-data recipe (a higher lr, none of the four
augmentations; see train/finetune.py); the ImageNet command sets the paper's. ``train.linprobe``
(MAE's recipe): the encoder frozen, a BatchNorm without affine before the linear head, LARS (or SGD),
crop and flip only, the cls token after the final norm.

Both read ``<data_path>/train`` and ``<data_path>/val`` image folders (labels from the class folder
names), evaluate top-1 / top-5 on the validation folder after every epoch, keep
``checkpoint-last.pth`` (atomic, resumed by re-running the command) and ``checkpoint-best.pth``,
and append one JSON line per epoch to ``metrics.jsonl``. Resumption is per epoch: an interrupted
epoch is run again from its start.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from model import classifier_names, create_classifier, read_checkpoint
from model.official import short_list
from model.timm_format import encoder_geometry, load_encoder_weights, read_weights, weights_entry
from train import distributed
from train.checkpoint import LAST, save_atomic
from train.data import BACKENDS as DATA_BACKENDS
from train.data import build_loader, resolve_data_path
from train.data.augment import mixup_cutmix, rand_augment, random_erase, soft_target_cross_entropy
from train.monitor import MetricsLog, setup_logging
from train.optim import LARS, layer_decay_groups, lr_at, set_scaled_lr
from train.pretrain import DefaultsOnceHelpFormatter

logger = logging.getLogger("train")

FORMAT = "crossmae-classify-v1"
BEST = "checkpoint-best.pth"

# Defaults: the embedded digits demo (runs offline on a CPU). ImageNet commands are in the docstrings of
# train/finetune.py and train/linprobe.py.
DEMO_IMG_SIZE = 32
RECIPES = {
    "finetune": dict(batch_size=64, epochs=10, warmup_epochs=1, blr=4e-3, weight_decay=0.05, layer_decay=0.75,
                     drop_path=0.1, global_pool="avg", optimizer="adamw", mixup=0.0, cutmix=0.0, smoothing=0.1,
                     reprob=0.0, randaug=False, output_dir="output/finetune"),
    # The ImageNet recipe (blr 5e-4, mixup, CutMix, RandAugment, random erasing) is for 100 epochs of 1.28M images:
    # on 1,438 digits of 32 pixels in 220 steps its lr (1.25e-4 at batch 64) barely moves the head and its
    # augmentations hide most of a digit, so the demo trains at 8x the lr without them (README, issue #12).
    # MAE's probe is LARS at blr 0.1 on the cls token (see the README's ImageNet command); at the demo's scale
    # (1,438 images, batch 128) LARS barely moves the head, so the demo defaults to SGD on averaged tokens.
    "linprobe": dict(batch_size=128, epochs=10, warmup_epochs=1, blr=0.2, weight_decay=0.0, layer_decay=1.0,
                     drop_path=0.0, global_pool="avg", optimizer="sgd", mixup=0.0, cutmix=0.0, smoothing=0.0,
                     reprob=0.0, randaug=False, output_dir="output/linprobe"),
}


def build_parser(mode: str) -> argparse.ArgumentParser:
    r = RECIPES[mode]
    what = "Fine-tune" if mode == "finetune" else "Linear-probe"
    p = argparse.ArgumentParser(prog=f"python -m train.{mode}", formatter_class=DefaultsOnceHelpFormatter,
                                description=f"{what} a pre-trained encoder on <data_path>/train, evaluating on "
                                            "<data_path>/val. The defaults are the digits demo's recipe (see the "
                                            "README); ImageNet commands are in the module docstring.")
    p.add_argument("--model", default="vit_tiny_patch8", help=f"encoder: one of {', '.join(classifier_names())}")
    p.add_argument("--finetune", default=None, help="pre-trained weights: a pre-training checkpoint (ours or the "
                                                     "authors') or timm ViT weights (.safetensors / .pth, e.g. from "
                                                     "train.export) (default: none, random initialisation)")
    p.add_argument("--img_size", type=int, default=None,
                   help=f"input size (default: the --finetune checkpoint's, else {DEMO_IMG_SIZE})")
    p.add_argument("--patch_size", type=int, default=None,
                   help="patch size (default: the --finetune checkpoint's, else the model's)")
    p.add_argument("--data_path", default="digits", help="folder with train/ and val/ image folders, or 'digits'")
    p.add_argument("--data_backend", choices=DATA_BACKENDS, default="auto", help="image loader")
    p.add_argument("--num_workers", type=int, default=2, help="loader workers (DALI threads)")
    p.add_argument("--batch_size", type=int, default=r["batch_size"], help="images per process and step")
    p.add_argument("--accum_iter", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--epochs", type=int, default=r["epochs"], help="training epochs")
    p.add_argument("--warmup_epochs", type=float, default=r["warmup_epochs"], help="linear lr warmup, in epochs")
    p.add_argument("--blr", type=float, default=r["blr"], help="base lr: lr = blr * eff_batch / 256")
    p.add_argument("--lr", type=float, default=None, help="absolute lr (default: from --blr)")
    p.add_argument("--min_lr", type=float, default=1e-6 if mode == "finetune" else 0.0,
                   help="lr at the end of the cosine schedule")
    p.add_argument("--weight_decay", type=float, default=r["weight_decay"], help="weight decay")
    p.add_argument("--global_pool", choices=("avg", "token"), default=r["global_pool"],
                   help="features: average of the patch tokens + fc_norm, or the cls token after the final norm")
    if mode == "finetune":
        p.add_argument("--layer_decay", type=float, default=r["layer_decay"],
                       help="layer-wise lr decay: the head trains at lr, block i of d at lr * "
                            "layer_decay^(d - i), the embeddings at lr * layer_decay^(d + 1)")
        p.add_argument("--drop_path", type=float, default=r["drop_path"], help="stochastic depth rate of the last "
                                                                               "block")
        p.add_argument("--mixup", type=float, default=r["mixup"], help="mixup alpha (0 = off)")
        p.add_argument("--cutmix", type=float, default=r["cutmix"], help="CutMix alpha (0 = off)")
        p.add_argument("--smoothing", type=float, default=r["smoothing"], help="label smoothing")
        p.add_argument("--reprob", type=float, default=r["reprob"], help="random erasing probability")
        p.add_argument("--randaug", action=argparse.BooleanOptionalAction, default=r["randaug"],
                       help="RandAugment, 2 ops at magnitude 9 (std 0.5)")
    else:
        p.add_argument("--optimizer", choices=("lars", "sgd"), default=r["optimizer"],
                       help="LARS (MAE's ImageNet probe) or SGD with momentum 0.9")
    p.add_argument("--precision", choices=("bf16", "fp32"), default=None,
                   help="autocast dtype (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None,
                   help="training device (default: cuda if visible, else cpu)")
    p.add_argument("--output_dir", default=r["output_dir"], help="checkpoints and metrics.jsonl; a run resumes "
                                                                 "from the checkpoint found here")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation, data order and augmentation")
    p.add_argument("--log_every", type=int, default=20, help="log the running loss every N steps")
    p.set_defaults(mode=mode)
    return p


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


def resolve_encoder_size(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Fill --img_size / --patch_size from the --finetune checkpoint (their defaults), or refuse values that
    contradict it: the position table and the patch conv only fit the size they were trained at."""
    if args.finetune is None:
        if args.img_size is None:
            args.img_size = DEMO_IMG_SIZE
        return
    try:
        img_size, patch_size = encoder_size_of(args.finetune)
    except (KeyError, ValueError, TypeError) as e:
        p.error(f"--finetune {args.finetune}: {e}")
    for flag, given, saved in (("img_size", args.img_size, img_size), ("patch_size", args.patch_size, patch_size)):
        if given is not None and given != saved:
            p.error(f"--{flag} {given}: the encoder in {args.finetune} was pre-trained with {flag} {saved}; "
                    f"omit --{flag} (it defaults to the checkpoint's)")
    args.img_size, args.patch_size = img_size, patch_size


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name, low in {"batch_size": 1, "accum_iter": 1, "epochs": 1, "log_every": 1, "num_workers": 0,
                      "img_size": 1, "patch_size": 1}.items():
        if getattr(args, name) is not None and getattr(args, name) < low:
            p.error(f"--{name} must be >= {low}, got {getattr(args, name)}")
    if not 0 <= args.warmup_epochs <= args.epochs:
        p.error(f"--warmup_epochs must be in [0, --epochs={args.epochs}], got {args.warmup_epochs}")
    for name in ("blr", "lr", "min_lr", "weight_decay"):
        value = getattr(args, name)
        if value is not None and (value < 0 or not math.isfinite(value)):
            p.error(f"--{name} must be a finite number >= 0, got {value}")
    if args.mode == "finetune":
        if not 0 < args.layer_decay <= 1:
            p.error(f"--layer_decay must be in (0, 1], got {args.layer_decay}")
        if not 0 <= args.smoothing < 1 or not 0 <= args.reprob <= 1:
            p.error("--smoothing must be in [0, 1) and --reprob in [0, 1]")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU is visible; use --device cpu")
    if args.finetune is not None and not Path(args.finetune).is_file():
        p.error(f"--finetune {args.finetune}: no such file")
    resolve_encoder_size(p, args)
    try:
        root = resolve_data_path(args.data_path)
    except (FileNotFoundError, ValueError) as e:
        p.error(f"--data_path: {e}")
    for split in ("train", "val"):
        if root is None or not (root / split).is_dir():
            p.error(f"--data_path {args.data_path}: expected the folders {split}/ (and train/, val/) inside "
                    f"{root}, each holding <class>/<image> files")
    args.data_root = str(root)
    try:
        create_classifier(args.model, 1, img_size=args.img_size, patch_size=args.patch_size, backend="torch")
    except ValueError as e:
        p.error(str(e))


def accuracy_counts(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> torch.Tensor:
    """Number of samples whose label is among the top-k predictions, for each k: (len(ks),)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hit = top == labels.view(-1, 1)
    return torch.stack([hit[:, :k].any(dim=1).sum() for k in ks])


class ClassifyRun:
    def __init__(self, args: argparse.Namespace, dist_info: distributed.DistInfo):
        self.args, self.dist, self.device = args, dist_info, dist_info.device
        self.out = Path(args.output_dir)
        self.finetune = args.mode == "finetune"
        self.autocast_dtype = torch.bfloat16 if (args.precision or (
            "bf16" if self.device.type == "cuda" else "fp32")) == "bf16" else None
        root = Path(args.data_root)
        common = dict(img_size=args.img_size, backend=args.data_backend, device=self.device, rank=dist_info.rank,
                      world_size=dist_info.world_size, seed=args.seed, num_workers=args.num_workers, with_labels=True)
        self.train_loader = build_loader(root / "train", batch_size=args.batch_size, train=True, **common)
        self.val_loader = build_loader(root / "val", batch_size=args.batch_size, train=False, **common)
        if self.train_loader.classes != self.val_loader.classes:
            raise ValueError(f"train/ and val/ under {root} hold different classes: "
                             f"{self.train_loader.classes[:5]}... vs {self.val_loader.classes[:5]}...")
        self.num_classes = len(self.train_loader.classes)
        self.steps_per_epoch = len(self.train_loader) // args.accum_iter
        if self.steps_per_epoch < 1:
            raise ValueError(f"{root / 'train'} yields {len(self.train_loader)} batches per process, fewer than "
                             f"--accum_iter={args.accum_iter}")

        torch.manual_seed(args.seed)
        self.model = create_classifier(args.model, self.num_classes, global_pool=args.global_pool,
                                       drop_path=getattr(args, "drop_path", 0.0), linear_probe=not self.finetune,
                                       img_size=args.img_size, patch_size=args.patch_size)
        if args.finetune:
            unused = load_encoder_weights(self.model, args.finetune)  # ours, the authors', or timm's layout
            logger.info("loaded the encoder of %s (%d entries not used: %s)", args.finetune, len(unused),
                        short_list(unused))
        else:
            logger.warning("no --finetune checkpoint: the encoder starts from random initialisation")
        if not self.finetune:
            for name, p in self.model.named_parameters():
                p.requires_grad = name.startswith("head.")
        self.model.to(self.device)

        self.eff_batch = args.batch_size * args.accum_iter * dist_info.world_size
        self.lr = args.lr if args.lr is not None else args.blr * self.eff_batch / 256
        if self.finetune:
            groups = layer_decay_groups(self.model, args.weight_decay, args.layer_decay)
            self.optimizer = torch.optim.AdamW(groups, lr=self.lr, betas=(0.9, 0.999))
        else:
            head = [p for p in self.model.parameters() if p.requires_grad]
            if args.optimizer == "lars":
                self.optimizer = LARS(head, lr=self.lr, weight_decay=args.weight_decay)
            else:
                self.optimizer = torch.optim.SGD(head, lr=self.lr, momentum=0.9, weight_decay=args.weight_decay)
        self.epoch, self.step, self.best_top1 = 0, 0, -1.0
        self._resume()
        self.net = (DistributedDataParallel(self.model, device_ids=[self.device.index] if self.device.type == "cuda"
                                            else None) if dist_info.enabled else self.model)
        self.gen = torch.Generator(device=self.device)
        self.host_gen = torch.Generator()

    # -- state ----------------------------------------------------------------------------------------

    def _resume(self) -> None:
        path = self.out / LAST
        if not path.exists():
            return
        ckpt = read_checkpoint(path)
        if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT or ckpt.get("mode") != self.args.mode:
            raise ValueError(f"{path} is not a train.{self.args.mode} checkpoint: use another --output_dir")
        changed = [f"--{k} {ckpt['args'].get(k)!r} -> {getattr(self.args, k)!r}"
                   for k in ("model", "img_size", "patch_size", "global_pool")
                   if ckpt["args"].get(k) != getattr(self.args, k)]
        if changed or ckpt.get("classes") != list(self.train_loader.classes):
            raise ValueError(f"{path} was written by a run with other settings ({', '.join(changed) or 'classes'}): "
                             "repeat its flags, or use another --output_dir")
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.epoch, self.best_top1 = ckpt["epoch"], ckpt["best_top1"]
        self.step = ckpt.get("step", self.epoch * self.steps_per_epoch)  # checkpoints before "step" was saved
        logger.info("resumed from %s after epoch %d (best top-1 %.2f%%)", path, self.epoch, self.best_top1)

    def _save(self, best: bool) -> None:
        if not self.dist.is_main:
            return
        state = {"format": FORMAT, "mode": self.args.mode, "model": self.model.state_dict(),
                 "optimizer": self.optimizer.state_dict(), "epoch": self.epoch, "step": self.step,
                 "best_top1": self.best_top1,
                 "classes": list(self.train_loader.classes), "args": dict(vars(self.args))}
        save_atomic(state, self.out / LAST)
        if best:
            save_atomic(state, self.out / BEST)

    # -- loops ----------------------------------------------------------------------------------------

    def _augment(self, imgs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fine-tuning augmentation on the batch; returns images and soft targets."""
        args = self.args
        if not self.finetune:
            return imgs, F.one_hot(labels, self.num_classes).float()
        if args.randaug:
            imgs = rand_augment(imgs, self.gen)
        imgs, targets = mixup_cutmix(imgs, labels, self.num_classes, self.host_gen, args.mixup, args.cutmix,
                                     smoothing=args.smoothing)
        if args.reprob > 0:
            imgs = random_erase(imgs, self.gen, prob=args.reprob)
        return imgs, targets

    def train_epoch(self) -> dict:
        args = self.args
        self.net.train()
        self.train_loader.set_epoch(self.epoch)
        seed = (args.seed * 1_000_003 + self.dist.rank) * 10_007 + self.epoch
        self.gen.manual_seed(seed)
        self.host_gen.manual_seed(seed)
        batches = iter(self.train_loader)
        loss_sum = torch.zeros((), device=self.device)
        start = time.perf_counter()
        for step in range(self.steps_per_epoch):
            set_scaled_lr(self.optimizer, lr_at(self.epoch + step / self.steps_per_epoch, self.lr, args.min_lr,
                                                args.warmup_epochs, args.epochs))
            for micro in range(args.accum_iter):
                imgs, labels = next(batches)
                imgs, targets = self._augment(imgs, labels)
                last = micro == args.accum_iter - 1
                with (self.net.no_sync() if self.dist.enabled and not last else contextlib.nullcontext()):
                    with torch.autocast(self.device.type, dtype=self.autocast_dtype,
                                        enabled=self.autocast_dtype is not None):
                        loss = soft_target_cross_entropy(self.net(imgs), targets)
                    (loss / args.accum_iter).backward()
                loss_sum += loss.detach()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if (step + 1) % args.log_every == 0:
                logger.info("epoch %d step %d/%d  loss %.4f", self.epoch, step + 1, self.steps_per_epoch,
                            (loss_sum / ((step + 1) * args.accum_iter)).item())
        elapsed = time.perf_counter() - start
        loss = distributed.mean_across_ranks(loss_sum / (self.steps_per_epoch * args.accum_iter)).item()
        if not math.isfinite(loss):
            raise FloatingPointError(f"non-finite training loss in epoch {self.epoch}")
        images = self.steps_per_epoch * args.accum_iter * args.batch_size * self.dist.world_size
        return {"train_loss": loss, "lr": self.optimizer.param_groups[-1]["lr"],
                "img_per_s": round(images / elapsed, 2)}

    @torch.no_grad()
    def evaluate(self) -> dict:
        self.net.eval()
        self.val_loader.set_epoch(0)
        hits = torch.zeros(2, device=self.device)
        loss_sum = torch.zeros((), device=self.device)
        count = torch.zeros((), device=self.device)
        for imgs, labels in self.val_loader:
            with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
                logits = self.net(imgs).float()
            hits += accuracy_counts(logits, labels)
            loss_sum += F.cross_entropy(logits, labels, reduction="sum")
            count += labels.shape[0]
        totals = torch.cat([hits, loss_sum.view(1), count.view(1)])
        if self.dist.enabled:
            torch.distributed.all_reduce(totals)
        top1, top5, loss, n = totals.tolist()
        return {"val_top1": 100 * top1 / n, "val_top5": 100 * top5 / n, "val_loss": loss / n, "val_images": int(n)}

    def run(self) -> int:
        args = self.args
        self.out.mkdir(parents=True, exist_ok=True)
        # Records are keyed by optimizer step: those after the checkpoint's (written by a run killed before it
        # saved) are set aside, since those epochs run again; those of the epochs it holds are kept.
        log = MetricsLog(self.out, self.dist.is_main, tensorboard=False, resume_step=self.step)
        logger.info("%s %s on %d classes (%d train / %d val images); lr %.3g (blr %.3g, effective batch %d)",
                    args.mode, args.model, self.num_classes, self.train_loader.num_images,
                    self.val_loader.num_images, self.lr, args.blr, self.eff_batch)
        try:
            while self.epoch < args.epochs:
                stats = self.train_epoch()
                stats.update(self.evaluate())
                self.epoch += 1
                self.step += self.steps_per_epoch
                best = stats["val_top1"] > self.best_top1
                self.best_top1 = max(self.best_top1, stats["val_top1"])
                self._save(best)
                log.write({"step": self.step, "epoch": self.epoch, **stats,
                           "best_top1": self.best_top1})
                logger.info("epoch %d/%d  train loss %.4f  val top-1 %.2f%%  top-5 %.2f%%  (best %.2f%%)",
                            self.epoch, args.epochs, stats["train_loss"], stats["val_top1"], stats["val_top5"],
                            self.best_top1)
        except KeyboardInterrupt:
            logger.warning("interrupted in epoch %d; %s holds the last finished epoch, run the same command to "
                           "resume", self.epoch + 1, self.out / LAST)
            return 130
        except FloatingPointError as e:
            logger.error("%s: stopping; %s holds the last good epoch", e, self.out / LAST)
            return 1
        finally:
            log.close()
        logger.info("done: best val top-1 %.2f%%; outputs in %s", self.best_top1, self.out)
        return 0


def main(mode: str, argv: list[str] | None = None) -> int:
    parser = build_parser(mode)
    args = parser.parse_args(argv)
    check_args(parser, args)
    dist_info = distributed.init_distributed(args.device)
    setup_logging(dist_info.is_main)
    try:
        try:
            run = ClassifyRun(args, dist_info)
        except (FileNotFoundError, ValueError, KeyError) as e:
            logger.error("%s", e)
            return 2
        return run.run()
    finally:
        distributed.shutdown()

