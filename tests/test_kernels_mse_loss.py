"""kernels.mse_loss against autograd of the reference: the loss and dpred; mixed dtypes, strided inputs, splits
of the partial sums, custom-op registration, torch.compile, the fallback, and a GPU check at CrossMAE's shapes.
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
    gpu,
    leaf,
    nan_filled,
    requires_kernels,
)
from kernels import _runtime
from kernels import reference as ref
from kernels.mse_loss import mse_loss_backward, mse_loss_forward

pytestmark = requires_kernels



SHAPES = [
    (1, 40),
    (7, 96),
    (3, 5, 200),
    (3, 5, 600),  # 9000 elements: three 4096-blocks, the last one masked
    (1,),
]


def _inputs(shape, pred_dtype=torch.float32, target_dtype=torch.float32):
    pred = torch.randn(shape, device=DEVICE).to(pred_dtype).requires_grad_()
    target = torch.randn(shape, device=DEVICE).to(target_dtype)
    return pred, target


def _check(pred, target, rtol, leaf_pred=None):
    """loss and dpred against the reference. dpred is O(1 / numel): compared after scaling by numel / 2."""
    leaf_pred = pred if leaf_pred is None else leaf_pred
    loss = kernels.mse_loss(pred, target)
    assert loss.shape == () and loss.dtype == torch.float32
    grad = 3 * torch.rand((), device=DEVICE) - 1  # an arbitrary incoming gradient, read from device memory
    (got,) = torch.autograd.grad(loss, leaf_pred, grad)
    expected = ref.mse_loss_reference(pred, target)
    (want,) = torch.autograd.grad(expected, leaf_pred, grad)
    assert got.dtype == leaf_pred.dtype and got.shape == leaf_pred.shape
    assert_close(loss, expected, rtol, "loss")
    half_numel = pred.numel() / 2
    assert_close(got.float() * half_numel, want.float() * half_numel, rtol, "dpred * numel / 2")


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_mse_loss_matches_reference(shape):
    _check(*_inputs(shape), RTOL[torch.float32])


@pytest.mark.parametrize("dtypes", [(torch.float16, torch.float32), (torch.float32, torch.float16),
                                    (torch.float16, torch.float16)],
                         ids=["fp16 pred fp32 target", "fp32 pred fp16 target", "fp16 both"])
def test_mse_loss_mixed_dtypes(dtypes):
    _check(*_inputs((3, 7, 48), *dtypes), RTOL[torch.float16])


def test_mse_loss_strided_inputs():
    """Non-contiguous pred (a transposed view) and target (a slice): copied once, gradient to the base."""
    base = torch.randn(48, 2, 5, device=DEVICE, requires_grad=True)
    pred = base.transpose(0, 2)  # (5, 2, 48)
    target = torch.randn(5, 2, 60, device=DEVICE)[..., 6:54]
    _check(pred, target, 1e-4, leaf_pred=base)


@pytest.mark.parametrize("programs", [1, 2, 3, 5])
def test_mse_loss_partial_sums(programs):
    """Any number of per-program partial sums adds up to the reference (5 > the 3 blocks there are)."""
    pred, target = (t.detach() for t in _inputs((3, 5, 600)))
    got = mse_loss_forward(pred, target, programs=programs)
    assert_close(got, ref.mse_loss_reference(pred, target), 1e-4, "loss")


def test_mse_loss_is_deterministic():
    pred, target = (t.detach() for t in _inputs((3, 5, 600)))
    assert torch.equal(kernels.mse_loss(pred, target), kernels.mse_loss(pred, target))


def test_every_output_element_is_written(monkeypatch):
    """NaN-filled torch.empty buffers (loss, partials, dpred) never leak into the results."""
    pred, target = (t.detach() for t in _inputs((3, 5, 600)))
    grad = torch.tensor(0.5, device=DEVICE)
    clean = (mse_loss_forward(pred, target, programs=2), mse_loss_backward(grad, pred, target))
    monkeypatch.setattr(torch, "empty", nan_filled(torch.empty))
    poisoned = (mse_loss_forward(pred, target, programs=2), mse_loss_backward(grad, pred, target))
    monkeypatch.undo()
    for name, a, b in zip(("loss", "dpred"), poisoned, clean, strict=True):
        assert torch.equal(a, b), f"{name} differs when its buffers start as NaN"


def test_custom_op_registration():
    """torch.library.opcheck: schema, fake-tensor kernel, autograd registration, AOT dispatch."""
    pred, target = (t.detach() for t in _inputs((3, 40), torch.float16))
    torch.library.opcheck(torch.ops.crossmae.mse_loss_fwd, (leaf(pred), target))
    torch.library.opcheck(torch.ops.crossmae.mse_loss_bwd, (torch.tensor(0.7, device=DEVICE), pred, target))


def test_under_torch_compile():
    """A linear head and the loss in one fullgraph-compiled function, forward and backward, equal to eager."""

    def step(x, w, target):
        return kernels.mse_loss(x @ w, target) * 2

    x = torch.randn(2, 5, 16, device=DEVICE, requires_grad=True)
    w = torch.randn(16, 48, device=DEVICE, requires_grad=True)
    target = torch.randn(2, 5, 48, device=DEVICE)
    eager = step(x, w, target)
    eager_grads = torch.autograd.grad(eager, (x, w))
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)(x, w, target)
    compiled_grads = torch.autograd.grad(compiled, (x, w))
    assert_close(compiled, eager, 1e-5, "loss")
    for i, (g, e) in enumerate(zip(compiled_grads, eager_grads, strict=True)):
        assert_close(g, e, 1e-5, f"grad {i}")


def test_rejects_bad_inputs():
    pred, target = _inputs((3, 40))
    with pytest.raises(ValueError, match="detach"):
        kernels.mse_loss(pred, target.requires_grad_())
    with pytest.raises(ValueError, match="same shape"):
        kernels.mse_loss(pred, target.detach()[:, :39])
    with pytest.raises(ValueError, match="empty"):
        kernels.mse_loss(pred[:0], target.detach()[:0])
    with pytest.raises(TypeError, match="float64"):
        kernels.mse_loss(pred.double(), target.detach())


def test_fallback_without_triton(monkeypatch):
    """CPU tensors without TRITON_INTERPRET (simulated): mse_loss is the reference, the raw ops raise."""
    monkeypatch.setattr(_runtime, "INTERPRET", False)
    pred, target = torch.randn(3, 40), torch.randn(3, 40)
    assert torch.equal(kernels.mse_loss(pred, target), ref.mse_loss_reference(pred, target))
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        torch.ops.crossmae.mse_loss_fwd(pred, target)


@gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(256, 49, 768), (256, 147, 768), (256, 196, 768), (256, 64, 588)],
                         ids=lambda s: "B{}-n{}-P{}".format(*s))
def test_mse_loss_gpu(shape, dtype):
    """bf16 / fp16 pred, fp32 target at CrossMAE's loss shapes; no host synchronisation forward or backward."""
    assert CUDA
    pred, target = _inputs(shape, dtype)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = kernels.mse_loss(pred, target)
        (got,) = torch.autograd.grad(loss, pred)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    expected = ref.mse_loss_reference(pred, target)
    (want,) = torch.autograd.grad(expected, pred)
    # the loss is an fp32 sum of exactly representable terms: fp32 tolerance whatever pred's dtype
    assert_close(loss, expected, RTOL[torch.float32], "loss")
    half_numel = pred.numel() / 2
    assert_close(got.float() * half_numel, want.float() * half_numel, RTOL[dtype], "dpred * numel / 2")
