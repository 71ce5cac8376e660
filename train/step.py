"""One optimizer step, the one every user of it calls: pre-training, fine-tuning and probing
(train/pretrain.py, train/classify.py), the benchmarks (bench/harness.py) and the step ledger
(bench/ledger/), so that what is measured and counted is what trains.

A step sets the learning rate, then for each of ``accum_iter`` micro-batches: takes the next batch
(the time spent waiting for it is returned), lets the objective prepare its inputs (masks, augmentation;
outside autocast), computes the loss under autocast, and back-propagates ``loss / accum_iter`` through
the GradScaler (a no-op unless fp16), with DDP's gradient all-reduce deferred to the last micro-batch.
Then the scaler steps the optimizer and the gradients are dropped (``set_to_none``).

No host synchronisation happens here: the summed loss stays on the device.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch
from torch import nn

from train.optim import set_lr

PRECISIONS = ("bf16", "fp16", "fp32")
AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def resolve_precision(precision: str | None, device: torch.device) -> str:
    """The run's precision: the one asked for, else bf16 on a GPU and fp32 elsewhere."""
    if precision is None:
        return "bf16" if device.type == "cuda" else "fp32"
    if precision not in AUTOCAST_DTYPES:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision


def noise_seed(seed: int, rank: int, step: int, micro: int, accum: int) -> int:
    """The masking noise of every micro-batch is seeded by where it is (run seed, process, optimizer step,
    micro-batch), not by a running RNG: a resumed run draws the masks an uninterrupted one would."""
    return ((seed * 1_000_003 + rank) * 1_000_000_007 + step * accum + micro) % (2**63 - 1)


class Objective(Protocol):
    """What a step minimises. ``inputs`` runs outside autocast (random masks, augmentation) and returns the
    arguments of ``loss``, which runs under autocast and returns a scalar."""

    def inputs(self, batch: Any, step: int, micro: int, accum: int) -> tuple: ...

    def loss(self, *inputs: Any) -> torch.Tensor: ...


class MaskedAutoencoding:
    """Pre-training's objective: the autoencoder's loss under masks drawn from noise seeded by
    ``noise_seed`` (batches are ``(images, labels)``; the labels are not read)."""

    def __init__(self, net: nn.Module, num_patches: int, seed: int, rank: int, device: torch.device):
        self.net, self.num_patches, self.seed, self.rank = net, num_patches, seed, rank
        self.generator = torch.Generator(device=device)
        self.device = device

    def inputs(self, batch: Any, step: int, micro: int, accum: int) -> tuple[torch.Tensor, torch.Tensor]:
        imgs = batch[0]
        self.generator.manual_seed(noise_seed(self.seed, self.rank, step, micro, accum))
        noise = torch.rand(imgs.shape[0], self.num_patches, generator=self.generator, device=self.device)
        return imgs, noise

    def loss(self, imgs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self.net(imgs, noise)["loss"]


class TrainStep:
    """One optimizer step over ``accum_iter`` micro-batches (see the module docstring).

    ``ddp`` is the DistributedDataParallel wrapper when there is one (its ``no_sync`` defers the gradient
    all-reduce); ``on_phase`` (the ledger's) is told "forward", "backward" and "optimizer" as each begins.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, objective: Objective, *, precision: str,
                 device: torch.device, accum_iter: int = 1, ddp: nn.Module | None = None,
                 on_phase: Callable[[str], None] | None = None):
        if accum_iter < 1:
            raise ValueError(f"accum_iter must be >= 1, got {accum_iter}")
        self.optimizer, self.objective = optimizer, objective
        self.device, self.accum_iter, self.ddp = device, accum_iter, ddp
        self.precision = resolve_precision(precision, device)
        self.autocast_dtype = AUTOCAST_DTYPES[self.precision]
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision == "fp16")
        self.on_phase = on_phase

    def _phase(self, name: str) -> None:
        if self.on_phase is not None:
            self.on_phase(name)

    def __call__(self, batches: Iterator, step: int, lr: float | None = None) -> tuple[torch.Tensor, float]:
        """Run optimizer step ``step`` (0-based) at learning rate ``lr`` (``None``: leave the optimizer's);
        returns (the micro-batches' summed loss, on the device and detached; seconds spent waiting for data)."""
        if lr is not None:
            set_lr(self.optimizer, lr)
        accum = self.accum_iter
        loss_sum, waited = None, 0.0
        for micro in range(accum):
            t0 = time.perf_counter()
            batch = next(batches)
            waited += time.perf_counter() - t0
            last = micro == accum - 1
            sync = self.ddp.no_sync() if self.ddp is not None and not last else contextlib.nullcontext()
            with sync:
                self._phase("forward")
                inputs = self.objective.inputs(batch, step, micro, accum)
                with torch.autocast(self.device.type, dtype=self.autocast_dtype,
                                    enabled=self.autocast_dtype is not None):
                    loss = self.objective.loss(*inputs)
                self._phase("backward")
                self.scaler.scale(loss / accum).backward()
            loss = loss.detach()
            loss_sum = loss if loss_sum is None else loss_sum + loss
        self._phase("optimizer")
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum, waited

    # The scaler's state is the step's only state; the trainer's checkpoint carries it.
    def state_dict(self) -> dict[str, Any]:
        return self.scaler.state_dict() if self.scaler.is_enabled() else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state and self.scaler.is_enabled():
            self.scaler.load_state_dict(state)
