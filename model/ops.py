"""The operations where the reference path and the fused path differ: one declared interface, two op sets.

``ModelOps`` declares every operation once, with its shapes and meaning. Two classes implement all of it,
independently: neither inherits from the other, so an operation added to the interface and forgotten on one
side fails as this module is imported (it builds one instance of each), and tests/test_ops_interface.py checks
that each class defines every operation itself and no undeclared one.

* ``ReferenceOps`` (``backend="torch"``): plain PyTorch in the authors' order of operations (their code is the
  specification); runs anywhere. Where kernels/reference.py already states the same math (patch gathers and
  scatters, position rows, the loss) it calls that function, so each piece of reference math exists once.
* ``FusedOps`` (``backend="triton"``): the fused kernels of ``kernels/`` (on a CUDA GPU, or on a CPU under
  Triton's interpreter with TRITON_INTERPRET=1; elsewhere the kernels fall back to their PyTorch references).
  ``FusedOps(reference_ops={"mlp"})`` runs the named operations with the reference implementation instead and
  every other one fused: the per-op switch that lets a run drop one fused operation that fails on its card.

A module picks its ops once, at construction (``ops_for(cfg.backend, reference_ops)``, shared by all the
modules of one model) and calls them as ``self.ops.add_layer_norm(...)``; no model file tests the backend,
and nothing here patches ``torch.nn.functional``. In fp32 the two paths agree to rounding
(tests/test_model_triton.py checks 1e-4 on the loss, the predictions and every gradient, the input images'
included), and so do their mixes (tests/test_ops_interface.py checks one).

What the fused path does differently, and why (bench/ledger/ counts the effect):

* The residual stream stays in the activation dtype (bf16 / fp16 under autocast; statistics in fp32)
  instead of autocast's fp32 stream with a cast around every LayerNorm, and each residual add happens
  inside the following LayerNorm's kernel (``add_layer_norm``), whose backward also sums the two
  gradients of the stream.
* Attention reads q/k/v as views of the fused projection and writes the gradient of the whole
  projection output at once (no zero-filled gradient per q/k/v slice).
* The MLP saves only its fc1 output and recomputes the GELU in backward (bias + GELU in one kernel;
  ``kernels.mlp.gelu_mlp``).
* Under autocast, the weights the matmuls read are cast to the compute dtype in one multi-tensor copy per
  step, and their gradients back in one more (``with_compute_weights``, ``kernels.cast.cast_parameters``),
  instead of autocast's one cast per weight and one per gradient. (Under torch.compile the compiler fuses
  those casts itself.)
* The encoder embeds only the visible patches (a gather, then the patch conv as a matmul); the IBA mix
  and its LayerNorms are one kernel feeding every decoder block's kv projection in one batched matmul;
  the loss is one kernel.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Collection
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.stateless import _reparametrize_module  # the mechanism behind torch.func.functional_call

import kernels
from kernels.cast import cast_parameters
from kernels.mlp import gelu_mlp
from kernels.reference import (
    gather_patches_reference,
    gather_rows_reference,
    mse_loss_reference,
    normalize_patches_reference,
    scatter_patches_reference,
)
from model.masking import gather_tokens

BACKENDS = ("torch", "triton", "auto")


def triton_available() -> bool:
    return bool(kernels.TRITON_AVAILABLE)


def default_backend() -> str:
    """The backend a model gets when none is named: "auto" (see ``resolve_backend``)."""
    return "auto"


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "triton" and not triton_available():
        raise ValueError("backend='triton' needs triton (pip install triton); it does not import here: "
                         "use backend='torch' (or 'auto')")
    return backend


def resolve_backend(backend: str) -> tuple[str, frozenset[str]]:
    """(backend, reference_ops) to build for ``backend``: "torch" and "triton" are themselves; "auto" is "torch"
    here. A bare model has no check of the fused path on its card; a training run resolves "auto" itself by
    running that check at its own batch, precision and compile setting (train/backend_check.py), and builds with
    "triton" (and the ops it found failing on the reference) when the fused path is correct and faster."""
    check_backend(backend)
    return ("torch" if backend == "auto" else backend), frozenset()


def autocast_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype matmuls run in here: the autocast dtype when autocast is on, else the tensor's."""
    if torch.is_autocast_enabled(t.device.type):
        return torch.get_autocast_dtype(t.device.type)
    return t.dtype


class ModelOps(abc.ABC):
    """The operations a model calls through ``self.ops``: what each takes, returns and means.

    ``name`` is the backend ("torch" / "triton"); ``reference_ops`` the operations this set runs with the
    reference implementation (all of them for ``ReferenceOps``).
    """

    name: str
    reference_ops: frozenset[str]

    @abc.abstractmethod
    def with_compute_weights(self, model: nn.Module, fn: Callable[..., Any], *args) -> Any:
        """``fn(*args)``, a forward pass of ``model``, with the weights its matmuls read in the compute dtype
        (under autocast: the reference lets each matmul cast its weights itself)."""

    # -- the residual stream ------------------------------------------------------------------------------

    @abc.abstractmethod
    def stream(self, x: torch.Tensor) -> torch.Tensor:
        """The residual stream's storage of x (B, N, C): as given on the reference path (under autocast, fp32
        wherever the reference has it), the activation dtype on the fused path."""

    @abc.abstractmethod
    def add_layer_norm(self, x: torch.Tensor, branch: torch.Tensor | None,
                       norm: nn.LayerNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """(h, norm(h)) with h = x + branch (h = x when branch is None); x, branch (B, N, C)."""

    @abc.abstractmethod
    def add(self, x: torch.Tensor, branch: torch.Tensor | None) -> torch.Tensor:
        """x + branch (x when branch is None), in the stream's dtype: the residual add no LayerNorm follows."""

    # -- attention and MLP --------------------------------------------------------------------------------

    @abc.abstractmethod
    def self_attention(self, qkv: torch.Tensor) -> torch.Tensor:
        """qkv (B, N, 3, H, d), a view of the fused projection -> (B, N, H, d) contiguous, scale 1/sqrt(d)."""

    @abc.abstractmethod
    def cross_attention(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        """q (B, Nq, H, d), kv (B, Nk, 2, H, d) (keys, values) -> (B, Nq, H, d) contiguous, scale 1/sqrt(d)."""

    @abc.abstractmethod
    def mlp(self, x: torch.Tensor, fc1: nn.Linear, fc2: nn.Linear) -> torch.Tensor:
        """fc2(gelu(fc1(x))) with the exact (erf) GELU: x (..., C) -> (..., C)."""

    # -- encoder input, decoder keys and values ----------------------------------------------------------

    @abc.abstractmethod
    def embed_patches(self, imgs: torch.Tensor, ids: torch.Tensor, patch_embed: nn.Module) -> torch.Tensor:
        """The patch embedding of the patches at ids (B, n) of imgs (B, c, H, W): (B, n, C). ``patch_embed``
        maps images to (B, L, C) tokens with its Conv2d ``proj`` (kernel = stride = p)."""

    @abc.abstractmethod
    def gather_rows(self, table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """table (L, D) at ids (B, n) -> (B, n, D)."""

    @abc.abstractmethod
    def mixed_kv(self, features: list[torch.Tensor], mix: nn.Linear, norms: nn.ModuleList,
                 kv_projections: list[nn.Linear]) -> list[torch.Tensor]:
        """IBA: decoder block j's keys and values ``kv_j(norm_j(sum_i W[j, i] f_i))``, (B, T, 2D) each, from
        the k features f_i (B, T, C) and W = ``mix.weight`` (depth, k)."""

    @abc.abstractmethod
    def shared_kv(self, features: torch.Tensor, kv_projections: list[nn.Linear]) -> list[torch.Tensor]:
        """Without IBA every decoder block projects the same (normalised) features (B, T, C): (B, T, 2D) each."""

    # -- targets, loss, pictures --------------------------------------------------------------------------

    @abc.abstractmethod
    def target_patches(self, imgs: torch.Tensor, ids: torch.Tensor, patch_size: int,
                       norm_pix: bool) -> torch.Tensor:
        """The patches of imgs (B, c, H, W) at ids (B, n): (B, n, p*p*c) in (row, column, channel) layout,
        norm-pix normalised if asked; differentiable in imgs when imgs requires grad."""

    @abc.abstractmethod
    def mse_loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean squared error over every predicted value, in fp32: a 0-dim tensor."""

    @abc.abstractmethod
    def paste_patches(self, patches: torch.Tensor, ids: torch.Tensor, base: torch.Tensor,
                      patch_size: int) -> torch.Tensor:
        """Paste (B, n, p*p*c) patches at ids (B, n) into the image ``base`` (B, c, H, W); returns a new image."""


# Every operation of the interface, in declaration order: the names ``reference_ops`` may hold.
OP_NAMES: tuple[str, ...] = tuple(name for name, member in vars(ModelOps).items()
                                  if getattr(member, "__isabstractmethod__", False))


def check_op_names(names: Collection[str]) -> frozenset[str]:
    """``names`` as a frozenset, each an operation of ``ModelOps``; else ValueError naming the bad ones."""
    if isinstance(names, str):
        raise ValueError(f"reference_ops must be a collection of operation names, e.g. {{{names!r}}}, "
                         f"not the string {names!r}")
    unknown = sorted(set(names) - set(OP_NAMES))
    if unknown:
        raise ValueError(f"reference_ops: unknown operation(s) {unknown}; the operations are {list(OP_NAMES)}")
    return frozenset(names)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(B, L, H, d) views in, (B, Lq, H, d) contiguous out, so that ``.reshape(B, Lq, H * d)`` is free."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).contiguous()


def _norm_pix(patches: torch.Tensor, norm_pix: bool) -> torch.Tensor:
    return normalize_patches_reference(patches) if norm_pix else patches


class ReferenceOps(ModelOps):
    """backend="torch": plain PyTorch, the authors' order of operations."""

    name = "torch"
    reference_ops = frozenset(OP_NAMES)

    def __repr__(self) -> str:
        return "ReferenceOps()"

    def with_compute_weights(self, model, fn, *args):
        return fn(*args)  # under autocast each matmul casts its weights itself

    def stream(self, x):
        return x

    def add_layer_norm(self, x, branch, norm):
        h = x if branch is None else x + branch
        return h, norm(h)

    def add(self, x, branch):
        return x if branch is None else x + branch

    def self_attention(self, qkv):
        return _sdpa(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])

    def cross_attention(self, q, kv):
        return _sdpa(q, kv[:, :, 0], kv[:, :, 1])

    def mlp(self, x, fc1, fc2):
        return fc2(F.gelu(fc1(x)))  # exact (erf) GELU, as in the reference

    def embed_patches(self, imgs, ids, patch_embed):
        return gather_tokens(patch_embed(imgs), ids)  # the reference embeds all L patches, then gathers

    def gather_rows(self, table, ids):
        return gather_rows_reference(table, ids)

    def mixed_kv(self, features, mix, norms, kv_projections):
        # The authors' order: stack the k maps, one matmul with W over the stack, then per block its LayerNorm
        # and kv projection.
        stacked = torch.stack(features)  # (k, B, T, C)
        k = stacked.shape[0]
        mixed = (mix.weight.to(stacked.dtype) @ stacked.view(k, -1)).view(-1, *stacked.shape[1:])
        return [kv(norm(mixed[j])) for j, (norm, kv) in enumerate(zip(norms, kv_projections, strict=True))]

    def shared_kv(self, features, kv_projections):
        return [kv(features) for kv in kv_projections]

    def target_patches(self, imgs, ids, patch_size, norm_pix):
        return _norm_pix(gather_patches_reference(imgs, ids, patch_size), norm_pix)

    def mse_loss(self, pred, target):
        return mse_loss_reference(pred, target)

    def paste_patches(self, patches, ids, base, patch_size):
        return scatter_patches_reference(patches.to(base.dtype), ids, tuple(base.shape[-2:]), patch_size, base=base)


_REFERENCE = ReferenceOps()


def matmul_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters matmuls read (weights and biases of every Linear and Conv2d), minus those a module
    names in ``fp32_parameters`` because a fused kernel reads them in fp32 itself."""
    keep_fp32 = {f"{prefix}.{name}" if prefix else name
                 for prefix, module in model.named_modules() for name in getattr(module, "fp32_parameters", ())}
    return {f"{prefix}.{name}" if prefix else name: p
            for prefix, module in model.named_modules() if isinstance(module, nn.Linear | nn.Conv2d)
            for name, p in module.named_parameters(recurse=False)
            if (f"{prefix}.{name}" if prefix else name) not in keep_fp32}


class FusedOps(ModelOps):
    """backend="triton": the fused kernels of ``kernels/``, except the operations named in ``reference_ops``,
    which run ``ReferenceOps``' implementation (bound on this instance, so the choice costs nothing per call)."""

    name = "triton"

    def __init__(self, reference_ops: Collection[str] = ()):
        self.reference_ops = check_op_names(reference_ops)
        for op in self.reference_ops:
            setattr(self, op, getattr(_REFERENCE, op))

    def __repr__(self) -> str:
        return f"FusedOps(reference_ops={sorted(self.reference_ops)})"

    def with_compute_weights(self, model, fn, *args):
        # Eager autocast casts each weight when a matmul first reads it and each gradient back: two launches
        # per parameter (about 350 of a ViT-B step's 1,100). One multi-tensor copy each way does the same work,
        # but hands every gradient over at the end of the backward pass: data-parallel runs keep the
        # per-parameter casts, so that their gradient all-reduce still overlaps the backward pass.
        device = next(model.parameters()).device
        data_parallel = torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1
        if torch.compiler.is_compiling() or data_parallel or not torch.is_autocast_enabled(device.type):
            return fn(*args)
        dtype = torch.get_autocast_dtype(device.type)
        names = getattr(model, "_matmul_parameter_names", None)
        if names is None:  # the module tree is fixed after construction: walk it once, not every step
            names = model._matmul_parameter_names = tuple(matmul_parameters(model))
        all_params = dict(model.named_parameters())
        params = {name: all_params[name] for name in names if all_params[name].dtype != dtype}
        if not params:
            return fn(*args)
        cast = cast_parameters(dtype, *params.values())
        with _reparametrize_module(model, dict(zip(params, cast, strict=True))):
            return fn(*args)

    def stream(self, x):
        return x.to(autocast_dtype(x))

    def add_layer_norm(self, x, branch, norm):
        if branch is None:
            return x, kernels.layer_norm(x, norm.weight, norm.bias, norm.eps)
        return kernels.add_layer_norm(x, branch, norm.weight, norm.bias, norm.eps)

    def add(self, x, branch):
        return x if branch is None else x + branch.to(x.dtype)

    def self_attention(self, qkv):
        return kernels.self_attention(qkv)

    def cross_attention(self, q, kv):
        return kernels.cross_attention(q, kv)

    def mlp(self, x, fc1, fc2):
        return gelu_mlp(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias, autocast_dtype(x))

    def embed_patches(self, imgs, ids, patch_embed):
        # Embed only the visible patches: gather their pixels, then the conv as a matmul (a quarter of the
        # patch-embedding work at mask ratio 0.75). The gather is differentiable in imgs.
        proj = patch_embed.proj
        pixels = kernels.gather_patches(imgs, ids, proj.kernel_size[0])
        w = proj.weight  # (C, c, p, q) -> (C, p*q*c), the pixel layout of `pixels`
        return F.linear(pixels, w.permute(0, 2, 3, 1).reshape(w.shape[0], -1), proj.bias)

    def gather_rows(self, table, ids):
        return kernels.gather_rows(table, ids)

    def mixed_kv(self, features, mix, norms, kv_projections):
        # One kernel mixes the k maps and applies all blocks' LayerNorms (no (B, T, C, k) stack, no
        # un-normalised mix), then every block's kv projection runs as one batched matmul.
        B, T, C = features[0].shape
        dtype = autocast_dtype(features[0])
        stacked = torch.stack([f.to(dtype) for f in features]).view(len(features), B * T, C)
        mixed = kernels.feature_mix_layernorm(
            stacked, mix.weight, torch.stack([n.weight for n in norms]), torch.stack([n.bias for n in norms]),
            eps=norms[0].eps)  # (depth, B*T, C)
        weight = torch.stack([kv.weight for kv in kv_projections])  # (depth, 2D, C)
        bias = torch.stack([kv.bias for kv in kv_projections])  # (depth, 2D)
        kv = torch.baddbmm(bias.unsqueeze(1), mixed, weight.transpose(1, 2))  # (depth, B*T, 2D)
        return list(kv.view(len(kv_projections), B, T, -1).unbind(0))

    def shared_kv(self, features, kv_projections):
        # One matmul against all blocks' stacked kv weights.
        weight = torch.cat([kv.weight for kv in kv_projections])  # (depth * 2D, C)
        bias = torch.cat([kv.bias for kv in kv_projections])
        B, T, _ = features.shape
        return list(F.linear(features, weight, bias).view(B, T, len(kv_projections), -1).unbind(2))

    def target_patches(self, imgs, ids, patch_size, norm_pix):
        if imgs.requires_grad:
            # Rare (saliency, tests): the targets then depend on the images as in the reference, so they
            # are built from the differentiable gather; training images never require grad.
            return _norm_pix(kernels.gather_patches(imgs, ids, patch_size), norm_pix)
        return kernels.gather_target_patches(imgs, ids, patch_size, norm_pix=norm_pix)[0]

    def mse_loss(self, pred, target):
        if target.requires_grad:  # see target_patches: the kernel treats targets as constants
            return mse_loss_reference(pred, target)
        return kernels.mse_loss(pred, target)

    def paste_patches(self, patches, ids, base, patch_size):
        return kernels.scatter_patches(patches.to(base.dtype), ids, tuple(base.shape[-2:]), patch_size, base=base)


_FUSED = FusedOps()


def ops_for(backend: str, reference_ops: Collection[str] = ()) -> ModelOps:
    """The operations of ``backend`` ("torch" or "triton"), the one reference-vs-fused switch; with "triton",
    the operations named in ``reference_ops`` (names of ``OP_NAMES``) run the reference implementation.
    "auto" not resolved before (``resolve_backend``; ``model.build_model`` does) is the reference."""
    names = check_op_names(reference_ops)
    backend = resolve_backend(backend)[0]
    if backend == "torch":
        return _REFERENCE
    return FusedOps(names) if names else _FUSED
