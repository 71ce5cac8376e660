"""The step ledger: one full pre-training step accounted op by op, without a GPU.

    python -m bench.ledger --models crossmae_vit_base_patch16 --batch 256 --precision bf16 \\
        --backends torch,triton --card H200
    python -m bench.ledger --models crossmae_vit_base_patch16:kept_mask_ratio=0.75,mae_vit_base_patch16 --no-write

For a registry model, a backend ("torch" reference or "triton" fused kernels), a batch and a precision, one
training step exactly as train/pretrain.py runs it (noise drawn with a generator, forward under autocast, loss
/ accum_iter through the GradScaler, backward, fused AdamW with the trainer's parameter groups, zero_grad) is
run on the CPU under a ``TorchDispatchMode`` that sees every aten op whatever module calls it. Per op class and
in total it reports ops launched, bytes read + written, FLOPs, and the bytes saved for backward; then a
roofline *estimate* (never a measurement) for a named card. Backends side by side, JSON + Markdown under
bench/results/ (``ledger_<gpu>_<date>`` and ``ledger_latest``) with versions and the command.

Real shapes, small batches: the step runs at two small batches (default 2 and 3; batch 1 is avoided because
size-1 dimensions make some copies no-ops) and every quantity is extrapolated linearly, value = const + slope *
batch. The op sequence must be identical at both batches, else ``LedgerError`` names the first difference (a
batch-dependent op sequence is a bug to report, not to average over). One untracked warm-up step comes first,
so the optimizer state exists and the counted step is a steady-state one. ``--check-batch N`` counts a third
batch and reports every op quantity off the line (``extrapolation_check``). Known to be off: torch reductions
inside a custom op over per-program partial sums (bias_gelu / layer_norm / feature_mix backward), whose row
count follows the launch grid, min(programs per SM x SMs, row blocks): piecewise in the batch, and computed
for the interpreter's 2 "SMs", not a GPU's 132. Their bytes are a few hundredths of a percent of the step's.

Counting rules
    * Views and metadata-only ops (every op whose schema returns only aliases of its inputs: view, expand,
      transpose, select, slice, unbind, as_strided, detach, alias, t, permute, (un)squeeze...; plus
      _unsafe_view, lift_fresh, set_) launch nothing and move nothing. Allocations without a write (empty,
      empty_like, empty_strided, new_empty...) move nothing. Both are tallied apart ("free ops").
    * Every other aten op is one launch; bytes read = the footprint of its distinct tensor inputs (none for
      zeros_like / new_zeros / ones_like..., which take a tensor only for its shape), bytes
      written = its fresh outputs plus the inputs its schema mutates. Footprint = the bytes a view addresses:
      stride-0 (expanded) dimensions count once. (_fused_adam(w)_ reads its grads: the schema marks them
      mutable only for the grad-scaler case.)
    * Matmul class: mm, addmm, bmm, baddbmm, addbmm, mv, convolution and its backward ("matmul"), every
      scaled_dot_product_* op and every custom op named *attention_* ("attention"; one without a FLOP formula
      raises LedgerError rather than count as zero). Their FLOPs come from the shapes:
      2mkn per matrix product; convolution 2 * out numel * (C_in / groups * kernel area), its backward that
      once per gradient the output mask asks for; attention forward 2 * B * H * Lq * Lk * (d_qk + d_v) (=
      4BHLqLkd), backward 2.5x that: the flash convention, exact for kernels that recompute the scores (the
      CPU flash kernel, CUDA flash/efficient, and ours: S, dV, dP, dQ, dK = 5 products). Their bytes are
      reported, apart from the "other" (non-matmul) bytes.
    * Custom ops (any namespace but aten; ``crossmae::*``): ONE launch per call with bytes = its own inputs
      + outputs, FLOPs from ``CUSTOM_FLOPS`` (attention, self_attention (packed qkv), cross_attention
      (packed kv) as above; feature_mix: the minimal mix work, forward 2*J*k*N*C, backward twice that; the
      kernel's recomputations and split-W dots are left out: < 0.1% of a step). Plus every torch op its body
      runs, each counted as above (``parent`` names the custom op); composite ops in a body (``.to()``,
      ``reshape``) are decomposed under the ledger, so the copies they make are counted.
      A custom op whose body launches several Triton kernels still counts as one launch (the issue's rule);
      the Triton launches are counted apart, per custom op, as ``triton_kernels``, and "GPU kernels" =
      launched aten ops + Triton kernels (the custom-op wrapper itself launches nothing on a GPU).
    * Triton's CPU interpreter copies tensors in and out with torch ops that do not exist on a GPU: the
      ledger wraps ``InterpretedFunction.run`` (and ``JITFunction.run``, for compiled launches) while it
      records, suspends recording for the duration of a launch and counts the launch instead. A Triton
      launch outside any custom op is counted as one launch touching its tensor arguments (as reads).
    * Saved for backward: every tensor packed through ``torch.autograd.graph.saved_tensors_hooks`` during the
      forward, each storage once (keyed by ``untyped_storage().data_ptr()``, its whole ``nbytes()``),
      parameters and buffers excluded. Reported as a per-image slope and a batch-independent constant
      (autocast's bf16 weight copies).

Fidelity: this is the CPU's dispatch of the step. CPU autocast has a shorter fp32 list than CUDA's (CUDA
autocasts layer_norm, softmax, sum, pow... to fp32): where a LayerNorm's input is bf16 (CrossMAE's IBA
dec_norms in the torch path) the GPU writes fp32 and adds a cast. CPU SDPA runs the flash-for-CPU op. Fused
AdamW is one op here; on a GPU it is a few multi-tensor launches.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import shlex
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch

# The kernels read TRITON_INTERPRET when `kernels` is first imported; the ledger runs on the CPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from bench.machine import machine_facts
from bench.results import resolve_results_dir, write_results


def ledger_device() -> torch.device:
    """The CPU (the ledger's purpose: no GPU needed; kernels under Triton's interpreter), or CUDA where there is
    one and the kernels are compiled (then Triton launches are counted at JITFunction.run; not yet run there)."""
    interpreted = os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")
    return torch.device("cuda" if torch.cuda.is_available() and not interpreted else "cpu")

DEFAULT_SAMPLE_BATCHES = (2, 3)
PRECISIONS = ("bf16", "fp16", "fp32")
BACKENDS = ("torch", "triton")
KIND = "ledger"


class LedgerError(RuntimeError):
    """The step cannot be accounted honestly (e.g. its op sequence depends on the batch)."""


# ------------------------------------------------------------------------------------------------------------
# cards (stated constants: datasheet peaks, dense)
# ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Card:
    name: str
    bandwidth: float  # bytes/s, peak HBM
    peak_flops: dict[str, float]  # FLOP/s by precision, dense (bf16/fp16 tensor cores; fp32 without TF32)
    launch_overhead_s: float = 3e-6  # host-side cost of one eager launch, shown apart (hidden when GPU-bound)


CARDS = {
    "H100": Card("NVIDIA H100 SXM", 3.35e12, {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}),
    "H200": Card("NVIDIA H200", 4.8e12, {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}),
}
ROOFLINE_FORMULA = "t = FLOPs / peak_FLOPs + bytes / peak_BW (no overlap; launches x overhead shown apart)"


# ------------------------------------------------------------------------------------------------------------
# op classification and per-op cost
# ------------------------------------------------------------------------------------------------------------

# Views that the schema does not mark as aliases, and metadata-only mutations.
_FREE_EXTRA = {"_unsafe_view", "lift_fresh", "set_", "resize_", "_reshape_alias", "sym_size", "sym_stride",
               "sym_numel", "sym_storage_offset", "is_same_size", "_has_compatible_shallow_copy_type"}
_ALLOC = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "empty_permuted"}
_MATMUL = {"mm", "addmm", "bmm", "baddbmm", "addbmm", "mv", "addmv", "dot", "convolution",
           "convolution_backward", "_convolution"}
_CLASS_BY_NAME = {
    "native_layer_norm": "layer_norm", "native_layer_norm_backward": "layer_norm",
    "gelu": "gelu", "gelu_backward": "gelu",
    "_softmax": "softmax", "_softmax_backward_data": "softmax", "_log_softmax": "softmax",
    "_to_copy": "cast/copy (_to_copy, copy_, clone)", "copy_": "cast/copy (_to_copy, copy_, clone)",
    "clone": "cast/copy (_to_copy, copy_, clone)",
    "select_backward": "view backward, zeros, fill", "slice_backward": "view backward, zeros, fill",
    "as_strided_backward": "view backward, zeros, fill", "unbind_backward": "view backward, zeros, fill",
    "zeros": "view backward, zeros, fill", "zeros_like": "view backward, zeros, fill",
    "new_zeros": "view backward, zeros, fill", "zero_": "view backward, zeros, fill",
    "fill_": "view backward, zeros, fill", "full": "view backward, zeros, fill", "ones": "view backward, zeros, fill",
    "ones_like": "view backward, zeros, fill", "full_like": "view backward, zeros, fill",
    "new_ones": "view backward, zeros, fill", "scalar_tensor": "view backward, zeros, fill",
    "cat": "cat/stack", "stack": "cat/stack",
    "index": "index/gather/scatter", "index_select": "index/gather/scatter", "gather": "index/gather/scatter",
    "scatter": "index/gather/scatter", "scatter_add": "index/gather/scatter", "scatter_add_": "index/gather/scatter",
    "index_put": "index/gather/scatter", "index_put_": "index/gather/scatter", "take": "index/gather/scatter",
    "_index_put_impl_": "index/gather/scatter", "index_add": "index/gather/scatter",
    "index_add_": "index/gather/scatter", "embedding": "index/gather/scatter",
    "embedding_dense_backward": "index/gather/scatter", "scatter_": "index/gather/scatter",
    "sort": "sort", "argsort": "sort", "topk": "sort",
    "rand": "random", "randn": "random", "uniform_": "random", "normal_": "random", "bernoulli_": "random",
    "randint": "random", "randperm": "random",
    "_fused_adamw_": "optimizer", "_fused_adam_": "optimizer",
    "_local_scalar_dense": "host sync (.item, nonzero)", "nonzero": "host sync (.item, nonzero)",
    "masked_select": "host sync (.item, nonzero)",
    "_amp_foreach_non_finite_check_and_unscale_": "grad scaler", "_amp_update_scale_": "grad scaler",
}
MATMUL_CLASSES = ("matmul", "attention")
# Ops that take a tensor only for its shape, dtype and device: they read nothing.
_READS_NOTHING = {"zeros_like", "ones_like", "full_like", "empty_like", "new_zeros", "new_ones", "new_full",
                  "new_empty", "rand_like", "randn_like", "randint_like"}


def _custom_class(name: str) -> str:
    """crossmae::attention_fwd / _bwd -> crossmae::attention; gather_rows_bwd_x -> crossmae::gather_rows."""
    ns, op = name.split("::", 1)
    stem = re.sub(r"_(fwd|bwd)(_\w+)?$", "", op)
    return f"{ns}::{stem}"


def op_class(func: Any) -> str:
    """The ledger's class of an aten / custom OpOverload ('free' for views, metadata and allocations)."""
    if func.namespace == "profiler":  # record_function markers (Optimizer.step): no device work
        return "view"
    if func.namespace != "aten":
        stem = _custom_class(func._schema.name)
        return "attention" if stem.endswith("attention") else stem
    base = func._opname
    if base in _ALLOC:
        return "alloc"
    if base in _FREE_EXTRA or _is_alias_only(func):
        return "view"
    if base in _MATMUL:
        return "matmul"
    if "scaled_dot_product" in base or base.startswith(("_flash_attention", "_efficient_attention", "_cudnn_att")):
        return "attention"
    if base in _CLASS_BY_NAME:
        return _CLASS_BY_NAME[base]
    if base.startswith("_foreach_"):
        return "optimizer"
    if torch.Tag.reduction in func.tags or base in ("sum", "mean", "var", "var_mean", "std", "std_mean", "amax",
                                                    "amin", "max", "min", "norm", "linalg_vector_norm", "prod"):
        return "reduction"
    if torch.Tag.pointwise in func.tags:
        return "elementwise (add, mul, ...)"
    return "other"


def _is_alias_only(func: Any) -> bool:
    """The schema returns only (non-mutated) aliases of its inputs: a view, no data moves."""
    returns = func._schema.returns
    if not returns:
        return False
    return all(r.alias_info is not None and not r.alias_info.is_write for r in returns)


def footprint(t: torch.Tensor) -> int:
    """Bytes a view addresses: stride-0 (broadcast) dimensions count once."""
    if t.numel() == 0:
        return 0
    n = 1
    for size, stride in zip(t.shape, t.stride(), strict=True):
        if stride != 0:
            n *= size
    return n * t.element_size()


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [x for x in pytree.tree_leaves(tree) if isinstance(x, torch.Tensor)]


def _view_key(t: torch.Tensor) -> tuple:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def _distinct_bytes(tensors: Sequence[torch.Tensor]) -> int:
    seen, total = set(), 0
    for t in tensors:
        key = _view_key(t)
        if key not in seen:
            seen.add(key)
            total += footprint(t)
    return total


def _mutated_args(func: Any, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """The tensors the schema says the op writes in place (grads of _fused_adam(w)_ excluded: read only)."""
    out = []
    schema_args = func._schema.arguments
    for i, a in enumerate(schema_args):
        if a.alias_info is None or not a.alias_info.is_write:
            continue
        if func._opname in ("_fused_adamw_", "_fused_adam_") and a.name == "grads" and \
                kwargs.get("grad_scale") is None:
            continue
        value = args[i] if i < len(args) else kwargs.get(a.name)
        out += _tensors(value)
    return out


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(s) for s in t.shape)


def _attention_fwd_flops(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: str) -> int:
    """2 * B * H * Lq * Lk * (d_qk + d_v); layout 'bhld' (aten SDPA) or 'blhd' (crossmae::attention)."""
    if layout == "bhld":
        B, H, Lq, d = _shape(q)
        Lk, dv = k.shape[2], v.shape[3]
    else:
        B, Lq, H, d = _shape(q)
        Lk, dv = k.shape[1], v.shape[3]
    return 2 * B * H * Lq * int(Lk) * (d + int(dv))


ATTENTION_BACKWARD_FACTOR = 2.5  # recompute S, then dV, dP, dQ, dK: 5 products against the forward's 2


def _packed_attention_flops(q: torch.Tensor, kv: torch.Tensor, n_packed: int) -> int:
    """Attention FLOPs from a packed projection: q (B, Lq, H, d) (None: q is slice 0 of kv) and kv
    (B, Lk, n_packed, H, d)."""
    B, Lk, packed, H, d = _shape(kv)
    if packed != n_packed:
        raise LedgerError(f"ledger: expected a packed (B, L, {n_packed}, H, d) tensor, got {tuple(kv.shape)}")
    Lq = Lk if q is None else int(q.shape[1])
    return 2 * B * H * Lq * Lk * (d + d)


def _feature_mix_flops(feats: torch.Tensor, weight: torch.Tensor) -> int:
    K, N, C = _shape(feats)
    return 2 * int(weight.shape[0]) * K * N * C


# custom op (schema name) -> FLOPs from (args, kwargs). Ops not listed do no matmul work (FLOPs 0).
CUSTOM_FLOPS = {
    "crossmae::attention_fwd": lambda a, kw: _attention_fwd_flops(a[0], a[1], a[2], "blhd"),
    "crossmae::attention_bwd": lambda a, kw: int(ATTENTION_BACKWARD_FACTOR
                                                 * _attention_fwd_flops(a[1], a[2], a[3], "blhd")),
    "crossmae::self_attention_fwd": lambda a, kw: _packed_attention_flops(None, a[0], 3),  # (qkv, scale)
    "crossmae::self_attention_bwd": lambda a, kw: int(ATTENTION_BACKWARD_FACTOR  # (do, qkv, out, lse, scale)
                                                      * _packed_attention_flops(None, a[1], 3)),
    "crossmae::cross_attention_fwd": lambda a, kw: _packed_attention_flops(a[0], a[1], 2),  # (q, kv, scale)
    "crossmae::cross_attention_bwd": lambda a, kw: int(ATTENTION_BACKWARD_FACTOR  # (do, q, kv, out, lse, scale)
                                                       * _packed_attention_flops(a[1], a[2], 2)),
    "crossmae::feature_mix_fwd": lambda a, kw: _feature_mix_flops(a[0], a[1]),
    "crossmae::feature_mix_bwd": lambda a, kw: 2 * _feature_mix_flops(a[1], a[2]),
}


def op_flops(func: Any, args: tuple, kwargs: dict) -> int:
    """Matmul FLOPs (2 per multiply-add) of one op from its input shapes; 0 for everything else."""
    if func.namespace != "aten":
        name = func._schema.name
        rule = CUSTOM_FLOPS.get(name)
        if rule is None and op_class(func) == "attention":  # matmul work must never be counted as zero
            raise LedgerError(f"ledger: custom attention op {name} has no FLOP formula: add it to "
                              "bench/ledger.py CUSTOM_FLOPS")
        return 0 if rule is None else int(rule(args, kwargs))
    base = func._opname
    if base == "mm":
        (m, k), n = _shape(args[0]), args[1].shape[1]
        return 2 * m * k * int(n)
    if base == "addmm":
        (m, k), n = _shape(args[1]), args[2].shape[1]
        return 2 * m * k * int(n)
    if base in ("bmm", "baddbmm", "addbmm"):
        a, b = (args[0], args[1]) if base == "bmm" else (args[1], args[2])
        bs, m, k = _shape(a)
        return 2 * bs * m * k * int(b.shape[2])
    if base in ("mv", "addmv"):
        m, k = _shape(args[0] if base == "mv" else args[1])
        return 2 * m * k
    if base == "dot":
        return 2 * int(args[0].numel())
    if base in ("convolution", "_convolution"):
        x, w, transposed = args[0], args[1], bool(args[6])
        per_out = int(w[0].numel())  # C_in / groups * kernel area (transposed: C_out / groups * area)
        if transposed:
            return 2 * int(x.numel()) * per_out
        out_numel = _conv_out_numel(x, w, args[3], args[4], args[5])
        return 2 * out_numel * per_out
    if base == "convolution_backward":
        grad_out, x, w, transposed, mask = args[0], args[1], args[2], bool(args[7]), args[10]
        once = 2 * int((x if transposed else grad_out).numel()) * int(w[0].numel())
        return once * (int(bool(mask[0])) + int(bool(mask[1])))
    if "scaled_dot_product" in base:
        if base.endswith("_backward"):
            return int(ATTENTION_BACKWARD_FACTOR * _attention_fwd_flops(args[1], args[2], args[3], "bhld"))
        return _attention_fwd_flops(args[0], args[1], args[2], "bhld")
    return 0


def _conv_out_numel(x: torch.Tensor, w: torch.Tensor, stride, padding, dilation) -> int:
    n, spatial = x.shape[0], x.shape[2:]
    k = w.shape[2:]
    dims = len(spatial)

    def pick(v, i):
        return v[i] if len(v) > 1 else v[0]

    out = int(n) * int(w.shape[0])
    for i in range(dims):
        out *= (int(spatial[i]) + 2 * pick(padding, i) - pick(dilation, i) * (int(k[i]) - 1) - 1) // pick(stride, i) + 1
    return out


# ------------------------------------------------------------------------------------------------------------
# recording
# ------------------------------------------------------------------------------------------------------------


class OpEvent(NamedTuple):
    name: str  # "aten.add.Tensor", "crossmae.attention_fwd.default", "triton:<kernel>"
    op_class: str
    phase: str  # "forward" | "backward" | "optimizer"
    launches: int  # 0 for views / allocations, else 1
    bytes_read: int
    bytes_written: int
    flops: int
    parent: str | None  # the custom op whose body ran this op
    triton_kernels: int  # Triton launches inside this custom op


@dataclass
class StepCount:
    """Everything one recorded step did, in order."""

    batch: int
    events: list[OpEvent] = field(default_factory=list)
    saved_bytes: int = 0
    saved_tensors: int = 0
    triton_outside_custom: int = 0
    loss: float | None = None


def _backend_keyset(args: tuple, kwargs: dict) -> torch._C.DispatchKeySet:
    """The backend dispatch key of the op's tensors: where a custom op's implementation is registered."""
    tensors = _tensors((args, kwargs))
    device = tensors[0].device.type if tensors else "cpu"
    key = {"cpu": torch._C.DispatchKey.CPU, "cuda": torch._C.DispatchKey.CUDA}.get(device)
    if key is None:
        raise LedgerError(f"ledger: custom op on device {device!r}: only cpu and cuda are supported")
    return torch._C.DispatchKeySet(key)


_COMPOSITE = torch._C.DispatchKey.CompositeImplicitAutograd


class _Recorder(TorchDispatchMode):
    """Records every op that reaches the Python dispatch key (i.e. after autograd and autocast), custom ops'
    bodies included; paused while a Triton kernel runs (the interpreter's own copies are not GPU work)."""

    def __init__(self, count: StepCount):
        super().__init__()
        self.count = count
        self.phase = "forward"
        self.suspended = 0
        self.parents: list[list] = []  # [name, triton launches] of the custom ops being run

    def triton_launch(self, kernel_name: str, args: tuple) -> None:
        if self.parents:
            self.parents[-1][1] += 1
            return
        self.count.triton_outside_custom += 1
        self.count.events.append(OpEvent(f"triton:{kernel_name}", "triton kernel (no custom op)", self.phase, 1,
                                         _distinct_bytes(_tensors(args)), 0, 0, None, 1))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.suspended:
            return func(*args, **kwargs)
        custom = func.namespace != "aten"
        if not custom and torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), _COMPOSITE):
            # A composite op reaches this key below autograd (in a custom op's body: `.to()`, `reshape`...); run
            # its decomposition with the mode active, so that the copies it may make are recorded, not hidden.
            with self:
                decomposed = func.decompose(*args, **kwargs)
            if decomposed is not NotImplemented:
                return decomposed
        cls = op_class(func)
        if custom:
            self.parents.append([func._schema.name, 0])
            try:
                with self:  # re-entered: the body's torch ops are recorded too
                    out = func.redispatch(_backend_keyset(args, kwargs), *args, **kwargs)
            finally:
                _, kernels_launched = self.parents.pop()
        else:
            out = func(*args, **kwargs)
            kernels_launched = 0
        parent = self.parents[-1][0] if self.parents else None
        if cls in ("view", "alloc"):
            self.count.events.append(OpEvent(str(func), cls, self.phase, 0, 0, 0, 0, parent, 0))
            return out
        inputs = _tensors((args, kwargs))
        input_storages = {t.untyped_storage().data_ptr() for t in inputs}
        fresh = [t for t in _tensors(out) if t.untyped_storage().data_ptr() not in input_storages]
        written = _distinct_bytes(fresh + _mutated_args(func, args, kwargs))
        read = 0 if func.namespace == "aten" and func._opname in _READS_NOTHING else _distinct_bytes(inputs)
        self.count.events.append(OpEvent(str(func), cls, self.phase, 1, read, written,
                                         op_flops(func, args, kwargs), parent, kernels_launched))
        return out


@contextlib.contextmanager
def _triton_launch_hooks(recorder: _Recorder) -> Iterator[None]:
    """Count Triton launches and pause recording while they run (restored on exit)."""
    patched = []
    try:
        from triton.runtime.interpreter import InterpretedFunction

        patched.append(InterpretedFunction)
    except ImportError:
        pass
    try:
        from triton.runtime.jit import JITFunction

        patched.append(JITFunction)
    except ImportError:
        pass
    originals = [cls.run for cls in patched]

    def wrap(original):
        def run(self, *args, grid, warmup, **kwargs):
            if warmup:
                return original(self, *args, grid=grid, warmup=warmup, **kwargs)
            recorder.triton_launch(getattr(self, "__name__", "kernel"), args)
            recorder.suspended += 1
            try:
                return original(self, *args, grid=grid, warmup=warmup, **kwargs)
            finally:
                recorder.suspended -= 1

        return run

    for cls, original in zip(patched, originals, strict=True):
        cls.run = wrap(original)
    try:
        yield
    finally:
        for cls, original in zip(patched, originals, strict=True):
            cls.run = original


class Ledger:
    """Context manager that records one step: ``with Ledger(batch, exclude=model) as led: ...; led.count``.

    ``led.phase = "backward"`` tags the following ops. Saved tensors are collected while phase is
    "forward"; storages of ``exclude``'s parameters and buffers are not activations and are skipped.
    """

    def __init__(self, batch: int = 0, exclude: torch.nn.Module | None = None):
        self.count = StepCount(batch)
        self._recorder = _Recorder(self.count)
        self._stack = contextlib.ExitStack()
        self._excluded = set()
        if exclude is not None:
            self._excluded = {t.untyped_storage().data_ptr()
                              for t in [*exclude.parameters(), *exclude.buffers()]}
        self._saved: dict[int, int] = {}

    @property
    def phase(self) -> str:
        return self._recorder.phase

    @phase.setter
    def phase(self, value: str) -> None:
        self._recorder.phase = value

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if self._recorder.phase == "forward" and not self._recorder.suspended:
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key not in self._excluded:
                if key not in self._saved:
                    self.count.saved_tensors += 1
                self._saved[key] = max(self._saved.get(key, 0), storage.nbytes())
        return t

    def __enter__(self) -> Ledger:
        self._stack.enter_context(torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t))
        self._stack.enter_context(_triton_launch_hooks(self._recorder))
        self._stack.enter_context(self._recorder)
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()
        self.count.saved_bytes = sum(self._saved.values())


# ------------------------------------------------------------------------------------------------------------
# one training step, as train/pretrain.py runs it
# ------------------------------------------------------------------------------------------------------------

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


@dataclass
class _Trainer:
    device: torch.device
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    precision: str
    num_patches: int
    img_size: int
    noise_gen: torch.Generator


def _build(model_name: str, backend: str, overrides: dict, precision: str, device: torch.device,
           seed: int = 0) -> _Trainer:
    from model import create_model
    from train.optim import param_groups

    if backend == "triton":
        import kernels

        if device.type == "cpu" and not kernels.INTERPRET:
            raise LedgerError("ledger: backend='triton' on the CPU needs TRITON_INTERPRET=1 set before `kernels` "
                              "is imported (else the kernels fall back to their references and the ledger would "
                              "count those); run `python -m bench.ledger` or set it in the environment")
    torch.manual_seed(seed)
    model = create_model(model_name, backend=backend, **overrides).to(device).train()
    # The trainer's optimizer (train/optim.py build_optimizer), fused as on CUDA (torch >= 2.4 has it on the CPU).
    optimizer = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4, betas=(0.9, 0.95), fused=True)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return _Trainer(device, model, optimizer, scaler, precision, model.cfg.num_patches, model.cfg.img_size, gen)


def _train_step(t: _Trainer, imgs: torch.Tensor, ledger: Ledger | None) -> torch.Tensor:
    """train/pretrain.py's forward_backward + optimizer_step with accum_iter 1, phases tagged for the ledger."""
    accum = 1
    dtype = AUTOCAST[t.precision]

    def phase(name: str) -> None:
        if ledger is not None:
            ledger.phase = name

    phase("forward")
    noise = torch.rand(imgs.shape[0], t.num_patches, generator=t.noise_gen, device=t.device)
    with torch.autocast(t.device.type, dtype=dtype, enabled=dtype is not None):
        loss = t.model(imgs, noise)["loss"]
    phase("backward")
    t.scaler.scale(loss / accum).backward()
    phase("optimizer")
    t.scaler.step(t.optimizer)
    t.scaler.update()
    t.optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def _count_step(t: _Trainer, batch: int, seed: int = 0) -> StepCount:
    """Record one training step at ``batch`` (random normalised images of the model's size)."""
    gen = torch.Generator().manual_seed(seed + batch)
    imgs = torch.randn(batch, 3, t.img_size, t.img_size, generator=gen).to(t.device)
    with Ledger(batch, exclude=t.model) as led:
        loss = _train_step(t, imgs, led)
    # Kept, not checked: counting does not depend on the numbers (and the interpreter's bf16 is inexact).
    led.count.loss = float(loss)
    return led.count


# ------------------------------------------------------------------------------------------------------------
# aggregation and linear extrapolation
# ------------------------------------------------------------------------------------------------------------

QUANTITIES = ("launches", "bytes_read", "bytes_written", "bytes", "flops", "triton_kernels", "gpu_kernels")


def aggregate(events: Sequence[OpEvent], key: Callable[[OpEvent], str] = lambda e: e.op_class
              ) -> dict[str, dict[str, int]]:
    """Per key (class by default): launches, bytes read / written / both, FLOPs, Triton kernels, GPU kernels,
    and the free ops (views, allocations) apart."""
    table: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys((*QUANTITIES, "free_ops"), 0))
    for e in events:
        row = table[key(e)]
        if not e.launches:
            row["free_ops"] += 1
            continue
        row["launches"] += e.launches
        row["bytes_read"] += e.bytes_read
        row["bytes_written"] += e.bytes_written
        row["bytes"] += e.bytes_read + e.bytes_written
        row["flops"] += e.flops
        row["triton_kernels"] += e.triton_kernels
        # On a GPU a custom op is its Triton kernels; an aten op is (about) one kernel.
        row["gpu_kernels"] += e.launches if e.name.startswith("aten.") else e.triton_kernels
    return dict(table)


def totals(events: Sequence[OpEvent]) -> dict[str, int]:
    by_class = aggregate(events)
    out = dict.fromkeys((*QUANTITIES, "free_ops"), 0)
    for row in by_class.values():
        for k, v in row.items():
            out[k] += v
    out["matmul_bytes"] = sum(r["bytes"] for c, r in by_class.items() if c in MATMUL_CLASSES)
    out["other_bytes"] = out["bytes"] - out["matmul_bytes"]
    out["matmul_flops"] = sum(r["flops"] for c, r in by_class.items() if c in MATMUL_CLASSES)
    # The same step with attention backward counted as 4 products (2x forward, no recomputation), the convention
    # of FLOP counters that follow the math rather than the flash kernels.
    attn_bwd = sum(e.flops for e in events if e.op_class == "attention" and e.phase == "backward")
    out["flops_attention_bwd_2x"] = out["flops"] - attn_bwd + round(attn_bwd * 2 / ATTENTION_BACKWARD_FACTOR)
    for phase in ("forward", "backward", "optimizer"):
        sub = [e for e in events if e.phase == phase]
        out[f"{phase}_flops"] = sum(e.flops for e in sub)
        out[f"{phase}_launches"] = sum(e.launches for e in sub)
    return out


def check_same_sequence(a: StepCount, b: StepCount) -> None:
    """The two batches must run the same ops in the same order (else extrapolation would be meaningless)."""
    seq_a = [(e.name, e.phase, e.parent) for e in a.events]
    seq_b = [(e.name, e.phase, e.parent) for e in b.events]
    if seq_a == seq_b:
        return
    i = next((i for i, (x, y) in enumerate(zip(seq_a, seq_b, strict=False)) if x != y), min(len(seq_a), len(seq_b)))
    op_a = seq_a[i] if i < len(seq_a) else "end of step"
    op_b = seq_b[i] if i < len(seq_b) else "end of step"
    raise LedgerError(f"ledger: the op sequence depends on the batch: {len(seq_a)} ops at batch {a.batch}, "
                      f"{len(seq_b)} at batch {b.batch}; first difference at op {i}: {op_a} vs {op_b}. "
                      "A batch-dependent op sequence is a bug in the step (report it), not something to average")


@dataclass(frozen=True)
class Linear:
    """value(batch) = const + slope * batch, fitted exactly through two batches."""

    const: float
    slope: float

    @classmethod
    def fit(cls, b1: int, v1: float, b2: int, v2: float) -> Linear:
        slope = (v2 - v1) / (b2 - b1)
        return cls(v1 - slope * b1, slope)

    def at(self, batch: int) -> float:
        return self.const + self.slope * batch


def _fit_tables(t1: dict, t2: dict, b1: int, b2: int) -> dict[str, dict[str, Linear]]:
    keys = sorted(set(t1) | set(t2))
    zero = dict.fromkeys(next(iter(t1.values())).keys() if t1 else (), 0)
    return {k: {q: Linear.fit(b1, t1.get(k, zero)[q], b2, t2.get(k, zero)[q]) for q in t1.get(k, t2.get(k))}
            for k in keys}


def ledger_for(model_name: str, backend: str, overrides: dict | None = None, precision: str = "bf16",
               sample_batches: tuple[int, int] = DEFAULT_SAMPLE_BATCHES, seed: int = 0,
               extra_batches: Sequence[int] = (), device: torch.device | None = None) -> dict:
    """Account one training step of ``create_model(model_name, backend=backend, **overrides)``.

    Returns {"fits": per-class {quantity: Linear}, "total": {quantity: Linear}, "saved": Linear (bytes),
    "ops": per-op-name {quantity: Linear}, "samples": the raw StepCounts, ...}; evaluate at any batch with
    ``Linear.at``. Raises LedgerError when the op sequence differs between the two sample batches.
    ``extra_batches`` are counted too (same model, after the samples) and returned as "extra_samples", to check
    the extrapolation against.
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
    trainer = _build(model_name, backend, dict(overrides or {}), precision, device, seed)
    # Untracked: creates the optimizer state (and the interpreter's caches). Batch 1 is the cheapest; anything
    # lazily created at a larger batch would change the op sequence between the samples, which is checked.
    _train_step(trainer, torch.randn(1, 3, trainer.img_size, trainer.img_size, device=device), None)
    s1, s2 = _count_step(trainer, b1, seed), _count_step(trainer, b2, seed)
    check_same_sequence(s1, s2)
    extra = [_count_step(trainer, b, seed) for b in extra_batches]
    model = trainer.model
    result = {
        "model": model_name, "backend": backend, "overrides": dict(overrides or {}), "precision": precision,
        "device": str(device),
        "sample_batches": [b1, b2],
        "by_class": _fit_tables(aggregate(s1.events), aggregate(s2.events), b1, b2),
        "by_op": _fit_tables(aggregate(s1.events, op_key), aggregate(s2.events, op_key), b1, b2),
        "total": {q: Linear.fit(b1, v, b2, totals(s2.events)[q]) for q, v in totals(s1.events).items()},
        "saved": Linear.fit(b1, s1.saved_bytes, b2, s2.saved_bytes),
        "saved_tensors": [s1.saved_tensors, s2.saved_tensors],
        "params": sum(p.numel() for p in model.parameters()),
        "model_flops_per_image": model.flops_per_image(training=True),
        "model_forward_flops_per_image": model.flops_per_image(training=False),
        "samples": [s1, s2], "extra_samples": extra, "losses": [s.loss for s in (s1, s2)],
        "extrapolation_checks": [],
        "seconds": round(time.perf_counter() - started, 1),
    }
    result["extrapolation_checks"] = [extrapolation_check(result, sample) for sample in extra]
    return result


def op_key(e: OpEvent) -> str:
    """An op's row in the per-op table: its name, and the custom op whose body ran it."""
    return e.name if e.parent is None else f"{e.name} in {e.parent}"


def extrapolation_check(result: dict, sample: StepCount) -> dict:
    """Compare a step counted at another batch with the fit: every op (by ``op_key``) and quantity that the
    line does not predict exactly, and the total bytes error."""
    measured = aggregate(sample.events, op_key)
    inexact, bytes_error = [], 0.0
    for key in sorted(set(measured) | set(result["by_op"])):
        fits = result["by_op"].get(key)
        for q in ("launches", "bytes_read", "bytes_written", "flops", "triton_kernels"):
            predicted = fits[q].at(sample.batch) if fits else 0
            got = measured.get(key, {}).get(q, 0)
            if predicted != got:
                inexact.append({"op": key, "quantity": q, "predicted": predicted, "measured": got})
                if q in ("bytes_read", "bytes_written"):
                    bytes_error += abs(predicted - got)
    saved = result["saved"].at(sample.batch)
    total_bytes = sum(row["bytes"] for row in measured.values())
    return {"batch": sample.batch, "exact": not inexact and saved == sample.saved_bytes,
            "inexact": inexact, "bytes_error": bytes_error, "bytes_error_fraction": bytes_error / max(total_bytes, 1),
            "saved_predicted": saved, "saved_measured": sample.saved_bytes}


# ------------------------------------------------------------------------------------------------------------
# roofline and report
# ------------------------------------------------------------------------------------------------------------


def roofline(flops: float, bytes_moved: float, launches: float, card: Card, precision: str) -> dict:
    """An estimate, not a measurement: the step's time if every FLOP ran at the card's dense peak and every
    byte at its peak bandwidth, one after the other (``ROOFLINE_FORMULA``)."""
    t_flops = flops / card.peak_flops[precision]
    t_bytes = bytes_moved / card.bandwidth
    return {"card": card.name, "peak_flops": card.peak_flops[precision], "peak_bandwidth": card.bandwidth,
            "t_flops_ms": 1e3 * t_flops, "t_bytes_ms": 1e3 * t_bytes, "estimate_ms": 1e3 * (t_flops + t_bytes),
            "launch_overhead_ms": 1e3 * launches * card.launch_overhead_s, "formula": ROOFLINE_FORMULA}


# The goals for the fused path against the reference (reported, never asserted).
GOALS = (("other_bytes", 0.5, "non-matmul bytes"), ("launches", 0.6, "ops launched"),
         ("saved_per_image", 0.8, "saved for backward per image"), ("flops", 1.0, "FLOPs"))


def _label(spec: dict) -> str:
    extra = ", ".join(f"{k}={v}" for k, v in spec["overrides"].items())
    return spec["model"] + (f" ({extra})" if extra else "")


def summarize(result: dict, batch: int, card: Card) -> dict:
    """The numbers of one (model, backend) at ``batch``: per class and in total, plus saved bytes and roofline."""
    total = {q: fit.at(batch) for q, fit in result["total"].items()}
    by_class = {c: {q: fit.at(batch) for q, fit in row.items()} for c, row in result["by_class"].items()}
    by_op = {c: {q: fit.at(batch) for q, fit in row.items()} for c, row in result["by_op"].items()}
    saved = result["saved"]
    return {
        "total": total, "by_class": by_class,
        "top_ops_by_bytes": dict(sorted(by_op.items(), key=lambda kv: -kv[1]["bytes"])[:25]),
        "saved_bytes": saved.at(batch), "saved_per_image": saved.slope, "saved_const": saved.const,
        "roofline": roofline(total["flops"], total["bytes"], total["launches"], card, result["precision"]),
    }


def _gb(v: float) -> str:
    return f"{v / 1e9:,.2f}"


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def run_ledger(models: Sequence[tuple[str, dict]], backends: Sequence[str], batch: int, precision: str,
               card_name: str, sample_batches: tuple[int, int] = DEFAULT_SAMPLE_BATCHES,
               check_batch: int | None = None, log: Callable[[str], None] = print) -> dict:
    """The ledger of every (model, backend); a backend that fails is recorded with its error, never hidden.
    ``check_batch``: also count that batch and report how far the extrapolation is from it."""
    if card_name not in CARDS:
        raise ValueError(f"card={card_name!r}: expected one of {sorted(CARDS)}")
    card = CARDS[card_name]
    rows = []
    for name, overrides in models:
        entry = {"model": name, "overrides": overrides, "backends": {}}
        for backend in backends:
            t0 = time.perf_counter()
            try:
                result = ledger_for(name, backend, overrides, precision, sample_batches,
                                    extra_batches=() if check_batch is None else (check_batch,))
            except Exception as exc:  # recorded and shown in the table; the caller decides whether to fail
                entry["backends"][backend] = {"status": "error", "error": f"{type(exc).__name__}: {exc}"}
                log(f"{_label(entry)} [{backend}]: ERROR {type(exc).__name__}: {exc}")
                continue
            summary = summarize(result, batch, card)
            entry["backends"][backend] = {"status": "ok", "seconds": result["seconds"], **summary,
                                          "params": result["params"],
                                          "model_flops_per_image": result["model_flops_per_image"],
                                          "sample_batches": result["sample_batches"],
                                          "extrapolation_checks": result["extrapolation_checks"],
                                          "fits": {"total": result["total"], "saved": result["saved"]}}
            tot = summary["total"]
            log(f"{_label(entry)} [{backend}]: {tot['launches']:,.0f} ops, {_gb(tot['other_bytes'])} GB other bytes, "
                f"{tot['flops'] / 1e12:,.2f} TFLOP, saved {summary['saved_per_image'] / 1e6:,.2f} MB/img "
                f"({time.perf_counter() - t0:.0f} s)")
        rows.append(entry)
    return {"batch": batch, "precision": precision, "card": card_name, "card_constants": vars(card),
            "sample_batches": list(sample_batches), "check_batch": check_batch, "formula": ROOFLINE_FORMULA,
            "models": rows}


def _check_lines(entry: dict) -> list[str]:
    out = []
    for be, r in entry["backends"].items():
        for c in r.get("extrapolation_checks", []) if r["status"] == "ok" else []:
            if c["exact"]:
                out.append(f"Extrapolation check, {be}: counted at batch {c['batch']}, every op, count and byte as "
                           "predicted.")
                continue
            ops = sorted({f"{i['op']} ({i['quantity']})" for i in c["inexact"]})
            out.append(f"Extrapolation check, {be}: counted at batch {c['batch']}: {len(ops)} op quantit"
                       f"{'y' if len(ops) == 1 else 'ies'} off the line, {c['bytes_error'] / 1e6:,.3f} MB "
                       f"({100 * c['bytes_error_fraction']:.3f}% of the bytes); saved {c['saved_measured']:,} B "
                       f"measured vs {c['saved_predicted']:,.0f} predicted: " + "; ".join(ops[:8]))
    return [*out, ""] if out else []


def _goal_lines(entry: dict) -> list[str]:
    ref, fused = entry["backends"].get("torch"), entry["backends"].get("triton")
    if not (ref and fused and ref["status"] == fused["status"] == "ok"):
        return []
    cells = []
    for key, target, label in GOALS:
        a = fused["saved_per_image"] if key == "saved_per_image" else fused["total"][key]
        b = ref["saved_per_image"] if key == "saved_per_image" else ref["total"][key]
        r = _ratio(a, b)
        cells.append(f"{label} {r:.2f}x (goal <= {target:g}x: {'PASS' if r is not None and r <= target else 'FAIL'})")
    return ["Goals, triton ÷ torch: " + "; ".join(cells) + ".", ""]


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    return ["| " + " | ".join(map(cell, headers)) + " |", "|" + "---|" * len(headers),
            *("| " + " | ".join(map(cell, row)) + " |" for row in rows)]


def facts_lines(facts: dict) -> list[str]:
    """Date, versions, CPU, commit and command under a title."""
    return [f"{facts.get('date')} · torch {facts.get('torch')} · triton {facts.get('triton') or 'not installed'} · "
            f"Python {facts.get('python')} · CPU {facts.get('cpu')} ({facts.get('cpu_count')} cores) · "
            f"GPU {facts.get('gpu') or 'none'} · commit {facts.get('git_commit') or 'unknown'}", "",
            f"Command: `{facts.get('command')}`"]


def markdown(report: dict, facts: dict) -> list[str]:
    b, card = report["batch"], CARDS[report["card"]]
    lines = ["# Step ledger: one training step accounted op by op (CPU dispatch, extrapolated)", "",
             *facts_lines(facts), "",
             f"Batch {b}, {report['precision']}{' autocast' if report['precision'] != 'fp32' else ''}, eager; "
             f"counted at batches {report['sample_batches'][0]} and {report['sample_batches'][1]} on the CPU and "
             "extrapolated linearly (value = const + slope x batch). One step = noise draw, forward, loss, "
             "backward, fused AdamW, zero_grad (train/pretrain.py). Bytes = read + written per op (views free); "
             "matmul class = GEMM/conv + attention. Counting rules: bench/ledger.py docstring.", "",
             f"Roofline for {card.name} ({card.bandwidth / 1e12:g} TB/s, "
             f"{card.peak_flops[report['precision']] / 1e12:g} TFLOP/s dense {report['precision']}): "
             f"**an estimate, not a measurement**: {report['formula']}; launch overhead "
             f"{card.launch_overhead_s * 1e6:g} µs per launch.", "",
             "Conventions: attention backward FLOPs = 2.5x forward (flash kernels recompute the scores; the "
             "'2x' row drops the recomputation); a custom op (crossmae::*) is one launch with its own inputs + "
             "outputs, plus the torch ops of its body, and its Triton kernels are counted apart; the Triton "
             "interpreter's copies are not counted. This is the CPU's dispatch: CUDA autocast would also run the "
             "LayerNorms that see bf16 inputs in fp32 (CrossMAE's IBA norms on the torch path).", ""]
    for entry in report["models"]:
        backends = list(entry["backends"])
        lines += [f"## {_label(entry)}", ""]
        for be in backends:
            r = entry["backends"][be]
            if r["status"] != "ok":
                lines += [f"**{be}: ERROR** `{r['error'][:400]}`", ""]
        ok = [be for be in backends if entry["backends"][be]["status"] == "ok"]
        classes = sorted({c for be in ok for c in entry["backends"][be]["by_class"] if c not in ("view", "alloc")},
                         key=lambda c: -max(entry["backends"][be]["by_class"].get(c, {}).get("bytes", 0) for be in ok))
        header = ["op class"] + [f"{be} {col}" for be in ok for col in ("ops", "GB", "GFLOP")]
        body = []
        for c in classes:
            row = [c]
            for be in ok:
                v = entry["backends"][be]["by_class"].get(c)
                row += ["—"] * 3 if v is None else [f"{v['launches']:,.0f}", _gb(v["bytes"]),
                                                     f"{v['flops'] / 1e9:,.1f}"]
            body.append(row)
        lines += [*markdown_table(header, body), ""]
        tot_header = ["total"] + ok + (["triton ÷ torch"] if {"torch", "triton"} <= set(ok) else [])
        items = [("ops launched (issue rule: custom op = 1)", lambda r: r["total"]["launches"], "{:,.0f}"),
                 ("GPU kernels (aten ops + Triton kernels)", lambda r: r["total"]["gpu_kernels"], "{:,.0f}"),
                 ("Triton kernels", lambda r: r["total"]["triton_kernels"], "{:,.0f}"),
                 ("free ops (views, allocations)", lambda r: r["total"]["free_ops"], "{:,.0f}"),
                 ("non-matmul bytes, GB", lambda r: r["total"]["other_bytes"] / 1e9, "{:,.2f}"),
                 ("matmul-class bytes, GB", lambda r: r["total"]["matmul_bytes"] / 1e9, "{:,.2f}"),
                 ("all bytes, GB", lambda r: r["total"]["bytes"] / 1e9, "{:,.2f}"),
                 ("FLOPs, TFLOP", lambda r: r["total"]["flops"] / 1e12, "{:,.3f}"),
                 ("  forward / backward TFLOP", None, None),
                 ("  FLOPs with attention backward = 2x forward, TFLOP",
                  lambda r: r["total"]["flops_attention_bwd_2x"] / 1e12, "{:,.3f}"),
                 ("model.flops_per_image x batch, TFLOP", lambda r: r["model_flops_per_image"] * b / 1e12, "{:,.3f}"),
                 ("saved for backward, MB per image", lambda r: r["saved_per_image"] / 1e6, "{:,.2f}"),
                 ("saved for backward, constant MB", lambda r: r["saved_const"] / 1e6, "{:,.1f}"),
                 ("roofline: FLOPs / peak, ms", lambda r: r["roofline"]["t_flops_ms"], "{:,.2f}"),
                 ("roofline: bytes / BW, ms", lambda r: r["roofline"]["t_bytes_ms"], "{:,.2f}"),
                 ("roofline estimate, ms (img/s)", None, None),
                 ("launches x overhead, ms", lambda r: r["roofline"]["launch_overhead_ms"], "{:,.2f}")]
        tot_body = []
        for label, get, form in items:
            row = [label]
            vals = []
            for be in ok:
                r = entry["backends"][be]
                if label.startswith("  forward"):
                    fwd, bwd = r["total"]["forward_flops"], r["total"]["backward_flops"]
                    row.append(f"{fwd / 1e12:,.3f} / {bwd / 1e12:,.3f}")
                    vals.append(None)
                elif label.startswith("roofline estimate"):
                    ms = r["roofline"]["estimate_ms"]
                    row.append(f"{ms:,.2f} ({b / ms * 1e3:,.0f})")
                    vals.append(ms)
                else:
                    vals.append(get(r))
                    row.append(form.format(vals[-1]))
            if len(tot_header) > len(ok) + 1:
                ratio = _ratio(vals[ok.index("triton")], vals[ok.index("torch")])
                row.append("—" if ratio is None else f"{ratio:.2f}")
            tot_body.append(row)
        lines += [*markdown_table(tot_header, tot_body), "", *_goal_lines(entry), *_check_lines(entry)]
    return lines


def to_jsonable(report: dict) -> dict:
    def conv(o):
        if isinstance(o, Linear):
            return {"const": o.const, "slope": o.slope}
        if isinstance(o, dict):
            return {k: conv(v) for k, v in o.items()}
        if isinstance(o, list | tuple):
            return [conv(v) for v in o]
        if isinstance(o, float) and math.isfinite(o) and o == int(o) and abs(o) < 2**62:
            return int(o)
        return o

    return conv(report)


# ------------------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------------------


def _parse_value(text: str) -> Any:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "none":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_models(text: str) -> list[tuple[str, dict]]:
    """'crossmae_vit_base_patch16:kept_mask_ratio=0.75,mae_vit_base_patch16' -> [(name, overrides), ...]."""
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, *pairs = item.split(":")
        overrides = {}
        for pair in pairs:
            if "=" not in pair:
                raise ValueError(f"--models: {pair!r} in {item!r} is not key=value (e.g. {name}:kept_mask_ratio=0.75)")
            key, value = pair.split("=", 1)
            overrides[key.strip()] = _parse_value(value.strip())
        out.append((name, overrides))
    if not out:
        raise ValueError("--models: give at least one model name")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ledger", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="crossmae_vit_base_patch16",
                        help="comma-separated registry names, each optionally with :key=value create_model overrides")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--precision", choices=PRECISIONS, default="bf16")
    parser.add_argument("--backends", default="torch,triton")
    parser.add_argument("--card", choices=sorted(CARDS), default="H200")
    parser.add_argument("--sample-batches", default=",".join(map(str, DEFAULT_SAMPLE_BATCHES)),
                        help="the two small batches counted on the CPU (default 2,3)")
    parser.add_argument("--check-batch", type=int, default=None,
                        help="also count this batch and report how far the extrapolation is from it")
    parser.add_argument("--results-dir", type=Path, default=None,
                        help="where to write (default: bench/results/local/, git-ignored, or $BENCH_RESULTS_DIR)")
    parser.add_argument("--save-results", action="store_true",
                        help="write the committed bench/results/ instead (a deliberate update)")
    parser.add_argument("--no-write", action="store_true", help="print the table, write nothing")
    args = parser.parse_args(argv)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    bad = [b for b in backends if b not in BACKENDS]
    if bad:
        parser.error(f"--backends: unknown {bad}; allowed: {', '.join(BACKENDS)}")
    try:
        samples = tuple(int(s) for s in args.sample_batches.split(","))
        models = parse_models(args.models)
    except ValueError as exc:
        parser.error(str(exc))
    if len(samples) != 2:
        parser.error(f"--sample-batches {args.sample_batches!r}: give two batches, e.g. 2,3")
    facts = machine_facts()
    facts["command"] = "python -m bench.ledger " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    report = run_ledger(models, backends, args.batch, args.precision, args.card, samples, args.check_batch,
                        log=lambda s: print(s, file=sys.stderr, flush=True))
    lines = markdown(report, facts)
    print("\n".join(lines))
    if not args.no_write:
        results_dir = args.results_dir or resolve_results_dir(full=True, save_results=args.save_results)
        files = write_results(results_dir, KIND, facts, to_jsonable(report), lines)
        print(f"\nwrote {files.json} and {files.markdown}", file=sys.stderr)
    failed = [(e["model"], be) for e in report["models"] for be, r in e["backends"].items() if r["status"] != "ok"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
