"""All kernel ops together: every output element written (NaN-poisoned buffers), custom-op registration
(torch.library.opcheck), torch.compile without graph breaks, and the fallback to the references.
"""

from __future__ import annotations

import importlib
import shutil

import pytest
import torch

import kernels
from kernel_helpers import (
    CUDA,
    DEVICE,
    assert_compiled_matches_eager,
    attn_inputs,
    distinct_ids,
    leaf,
    mix_inputs,
    nan_filled,
    requires_kernels,
    reseed,
)
from kernels import gather as gather_mod
from kernels.attention import attention_backward, attention_forward
from kernels.feature_mix import feature_mix_backward, feature_mix_forward

pytestmark = requires_kernels


@pytest.fixture(autouse=True)
def seed():
    return reseed()


def _small_cases():
    """name -> (function of the inputs, inputs); each function returns a tensor or tuple of tensors."""
    B, L, C, n, p = 2, 10, 40, 4, 4
    q, k, v = attn_inputs(2, 7, 13, 2, 32)
    q2, k2, v2 = attn_inputs(1, 5, 70, 1, 80)
    return {
        "attention": (kernels.attention, (q, k, v)),
        "attention_multiblock": (kernels.attention, (q2, k2, v2)),
        "feature_mix": (kernels.feature_mix_layernorm, mix_inputs(13, 5, 40, 3)),
        "gather_visible": (kernels.gather_visible,
                           (leaf(torch.randn(B, L, C, device=DEVICE)), leaf(torch.randn(L, C, device=DEVICE)),
                            distinct_ids(B, L, n))),
        "gather_rows": (kernels.gather_rows, (leaf(torch.randn(L, C, device=DEVICE)), distinct_ids(B, L, n))),
        "gather_target_patches": (lambda imgs, ids: kernels.gather_target_patches(imgs, ids, p),
                                  (torch.randn(B, 3, 8, 12, device=DEVICE), distinct_ids(B, 6, n))),
        "scatter_patches": (lambda pt, ids, base: kernels.scatter_patches(pt, ids, (8, 12), p, base),
                            (leaf(torch.randn(B, n, p * p * 3, device=DEVICE)), distinct_ids(B, 6, n),
                             leaf(torch.randn(B, 3, 8, 12, device=DEVICE)))),
    }


def _run_case(fn, inputs):
    """Outputs and, for differentiable outputs, the gradients of all inputs that require grad."""
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    if leaves and outs[0].requires_grad:
        torch.manual_seed(1234)
        dout = torch.randn_like(outs[0])
        return (*outs, *torch.autograd.grad(outs[0], leaves, dout))
    return outs


@pytest.mark.parametrize("case", list(_small_cases()))
def test_every_output_element_is_written(case, monkeypatch):
    """torch.empty / empty_like hand the kernels NaN-filled buffers (and -7777 for ints): none may survive."""
    fn, inputs = _small_cases()[case]
    clean = _run_case(fn, inputs)
    monkeypatch.setattr(torch, "empty", nan_filled(torch.empty))
    monkeypatch.setattr(torch, "empty_like", nan_filled(torch.empty_like))
    poisoned = _run_case(fn, inputs)
    monkeypatch.undo()
    for i, (a, b) in enumerate(zip(poisoned, clean, strict=True)):
        assert not torch.isnan(a).any(), f"output {i} has unwritten (NaN) elements"
        assert torch.equal(a, b), f"output {i} differs when its buffers start as NaN"


def test_explicit_out_buffers_fully_written():
    q, k, v = (t.detach() for t in attn_inputs(2, 7, 13, 2, 32))
    out = torch.full_like(q, float("nan"))
    out, lse = attention_forward(q, k, v, 0.2, out=out)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    bufs = tuple(torch.full_like(t, float("nan")) for t in (q, k, v))
    dq, dk, dv = attention_backward(torch.randn_like(out), q, k, v, out, lse, 0.2, grads=bufs)
    assert not any(torch.isnan(t).any() for t in (dq, dk, dv))
    feats, weight, gamma, beta = (t.detach() for t in mix_inputs(3, 5, 40, 2))
    mixed = torch.full((2, 5, 40), float("nan"), device=DEVICE)
    mixed, mean, rstd = feature_mix_forward(feats, weight, gamma, beta, 1e-6, out=mixed)
    dfeats = feature_mix_backward(torch.randn_like(mixed), feats, weight, gamma, mean, rstd,
                                  dfeats=torch.full_like(feats, float("nan")))[0]
    assert not torch.isnan(mixed).any() and not torch.isnan(dfeats).any()
    ids = distinct_ids(2, 10, 4)
    rows = gather_mod.gather_rows_forward(None, torch.randn(10, 40, device=DEVICE), ids,
                                          out=torch.full((2, 4, 40), float("nan"), device=DEVICE))
    assert not torch.isnan(rows).any()


def _opcheck_cases():
    q, k, v = (t.detach() for t in attn_inputs(1, 5, 9, 2, 16))
    out, lse = attention_forward(q, k, v, 0.25)
    feats, weight, gamma, beta = (t.detach() for t in mix_inputs(3, 4, 40, 2))
    mixed, mean, rstd = feature_mix_forward(feats, weight, gamma, beta, 1e-6)
    ids = distinct_ids(2, 6, 3)
    x, table = torch.randn(2, 6, 16, device=DEVICE), torch.randn(6, 16, device=DEVICE)
    imgs = torch.randn(2, 3, 8, 12, device=DEVICE)
    patches = torch.randn(2, 3, 48, device=DEVICE)
    _, inv = gather_mod.scatter_patches_forward(patches, ids, 8, 12, 4, None)
    ops = torch.ops.crossmae
    return {
        "attention_fwd": (ops.attention_fwd, (leaf(q), leaf(k), leaf(v), 0.25)),
        "attention_bwd": (ops.attention_bwd, (torch.randn_like(out), q, k, v, out, lse, 0.25)),
        "feature_mix_fwd": (ops.feature_mix_fwd, (leaf(feats), leaf(weight), leaf(gamma), leaf(beta), 1e-6)),
        "feature_mix_bwd": (ops.feature_mix_bwd, (torch.randn_like(mixed), feats, weight, gamma, mean, rstd)),
        "gather_rows_fwd": (ops.gather_rows_fwd, (leaf(x), leaf(table), ids)),
        "gather_rows_fwd_table_only": (ops.gather_rows_fwd, (None, leaf(table), ids)),
        "gather_rows_bwd_x": (ops.gather_rows_bwd_x, (torch.randn(2, 3, 16, device=DEVICE), ids, 6)),
        "gather_rows_bwd_table": (ops.gather_rows_bwd_table, (torch.randn(2, 3, 16, device=DEVICE), ids, table)),
        "gather_target_patches": (ops.gather_target_patches, (imgs, ids, 4, True, 1e-6)),
        "scatter_patches_fwd": (ops.scatter_patches_fwd, (leaf(patches), ids, 8, 12, 4, leaf(imgs))),
        "scatter_patches_bwd": (ops.scatter_patches_bwd, (torch.randn_like(imgs), ids, inv, 4, True, True)),
    }


@pytest.mark.parametrize("case", list(_opcheck_cases()))
def test_custom_op_registration(case):
    """torch.library.opcheck: schema, fake-tensor kernel, autograd registration, AOT dispatch."""
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


# Inductor on the CPU compiles C++ (about 15 s here): run it when a compiler is there.
COMPILE_BACKENDS = ["aot_eager", "inductor"] if CUDA or shutil.which("g++") or shutil.which("c++") else ["aot_eager"]


@pytest.mark.parametrize("backend", COMPILE_BACKENDS)
def test_ops_under_torch_compile(backend):
    """All ops in one fullgraph-compiled function (no graph break), forward and backward, equal to eager."""
    B, L, C, p, n = 2, 6, 32, 4, 3
    H, d = 2, 16  # C = H * d

    def step(x, pos, ids, pred_ids, feats, weight, gamma, beta, imgs, table):
        tokens = kernels.gather_visible(x, pos, ids)  # (B, n, C)
        mixed = kernels.feature_mix_layernorm(feats, weight, gamma, beta)  # (2, B*n, C)
        queries = kernels.gather_rows(table, pred_ids).view(B, n, H, d)
        keys = mixed[0].view(B, n, H, d)
        attn = kernels.attention(queries, keys, mixed[1].view(B, n, H, d) + tokens.view(B, n, H, d))
        target, _, _ = kernels.gather_target_patches(imgs, pred_ids, p)
        pred = attn.reshape(B, n, C).repeat(1, 1, 2)[..., : p * p * 3]
        recon = kernels.scatter_patches(pred, pred_ids, (8, 12), p, base=imgs)
        return ((pred - target) ** 2).mean() + recon.square().mean()

    ids, pred_ids = distinct_ids(B, L, n), distinct_ids(B, L, n)
    inputs = [leaf(torch.randn(B, L, C, device=DEVICE)), torch.randn(L, C, device=DEVICE), ids, pred_ids,
              *mix_inputs(4, B * n, C, 2), torch.randn(B, 3, 8, 12, device=DEVICE),
              leaf(torch.randn(L, C, device=DEVICE))]
    leaves = [t for t in inputs if t.requires_grad]
    assert_compiled_matches_eager(step, inputs, leaves, backend=backend)


def test_fallback_to_reference_without_triton(monkeypatch):
    """CPU tensors without TRITON_INTERPRET: the public ops return the reference (simulated here)."""
    # (the package attributes kernels.attention / ... are the functions; the modules live in sys.modules)
    attention_mod = importlib.import_module("kernels.attention")
    mix_mod = importlib.import_module("kernels.feature_mix")

    for mod in (attention_mod, mix_mod, gather_mod):
        monkeypatch.setattr(mod, "triton_can_run", lambda *tensors: False)
    called = []
    for mod in (attention_mod, mix_mod, gather_mod):
        for name in dir(mod):
            if name.endswith("_forward"):
                monkeypatch.setattr(mod, name, lambda *a, _n=name, **k: called.append(_n))
    for fn, inputs in _small_cases().values():
        _run_case(fn, inputs)
    assert not called, f"Triton host functions ran despite the fallback: {called}"
