"""kernels.feature_mix_layernorm against its reference: output and the gradients of features, W, gamma, beta.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernel_helpers import (
    DEVICE,
    GPU_DTYPES,
    RTOL,
    assert_close,
    gpu,
    grads,
    leaf,
    max_err,
    mix_inputs,
    requires_kernels,
)
from kernels import reference as ref
from kernels.feature_mix import feature_mix_backward, feature_mix_forward

pytestmark = requires_kernels



MIX_SHAPES = [
    (3, 5, 40, 2),  # tiny, C not a power of two (three 16-channel chunks)
    (4, 3, 60, 3),  # one masked 64-channel chunk (the whole-row path)
    (6, 11, 273, 5),  # odd C over nine 32-channel chunks, the last one partial; N not a multiple of 8 rows
    (13, 6, 96, 12),  # ViT-B structure (13 maps into 12 blocks) at a small width
    (33, 3, 80, 17),  # ViT-H's 33 maps (two k chunks), depth > 16 (two decoder-block tiles)
    (13, 2, 768, 12),  # ViT-B's width
]


def _check_mix(feats, weight, gamma, beta, rtol=1e-4, leaves=None):
    out = kernels.feature_mix_layernorm(feats, weight, gamma, beta)
    J, C = gamma.shape
    assert out.is_contiguous() and out.shape == (J, feats.shape[1], C) and out.dtype == feats.dtype
    dout = torch.randn_like(out)
    leaves = leaves or (feats, weight, gamma, beta)
    got = grads(out, leaves, dout)
    expected = ref.feature_mix_layernorm_reference(feats, weight, gamma, beta)
    want = grads(expected, leaves, dout)
    assert_close(out, expected, rtol, "out")
    for name, g, w in zip(("dfeats", "dweight", "dln_weight", "dln_bias"), got, want, strict=True):
        assert g.dtype == w.dtype, name
        assert_close(g, w, rtol, name)


@pytest.mark.parametrize("shape", MIX_SHAPES, ids=lambda s: "k{}-N{}-C{}-depth{}".format(*s))
def test_feature_mix_matches_reference(shape):
    _check_mix(*mix_inputs(*shape))


def test_feature_mix_fp16_features():
    _check_mix(*mix_inputs(5, 4, 48, 3, dtype=torch.float16), rtol=RTOL[torch.float16])


def test_feature_mix_strided_features():
    """feats as a (k, N, C) view of an (N, k, C) stack, i.e. neither k nor N outermost-contiguous."""
    K, N, C, J = 4, 6, 40, 3
    stack = torch.randn(N, K, C, device=DEVICE, requires_grad=True)
    _, weight, gamma, beta = mix_inputs(K, N, C, J)
    _check_mix(stack.transpose(0, 1), weight, gamma, beta, leaves=(stack, weight, gamma, beta))


@pytest.mark.parametrize("row_groups", [1, 2, 3])
def test_feature_mix_backward_partial_sums(row_groups):
    """The per-program partial sums of dW / dgamma / dbeta add up for any split of the rows (groups of 40, 24
    and 16 rows for N = 37: whole and partial 8-row blocks)."""
    feats, weight, gamma, beta = (t.detach() for t in mix_inputs(5, 37, 40, 3))
    out, mean, rstd = feature_mix_forward(feats, weight, gamma, beta, 1e-6)
    dout = torch.randn_like(out)
    got = feature_mix_backward(dout, feats, weight, gamma, mean, rstd, row_groups=row_groups)
    leaves = tuple(leaf(t) for t in (feats, weight, gamma, beta))
    want = grads(ref.feature_mix_layernorm_reference(*leaves), leaves, dout)
    for name, g, w in zip(("dfeats", "dweight", "dln_weight", "dln_bias"), got, want, strict=True):
        assert_close(g, w, 1e-4, name)


def test_feature_mix_chunked_variance_with_large_mean():
    """Rows whose mean (30) dwarfs their spread (0.07): the chunk-by-chunk variance merge stays as exact as a
    two-pass one (E[y^2] - E[y]^2 in fp32 would be ~4% off here). The problem is ill-conditioned in fp32 itself
    (dW sums products of ~30 that cancel), so the truth is an fp64 evaluation and the bound is twice the fp32
    reference's own error, taken as the larger over two equally valid summation orders of the k maps.
    Seeded: the global RNG would otherwise carry whatever earlier tests left. Over seeds 0-15 the kernel's
    dweight error was 0.07-0.84 of this bound except seed 6 (1.07): an ill-conditioned quantity, which is
    why the bound is relative to fp32's own error at all."""
    torch.manual_seed(0)
    feats, weight, gamma, beta = mix_inputs(3, 4, 273, 2)
    with torch.no_grad():
        weight.copy_(torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]]))
    shifted = feats.detach() * 0.1 + 30.0

    def run(fn, dtype):
        leaves = [leaf(t.detach().to(dtype)) for t in (shifted, weight, gamma, beta)]
        out = fn(*leaves)
        dout = torch.linspace(-1, 1, out.numel(), dtype=dtype, device=DEVICE).view_as(out)
        return (out, *grads(out, leaves, dout))

    def fp64_truth(f, w, g, b):
        mixed = torch.einsum("jk,knc->jnc", w, f)
        return F.layer_norm(mixed, (mixed.shape[-1],), eps=1e-6) * g[:, None] + b[:, None]

    perm = torch.tensor([2, 0, 1], device=DEVICE)

    def reference_other_order(f, w, g, b):  # the same function, the k maps summed in another order
        return ref.feature_mix_layernorm_reference(f[perm], w[:, perm], g, b)

    truth = run(fp64_truth, torch.float64)
    got = run(kernels.feature_mix_layernorm, torch.float32)
    baselines = zip(run(ref.feature_mix_layernorm_reference, torch.float32), run(reference_other_order, torch.float32),
                    strict=True)
    for name, g, t, (r1, r2) in zip(("out", "dfeats", "dweight", "dln_weight", "dln_bias"), got, truth, baselines,
                                    strict=True):
        worse = r1 if max_err(r1, t) >= max_err(r2, t) else r2
        assert_close(g, t, 1e-5, name, baseline=worse)


def test_feature_mix_rejects_bad_inputs():
    feats, weight, gamma, beta = mix_inputs(3, 4, 40, 2)
    with pytest.raises(ValueError, match="weight"):
        kernels.feature_mix_layernorm(feats, weight[:, :2], gamma, beta)
    with pytest.raises(ValueError, match="ln_bias"):
        kernels.feature_mix_layernorm(feats, weight, gamma, beta[:, :8])
    with pytest.raises(ValueError, match=r"\(k, N, C\)"):
        kernels.feature_mix_layernorm(feats[0], weight, gamma, beta)



@gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(13, 8 * 50, 768, 12), (25, 4 * 50, 1024, 12), (33, 2 * 65, 1280, 12)],
                         ids=lambda s: "k{}-N{}-C{}-depth{}".format(*s))
def test_feature_mix_gpu(shape, dtype):
    feats, weight, gamma, beta = mix_inputs(*shape, dtype=dtype)
    out = kernels.feature_mix_layernorm(feats, weight, gamma, beta)
    dout = torch.randn_like(out)
    got = grads(out, (feats, weight, gamma, beta), dout)
    leaves32 = (leaf(feats.float()), weight, gamma, beta)
    expected = ref.feature_mix_layernorm_reference(*leaves32)
    want = grads(expected, leaves32, dout.float())
    assert_close(out, expected, RTOL[dtype], "out")
    for name, g, w in zip(("dfeats", "dweight", "dln_weight", "dln_bias"), got, want, strict=True):
        assert_close(g, w, RTOL[dtype], name)
