"""Multi-head softmax attention for short, ragged sequences (CrossMAE's decoder and encoder), forward and backward.

Supported
    q (B, Lq, H, d), k and v (B, Lk, H, d): any strides (views of a fused qkv / kv projection output such as
    `kv.view(B, Lk, 2, H, d)[:, :, 0]` are read in place, no copy). Output (B, Lq, H, d) contiguous, so
    `.reshape(B, Lq, H * d)` is free. Lq and Lk are independent (cross-attention) and arbitrary (>= 1; the CPU
    tests cover 1..130, the GPU tests up to 300 x 1024), no causal mask, no dropout. Head dim d <= 128;
    non-powers of two (80 for ViT-H) are padded to the next power of two (min 16) inside the kernel and masked.
    fp16 / bf16 on GPU, fp32 anywhere (fp32 uses exact IEEE dots: correct but slow on tensor-core GPUs).
    Softmax statistics are fp32. `scale` defaults to 1/sqrt(d). Inputs must share dtype and device.

Algorithm
    Forward: one program per (batch*head, block of BLOCK_M queries), online softmax over key blocks of
    BLOCK_N (one block for Lk <= 64, CrossMAE's 50 keys), saves the natural-log logsumexp (B, H, Lq) fp32.
    Backward (flash-attention-2 recomputation from the saved logsumexp, delta = rowsum(dO * O)):
    * Lk fits one key block (the CrossMAE case): ONE kernel per (batch*head). It holds all keys, loops over
      query blocks, computes delta inline and writes dQ of each query block directly (every key is present,
      so dQ is complete) while dK / dV accumulate in registers: no atomics, no second pass, deterministic.
    * longer Lk: a delta pre-pass, a dK/dV kernel per key block looping over query blocks, and a dQ kernel
      per query block looping over key blocks. Deterministic as well.

Tested on
    CPU interpreter only (TRITON_INTERPRET=1, triton 3.7.1, torch 2.13 CPU, 2026-11); not yet run on a GPU.
    Every launch at CrossMAE's shapes also compiles for sm_90 (Triton 3.7.1 code generator + bundled ptxas,
    no GPU: tests/test_kernels_compile.py, which prints registers / spills); Triton 3.6 is untested.
    The block sizes and warp counts below are first guesses, not tuned; `bench/test_kernels.py --benchmark`
    has a sweep to pick them on an H100/H200.

Caveats
    * No double backward. No attention mask / bias / dropout.
    * bf16 cannot be tested under the interpreter (its bf16 arithmetic is wrong), fp16 can.
    * Lq = 0 or Lk = 0 is rejected (ValueError). B * H must be < 2**31; Lq / BLOCK_M < 65536.
    * Without Triton able to run (CPU tensors, no TRITON_INTERPRET) `attention` falls back to
      `kernels.reference.attention_reference` (same math in PyTorch); the raw custom ops raise instead.
"""

import math

import torch
import triton
import triton.language as tl

from . import reference
from ._runtime import check_dtype, dot_precision, next_pow2, require_triton, triton_can_run

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
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


@triton.jit
def _attn_bwd_delta_kernel(
    out_ptr,  # (B, Lq, H, d) last dim contiguous
    do_ptr,  # (B, Lq, H, d) any strides
    delta_ptr,  # (B, H, Lq) fp32 contiguous
    stride_ob, stride_om, stride_oh,
    stride_dob, stride_dom, stride_doh, stride_dod,
    num_heads, seqlen_q,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    off_b = (pid_bh // num_heads).to(tl.int64)
    off_h = (pid_bh % num_heads).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < seqlen_q)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(out_ptr + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :],
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(do_ptr + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_dom
                 + offs_d[None, :] * stride_dod, mask=mask, other=0.0).to(tl.float32)
    tl.store(delta_ptr + pid_bh.to(tl.int64) * seqlen_q + offs_m, tl.sum(o * do, 1), mask=offs_m < seqlen_q)


@triton.jit
def _attn_bwd_dkdv_kernel(
    q_ptr,  # (B, Lq, H, d) any strides
    k_ptr,  # (B, Lk, H, d) any strides
    v_ptr,  # (B, Lk, H, d) any strides
    out_ptr,  # (B, Lq, H, d) last dim contiguous (read only when SINGLE_KEY_BLOCK, for delta)
    do_ptr,  # (B, Lq, H, d) any strides
    lse_ptr,  # (B, H, Lq) fp32 contiguous, natural log
    delta_ptr,  # (B, H, Lq) fp32 contiguous (read only when not SINGLE_KEY_BLOCK)
    dq_ptr,  # (B, Lq, H, d) contiguous (written only when SINGLE_KEY_BLOCK)
    dk_ptr,  # (B, Lk, H, d) contiguous
    dv_ptr,  # (B, Lk, H, d) contiguous
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_ob, stride_om, stride_oh,
    stride_dob, stride_dom, stride_doh, stride_dod,
    num_heads, seqlen_q, seqlen_k,
    scale,  # softmax scale
    qk_scale,  # scale * log2(e)
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    EVEN_N: tl.constexpr,
    SINGLE_KEY_BLOCK: tl.constexpr,  # all keys in this program: compute delta inline and write dQ here
    DOT_PRECISION: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_n = tl.program_id(1)
    off_b = (pid_bh // num_heads).to(tl.int64)
    off_h = (pid_bh % num_heads).to(tl.int64)
    bh_row = pid_bh.to(tl.int64) * seqlen_q

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < seqlen_k
    mask_d = offs_d < HEAD_DIM
    mask_nd = mask_n[:, None] & mask_d[None, :]

    k = tl.load(k_ptr + off_b * stride_kb + off_h * stride_kh + offs_n[:, None] * stride_kn
                + offs_d[None, :] * stride_kd, mask=mask_nd, other=0.0)  # (BLOCK_N, BLOCK_D)
    v = tl.load(v_ptr + off_b * stride_vb + off_h * stride_vh + offs_n[:, None] * stride_vn
                + offs_d[None, :] * stride_vd, mask=mask_nd, other=0.0)  # (BLOCK_N, BLOCK_D)
    kt = tl.trans(k)
    vt = tl.trans(v)

    q_base = q_ptr + off_b * stride_qb + off_h * stride_qh
    do_base = do_ptr + off_b * stride_dob + off_h * stride_doh
    o_base = out_ptr + off_b * stride_ob + off_h * stride_oh
    # dq has the same contiguous layout as out
    dq_base = dq_ptr + off_b * stride_ob + off_h * stride_oh

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for start_m in range(0, seqlen_q, BLOCK_M):
        offs_m = start_m + offs_m0
        mask_m = offs_m < seqlen_q
        mask_md = mask_m[:, None] & mask_d[None, :]
        q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd, mask=mask_md, other=0.0)
        do = tl.load(do_base + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod, mask=mask_md, other=0.0)
        # Padded query rows get lse = +inf, hence p = 0: they contribute nothing.
        lse = tl.load(lse_ptr + bh_row + offs_m, mask=mask_m, other=float("inf")) * 1.4426950408889634
        if SINGLE_KEY_BLOCK:
            o = tl.load(o_base + offs_m[:, None] * stride_om + offs_d[None, :], mask=mask_md, other=0.0)
            delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        else:
            delta = tl.load(delta_ptr + bh_row + offs_m, mask=mask_m, other=0.0)

        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N), base 2
        p = tl.exp2(s - lse[:, None])
        if not EVEN_N:
            p = tl.where(mask_n[None, :], p, 0.0)
        dv = tl.dot(tl.trans(p.to(do.dtype)), do, dv, input_precision=DOT_PRECISION)
        dp = tl.dot(do, vt, input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
        ds = (p * (dp - delta[:, None])).to(q.dtype)  # dL/dS without the softmax scale
        dk = tl.dot(tl.trans(ds), q, dk, input_precision=DOT_PRECISION)
        if SINGLE_KEY_BLOCK:
            dq = tl.dot(ds, k, input_precision=DOT_PRECISION) * scale
            tl.store(dq_base + offs_m[:, None] * stride_om + offs_d[None, :],
                     dq.to(dq_ptr.dtype.element_ty), mask=mask_md)

    dk = dk * scale
    # dk / dv are contiguous (B, Lk, H, d)
    kv_off = off_b * seqlen_k * num_heads * HEAD_DIM + off_h * HEAD_DIM
    kv_ptrs = offs_n[:, None].to(tl.int64) * (num_heads * HEAD_DIM) + offs_d[None, :]
    tl.store(dk_ptr + kv_off + kv_ptrs, dk.to(dk_ptr.dtype.element_ty), mask=mask_nd)
    tl.store(dv_ptr + kv_off + kv_ptrs, dv.to(dv_ptr.dtype.element_ty), mask=mask_nd)


@triton.jit
def _attn_bwd_dq_kernel(
    q_ptr,  # (B, Lq, H, d) any strides
    k_ptr,  # (B, Lk, H, d) any strides
    v_ptr,  # (B, Lk, H, d) any strides
    do_ptr,  # (B, Lq, H, d) any strides
    lse_ptr,  # (B, H, Lq) fp32 contiguous, natural log
    delta_ptr,  # (B, H, Lq) fp32 contiguous
    dq_ptr,  # (B, Lq, H, d) contiguous
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_dob, stride_dom, stride_doh, stride_dod,
    num_heads, seqlen_q, seqlen_k,
    scale,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    EVEN_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    off_b = (pid_bh // num_heads).to(tl.int64)
    off_h = (pid_bh % num_heads).to(tl.int64)
    bh_row = pid_bh.to(tl.int64) * seqlen_q

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < seqlen_q
    mask_d = offs_d < HEAD_DIM
    mask_md = mask_m[:, None] & mask_d[None, :]

    q = tl.load(q_ptr + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qm
                + offs_d[None, :] * stride_qd, mask=mask_md, other=0.0)
    do = tl.load(do_ptr + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_dom
                 + offs_d[None, :] * stride_dod, mask=mask_md, other=0.0)
    lse = tl.load(lse_ptr + bh_row + offs_m, mask=mask_m, other=float("inf")) * 1.4426950408889634
    delta = tl.load(delta_ptr + bh_row + offs_m, mask=mask_m, other=0.0)

    k_base = k_ptr + off_b * stride_kb + off_h * stride_kh
    v_base = v_ptr + off_b * stride_vb + off_h * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, seqlen_k, BLOCK_N):
        offs_n = start_n + offs_n0
        mask_n = offs_n < seqlen_k
        mask_nd = mask_n[:, None] & mask_d[None, :]
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=mask_nd, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=mask_nd, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        p = tl.exp2(s - lse[:, None])
        if not EVEN_N:
            p = tl.where(mask_n[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = (p * (dp - delta[:, None])).to(q.dtype)
        dq = tl.dot(ds, k, dq, input_precision=DOT_PRECISION)

    dq = dq * scale
    dq_off = off_b * seqlen_q * num_heads * HEAD_DIM + off_h * HEAD_DIM
    tl.store(dq_ptr + dq_off + offs_m[:, None].to(tl.int64) * (num_heads * HEAD_DIM) + offs_d[None, :],
             dq.to(dq_ptr.dtype.element_ty), mask=mask_md)


# --------------------------------------------------------------------------------------------------------------
# Host functions
# --------------------------------------------------------------------------------------------------------------


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"kernels.attention: {name} must be (B, L, H, d), got shape {tuple(t.shape)}")
        check_dtype("attention", name, t)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"kernels.attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype}); cast first")
    if not (q.device == k.device == v.device):
        raise ValueError(f"kernels.attention: q, k, v on different devices ({q.device}, {k.device}, {v.device})")
    B, Lq, H, d = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[2] != H or k.shape[3] != d:
        raise ValueError(
            f"kernels.attention: expected k and v of shape (B={B}, Lk, H={H}, d={d}), got {tuple(k.shape)} and "
            f"{tuple(v.shape)}"
        )
    if Lq == 0 or k.shape[1] == 0 or B == 0 or H == 0:
        raise ValueError(f"kernels.attention: empty sequence or batch (q {tuple(q.shape)}, k {tuple(k.shape)})")
    if d > MAX_HEAD_DIM:
        raise ValueError(f"kernels.attention: head dim {d} > {MAX_HEAD_DIM} is not supported; use the reference")


def _default_blocks(seqlen_q: int, seqlen_k: int, head_dim: int, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Forward block sizes. Register use was checked by compiling for sm_90 with ptxas -v (triton 3.7.1, no GPU
    run yet): no spills for d in (32, 64, 80, 128) in bf16 and for fp32 at these settings."""
    block_d = next_pow2(head_dim, 16)
    block_n = min(next_pow2(seqlen_k, 16), 64)
    block_m = min(next_pow2(seqlen_q, 16), 64)
    num_warps = 8 if block_d >= 128 else 4
    if dtype == torch.float32:  # IEEE fp32 dots run on FMA units and need far more registers
        block_m, num_warps = min(block_m, 32), 8
    return {"block_m": block_m, "block_n": block_n, "num_warps": num_warps, "num_stages": 2}


def _default_bwd_blocks(seqlen_q: int, seqlen_k: int, head_dim: int, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Backward block sizes (see _default_blocks). block_n covers up to 64 keys, so CrossMAE's 50 keys take the
    single-kernel path."""
    block_d = next_pow2(head_dim, 16)
    block_n = min(next_pow2(seqlen_k, 16), 64)
    block_m = min(next_pow2(seqlen_q, 16), 64 if block_d <= 32 else 32)
    num_warps = 4 if block_d <= 32 else 8
    if dtype == torch.float32:
        block_m, num_warps = 16, 8
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


def attention_backward(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    *,
    grads: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward kernels. Returns dq, dk, dv, each contiguous and shaped like q, k, v.

    `out` must be the contiguous forward output, `lse` its (B, H, Lq) fp32 logsumexp. `grads` may hold
    preallocated contiguous (dq, dk, dv) buffers (tests poison them).
    """
    B, Lq, H, d = q.shape
    Lk = k.shape[1]
    if do.shape != q.shape:
        raise ValueError(f"kernels.attention_backward: grad_out shape {tuple(do.shape)} != {tuple(q.shape)}")
    if not out.is_contiguous():
        raise ValueError("kernels.attention_backward: out must be the contiguous output of attention_forward")
    do = do.to(q.dtype)
    cfg = _default_bwd_blocks(Lq, Lk, d, q.dtype)
    cfg.update(config or {})
    block_m, block_n = cfg["block_m"], cfg["block_n"]
    block_d = next_pow2(d, 16)
    if grads is None:
        dq = torch.empty((B, Lq, H, d), dtype=q.dtype, device=q.device)
        dk = torch.empty((B, Lk, H, d), dtype=k.dtype, device=k.device)
        dv = torch.empty((B, Lk, H, d), dtype=v.dtype, device=v.device)
    else:
        dq, dk, dv = grads
    single = Lk <= block_n
    precision = dot_precision(q.dtype)
    common = dict(HEAD_DIM=d, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=cfg["num_warps"],
                  num_stages=cfg["num_stages"])
    if single:
        delta = lse  # unused placeholder: delta is computed inline
    else:
        delta = torch.empty_like(lse)
        _attn_bwd_delta_kernel[(B * H, triton.cdiv(Lq, block_m))](
            out, do, delta,
            out.stride(0), out.stride(1), out.stride(2),
            *do.stride(),
            H, Lq,
            HEAD_DIM=d, BLOCK_M=block_m, BLOCK_D=block_d,
        )
    _attn_bwd_dkdv_kernel[(B * H, triton.cdiv(Lk, block_n))](
        q, k, v, out, do, lse, delta, dq, dk, dv,
        *q.stride(), *k.stride(), *v.stride(),
        out.stride(0), out.stride(1), out.stride(2),
        *do.stride(),
        H, Lq, Lk,
        scale, scale * LOG2E,
        BLOCK_N=block_n, EVEN_N=Lk % block_n == 0, SINGLE_KEY_BLOCK=single, DOT_PRECISION=precision,
        **common,
    )
    if not single:
        _attn_bwd_dq_kernel[(B * H, triton.cdiv(Lq, block_m))](
            q, k, v, do, lse, delta, dq,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(),
            H, Lq, Lk,
            scale, scale * LOG2E,
            BLOCK_N=block_n, EVEN_N=Lk % block_n == 0, DOT_PRECISION=precision,
            **common,
        )
    return dq, dk, dv


# --------------------------------------------------------------------------------------------------------------
# Custom ops (opaque to torch.compile, with fake-tensor and autograd registrations)
# --------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("crossmae::attention_fwd", mutates_args=())
def _attention_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[
        torch.Tensor, torch.Tensor]:
    require_triton("attention", q, k, v)
    return attention_forward(q, k, v, scale)


@_attention_fwd_op.register_fake
def _(q, k, v, scale):
    B, Lq, H, d = q.shape
    return q.new_empty((B, Lq, H, d)), q.new_empty((B, H, Lq), dtype=torch.float32)


@torch.library.custom_op("crossmae::attention_bwd", mutates_args=())
def _attention_bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                      lse: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    require_triton("attention backward", q, k, v)
    return attention_backward(do, q, k, v, out, lse, scale)


@_attention_bwd_op.register_fake
def _(do, q, k, v, out, lse, scale):
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape))


def _attention_setup_context(ctx, inputs, output):
    q, k, v, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


def _attention_backward_formula(ctx, grad_out, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = _attention_bwd_op(grad_out, q, k, v, out, lse, ctx.scale)
    return dq, dk, dv, None


_attention_fwd_op.register_autograd(_attention_backward_formula, setup_context=_attention_setup_context)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v per (batch, head). q (B, Lq, H, d), k / v (B, Lk, H, d), any strides.

    Returns (B, Lq, H, d) contiguous. `scale` defaults to 1/sqrt(d). Differentiable in q, k, v; traceable by
    torch.compile (custom op `crossmae::attention_fwd`). Falls back to `kernels.reference.attention_reference`
    when Triton cannot run on these tensors (CPU without TRITON_INTERPRET=1).
    """
    _check_inputs(q, k, v)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if not triton_can_run(q, k, v):
        return reference.attention_reference(q, k, v, scale)
    out, _ = _attention_fwd_op(q, k, v, float(scale))
    return out
