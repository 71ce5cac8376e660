"""Multi-head softmax attention for short, ragged sequences (CrossMAE's decoder and encoder): the forward kernel,
the custom ops and the public functions. The backward's kernels and launch are in kernels/attention_backward.py.

Public: `attention(q, k, v)`, and for views of one fused projection `self_attention(qkv)` /
`cross_attention(q, kv)`, whose backward hands autograd ONE packed gradient (2026-12-01, issue #10).

Supported
    attention: q (B, Lq, H, d), k and v (B, Lk, H, d), any strides (views of a fused projection are read in
    place, no copy); gradients dq / dk / dv come back as three contiguous tensors.
    self_attention: qkv (B, N, 3, H, d), any strides (typically `linear(x).view(B, N, 3, H, d)`); the backward
    returns d(qkv) as one contiguous (B, N, 3, H, d) tensor whose three slices the kernels write directly (the
    kernels take output-gradient strides), so autograd runs no select_backward zero fill and no sum of three
    full-size gradients (issue #10 estimated those at 4-7 GB of memory traffic per ViT-B training step).
    cross_attention: q (B, Nq, H, d), kv (B, Nk, 2, H, d), any strides; the backward returns dq and d(kv) as
    one contiguous (B, Nk, 2, H, d) tensor written the same way.
    Output (B, Lq, H, d) contiguous, so `.reshape(B, Lq, H * d)` is free. Lq and Lk are independent and
    arbitrary (>= 1; the CPU tests cover 1..150, the GPU tests up to 300 x 1024), no causal mask, no dropout.
    Head dim d <= 128; non-powers of two (80 for ViT-H) are padded to the next power of two (min 16) inside
    the kernel and masked. fp16 / bf16 on GPU, fp32 anywhere (fp32 uses exact IEEE dots: correct but slow on
    tensor-core GPUs). Softmax statistics are fp32. `scale` defaults to 1/sqrt(d). Inputs share dtype, device.

Algorithm
    Forward: one program per (batch*head, block of BLOCK_M queries), online softmax over key blocks of
    BLOCK_N (one block for Lk <= 64, CrossMAE's 50 keys), saves the natural-log logsumexp (B, H, Lq) fp32.
    Backward: flash-attention-2 recomputation from that logsumexp, key-major, one kernel where all keys fit
    one block (kernels/attention_backward.py says how and why).

Tested on
    CPU interpreter only (TRITON_INTERPRET=1, triton 3.7.1, torch 2.13 CPU, 2026-12-01): fp32 and fp16 against
    the references at odd shapes and the ViT-H shapes (65 keys, d 80); not yet run on a GPU. Every launch at
    CrossMAE's shapes compiles for sm_90 and sm_80 without spills in bf16 / fp16 (Triton 3.7.1 code generator +
    bundled ptxas, launch-time specialisation, no GPU; 2026-12-01; the backward's register table is in
    kernels/attention_backward.py). Triton 3.6 is untested.

Caveats
    * No double backward. No attention mask / bias / dropout.
    * bf16 cannot be tested under the interpreter (its bf16 arithmetic is wrong), fp16 can.
    * Lq = 0 or Lk = 0 is rejected (ValueError). B * H must be < 2**31; Lq / BLOCK_M < 65536.
    * d 80 pads to 128 lanes (37.5% of every dot wasted).
    * The forward still splits 65 keys into two 64-key blocks (untouched by issue #10).
    * Without Triton able to run (CPU tensors without TRITON_INTERPRET, or no triton) the public functions
      fall back to their twins in `kernels.reference` (same math in PyTorch); the raw custom ops raise instead.
"""

import math

import torch

from . import reference
from ._custom_op import fused_op, kernel_op
from ._runtime import LOG2E, check_dtype, dot_precision, next_pow2, tl, triton, triton_can_run
from .attention_backward import attention_backward

MAX_HEAD_DIM = 128


# --------------------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------------------


@triton.jit
def _attn_fwd_kernel(
    q_ptr,  # (B, Lq, H, d) any strides
    k_ptr,  # (B, Lk, H, d) any strides
    v_ptr,  # (B, Lk, H, d) any strides
    out_ptr,  # (B, Lq, H, d) last dim contiguous
    lse_ptr,  # (B, H, Lq) fp32 contiguous, natural-log logsumexp of the scaled scores
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_ob, stride_om, stride_oh,
    num_heads, seqlen_q, seqlen_k,
    qk_scale,  # softmax scale * log2(e): scores are handled in base 2
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    EVEN_N: tl.constexpr,  # seqlen_k % BLOCK_N == 0: no key masking needed
    DOT_PRECISION: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    off_b = (pid_bh // num_heads).to(tl.int64)
    off_h = (pid_bh % num_heads).to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < seqlen_q
    mask_d = offs_d < HEAD_DIM

    q_base = q_ptr + off_b * stride_qb + off_h * stride_qh
    k_base = k_ptr + off_b * stride_kb + off_h * stride_kh
    v_base = v_ptr + off_b * stride_vb + off_h * stride_vh

    q = tl.load(
        q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
        mask=mask_m[:, None] & mask_d[None, :], other=0.0,
    )

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    for start_n in range(0, seqlen_k, BLOCK_N):
        cols = start_n + offs_n
        mask_n = cols < seqlen_k
        # K^T tile (BLOCK_D, BLOCK_N)
        kt = tl.load(
            k_base + cols[None, :] * stride_kn + offs_d[:, None] * stride_kd,
            mask=mask_n[None, :] & mask_d[:, None], other=0.0,
        )
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
        if not EVEN_N:
            s = tl.where(mask_n[None, :], s, float("-inf"))
        # The first block always holds a real key (seqlen_k >= 1), so m_new is finite from then on.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            v_base + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd,
            mask=mask_n[:, None] & mask_d[None, :], other=0.0,
        )
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new

    acc = acc / l_i[:, None]
    out_base = out_ptr + off_b * stride_ob + off_h * stride_oh
    tl.store(
        out_base + offs_m[:, None] * stride_om + offs_d[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=mask_m[:, None] & mask_d[None, :],
    )
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453  # back to natural log
    tl.store(lse_ptr + pid_bh.to(tl.int64) * seqlen_q + offs_m, lse, mask=mask_m)


# --------------------------------------------------------------------------------------------------------------
# Host functions
# --------------------------------------------------------------------------------------------------------------


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, op: str = "attention") -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"kernels.{op}: {name} must be (B, L, H, d), got shape {tuple(t.shape)}")
        check_dtype(op, name, t)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"kernels.{op}: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype}); cast first")
    if not (q.device == k.device == v.device):
        raise ValueError(f"kernels.{op}: q, k, v on different devices ({q.device}, {k.device}, {v.device})")
    B, Lq, H, d = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[2] != H or k.shape[3] != d:
        raise ValueError(
            f"kernels.{op}: expected k and v of shape (B={B}, Lk, H={H}, d={d}), got {tuple(k.shape)} and "
            f"{tuple(v.shape)}"
        )
    if Lq == 0 or k.shape[1] == 0 or B == 0 or H == 0:
        raise ValueError(f"kernels.{op}: empty sequence or batch (q {tuple(q.shape)}, k {tuple(k.shape)})")
    if d > MAX_HEAD_DIM:
        raise ValueError(f"kernels.{op}: head dim {d} > {MAX_HEAD_DIM} is not supported; use the reference")


def _check_packed(t: torch.Tensor, n: int, name: str, op: str) -> None:
    """A packed projection (B, L, n, H, d): n = 3 for qkv, 2 for kv."""
    if t.dim() != 5 or t.shape[2] != n:
        raise ValueError(
            f"kernels.{op}: {name} must be (B, L, {n}, H, d), e.g. linear(x).view(B, L, {n}, H, d); got shape "
            f"{tuple(t.shape)}"
        )


def _default_blocks(seqlen_q: int, seqlen_k: int, head_dim: int, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Forward block sizes. Register use was checked by compiling for sm_90 with ptxas -v (triton 3.7.1, no GPU
    run yet): no spills for d in (32, 64, 80, 128) in bf16; fp32 at d 32 spills 4 B on sm_80 (2026-12-02,
    tests/test_kernels_compile.py now compiles fp32 too)."""
    block_d = next_pow2(head_dim, 16)
    block_n = min(next_pow2(seqlen_k, 16), 64)
    block_m = min(next_pow2(seqlen_q, 16), 64)
    num_warps = 8 if block_d >= 128 else 4
    if dtype == torch.float32:  # IEEE fp32 dots run on FMA units and need far more registers
        block_m, num_warps = min(block_m, 32), 8
    return {"block_m": block_m, "block_n": block_n, "num_warps": num_warps, "num_stages": 2}


def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    *,
    out: torch.Tensor | None = None,
    config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel. Returns out (B, Lq, H, d) contiguous and lse (B, H, Lq) fp32.

    `out` may be a preallocated contiguous buffer (tests poison it); `config` overrides block_m / block_n /
    num_warps / num_stages (benchmark sweeps).
    """
    _check_inputs(q, k, v)
    B, Lq, H, d = q.shape
    Lk = k.shape[1]
    cfg = _default_blocks(Lq, Lk, d, q.dtype)
    cfg.update(config or {})
    if out is None:
        out = torch.empty((B, Lq, H, d), dtype=q.dtype, device=q.device)
    elif out.shape != q.shape or not out.is_contiguous() or out.dtype != q.dtype:
        raise ValueError("kernels.attention_forward: out must be a contiguous tensor shaped and typed like q")
    lse = torch.empty((B, H, Lq), dtype=torch.float32, device=q.device)
    block_d = next_pow2(d, 16)
    grid = (B * H, triton.cdiv(Lq, cfg["block_m"]))
    _attn_fwd_kernel[grid](
        q, k, v, out, lse,
        *q.stride(), *k.stride(), *v.stride(),
        out.stride(0), out.stride(1), out.stride(2),
        H, Lq, Lk,
        scale * LOG2E,
        HEAD_DIM=d, BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"], BLOCK_D=block_d,
        EVEN_N=Lk % cfg["block_n"] == 0, DOT_PRECISION=dot_precision(q.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out, lse


def self_attention_forward(
    qkv: torch.Tensor, scale: float, *, out: torch.Tensor | None = None, config: dict | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """attention_forward on the three slices of a packed qkv (B, N, 3, H, d), read in place (any strides)."""
    _check_packed(qkv, 3, "qkv", "self_attention")
    return attention_forward(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], scale, out=out, config=config)


def self_attention_backward(
    do: torch.Tensor,
    qkv: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    *,
    dqkv: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """Backward of self_attention_forward: d(qkv) as ONE contiguous (B, N, 3, H, d) tensor.

    The kernels write dq, dk and dv straight into its three slices, so autograd never zero-fills a full-size
    gradient per slice (select_backward) nor sums or concatenates them. `dqkv` may be a preallocated buffer.
    """
    _check_packed(qkv, 3, "qkv", "self_attention")
    if dqkv is None:
        dqkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
    elif dqkv.shape != qkv.shape or not dqkv.is_contiguous():
        raise ValueError(f"kernels.self_attention_backward: dqkv must be contiguous {tuple(qkv.shape)}, got "
                         f"{tuple(dqkv.shape)} with strides {dqkv.stride()}")
    attention_backward(do, qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], out, lse, scale,
                       grads=(dqkv[:, :, 0], dqkv[:, :, 1], dqkv[:, :, 2]), config=config)
    return dqkv


def cross_attention_forward(
    q: torch.Tensor, kv: torch.Tensor, scale: float, *, out: torch.Tensor | None = None, config: dict | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """attention_forward with keys / values the two slices of a packed kv (B, Nk, 2, H, d), read in place."""
    _check_packed(kv, 2, "kv", "cross_attention")
    return attention_forward(q, kv[:, :, 0], kv[:, :, 1], scale, out=out, config=config)


def cross_attention_backward(
    do: torch.Tensor,
    q: torch.Tensor,
    kv: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    *,
    grads: tuple[torch.Tensor, torch.Tensor] | None = None,
    config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward of cross_attention_forward: dq (B, Nq, H, d) and d(kv) as ONE contiguous (B, Nk, 2, H, d)
    tensor whose two slices the kernels write directly. `grads` may hold preallocated (dq, dkv) buffers."""
    _check_packed(kv, 2, "kv", "cross_attention")
    if grads is None:
        dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        dkv = torch.empty(kv.shape, dtype=kv.dtype, device=kv.device)
    else:
        dq, dkv = grads
        if dkv.shape != kv.shape or not dkv.is_contiguous():
            raise ValueError(f"kernels.cross_attention_backward: dkv must be contiguous {tuple(kv.shape)}, got "
                             f"{tuple(dkv.shape)} with strides {dkv.stride()}")
    attention_backward(do, q, kv[:, :, 0], kv[:, :, 1], out, lse, scale, grads=(dq, dkv[:, :, 0], dkv[:, :, 1]),
                       config=config)
    return dq, dkv


# --------------------------------------------------------------------------------------------------------------
# Custom ops (opaque to torch.compile, with fake-tensor and autograd registrations). lse is saved for the backward
# but not differentiable; its gradient is never materialised (no zero-filled (B, H, L) tensor).
# --------------------------------------------------------------------------------------------------------------


def _out_and_lse_like(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    B, Lq, H, d = q.shape
    return q.new_empty((B, Lq, H, d)), q.new_empty((B, H, Lq), dtype=torch.float32)


_attention_bwd_op = kernel_op(
    "crossmae::attention_bwd(Tensor do, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, float scale) -> "
    "(Tensor, Tensor, Tensor)",
    attention_backward,
    fake=lambda do, q, k, v, out, lse, scale: (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)),
)

_attention_fwd_op = fused_op(
    "crossmae::attention_fwd(Tensor q, Tensor k, Tensor v, float scale) -> (Tensor out, Tensor lse)",
    attention_forward,
    fake=lambda q, k, v, scale: _out_and_lse_like(q),
    save=("q", "k", "v", "out", "lse", "scale"),
    differentiable=("out",),
    grads=("q", "k", "v"),
    backward=lambda saved, grad_out: _attention_bwd_op(grad_out, saved.q, saved.k, saved.v, saved.out, saved.lse,
                                                       saved.scale),
)

_self_attention_bwd_op = kernel_op(
    "crossmae::self_attention_bwd(Tensor do, Tensor qkv, Tensor out, Tensor lse, float scale) -> Tensor",
    self_attention_backward,
    fake=lambda do, qkv, out, lse, scale: qkv.new_empty(qkv.shape),  # contiguous, like the real one
)

_self_attention_fwd_op = fused_op(
    "crossmae::self_attention_fwd(Tensor qkv, float scale) -> (Tensor out, Tensor lse)",
    self_attention_forward,
    fake=lambda qkv, scale: _out_and_lse_like(qkv[:, :, 0]),
    save=("qkv", "out", "lse", "scale"),
    differentiable=("out",),
    grads=("qkv",),
    backward=lambda saved, grad_out: _self_attention_bwd_op(grad_out, saved.qkv, saved.out, saved.lse, saved.scale),
)

_cross_attention_bwd_op = kernel_op(
    "crossmae::cross_attention_bwd(Tensor do, Tensor q, Tensor kv, Tensor out, Tensor lse, float scale) -> "
    "(Tensor, Tensor)",
    cross_attention_backward,
    fake=lambda do, q, kv, out, lse, scale: (q.new_empty(q.shape), kv.new_empty(kv.shape)),
)

_cross_attention_fwd_op = fused_op(
    "crossmae::cross_attention_fwd(Tensor q, Tensor kv, float scale) -> (Tensor out, Tensor lse)",
    cross_attention_forward,
    fake=lambda q, kv, scale: _out_and_lse_like(q),
    save=("q", "kv", "out", "lse", "scale"),
    differentiable=("out",),
    grads=("q", "kv"),
    backward=lambda saved, grad_out: _cross_attention_bwd_op(grad_out, saved.q, saved.kv, saved.out, saved.lse,
                                                             saved.scale),
)


# --------------------------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------------------------


def _default_scale(scale: float | None, head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v per (batch, head). q (B, Lq, H, d), k / v (B, Lk, H, d), any strides.

    Returns (B, Lq, H, d) contiguous. `scale` defaults to 1/sqrt(d). Differentiable in q, k, v; traceable by
    torch.compile (custom op `crossmae::attention_fwd`). Falls back to `kernels.reference.attention_reference`
    when Triton cannot run on these tensors (CPU without TRITON_INTERPRET=1). For views of one fused projection
    prefer `self_attention(qkv)` / `cross_attention(q, kv)`: their gradient is one packed tensor.
    """
    _check_inputs(q, k, v)
    scale = _default_scale(scale, q.shape[-1])
    if not triton_can_run(q, k, v):
        return reference.attention_reference(q, k, v, scale)
    out, _ = _attention_fwd_op(q, k, v, scale)
    return out


def self_attention(qkv: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Self-attention over a packed projection: qkv (B, N, 3, H, d), any strides (typically
    `linear(x).view(B, N, 3, H, d)`); q, k, v are its slices 0, 1, 2. Returns (B, N, H, d) contiguous.

    Backward returns d(qkv) as ONE contiguous (B, N, 3, H, d) tensor written by the kernels (custom ops
    `crossmae::self_attention_fwd` / `_bwd`), not three zero-filled full-size select_backward gradients summed
    by autograd. Falls back to `kernels.reference.self_attention_reference` where Triton cannot run.
    """
    _check_packed(qkv, 3, "qkv", "self_attention")
    _check_inputs(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], "self_attention")
    scale = _default_scale(scale, qkv.shape[-1])
    if not triton_can_run(qkv):
        return reference.self_attention_reference(qkv, scale)
    out, _ = _self_attention_fwd_op(qkv, scale)
    return out


def cross_attention(q: torch.Tensor, kv: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Cross-attention of q (B, Nq, H, d) over a packed projection kv (B, Nk, 2, H, d) (keys = slice 0,
    values = slice 1), any strides. Returns (B, Nq, H, d) contiguous.

    Backward returns dq and d(kv) as ONE contiguous (B, Nk, 2, H, d) tensor written by the kernels (custom ops
    `crossmae::cross_attention_fwd` / `_bwd`). Falls back to `kernels.reference.cross_attention_reference`
    where Triton cannot run.
    """
    _check_packed(kv, 2, "kv", "cross_attention")
    _check_inputs(q, kv[:, :, 0], kv[:, :, 1], "cross_attention")
    scale = _default_scale(scale, q.shape[-1])
    if not triton_can_run(q, kv):
        return reference.cross_attention_reference(q, kv, scale)
    out, _ = _cross_attention_fwd_op(q, kv, scale)
    return out
