"""Triton kernels for CrossMAE, with plain PyTorch references in `kernels.reference`.

Public ops (each a `torch.library` custom op under the hood, differentiable where it makes sense and traceable
by `torch.compile`; see each module's docstring for shapes, dtypes and caveats):

    attention(q, k, v, scale=None)                                         kernels/attention.py
    feature_mix_layernorm(feats, weight, ln_weight, ln_bias, eps=1e-6)     kernels/feature_mix.py
    gather_visible(x, pos, ids)                                            kernels/gather.py
    gather_rows(table, ids)
    gather_target_patches(imgs, ids, patch_size, norm_pix=True, eps=1e-6)
    scatter_patches(patches, ids, img_size, patch_size, base=None)

Where the kernels cannot run (CPU tensors without TRITON_INTERPRET=1 set before this import, or no triton
installed) every public op falls back to its reference in `kernels.reference`, with the same semantics.
`TRITON_AVAILABLE` says whether triton imported; `INTERPRET` whether kernels run in Triton's CPU interpreter.
"""

from . import reference

try:
    import triton  # noqa: F401
except ImportError:  # e.g. macOS: the references stand in for everything
    TRITON_AVAILABLE = False
    INTERPRET = False

    def attention(q, k, v, scale=None):
        return reference.attention_reference(q, k, v, scale)

    def feature_mix_layernorm(feats, weight, ln_weight, ln_bias, eps=1e-6):
        return reference.feature_mix_layernorm_reference(feats, weight, ln_weight, ln_bias, eps)

    def gather_visible(x, pos, ids):
        return reference.gather_visible_reference(x, pos, ids)

    def gather_rows(table, ids):
        return reference.gather_rows_reference(table, ids)

    def gather_target_patches(imgs, ids, patch_size, norm_pix=True, eps=1e-6):
        return reference.gather_target_patches_reference(imgs, ids, patch_size, norm_pix, eps)

    def scatter_patches(patches, ids, img_size, patch_size, base=None):
        return reference.scatter_patches_reference(patches, ids, img_size, patch_size, base)

else:
    TRITON_AVAILABLE = True
    from ._runtime import INTERPRET
    from .attention import attention
    from .feature_mix import feature_mix_layernorm
    from .gather import gather_rows, gather_target_patches, gather_visible, scatter_patches

__all__ = [
    "INTERPRET",
    "TRITON_AVAILABLE",
    "attention",
    "feature_mix_layernorm",
    "gather_rows",
    "gather_target_patches",
    "gather_visible",
    "reference",
    "scatter_patches",
]
