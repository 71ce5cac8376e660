"""kernels.layer_norm / kernels.add_layer_norm against their references: outputs and the gradients of x, branch,
weight and bias, for every combination of used outputs, mixed dtypes, strided inputs, and the custom-op plumbing
(opcheck, torch.compile, fallback, fully written buffers).
"""

from __future__ import annotations

import importlib

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
from kernels import reference as ref
from kernels.layer_norm import add_layer_norm_forward, layer_norm_backward, layer_norm_forward

ln_mod = importlib.import_module("kernels.layer_norm")  # the package attribute kernels.layer_norm is the function
pytestmark = requires_kernels



SHAPES = [(1, 40), (7, 96), (37, 200), (3, 5, 768)]  # C not a power of two; one row; a 3-d batch at ViT-B width


def _params(C, dtype=torch.float32):
    weight = (1 + 0.2 * torch.randn(C, device=DEVICE, dtype=dtype)).requires_grad_()
    bias = (0.2 * torch.randn(C, device=DEVICE, dtype=dtype)).requires_grad_()
    return weight, bias


def _x(shape, dtype=torch.float32, offset=0.0):
    # an offset mean per row makes the centring matter (and would expose E[x^2] - E[x]^2 cancellation)
    return (torch.randn(shape, device=DEVICE, dtype=torch.float32) + offset).to(dtype).requires_grad_()


def _compare(name, got, want, via=None):
    """Same dtype, shape and values, at the tolerance of the dtype they are stored in (or of `via`, a dtype the
    value passed through on its way, if that is coarser)."""
    assert got.dtype == want.dtype, f"{name}: dtype {got.dtype} != {want.dtype}"
    assert_close(got, want, max(RTOL[want.dtype], RTOL[via or want.dtype]), name)


def _check_add(x, branch, weight, bias, use_h=True, use_y=True, leaves=None):
    h, y = kernels.add_layer_norm(x, branch, weight, bias)
    h_ref, y_ref = ref.add_layer_norm_reference(x, branch, weight, bias)
    assert h.is_contiguous() and y.is_contiguous() and h.shape == x.shape
    _compare("h", h, h_ref)
    _compare("y", y, y_ref)
    dh, dy = torch.randn_like(h), torch.randn_like(y)
    used = [i for i, flag in enumerate((use_h, use_y)) if flag]
    outs, outs_ref, douts = ([t[i] for i in used] for t in ((h, y), (h_ref, y_ref), (dh, dy)))
    leaves = leaves or (x, branch, weight, bias)
    got = torch.autograd.grad(outs, leaves, douts, allow_unused=True)
    want = torch.autograd.grad(outs_ref, leaves, douts, allow_unused=True)
    for name, g, w in zip(("dx", "dbranch", "dweight", "dbias"), got, want, strict=True):
        if w is None:  # y unused: the reference's weight and bias get no gradient
            assert g is None or not g.any(), f"{name}: expected no gradient"
        else:
            # dx and dbranch are the gradient of h, which is stored in x.dtype (in the reference too)
            _compare(name, g, w, via=x.dtype if name in ("dx", "dbranch") else None)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_layer_norm_matches_reference(shape):
    x = _x(shape, offset=3.0)
    weight, bias = _params(shape[-1])
    y = kernels.layer_norm(x, weight, bias)
    expected = ref.layer_norm_reference(x, weight, bias)
    assert y.is_contiguous() and y.shape == x.shape
    _compare("y", y, expected)
    dy = torch.randn_like(y)
    for name, g, w in zip(("dx", "dweight", "dbias"), grads(y, (x, weight, bias), dy),
                          grads(expected, (x, weight, bias), dy), strict=True):
        _compare(name, g, w)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_add_layer_norm_matches_reference(shape):
    _check_add(_x(shape, offset=3.0), _x(shape), *_params(shape[-1]))


@pytest.mark.parametrize("use_h, use_y", [(False, True), (True, False)], ids=["dh-None", "dy-None"])
def test_add_layer_norm_one_output_used(use_h, use_y):
    shape = (7, 96)
    _check_add(_x(shape), _x(shape), *_params(96), use_h=use_h, use_y=use_y)


@pytest.mark.parametrize("x_dtype, branch_dtype, param_dtype", [
    (torch.float32, torch.float16, torch.float32),
    (torch.float16, torch.float32, torch.float32),
    (torch.float16, torch.float16, torch.float32),  # the fused path's residual stream under fp16 autocast
    (torch.float16, torch.float16, torch.float16),
], ids=["x32-b16", "x16-b32", "x16-b16", "x16-b16-params16"])
def test_add_layer_norm_mixed_dtypes(x_dtype, branch_dtype, param_dtype):
    shape = (5, 3, 200)
    _check_add(_x(shape, x_dtype, offset=1.0), _x(shape, branch_dtype), *_params(200, param_dtype))


def test_y_normalises_the_stored_h():
    """h near 1000 in fp16 (unit in the last place 0.5) with branch = +-0.25: rounding h moves it by ~10% of its
    spread, so y must normalise the rounded h (what the backward recomputes from); a large mean with a small
    spread also rules out a one-pass E[h^2] - E[h]^2 variance."""
    shape = (6, 200)
    x = (1000 + 0.5 * torch.randint(-8, 9, shape, device=DEVICE)).half().requires_grad_()
    branch = (0.25 * torch.randint(0, 2, shape, device=DEVICE) * 2 - 0.25).half().requires_grad_()
    _check_add(x, branch, *_params(200))


def test_layer_norm_fp16():
    x = _x((9, 384), torch.float16, offset=2.0)
    weight, bias = _params(384)
    y = kernels.layer_norm(x, weight, bias)
    expected = ref.layer_norm_reference(x, weight, bias)
    _compare("y", y, expected)
    dy = torch.randn_like(y)
    for name, g, w in zip(("dx", "dweight", "dbias"), grads(y, (x, weight, bias), dy),
                          grads(expected, (x, weight, bias), dy), strict=True):
        _compare(name, g, w)


def test_strided_inputs():
    """Row-strided views are read in place; a non-unit last-dim stride is copied once; gradients flow back."""
    C = 40
    wide = _x((6, 2 * C))  # x = wide[:, :C]: row stride 2C
    base = _x((C, 6))  # branch = base.t(): last-dim stride 6
    weight, bias = _params(C)
    _check_add(wide[:, :C], base.t(), weight, bias, leaves=(wide, base, weight, bias))
    y = kernels.layer_norm(base.t(), weight, bias)
    expected = ref.layer_norm_reference(base.t(), weight, bias)
    _compare("y", y, expected)
    dy = torch.randn_like(y)
    _compare("dx", grads(y, (base,), dy)[0], grads(expected, (base,), dy)[0])


def test_unused_h_reaches_the_kernel_as_none(monkeypatch):
    """With h unused, autograd hands None (not a zero tensor) to the backward, so no zeros are read."""
    seen = []
    real = ln_mod.layer_norm_backward
    monkeypatch.setattr(ln_mod, "layer_norm_backward",
                        lambda dy, x, w, m, r, dh=None, **kw: seen.append(dh) or real(dy, x, w, m, r, dh, **kw))
    x, branch = _x((3, 40)), _x((3, 40))
    h, y = kernels.add_layer_norm(x, branch, *_params(40))
    y.sum().backward()
    assert seen == [None]
    h, y = kernels.add_layer_norm(x, branch, *_params(40))
    (h.sum() + y.sum()).backward()
    assert len(seen) == 2 and isinstance(seen[1], torch.Tensor)


@pytest.mark.parametrize("programs", [1, 2, 3, 7])
def test_backward_partial_sums(programs):
    """The per-program partial sums of dweight / dbias add up for any split of the rows (37 rows = 5 blocks)."""
    x, dh = torch.randn(37, 200, device=DEVICE), torch.randn(37, 200, device=DEVICE)
    weight, bias = (t.detach() for t in _params(200))
    y, mean, rstd = layer_norm_forward(x, weight, bias, 1e-6)
    dy = torch.randn_like(y)
    got = layer_norm_backward(dy, x, weight, mean, rstd, dh, programs=programs)
    leaves = tuple(leaf(t) for t in (x, weight, bias))
    want = grads(ref.layer_norm_reference(*leaves), leaves, dy)
    assert_close(got[0], want[0] + dh, 1e-4, "dx + dh")
    assert_close(got[1], want[1], 1e-4, "dweight")
    assert_close(got[2], want[2], 1e-4, "dbias")


def test_every_output_element_is_written(monkeypatch):
    """torch.empty hands the host functions NaN-filled buffers: none may survive (outputs and partial sums)."""
    x, branch = torch.randn(37, 200, device=DEVICE), torch.randn(37, 200, device=DEVICE)
    weight, bias = (t.detach() for t in _params(200))

    def run():
        h, y, mean, rstd = add_layer_norm_forward(x, branch, weight, bias, 1e-6)
        return (h, y, mean, rstd, *layer_norm_backward(y, h, weight, mean, rstd, x, programs=3),
                *layer_norm_forward(x, weight, bias, 1e-6))

    clean = run()
    monkeypatch.setattr(torch, "empty", nan_filled(torch.empty))
    poisoned = run()
    monkeypatch.undo()
    for i, (a, b) in enumerate(zip(poisoned, clean, strict=True)):
        assert not torch.isnan(a).any(), f"output {i} has unwritten (NaN) elements"
        assert torch.equal(a, b), f"output {i} differs when its buffers start as NaN"


def test_rejects_bad_inputs():
    x = torch.randn(4, 40, device=DEVICE)
    weight, bias = _params(40)
    with pytest.raises(ValueError, match="weight"):
        kernels.layer_norm(x, weight[:8], bias)
    with pytest.raises(ValueError, match="branch shape"):
        kernels.add_layer_norm(x, x[:2], weight, bias)
    with pytest.raises(TypeError, match="int64"):
        kernels.layer_norm(x.long(), weight, bias)
    wide = torch.randn(1, 8193, device=DEVICE)
    with pytest.raises(ValueError, match="C=8193"):
        kernels.layer_norm(wide, torch.ones(8193, device=DEVICE), torch.zeros(8193, device=DEVICE))


def _opcheck_cases():
    x, branch, dh = (torch.randn(3, 5, 40, device=DEVICE) for _ in range(3))
    weight, bias = (t.detach() for t in _params(40))
    y, mean, rstd = layer_norm_forward(x, weight, bias, 1e-6)
    ops = torch.ops.crossmae
    return {
        "layer_norm_fwd": (ops.layer_norm_fwd, (leaf(x), leaf(weight), leaf(bias), 1e-6)),
        "add_layer_norm_fwd": (ops.add_layer_norm_fwd, (leaf(x), leaf(branch.half()), leaf(weight), leaf(bias),
                                                        1e-6)),
        "layer_norm_bwd": (ops.layer_norm_bwd, (torch.randn_like(y), x, weight, mean, rstd, None)),
        "layer_norm_bwd_dh": (ops.layer_norm_bwd, (torch.randn_like(y), x, weight, mean, rstd, dh)),
    }


@pytest.mark.parametrize("case", list(_opcheck_cases()))
def test_custom_op_registration(case):
    """torch.library.opcheck: schema, fake-tensor kernel, autograd registration, AOT dispatch."""
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


# Inductor on the CPU compiles C++ for a long while on this shared CI machine: only on a GPU.
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"] if CUDA else ["aot_eager"])
def test_under_torch_compile(backend):
    """Pre-norm residual blocks of both ops, fullgraph-compiled (no graph break), forward and backward = eager;
    the last residual stream h2 is unused (its gradient is None)."""
    C = 40

    def block(x, branch, w1, b1, w2, b2, proj):
        h, y = kernels.add_layer_norm(x, branch, w1, b1)
        _h2, y2 = kernels.add_layer_norm(h, y @ proj, w2, b2)
        return (kernels.layer_norm(y2, w1, b2) * y).sum() + h.square().mean()

    inputs = [_x((2, 7, C)), _x((2, 7, C)), *_params(C), *_params(C), leaf(torch.randn(C, C, device=DEVICE) / 8)]
    assert_compiled_matches_eager(block, inputs, inputs, backend=backend)


def test_fallback_to_reference_without_triton(monkeypatch):
    """CPU tensors without TRITON_INTERPRET: the public functions return the reference (simulated here)."""
    monkeypatch.setattr(ln_mod, "triton_can_run", lambda *tensors: False)
    called = []
    for name in ("layer_norm_forward", "add_layer_norm_forward", "layer_norm_backward"):
        monkeypatch.setattr(ln_mod, name, lambda *a, _n=name, **k: called.append(_n))
    x, branch = _x((3, 40)), _x((3, 40))
    weight, bias = _params(40)
    y = kernels.layer_norm(x, weight, bias)
    h, y2 = kernels.add_layer_norm(x, branch, weight, bias)
    (y.sum() + h.sum() + y2.sum()).backward()
    assert not called, f"Triton host functions ran despite the fallback: {called}"
    assert torch.equal(y, ref.layer_norm_reference(x, weight, bias))


@gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("N, C", [(256 * 50, 384), (256 * 50, 768), (256 * 49, 512), (256 * 65, 1280),
                                  (256 * 197, 512)], ids=lambda v: str(v))
def test_add_layer_norm_gpu(N, C, dtype):
    """Real shapes in bf16 / fp16 against the fp32 reference (at most 2x PyTorch's own error), deterministic."""
    x, branch = _x((N, C), dtype, offset=1.0), _x((N, C), dtype)
    weight, bias = _params(C)
    h, y = kernels.add_layer_norm(x, branch, weight, bias)
    dh, dy = torch.randn_like(h), torch.randn_like(y)
    got = torch.autograd.grad((h, y), (x, branch, weight, bias), (dh, dy))
    again = torch.autograd.grad(kernels.add_layer_norm(x, branch, weight, bias), (x, branch, weight, bias),
                                (dh, dy))
    for name, g, a in zip(("dx", "dbranch", "dweight", "dbias"), got, again, strict=True):
        assert torch.equal(g, a), f"{name}: two backward passes differ (non-deterministic)"
    leaves32 = (leaf(x.float()), leaf(branch.float()), weight, bias)
    h32, y32 = ref.add_layer_norm_reference(*leaves32)
    want = torch.autograd.grad((h32, y32), leaves32, (dh.float(), dy.float()))
    torch_y = torch.nn.functional.layer_norm(h, (C,), weight.to(dtype), bias.to(dtype), 1e-6)
    assert_close(h, h32, RTOL[dtype], "h")
    assert_close(y, y32, RTOL[dtype], "y", baseline=torch_y)
    for name, g, w in zip(("dx", "dbranch", "dweight", "dbias"), got, want, strict=True):
        assert_close(g, w, RTOL[dtype], name)
