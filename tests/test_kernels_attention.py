"""kernels.attention against kernels.reference.attention_reference: output and dq / dk / dv, odd shapes,
strided views, fp16 under the interpreter; on a GPU fp16 / bf16 at CrossMAE's shapes and flash-attn / xformers.
"""

from __future__ import annotations

import pytest
import torch

import kernels
from kernel_helpers import (
    DEVICE,
    GPU_DTYPES,
    RTOL,
    assert_close,
    attn_inputs,
    gpu,
    grads,
    leaf,
    requires_kernels,
    reseed,
)
from kernels import reference as ref

pytestmark = requires_kernels


@pytest.fixture(autouse=True)
def seed():
    return reseed()


ATTN_SHAPES = [
    (2, 7, 13, 2, 32),  # odd cross-attention
    (1, 49, 50, 2, 32),  # CrossMAE decoder (49 queries on 50 keys), one key block: fused backward
    (1, 5, 70, 1, 80),  # ViT-H head dim (padded to 128), two key blocks: delta pre-pass + dQ kernel
    (1, 17, 17, 2, 64),  # self-attention, odd length
    (1, 3, 129, 1, 16),  # three key blocks, ragged last one
    (1, 70, 64, 1, 128),  # several query blocks, Lk a multiple of BLOCK_N (no key masking), d = 128
    (1, 1, 1, 1, 32),  # one query, one key
]


def _check_attention(q, k, v, scale=None, rtol=1e-4):
    out = kernels.attention(q, k, v, scale)
    assert out.is_contiguous() and out.shape == q.shape and out.dtype == q.dtype
    dout = torch.randn_like(out)
    got = grads(out, (q, k, v), dout)
    q32, k32, v32 = (leaf(t.float()) for t in (q, k, v))
    expected = ref.attention_reference(q32, k32, v32, scale)
    want = grads(expected, (q32, k32, v32), dout.float())
    assert_close(out, expected, rtol, "out")
    for name, g, w in zip(("dq", "dk", "dv"), got, want, strict=True):
        assert_close(g, w, rtol, name)


@pytest.mark.parametrize("shape", ATTN_SHAPES, ids=lambda s: "B{}-Lq{}-Lk{}-H{}-d{}".format(*s))
def test_attention_matches_reference(shape):
    _check_attention(*attn_inputs(*shape))


def test_attention_custom_scale():
    _check_attention(*attn_inputs(2, 6, 9, 2, 32), scale=0.3)


def test_attention_fp16():
    # fp16 runs under the interpreter too (bf16 does not: its arithmetic is wrong there)
    _check_attention(*attn_inputs(1, 9, 20, 2, 32, dtype=torch.float16), rtol=RTOL[torch.float16])


def test_attention_reads_fused_projection_views():
    """q / k / v as strided views of fused qkv and kv outputs, and a (B, H, L, d) tensor transposed."""
    B, Lq, Lk, H, d = 2, 9, 11, 2, 32
    qkv = torch.randn(B, Lq, 3, H, d, device=DEVICE, requires_grad=True)
    kv = torch.randn(B, Lk, 2 * H * d, device=DEVICE, requires_grad=True)
    for q in (qkv[:, :, 0], leaf(torch.randn(B, H, Lq, d, device=DEVICE)).transpose(1, 2)):
        k = kv.view(B, Lk, 2, H, d)[:, :, 0]
        v = kv.view(B, Lk, 2, H, d)[:, :, 1]
        assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
        out = kernels.attention(q, k, v)
        dout = torch.randn_like(out)
        base = (q._base, kv)  # the fused qkv tensor (or the untransposed leaf) and the fused kv tensor
        got = grads(out, base, dout)
        expected = ref.attention_reference(q, k, v)
        want = grads(expected, base, dout)
        assert_close(out, expected, 1e-4, "out")
        for name, g, w in zip(("dq", "dkv"), got, want, strict=True):
            assert_close(g, w, 1e-4, name)


def test_attention_rejects_bad_inputs():
    q, k, v = attn_inputs(1, 4, 5, 2, 16)
    with pytest.raises(ValueError, match="k and v"):
        kernels.attention(q, k[:, :, :1], v)
    with pytest.raises(ValueError, match="head dim"):
        kernels.attention(*attn_inputs(1, 2, 2, 1, 160))
    with pytest.raises(TypeError, match="dtypes differ"):
        kernels.attention(q, k.half(), v)



# ------------------------------------------------------------------------------------------------------------
# GPU: fp16 / bf16 at realistic shapes, and other attention libraries
# ------------------------------------------------------------------------------------------------------------

# (B, Lq, Lk, H, d): decoder 49 / 147 queries on 50 keys (16 heads of 32), encoder 50 tokens (12 of 64),
# ViT-H (16 of 80), MAE decoder (197 tokens), d = 128, and a long ragged cross-attention
GPU_ATTN_SHAPES = [(8, 49, 50, 16, 32), (8, 147, 50, 16, 32), (8, 50, 50, 12, 64), (4, 50, 50, 16, 80),
                   (4, 197, 197, 16, 32), (4, 50, 50, 8, 128), (2, 300, 1024, 4, 64), (3, 7, 13, 5, 80)]


def _sdpa(q, k, v):
    out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


@gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("shape", GPU_ATTN_SHAPES, ids=lambda s: "B{}-Lq{}-Lk{}-H{}-d{}".format(*s))
def test_attention_gpu(shape, dtype):
    q, k, v = attn_inputs(*shape, dtype=dtype)
    out = kernels.attention(q, k, v)
    dout = torch.randn_like(out)
    got = grads(out, (q, k, v), dout)
    q32, k32, v32 = (leaf(t.float()) for t in (q, k, v))
    expected = ref.attention_reference(q32, k32, v32)
    want = grads(expected, (q32, k32, v32), dout.float())
    # PyTorch's own kernel in the same dtype sets the scale of acceptable rounding error
    qb, kb, vb = (leaf(t) for t in (q, k, v))
    base = _sdpa(qb, kb, vb)
    base_grads = grads(base, (qb, kb, vb), dout)
    assert_close(out, expected, RTOL[dtype], "out", baseline=base)
    for name, g, w, b in zip(("dq", "dk", "dv"), got, want, base_grads, strict=True):
        assert_close(g, w, RTOL[dtype], name, baseline=b)


@gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
def test_attention_gpu_against_flash_attn_and_xformers(dtype):
    """Our error against the fp32 reference is at most twice theirs (or within RTOL), output and gradients."""
    q, k, v = attn_inputs(8, 147, 50, 16, 32, dtype=dtype)
    dout = torch.randn_like(q)
    libraries = {}
    try:
        from flash_attn import flash_attn_func

        libraries["flash_attn"] = flash_attn_func
    except ImportError:
        pass
    try:
        import xformers.ops as xops

        libraries["xformers"] = xops.memory_efficient_attention
    except ImportError:
        pass
    if not libraries:
        pytest.skip("neither flash-attn nor xformers imports")
    q32, k32, v32 = (leaf(t.float()) for t in (q, k, v))
    expected = ref.attention_reference(q32, k32, v32)
    want = grads(expected, (q32, k32, v32), dout.float())
    ours = kernels.attention(q, k, v)
    got = grads(ours, (q, k, v), dout)
    for name, fn in libraries.items():
        qb, kb, vb = (leaf(t) for t in (q, k, v))
        try:
            theirs = fn(qb, kb, vb)
            their_grads = grads(theirs, (qb, kb, vb), dout)
        except Exception as exc:  # e.g. a build without this dtype / head dim
            print(f"{name} failed, not compared: {type(exc).__name__}: {exc}")
            continue
        assert_close(ours, expected, RTOL[dtype], f"out (vs {name})", baseline=theirs)
        for gname, g, w, b in zip(("dq", "dk", "dv"), got, want, their_grads, strict=True):
            assert_close(g, w, RTOL[dtype], f"{gname} (vs {name})", baseline=b)
