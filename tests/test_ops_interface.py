"""The declared seam of model/ops.py: both op sets implement every operation of ``ModelOps`` themselves, and the
per-op switch (``ops_for("triton", reference_ops=...)``) runs exactly the named operations on the reference."""

from __future__ import annotations

import inspect

import pytest
import torch

import kernels
from model import create_model
from model.ops import OP_NAMES, FusedOps, ModelOps, ReferenceOps, ops_for

OP_SETS = [ReferenceOps, FusedOps]


def test_the_interface_declares_the_operations_the_models_call():
    assert set(OP_NAMES) == {
        "with_compute_weights", "stream", "add_layer_norm", "add", "self_attention", "cross_attention", "mlp",
        "embed_patches", "gather_rows", "mixed_kv", "shared_kv", "target_patches", "mse_loss", "paste_patches"}
    assert set(OP_NAMES) == ModelOps.__abstractmethods__


@pytest.mark.parametrize("cls", OP_SETS, ids=lambda c: c.__name__)
def test_each_op_set_defines_every_operation_itself(cls):
    """Not inherited from the other set (a fused method forgotten would silently run the reference) nor from the
    interface (whose methods are abstract): defined in the class's own body, with the interface's parameters."""
    assert cls.__mro__[1:] == ModelOps.__mro__, f"{cls.__name__} must derive from ModelOps alone"
    missing = [name for name in OP_NAMES if name not in vars(cls)]
    assert not missing, f"{cls.__name__} does not define {missing}"
    for name in OP_NAMES:
        declared = list(inspect.signature(getattr(ModelOps, name)).parameters)
        assert list(inspect.signature(getattr(cls, name)).parameters) == declared, f"{cls.__name__}.{name}"
    undeclared = [name for name, member in vars(cls).items()
                  if callable(member) and not name.startswith("_") and name not in OP_NAMES]
    assert not undeclared, f"{cls.__name__} has operations the interface does not declare: {undeclared}"
    cls()  # every abstract method implemented


def test_an_op_set_missing_an_operation_cannot_be_built():
    members = {name: getattr(FusedOps, name) for name in OP_NAMES if name != "mlp"}
    incomplete = type("Incomplete", (ModelOps,), members)
    with pytest.raises(TypeError, match="mlp"):
        incomplete()


def test_ops_for_and_the_per_op_switch():
    assert ops_for("torch") is ops_for("torch", {"mlp"})  # every operation is the reference's already
    assert ops_for("triton") is ops_for("triton")
    assert ops_for("triton").reference_ops == frozenset()
    assert ReferenceOps.reference_ops == frozenset(OP_NAMES)
    for op in OP_NAMES:
        mixed = ops_for("triton", [op])
        assert isinstance(mixed, FusedOps) and mixed.reference_ops == {op}
        for name in OP_NAMES:
            expected = ReferenceOps if name == op else FusedOps
            assert getattr(mixed, name).__func__ is vars(expected)[name], (op, name)
    with pytest.raises(ValueError, match=r"'attention'.*mlp"):
        ops_for("triton", {"attention"})
    with pytest.raises(ValueError, match="not the string"):
        ops_for("triton", "mlp")


@pytest.mark.parametrize("name", ["crossmae_vit_tiny_patch8", "mae_vit_tiny_patch8"])
def test_every_module_of_a_model_shares_its_ops(name):
    m = create_model(name, backend="triton", reference_ops={"mlp"}, depth=1, decoder_depth=1)
    holders = [module for module in m.modules() if hasattr(module, "ops")]
    assert len(holders) > 5 and all(module.ops is m.ops for module in holders)
    assert m.ops.reference_ops == {"mlp"}


# -- a model with one operation switched to the reference -----------------------------------------------------

def _run(model, imgs, noise):
    out = model(imgs, noise)
    out.loss.backward()
    return out, {k: p.grad for k, p in model.named_parameters()}


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


@pytest.mark.skipif(not (kernels.TRITON_AVAILABLE and (kernels.INTERPRET or torch.cuda.is_available())),
                    reason="the fused kernels need triton and a GPU or TRITON_INTERPRET=1")
@pytest.mark.parametrize("op", ["mlp"])  # every op's switch: test_ops_for_and_the_per_op_switch
def test_a_model_with_one_op_on_the_reference_matches_both_paths_in_fp32(op, monkeypatch):
    """The switched operation runs the reference implementation (its fused one is made to fail), every other one
    stays fused, and loss, predictions and every gradient match both full paths (1e-4, as the fused path's)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    size = {"depth": 1, "decoder_depth": 1, "inter_block": False}  # no IBA: its mix kernel is the interpreter's slowest

    def build(backend, reference_ops=()):
        m = create_model("crossmae_vit_tiny_patch8", backend=backend, reference_ops=reference_ops, **size)
        m.load_state_dict(weights)
        return m.to(device)

    base = create_model("crossmae_vit_tiny_patch8", **size)
    g = torch.Generator().manual_seed(13)
    with torch.no_grad():
        for p in base.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)  # generic values: no bias or norm hides at 0 / 1
    weights = base.state_dict()
    imgs, noise = torch.randn(2, 3, 64, 64, generator=g).to(device), torch.rand(2, 64, generator=g).to(device)
    full_paths = {backend: _run(build(backend), imgs, noise) for backend in ("torch", "triton")}

    calls = []
    reference_impl = vars(ReferenceOps)[op]

    def counted(self, *args):
        calls.append(op)
        return reference_impl(self, *args)

    def must_not_run(self, *args):
        raise AssertionError(f"the fused {op} ran although it was switched to the reference")

    monkeypatch.setattr(ReferenceOps, op, counted)
    monkeypatch.setattr(FusedOps, op, must_not_run)
    out, grads = _run(build("triton", {op}), imgs, noise)
    assert calls, f"the model never called {op}"
    for backend, (full_out, full_grads) in full_paths.items():
        assert abs(out.loss.item() - full_out.loss.item()) / full_out.loss.item() < 1e-4, backend
        assert torch.equal(out.pred_ids, full_out.pred_ids)
        assert _rel_err(out.pred, full_out.pred) < 1e-4, backend
        for k, grad in full_grads.items():
            assert grads[k] is not None, (backend, k)
            assert _rel_err(grads[k], grad) < 1e-4, (backend, k)
