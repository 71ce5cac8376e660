"""kernels.cast.cast_parameters (one multi-tensor copy each way) against ``p.to(dtype)`` by autograd."""

from __future__ import annotations

import pytest
import torch

from kernels.cast import cast_parameters

SHAPES = [(7, 5), (5,), (3, 4, 2, 2)]  # a weight, a bias, a conv weight


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cast_parameters_matches_to_dtype_forward_and_backward(dtype):
    g = torch.Generator().manual_seed(17)
    params = [torch.randn(shape, generator=g).requires_grad_() for shape in SHAPES]
    params.append(torch.randn(6, generator=g).half().requires_grad_())  # a parameter of another dtype
    cast = cast_parameters(dtype, *params)
    plain = [p.to(dtype) for p in params]
    assert len(cast) == len(params)
    for c, q, p in zip(cast, plain, params, strict=True):
        assert c.dtype == dtype and c.shape == p.shape
        assert torch.equal(c, q)
        assert c.data_ptr() != p.data_ptr()  # a copy even where the dtype is already right
    douts = [torch.randn(p.shape, generator=g).to(dtype) for p in params]
    got = torch.autograd.grad(cast, params, douts)
    want = torch.autograd.grad(plain, params, douts)
    for a, b, p in zip(got, want, params, strict=True):
        assert a.dtype == p.dtype
        assert torch.equal(a, b)


def test_an_unused_cast_gives_its_parameter_no_gradient():
    # A fused model whose decoder reads only some encoder blocks (feature_layers) leaves the later blocks' casts
    # unused: their parameters must get None, as with p.to(dtype), not a zero gradient that AdamW would decay.
    used, unused = torch.randn(3, 4, requires_grad=True), torch.randn(4, requires_grad=True)
    cast_used, _ = cast_parameters(torch.float16, used, unused)
    cast_used.float().sum().backward()
    assert used.grad is not None and torch.equal(used.grad, torch.ones_like(used))
    assert unused.grad is None
