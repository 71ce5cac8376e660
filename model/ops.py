"""The operations where the reference path and the fused path differ, in one place.

``backend="torch"`` is the pure-PyTorch reference: it reproduces the authors' numerics (their code
is the specification) and runs anywhere. ``backend="triton"`` routes the same operations through
the fused kernels of ``kernels/``. A module reads its backend once, at construction; nothing here
patches ``torch.nn.functional``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BACKENDS = ("torch", "triton")


def default_backend() -> str:
    return "triton" if torch.cuda.is_available() and triton_available() else "torch"


def triton_available() -> bool:
    try:
        import kernels  # noqa: F401
    except ImportError:
        return False
    return True


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "triton" and not triton_available():
        raise ValueError("backend='triton' needs the fused kernels (package `kernels` and triton); "
                         "they do not import here: use backend='torch'")
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
