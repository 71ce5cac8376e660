"""``--backend auto``: check the fused path on the card a run trains on, then choose (issue 17).

    backend, reference_ops = choose_backend(config.model.backend, pretrain_workload(...), output_dir)
    model = build_model(replace(cfg, backend=backend), reference_ops)

``--backend torch`` skips everything. On a machine without CUDA, ``auto`` is torch and ``triton`` runs the
kernels (under TRITON_INTERPRET=1) or their references, without a check. On CUDA, before the first step,
rank 0 takes the verdict for this key from the cache, or checks:

1. **Numbers.** One forward + backward of the run's model config on a slice of the run's batch (``numbers_images``,
   at least 8 images, all of them when the batch is smaller), at the run's precision, eager, TF32 off, on both
   paths with the same weights, images and noise (and the same RNG for drop path). Loss, predictions and every
   parameter gradient of the fused path must be within ``kernels.tolerance.RTOL[dtype]`` of an fp32 truth
   (relative to the truth's largest value), or within twice the reference path's own distance to that truth,
   whichever is larger. A fused pass that raises fails with its exception as the error.
2. **Per op**, only when the full fused model fails: a model with one operation fused (every other on the
   reference), for each operation of ``model.ops.OP_NAMES``, names those that fail; the fused path without them
   (``reference_ops``) is checked once more. If it still fails, the fused path is not usable at all.
3. **Speed.** ``warmup`` untimed then ``steps`` timed training steps (``train.step.TrainStep``: autocast, loss,
   backward, AdamW) of each path at the run's full batch, compiled when the run compiles; CUDA events, median.

The decision (``auto``): the fused path (minus the failing operations) if its numbers pass **and** its median
step is faster; else torch. One log line says which check decided and by how much. ``--backend triton`` uses
the same verdict but refuses (``BackendRefused``, a ValueError: the run exits with status 2) with one line naming
the operation, the tensor and the error when any fused operation fails the numbers.

The verdict (``VERDICT_FORMAT``; README "Choosing the path: --backend auto") holds the key (card, compute
capability, driver, CUDA, torch, triton, model name and config, batch, precision, compile), the numbers (worst
tensor of the full model; each operation's worst tensor when it was searched), both step times, the decision
and the check's own seconds. Rank 0 logs it, writes it to ``<output_dir>/backend_verdict.json`` and caches it in
``<cache_root()>/backend_verdicts/<hash of the key>.json``: the same key again starts at once, a changed key
checks again, an unwritable cache is a warning. Under torchrun every rank gets rank 0's verdict (a broadcast),
so all ranks build the same path.

Cost (eager): 2 forward + backward passes at the slice (3 at bf16 / fp16: the truth is fp32), plus 16 more on a
failure; 2 x (``warmup`` + ``steps``) = 16 training steps at the full batch; a few model builds, made on the
device. Under ``--compile`` the speed check compiles each path once (its first warm-up step).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import math
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from kernels.tolerance import RTOL
from model.ops import OP_NAMES, resolve_backend, triton_available
from train.data.index import cache_root
from train.files import replace_atomically
from train.step import AUTOCAST_DTYPES, TrainStep

logger = logging.getLogger("train")

VERDICT_FORMAT = "crossmae-backend-verdict-v1"
VERDICT_FILE = "backend_verdict.json"
NUMBERS_IMAGES = 32  # the numbers check's slice of the batch (at least 8, see the module docstring)
WARMUP_STEPS, TIMED_STEPS = 3, 5

# timer(path, step) runs step() once and returns its seconds; path is "torch" or "fused". Tests inject one.
Timer = Callable[[str, Callable[[], Any]], float]


class BackendRefused(ValueError):
    """--backend triton where a fused operation fails the numbers check (the run exits with status 2)."""


@dataclass(frozen=True)
class Workload:
    """The run's model at the run's shapes: what the check builds, feeds and differentiates.

    ``build(backend, reference_ops)`` makes a fresh model (parameters on ``device``); ``inputs(n)`` the
    deterministic inputs of n images; ``loss(model, inputs)`` returns (loss, predictions)."""

    name: str
    model_config: dict[str, Any]  # JSON values, the backend left out: part of the key
    batch_size: int
    precision: str
    compile: bool
    device: torch.device
    build: Callable[[str, frozenset[str]], nn.Module]
    inputs: Callable[[int], tuple[torch.Tensor, ...]]
    loss: Callable[[nn.Module, tuple[torch.Tensor, ...]], tuple[torch.Tensor, torch.Tensor]]


def _json(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples as lists), so that a cached key compares equal."""
    return json.loads(json.dumps(value))


def _config_without_backend(cfg) -> dict[str, Any]:
    return _json({f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name != "backend"})


def _images(n: int, img_size: int, in_chans: int, device: torch.device, seed: int) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(n, in_chans, img_size, img_size, generator=g, device=device)


def pretrain_workload(name: str, cfg, batch_size: int, precision: str, compile: bool, device: torch.device,
                      seed: int = 0) -> Workload:
    """The pre-training run's model (``cfg``, a ModelConfig) at its per-process batch."""
    from model import build_model

    def inputs(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator(device=device).manual_seed(seed + 1)
        noise = torch.rand(n, cfg.num_patches, generator=g, device=device)
        return _images(n, cfg.img_size, cfg.in_chans, device, seed), noise

    def loss(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        out = model(*batch)
        return out["loss"], out["pred"]

    return Workload(name, _config_without_backend(cfg), batch_size, precision, compile, device,
                    lambda backend, ops: build_model(replace(cfg, backend=backend), ops), inputs, loss)


def classify_workload(name: str, cfg, num_classes: int, model_kwargs: dict[str, Any], batch_size: int,
                      precision: str, device: torch.device, seed: int = 0) -> Workload:
    """Fine-tuning's or probing's classifier (``cfg``: its encoder's ModelConfig; ``model_kwargs``: the other
    arguments of ``create_classifier``) at the run's per-process batch."""
    from model import create_classifier

    def inputs(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator(device=device).manual_seed(seed + 1)
        labels = torch.randint(num_classes, (n,), generator=g, device=device)
        return _images(n, cfg.img_size, cfg.in_chans, device, seed), labels

    def loss(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(batch[0])
        return F.cross_entropy(logits.float(), batch[1]), logits

    def build(backend: str, ops: frozenset[str]) -> nn.Module:
        return create_classifier(name, num_classes, backend=backend, reference_ops=ops, img_size=cfg.img_size,
                                 patch_size=cfg.patch_size, **model_kwargs)

    config = {**_config_without_backend(cfg), "num_classes": num_classes, **_json(model_kwargs)}
    return Workload(name, config, batch_size, precision, False, device, build, inputs, loss)


# -- the key ----------------------------------------------------------------------------------------------------

def machine_facts(device: torch.device) -> dict[str, Any]:
    """What the verdict depends on besides the model: the card, its driver and the software versions."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    facts = {"card": "cpu", "capability": None, "driver": None, "cuda": torch.version.cuda,
             "torch": torch.__version__, "triton": triton_version}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        facts.update(card=props.name, capability=f"{props.major}.{props.minor}",
                     driver=torch._C._cuda_getDriverVersion())  # e.g. 12080: the CUDA API version the driver gives
    return facts


def verdict_key(workload: Workload) -> dict[str, Any]:
    return _json({**machine_facts(workload.device), "model": workload.name, "model_config": workload.model_config,
                  "batch": workload.batch_size, "precision": workload.precision, "compile": workload.compile})


def default_cache_dir() -> Path:
    return cache_root() / "backend_verdicts"


def _cache_file(cache_dir: Path, key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return Path(cache_dir) / f"{digest}.json"


def read_cached(cache_dir: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    """The cached verdict for ``key``, or None (none, unreadable, another format or another key)."""
    try:
        verdict = json.loads(_cache_file(cache_dir, key).read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(verdict, dict) and verdict.get("format") == VERDICT_FORMAT and verdict.get("key") == key
    return verdict if ok else None


def _write_json(path: Path, value: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = (json.dumps(value, indent=1, sort_keys=True) + "\n").encode("utf-8")
    replace_atomically(path, lambda f: f.write(text))  # never through a planted link (train/files.py)


# -- the numbers check ------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _ieee_fp32() -> Iterator[None]:
    """TF32 off: the fp32 truth (and an fp32 run's two paths) compare IEEE results (cuDNN's patch convolution
    would otherwise run in TF32 on the reference path only)."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def _build(workload: Workload, backend: str, reference_ops: frozenset[str], weights: dict | None) -> nn.Module:
    with torch.device(workload.device):  # initialised on the device: a ViT-B in milliseconds, not seconds
        model = workload.build(backend, reference_ops)
    model.to(workload.device).train()
    if weights is not None:
        model.load_state_dict(weights)
    return model


def _one_pass(workload: Workload, model: nn.Module, inputs: tuple, dtype: torch.dtype | None,
              seed: int) -> dict[str, torch.Tensor | None]:
    """Loss, predictions and every parameter gradient of one forward + backward, as fp32 copies."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # drop path and the like draw the same on every pass
    with torch.autocast(workload.device.type, dtype=dtype, enabled=dtype is not None):
        loss, pred = workload.loss(model, inputs)
    loss.backward()
    tensors: dict[str, torch.Tensor | None] = {"loss": loss.detach().float().reshape(1),
                                               "predictions": pred.detach().float()}
    for name, p in model.named_parameters():
        tensors[f"grad {name}"] = None if p.grad is None else p.grad.detach().float()
    return tensors


def _max_abs(t: torch.Tensor) -> float:
    value = t.abs().max().item() if t.numel() else 0.0
    return value if math.isfinite(value) else math.inf


def compare(fused: dict, truth: dict, reference: dict, rtol: float) -> dict[str, Any]:
    """The worst tensor of ``fused`` against the fp32 ``truth``: its error max|fused - truth| and its bound
    max(rtol * max|truth|, 2 * max|reference - truth|); passed when every tensor's error is within its bound."""
    worst = {"passed": True, "tensor": None, "error": 0.0, "bound": 0.0, "ratio": 0.0}
    for name, want in truth.items():
        got, ref = fused.get(name), reference.get(name)
        if want is None and got is None:
            continue
        if want is None or got is None or got.shape != want.shape:
            error, bound = math.inf, 0.0
        else:
            error = _max_abs(got - want)
            bound = max(rtol * _max_abs(want), 2 * _max_abs(ref - want))
        ratio = error / bound if bound > 0 else (0.0 if error == 0 else math.inf)
        if ratio > worst["ratio"] or worst["tensor"] is None:
            worst = {"passed": ratio <= 1, "tensor": name, "error": error, "bound": bound, "ratio": ratio}
    return worst


def check_numbers(workload: Workload, numbers_images: int = NUMBERS_IMAGES) -> dict[str, Any]:
    """Steps 1 and 2 of the module docstring: the numbers part of a verdict."""
    n = min(workload.batch_size, max(8, numbers_images))
    dtype = AUTOCAST_DTYPES[workload.precision]
    rtol = RTOL[dtype or torch.float32]
    seed = 0
    with torch.random.fork_rng(devices=[workload.device] if workload.device.type == "cuda" else []), _ieee_fp32():
        torch.manual_seed(seed)
        reference_model = _build(workload, "torch", frozenset(), None)
        weights = {k: v.clone() for k, v in reference_model.state_dict().items()}
        inputs = workload.inputs(n)
        truth = _one_pass(workload, reference_model, inputs, None, seed)
        reference = truth if dtype is None else _one_pass(workload, reference_model, inputs, dtype, seed)
        del reference_model

        def fused_with(reference_ops: frozenset[str]) -> dict[str, Any]:
            try:
                model = _build(workload, "triton", reference_ops, weights)
                return compare(_one_pass(workload, model, inputs, dtype, seed), truth, reference, rtol)
            except Exception as e:  # a kernel that does not compile or launch on this card fails its check
                return {"passed": False, "tensor": "(raised)", "error": f"{type(e).__name__}: {e}".splitlines()[0],
                        "bound": 0.0, "ratio": math.inf}

        full = fused_with(frozenset())
        ops: dict[str, dict[str, Any]] = {}
        failing: list[str] = []
        usable = full["passed"]
        if not usable:
            for op in OP_NAMES:  # one op fused, every other on the reference
                ops[op] = fused_with(frozenset(OP_NAMES) - {op})
            failing = [op for op in OP_NAMES if not ops[op]["passed"]]
            usable = bool(failing) and len(failing) < len(OP_NAMES) and fused_with(frozenset(failing))["passed"]
    return {"images": n, "rtol": rtol, "full": _json(full), "ops": _json(ops), "failing_ops": failing,
            "fused_usable": usable}


# -- the speed check --------------------------------------------------------------------------------------------

class _FixedInputs:
    """The step's objective for timing: the same inputs every step."""

    def __init__(self, workload: Workload, net: nn.Module):
        self.workload, self.net = workload, net

    def inputs(self, batch, step: int, micro: int, accum: int) -> tuple:
        return batch

    def loss(self, *inputs) -> torch.Tensor:
        return self.workload.loss(self.net, inputs)[0]


def default_timer(device: torch.device) -> Timer:
    """CUDA events on a GPU (one synchronisation per timed step), the host clock elsewhere."""
    if device.type == "cuda":
        def cuda_time(path: str, step: Callable[[], Any]) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        return cuda_time

    def host_time(path: str, step: Callable[[], Any]) -> float:
        t0 = time.perf_counter()
        step()
        return time.perf_counter() - t0
    return host_time


def time_step(workload: Workload, path: str, backend: str, reference_ops: frozenset[str], timer: Timer,
              warmup: int = WARMUP_STEPS, steps: int = TIMED_STEPS) -> float:
    """The median seconds of a training step on one path (``path``: "torch" or "fused", for ``timer``)."""
    with torch.random.fork_rng(devices=[workload.device] if workload.device.type == "cuda" else []):
        torch.manual_seed(0)
        model = _build(workload, backend, reference_ops, None)
        net = torch.compile(model) if workload.compile else model
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=workload.device.type == "cuda")
        train_step = TrainStep(optimizer, _FixedInputs(workload, net), precision=workload.precision,
                               device=workload.device)
        batches = itertools.repeat(workload.inputs(workload.batch_size))
        for i in range(warmup):
            train_step(batches, i)
        return statistics.median([timer(path, lambda: train_step(batches, 0)) for _ in range(steps)])


# -- the verdict --------------------------------------------------------------------------------------------------

def run_check(workload: Workload, timer: Timer | None = None, numbers_images: int = NUMBERS_IMAGES,
              warmup: int = WARMUP_STEPS, steps: int = TIMED_STEPS) -> dict[str, Any]:
    """Check both paths for ``workload`` (numbers, per op, speed) and return the verdict."""
    t0 = time.perf_counter()
    timer = timer or default_timer(workload.device)
    numbers = check_numbers(workload, numbers_images)
    speed: dict[str, Any] = {"warmup": warmup, "steps": steps, "torch_ms": None, "fused_ms": None}
    if numbers["fused_usable"]:
        failing = frozenset(numbers["failing_ops"])
        for path, backend, reference_ops in (("torch", "torch", frozenset()), ("fused", "triton", failing)):
            speed[f"{path}_ms"] = 1e3 * time_step(workload, path, backend, reference_ops, timer, warmup, steps)
            if workload.device.type == "cuda":  # the path's model and optimizer are gone: so is their memory
                torch.cuda.empty_cache()
    verdict = {"format": VERDICT_FORMAT, "key": verdict_key(workload), "numbers": numbers, "speed": speed,
               "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    verdict["decision"] = _decide_auto(numbers, speed)
    verdict["check_seconds"] = round(time.perf_counter() - t0, 3)
    return verdict


def _decide_auto(numbers: dict[str, Any], speed: dict[str, Any]) -> dict[str, Any]:
    if not numbers["fused_usable"]:
        full = numbers["full"]
        return {"backend": "torch", "reference_ops": [], "decided_by": "numbers",
                "detail": f"the fused path fails the numbers check ({_error_text(full)})"}
    torch_ms, fused_ms = speed["torch_ms"], speed["fused_ms"]
    partial = f" without {', '.join(numbers['failing_ops'])}" if numbers["failing_ops"] else ""
    if fused_ms < torch_ms:
        return {"backend": "triton", "reference_ops": numbers["failing_ops"], "decided_by": "speed",
                "detail": f"fused{partial} {fused_ms:.1f} ms vs torch {torch_ms:.1f} ms per step "
                          f"({torch_ms / fused_ms:.2f}x faster)"}
    return {"backend": "torch", "reference_ops": [], "decided_by": "speed",
            "detail": f"fused{partial} {fused_ms:.1f} ms vs torch {torch_ms:.1f} ms per step "
                      f"({fused_ms / torch_ms:.2f}x slower)"}


def _error_text(result: dict[str, Any]) -> str:
    if result["tensor"] == "(raised)":
        return f"it raised {result['error']}"
    return f"{result['tensor']}: max error {result['error']:.3g} > bound {result['bound']:.3g}"


def decide(verdict: dict[str, Any], requested: str) -> tuple[str, frozenset[str]]:
    """(backend, reference_ops) for ``requested`` ("auto" or "triton") from ``verdict``; raises BackendRefused
    for "triton" when a fused operation fails the numbers check."""
    numbers, key = verdict["numbers"], verdict["key"]
    if requested == "triton":
        if numbers["failing_ops"] or not numbers["fused_usable"]:
            where = f"on {key['card']} ({key['precision']}, {numbers['images']} images of {key['model']})"
            if numbers["failing_ops"]:
                op, *more = numbers["failing_ops"]
                also = f" (also failing: {', '.join(more)})" if more else ""
                what = f"the fused {op} fails the numbers check {where}: {_error_text(numbers['ops'][op])}{also}"
            else:
                what = f"the fused model fails the numbers check {where}: {_error_text(numbers['full'])}"
            raise BackendRefused(f"--backend triton: {what}; use --backend auto (the reference for what fails) "
                                 "or --backend torch")
        return "triton", frozenset()
    decision = verdict["decision"]
    return decision["backend"], frozenset(decision["reference_ops"])


def summary(verdict: dict[str, Any], requested: str, cached: bool) -> str:
    """The one log line of a verdict: the path, which check decided and by how much, the check's cost."""
    backend, reference_ops = decide(verdict, requested)
    path = backend + (f" (reference for {', '.join(sorted(reference_ops))})" if reference_ops else "")
    decision = verdict["decision"]
    how = "forced" if requested == "triton" else f"decided by {decision['decided_by']}"
    cost = "cached verdict, no check" if cached else f"check took {verdict['check_seconds']:.1f} s"
    return f"--backend {requested}: {path}, {how}: {decision['detail']} [{cost}; {verdict['key']['card']}]"


def checked_choice(requested: str, workload: Workload, *, cache_dir: Path, output_dir: Path | None = None,
                   timer: Timer | None = None, check: Callable[..., dict[str, Any]] = run_check,
                   ) -> tuple[str, frozenset[str]]:
    """(backend, reference_ops) for ``requested`` ("auto" or "triton") on the workload's device: rank 0 reads the
    cached verdict or runs ``check(workload, timer=timer)``, caches it, writes it into ``output_dir``; every rank
    then decides from rank 0's verdict. Runs wherever it is called (tests call it on a CPU)."""
    several = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    is_main = not several or dist.get_rank() == 0
    verdict, cached = None, False
    if is_main:
        key = verdict_key(workload)
        verdict = read_cached(cache_dir, key)
        cached = verdict is not None
        if verdict is None:
            logger.info("--backend %s: checking the fused path on %s (numbers, then speed)...", requested,
                        key["card"])
            verdict = check(workload, timer=timer)
            try:
                _write_json(_cache_file(cache_dir, key), verdict)
            except OSError as e:
                logger.warning("cannot cache the backend verdict in %s (%s): the next run checks again", cache_dir, e)
        if output_dir is not None:
            _write_json(Path(output_dir) / VERDICT_FILE, {**verdict, "cached": cached, "requested": requested})
    if several:
        box = [verdict]
        dist.broadcast_object_list(box, src=0)
        verdict = box[0]
    choice = decide(verdict, requested)  # every rank the same verdict: the same path, or the same refusal
    if is_main:
        logger.info("%s", summary(verdict, requested, cached))
    return choice


def choose_backend(requested: str, workload: Workload, output_dir: Path | None) -> tuple[str, frozenset[str]]:
    """The training runs' entry: (backend, reference_ops) to build for ``--backend requested``."""
    if requested == "torch":
        return "torch", frozenset()
    if workload.device.type != "cuda" or not triton_available():
        if requested == "auto":
            logger.info("--backend auto: torch (the fused path is checked and chosen on a CUDA GPU with triton only)")
        return resolve_backend(requested) if requested == "auto" else (requested, frozenset())
    return checked_choice(requested, workload, cache_dir=default_cache_dir(), output_dir=output_dir)
