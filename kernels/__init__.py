"""Triton kernels for CrossMAE, with plain PyTorch references in `kernels.reference`.

Public ops (each a `torch.library` custom op under the hood, differentiable where it makes sense and traceable
by `torch.compile`; see each module's docstring for shapes, dtypes and caveats):

    attention(q, k, v, scale=None)                                         kernels/attention.py
    self_attention(qkv, scale=None)
    cross_attention(q, kv, scale=None)
    feature_mix_layernorm(feats, weight, ln_weight, ln_bias, eps=1e-6)     kernels/feature_mix.py
    gather_visible(x, pos, ids)                                            kernels/gather.py
    gather_rows(table, ids)
    gather_target_patches(imgs, ids, patch_size, norm_pix=True, eps=1e-6)
    gather_patches(imgs, ids, patch_size)
    scatter_patches(patches, ids, img_size, patch_size, base=None)
    bias_gelu(x, bias); raw ops bias_gelu_fwd(x, bias), bias_gelu_bwd(dout, x, bias)   kernels/bias_gelu.py
    mse_loss(pred, target)                                                 kernels/mse_loss.py
    layer_norm(x, weight, bias, eps=1e-6)                                  kernels/layer_norm.py
    add_layer_norm(x, branch, weight, bias, eps=1e-6) -> (x + branch, layer_norm(x + branch))

Where the kernels cannot run (CPU tensors without TRITON_INTERPRET=1 set before this import, or no triton
installed) every public op falls back to its reference in `kernels.reference`, with the same semantics.
`TRITON_AVAILABLE` says whether triton imported; `INTERPRET` whether kernels run in Triton's CPU interpreter;
`triton_can_run(*tensors)` whether the kernels (not their fallbacks) would run on these tensors.
"""

from . import reference

try:
    import triton  # noqa: F401
except ImportError:  # e.g. macOS: the references stand in for everything
    TRITON_AVAILABLE = False
    INTERPRET = False

    def triton_can_run(*tensors):
        return False

    def attention(q, k, v, scale=None):
        return reference.attention_reference(q, k, v, scale)

    def self_attention(qkv, scale=None):
        return reference.self_attention_reference(qkv, scale)

    def cross_attention(q, kv, scale=None):
        return reference.cross_attention_reference(q, kv, scale)

    def feature_mix_layernorm(feats, weight, ln_weight, ln_bias, eps=1e-6):
        return reference.feature_mix_layernorm_reference(feats, weight, ln_weight, ln_bias, eps)

    def layer_norm(x, weight, bias, eps=1e-6):
        return reference.layer_norm_reference(x, weight, bias, eps)

    def add_layer_norm(x, branch, weight, bias, eps=1e-6):
        return reference.add_layer_norm_reference(x, branch, weight, bias, eps)

    def gather_visible(x, pos, ids):
        return reference.gather_visible_reference(x, pos, ids)

    def gather_rows(table, ids):
        return reference.gather_rows_reference(table, ids)

    def gather_target_patches(imgs, ids, patch_size, norm_pix=True, eps=1e-6):
        return reference.gather_target_patches_reference(imgs, ids, patch_size, norm_pix, eps)

    def gather_patches(imgs, ids, patch_size):
        return reference.gather_patches_reference(imgs, ids, patch_size)

    def scatter_patches(patches, ids, img_size, patch_size, base=None):
        return reference.scatter_patches_reference(patches, ids, img_size, patch_size, base)

    def bias_gelu(x, bias):
        return reference.bias_gelu_reference(x, bias)

    def _no_triton(op):
        def raw_op(*args, **kwargs):
            raise RuntimeError(f"kernels.{op} is a raw Triton op and triton is not installed; use "
                               "kernels.bias_gelu (falls back to kernels.reference) or install triton")
        return raw_op

    bias_gelu_fwd = _no_triton("bias_gelu_fwd")
    bias_gelu_bwd = _no_triton("bias_gelu_bwd")

    def mse_loss(pred, target):
        if pred.shape != target.shape:
            raise ValueError(f"kernels.mse_loss: pred {tuple(pred.shape)} and target {tuple(target.shape)} must "
                             "have the same shape (no broadcasting)")
        if target.requires_grad:
            raise ValueError("kernels.mse_loss: target requires grad; the reconstruction targets are constants, "
                             "pass target.detach()")
        return reference.mse_loss_reference(pred, target)

else:
    TRITON_AVAILABLE = True
    from ._runtime import INTERPRET, triton_can_run
    from .attention import attention, cross_attention, self_attention
    from .bias_gelu import bias_gelu, bias_gelu_bwd, bias_gelu_fwd
    from .feature_mix import feature_mix_layernorm
    from .gather import gather_patches, gather_rows, gather_target_patches, gather_visible, scatter_patches
    from .layer_norm import add_layer_norm, layer_norm
    from .mse_loss import mse_loss

__all__ = [
    "INTERPRET",
    "TRITON_AVAILABLE",
    "add_layer_norm",
    "attention",
    "bias_gelu",
    "bias_gelu_bwd",
    "bias_gelu_fwd",
    "cross_attention",
    "feature_mix_layernorm",
    "gather_patches",
    "gather_rows",
    "gather_target_patches",
    "gather_visible",
    "layer_norm",
    "mse_loss",
    "reference",
    "scatter_patches",
    "self_attention",
    "triton_can_run",
]
