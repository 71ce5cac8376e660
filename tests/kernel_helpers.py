"""Shared helpers of the kernel tests (tests/test_kernels_*.py): devices, tolerances, comparisons, inputs.

The tests compare every Triton op and every gradient with autograd of its PyTorch reference
(kernels/reference.py) on random inputs drawn from a fixed seed per test (derived from its node id, so the
same every run). Without CUDA the kernels run in Triton's CPU interpreter
(tests/conftest.py sets TRITON_INTERPRET=1) in fp32; the `gpu` tests run fp16 / bf16 at realistic shapes.
"""

from __future__ import annotations

import math

import pytest
import torch

import kernels
from kernels.tolerance import RTOL  # noqa: F401 (the kernel tests import it from here)

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
requires_kernels = pytest.mark.skipif(not (CUDA or kernels.INTERPRET),
                                      reason="the kernels need a CUDA GPU or TRITON_INTERPRET=1 (tests/conftest.py)")
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
GPU_DTYPES = [torch.float16, torch.bfloat16]



def max_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual.float() - expected.float()).abs().max().item()


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, name: str = "",
                 baseline: torch.Tensor | None = None) -> None:
    """max |actual - expected| <= rtol * max(max |expected|, 1) (or <= 2x the error of `baseline`, if given).

    The floor of 1 (inputs are O(1)) keeps gradients that are exactly zero in exact arithmetic (dq with a
    single key) from demanding a zero rounding error.
    """
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = max(expected.abs().max().item(), 1.0)
    err = max_err(actual, expected)
    bound = rtol * scale
    if baseline is not None:
        bound = max(bound, 2 * max_err(baseline, expected))
    assert err <= bound, f"{name}: max abs error {err:.3g} > {bound:.3g} (max |ref| {scale:.3g})"


def assert_compiled_matches_eager(fn, args, leaves, backend: str = "aot_eager") -> None:
    """torch.compile(fn, fullgraph=True) (a graph break raises) gives eager's value and gradients to 1e-5."""
    eager = fn(*args)
    eager_grads = torch.autograd.grad(eager, leaves)
    compiled = torch.compile(fn, backend=backend, fullgraph=True)(*args)
    compiled_grads = torch.autograd.grad(compiled, leaves)
    assert_close(compiled, eager, 1e-5, "loss")
    for i, (g, w) in enumerate(zip(compiled_grads, eager_grads, strict=True)):
        assert_close(g, w, 1e-5, f"grad {i}")


def grads(out: torch.Tensor, inputs: tuple[torch.Tensor, ...], dout: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(out, inputs, dout)


def nan_filled(alloc):
    """``alloc`` (torch.empty, torch.empty_like...) whose buffers start as NaN: monkeypatched in, it shows that a
    kernel writes every element of its outputs and partial sums."""
    def empty(*args, **kwargs):
        return alloc(*args, **kwargs).fill_(float("nan"))

    return empty


def leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().requires_grad_()


def distinct_ids(B: int, L: int, n: int, device=DEVICE) -> torch.Tensor:
    return torch.stack([torch.randperm(L, device=device)[:n] for _ in range(B)])



def attn_inputs(B, Lq, Lk, H, d, dtype=torch.float32):
    q = torch.randn(B, Lq, H, d, device=DEVICE, dtype=dtype, requires_grad=True)
    k = torch.randn(B, Lk, H, d, device=DEVICE, dtype=dtype, requires_grad=True)
    v = torch.randn(B, Lk, H, d, device=DEVICE, dtype=dtype, requires_grad=True)
    return q, k, v


def mix_inputs(K, N, C, J, dtype=torch.float32, param_dtype=torch.float32):
    feats = torch.randn(K, N, C, device=DEVICE, dtype=dtype, requires_grad=True)
    weight = (torch.randn(J, K, device=DEVICE, dtype=param_dtype) / math.sqrt(K)).requires_grad_()
    gamma = (1 + 0.2 * torch.randn(J, C, device=DEVICE, dtype=param_dtype)).requires_grad_()
    beta = (0.2 * torch.randn(J, C, device=DEVICE, dtype=param_dtype)).requires_grad_()
    return feats, weight, gamma, beta
