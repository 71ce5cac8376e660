"""The pre-training run: built from a resolved config, it constructs its parts and runs the loop.

Parts: the data loader (train/data/), the model and AdamW (train/optim.py), the one training step
(train/step.py), the checkpoint manager (train/checkpointing.py), the reporter (train/reporting.py), the
reconstruction grids (train/grids.py), the k-NN monitor (train/knn.py: at step 0 of a fresh run, every
--knn_every epochs and at the end, after that step's checkpoint; it leaves the RNG states, the data order and
the model's mode as they were), and the stop rules (train/run_control.py). Its own state is the position in the
schedule: ``step``, ``epoch`` and ``batch_in_epoch``; ``state_dict()`` / ``load_state_dict()`` are the one pair
that builds and reads a checkpoint.

Each epoch runs ``len(loader) // accum_iter`` optimizer steps (a tail shorter than one step is not read).
The data order, crops and masks are pure functions of (seed, epoch, position, rank), so a resumed run reads
exactly the batches an uninterrupted run would have read from that step on.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from model import build_model, family_of
from model.official import short_list
from model.timm_format import load_encoder_weights
from train import distributed
from train.backend_check import choose_backend, pretrain_workload
from train.checkpoint import FORMAT, LAST, rng_state, set_rng_state
from train.checkpointing import CheckpointManager
from train.config import compare, flat_settings, saved_settings, to_dict
from train.config.pretrain import ResolvedPretrain
from train.data import DataSourceLost, build_loader
from train.grids import LOSS_PLOT, ReconstructionGrids
from train.knn import KnnMonitor
from train.monitor import peak_flops
from train.optim import build_optimizer, check_lr, lr_at, scaled_lr
from train.reporting import StepReporter
from train.run_control import NonFiniteGuard, RunStopped, StopRequest
from train.step import MaskedAutoencoding, TrainStep, resolve_precision

logger = logging.getLogger("train")

def config_dict(cfg) -> dict[str, Any]:
    """The model config as plain values (tuples as lists, as a checkpoint gives them back)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(cfg).items()}


def differences(state: dict[str, Any], resolved: ResolvedPretrain, world_size: int,
                num_images: int) -> tuple[list[str], list[str]]:
    """(differences that make another experiment, differences only worth a warning) between the run that wrote
    ``state`` and this one, each "name old -> new": the settings by their resume policy, the model config's
    fields no flag sets, the number of processes, the dataset's size."""
    refused, warned = compare(saved_settings(state), resolved.config)
    saved_cfg, cfg = state.get("model_config") or {}, config_dict(resolved.model_config)
    for key in sorted((set(saved_cfg) | set(cfg)) - set(flat_settings(resolved.config))):
        if saved_cfg.get(key) != cfg.get(key):
            refused.append(f"model {key} {saved_cfg.get(key)!r} -> {cfg.get(key)!r}")
    if state.get("world_size", 1) != world_size:
        refused.append(f"processes {state.get('world_size', 1)} -> {world_size}")
    saved_images = state.get("data", {}).get("num_images")
    if saved_images is not None and saved_images != num_images:
        warned.append(f"images {saved_images} -> {num_images} (the data order differs from the run's so far)")
    return refused, warned


def backend_notice(backend: str, device: torch.device) -> None:
    """--backend triton where Triton cannot run (a CPU without TRITON_INTERPRET=1): the model's ops fall back to
    the PyTorch references, which the run says once instead of claiming the kernels."""
    if backend != "triton":
        return
    import kernels

    if not kernels.triton_can_run(torch.empty(0, device=device)):
        logger.warning("--backend triton: Triton kernels cannot run on %s here (no CUDA GPU, TRITON_INTERPRET "
                       "unset), so the PyTorch reference ops run instead (same results, usually slower); use "
                       "--backend torch to say so, or a GPU for the kernels", device)


class PretrainTrainer:
    """One pre-training run (see the module docstring). ``checkpoints`` is the run folder's manager, opened
    (locked) by the caller on rank 0."""

    def __init__(self, resolved: ResolvedPretrain, dist_info: distributed.DistInfo, checkpoints: CheckpointManager):
        self.resolved, self.dist, self.checkpoints = resolved, dist_info, checkpoints
        config, cfg = resolved.config, resolved.model_config
        o, r = config.optim, config.run
        self.cfg, self.optim_cfg, self.run_cfg = cfg, o, r
        self.device = dist_info.device
        self.out = Path(r.output_dir)
        self.precision = resolve_precision(o.precision, self.device)

        self.loader = build_loader(resolved.data_root, batch_size=o.batch_size, img_size=cfg.img_size, train=True,
                                   backend=resolved.data_backend, device=self.device, rank=dist_info.rank,
                                   world_size=dist_info.world_size, seed=r.seed, num_workers=config.data.num_workers,
                                   scan_threads=config.data.scan_threads,
                                   num_images=(config.data.synthetic_images if resolved.data_backend == "synthetic"
                                               else None))
        self.batches_per_epoch = (len(self.loader) // o.accum_iter) * o.accum_iter
        if self.batches_per_epoch < 1:
            raise ValueError(f"{config.data.data_path} yields {len(self.loader)} batches of {o.batch_size} per "
                             f"process and epoch, fewer than --accum_iter={o.accum_iter}: lower --batch_size "
                             "or --accum_iter")
        self.steps_per_epoch = self.batches_per_epoch // o.accum_iter
        self.total_steps = o.epochs * self.steps_per_epoch
        if o.max_steps is not None:
            self.total_steps = min(self.total_steps, o.max_steps)

        # --backend auto / triton: on CUDA, the fused path's check on this card (or its cached verdict) decides.
        backend, reference_ops = choose_backend(config.model.backend, pretrain_workload(
            config.model.model, cfg, o.batch_size, self.precision, o.compile, self.device, r.seed), self.out)
        self.cfg = cfg = replace(cfg, backend=backend)
        torch.manual_seed(r.seed + dist_info.rank)
        self.model = build_model(cfg, reference_ops).to(self.device)
        self.grids = (ReconstructionGrids(self.model, cfg, config.model.model, family_of(cfg).partial_prediction,
                                          self.out, resolved.data_root, str(config.data.data_path) == "demo",
                                          resolved.data_backend, self.device, r.seed,
                                          index=getattr(self.loader, "index", None))  # the training scan, reused
                      if dist_info.is_main else None)
        k = config.knn
        self.knn = (KnnMonitor(resolved.knn_root, k=k.knn_k, max_train=k.knn_max_train, img_size=cfg.img_size,
                               batch_size=o.batch_size, device=self.device, rank=dist_info.rank,
                               world_size=dist_info.world_size, seed=r.seed, scan_threads=config.data.scan_threads)
                    if resolved.knn_root is not None else None)
        self.knn_step: int | None = None  # the step of this run's last k-NN evaluation
        self.eff_batch = o.batch_size * o.accum_iter * dist_info.world_size
        self.lr = check_lr(o.lr if o.lr is not None else scaled_lr(o.blr, self.eff_batch, cfg.mask_ratio,
                                                                    cfg.kept_mask_ratio),
                           o.min_lr, "--lr" if o.lr is not None else f"--blr {o.blr:g}")
        self.optimizer = build_optimizer(self.model, self.lr, o.weight_decay, self.device)
        self.step = self.epoch = self.batch_in_epoch = 0
        scaler_state = self._resume_or_init()

        self.ddp = distributed.wrap_ddp(self.model, dist_info)
        net = self.ddp if self.ddp is not None else self.model
        self.net = torch.compile(net) if o.compile else net
        objective = MaskedAutoencoding(self.net, cfg.num_patches, r.seed, dist_info.rank, self.device)
        self.train_step = TrainStep(self.optimizer, objective, precision=self.precision, device=self.device,
                                    accum_iter=o.accum_iter, ddp=self.ddp)
        self.train_step.load_state_dict(scaler_state)
        self.flops_per_image = self.model.flops_per_image(training=True)
        self.guard = NonFiniteGuard(self.device)

    # -- setup ----------------------------------------------------------------------------------------

    def _resume_or_init(self) -> dict[str, Any]:
        """Continue from the folder's (or --resume's) checkpoint, or start fresh (from --init_encoder's weights
        when given); returns the loss scaler's saved state."""
        found = self.checkpoints.resume(self.run_cfg.resume, self._accept)
        if found is None:
            if self.run_cfg.init_encoder:
                self._init_encoder(self.run_cfg.init_encoder)
            return {}
        self.load_state_dict(found.state)
        if self.run_cfg.init_encoder:
            logger.info("--init_encoder %s not used: the run resumes from its checkpoint", self.run_cfg.init_encoder)
        logger.info("resumed from %s at step %d (epoch %d, batch %d)", found.path, self.step, self.epoch,
                    self.batch_in_epoch)
        return found.state.get("scaler") or {}

    def _init_encoder(self, path: str) -> None:
        """A fresh run's encoder from timm-layout or pre-training weights, every key checked."""
        try:
            unused = load_encoder_weights(self.model, path)
        except KeyError as e:  # KeyError's str() quotes the message; the run reports ValueErrors cleanly
            raise ValueError(f"--init_encoder {path}: {e.args[0]}") from e
        except ValueError as e:
            raise ValueError(f"--init_encoder {path}: {e}") from e
        logger.info("encoder initialised from %s (%d entries not used: %s)", path, len(unused), short_list(unused))

    # -- state ---------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs, as tensors and plain values. Collective under DDP (it gathers every
        rank's RNG state): all ranks call it."""
        return {
            "format": FORMAT,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.train_step.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "world_size": self.dist.world_size,
            "rng": distributed.all_gather_objects(rng_state()),
            "config": to_dict(self.resolved.config),
            "model_config": config_dict(self.cfg),
            "data": {"num_images": self.loader.num_images, "backend": self.loader.backend},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the run ``state`` describes (already accepted by ``_accept``). The loss scaler's state is
        loaded with the step, after construction."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        states = state.get("rng", [])
        if len(states) == self.dist.world_size:
            set_rng_state(states[self.dist.rank])

    def _accept(self, state: dict[str, Any], source: Path) -> None:
        """Raise ValueError (nothing loaded) if ``state`` was written by another experiment; warn about every
        other changed setting."""
        refused, warned = differences(state, self.resolved, self.dist.world_size, self.loader.num_images)
        if refused:
            raise ValueError(f"{source} was written by a run with other settings ({', '.join(refused)}): resuming "
                             "would not continue that run; repeat its flags, or use another --output_dir")
        if warned:
            logger.warning("resuming %s with changed settings: %s", source, ", ".join(warned))

    def save(self, keep: bool = False) -> None:
        """checkpoint-last.pth (and checkpoint-<epoch>.pth when ``keep``), unless a non-finite loss was seen
        (then the last good checkpoint stays as it is: NonFiniteLoss). Collective."""
        self.guard.check(self.checkpoints.note())
        self.checkpoints.save(self.state_dict, self.step, keep_as=f"checkpoint-{self.epoch:04d}.pth" if keep else None)

    # -- the loop ------------------------------------------------------------------------------------

    def run(self) -> None:
        """Train to the end of the schedule (or --max_steps). Raises RunStopped after saving on a stop request,
        NonFiniteLoss on a non-finite loss (not saved), CheckpointWriteError when a save fails."""
        o, r = self.optim_cfg, self.run_cfg
        n_params = sum(p.numel() for p in self.model.parameters())
        logger.info("model %s: %.2fM parameters, %.2f GFLOP per image per training step; backend %s, precision %s",
                    self.resolved.config.model.model, n_params / 1e6, self.flops_per_image / 1e9, self.cfg.backend,
                    self.precision)
        logger.info("data: %s backend, %d images, %d steps per epoch", self.loader.backend, self.loader.num_images,
                    self.steps_per_epoch)
        logger.info("base lr %.3g, actual lr %.3g, effective batch %d (%d x %d accumulation x %d processes)",
                    o.blr, self.lr, self.eff_batch, o.batch_size, o.accum_iter, self.dist.world_size)
        if self.resolved.demo_recipe:
            logger.info("demo recipe (flags not given): %s, %d-pixel crops in %d patches", self.resolved.demo_recipe,
                        self.cfg.img_size, self.cfg.num_patches)
        if self.knn is not None:
            logger.info("k-NN monitor: %s; every %d epochs, at the end%s", self.knn.describe(),
                        self.resolved.config.knn.knn_every, " and now (step 0)" if self.step == 0 else "")
        backend_notice(self.cfg.backend, self.device)
        if self.step >= self.total_steps:
            logger.info("nothing to do: the run is already at step %d of %d", self.step, self.total_steps)
            return
        reporter = StepReporter(self.out, is_main=self.dist.is_main, tensorboard=r.tensorboard, start_step=self.step,
                                total_steps=self.total_steps, epochs=o.epochs, images_per_step=self.eff_batch,
                                accum_iter=o.accum_iter, world_size=self.dist.world_size, device=self.device,
                                flops_per_image=self.flops_per_image, peak_flops=peak_flops(self.device))
        with reporter, StopRequest() as stop:
            self._loop(reporter, stop)
        if self.dist.is_main:
            self.grids.save("reconstruction-final.png", self.step, self.epoch)
            reporter.final_line(self.step, [LAST, "metrics.jsonl", "reconstruction-final.png", LOSS_PLOT])

    def _loop(self, reporter: StepReporter, stop: StopRequest) -> None:
        o, r = self.optim_cfg, self.run_cfg
        self.net.train()
        if self.step == 0:
            self._knn_evaluate(reporter)  # the random encoder: the baseline the later numbers move from
        while self.step < self.total_steps:
            self.loader.set_epoch(self.epoch, start_batch=self.batch_in_epoch)
            batches = iter(self.loader)
            while self.batch_in_epoch < self.batches_per_epoch and self.step < self.total_steps:
                lr = lr_at(self.epoch + self.batch_in_epoch / self.batches_per_epoch, self.lr, o.min_lr,
                           o.warmup_epochs, o.epochs)
                try:
                    loss, waited = self.train_step(batches, self.step, lr)
                except DataSourceLost:
                    # The data went away: drop the unfinished step and keep the last complete one (one process
                    # alone cannot save under DDP: the others may be inside their step; the last save stands).
                    self.optimizer.zero_grad(set_to_none=True)
                    if not self.dist.enabled:
                        self.save()
                    raise
                except Exception:
                    if not stop.requested:
                        raise
                    # The signal also ended the loader (e.g. SIGTERM to the process group): drop the
                    # unfinished step, whose gradients were never applied, and save the last complete one.
                    logger.warning("data loading stopped with the signal; the unfinished step is dropped")
                    self.optimizer.zero_grad(set_to_none=True)
                    self._save_and_stop()
                self.guard.observe(loss, self.step)
                self.step += 1
                self.batch_in_epoch += o.accum_iter
                reporter.step_done(loss, waited)

                at_log = self.step % r.log_every == 0 or self.step == self.total_steps
                # One process decides alone; several agree at log steps, so that all save the same step.
                stopping = stop.agreed(self.device) if at_log or not self.dist.enabled else False
                if at_log or stopping:
                    self.guard.check(self.checkpoints.note())
                    reporter.log_step(self.step, self.epoch + self.batch_in_epoch / self.batches_per_epoch, lr)
                if stopping:
                    self._save_and_stop()
                if r.save_every and self.step % r.save_every == 0:
                    self.save()
            if self.batch_in_epoch >= self.batches_per_epoch:
                self._end_epoch(reporter)
        self.save()
        if self.knn_step != self.step:  # --max_steps mid-epoch: the end's evaluation, after the save
            self._knn_evaluate(reporter)
        reporter.summary_line(self.epoch, self.step, self.optimizer.param_groups[0]["lr"])  # --max_steps mid-epoch

    def _end_epoch(self, reporter: StepReporter) -> None:
        self.epoch += 1
        self.batch_in_epoch = 0
        r = self.run_cfg
        self.save(keep=r.keep_every > 0 and (self.epoch % r.keep_every == 0 or self.epoch == self.optim_cfg.epochs))
        if self.dist.is_main and r.recon_every and self.epoch % r.recon_every == 0:
            self.grids.save(f"reconstruction-ep{self.epoch:04d}.png", self.step, self.epoch)
        if self.knn is not None and (self.epoch % self.resolved.config.knn.knn_every == 0
                                     or self.step >= self.total_steps):
            self._knn_evaluate(reporter)  # after the save: a failing evaluation costs no training
        reporter.epoch_done(self.epoch, self.step, self.optimizer.param_groups[0]["lr"])

    def _knn_evaluate(self, reporter: StepReporter) -> None:
        """A k-NN evaluation of the encoder now (when the monitor is on; collective), recorded by rank 0."""
        if self.knn is None:
            return
        result = self.knn.evaluate(self.model, self.train_step.autocast_dtype)
        self.knn_step = self.step
        if result is not None:
            reporter.knn_done(self.step, self.epoch + self.batch_in_epoch / self.batches_per_epoch, result)

    def _save_and_stop(self) -> None:
        self.save()
        logger.warning("stopped at step %d; checkpoint saved to %s; run the same command to resume", self.step,
                       self.out / LAST)
        raise RunStopped

    def close(self) -> None:
        """Drop the DDP wrapper, which holds the process group, so that ``distributed.shutdown`` really ends the
        group (its threads) before the interpreter exits."""
        self.net = self.ddp = self.train_step = None
