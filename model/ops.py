"""The operations where the reference path and the fused path differ, in one place.

``backend="torch"`` is the pure-PyTorch reference: it reproduces the authors' numerics (their code
is the specification) and runs anywhere. ``backend="triton"`` routes the same operations through
the fused kernels of ``kernels/`` (under Triton's interpreter on a CPU with TRITON_INTERPRET=1,
else falling back to the kernels' own references). A module reads its backend once, at
construction; nothing here patches ``torch.nn.functional``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str) -> torch.Tensor:
    """Softmax attention with scale 1/sqrt(head_dim).

    q: (B, Lq, H, d), k and v: (B, Lk, H, d), any strides (views of a fused projection).
    Returns (B, Lq, H, d), contiguous, so that ``.reshape(B, Lq, H * d)`` is free.
    """
    if backend == "triton":
        import kernels

        return kernels.attention(q, k, v)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).contiguous()


def gather_rows(table: torch.Tensor, ids: torch.Tensor, backend: str) -> torch.Tensor:
    """table (L, D) at ids (B, n) -> (B, n, D)."""
    if backend == "triton":
        import kernels

        return kernels.gather_rows(table, ids)
    return table[ids]


def target_patches(imgs: torch.Tensor, ids: torch.Tensor, patch_size: int, norm_pix: bool,
                   backend: str) -> torch.Tensor:
    """The image patches at ids (B, n) in (row, column, channel) layout, norm-pix normalised if asked."""
    if backend == "triton":
        import kernels

        return kernels.gather_target_patches(imgs, ids, patch_size, norm_pix=norm_pix)[0]
    target = gather_tokens(patchify(imgs, patch_size), ids)
    return normalize_patches(target) if norm_pix else target


def paste_patches(patches: torch.Tensor, ids: torch.Tensor, base: torch.Tensor, patch_size: int,
                  backend: str) -> torch.Tensor:
    """Paste (B, n, p*p*c) patches at ids into the image ``base`` (B, c, H, W); returns a new image."""
    if backend == "triton":
        import kernels

        return kernels.scatter_patches(patches.to(base.dtype), ids, tuple(base.shape[-2:]), patch_size, base=base)
    grid = patchify(base, patch_size).scatter(1, ids.unsqueeze(-1).expand(-1, -1, patches.shape[-1]),
                                              patches.to(base.dtype))
    return unpatchify(grid, patch_size, (base.shape[-2] // patch_size, base.shape[-1] // patch_size), base.shape[1])


def autocast_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype matmuls run in here: the autocast dtype when autocast is on, else the tensor's."""
    if torch.is_autocast_enabled(t.device.type):
        return torch.get_autocast_dtype(t.device.type)
    return t.dtype
