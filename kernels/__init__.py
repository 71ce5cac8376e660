"""Triton kernels for CrossMAE, with plain PyTorch references in `kernels.reference`.

Public ops (each a `torch.library` custom op under the hood, differentiable where it makes sense and traceable
by `torch.compile`; see each module's docstring for shapes, dtypes and caveats):

    attention(q, k, v, scale=None)                     kernels/attention.py (backward: attention_backward.py)
    self_attention(qkv, scale=None)
    cross_attention(q, kv, scale=None)
    feature_mix_layernorm(feats, weight, ln_weight, ln_bias, eps=1e-6)     kernels/feature_mix.py
    gather_rows(table, ids)                                                kernels/gather_rows.py
    gather_target_patches(imgs, ids, patch_size, norm_pix=True, eps=1e-6)  kernels/patches.py
    gather_patches(imgs, ids, patch_size)
    scatter_patches(patches, ids, img_size, patch_size, base=None)
    bias_gelu(x, bias); raw ops bias_gelu_fwd(x, bias), bias_gelu_bwd(dout, x, bias)   kernels/bias_gelu.py
    mse_loss(pred, target)                                                 kernels/mse_loss.py
    layer_norm(x, weight, bias, eps=1e-6)                                  kernels/layer_norm.py
    add_layer_norm(x, branch, weight, bias, eps=1e-6) -> (x + branch, layer_norm(x + branch))
    gelu_mlp(x, w1, b1, w2, b2, dtype): fc2(gelu(fc1(x))), GELU recomputed in backward    kernels/mlp.py
    cast_parameters(dtype, *params): one multi-tensor cast each way (autograd.Function)    kernels/cast.py

Each is defined once, in its module. Where the kernels cannot run (CPU tensors without TRITON_INTERPRET=1 set
before this import, or no triton installed: every module still imports) every public op falls back to its
reference in `kernels.reference`, with the same semantics and the same input checks; the raw ops
(bias_gelu_fwd / bias_gelu_bwd, torch.ops.crossmae.*) raise a clear error instead.
`TRITON_AVAILABLE` says whether triton imported; `INTERPRET` whether kernels run in Triton's CPU interpreter;
`triton_can_run(*tensors)` whether the kernels (not their fallbacks) would run on these tensors.
A new op: kernels/<op>.py with its kernels, launches and one `kernels._custom_op.fused_op` declaration, its twin
in kernels/reference.py, and an entry in tests/test_kernels_compile.py's KERNEL_FILES.
"""

from . import reference
from ._runtime import INTERPRET, TRITON_AVAILABLE, triton_can_run
from .attention import attention, cross_attention, self_attention
from .bias_gelu import bias_gelu, bias_gelu_bwd, bias_gelu_fwd
from .cast import cast_parameters
from .feature_mix import feature_mix_layernorm
from .gather_rows import gather_rows
from .layer_norm import add_layer_norm, layer_norm
from .mlp import gelu_mlp
from .mse_loss import mse_loss
from .patches import gather_patches, gather_target_patches, scatter_patches

__all__ = [
    "INTERPRET",
    "TRITON_AVAILABLE",
    "add_layer_norm",
    "attention",
    "bias_gelu",
    "bias_gelu_bwd",
    "bias_gelu_fwd",
    "cast_parameters",
    "cross_attention",
    "feature_mix_layernorm",
    "gather_patches",
    "gather_rows",
    "gather_target_patches",
    "gelu_mlp",
    "layer_norm",
    "mse_loss",
    "reference",
    "scatter_patches",
    "self_attention",
    "triton_can_run",
]
