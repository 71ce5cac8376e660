"""kernels.bias_gelu and its raw ops bias_gelu_fwd / bias_gelu_bwd against autograd of the reference:
output, dx and dbias; strided inputs, mixed dtypes, row-group splits of the bias reduction, custom-op
registration, torch.compile, the fallback, and a GPU check at the MLP widths.
"""

from __future__ import annotations

import pytest
import torch

import kernels
from kernel_helpers import (
    CUDA,
    DEVICE,
    GPU_DTYPES,
    RTOL,
    assert_close,
    assert_compiled_matches_eager,
    gpu,
    grads,
    leaf,
    nan_filled,
    requires_kernels,
)
from kernels import _runtime
from kernels import reference as ref
from kernels.bias_gelu import bias_gelu_backward, bias_gelu_forward

pytestmark = requires_kernels



SHAPES = [
    (1, 40),  # one row, N not a power of two
    (7, 96),
    (3, 5, 200),  # 3-d x
    (3, 7, 600),  # two column chunks (the second masked), three 8-row blocks
    (2, 1),  # N = 1
]


def _inputs(shape, dtype=torch.float32, bias_dtype=torch.float32):
    x = (2 * torch.randn(shape, device=DEVICE)).to(dtype).requires_grad_()
    bias = torch.randn(shape[-1], device=DEVICE).to(bias_dtype).requires_grad_()
    return x, bias


def _check(x, bias, rtol, leaves=None, names=("dx", "dbias")):
    out = kernels.bias_gelu(x, bias)
    assert out.shape == x.shape and out.dtype == x.dtype and out.is_contiguous()
    leaves = leaves or (x, bias)
    dout = torch.randn_like(out)
    got = grads(out, leaves, dout)
    expected = ref.bias_gelu_reference(x, bias)
    want = grads(expected, leaves, dout)
    assert_close(out, expected, rtol, "out")
    for name, g, w in zip(names, got, want, strict=True):
        assert g.dtype == w.dtype, f"{name}: {g.dtype} != {w.dtype}"
        assert_close(g, w, rtol, name)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_bias_gelu_matches_reference(shape):
    _check(*_inputs(shape), RTOL[torch.float32])


@pytest.mark.parametrize("dtypes", [(torch.float16, torch.float32), (torch.float32, torch.float16)],
                         ids=["fp16 x fp32 bias", "fp32 x fp16 bias"])
def test_bias_gelu_mixed_dtypes(dtypes):
    x_dtype, bias_dtype = dtypes
    _check(*_inputs((5, 3, 72), x_dtype, bias_dtype), RTOL[torch.float16])


def test_bias_gelu_strided_rows_and_gradient():
    """x a column slice of a wider buffer (row stride > N), dout a non-contiguous view."""
    N = 72
    wide = torch.randn(4, 6, 100, device=DEVICE, requires_grad=True)
    x = wide[..., 10:10 + N]
    bias = torch.randn(N, device=DEVICE, requires_grad=True)
    out = kernels.bias_gelu(x, bias)
    dout = torch.randn(6, 4, N, device=DEVICE).transpose(0, 1)  # non-contiguous leading dims
    got = grads(out, (wide, bias), dout)
    expected = ref.bias_gelu_reference(x, bias)
    want = grads(expected, (wide, bias), dout)
    assert_close(out, expected, 1e-4, "out")
    for name, g, w in zip(("dwide", "dbias"), got, want, strict=True):
        assert_close(g, w, 1e-4, name)


def test_bias_gelu_only_x_or_only_bias_requires_grad():
    x, bias = (t.detach() for t in _inputs((3, 40)))
    x_leaf, bias_leaf = leaf(x), leaf(bias)
    _check(x_leaf, bias, 1e-4, leaves=(x_leaf,), names=("dx",))
    _check(x, bias_leaf, 1e-4, leaves=(bias_leaf,), names=("dbias",))


@pytest.mark.parametrize("row_groups", [1, 2, 3, 50])
def test_bias_gelu_backward_row_groups(row_groups):
    """The per-program column sums of dbias add up to the reference for any split of the rows."""
    x, bias = (t.detach() for t in _inputs((37, 48)))  # N = 48: 64-row blocks, so one partial row block
    x2, bias2 = (t.detach() for t in _inputs((300, 600)))  # N = 600: 38 8-row blocks, 2 column chunks
    for xx, bb in ((x, bias), (x2, bias2)):
        dout = torch.randn_like(xx)
        dx, dbias = bias_gelu_backward(dout, xx, bb, row_groups=row_groups)
        leaves = (leaf(xx), leaf(bb))
        want = grads(ref.bias_gelu_reference(*leaves), leaves, dout)
        assert dbias.dtype == torch.float32
        assert_close(dx, want[0], 1e-4, "dx")
        assert_close(dbias, want[1], 1e-4, "dbias")


def test_bias_gelu_is_deterministic():
    x, bias = (t.detach() for t in _inputs((300, 600)))
    dout = torch.randn_like(x)
    first = kernels.bias_gelu_bwd(dout, x, bias)
    second = kernels.bias_gelu_bwd(dout, x, bias)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_raw_ops():
    """bias_gelu_fwd / bias_gelu_bwd as the MLP's autograd.Function calls them (grad mode off)."""
    x, bias = (t.detach() for t in _inputs((2, 9, 200), torch.float16))
    with torch.no_grad():
        out = kernels.bias_gelu_fwd(x, bias)
        dout = torch.randn_like(out)
        dx, dbias = kernels.bias_gelu_bwd(dout, x, bias)
    assert out.dtype == dx.dtype == torch.float16 and dbias.dtype == torch.float32
    leaves = (leaf(x), leaf(bias))
    expected = ref.bias_gelu_reference(*leaves)
    want = grads(expected, leaves, dout)
    assert_close(out, expected, RTOL[torch.float16], "out")
    assert_close(dx, want[0], RTOL[torch.float16], "dx")
    assert_close(dbias, want[1], RTOL[torch.float16], "dbias")


def test_every_output_element_is_written(monkeypatch):
    """NaN-filled torch.empty / empty_like buffers (outputs and partial sums) never leak into the results."""
    x, bias = (t.detach() for t in _inputs((3, 7, 600)))
    dout = torch.randn_like(x)
    clean = (bias_gelu_forward(x, bias), *bias_gelu_backward(dout, x, bias, row_groups=3))
    monkeypatch.setattr(torch, "empty", nan_filled(torch.empty))
    monkeypatch.setattr(torch, "empty_like", nan_filled(torch.empty_like))
    poisoned = (bias_gelu_forward(x, bias), *bias_gelu_backward(dout, x, bias, row_groups=3))
    monkeypatch.undo()
    for name, a, b in zip(("out", "dx", "dbias"), poisoned, clean, strict=True):
        assert torch.equal(a, b), f"{name} differs when its buffers start as NaN"


def test_custom_op_registration():
    """torch.library.opcheck: schema, fake-tensor kernel, autograd registration, AOT dispatch."""
    x, bias = (t.detach() for t in _inputs((3, 40)))
    torch.library.opcheck(torch.ops.crossmae.bias_gelu_fwd, (leaf(x), leaf(bias)))
    torch.library.opcheck(torch.ops.crossmae.bias_gelu_bwd, (torch.randn_like(x), x, bias))


def test_under_torch_compile():
    """fc1 without bias + bias_gelu + fc2 in one fullgraph-compiled function, forward and backward, = eager."""

    def mlp(x, w1, b1, w2):
        return (kernels.bias_gelu(x @ w1.t(), b1) @ w2.t()).square().mean()

    x = torch.randn(2, 5, 16, device=DEVICE, requires_grad=True)
    w1 = torch.randn(40, 16, device=DEVICE, requires_grad=True)
    b1 = torch.randn(40, device=DEVICE, requires_grad=True)
    w2 = torch.randn(16, 40, device=DEVICE, requires_grad=True)
    leaves = (x, w1, b1, w2)
    assert_compiled_matches_eager(mlp, leaves, leaves, backend="aot_eager")


def test_rejects_bad_inputs():
    x, bias = _inputs((3, 40))
    with pytest.raises(ValueError, match=r"bias \(N,\)"):
        kernels.bias_gelu(x, bias[:39])
    with pytest.raises(ValueError, match=r"bias \(N,\)"):
        kernels.bias_gelu(x, bias[None])
    with pytest.raises(TypeError, match="float64"):
        kernels.bias_gelu(x.double(), bias)
    with pytest.raises(ValueError, match="dout"):
        kernels.bias_gelu_bwd(torch.randn(3, 41, device=DEVICE), x.detach(), bias.detach())


def test_fallback_without_triton(monkeypatch):
    """CPU tensors without TRITON_INTERPRET (simulated): bias_gelu is the reference, the raw ops raise."""
    monkeypatch.setattr(_runtime, "INTERPRET", False)
    x, bias = (torch.randn(3, 40), torch.randn(40))
    assert torch.equal(kernels.bias_gelu(x, bias), ref.bias_gelu_reference(x, bias))
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        kernels.bias_gelu_fwd(x, bias)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        kernels.bias_gelu_bwd(torch.randn_like(x), x, bias)


@gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(256, 50, 1536), (256, 50, 3072), (256, 49, 2048), (64, 65, 5120)],
                         ids=lambda s: "B{}-T{}-N{}".format(*s))
def test_bias_gelu_gpu(shape, dtype):
    assert CUDA
    x, bias = _inputs(shape, dtype)  # fp32 bias, as the fc1 parameter under autocast
    out = kernels.bias_gelu(x, bias)
    dout = torch.randn_like(out)
    got = grads(out, (x, bias), dout)
    leaves32 = (leaf(x.float()), bias)
    expected = ref.bias_gelu_reference(*leaves32)
    want = grads(expected, leaves32, dout.float())
    assert_close(out, expected, RTOL[dtype], "out")
    for name, g, w in zip(("dx", "dbias"), got, want, strict=True):
        assert_close(g, w, RTOL[dtype], name)
