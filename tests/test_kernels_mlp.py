"""kernels.mlp.gelu_mlp (the MLP that recomputes its GELU in backward) against fc2(gelu(fc1(x))) by autograd."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernel_helpers import DEVICE, RTOL, assert_close, requires_kernels
from kernels.mlp import gelu_mlp

# (rows..., C_in, hidden, C_out): a ViT-like MLP, and odd sizes (hidden not a power of two, 3-D rows)
SHAPES = [((2, 7), 32, 128, 32), ((3, 5), 24, 40, 16)]


def inputs(lead: tuple[int, ...], c_in: int, hidden: int, c_out: int, seed: int, x_dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, c_in, generator=g).to(DEVICE, x_dtype).requires_grad_()
    params = [torch.randn(hidden, c_in, generator=g) / c_in**0.5, torch.randn(hidden, generator=g),
              torch.randn(c_out, hidden, generator=g) / hidden**0.5, torch.randn(c_out, generator=g)]
    return x, [p.to(DEVICE).requires_grad_() for p in params]


def plain_mlp(x, w1, b1, w2, b2):
    return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)


def grads(out: torch.Tensor, dout: torch.Tensor, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(out, tensors, dout))


@requires_kernels
@pytest.mark.parametrize("lead,c_in,hidden,c_out", SHAPES)
def test_gelu_mlp_matches_the_plain_mlp_in_fp32(lead, c_in, hidden, c_out):
    x, params = inputs(lead, c_in, hidden, c_out, seed=hidden)
    out = gelu_mlp(x, *params, torch.float32)
    expected = plain_mlp(x, *params)
    assert out.dtype == torch.float32
    assert_close(out, expected, RTOL[torch.float32], "out")
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    names = ["x", "w1", "b1", "w2", "b2"]
    for name, got, want in zip(names, grads(out, dout, [x, *params]), grads(expected, dout, [x, *params]),
                               strict=True):
        assert got.dtype == want.dtype, name
        assert_close(got, want, RTOL[torch.float32], name)


@requires_kernels
def test_gelu_mlp_in_half_precision_returns_gradients_in_the_parameters_dtype():
    """dtype fp16 (the autocast dtype) with fp32 parameters: output and dx in fp16, every parameter's gradient in
    fp32 (what autocast's casts hand back), all within fp16's tolerance of the fp32 computation."""
    x, params = inputs((4, 9), 32, 128, 32, seed=5, x_dtype=torch.float16)
    out = gelu_mlp(x, *params, torch.float16)
    x32 = x.detach().float().requires_grad_()
    expected = plain_mlp(x32, *params)
    assert out.dtype == torch.float16
    assert_close(out, expected, RTOL[torch.float16], "out")
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    got = grads(out, dout.half(), [x, *params])
    want = grads(expected, dout, [x32, *params])
    assert got[0].dtype == torch.float16 and all(g.dtype == torch.float32 for g in got[1:])
    for name, a, b in zip(["x", "w1", "b1", "w2", "b2"], got, want, strict=True):
        assert_close(a, b, RTOL[torch.float16], name)


def test_gelu_mlp_without_triton_is_the_plain_mlp(monkeypatch):
    """Where Triton cannot run (simulated) gelu_mlp composes F.linear and kernels.bias_gelu under the caller's
    autocast: the plain MLP's numbers."""
    monkeypatch.setattr(kernels, "triton_can_run", lambda *tensors: False)
    x, params = inputs((2, 7), 32, 128, 32, seed=3)
    out = gelu_mlp(x.cpu(), *[p.cpu() for p in params], torch.float32)
    assert_close(out, plain_mlp(x.cpu(), *[p.cpu() for p in params]), 1e-6, "out")
