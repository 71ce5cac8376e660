"""The backward of `kernels.attention` (multi-head softmax attention for short, ragged sequences): its Triton
kernels, block-size rules and launch, `attention_backward(do, q, k, v, out, lse, scale)`. The forward, the packed
self / cross variants and the custom ops are in kernels/attention.py, which calls this.

Algorithm
    flash-attention-2 recomputation from the forward's saved logsumexp, delta = rowsum(dO * O), computed
    key-major: S^T = K Q^T and dP^T = V dO^T, so P^T and dS^T feed the dV += P^T dO and dK += dS^T Q dots as
    the MMA produced them instead of being transposed through shared memory twice per query block (only the
    single-kernel dQ = dS K transposes dS^T, once). In the sm_90 TTGIR the loop's shared-memory copies of
    computed tiles went from 2 to 1 (d 32) and 5 to 1 (d 64); on sm_80 at d 64 the P^T copy stays (2 -> 2).
    * all keys in one block of next_pow2(Lk) keys: up to 128 keys at d <= 32 (CrossMAE's decoder: 50 keys,
      65 at ViT-H), up to 64 at larger d (encoder: 50 tokens). ONE kernel per (batch*head): holds all keys,
      loops over query blocks, computes delta inline and writes dQ of each query block directly (every key is
      present, so dQ is complete) while dK / dV accumulate in registers: no atomics, no second pass.
    * longer Lk: a delta pre-pass, a dK/dV kernel per key block looping over query blocks, and a dQ kernel
      per query block looping over key blocks; 64-key blocks, or 32 where that pads less up to 128 keys (ViT-H
      encoder, 65 tokens at d 80: 3 x 32). Deterministic as well.
    Block sizes (`_default_bwd_blocks`), bf16 / fp16: 4 warps everywhere; BLOCK_M 64 at d <= 32 (32 with a
    128-key block), 32 at d 64, 16 at d 80 / 128.

Tested on
    CPU interpreter only (see kernels/attention.py); not yet run on a GPU. Every launch at CrossMAE's shapes
    compiles for sm_90 and sm_80 (Triton 3.7.1 code generator + bundled ptxas, launch-time specialisation, no
    GPU; 2026-12-01). dK/dV kernel, bf16 and fp16 alike (B 256), as warps / registers per thread / blocks per
    SM, before -> after the key-major rewrite:
        shape                                   sm_90                       sm_80
        cross 49|147 q x 50 k, 16 x d32         4/194/2 -> 4/174/2          4/188/2 -> 4/238/2
        cross 64|192 q x 65 k, 16 x d32         3 kernels -> 1: 4/197/2     3 kernels -> 1: 4/248/2
        self 50 tokens, d64 (ViT-S/B/L)         8/166/1 -> 4/162/3          8/174/1 -> 4/238/2
        self 65 tokens, 16 x d80 (ViT-H)        8/194/1 -> 4/166/3          8/200/1 -> 4/165/3
        self 197 / 257 tokens, d32 (MAE dec.)   4/158/3 -> 4/151/3          4/168/3 -> 4/162/3
        self 50 tokens, 8 x d128                8/255/1 -> 4/254/2          8/255/1 -> 4/255/2
    No spills in any bf16 / fp16 launch, before or after; every backward kernel now fits >= 2 blocks per SM.
    The fp32 testing path's backward spills at most 24 bytes (128-key block at d32; d80 on sm_80), where it
    spilled 1.4-8.9 KB at d80 / d128 before. Triton 3.6 is untested. The choices rest on occupancy read from
    the compile, not on timings: `bench/test_kernels.py --benchmark` sweeps block sizes on a GPU.

Caveats
    * No double backward.
    * d 80 pads to 128 lanes; a 128-key single block at d 80 fits only one block per SM at 8 warps on sm_90 and
      spills on sm_80, hence the three-kernel path for the ViT-H encoder.
"""

import torch

from ._runtime import LOG2E, dot_precision, next_pow2, tl, triton

# --------------------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------------------


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
    dq_ptr,  # (B, Lq, H, d) last dim contiguous, e.g. a slice of a packed d(qkv) (written only when SINGLE_KEY_BLOCK)
    dk_ptr,  # (B, Lk, H, d) last dim contiguous
    dv_ptr,  # (B, Lk, H, d) last dim contiguous
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_ob, stride_om, stride_oh,
    stride_dob, stride_dom, stride_doh, stride_dod,
    stride_dqb, stride_dqm, stride_dqh,
    stride_dkb, stride_dkn, stride_dkh,
    stride_dvb, stride_dvn, stride_dvh,
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

    q_base = q_ptr + off_b * stride_qb + off_h * stride_qh
    do_base = do_ptr + off_b * stride_dob + off_h * stride_doh
    o_base = out_ptr + off_b * stride_ob + off_h * stride_oh
    dq_base = dq_ptr + off_b * stride_dqb + off_h * stride_dqh

    # Everything below is computed key-major (S^T = K Q^T, dP^T = V dO^T, shape (BLOCK_N, BLOCK_M)), so P^T and
    # dS^T are the A operands of the dV / dK dots as they come out of the MMA: no transpose of a computed tile
    # through shared memory there. Only the single-key-block dQ = dS K needs one (tl.trans(dst) below). The
    # transposes of loaded tiles (Q^T, dO^T) are free: they are views of the shared-memory copy.
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for start_m in range(0, seqlen_q, BLOCK_M):
        offs_m = start_m + offs_m0
        mask_m = offs_m < seqlen_q
        mask_md = mask_m[:, None] & mask_d[None, :]
        q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd, mask=mask_md, other=0.0)
        do = tl.load(do_base + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod, mask=mask_md, other=0.0)
        # Padded query columns get lse = +inf, hence p = 0: they contribute nothing.
        lse = tl.load(lse_ptr + bh_row + offs_m, mask=mask_m, other=float("inf")) * 1.4426950408889634
        if SINGLE_KEY_BLOCK:
            o = tl.load(o_base + offs_m[:, None] * stride_om + offs_d[None, :], mask=mask_md, other=0.0)
            delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        else:
            delta = tl.load(delta_ptr + bh_row + offs_m, mask=mask_m, other=0.0)

        st = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M), base 2
        pt = tl.exp2(st - lse[None, :])
        if not EVEN_N:
            # padded keys (k = 0) would get p = 2^-lse, which overflows to inf when every score is very negative
            pt = tl.where(mask_n[:, None], pt, 0.0)
        dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_M)
        dst = (pt * (dpt - delta[None, :])).to(q.dtype)  # dL/dS^T without the softmax scale
        dk = tl.dot(dst, q, dk, input_precision=DOT_PRECISION)
        if SINGLE_KEY_BLOCK:
            dq = tl.dot(tl.trans(dst), k, input_precision=DOT_PRECISION) * scale
            tl.store(dq_base + offs_m[:, None] * stride_dqm + offs_d[None, :],
                     dq.to(dq_ptr.dtype.element_ty), mask=mask_md)

    dk = dk * scale
    dk_ptrs = dk_ptr + off_b * stride_dkb + off_h * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :]
    dv_ptrs = dv_ptr + off_b * stride_dvb + off_h * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :]
    tl.store(dk_ptrs, dk.to(dk_ptr.dtype.element_ty), mask=mask_nd)
    tl.store(dv_ptrs, dv.to(dv_ptr.dtype.element_ty), mask=mask_nd)


@triton.jit
def _attn_bwd_dq_kernel(
    q_ptr,  # (B, Lq, H, d) any strides
    k_ptr,  # (B, Lk, H, d) any strides
    v_ptr,  # (B, Lk, H, d) any strides
    do_ptr,  # (B, Lq, H, d) any strides
    lse_ptr,  # (B, H, Lq) fp32 contiguous, natural log
    delta_ptr,  # (B, H, Lq) fp32 contiguous
    dq_ptr,  # (B, Lq, H, d) last dim contiguous
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_dob, stride_dom, stride_doh, stride_dod,
    stride_dqb, stride_dqm, stride_dqh,
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
    tl.store(dq_ptr + off_b * stride_dqb + off_h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :],
             dq.to(dq_ptr.dtype.element_ty), mask=mask_md)

# --------------------------------------------------------------------------------------------------------------
# Host functions
# --------------------------------------------------------------------------------------------------------------


def _check_grad_buffer(buf: torch.Tensor, like: torch.Tensor, name: str) -> None:
    if buf.shape != like.shape or buf.dtype != like.dtype or buf.device != like.device or buf.stride(-1) != 1:
        raise ValueError(
            f"kernels.attention_backward: {name} buffer must be shaped {tuple(like.shape)}, {like.dtype} on "
            f"{like.device} with a contiguous last dim; got {tuple(buf.shape)} {buf.dtype} on {buf.device} with "
            f"strides {buf.stride()}"
        )


def _max_single_block_keys(block_d: int) -> int:
    """Longest key sequence the single-kernel backward holds in one block of next_pow2(Lk) keys.

    From the sm_90 / sm_80 compile (bf16 and fp16, 4 warps, ptxas -v; 2026-12-01): 128 keys fit without spills
    only for d <= 32 (CrossMAE's decoder, 65 keys at ViT-H); a 128-key block at d 64 spills on sm_80 and at
    d 80 / 128 (128 padded lanes) the fp32 dK / dV accumulators alone are 128 KB, which spills at 4 warps and
    allows one block per SM at 8 warps (and still spills on sm_80).
    """
    return 128 if block_d <= 32 else 64


def _default_bwd_blocks(seqlen_q: int, seqlen_k: int, head_dim: int, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Backward block sizes: no spills and at least two blocks per SM on sm_90 and sm_80 at every CrossMAE shape
    (compiled with triton 3.7.1 + bundled ptxas, 2026-12-01; no GPU run yet; numbers in the module docstring).

    Keys up to _max_single_block_keys take the single-kernel path with block_n = next_pow2(Lk); longer ones the
    three-kernel path with 64-key blocks, or 32-key blocks where that pads less up to 128 keys (65 keys at d 80:
    3 x 32 rather than 2 x 64, the second block holding a single key).
    """
    block_d = next_pow2(head_dim, 16)
    if seqlen_k <= _max_single_block_keys(block_d):
        block_n = next_pow2(seqlen_k, 16)
    elif seqlen_k <= 128 and triton.cdiv(seqlen_k, 32) * 32 < triton.cdiv(seqlen_k, 64) * 64:
        block_n = 32
    else:
        block_n = 64
    if block_d <= 32:
        block_m = 32 if block_n > 64 else 64
    else:
        block_m = 32 if block_d <= 64 else 16
    block_m = min(next_pow2(seqlen_q, 16), block_m)
    num_warps = 4  # 8 warps held one block per SM at d >= 64 (about 130-200 registers per thread)
    if dtype == torch.float32:  # IEEE fp32 dots run on FMA units and need far more registers
        block_m, num_warps = 16, 8
    return {"block_m": block_m, "block_n": block_n, "num_warps": num_warps, "num_stages": 2}


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
    """Launch the backward kernels. Returns dq, dk, dv shaped like q, k, v (contiguous unless `grads` given).

    `out` must be the contiguous forward output, `lse` its (B, H, Lq) fp32 logsumexp. `grads` may hold
    preallocated (dq, dk, dv) buffers with a contiguous last dim, e.g. the three slices of one packed
    (B, L, 3, H, d) d(qkv): the kernels write every element of them (tests poison them with NaN).
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
        for name, buf, like in (("dq", dq, q), ("dk", dk, k), ("dv", dv, v)):
            _check_grad_buffer(buf, like, name)
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
        *dq.stride()[:3], *dk.stride()[:3], *dv.stride()[:3],
        H, Lq, Lk,
        scale, scale * LOG2E,
        BLOCK_N=block_n, EVEN_N=Lk % block_n == 0, SINGLE_KEY_BLOCK=single, DOT_PRECISION=precision,
        **common,
    )
    if not single:
        _attn_bwd_dq_kernel[(B * H, triton.cdiv(Lq, block_m))](
            q, k, v, do, lse, delta, dq,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(),
            *dq.stride()[:3],
            H, Lq, Lk,
            scale, scale * LOG2E,
            BLOCK_N=block_n, EVEN_N=Lk % block_n == 0, DOT_PRECISION=precision,
            **common,
        )
    return dq, dk, dv
