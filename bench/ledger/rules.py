"""The ledger's counting rules: what one op costs (launches, bytes read + written, FLOPs) and its class.

* Views and metadata-only ops (every op whose schema returns only aliases of its inputs: view, expand,
  transpose, select, slice, unbind, as_strided, detach, alias, t, permute, (un)squeeze...; plus
  _unsafe_view, lift_fresh, set_) launch nothing and move nothing. Allocations without a write (empty,
  empty_like, empty_strided, new_empty...) move nothing. Both are tallied apart ("free ops").
* Every other aten op is one launch; bytes read = the footprint of its distinct tensor inputs (none for
  zeros_like / new_zeros / ones_like..., which take a tensor only for its shape), bytes
  written = its fresh outputs plus the inputs its schema mutates. Footprint = the bytes a view addresses:
  stride-0 (expanded) dimensions count once. (_fused_adam(w)_ reads its grads: the schema marks them
  mutable only for the grad-scaler case.) A multi-tensor ``_foreach_*`` op (the trainer's AdamW off CUDA) is
  one launch over all the tensors of its lists.
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
  recorder (recorder.py) suspends recording for the duration of a launch and counts the launch instead. A
  Triton launch outside any custom op is counted as one launch touching its tensor arguments (as reads).
* Saved for backward: every tensor packed through ``torch.autograd.graph.saved_tensors_hooks`` during the
  forward, each storage once (keyed by ``untyped_storage().data_ptr()``, its whole ``nbytes()``),
  parameters and buffers excluded. Reported as a per-image slope and a batch-independent constant
  (autocast's bf16 weight copies).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils import _pytree as pytree


class LedgerError(RuntimeError):
    """The step cannot be accounted honestly (e.g. its op sequence depends on the batch)."""


# ------------------------------------------------------------------------------------------------------------
# op classes
# ------------------------------------------------------------------------------------------------------------

# Views that the schema does not mark as aliases, and metadata-only mutations.
_FREE_EXTRA = {"_unsafe_view", "lift_fresh", "set_", "resize_", "_reshape_alias", "sym_size", "sym_stride",
               "sym_numel", "sym_storage_offset", "is_same_size", "_has_compatible_shallow_copy_type"}
_ALLOC = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "empty_permuted"}
_MATMUL = {"mm", "addmm", "bmm", "baddbmm", "addbmm", "mv", "addmv", "dot", "convolution",
           "convolution_backward", "_convolution"}
_CAST = "cast/copy (_to_copy, copy_, clone)"
_FILL = "view backward, zeros, fill"
_INDEX = "index/gather/scatter"
_RANDOM = "random"
_SYNC = "host sync (.item, nonzero)"
_CLASS_BY_NAME = {
    "native_layer_norm": "layer_norm", "native_layer_norm_backward": "layer_norm",
    "gelu": "gelu", "gelu_backward": "gelu",
    "_softmax": "softmax", "_softmax_backward_data": "softmax", "_log_softmax": "softmax",
    "_to_copy": _CAST, "copy_": _CAST, "clone": _CAST,
    **dict.fromkeys(("select_backward", "slice_backward", "as_strided_backward", "unbind_backward", "zeros",
                     "zeros_like", "new_zeros", "zero_", "fill_", "full", "ones", "ones_like", "full_like",
                     "new_ones", "scalar_tensor"), _FILL),
    "cat": "cat/stack", "stack": "cat/stack",
    **dict.fromkeys(("index", "index_select", "gather", "scatter", "scatter_add", "scatter_add_", "index_put",
                     "index_put_", "take", "_index_put_impl_", "index_add", "index_add_", "embedding",
                     "embedding_dense_backward", "scatter_"), _INDEX),
    "sort": "sort", "argsort": "sort", "topk": "sort",
    **dict.fromkeys(("rand", "randn", "uniform_", "normal_", "bernoulli_", "randint", "randperm"), _RANDOM),
    "_fused_adamw_": "optimizer", "_fused_adam_": "optimizer",
    "_local_scalar_dense": _SYNC, "nonzero": _SYNC, "masked_select": _SYNC,
    "_amp_foreach_non_finite_check_and_unscale_": "grad scaler", "_amp_update_scale_": "grad scaler",
}
MATMUL_CLASSES = ("matmul", "attention")
# Ops that take a tensor only for its shape, dtype and device: they read nothing.
_READS_NOTHING = {"zeros_like", "ones_like", "full_like", "empty_like", "new_zeros", "new_ones", "new_full",
                  "new_empty", "rand_like", "randn_like", "randint_like"}
_REDUCTIONS = ("sum", "mean", "var", "var_mean", "std", "std_mean", "amax", "amin", "max", "min", "norm",
               "linalg_vector_norm", "prod")


def _custom_class(name: str) -> str:
    """crossmae::attention_fwd / _bwd -> crossmae::attention; gather_rows_bwd_x -> crossmae::gather_rows."""
    ns, op = name.split("::", 1)
    stem = re.sub(r"_(fwd|bwd)(_\w+)?$", "", op)
    return f"{ns}::{stem}"


def op_class(func: Any) -> str:
    """The ledger's class of an aten / custom OpOverload ('view' / 'alloc' for the free ones)."""
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
    if torch.Tag.reduction in func.tags or base in _REDUCTIONS:
        return "reduction"
    if torch.Tag.pointwise in func.tags:
        return "elementwise (add, mul, ...)"
    return "other"


def is_free(op_class_name: str) -> bool:
    """Views and allocations: seen, launched nowhere, moving nothing."""
    return op_class_name in ("view", "alloc")


def _is_alias_only(func: Any) -> bool:
    """The schema returns only (non-mutated) aliases of its inputs: a view, no data moves."""
    returns = func._schema.returns
    if not returns:
        return False
    return all(r.alias_info is not None and not r.alias_info.is_write for r in returns)


# ------------------------------------------------------------------------------------------------------------
# bytes
# ------------------------------------------------------------------------------------------------------------


def footprint(t: torch.Tensor) -> int:
    """Bytes a view addresses: stride-0 (broadcast) dimensions count once."""
    if t.numel() == 0:
        return 0
    n = 1
    for size, stride in zip(t.shape, t.stride(), strict=True):
        if stride != 0:
            n *= size
    return n * t.element_size()


def tensors_in(tree: Any) -> list[torch.Tensor]:
    """The tensors among the leaves of nested args / kwargs / outputs."""
    return [x for x in pytree.tree_leaves(tree) if isinstance(x, torch.Tensor)]


def _view_key(t: torch.Tensor) -> tuple:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def distinct_bytes(tensors: Sequence[torch.Tensor]) -> int:
    """The footprints of the distinct views among ``tensors`` (a tensor passed twice is read once)."""
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
    for i, a in enumerate(func._schema.arguments):
        if a.alias_info is None or not a.alias_info.is_write:
            continue
        if func._opname in ("_fused_adamw_", "_fused_adam_") and a.name == "grads" and \
                kwargs.get("grad_scale") is None:
            continue
        value = args[i] if i < len(args) else kwargs.get(a.name)
        out += tensors_in(value)
    return out


def op_bytes(func: Any, args: tuple, kwargs: dict, out: Any) -> tuple[int, int]:
    """(bytes read, bytes written) of one launched op: its distinct inputs; its fresh outputs and the inputs
    it mutates."""
    inputs = tensors_in((args, kwargs))
    input_storages = {t.untyped_storage().data_ptr() for t in inputs}
    fresh = [t for t in tensors_in(out) if t.untyped_storage().data_ptr() not in input_storages]
    written = distinct_bytes(fresh + _mutated_args(func, args, kwargs))
    read = 0 if func.namespace == "aten" and func._opname in _READS_NOTHING else distinct_bytes(inputs)
    return read, written


# ------------------------------------------------------------------------------------------------------------
# FLOPs
# ------------------------------------------------------------------------------------------------------------


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


def _packed_attention_flops(q: torch.Tensor | None, kv: torch.Tensor, n_packed: int) -> int:
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
                              "bench/ledger/rules.py CUSTOM_FLOPS")
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

    def pick(v, i):
        return v[i] if len(v) > 1 else v[0]

    out = int(n) * int(w.shape[0])
    for i in range(len(spatial)):
        out *= (int(spatial[i]) + 2 * pick(padding, i) - pick(dilation, i) * (int(k[i]) - 1) - 1) // pick(stride, i) + 1
    return out
