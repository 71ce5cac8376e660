"""The step the ledger records, and one model's ledger.

The step is the trainer's own: ``train.step.TrainStep`` with the ``MaskedAutoencoding`` objective (noise from a
generator seeded per step, forward under autocast, loss / accum_iter through the GradScaler, backward, optimizer
step, zero_grad) and the optimizer ``train.optim.build_optimizer`` builds for a GPU (fused AdamW, which torch
also runs on the CPU), so the ledger counts what trains on the card it models. TrainStep's ``on_phase`` tags the
ops forward / backward / optimizer.

``ledger_for`` builds the model, runs one untracked warm-up step (the optimizer state then exists and the counted
steps are steady-state ones), records a step at each of two small batches (default 2 and 3; batch 1 is avoided
because size-1 dimensions make some copies no-ops), fits every quantity through them (fit.py) and, for
``extra_batches``, checks the line against a step counted there.

Fidelity: this is the CPU's dispatch of the step. CPU autocast has a shorter fp32 list than CUDA's (CUDA
autocasts layer_norm, softmax, sum, pow... to fp32): where a LayerNorm's input is bf16 (CrossMAE's IBA
dec_norms in the torch path) the GPU writes fp32 and adds a cast. CPU SDPA runs the flash-for-CPU op. On the CPU
the trainer's AdamW is the multi-tensor one: a dozen ``_foreach_*`` ops per parameter group, each one launch
here (a few multi-tensor launches on a GPU), plus its bias corrections read back with one ``.item()`` per
parameter and moment (host syncs); on CUDA the trainer runs fused AdamW, one op per group.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from bench.ledger.fit import extrapolation_check, fit_steps
from bench.ledger.recorder import Ledger, StepCount
from bench.ledger.rules import LedgerError
from train.optim import build_optimizer
from train.step import PRECISIONS, MaskedAutoencoding, TrainStep

BACKENDS = ("torch", "triton")
MODELLED_DEVICE = torch.device("cuda")  # the ledger counts a GPU's training step
DEFAULT_SAMPLE_BATCHES = (2, 3)
# The pre-training recipe's optimizer settings (SPEC.md section 2); no op depends on the values.
LR, WEIGHT_DECAY = 1e-4, 0.05


def ledger_device() -> torch.device:
    """The CPU (the ledger's purpose: no GPU needed; kernels under Triton's interpreter), or CUDA where there is
    one and the kernels are compiled (then Triton launches are counted at JITFunction.run; not yet run there)."""
    interpreted = os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")
    return torch.device("cuda" if torch.cuda.is_available() and not interpreted else "cpu")


class _PhaseTags:
    """TrainStep's ``on_phase``: tags the ops of the ledger being recorded (none during an untracked step)."""

    def __init__(self):
        self.ledger: Ledger | None = None

    def __call__(self, phase: str) -> None:
        if self.ledger is not None:
            self.ledger.phase = phase


@dataclass
class LedgerTrainer:
    """A model with the trainer's step around it; ``steps_done`` numbers the steps (the noise seed reads it)."""

    model: torch.nn.Module
    step: TrainStep
    tags: _PhaseTags
    device: torch.device
    seed: int
    steps_done: int = 0


def build_trainer(model_name: str, backend: str, overrides: dict, precision: str, device: torch.device,
                  seed: int = 0) -> LedgerTrainer:
    """``create_model(model_name, backend=backend, **overrides)`` in training mode with the trainer's optimizer
    and step."""
    from model import create_model

    if backend == "triton":
        import kernels

        if device.type == "cpu" and not kernels.INTERPRET:
            raise LedgerError("ledger: backend='triton' on the CPU needs TRITON_INTERPRET=1 set before `kernels` "
                              "is imported (else the kernels fall back to their references and the ledger would "
                              "count those); run `python -m bench.ledger` or set it in the environment")
    torch.manual_seed(seed)
    model = create_model(model_name, backend=backend, **overrides).to(device).train()
    # The optimizer the trainer builds on the GPU the ledger models (fused AdamW: one kernel), not the CPU's
    # multi-tensor one (17 ops and 2 host syncs per parameter), whichever device the counting runs on.
    optimizer = build_optimizer(model, lr=LR, weight_decay=WEIGHT_DECAY, device=MODELLED_DEVICE)
    objective = MaskedAutoencoding(model, model.cfg.num_patches, seed=seed, rank=0, device=device)
    tags = _PhaseTags()
    step = TrainStep(optimizer, objective, precision=precision, device=device, on_phase=tags)
    return LedgerTrainer(model, step, tags, device, seed)


def images(t: LedgerTrainer, batch: int) -> torch.Tensor:
    """``batch`` random normalised images of the model's size, seeded by the batch."""
    size = t.model.cfg.img_size
    gen = torch.Generator().manual_seed(t.seed + batch)
    return torch.randn(batch, 3, size, size, generator=gen).to(t.device)


def run_step(t: LedgerTrainer, imgs: torch.Tensor, ledger: Ledger | None = None) -> torch.Tensor:
    """One training step on ``imgs``; ``ledger``, when given, gets the step's phases. Returns the loss (on the
    device)."""
    t.tags.ledger = ledger
    try:
        loss, _ = t.step(iter([(imgs, None)]), t.steps_done, lr=LR)
    finally:
        t.tags.ledger = None
    t.steps_done += 1
    return loss


def count_step(t: LedgerTrainer, batch: int) -> StepCount:
    """Record one training step at ``batch`` (its images are drawn before recording starts: data loading is
    not part of the step)."""
    imgs = images(t, batch)
    with Ledger(batch, exclude=t.model) as led:
        loss = run_step(t, imgs, led)
    # Kept, not checked: counting does not depend on the numbers (and the interpreter's bf16 is inexact).
    led.count.loss = float(loss)
    return led.count


def ledger_for(model_name: str, backend: str, overrides: dict | None = None, precision: str = "bf16",
               sample_batches: tuple[int, int] = DEFAULT_SAMPLE_BATCHES, seed: int = 0,
               extra_batches: Sequence[int] = (), device: torch.device | None = None) -> dict:
    """Account one training step of ``create_model(model_name, backend=backend, **overrides)``.

    Returns {"by_class": per-class {quantity: Linear}, "by_op": per op, "total": {quantity: Linear}, "saved":
    Linear (bytes), "samples": the raw StepCounts, ...}; evaluate at any batch with ``Linear.at``. Raises
    LedgerError when the op sequence differs between the two sample batches. ``extra_batches`` are counted too
    (same model, after the samples) and returned as "extra_samples", with "extrapolation_checks" against the fit.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: expected one of {PRECISIONS}")
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: expected one of {BACKENDS}")
    b1, b2 = sample_batches
    if not 1 <= b1 < b2:
        raise ValueError(f"sample_batches={sample_batches}: need two increasing batches >= 1, e.g. (2, 3)")
    started = time.perf_counter()
    device = ledger_device() if device is None else torch.device(device)
    trainer = build_trainer(model_name, backend, dict(overrides or {}), precision, device, seed)
    # Untracked: creates the optimizer state (and the interpreter's caches). Batch 1 is the cheapest; anything
    # lazily created at a larger batch would change the op sequence between the samples, which is checked.
    run_step(trainer, images(trainer, 1))
    s1, s2 = count_step(trainer, b1), count_step(trainer, b2)
    fits = fit_steps(s1, s2)
    extra = [count_step(trainer, b) for b in extra_batches]
    model = trainer.model
    return {
        "model": model_name, "backend": backend, "overrides": dict(overrides or {}), "precision": precision,
        "device": str(device), "sample_batches": [b1, b2], **fits,
        "saved_tensors": [s1.saved_tensors, s2.saved_tensors],
        "params": sum(p.numel() for p in model.parameters()),
        "model_flops_per_image": model.flops_per_image(training=True),
        "model_forward_flops_per_image": model.flops_per_image(training=False),
        "samples": [s1, s2], "extra_samples": extra, "losses": [s.loss for s in (s1, s2)],
        "extrapolation_checks": [extrapolation_check(fits["by_op"], fits["saved"], s) for s in extra],
        "seconds": round(time.perf_counter() - started, 1),
    }
