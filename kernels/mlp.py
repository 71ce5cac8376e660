"""The ViT MLP, fc2(gelu(fc1(x))), saving only its input and fc1's output: the GELU is recomputed in backward.

Supported
    gelu_mlp(x, w1, b1, w2, b2, dtype) -> (..., C_out) in ``dtype``
    x (..., C_in), w1 (H, C_in), b1 (H,), w2 (C_out, H), b2 (C_out,), each fp16 / bf16 / fp32 (the parameters
    usually fp32, x the residual stream's dtype). ``dtype`` is the dtype the matmuls run in: the autocast dtype
    under autocast, else x's (model/ops.py's ``autocast_dtype``). The exact (erf) GELU. Differentiable in x and
    every parameter: dx in ``dtype``, each parameter's gradient in that parameter's own dtype (what autocast's
    casts would hand back). Traceable by torch.compile (a torch.autograd.Function over the custom ops
    ``kernels.bias_gelu_fwd`` / ``kernels.bias_gelu_bwd``). No double backward.

Algorithm
    Forward: x, w1, w2 and b2 cast to ``dtype`` (once per call; w1 and w2 are cast only if they differ), with
    autocast off: z = x @ w1^T without its bias, a = bias_gelu_fwd(z, b1) (bias added and GELU taken in fp32,
    stored in ``dtype``), out = a @ w2^T + b2. Saved for backward: x, z, the cast w1 and w2, and b1 (fp32);
    not a, which autocast's MLP keeps besides z (one (..., H) activation less: a quarter of a ViT block's
    saved activations).
    Backward: a = bias_gelu_fwd(z, b1) recomputed; dw2 = dout^T a, db2 = sum dout, da = dout w2;
    (dz, db1) = bias_gelu_bwd(da, z, b1) (db1 summed in fp32); dw1 = dz^T x, dx = dz w1.

Tested on
    CPU interpreter only (TRITON_INTERPRET=1, triton 3.7.1, torch 2.13 CPU, 2026-12): fp32 against
    fc2(gelu(fc1(x))) by autograd (tests/test_kernels_mlp.py), fp16 ``dtype`` with fp32 parameters, and inside
    the fused model (tests/test_model_triton.py); not yet run on a GPU. The matmuls are PyTorch's; the only
    Triton kernels are bias_gelu's (see kernels/bias_gelu.py for their compile record).

Caveats
    * In fp32 the bias b1 is added after the matmul rather than inside it (as F.linear adds it), so the result
      differs from fc2(gelu(fc1(x))) by rounding (~1e-7 relative), not bit for bit.
    * Without Triton able to run (CPU tensors, no TRITON_INTERPRET) ``gelu_mlp`` runs
      F.linear(kernels.bias_gelu(F.linear(x, w1), b1), w2, b2) under the caller's autocast instead (bias_gelu
      falls back to its reference): same semantics, the GELU output saved by autograd.
"""

import torch
import torch.nn.functional as F

import kernels  # the public ops, looked up at call time (this module may be imported by kernels/__init__.py)


class _RecomputedGeluMlp(torch.autograd.Function):
    """fc2(gelu(fc1(x))) keeping x and fc1's output for backward; see the module docstring."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, dtype):
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


def gelu_mlp(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
             dtype: torch.dtype) -> torch.Tensor:
    """fc2(gelu(fc1(x))) with fc1 = (w1, b1), fc2 = (w2, b2), matmuls in ``dtype``, the GELU recomputed in
    backward: x (..., C_in) -> (..., C_out). Falls back to F.linear and ``kernels.bias_gelu`` under the caller's
    autocast where Triton cannot run (module docstring)."""
    if kernels.triton_can_run(x):
        return _RecomputedGeluMlp.apply(x, w1, b1, w2, b2, dtype)
    return F.linear(kernels.bias_gelu(F.linear(x, w1), b1), w2, b2)
