"""All kernel ops together: every output element written (NaN-poisoned buffers), custom-op registration
(torch.library.opcheck), torch.compile without graph breaks, and the fallback to the references.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

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
)
from kernels.attention import attention_forward
from kernels.attention_backward import attention_backward
from kernels.feature_mix import feature_mix_backward, feature_mix_forward
from kernels.gather_rows import gather_rows_forward
from kernels.patches import scatter_patches_forward

# The op modules (the package attributes kernels.attention / ... are the functions of the same names)
OP_MODULES = ["attention", "bias_gelu", "feature_mix", "gather_rows", "layer_norm", "mse_loss", "patches"]

pytestmark = requires_kernels



def _small_cases():
    """name -> (function of the inputs, inputs); each function returns a tensor or tuple of tensors."""
    B, L, C, n, p = 2, 10, 40, 4, 4
    q, k, v = attn_inputs(2, 7, 13, 2, 32)
    q2, k2, v2 = attn_inputs(1, 5, 70, 1, 80)
    return {
        "attention": (kernels.attention, (q, k, v)),
        "attention_multiblock": (kernels.attention, (q2, k2, v2)),
        "feature_mix": (kernels.feature_mix_layernorm, mix_inputs(13, 5, 40, 3)),
        "gather_rows": (kernels.gather_rows, (leaf(torch.randn(L, C, device=DEVICE)), distinct_ids(B, L, n))),
        "gather_target_patches": (lambda imgs, ids: kernels.gather_target_patches(imgs, ids, p),
                                  (torch.randn(B, 3, 8, 12, device=DEVICE), distinct_ids(B, 6, n))),
        "gather_patches": (lambda imgs, ids: kernels.gather_patches(imgs, ids, p),
                           (leaf(torch.randn(B, 3, 8, 12, device=DEVICE)), distinct_ids(B, 6, n))),
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
    rows = gather_rows_forward(torch.randn(10, 40, device=DEVICE), ids,
                               out=torch.full((2, 4, 40), float("nan"), device=DEVICE))
    assert not torch.isnan(rows).any()


def _opcheck_cases():
    q, k, v = (t.detach() for t in attn_inputs(1, 5, 9, 2, 16))
    out, lse = attention_forward(q, k, v, 0.25)
    feats, weight, gamma, beta = (t.detach() for t in mix_inputs(3, 4, 40, 2))
    mixed, mean, rstd = feature_mix_forward(feats, weight, gamma, beta, 1e-6)
    ids = distinct_ids(2, 6, 3)
    table = torch.randn(6, 16, device=DEVICE)
    imgs = torch.randn(2, 3, 8, 12, device=DEVICE)
    patches = torch.randn(2, 3, 48, device=DEVICE)
    _, inv = scatter_patches_forward(patches, ids, 8, 12, 4, None)
    ops = torch.ops.crossmae
    return {
        "attention_fwd": (ops.attention_fwd, (leaf(q), leaf(k), leaf(v), 0.25)),
        "attention_bwd": (ops.attention_bwd, (torch.randn_like(out), q, k, v, out, lse, 0.25)),
        "feature_mix_fwd": (ops.feature_mix_fwd, (leaf(feats), leaf(weight), leaf(gamma), leaf(beta), 1e-6)),
        "feature_mix_bwd": (ops.feature_mix_bwd, (torch.randn_like(mixed), feats, weight, gamma, mean, rstd)),
        "gather_rows_fwd": (ops.gather_rows_fwd, (leaf(table), ids)),
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
        tokens = torch.gather(x, 1, ids[..., None].expand(-1, -1, C)) + kernels.gather_rows(pos, ids)  # (B, n, C)
        mixed = kernels.feature_mix_layernorm(feats, weight, gamma, beta)  # (2, B*n, C)
        queries = kernels.gather_rows(table, pred_ids).view(B, n, H, d)
        keys = mixed[0].view(B, n, H, d)
        attn = kernels.attention(queries, keys, mixed[1].view(B, n, H, d) + tokens.view(B, n, H, d))
        target, _, _ = kernels.gather_target_patches(imgs, pred_ids, p)
        pred = attn.reshape(B, n, C).repeat(1, 1, 2)[..., : p * p * 3]
        recon = kernels.scatter_patches(pred, pred_ids, (8, 12), p, base=imgs)
        return ((pred - target) ** 2).mean() + recon.square().mean()

    ids, pred_ids = distinct_ids(B, L, n), distinct_ids(B, L, n)
    inputs = [leaf(torch.randn(B, L, C, device=DEVICE)), leaf(torch.randn(L, C, device=DEVICE)), ids, pred_ids,
              *mix_inputs(4, B * n, C, 2), torch.randn(B, 3, 8, 12, device=DEVICE),
              leaf(torch.randn(L, C, device=DEVICE))]
    leaves = [t for t in inputs if t.requires_grad]
    assert_compiled_matches_eager(step, inputs, leaves, backend=backend)


def test_fallback_to_reference_without_triton(monkeypatch):
    """CPU tensors without TRITON_INTERPRET: the public ops return the reference (simulated here)."""
    modules = [importlib.import_module(f"kernels.{name}") for name in OP_MODULES]
    for mod in modules:
        monkeypatch.setattr(mod, "triton_can_run", lambda *tensors: False)
    called = []
    for mod in modules:
        for name in dir(mod):
            if name.endswith("_forward"):
                monkeypatch.setattr(mod, name, lambda *a, _n=name, **k: called.append(_n))
    for fn, inputs in _small_cases().values():
        _run_case(fn, inputs)
    assert not called, f"Triton host functions ran despite the fallback: {called}"


# Run in a fresh interpreter where `import triton` (and triton.language) raises ImportError.
_WITHOUT_TRITON = r"""
import importlib, pkgutil, sys
sys.modules["triton"] = None
import pytest, torch
import kernels
from kernels import reference as ref

assert not kernels.TRITON_AVAILABLE and not kernels.INTERPRET and not kernels.triton_can_run(torch.zeros(1))
for info in pkgutil.iter_modules(kernels.__path__):  # every kernel module imports, present and future
    importlib.import_module(f"kernels.{info.name}")
torch.manual_seed(0)
q, k, v = torch.randn(2, 5, 2, 16), torch.randn(2, 7, 2, 16), torch.randn(2, 7, 2, 16)
qkv, kv = torch.randn(2, 5, 3, 2, 16), torch.randn(2, 7, 2, 2, 16)
feats, mix_w, gamma, beta = torch.randn(3, 10, 40), torch.randn(2, 3), torch.randn(2, 40), torch.randn(2, 40)
x, branch, w, b = torch.randn(4, 40), torch.randn(4, 40), torch.randn(40), torch.randn(40)
table, ids = torch.randn(6, 40), torch.stack([torch.randperm(6)[:4] for _ in range(2)])
imgs, patches = torch.randn(2, 3, 8, 12), torch.randn(2, 4, 48)
cases = {
    "attention": (q, k, v), "self_attention": (qkv,), "cross_attention": (q, kv),
    "feature_mix_layernorm": (feats, mix_w, gamma, beta), "layer_norm": (x, w, b), "add_layer_norm": (x, branch, w, b),
    "bias_gelu": (x, b), "mse_loss": (x, branch), "gather_rows": (table, ids), "gather_target_patches": (imgs, ids, 4),
    "gather_patches": (imgs, ids, 4), "scatter_patches": (patches, ids, (8, 12), 4),
}
for name, args in cases.items():
    got, want = getattr(kernels, name)(*args), getattr(ref, f"{name}_reference")(*args)
    got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
    assert all(torch.equal(g, e) for g, e in zip(got, want, strict=True)), name
with pytest.raises(ValueError, match="same shape"):
    kernels.mse_loss(x, branch[:, :39])
with pytest.raises(ValueError, match="detach"):
    kernels.mse_loss(x, branch.clone().requires_grad_())
with pytest.raises(ValueError, match="empty"):
    kernels.mse_loss(x[:0], branch[:0])
with pytest.raises(TypeError, match="float64"):
    kernels.mse_loss(x.double(), branch)
for raw_op, args in ((kernels.bias_gelu_fwd, (x, b)), (kernels.bias_gelu_bwd, (x, x, b)),
                     (torch.ops.crossmae.attention_fwd, (q, k, v, 0.25))):
    with pytest.raises(RuntimeError, match="triton is not installed"):
        raw_op(*args)
print("ok")
"""


def test_without_triton_installed():
    """`import kernels` works where triton is missing; every public op is its reference (same checks), the raw
    ops raise a clear error."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run([sys.executable, "-c", _WITHOUT_TRITON], cwd=root, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
