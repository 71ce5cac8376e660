"""The operations where the reference path and the fused path differ, in one place.

``backend="torch"`` is the pure-PyTorch reference (``ReferenceOps``): it reproduces the authors' numerics
(their code is the specification) and runs anywhere. ``backend="triton"`` (``FusedOps``) runs the same
operations through the fused kernels of ``kernels/`` (on a CUDA GPU, or on a CPU under Triton's
interpreter with TRITON_INTERPRET=1; elsewhere the kernels fall back to their PyTorch references).

A module picks its ops once, at construction (``ops_for(cfg.backend)``) and calls them as
``self.ops.add_layer_norm(...)``; no model file tests the backend, and nothing here patches
``torch.nn.functional``. Both classes have the same methods, with the same meaning: in fp32 the two
paths agree to rounding (tests/test_model_triton.py checks 1e-4 on the loss, the predictions and every
gradient, the input images' included).

What the fused path does differently, and why (bench/ledger.py counts the effect):

* The residual stream stays in the activation dtype (bf16 / fp16 under autocast; statistics in fp32)
  instead of autocast's fp32 stream with a cast around every LayerNorm, and each residual add happens
  inside the following LayerNorm's kernel (``add_layer_norm``), whose backward also sums the two
  gradients of the stream.
* Attention reads q/k/v as views of the fused projection and writes the gradient of the whole
  projection output at once (no zero-filled gradient per q/k/v slice).
* The MLP saves only its fc1 output and recomputes the GELU in backward (bias + GELU in one kernel).
* Under autocast, the weights the matmuls read are cast to the compute dtype in one multi-tensor copy per
  step, and their gradients back in one more (``with_compute_weights``), instead of autocast's one cast
  per weight and one per gradient. (Under torch.compile the compiler fuses those casts itself.)
* The encoder embeds only the visible patches (a gather, then the patch conv as a matmul); the IBA mix
  and its LayerNorms are one kernel feeding every decoder block's kv projection in one batched matmul;
  the loss is one kernel.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.stateless import _reparametrize_module  # the mechanism behind torch.func.functional_call

from model.masking import gather_tokens, normalize_patches, patchify, unpatchify

BACKENDS = ("torch", "triton")


def triton_available() -> bool:
    try:
        import kernels
    except ImportError:
        return False
    return bool(kernels.TRITON_AVAILABLE)


# The fused kernels pass their tests under Triton's CPU interpreter and compile for sm_90, but have not
# yet run on a GPU (see kernels/*.py): until they have, CUDA runs default to the reference path too,
# and backend="triton" is opt-in. Flip this once bench/gpu_all.sh has passed on a card.
FUSED_BY_DEFAULT_ON_CUDA = False


def default_backend() -> str:
    if FUSED_BY_DEFAULT_ON_CUDA and torch.cuda.is_available() and triton_available():
        return "triton"
    return "torch"


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "triton" and not triton_available():
        raise ValueError("backend='triton' needs triton (pip install triton); it does not import here: "
                         "use backend='torch'")
    return backend


def autocast_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype matmuls run in here: the autocast dtype when autocast is on, else the tensor's."""
    if torch.is_autocast_enabled(t.device.type):
        return torch.get_autocast_dtype(t.device.type)
    return t.dtype


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(B, L, H, d) views in, (B, Lq, H, d) contiguous out, so that ``.reshape(B, Lq, H * d)`` is free."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).contiguous()


class ReferenceOps:
    """backend="torch": plain PyTorch, the authors' order of operations."""

    name = "torch"

    def with_compute_weights(self, model: nn.Module, fn: Callable[..., Any], *args) -> Any:
        """``fn(*args)``, a forward pass of ``model``; under autocast each matmul casts its weights itself."""
        return fn(*args)

    # -- the residual stream ------------------------------------------------------------------------------

    def stream(self, x: torch.Tensor) -> torch.Tensor:
        """The residual stream's storage: as given (under autocast, fp32 wherever the reference has it)."""
        return x

    def add_layer_norm(self, x: torch.Tensor, branch: torch.Tensor | None,
                       norm: nn.LayerNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """(h, norm(h)) with h = x + branch (h = x when branch is None)."""
        h = x if branch is None else x + branch
        return h, norm(h)

    def add(self, x: torch.Tensor, branch: torch.Tensor | None) -> torch.Tensor:
        return x if branch is None else x + branch

    # -- attention and MLP --------------------------------------------------------------------------------

    def self_attention(self, qkv: torch.Tensor) -> torch.Tensor:
        """qkv (B, N, 3, H, d), a view of the fused projection -> (B, N, H, d) contiguous."""
        return _sdpa(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])

    def cross_attention(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        """q (B, Nq, H, d), kv (B, Nk, 2, H, d) -> (B, Nq, H, d) contiguous."""
        return _sdpa(q, kv[:, :, 0], kv[:, :, 1])

    def mlp(self, x: torch.Tensor, fc1: nn.Linear, fc2: nn.Linear) -> torch.Tensor:
        return fc2(F.gelu(fc1(x)))  # exact (erf) GELU, as in the reference

    # -- encoder input, decoder keys and values ----------------------------------------------------------

    def embed_patches(self, imgs: torch.Tensor, ids: torch.Tensor, proj: nn.Conv2d) -> torch.Tensor:
        """The patch embedding of the patches at ids (B, n): (B, n, C). The reference embeds all L patches,
        then gathers."""
        return gather_tokens(proj(imgs).flatten(2).transpose(1, 2), ids)

    def gather_rows(self, table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """table (L, D) at ids (B, n) -> (B, n, D)."""
        return table[ids]

    def mixed_kv(self, features: list[torch.Tensor], mix: nn.Linear, norms: nn.ModuleList,
                 kv_projections: list[nn.Linear]) -> list[torch.Tensor]:
        """IBA: decoder block j's keys and values, ``kv_j(norm_j(sum_i W[j, i] f_i))``, (B, T, 2D) each.

        The authors' order: stack the k maps, one matmul with W over the stack, then per block its
        LayerNorm and kv projection."""
        stacked = torch.stack(features)  # (k, B, T, C)
        k = stacked.shape[0]
        mixed = (mix.weight.to(stacked.dtype) @ stacked.view(k, -1)).view(-1, *stacked.shape[1:])
        return [kv(norm(mixed[j])) for j, (norm, kv) in enumerate(zip(norms, kv_projections, strict=True))]

    def shared_kv(self, features: torch.Tensor, kv_projections: list[nn.Linear]) -> list[torch.Tensor]:
        """Without IBA every decoder block projects the same (normalised) features: (B, T, 2D) each."""
        return [kv(features) for kv in kv_projections]

    # -- targets and loss ---------------------------------------------------------------------------------

    def target_patches(self, imgs: torch.Tensor, ids: torch.Tensor, patch_size: int,
                       norm_pix: bool) -> torch.Tensor:
        """The image patches at ids (B, n) in (row, column, channel) layout, norm-pix normalised if asked."""
        target = gather_tokens(patchify(imgs, patch_size), ids)
        return normalize_patches(target) if norm_pix else target

    def mse_loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean squared error over every predicted value, in fp32."""
        return (pred.float() - target).pow(2).mean()

    def paste_patches(self, patches: torch.Tensor, ids: torch.Tensor, base: torch.Tensor,
                      patch_size: int) -> torch.Tensor:
        """Paste (B, n, p*p*c) patches at ids into the image ``base`` (B, c, H, W); returns a new image."""
        grid = patchify(base, patch_size).scatter(1, ids.unsqueeze(-1).expand(-1, -1, patches.shape[-1]),
                                                  patches.to(base.dtype))
        p = patch_size
        return unpatchify(grid, p, (base.shape[-2] // p, base.shape[-1] // p), base.shape[1])


class _RecomputedGeluMlp(torch.autograd.Function):
    """fc2(gelu(fc1(x))) that keeps only x and fc1's output for backward and recomputes the GELU there.

    The matmuls run in ``dtype`` (the autocast dtype, as autocast would run them; its weight casts are
    done here, once per call), bias + GELU in one kernel; the weight and bias gradients come back in the
    parameters' dtype, as autocast's casts would return them.
    """

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, dtype):
        import kernels

        x = x.to(dtype)
        w1c, w2c = w1.to(dtype), w2.to(dtype)
        with torch.autocast(x.device.type, enabled=False):
            z = F.linear(x, w1c)  # fc1 without its bias: the kernel adds it in fp32
            out = F.linear(kernels.bias_gelu_fwd(z, b1), w2c, b2.to(dtype))
        ctx.save_for_backward(x, z, w1c, b1, w2c)
        ctx.param_dtypes = (w1.dtype, b1.dtype, w2.dtype, b2.dtype)
        return out

    @staticmethod
    def backward(ctx, dout):
        import kernels

        x, z, w1c, b1, w2c = ctx.saved_tensors
        w1_dtype, b1_dtype, w2_dtype, b2_dtype = ctx.param_dtypes
        dout = dout.to(z.dtype).reshape(-1, dout.shape[-1])
        a = kernels.bias_gelu_fwd(z, b1).reshape(-1, z.shape[-1])  # recomputed
        dw2 = dout.t() @ a
        db2 = dout.sum(0)
        da = dout @ w2c
        dz, db1 = kernels.bias_gelu_bwd(da.view(z.shape), z, b1)
        dz2 = dz.reshape(-1, dz.shape[-1])
        dw1 = dz2.t() @ x.reshape(-1, x.shape[-1])
        dx = (dz2 @ w1c).view(x.shape)
        return dx, dw1.to(w1_dtype), db1.to(b1_dtype), dw2.to(w2_dtype), db2.to(b2_dtype), None


class _CastParameters(torch.autograd.Function):
    """Parameters to ``dtype`` in one multi-tensor copy; their gradients back to the parameters' dtypes in one
    more, when the last of them is known (at the end of the backward pass)."""

    @staticmethod
    def forward(ctx, dtype, *params):
        cast = [torch.empty_like(p, dtype=dtype) for p in params]
        torch._foreach_copy_(cast, list(params))
        ctx.param_dtypes = [p.dtype for p in params]
        return tuple(cast)

    @staticmethod
    def backward(ctx, *grads):
        present = [i for i, g in enumerate(grads) if g is not None]
        out = [None] * len(grads)
        if present:
            back = [torch.empty_like(grads[i], dtype=ctx.param_dtypes[i]) for i in present]
            torch._foreach_copy_(back, [grads[i] for i in present])
            for i, g in zip(present, back, strict=True):
                out[i] = g
        return (None, *out)


def matmul_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters matmuls read (weights and biases of every Linear and Conv2d), minus those a module
    names in ``fp32_parameters`` because a fused kernel reads them in fp32 itself."""
    keep_fp32 = {f"{prefix}.{name}" if prefix else name
                 for prefix, module in model.named_modules() for name in getattr(module, "fp32_parameters", ())}
    return {f"{prefix}.{name}" if prefix else name: p
            for prefix, module in model.named_modules() if isinstance(module, nn.Linear | nn.Conv2d)
            for name, p in module.named_parameters(recurse=False)
            if (f"{prefix}.{name}" if prefix else name) not in keep_fp32}


class FusedOps(ReferenceOps):
    """backend="triton": the fused kernels of ``kernels/``."""

    name = "triton"

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
        cast = _CastParameters.apply(dtype, *params.values())
        with _reparametrize_module(model, dict(zip(params, cast, strict=True))):
            return fn(*args)

    def stream(self, x: torch.Tensor) -> torch.Tensor:
        """The residual stream's storage: the activation dtype (bf16 / fp16 under autocast)."""
        return x.to(autocast_dtype(x))

    def add_layer_norm(self, x, branch, norm):
        import kernels

        if branch is None:
            return x, kernels.layer_norm(x, norm.weight, norm.bias, norm.eps)
        return kernels.add_layer_norm(x, branch, norm.weight, norm.bias, norm.eps)

    def add(self, x, branch):
        return x if branch is None else x + branch.to(x.dtype)

    def self_attention(self, qkv):
        import kernels

        return kernels.self_attention(qkv)

    def cross_attention(self, q, kv):
        import kernels

        return kernels.cross_attention(q, kv)

    def mlp(self, x, fc1, fc2):
        import kernels

        if kernels.triton_can_run(x):
            return _RecomputedGeluMlp.apply(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias, autocast_dtype(x))
        return fc2(kernels.bias_gelu(F.linear(x, fc1.weight), fc1.bias))

    def embed_patches(self, imgs, ids, proj):
        # Embed only the visible patches: gather their pixels, then the conv as a matmul (a quarter of the
        # patch-embedding work at mask ratio 0.75). The gather is differentiable in imgs.
        import kernels

        pixels = kernels.gather_patches(imgs, ids, proj.kernel_size[0])
        w = proj.weight  # (C, c, p, q) -> (C, p*q*c), the pixel layout of `pixels`
        return F.linear(pixels, w.permute(0, 2, 3, 1).reshape(w.shape[0], -1), proj.bias)

    def gather_rows(self, table, ids):
        import kernels

        return kernels.gather_rows(table, ids)

    def mixed_kv(self, features, mix, norms, kv_projections):
        # One kernel mixes the k maps and applies all blocks' LayerNorms (no (B, T, C, k) stack, no
        # un-normalised mix), then every block's kv projection runs as one batched matmul.
        import kernels

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
        import kernels

        if imgs.requires_grad:
            # Rare (saliency, tests): the targets then depend on the images as in the reference, so they
            # are built from the differentiable gather; training images never require grad.
            target = kernels.gather_patches(imgs, ids, patch_size)
            return normalize_patches(target) if norm_pix else target
        return kernels.gather_target_patches(imgs, ids, patch_size, norm_pix=norm_pix)[0]

    def mse_loss(self, pred, target):
        import kernels

        if target.requires_grad:  # see target_patches: the kernel treats targets as constants
            return super().mse_loss(pred, target)
        return kernels.mse_loss(pred, target)

    def paste_patches(self, patches, ids, base, patch_size):
        import kernels

        return kernels.scatter_patches(patches.to(base.dtype), ids, tuple(base.shape[-2:]), patch_size, base=base)


_OPS = {"torch": ReferenceOps(), "triton": FusedOps()}


def ops_for(backend: str) -> ReferenceOps:
    """The operations of ``backend`` ("torch" or "triton"): the one reference-vs-fused switch."""
    return _OPS[check_backend(backend)]
