"""backend="triton" against backend="torch": same loss, predictions and gradients.

On a CPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), in fp32,
so the two paths must agree to 1e-4 relative; on a GPU the same tests run the compiled kernels on the
GPU (fp32), plus a bf16 autocast comparison with a bf16 tolerance.
"""

from __future__ import annotations

import pytest
import torch

import kernels
from model import create_model

pytestmark = pytest.mark.skipif(not kernels.TRITON_AVAILABLE, reason="triton is not installed")

TINY, TINY_MAE = "crossmae_vit_tiny_patch8", "mae_vit_tiny_patch8"
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SMALL = {"depth": 2, "decoder_depth": 2}  # the interpreter is slow: fewer blocks, same code paths


def twin_models(name: str, **overrides):
    ref = create_model(name, backend="torch", **SMALL, **overrides)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    fused = create_model(name, backend="triton", **SMALL, **overrides)
    fused.load_state_dict(ref.state_dict())
    return ref.to(DEVICE), fused.to(DEVICE)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


@pytest.mark.parametrize("name,overrides", [
    (TINY, {}),  # IBA: fused mix + LayerNorms, batched kv projections
    (TINY, {"inter_block": False}),  # one matmul against all blocks' kv weights
    (TINY, {"decoder_self_attn": True, "kept_mask_ratio": 0.5}),
    (TINY_MAE, {}),
])
def test_triton_backend_matches_torch_loss_and_gradients(name, overrides, monkeypatch):
    ref, fused = twin_models(name, **overrides)
    g = torch.Generator().manual_seed(11)
    imgs, noise = torch.randn(2, 3, 64, 64, generator=g).to(DEVICE), torch.rand(2, 64, generator=g).to(DEVICE)
    if DEVICE.type == "cuda":  # fp32 matmuls and convolutions, not TF32, so that 1e-4 is a fair bar
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    out_ref, out_fused = ref(imgs, noise), fused(imgs, noise)
    out_ref.loss.backward()
    out_fused.loss.backward()
    assert abs(out_fused.loss.item() - out_ref.loss.item()) / out_ref.loss.item() < 1e-4
    assert torch.equal(out_fused.pred_ids, out_ref.pred_ids)
    assert rel_err(out_fused.pred, out_ref.pred) < 1e-4
    assert rel_err(out_fused.target, out_ref.target) < 1e-4
    fused_params = dict(fused.named_parameters())
    for k, p in ref.named_parameters():
        assert fused_params[k].grad is not None, k
        assert rel_err(fused_params[k].grad, p.grad) < 1e-4, k


@pytest.mark.parametrize("name", [TINY, TINY_MAE])
def test_triton_backend_gradient_of_the_input_images(name):
    """The images' gradient (through the embedding's patch gather and through the targets, as in the
    reference) matches, and so do the parameters' gradients on this path."""
    ref, fused = twin_models(name)
    g = torch.Generator().manual_seed(5)
    imgs, noise = torch.randn(2, 3, 64, 64, generator=g).to(DEVICE), torch.rand(2, 64, generator=g).to(DEVICE)
    imgs_ref, imgs_fused = imgs.clone().requires_grad_(), imgs.clone().requires_grad_()
    ref(imgs_ref, noise).loss.backward()
    fused(imgs_fused, noise).loss.backward()
    assert imgs_fused.grad is not None
    assert rel_err(imgs_fused.grad, imgs_ref.grad) < 1e-4
    fused_params = dict(fused.named_parameters())
    for k, p in ref.named_parameters():
        assert rel_err(fused_params[k].grad, p.grad) < 1e-4, k


def test_triton_backend_reconstruction_matches_torch():
    ref, fused = twin_models(TINY)
    imgs, noise = torch.randn(2, 3, 64, 64, device=DEVICE), torch.rand(2, 64, device=DEVICE)
    a, b = ref.reconstruct(imgs, noise), fused.reconstruct(imgs, noise)
    for key in a:
        assert rel_err(b[key], a[key]) < 1e-4, key


@pytest.mark.parametrize("name", [TINY, TINY_MAE])
def test_triton_backend_fp16_autocast(name):
    """The low-precision path (fp16 residual stream, weights cast in one multi-tensor copy, fp32 gradients of
    fp32 parameters) under fp16 autocast. Against the fp32 truth, every gradient of the fused path is within
    fp16's tolerance (4e-3 of its largest value) or within twice the error of the reference under the same
    autocast. On a CPU the kernels run in the interpreter, whose fp16 arithmetic is right (its bf16 is not:
    the bf16 test below needs a GPU)."""
    torch.manual_seed(0)
    ref, fused = twin_models(name)
    g = torch.Generator().manual_seed(3)
    imgs, noise = torch.randn(4, 3, 64, 64, generator=g).to(DEVICE), torch.rand(4, 64, generator=g).to(DEVICE)
    truth = ref(imgs, noise)
    truth.loss.backward()
    true_grads = {k: p.grad.clone() for k, p in ref.named_parameters()}
    ref.zero_grad(set_to_none=True)
    outs = []
    for model in (ref, fused):
        with torch.autocast(DEVICE.type, dtype=torch.float16):
            out = model(imgs, noise)
        out.loss.backward()
        outs.append(out)
    assert outs[1].pred.dtype == torch.float16
    assert abs(outs[1].loss.item() - truth.loss.item()) / truth.loss.item() < 4e-3
    fused_params = dict(fused.named_parameters())
    for k, p in ref.named_parameters():
        assert fused_params[k].grad.dtype == p.dtype == torch.float32, k
        true = true_grads[k]
        err, ref_err = (fused_params[k].grad - true).abs().max(), (p.grad - true).abs().max()
        assert err <= max(4e-3 * true.abs().max(), 2 * ref_err), (k, err.item(), ref_err.item())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 kernels need a GPU")
@pytest.mark.parametrize("name", [TINY, TINY_MAE])
def test_triton_backend_bf16_autocast_on_gpu(name):
    """Real shapes' dtype path: bf16 autocast, batch 16; loss and gradients within bf16 tolerance."""
    ref, fused = twin_models(name)
    imgs, noise = torch.randn(16, 3, 64, 64, device=DEVICE), torch.rand(16, 64, device=DEVICE)
    losses = []
    for model in (ref, fused):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(imgs, noise)
        out.loss.backward()
        losses.append(out.loss.float())
    assert abs(losses[1].item() - losses[0].item()) / losses[0].item() < 2e-2
    fused_params = dict(fused.named_parameters())
    for k, p in ref.named_parameters():
        assert rel_err(fused_params[k].grad.float(), p.grad.float()) < 5e-2, k


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", [TINY, TINY_MAE])
def test_training_step_compiles_as_one_graph(name, backend):
    """torch.compile(fullgraph=True) captures forward + loss as one graph (a graph break or a host sync such as
    .item() would raise) on both backends, and its AOT backward gives the eager gradients."""
    torch._dynamo.reset()
    model = create_model(name, backend=backend, depth=1, decoder_depth=1).to(DEVICE)
    imgs, noise = torch.randn(2, 3, 64, 64, device=DEVICE), torch.rand(2, 64, device=DEVICE)
    eager = model(imgs, noise)["loss"]
    eager.backward()
    eager_grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(imgs, noise)["loss"]
    compiled.backward()
    assert torch.allclose(compiled, eager, rtol=1e-5)
    for k, p in model.named_parameters():
        assert p.grad is not None, k
        assert rel_err(p.grad, eager_grads[k]) < 1e-5, k
