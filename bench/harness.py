"""The timing harness of bench/: GPU timers, the training-step measurement, and a time budget.

* ``time_steps(fn, steps, device)`` / ``bench_fn(fn, warmup, steps, device)``: per-call times from CUDA
  events recorded around each call with a single synchronisation at the end (``triton.testing.do_bench``
  style, minus the L2 flush, which is irrelevant for a whole training step); wall clock on the CPU.
* ``kernel_ms(fn, full)``: one kernel call's median time, ``triton.testing.do_bench`` on the GPU (full runs),
  one wall-clock call after a warm-up in smoke checks.
* ``measure_train_step(StepSpec(...), device)``: one full pre-training step, the trainer's own (train/step.py
  ``TrainStep``: forward, backward, the AdamW of train/optim.py (fused on CUDA), lr, GradScaler; bf16 autocast;
  synthetic images already on the device; masking noise drawn on the device), warmed up,
  timed, with peak memory and FLOP counts from ``model.flops_per_image``. Results are cached for the pytest
  session, so a configuration measured by one benchmark file is not measured again by another.
  Failures are never hidden: only a triton backend that is *unavailable* here (``triton_unavailable_reason``)
  is recorded as "n/a"; any other exception, of either backend, is recorded as "error" with its message and the
  benchmark fails after writing its results.
* ``TimeBudget``: run configurations in priority order, skipping the ones that would overrun.

Environment knobs read by the full (--benchmark) runs, all optional: BENCH_BATCH, BENCH_WARMUP, BENCH_STEPS,
BENCH_COMPILE_MODE (``step_settings``), BENCH_VARIANTS (``bench_variants``), BENCH_SIZES, BENCH_TABLE5_BUDGET_S
(bench/test_table5.py), BENCH_TRAIN_STEP_BUDGET_S (bench/test_train_step.py); bench/gpu_all.sh sets them from
its own budget.
"""

from __future__ import annotations

import gc
import itertools
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

IMAGENET_TRAIN_IMAGES = 1_281_167
VARIANTS = ("torch", "triton", "triton+compile", "torch+compile")
DEFAULT_VARIANTS = ("torch", "triton", "triton+compile")


# ------------------------------------------------------------------------------------------------------------
# environment knobs
# ------------------------------------------------------------------------------------------------------------


def env_int(name: str, default: int, low: int = 0) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r}: expected an integer") from None
    if value < low:
        raise ValueError(f"{name}={value}: expected an integer >= {low}")
    return value


def env_float(name: str, default: float | None) -> float | None:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r}: expected a number of seconds") from None


def env_list(name: str, default: Sequence[str], allowed: Sequence[str] | None = None) -> list[str]:
    """A comma-separated list from the environment (case kept); unset -> default; set but empty -> []."""
    if name not in os.environ:
        return list(default)
    items = [item.strip() for item in os.environ[name].split(",") if item.strip()]
    if allowed is not None:
        bad = [item for item in items if item not in allowed]
        if bad:
            raise ValueError(f"{name}: unknown value(s) {bad}; allowed: {', '.join(allowed)}")
    return items


# ------------------------------------------------------------------------------------------------------------
# timing and memory
# ------------------------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    """Per-call times in milliseconds; ``wall_ms`` is the host's view of the whole timed loop per call
    (it exceeds the median when the host cannot keep the GPU busy)."""

    times_ms: list[float]
    wall_ms: float

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)

    def summary(self) -> dict:
        return {"median_ms": round(self.median_ms, 4), "mean_ms": round(statistics.fmean(self.times_ms), 4),
                "min_ms": round(min(self.times_ms), 4), "max_ms": round(max(self.times_ms), 4),
                "wall_ms_per_step": round(self.wall_ms, 4), "timed_steps": len(self.times_ms)}


def time_steps(fn: Callable[[int], Any], steps: int, device: torch.device) -> tuple[Timing, list[Any]]:
    """Call ``fn(i)`` for i in range(steps), timing each call; returns (Timing, the calls' results).

    On CUDA every call sits between two recorded events and the host synchronises once, after the last
    call, so nothing in the timed region waits for the GPU (results stay on the device: call ``.item()``
    afterwards). On the CPU each call is timed with perf_counter.
    """
    if steps < 1:
        raise ValueError(f"steps={steps}: need at least one timed step")
    results = []
    synchronize(device)
    start = time.perf_counter()
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
        for i, (begin, end) in enumerate(events):
            begin.record()
            results.append(fn(i))
            end.record()
        torch.cuda.synchronize(device)
        times = [begin.elapsed_time(end) for begin, end in events]
    else:
        times = []
        for i in range(steps):
            t0 = time.perf_counter()
            results.append(fn(i))
            times.append((time.perf_counter() - t0) * 1e3)
    wall = (time.perf_counter() - start) * 1e3 / steps
    return Timing(times, wall), results


def bench_fn(fn: Callable[[], Any], warmup: int = 3, steps: int = 10, device: torch.device | None = None) -> Timing:
    """``warmup`` untimed calls, then the per-call times of ``steps`` calls (see ``time_steps``)."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for _ in range(warmup):
        fn()
    timing, _ = time_steps(lambda _i: fn(), steps, device)
    return timing


def kernel_ms(fn: Callable[[], Any], full: bool, grad_to_none: Sequence[torch.Tensor] | None = None) -> float:
    """Median milliseconds of ``fn()``: ``triton.testing.do_bench`` (25 ms warm-up, 100 ms of repetitions, L2
    flushed between calls) in full runs on the GPU; the wall time of one call after one warm-up call in smoke
    checks (which show the code runs, not how fast)."""
    if full:
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median")
    fn()
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def try_kernel_ms(fn: Callable[[], Any], full: bool,
                  grad_to_none: Sequence[torch.Tensor] | None = None) -> tuple[float | None, str | None]:
    """``(kernel_ms(...), None)``, or ``(None, the error)`` when ``fn`` raises: a reference implementation that
    does not support a shape, dtype or device is a result to print, not a crash. Callers assert that their own
    kernels have a time."""
    try:
        return kernel_ms(fn, full, grad_to_none), None
    except Exception as exc:
        return None, short_error(exc, 160)


def free_memory(device: torch.device | None = None) -> None:
    """Collect garbage, return cached CUDA blocks to the driver and reset the peak-memory counter."""
    gc.collect()
    if torch.cuda.is_available() and (device is None or device.type == "cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def short_error(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(exc).__name__}: {first[:limit]}"


# ------------------------------------------------------------------------------------------------------------
# the training step
# ------------------------------------------------------------------------------------------------------------


def triton_unavailable_reason() -> str | None:
    """None when the triton backend can be built; else why not (never raises)."""
    try:
        from model.ops import triton_available

        if not triton_available():
            return "model.ops.triton_available() is False (the package `kernels` or triton does not import)"
    except Exception as exc:
        return f"model.ops.triton_available() raised {short_error(exc)}"
    return None


@dataclass(frozen=True)
class StepSpec:
    """One training-step measurement. ``variant``: 'torch' | 'triton' (model backend, eager) or either
    with '+compile' (torch.compile of the model; the optimizer step stays eager: it is one fused kernel)."""

    model: str
    overrides: tuple[tuple[str, Any], ...] = ()
    variant: str = "torch"
    batch_size: int = 256
    warmup: int = 3  # untimed steps after the first one (which builds optimizer state, compiles and is reported)
    steps: int = 10
    precision: str = "bf16"  # "bf16" (autocast) or "fp32"
    compile_backend: str = "inductor"  # the smoke check uses "eager": dynamo tracing without code generation
    compile_mode: str | None = None
    min_batch_size: int = 8  # on OOM the batch is halved down to this; images/s stays comparable
    cpu_threads: int | None = None  # torch's intra-op threads while measuring (None: leave as is)

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"variant={self.variant!r}: expected one of {VARIANTS}")
        if self.precision not in ("bf16", "fp32"):
            raise ValueError(f"precision={self.precision!r}: expected 'bf16' or 'fp32'")

    @property
    def backend(self) -> str:
        return self.variant.split("+")[0]

    @property
    def compiled(self) -> bool:
        return self.variant.endswith("+compile")


_SESSION_CACHE: dict[tuple, dict] = {}
# Set after an error that leaves the CUDA context unusable (illegal address, device assert...): every later CUDA
# call would fail too, so later configurations are recorded as not run instead of blamed.
_CUDA_BROKEN: list[str] = []
_STICKY_CUDA_ERRORS = ("illegal memory access", "illegal address", "unspecified launch failure", "device-side assert",
                       "misaligned address", "illegal instruction", "an illegal", "cuda error: unknown error")


def already_measured(spec: StepSpec, device: torch.device) -> bool:
    """Whether this session has measured the configuration (then measuring it again costs nothing)."""
    return (spec, str(device)) in _SESSION_CACHE


def measure_train_step(spec: StepSpec, device: torch.device, use_cache: bool = True) -> dict:
    """Measure one configuration; never raises for OOM, an unavailable triton backend or a failing kernel.

    Returns a record: ``status`` 'ok' | 'oom' | 'n/a' (the triton backend is unavailable here, and only that) |
    'error' (any other exception, of either backend: a real bug, never hidden) | 'skipped' (not run: the CUDA
    context was left unusable by an earlier error, which is recorded against the configuration that raised it),
    ``reason``, the spec, and for 'ok' the step time, images/s, minutes per ImageNet-1K epoch, peak memory, FLOPs
    and TFLOP/s. Cached per pytest session by (spec, device).
    """
    key = (spec, str(device))
    if use_cache and key in _SESSION_CACHE:
        return dict(_SESSION_CACHE[key], cached=True)
    record: dict[str, Any] = {"model": spec.model, "overrides": dict(spec.overrides), "variant": spec.variant,
                              "backend": spec.backend, "compiled": spec.compiled, "precision": spec.precision,
                              "requested_batch_size": spec.batch_size, "warmup": spec.warmup, "steps": spec.steps,
                              "compile_backend": spec.compile_backend if spec.compiled else None,
                              "compile_mode": spec.compile_mode if spec.compiled else None,
                              "oom_at_batch_sizes": [], "status": None, "reason": None}
    started = time.perf_counter()
    if _CUDA_BROKEN and device.type == "cuda":
        record.update(status="skipped", reason=f"not run: the CUDA context is unusable since {_CUDA_BROKEN[0]}")
    elif spec.backend == "triton" and (reason := triton_unavailable_reason()) is not None:
        record.update(status="n/a", reason=reason)
    batch = spec.batch_size
    while record["status"] is None:
        outcome: dict | None = None
        failure: tuple[str, str] | None = None
        threads = torch.get_num_threads()
        try:
            if spec.cpu_threads is not None:
                torch.set_num_threads(spec.cpu_threads)
            outcome = _measure_once(spec, batch, device)
        except Exception as exc:
            if is_oom(exc) and batch // 2 >= spec.min_batch_size:
                record["oom_at_batch_sizes"].append(batch)  # retried below at half the batch
            elif is_oom(exc):
                record["oom_at_batch_sizes"].append(batch)
                failure = ("oom", f"out of memory at batch sizes {record['oom_at_batch_sizes']}: {short_error(exc)}")
            else:
                failure = ("error", short_error(exc))
                if device.type == "cuda" and any(s in str(exc).lower() for s in _STICKY_CUDA_ERRORS):
                    _CUDA_BROKEN.append(f"{spec.model} {spec.variant}: {short_error(exc, 160)}")
        torch.set_num_threads(threads)
        # The exception, and the frames holding the model, are gone here: the memory can really be freed.
        try:
            if spec.compiled:
                torch._dynamo.reset()
            free_memory(device)
        except Exception as exc:  # a broken CUDA context fails here too
            if not _CUDA_BROKEN:
                _CUDA_BROKEN.append(f"freeing memory after {spec.model} {spec.variant}: {short_error(exc, 160)}")
        if outcome is not None:
            record.update(outcome, status="ok")
        elif failure is not None:
            record.update(status=failure[0], reason=failure[1])
        else:
            batch //= 2
    record["seconds_spent"] = round(time.perf_counter() - started, 2)
    _SESSION_CACHE[key] = record
    return dict(record, cached=False)


def _measure_once(spec: StepSpec, batch: int, device: torch.device) -> dict:
    from model import create_model
    from train.cards import peak_flops
    from train.data import build_loader
    from train.optim import build_optimizer
    from train.step import MaskedAutoencoding, TrainStep

    torch.manual_seed(0)
    model = create_model(spec.model, backend=spec.backend, **dict(spec.overrides)).to(device).train()
    cfg = model.cfg
    net = model
    if spec.compiled:
        torch._dynamo.reset()  # a fresh cache: no recompilation limits inherited from earlier models
        net = torch.compile(model, backend=spec.compile_backend, mode=spec.compile_mode)
    # The trainer's step (train/step.py): its optimizer (fused AdamW on CUDA), masking noise drawn on the device
    # from a generator seeded per step, autocast, GradScaler, lr set every step, zero_grad.
    lr = 1e-4
    train_step = TrainStep(build_optimizer(model, lr=lr, weight_decay=0.05, device=device),
                           MaskedAutoencoding(net, cfg.num_patches, seed=0, rank=0, device=device),
                           precision=spec.precision, device=device)
    # Two distinct batches, generated on the device before timing; the step cycles through them.
    loader = build_loader(None, batch_size=batch, img_size=cfg.img_size, backend="synthetic", device=device,
                          num_images=2 * batch, seed=0)
    batches = itertools.cycle(list(loader))  # (images, labels) pairs, as the trainer's loader gives them
    step_index = itertools.count()

    def step(_i: int) -> torch.Tensor:
        # Host-synchronisation free (TrainStep: no .item(), no data-dependent shapes; the loss stays on the device).
        loss, _ = train_step(batches, next(step_index), lr=lr)
        return loss.clone()  # a copy: CUDA-graph replays (compile mode reduce-overhead) reuse outputs

    synchronize(device)
    t0 = time.perf_counter()
    first_loss = step(0)  # builds optimizer state; compiles under torch.compile
    synchronize(device)
    first_step_s = time.perf_counter() - t0
    for i in range(1, 1 + spec.warmup):
        step(i)
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timing, losses = time_steps(step, spec.steps, device)
    peak_bytes = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    reserved_bytes = torch.cuda.max_memory_reserved(device) if device.type == "cuda" else None
    loss_values = torch.stack([first_loss, *losses]).float().cpu()
    if not bool(torch.isfinite(loss_values).all()):
        raise FloatingPointError(f"non-finite loss in the timed steps: {loss_values.tolist()}")

    flops = model.flops_per_image(training=True)
    median_s = timing.median_ms / 1e3
    images_per_s = batch / median_s
    peak = peak_flops(device)
    achieved = flops * images_per_s
    return {
        "batch_size": batch,
        **timing.summary(),
        "step_ms": round(timing.median_ms, 4),
        "images_per_s": round(images_per_s, 3),
        "minutes_per_epoch": round(IMAGENET_TRAIN_IMAGES / images_per_s / 60, 3),
        "peak_memory_bytes": peak_bytes,
        "peak_memory_gib": None if peak_bytes is None else round(peak_bytes / 2**30, 3),
        "peak_reserved_gib": None if reserved_bytes is None else round(reserved_bytes / 2**30, 3),
        "flops_per_image": flops,
        "forward_flops_per_image": model.flops_per_image(training=False),
        "achieved_tflops": round(achieved / 1e12, 2),
        "peak_tflops": None if peak is None else round(peak / 1e12, 1),
        "mfu": None if peak is None else round(achieved / peak, 4),
        "first_step_s": round(first_step_s, 3),
        "loss_first": round(float(loss_values[0]), 5),
        "loss_last": round(float(loss_values[-1]), 5),
        "params": sum(p.numel() for p in model.parameters()),
        "n_pred": cfg.split.n_pred,
        "len_keep": cfg.split.len_keep,
    }


def step_settings(full: bool) -> dict:
    """StepSpec keyword arguments shared by the training-step benchmarks (equal settings hit the session cache).

    Full: batch BENCH_BATCH (256); a first step (it compiles; timed apart), BENCH_WARMUP (>= 3) more warm-up
    steps, BENCH_STEPS (10) timed steps; bf16 autocast; torch.compile with inductor (mode BENCH_COMPILE_MODE).
    Smoke: batch 2, the first step and one timed step, fp32 on the CPU (its bf16 autocast is slow and measures
    nothing) on one thread (a tiny model gains nothing from more, and a shared CPU loses a lot to
    oversubscription); torch.compile(backend="eager"): tracing without code generation.
    """
    if full:
        return {"batch_size": env_int("BENCH_BATCH", 256, 1), "warmup": max(3, env_int("BENCH_WARMUP", 3, 1)),
                "steps": env_int("BENCH_STEPS", 10, 1), "precision": "bf16", "compile_backend": "inductor",
                "compile_mode": os.environ.get("BENCH_COMPILE_MODE") or None}
    cuda = torch.cuda.is_available()
    return {"batch_size": 2, "warmup": 0, "steps": 1, "precision": "bf16" if cuda else "fp32",
            "compile_backend": "eager", "compile_mode": None, "cpu_threads": None if cuda else 1}


def bench_variants(full: bool) -> list[str]:
    """BENCH_VARIANTS (full runs; default torch, triton, triton+compile), always with the torch reference first."""
    variants = env_list("BENCH_VARIANTS", DEFAULT_VARIANTS, allowed=VARIANTS) if full else list(DEFAULT_VARIANTS)
    return ["torch"] + [v for v in variants if v != "torch"]


def crossmae_overrides(kept_mask_ratio: float, inter_block: bool = True) -> tuple[tuple[str, Any], ...]:
    """create_model overrides of a CrossMAE row, in one canonical order (StepSpecs compare equal across files)."""
    return (("inter_block", inter_block), ("kept_mask_ratio", kept_mask_ratio))


# The smoke checks' model: crossmae/mae_vit_tiny_patch8 cut to 2 encoder and 2 decoder blocks.
SMOKE_TINY_OVERRIDES: tuple[tuple[str, Any], ...] = (("depth", 2), ("decoder_depth", 2))

# Reports of this pytest session, by kind: a later benchmark may quote an earlier one's goals.
SESSION_REPORTS: dict[str, dict] = {}


class TimeBudget:
    """Run configurations in priority order and skip the ones that would overrun ``seconds``.

    The estimate for a configuration is the longest time a measured one of the same (size, compiled) kind
    took, else ``default_s``; ``seconds=None`` means no limit.
    """

    def __init__(self, seconds: float | None):
        self.seconds = seconds
        self.start = time.perf_counter()
        self.spent: dict[tuple, float] = {}

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def allows(self, kind: tuple, default_s: float) -> bool:
        if self.seconds is None:
            return True
        return self.elapsed() + self.spent.get(kind, default_s) <= self.seconds

    def record(self, kind: tuple, seconds: float) -> None:
        self.spent[kind] = max(self.spent.get(kind, 0.0), seconds)


def one_line(r: dict) -> str:
    """A measured record as a progress line."""
    if r["status"] != "ok":
        return f"{r['status']}: {r['reason']}"
    memory = "" if r["peak_memory_gib"] is None else f"  {r['peak_memory_gib']:6.2f} GiB"
    mfu = "" if r["mfu"] is None else f"  MFU {100 * r['mfu']:4.1f}%"
    where = "  (measured earlier this session)" if r.get("cached") else (
        f"  first step {r['first_step_s']:.1f} s, {r['seconds_spent']:.0f} s in all")
    return f"{r['step_ms']:9.2f} ms {r['images_per_s']:9.0f} img/s{memory}{mfu}{where}"


