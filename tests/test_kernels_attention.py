"""kernels.attention / self_attention / cross_attention against their references in kernels.reference: output
and every gradient, odd shapes, strided views, fp16 under the interpreter, the packed d(qkv) / d(kv) layout (no
select_backward, no zero fill), the single-kernel backward up to 128 keys, opcheck and torch.compile; on a GPU
fp16 / bf16 at CrossMAE's shapes and flash-attn / xformers.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import kernels
from kernel_helpers import (
    DEVICE,
    GPU_DTYPES,
    RTOL,
    assert_close,
    assert_compiled_matches_eager,
    attn_inputs,
    gpu,
    grads,
    leaf,
    requires_kernels,
)
from kernels import reference as ref

pytestmark = requires_kernels



ATTN_SHAPES = [
    (2, 7, 13, 2, 32),  # odd cross-attention
    (1, 49, 50, 2, 32),  # CrossMAE decoder (49 queries on 50 keys), one key block: fused backward
    (1, 5, 70, 1, 80),  # ViT-H head dim (padded to 128) on three 32-key blocks: delta + dK/dV + dQ kernels
    (1, 4, 150, 1, 80),  # d 80 on three 64-key blocks
    (1, 17, 17, 2, 64),  # self-attention, odd length
    (1, 3, 129, 1, 16),  # three key blocks, ragged last one
    (1, 70, 64, 1, 128),  # several query blocks, Lk a multiple of BLOCK_N (no key masking), d = 128
    (1, 1, 1, 1, 32),  # one query, one key
    (1, 9, 65, 2, 32),  # ViT-H decoder: 65 keys in one 128-key block, single-kernel backward
    (1, 5, 128, 1, 16),  # the longest single-kernel key block, no key masking
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
# Packed projections: self_attention(qkv) and cross_attention(q, kv)
# ------------------------------------------------------------------------------------------------------------

attention_mod = importlib.import_module("kernels.attention")  # kernels.attention is the function
backward_mod = importlib.import_module("kernels.attention_backward")


def _packed_qkv(B, N, H, d, dtype=torch.float32, layout="linear"):
    """(leaf, qkv): qkv (B, N, 3, H, d) a view of the leaf, laid out as a fused linear output or permuted."""
    if layout == "linear":  # Attention.forward: linear(x).view(B, N, 3, H, d)
        base = leaf(torch.randn(B, N, 3 * H * d, device=DEVICE, dtype=dtype))
        return base, base.view(B, N, 3, H, d)
    base = leaf(torch.randn(3, H, B, N, d, device=DEVICE, dtype=dtype))  # every stride differs from contiguous
    return base, base.permute(2, 3, 0, 1, 4)


def _packed_kv(B, N, H, d, dtype=torch.float32):
    base = leaf(torch.randn(B, N, 2 * H * d, device=DEVICE, dtype=dtype))
    return base, base.view(B, N, 2, H, d)


# (B, N, H, d): odd, ViT-H encoder (65 tokens, d 80: three 32-key blocks), three 64-key blocks
SELF_SHAPES = [(2, 9, 2, 32), (1, 65, 1, 80), (1, 130, 1, 16)]
# (B, Nq, Nk, H, d): odd, ViT-H decoder (65 keys, d 32: single kernel), d 80 on 70 keys, three 64-key blocks
CROSS_SHAPES = [(2, 7, 13, 2, 32), (1, 64, 65, 2, 32), (1, 5, 70, 1, 80), (1, 3, 129, 1, 16)]


@pytest.mark.parametrize("layout", ["linear", "permuted"])
@pytest.mark.parametrize("shape", SELF_SHAPES, ids=lambda s: "B{}-N{}-H{}-d{}".format(*s))
def test_self_attention_matches_reference(shape, layout, dtype=torch.float32):
    base, qkv = _packed_qkv(*shape, dtype=dtype, layout=layout)
    out = kernels.self_attention(qkv)
    assert out.is_contiguous() and out.shape == qkv[:, :, 0].shape and out.dtype == dtype
    dout = torch.randn_like(out)
    (got,) = grads(out, (base,), dout)
    base32 = leaf(base.float())
    qkv32 = base32.view(qkv.shape) if layout == "linear" else base32.permute(2, 3, 0, 1, 4)
    expected = ref.self_attention_reference(qkv32)
    (want,) = grads(expected, (base32,), dout.float())
    rtol = RTOL[dtype]
    assert_close(out, expected, rtol, "out")
    assert_close(got, want, rtol, "dqkv")


@pytest.mark.parametrize("shape", CROSS_SHAPES, ids=lambda s: "B{}-Lq{}-Lk{}-H{}-d{}".format(*s))
def test_cross_attention_matches_reference(shape, dtype=torch.float32):
    B, Lq, Lk, H, d = shape
    q = leaf(torch.randn(B, H, Lq, d, device=DEVICE, dtype=dtype)).transpose(1, 2)  # strided q
    base, kv = _packed_kv(B, Lk, H, d, dtype)
    out = kernels.cross_attention(q, kv)
    assert out.is_contiguous() and out.shape == q.shape and out.dtype == dtype
    dout = torch.randn_like(out)
    got = grads(out, (q, base), dout)
    q32, base32 = leaf(q.detach().float()), leaf(base.detach().float())
    expected = ref.cross_attention_reference(q32, base32.view(kv.shape))
    want = grads(expected, (q32, base32), dout.float())
    rtol = RTOL[dtype]
    assert_close(out, expected, rtol, "out")
    for name, g, w in zip(("dq", "dkv"), got, want, strict=True):
        assert_close(g, w, rtol, name)


def test_packed_ops_fp16():
    """fp16 at the ViT-H shapes: encoder (65 tokens, d 80) and decoder (65 keys in one 128-key block)."""
    test_self_attention_matches_reference((1, 65, 1, 80), "linear", dtype=torch.float16)
    test_cross_attention_matches_reference((1, 64, 65, 2, 32), dtype=torch.float16)
    test_cross_attention_matches_reference((2, 7, 13, 2, 32), dtype=torch.float16)


def test_packed_ops_custom_scale():
    _, qkv = _packed_qkv(1, 6, 2, 16)
    q = leaf(torch.randn(1, 4, 2, 16, device=DEVICE))
    assert_close(kernels.self_attention(qkv, 0.3), ref.self_attention_reference(qkv, 0.3), 1e-4, "self")
    assert_close(kernels.cross_attention(q, qkv[:, :, 1:], 0.3), ref.cross_attention_reference(q, qkv[:, :, 1:], 0.3),
                 1e-4, "cross")


class _RecordOps(TorchDispatchMode):
    """Names of the aten / custom ops dispatched while active."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


# Ops that would mean a full-size gradient was zero-filled, summed or copied together instead of written in place
_MATERIALISING = {"select_backward", "slice_backward", "zeros", "zeros_like", "new_zeros", "zero_", "fill_", "add",
                  "add_", "cat", "stack", "copy_", "clone", "contiguous", "index_put_"}


def _backward_ops(out, inputs):
    dout = torch.randn_like(out)
    with _RecordOps() as rec:
        got = torch.autograd.grad(out, inputs, dout)
    return got, rec.ops


def test_self_attention_gradient_is_one_packed_tensor():
    """d(qkv) comes out of the kernels as one contiguous (B, N, 3, H, d) tensor: the backward dispatches the
    custom op and views, never select_backward / zeros / add (which attention(qkv[:, :, 0], ...) does)."""
    B, N, H, d = 2, 9, 2, 16
    qkv = leaf(torch.randn(B, N, 3, H, d, device=DEVICE))
    (dqkv,), ops = _backward_ops(kernels.self_attention(qkv), (qkv,))
    assert dqkv.shape == (B, N, 3, H, d) and dqkv.is_contiguous()
    assert "self_attention_bwd" in ops and not _MATERIALISING & set(ops), ops
    # the recorder does see what autograd does for separate slices: the check above can fail
    _, slice_ops = _backward_ops(kernels.attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]), (qkv,))
    assert "select_backward" in slice_ops and "add" in slice_ops, slice_ops
    # through the model's fused projection: the gradient of the linear output is a view of d(qkv)
    x = leaf(torch.randn(B, N, 3 * H * d, device=DEVICE))
    (dx,), ops = _backward_ops(kernels.self_attention(x.view(B, N, 3, H, d)), (x,))
    assert dx.is_contiguous() and not _MATERIALISING & set(ops), ops


def test_cross_attention_gradient_is_one_packed_tensor():
    B, Lq, Lk, H, d = 2, 5, 9, 2, 16
    q = leaf(torch.randn(B, Lq, H, d, device=DEVICE))
    kv = leaf(torch.randn(B, Lk, 2, H, d, device=DEVICE))
    (dq, dkv), ops = _backward_ops(kernels.cross_attention(q, kv), (q, kv))
    assert dq.shape == q.shape and dq.is_contiguous()
    assert dkv.shape == (B, Lk, 2, H, d) and dkv.is_contiguous()
    assert "cross_attention_bwd" in ops and not _MATERIALISING & set(ops), ops


@pytest.mark.parametrize("shape", [(2, 7, 13, 2, 32), (1, 5, 65, 1, 80), (1, 4, 150, 1, 80)],
                         ids=lambda s: "B{}-Lq{}-Lk{}-H{}-d{}".format(*s))
def test_packed_gradient_buffers_fully_written(shape):
    """NaN-filled d(qkv) / d(kv) buffers (d 80 leaves padding lanes): the kernels write every element."""
    B, Lq, Lk, H, d = shape
    qkv = torch.randn(B, Lk, 3, H, d, device=DEVICE)
    out, lse = attention_mod.self_attention_forward(qkv, 0.2)
    dout = torch.randn_like(out)
    dqkv = attention_mod.self_attention_backward(dout, qkv, out, lse, 0.2,
                                                 dqkv=torch.full_like(qkv, float("nan")))
    assert not torch.isnan(dqkv).any()
    assert torch.equal(dqkv, attention_mod.self_attention_backward(dout, qkv, out, lse, 0.2))
    q, kv = torch.randn(B, Lq, H, d, device=DEVICE), torch.randn(B, Lk, 2, H, d, device=DEVICE)
    out, lse = attention_mod.cross_attention_forward(q, kv, 0.2)
    bufs = (torch.full_like(q, float("nan")), torch.full_like(kv, float("nan")))
    dq, dkv = attention_mod.cross_attention_backward(torch.randn_like(out), q, kv, out, lse, 0.2, grads=bufs)
    assert dq is bufs[0] and dkv is bufs[1]
    assert not torch.isnan(dq).any() and not torch.isnan(dkv).any()


class _CountLaunches:
    """Wraps a kernel: counts launches and records the constexprs of each."""

    def __init__(self, kernel, log: list, name: str):
        self.kernel, self.log, self.name = kernel, log, name

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append((self.name, kwargs.get("BLOCK_N"), kwargs.get("SINGLE_KEY_BLOCK")))
            return self.kernel[grid](*args, **kwargs)

        return launch


@pytest.mark.parametrize("Lk, d, single, block_n", [(50, 32, True, 64), (65, 32, True, 128), (128, 16, True, 128),
                                                    (129, 32, False, 64), (50, 64, True, 64), (65, 80, False, 32),
                                                    (100, 64, False, 64)])
def test_backward_kernel_path(Lk, d, single, block_n, monkeypatch):
    """At d <= 32 up to 128 keys (ViT-H's 65 included), at larger d up to 64, the backward is ONE kernel launch
    over a next_pow2(Lk) key block; longer keys take the delta + dK/dV + dQ path (32-key blocks for 65 keys)."""
    log: list = []
    for name in ("_attn_bwd_delta_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"):
        monkeypatch.setattr(backward_mod, name, _CountLaunches(getattr(backward_mod, name), log, name))
    qkv = leaf(torch.randn(1, Lk, 3, 1, d, device=DEVICE))
    out = kernels.self_attention(qkv)
    dout = torch.randn_like(out)
    (dqkv,) = grads(out, (qkv,), dout)
    if single:
        assert log == [("_attn_bwd_dkdv_kernel", block_n, True)], log
    else:
        assert [entry[0] for entry in log] == ["_attn_bwd_delta_kernel", "_attn_bwd_dkdv_kernel",
                                               "_attn_bwd_dq_kernel"], log
        assert log[1][1:] == (block_n, False), log
    assert_close(dqkv, grads(ref.self_attention_reference(qkv), (qkv,), dout)[0], 1e-4, "dqkv")


def test_packed_ops_opcheck():
    """torch.library.opcheck: schema, fake-tensor kernels, autograd registration, AOT dispatch of the 4 ops."""
    ops = torch.ops.crossmae
    qkv = torch.randn(1, 5, 3, 2, 16, device=DEVICE)
    out, lse = attention_mod.self_attention_forward(qkv, 0.25)
    torch.library.opcheck(ops.self_attention_fwd, (leaf(qkv), 0.25))
    torch.library.opcheck(ops.self_attention_bwd, (torch.randn_like(out), qkv, out, lse, 0.25))
    q, kv = torch.randn(1, 4, 2, 16, device=DEVICE), torch.randn(1, 7, 2, 2, 16, device=DEVICE)
    out, lse = attention_mod.cross_attention_forward(q, kv, 0.25)
    torch.library.opcheck(ops.cross_attention_fwd, (leaf(q), leaf(kv), 0.25))
    torch.library.opcheck(ops.cross_attention_bwd, (torch.randn_like(out), q, kv, out, lse, 0.25))


def test_packed_ops_compile_fullgraph():
    """Both ops in one fullgraph-compiled function (no graph break), forward and backward, equal to eager."""
    B, N, Nq, H, d = 2, 7, 5, 2, 16

    def step(x, w_qkv, y, w_kv):
        qkv = (x @ w_qkv).view(B, N, 3, H, d)
        enc = kernels.self_attention(qkv).reshape(B, N, H * d)
        kv = (enc @ w_kv).view(B, N, 2, H, d)
        return kernels.cross_attention(y.view(B, Nq, H, d), kv).square().mean()

    inputs = [leaf(torch.randn(B, N, 24, device=DEVICE)), leaf(torch.randn(24, 3 * H * d, device=DEVICE) / 5),
              leaf(torch.randn(B, Nq, H * d, device=DEVICE)), leaf(torch.randn(H * d, 2 * H * d, device=DEVICE) / 6)]
    assert_compiled_matches_eager(step, inputs, inputs, backend="aot_eager")


def test_packed_ops_fall_back_to_reference(monkeypatch):
    """Where Triton cannot run (simulated), the public ops return their reference twins and launch nothing."""
    monkeypatch.setattr(attention_mod, "triton_can_run", lambda *tensors: False)
    for name in ("self_attention_forward", "cross_attention_forward", "attention_forward"):
        monkeypatch.setattr(attention_mod, name, lambda *a, _n=name, **k: pytest.fail(f"{_n} ran"))
    _, qkv = _packed_qkv(1, 6, 2, 16)
    q = leaf(torch.randn(1, 4, 2, 16, device=DEVICE))
    assert torch.equal(kernels.self_attention(qkv), ref.self_attention_reference(qkv))
    assert torch.equal(kernels.cross_attention(q, qkv[:, :, :2]), ref.cross_attention_reference(q, qkv[:, :, :2]))


def test_packed_ops_reject_bad_inputs():
    with pytest.raises(ValueError, match=r"qkv must be \(B, L, 3, H, d\)"):
        kernels.self_attention(torch.randn(1, 4, 2, 2, 16, device=DEVICE))
    with pytest.raises(ValueError, match=r"kv must be \(B, L, 2, H, d\)"):
        kernels.cross_attention(torch.randn(1, 4, 2, 16, device=DEVICE), torch.randn(1, 4, 2, 16, device=DEVICE))
    with pytest.raises(ValueError, match="k and v"):
        kernels.cross_attention(torch.randn(1, 4, 2, 16, device=DEVICE), torch.randn(1, 5, 2, 3, 16, device=DEVICE))
    with pytest.raises(TypeError, match="dtypes differ"):
        kernels.cross_attention(torch.randn(1, 4, 2, 16, device=DEVICE).half(),
                                torch.randn(1, 5, 2, 2, 16, device=DEVICE))


# ------------------------------------------------------------------------------------------------------------
# GPU: fp16 / bf16 at realistic shapes, and other attention libraries
# ------------------------------------------------------------------------------------------------------------

# (B, Lq, Lk, H, d): decoder 49 / 147 queries on 50 keys (16 heads of 32), encoder 50 tokens (12 of 64),
# ViT-H (16 of 80), MAE decoder (197 tokens), d = 128, and a long ragged cross-attention
GPU_ATTN_SHAPES = [(8, 49, 50, 16, 32), (8, 147, 50, 16, 32), (8, 50, 50, 12, 64), (4, 50, 50, 16, 80),
                   (4, 197, 197, 16, 32), (4, 50, 50, 8, 128), (2, 300, 1024, 4, 64), (3, 7, 13, 5, 80),
                   (8, 64, 65, 16, 32), (8, 192, 65, 16, 32), (4, 65, 65, 16, 80)]  # ViT-H decoder / encoder


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


@gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(8, 147, 50, 16, 32), (8, 192, 65, 16, 32), (8, 50, 50, 12, 64),
                                   (4, 65, 65, 16, 80), (4, 197, 197, 16, 32)],
                         ids=lambda s: "B{}-Lq{}-Lk{}-H{}-d{}".format(*s))
def test_packed_ops_gpu(shape, dtype):
    """self_attention (Lq == Lk) or cross_attention on packed projections, against the fp32 reference, with
    PyTorch's SDPA in the same dtype setting the scale of acceptable rounding error."""
    B, Lq, Lk, H, d = shape
    is_self = Lq == Lk
    inputs = (leaf(torch.randn(B, Lk, (3 if is_self else 2) * H * d, device=DEVICE, dtype=dtype)),)
    if not is_self:
        inputs += (leaf(torch.randn(B, Lq, H * d, device=DEVICE, dtype=dtype)),)

    def run(self_fn, cross_fn, packed, q=None):
        if is_self:
            return self_fn(packed.view(B, Lk, 3, H, d))
        return cross_fn(q.view(B, Lq, H, d), packed.view(B, Lk, 2, H, d))

    out = run(kernels.self_attention, kernels.cross_attention, *inputs)
    dout = torch.randn_like(out)
    got = grads(out, inputs, dout)
    inputs32 = tuple(leaf(t.float()) for t in inputs)
    expected = run(ref.self_attention_reference, ref.cross_attention_reference, *inputs32)
    want = grads(expected, inputs32, dout.float())
    base_inputs = tuple(leaf(t) for t in inputs)
    base = run(lambda qkv: _sdpa(*qkv.unbind(2)), lambda q, kv: _sdpa(q, *kv.unbind(2)), *base_inputs)
    base_grads = grads(base, base_inputs, dout)
    assert_close(out, expected, RTOL[dtype], "out", baseline=base)
    for name, g, w, b in zip(("dpacked", "dq"), got, want, base_grads, strict=False):
        assert_close(g, w, RTOL[dtype], name, baseline=b)
