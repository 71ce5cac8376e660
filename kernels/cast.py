"""Parameters cast to the compute dtype in one multi-tensor copy, and their gradients back in one more.

Supported
    cast_parameters(dtype, *params) -> tuple of tensors, params[i] cast to ``dtype``
    Any number of tensors (usually the fp32 weights and biases that a step's matmuls read), of any floating
    dtypes, shapes and devices that torch._foreach_copy_ accepts; ``dtype`` any floating dtype. Differentiable:
    each gradient comes back in its parameter's dtype (see the caveat on unused ones). Traceable by
    torch.compile (a torch.autograd.Function of PyTorch ops), though under torch.compile the compiler fuses
    autocast's per-weight casts itself.

Algorithm
    Forward: allocate the cast tensors, then one torch._foreach_copy_ from the parameters (one multi-tensor
    kernel launch per device and dtype pair on a GPU, instead of autocast's one cast per weight when a matmul
    first reads it: about 175 launches of a ViT-B step). Backward runs once, when the gradients of all cast
    tensors are known: one torch._foreach_copy_ of the present gradients into the parameters' dtypes.

Tested on
    CPU only (torch 2.13, 2026-12), fp32 parameters cast to fp16 / bf16 / fp32, against ``p.to(dtype)`` by
    autograd (tests/test_kernels_cast.py), and inside the fused model under fp16 autocast
    (tests/test_model_triton.py); not yet run on a GPU. No Triton kernel.

Caveats
    * Every gradient is handed over at the end of the backward pass, not when it is ready: under
      DistributedDataParallel that delays each gradient's all-reduce until the backward pass ends, so
      model/ops.py keeps autocast's per-parameter casts in data-parallel runs.
    * A cast tensor the graph does not use gives its parameter no gradient (None), as ``p.to(dtype)`` would:
      the function turns off autograd's zero-filling of missing output gradients (``set_materialize_grads``).
      Until 2026-12-02 it gave a zero gradient, so AdamW decayed encoder blocks after the last
      ``feature_layers`` block on the fused path only.
    * The cast copies live until backward (autocast's cached casts do too).
"""

import torch


class _CastParameters(torch.autograd.Function):
    """Parameters to ``dtype`` in one multi-tensor copy; their gradients back to the parameters' dtypes in one
    more, when the last of them is known (at the end of the backward pass)."""

    @staticmethod
    def forward(ctx, dtype, *params):
        cast = [torch.empty_like(p, dtype=dtype) for p in params]
        torch._foreach_copy_(cast, list(params))
        ctx.param_dtypes = [p.dtype for p in params]
        ctx.set_materialize_grads(False)  # an unused cast hands its parameter None, not a zero gradient
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


def cast_parameters(dtype: torch.dtype, *params: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``params`` cast to ``dtype``, forward and backward each in one multi-tensor copy (module docstring)."""
    return _CastParameters.apply(dtype, *params)
