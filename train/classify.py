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

Flags and recipes: train/config/classify.py (configs/finetune/, configs/linprobe/). The run folder's lock and
checkpoints, the training step, Ctrl-C / SIGTERM and the non-finite stop are pre-training's parts
(train/checkpointing.py, train/step.py, train/run_control.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from model import create_classifier, read_checkpoint
from model.official import short_list
from model.timm_format import load_encoder_weights
from train import distributed
from train.backend_check import choose_backend, classify_workload
from train.checkpoint import rng_state, set_rng_state
from train.checkpointing import CheckpointManager
from train.config import compare, saved_settings, to_dict
from train.config.classify import ClassifyAugment, ResolvedClassify, parse_classify, write_resolved
from train.data import build_loader
from train.data.augment import mixup_cutmix, rand_augment, random_erase, soft_target_cross_entropy
from train.monitor import MetricsLog
from train.optim import LARS, check_lr, layer_decay_groups, lr_at
from train.run_control import NonFiniteGuard, RunStopped, StopRequest, execute
from train.step import TrainStep, resolve_precision

logger = logging.getLogger("train")

FORMAT = "crossmae-classify-v1"
BEST = "checkpoint-best.pth"


def accuracy_counts(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> torch.Tensor:
    """Number of samples whose label is among the top-k predictions, for each k: (len(ks),)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hit = top == labels.view(-1, 1)
    return torch.stack([hit[:, :k].any(dim=1).sum() for k in ks])


class Classification:
    """The objective of fine-tuning and probing: soft-target cross-entropy of the classifier's logits, after
    the fine-tuning recipe's augmentation (RandAugment, mixup / CutMix with label smoothing, random erasing,
    drawn from per-epoch seeded generators; ``inputs`` runs outside autocast) or plain one-hot targets."""

    def __init__(self, net: torch.nn.Module, num_classes: int, augment: ClassifyAugment | None,
                 device: torch.device):
        self.net, self.num_classes, self.augment = net, num_classes, augment
        self.gen = torch.Generator(device=device)
        self.host_gen = torch.Generator()

    def start_epoch(self, seed: int) -> None:
        self.gen.manual_seed(seed)
        self.host_gen.manual_seed(seed)

    def inputs(self, batch, step: int, micro: int, accum: int) -> tuple[torch.Tensor, torch.Tensor]:
        imgs, labels = batch
        a = self.augment
        if a is None:
            return imgs, F.one_hot(labels, self.num_classes).float()
        if a.randaug:
            imgs = rand_augment(imgs, self.gen)
        imgs, targets = mixup_cutmix(imgs, labels, self.num_classes, self.host_gen, a.mixup, a.cutmix,
                                     smoothing=a.smoothing)
        if a.reprob > 0:
            imgs = random_erase(imgs, self.gen, prob=a.reprob)
        return imgs, targets

    def loss(self, imgs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return soft_target_cross_entropy(self.net(imgs), targets)


def read_classify_checkpoint(mode: str) -> Callable[[Path], dict]:
    """The reader of this mode's checkpoints for the checkpoint manager: another file is refused."""

    def read(path: Path) -> dict:
        ckpt = read_checkpoint(path)
        if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT or ckpt.get("mode") != mode:
            raise ValueError(f"{path} is not a train.{mode} checkpoint: use another --output_dir")
        return ckpt

    return read


class ClassifyRun:
    """A fine-tuning or probing run: the parts of pre-training (the run folder's lock and checkpoints, the one
    training step, the stop rules) around a per-epoch loop that evaluates after every epoch. Resumption is per
    epoch: a stopped or killed run continues from the start of the epoch it was in."""

    def __init__(self, resolved: ResolvedClassify, dist_info: distributed.DistInfo, checkpoints: CheckpointManager):
        self.resolved, self.dist, self.device, self.checkpoints = resolved, dist_info, dist_info.device, checkpoints
        self.mode = resolved.mode
        c = resolved.config
        m, o, r = c.model, c.optim, c.run
        self.model_opts, self.optim_opts, self.run_opts = m, o, r
        self.out = Path(r.output_dir)
        self.finetune = self.mode == "finetune"
        root = Path(resolved.data_root)
        common = dict(img_size=m.img_size, backend=c.data.data_backend, device=self.device, rank=dist_info.rank,
                      world_size=dist_info.world_size, seed=r.seed, num_workers=c.data.num_workers, with_labels=True,
                      scan_threads=c.data.scan_threads)
        self.train_loader = build_loader(root / "train", batch_size=o.batch_size, train=True, **common)
        self.val_loader = build_loader(root / "val", batch_size=o.batch_size, train=False, **common)
        if self.train_loader.classes != self.val_loader.classes:
            raise ValueError(f"train/ and val/ under {root} hold different classes: "
                             f"{self.train_loader.classes[:5]}... vs {self.val_loader.classes[:5]}...")
        self.num_classes = len(self.train_loader.classes)
        self.steps_per_epoch = len(self.train_loader) // o.accum_iter
        if self.steps_per_epoch < 1:
            raise ValueError(f"{root / 'train'} yields {len(self.train_loader)} batches per process, fewer than "
                             f"--accum_iter={o.accum_iter}")

        # --backend auto / triton: on CUDA, the fused path's check on this card (or its cached verdict) decides.
        shape = dict(global_pool=m.global_pool, drop_path=m.drop_path, linear_probe=not self.finetune)
        backend, reference_ops = choose_backend(m.backend, classify_workload(
            m.model, resolved.model_config, self.num_classes, shape, o.batch_size,
            resolve_precision(o.precision, self.device), self.device, r.seed), self.out)
        torch.manual_seed(r.seed)
        self.model = create_classifier(m.model, self.num_classes, img_size=m.img_size, patch_size=m.patch_size,
                                       backend=backend, reference_ops=reference_ops, **shape)
        self.eff_batch = o.batch_size * o.accum_iter * dist_info.world_size
        self.lr = check_lr(o.lr if o.lr is not None else o.blr * self.eff_batch / 256, o.min_lr,
                           "--lr" if o.lr is not None else f"--blr {o.blr:g}")
        self.epoch, self.step, self.best_top1 = 0, 0, -1.0
        found = checkpoints.resume(None, self._accept)
        if found is None:
            self._init_encoder()
        if not self.finetune:
            for name, p in self.model.named_parameters():
                p.requires_grad = name.startswith("head.")
        self.model.to(self.device)
        self.optimizer = self._build_optimizer()
        if found is not None:
            self.load_state_dict(found.state)
            logger.info("resumed from %s after epoch %d (best top-1 %.2f%%)", found.path, self.epoch, self.best_top1)

        self.ddp = distributed.wrap_ddp(self.model, dist_info)
        self.net = self.ddp if self.ddp is not None else self.model
        self.objective = Classification(self.net, self.num_classes, c.augment if self.finetune else None,
                                        self.device)
        self.train_step = TrainStep(self.optimizer, self.objective, precision=o.precision, device=self.device,
                                    accum_iter=o.accum_iter, ddp=self.ddp)
        self.guard = NonFiniteGuard(self.device)

    def _init_encoder(self) -> None:
        weights = self.model_opts.finetune
        if weights:
            unused = load_encoder_weights(self.model, weights)  # ours, the authors', or timm's layout
            logger.info("loaded the encoder of %s (%d entries not used: %s)", weights, len(unused),
                        short_list(unused))
        else:
            logger.warning("no --finetune checkpoint: the encoder starts from random initialisation")

    def _build_optimizer(self) -> torch.optim.Optimizer:
        o = self.optim_opts
        if self.finetune:
            groups = layer_decay_groups(self.model, o.weight_decay, o.layer_decay)
            return torch.optim.AdamW(groups, lr=self.lr, betas=(0.9, 0.999))
        head = [p for p in self.model.parameters() if p.requires_grad]
        if o.optimizer == "lars":
            return LARS(head, lr=self.lr, weight_decay=o.weight_decay)
        return torch.optim.SGD(head, lr=self.lr, momentum=0.9, weight_decay=o.weight_decay)

    # -- state ----------------------------------------------------------------------------------------

    def _accept(self, state: dict, source: Path) -> None:
        refused, warned = compare(saved_settings(state), self.resolved.config)
        if state.get("classes") != list(self.train_loader.classes):
            refused.append("classes")
        if refused:
            raise ValueError(f"{source} was written by a run with other settings ({', '.join(refused)}): "
                             "repeat its flags, or use another --output_dir")
        if warned:
            logger.warning("resuming %s with changed settings: %s", source, ", ".join(warned))

    def state_dict(self) -> dict:
        return {"format": FORMAT, "mode": self.mode, "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "epoch": self.epoch, "step": self.step,
                "best_top1": self.best_top1, "classes": list(self.train_loader.classes),
                "rng": distributed.all_gather_objects(rng_state()), "world_size": self.dist.world_size,
                "config": to_dict(self.resolved.config)}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch, self.best_top1 = state["epoch"], state["best_top1"]
        self.step = state.get("step", self.epoch * self.steps_per_epoch)  # checkpoints before "step" was saved
        states = state.get("rng", [])
        if len(states) == self.dist.world_size:  # checkpoints before "rng" was saved: not restored
            set_rng_state(states[self.dist.rank])

    # -- loops ----------------------------------------------------------------------------------------

    def train_epoch(self, stop: StopRequest) -> dict:
        o, log_every = self.optim_opts, self.run_opts.log_every
        self.net.train()
        self.train_loader.set_epoch(self.epoch)
        self.objective.start_epoch((self.run_opts.seed * 1_000_003 + self.dist.rank) * 10_007 + self.epoch)
        batches = iter(self.train_loader)
        loss_sum = torch.zeros((), device=self.device)
        start = time.perf_counter()
        for step in range(self.steps_per_epoch):
            lr = lr_at(self.epoch + step / self.steps_per_epoch, self.lr, o.min_lr, o.warmup_epochs, o.epochs)
            loss, _ = self.train_step(batches, self.step + step, lr)
            self.guard.observe(loss, self.step + step)
            loss_sum += loss
            at_log = (step + 1) % log_every == 0
            if at_log or not self.dist.enabled:
                if stop.agreed(self.device):
                    self.guard.check(self.checkpoints.note())
                    logger.warning("stopped in epoch %d; %s; run the same command to resume (the epoch runs again)",
                                   self.epoch + 1, self.checkpoints.note())
                    raise RunStopped
            if at_log:
                self.guard.check(self.checkpoints.note())
                logger.info("epoch %d step %d/%d  loss %.4f", self.epoch, step + 1, self.steps_per_epoch,
                            (loss_sum / ((step + 1) * o.accum_iter)).item())
        self.guard.check(self.checkpoints.note())
        elapsed = time.perf_counter() - start
        loss = distributed.mean_across_ranks(loss_sum / (self.steps_per_epoch * o.accum_iter)).item()
        images = self.steps_per_epoch * o.accum_iter * o.batch_size * self.dist.world_size
        return {"train_loss": loss, "lr": self.optimizer.param_groups[-1]["lr"],
                "img_per_s": round(images / elapsed, 2)}

    @torch.no_grad()
    def evaluate(self) -> dict:
        self.net.eval()
        self.val_loader.set_epoch(0)
        hits = torch.zeros(2, device=self.device)
        loss_sum = torch.zeros((), device=self.device)
        count = torch.zeros((), device=self.device)
        dtype = self.train_step.autocast_dtype
        for imgs, labels in self.val_loader:
            with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
                logits = self.net(imgs).float()
            hits += accuracy_counts(logits, labels)
            loss_sum += F.cross_entropy(logits, labels, reduction="sum")
            count += labels.shape[0]
        totals = torch.cat([hits, loss_sum.view(1), count.view(1)])
        if self.dist.enabled:
            torch.distributed.all_reduce(totals)
        top1, top5, loss, n = totals.tolist()
        return {"val_top1": 100 * top1 / n, "val_top5": 100 * top5 / n, "val_loss": loss / n, "val_images": int(n)}

    def run(self) -> None:
        """Train the remaining epochs. Raises RunStopped on a stop request (the last finished epoch is saved),
        NonFiniteLoss on a non-finite loss, CheckpointWriteError when a save fails."""
        o = self.optim_opts
        # Records are keyed by optimizer step: those after the checkpoint's (written by a run killed before it
        # saved) are set aside, since those epochs run again; those of the epochs it holds are kept.
        log = MetricsLog(self.out, self.dist.is_main, tensorboard=False, resume_step=self.step)
        logger.info("%s %s on %d classes (%d train / %d val images); lr %.3g (blr %.3g, effective batch %d)",
                    self.mode, self.model_opts.model, self.num_classes, self.train_loader.num_images,
                    self.val_loader.num_images, self.lr, o.blr, self.eff_batch)
        try:
            with StopRequest() as stop:
                while self.epoch < o.epochs:
                    stats = self.train_epoch(stop)
                    stats.update(self.evaluate())
                    self.epoch += 1
                    self.step += self.steps_per_epoch
                    best = stats["val_top1"] > self.best_top1
                    self.best_top1 = max(self.best_top1, stats["val_top1"])
                    self.checkpoints.save(self.state_dict, self.step, keep_as=BEST if best else None)
                    log.write({"step": self.step, "epoch": self.epoch, **stats, "best_top1": self.best_top1})
                    logger.info("epoch %d/%d  train loss %.4f  val top-1 %.2f%%  top-5 %.2f%%  (best %.2f%%)",
                                self.epoch, o.epochs, stats["train_loss"], stats["val_top1"], stats["val_top5"],
                                self.best_top1)
        finally:
            log.close()
        logger.info("done: best val top-1 %.2f%%; outputs in %s", self.best_top1, self.out)

    def close(self) -> None:
        self.net = self.ddp = self.train_step = self.objective = None


def main(mode: str, argv: list[str] | None = None) -> int:
    """The command line of train.finetune / train.linprobe; exit statuses as train.pretrain's."""
    return execute(lambda: parse_classify(mode, argv), ClassifyRun, read_classify_checkpoint(mode), write_resolved,
                   kept_glob=None)
