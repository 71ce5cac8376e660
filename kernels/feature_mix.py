"""Inter-block feature mixing (CrossMAE's IBA): out[j] = LayerNorm_j(sum_i W[j, i] * f_i), forward and backward.
(Slightly above the usual ~500 lines: its three kernels share the tile helpers and the register notes below.)

Supported
    feats (k, N, C) with any strides (N = B*T rows; e.g. the encoder outputs stacked in one buffer, or
    `torch.stack(maps)` viewed as (k, B*T, C)), weight W (depth, k), ln_weight / ln_bias (depth, C), each decoder
    block j with its own LayerNorm (eps default 1e-6) over C. Output (depth, N, C) contiguous in feats.dtype, so
    all decoder blocks' kv projections can run as one `torch.baddbmm` with stacked weights. Any k, depth, C
    (powers of two or not: C = 768, 1280, 40 ... are masked). feats fp16 / bf16 / fp32; parameters any of those.
    All arithmetic is about fp32-accurate: fp32 features use IEEE fp32 dots; fp16 / bf16 features (exact in
    their dtype) are mixed by two tensor-core dots with W split as W_hi + W_lo in the features' dtype (fp32
    accumulation, ~16 significant bits of W); the backward's dots on fp32 operands (dfeats = W^T dy,
    dW = dy F^T) use 3xTF32 for half inputs. Statistics are fp32; mean / rstd (depth, N) are saved.
    No (B, T, C, k) stack and no un-normalised mix is ever written.

Algorithm
    Forward: one program per (row n, block of 16 decoder blocks), walking C in chunks of up to 256 channels
    (the largest chunk leaving <= 1/8 of the lanes idle: 1280 = 5 x 256, 768 = 3 x 256, 384 = 3 x 128), one
    warp per 32 channels. Per chunk the mix for all j is one small dot W (16 x k) @ F_n (k x chunk). Pass 1
    merges exact per-chunk means and squared deviations (Chan et al.'s pairwise update: as accurate as a
    two-pass variance); pass 2 mixes each chunk again (its features are in cache), normalises and writes it
    once. A row that fits one chunk is mixed once.
    Backward, two kernels, deterministic (no atomics):
    1. per row n, same chunks: recompute the mix, c1 = mean_c(g), c2 = mean_c(g * xhat) with g = dout * gamma.
    2. per (16-channel chunk, group of rows), 8 rows per iteration: dy = rstd * (g - c1 - xhat * c2);
       dfeats = W^T dy as one dot over the (row, channel) columns (written once); dW += dy F^T as a batch of
       8 per-row dots; partial sums of dW, dgamma = sum dout * xhat, dbeta = sum dout per program, reduced in
       torch.

Tested on
    CPU interpreter only (TRITON_INTERPRET=1, triton 3.7.1, torch 2.13 CPU, 2026-12-01); not yet run on a GPU.
    Every launch of the S/B/L/H CrossMAE training step (batch 256, bf16 and fp16) compiles for sm_90 and sm_80
    through Triton's launch-time specialisation (tests/test_kernels_compile.py; registers in
    bench/results/kernel_resources.md) without spills, ViT-H included: forward / statistics ~120 registers,
    backward main kernel 171 / 207 / 246-255 registers for k = 13 / 25 / 33 at 8 warps. The fp32 launches
    (the exactness tests' path) compile and fit shared memory too (the ViT-H backward main kernel: 132 KB of
    sm_80's 163 KB), but spill: 816-844 B in that kernel at ViT-H, 28 B in the forward at C 768 / 1024 on sm_80
    (2026-12-02). Triton 3.6 is untested. Chunk sizes and warps were chosen by those register counts, not by
    GPU timings.

Caveats
    * Performance risks to check on a GPU: the forward mixes every chunk twice (the second time from L1 / L2)
      when C exceeds one chunk; each program re-reads the (depth, C) LayerNorm parameters (from L2); the
      backward reads the features and dout twice (stats kernel, then main kernel): about 1.65x the minimal
      traffic. The backward main kernel's 8 warps at ~250 registers run one program per SM at k = 33.
    * The 3xTF32 dot mode ("tf32x3", backward with fp16/bf16 inputs) has not been run on a GPU yet; if it
      fails there, `kernels._runtime.dot_precision` is the one switch (to "ieee": exact, slower).
    * Without Triton able to run (CPU tensors without TRITON_INTERPRET, or no triton) `feature_mix_layernorm`
      falls back to `kernels.reference.feature_mix_layernorm_reference`; the raw custom ops raise instead.
"""

import torch

from . import reference
from ._custom_op import fused_op, kernel_op
from ._runtime import check_dtype, dot_precision, next_pow2, num_sms, tl, triton, triton_can_run

# --------------------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------------------


@triton.jit
def _mix_dot(
    w,  # (BLOCK_J, BLOCK_K) fp32 mixing weights
    f,  # (BLOCK_K, BLOCK_C) features in their storage dtype
    acc,  # (BLOCK_J, BLOCK_C) fp32
    SPLIT_W: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """acc + w @ f, about fp32-accurate.

    fp16 / bf16 features are exact in their own dtype, so only W needs care: W = W_hi + W_lo, both in the
    features' dtype, gives two tensor-core dots with fp32 accumulation and ~16 significant bits of W (the
    products themselves are exact in fp32). fp32 features use one dot at DOT_PRECISION ("ieee").
    """
    if SPLIT_W:
        w_hi = w.to(f.dtype)
        w_lo = (w - w_hi.to(tl.float32)).to(f.dtype)
        acc = tl.dot(w_hi, f, acc)
        acc = tl.dot(w_lo, f, acc)
    else:
        acc = tl.dot(w, f.to(tl.float32), acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _mix_tile(
    feats_ptr,  # (K, N, C) any strides
    w_ptr,  # (J, K)
    row,  # int64 row index n
    offs_j, mask_j, offs_c, mask_c,
    stride_fk, stride_fn, stride_fc,
    stride_wj, stride_wk,
    K,
    BLOCK_J: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_C: tl.constexpr,
    SPLIT_W: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """(BLOCK_J, BLOCK_C) fp32 tile of sum_i W[j, i] * feats[i, row, c]; zero outside the valid j / c."""
    acc = tl.zeros([BLOCK_J, BLOCK_C], dtype=tl.float32)
    f_row = feats_ptr + row * stride_fn
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        w = tl.load(w_ptr + offs_j[:, None] * stride_wj + offs_k[None, :] * stride_wk,
                    mask=mask_j[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
        f = tl.load(f_row + offs_k[:, None].to(tl.int64) * stride_fk + offs_c[None, :] * stride_fc,
                    mask=mask_k[:, None] & mask_c[None, :], other=0.0)
        acc = _mix_dot(w, f, acc, SPLIT_W, DOT_PRECISION)
    return acc


@triton.jit
def _mix_ln_fwd_kernel(
    feats_ptr,  # (K, N, C) any strides
    w_ptr,  # (J, K) any strides
    gamma_ptr,  # (J, C), last dim contiguous
    beta_ptr,  # (J, C), last dim contiguous
    out_ptr,  # (J, N, C) contiguous
    mean_ptr,  # (J, N) fp32 contiguous
    rstd_ptr,  # (J, N) fp32 contiguous
    stride_fk, stride_fn, stride_fc,
    stride_wj, stride_wk,
    stride_gj, stride_bj,
    N, C, K, J,
    eps,
    BLOCK_J: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_C: tl.constexpr,  # channel chunk
    ONE_CHUNK: tl.constexpr,  # C <= BLOCK_C: the whole row is one chunk, mixed once
    SPLIT_W: tl.constexpr,  # fp16/bf16 features: split W in two (see _mix_dot)
    DOT_PRECISION: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs_j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    mask_j = offs_j < J
    out_rows = out_ptr + (offs_j[:, None].to(tl.int64) * N + row) * C
    if ONE_CHUNK:
        offs_c = tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        y = _mix_tile(feats_ptr, w_ptr, row, offs_j, mask_j, offs_c, mask_c, stride_fk, stride_fn, stride_fc,
                      stride_wj, stride_wk, K, BLOCK_J, BLOCK_K, BLOCK_C, SPLIT_W, DOT_PRECISION)
        mean = tl.sum(y, 1) / C
        diff = tl.where(mask_c[None, :], y - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, 1) / C + eps)
        mask_jc = mask_j[:, None] & mask_c[None, :]
        gamma = tl.load(gamma_ptr + offs_j[:, None] * stride_gj + offs_c[None, :], mask=mask_jc, other=0.0)
        beta = tl.load(beta_ptr + offs_j[:, None] * stride_bj + offs_c[None, :], mask=mask_jc, other=0.0)
        out = diff * rstd[:, None] * gamma.to(tl.float32) + beta.to(tl.float32)
        tl.store(out_rows + offs_c[None, :], out.to(out_ptr.dtype.element_ty), mask=mask_jc)
    else:
        # Pass 1: exact per-chunk mean and sum of squared deviations, merged chunk by chunk (Chan et al.'s
        # pairwise update), so the variance is as accurate as a two-pass one without holding the row.
        mean = tl.zeros([BLOCK_J], dtype=tl.float32)
        m2 = tl.zeros([BLOCK_J], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mask_c = offs_c < C
            y = _mix_tile(feats_ptr, w_ptr, row, offs_j, mask_j, offs_c, mask_c, stride_fk, stride_fn, stride_fc,
                          stride_wj, stride_wk, K, BLOCK_J, BLOCK_K, BLOCK_C, SPLIT_W, DOT_PRECISION)
            n_a = c0 * 1.0  # every earlier chunk was full (c0 may be a Python int under the interpreter)
            n_b = tl.minimum(C - c0, BLOCK_C) * 1.0
            mean_b = tl.sum(y, 1) / n_b
            diff = tl.where(mask_c[None, :], y - mean_b[:, None], 0.0)
            delta = mean_b - mean
            mean += delta * (n_b / (n_a + n_b))
            m2 += tl.sum(diff * diff, 1) + delta * delta * (n_a * n_b / (n_a + n_b))
        rstd = 1.0 / tl.sqrt(m2 / C + eps)
        # Pass 2: mix the chunk again (its features are in L1 / L2 now), normalise, write once.
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mask_c = offs_c < C
            mask_jc = mask_j[:, None] & mask_c[None, :]
            y = _mix_tile(feats_ptr, w_ptr, row, offs_j, mask_j, offs_c, mask_c, stride_fk, stride_fn, stride_fc,
                          stride_wj, stride_wk, K, BLOCK_J, BLOCK_K, BLOCK_C, SPLIT_W, DOT_PRECISION)
            gamma = tl.load(gamma_ptr + offs_j[:, None] * stride_gj + offs_c[None, :], mask=mask_jc, other=0.0)
            beta = tl.load(beta_ptr + offs_j[:, None] * stride_bj + offs_c[None, :], mask=mask_jc, other=0.0)
            out = (y - mean[:, None]) * rstd[:, None] * gamma.to(tl.float32) + beta.to(tl.float32)
            tl.store(out_rows + offs_c[None, :], out.to(out_ptr.dtype.element_ty), mask=mask_jc)
    stat_offs = offs_j.to(tl.int64) * N + row
    tl.store(mean_ptr + stat_offs, mean, mask=mask_j)
    tl.store(rstd_ptr + stat_offs, rstd, mask=mask_j)


@triton.jit
def _mix_ln_bwd_stats_kernel(
    feats_ptr,  # (K, N, C) any strides
    w_ptr,  # (J, K) any strides
    gamma_ptr,  # (J, C), last dim contiguous
    dout_ptr,  # (J, N, C) any strides
    mean_ptr,  # (J, N) fp32 contiguous
    rstd_ptr,  # (J, N) fp32 contiguous
    c1_ptr,  # (J, N) fp32 contiguous, out: mean_c(dout * gamma)
    c2_ptr,  # (J, N) fp32 contiguous, out: mean_c(dout * gamma * xhat)
    stride_fk, stride_fn, stride_fc,
    stride_wj, stride_wk,
    stride_gj,
    stride_dj, stride_dn, stride_dc,
    N, C, K, J,
    BLOCK_J: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_C: tl.constexpr,  # channel chunk
    SPLIT_W: tl.constexpr,  # fp16/bf16 features: split W in two (see _mix_dot)
    DOT_PRECISION: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs_j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    mask_j = offs_j < J
    stat_offs = offs_j.to(tl.int64) * N + row
    mean = tl.load(mean_ptr + stat_offs, mask=mask_j, other=0.0)
    rstd = tl.load(rstd_ptr + stat_offs, mask=mask_j, other=0.0)
    sum_g = tl.zeros([BLOCK_J], dtype=tl.float32)
    sum_gx = tl.zeros([BLOCK_J], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        mask_jc = mask_j[:, None] & mask_c[None, :]
        y = _mix_tile(feats_ptr, w_ptr, row, offs_j, mask_j, offs_c, mask_c, stride_fk, stride_fn, stride_fc,
                      stride_wj, stride_wk, K, BLOCK_J, BLOCK_K, BLOCK_C, SPLIT_W, DOT_PRECISION)
        xhat = (y - mean[:, None]) * rstd[:, None]
        gamma = tl.load(gamma_ptr + offs_j[:, None] * stride_gj + offs_c[None, :], mask=mask_jc, other=0.0)
        dout = tl.load(dout_ptr + offs_j[:, None].to(tl.int64) * stride_dj + row * stride_dn
                       + offs_c[None, :] * stride_dc, mask=mask_jc, other=0.0)
        g = dout.to(tl.float32) * gamma.to(tl.float32)  # zero outside the valid tile
        sum_g += tl.sum(g, 1)
        sum_gx += tl.sum(g * xhat, 1)
    tl.store(c1_ptr + stat_offs, sum_g / C, mask=mask_j)
    tl.store(c2_ptr + stat_offs, sum_gx / C, mask=mask_j)


@triton.jit
def _mix_ln_bwd_main_kernel(
    feats_ptr,  # (K, N, C) any strides
    w_ptr,  # (J, K) any strides
    gamma_ptr,  # (J, C), last dim contiguous
    dout_ptr,  # (J, N, C) any strides
    mean_ptr,  # (J, N) fp32 contiguous
    rstd_ptr,  # (J, N) fp32 contiguous
    c1_ptr,  # (J, N) fp32 contiguous
    c2_ptr,  # (J, N) fp32 contiguous
    dfeats_ptr,  # (K, N, C) contiguous, feats dtype
    dw_part_ptr,  # (G, n_cblocks, J, K) fp32 contiguous, per-program partial dW
    dgamma_part_ptr,  # (G, J, C) fp32 contiguous, per-row-group partial dgamma
    dbeta_part_ptr,  # (G, J, C) fp32 contiguous, per-row-group partial dbeta
    stride_fk, stride_fn, stride_fc,
    stride_wj, stride_wk,
    stride_gj,
    stride_dj, stride_dn, stride_dc,
    N, C, K, J,
    rows_per_group,  # a multiple of ROWS
    BLOCK_J: tl.constexpr,  # >= J: all decoder blocks in one tile (dfeats sums over them)
    BLOCK_K: tl.constexpr,  # >= K: all feature maps in one tile (dW accumulates per map)
    BLOCK_C: tl.constexpr,  # chunk of channels handled by this program
    ROWS: tl.constexpr,  # rows per loop iteration (batched dots over a leading ROWS axis)
    SPLIT_W: tl.constexpr,  # fp16/bf16 features: split W in two (see _mix_dot)
    DOT_PRECISION: tl.constexpr,  # for the fp32-operand dots (dfeats, dW): "ieee" or "tf32x3"
):
    pid_c = tl.program_id(0)
    pid_g = tl.program_id(1)
    offs_j = tl.arange(0, BLOCK_J)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, ROWS)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_j = offs_j < J
    mask_k = offs_k < K
    mask_c = offs_c < C
    mask_jc = mask_j[:, None] & mask_c[None, :]

    # A block of ROWS rows per iteration. The mix and dfeats dots are 2-D over columns e = (row, channel)
    # (W shared by all rows, wide N); dW must contract per row, so it is a batch of ROWS small dots.
    e = tl.arange(0, ROWS * BLOCK_C)
    e_row = e // BLOCK_C
    e_c = pid_c * BLOCK_C + e % BLOCK_C
    mask_ec = e_c < C
    w = tl.load(w_ptr + offs_j[:, None] * stride_wj + offs_k[None, :] * stride_wk,
                mask=mask_j[:, None] & mask_k[None, :], other=0.0).to(tl.float32)  # (BLOCK_J, BLOCK_K)
    wt = tl.trans(w)
    gamma = tl.load(gamma_ptr + offs_j[:, None] * stride_gj + offs_c[None, :], mask=mask_jc,
                    other=0.0).to(tl.float32)[:, None, :]  # (BLOCK_J, 1, BLOCK_C)

    dw = tl.zeros([ROWS, BLOCK_J, BLOCK_K], dtype=tl.float32)  # summed over rows at the end
    dgamma = tl.zeros([BLOCK_J, ROWS, BLOCK_C], dtype=tl.float32)
    dbeta = tl.zeros([BLOCK_J, ROWS, BLOCK_C], dtype=tl.float32)
    # int64 bounds make the loop index int64 (row * stride may exceed 2**31)
    row_start = pid_g.to(tl.int64) * rows_per_group
    row_end = tl.minimum(row_start + rows_per_group, N)
    for row0 in range(row_start, row_end, ROWS):
        rows = row0 + offs_r  # (ROWS,)
        rows_e = row0 + e_row  # (ROWS * BLOCK_C,)
        mask_ke = mask_k[:, None] & ((rows_e < row_end) & mask_ec)[None, :]
        mask_jr = mask_j[:, None] & (rows < row_end)[None, :]
        mask_jrc = mask_jr[:, :, None] & mask_c[None, None, :]
        f = tl.load(feats_ptr + offs_k[:, None].to(tl.int64) * stride_fk + rows_e[None, :] * stride_fn
                    + e_c[None, :] * stride_fc, mask=mask_ke, other=0.0)  # (BLOCK_K, ROWS * BLOCK_C)
        y = _mix_dot(w, f, tl.zeros([BLOCK_J, ROWS * BLOCK_C], dtype=tl.float32), SPLIT_W, DOT_PRECISION)
        y = tl.reshape(y, (BLOCK_J, ROWS, BLOCK_C))
        stat_offs = offs_j[:, None].to(tl.int64) * N + rows[None, :]  # (BLOCK_J, ROWS)
        mean = tl.load(mean_ptr + stat_offs, mask=mask_jr, other=0.0)[:, :, None]
        rstd = tl.load(rstd_ptr + stat_offs, mask=mask_jr, other=0.0)[:, :, None]
        c1 = tl.load(c1_ptr + stat_offs, mask=mask_jr, other=0.0)[:, :, None]
        c2 = tl.load(c2_ptr + stat_offs, mask=mask_jr, other=0.0)[:, :, None]
        dout = tl.load(dout_ptr + offs_j[:, None, None].to(tl.int64) * stride_dj + rows[None, :, None] * stride_dn
                       + offs_c[None, None, :] * stride_dc, mask=mask_jrc, other=0.0).to(tl.float32)
        xhat = (y - mean) * rstd
        dy = tl.where(mask_jrc, rstd * (dout * gamma - c1 - xhat * c2), 0.0)  # (BLOCK_J, ROWS, BLOCK_C)
        df = tl.dot(wt, tl.reshape(dy, (BLOCK_J, ROWS * BLOCK_C)), input_precision=DOT_PRECISION)
        tl.store(dfeats_ptr + (offs_k[:, None].to(tl.int64) * N + rows_e[None, :]) * C + e_c[None, :],
                 df.to(dfeats_ptr.dtype.element_ty), mask=mask_ke)
        f_rows = tl.permute(tl.reshape(f.to(tl.float32), (BLOCK_K, ROWS, BLOCK_C)), (1, 2, 0))  # (ROWS, BLOCK_C, K)
        dw = tl.dot(tl.permute(dy, (1, 0, 2)), f_rows, dw, input_precision=DOT_PRECISION)
        dgamma += dout * xhat  # dout is zero outside the valid tile
        dbeta += dout

    n_cblocks = tl.num_programs(0)
    dw_offs = ((pid_g * n_cblocks + pid_c) * J + offs_j[:, None]) * K + offs_k[None, :]
    tl.store(dw_part_ptr + dw_offs, tl.sum(dw, 0), mask=mask_j[:, None] & mask_k[None, :])
    part_offs = (pid_g.to(tl.int64) * J + offs_j[:, None]) * C + offs_c[None, :]
    tl.store(dgamma_part_ptr + part_offs, tl.sum(dgamma, 1), mask=mask_jc)
    tl.store(dbeta_part_ptr + part_offs, tl.sum(dbeta, 1), mask=mask_jc)


# --------------------------------------------------------------------------------------------------------------
# Host functions
# --------------------------------------------------------------------------------------------------------------


def _check_inputs(feats, weight, ln_weight, ln_bias) -> None:
    op = "feature_mix_layernorm"
    for name, t in (("feats", feats), ("weight", weight), ("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        check_dtype(op, name, t)
        if t.device != feats.device:
            raise ValueError(f"kernels.{op}: {name} is on {t.device}, feats on {feats.device}")
    if feats.dim() != 3:
        raise ValueError(f"kernels.{op}: feats must be (k, N, C), got shape {tuple(feats.shape)}; "
                         "reshape (k, B, T, C) to (k, B*T, C)")
    K, N, C = feats.shape
    if weight.dim() != 2 or weight.shape[1] != K:
        raise ValueError(f"kernels.{op}: weight must be (depth, k={K}), got {tuple(weight.shape)}")
    J = weight.shape[0]
    for name, t in (("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        if t.shape != (J, C):
            raise ValueError(f"kernels.{op}: {name} must be (depth={J}, C={C}), got {tuple(t.shape)}")
    if K == 0 or N == 0 or C == 0 or J == 0:
        raise ValueError(f"kernels.{op}: empty input (k={K}, N={N}, C={C}, depth={J})")


def _row_chunk(C: int) -> tuple[int, int, int]:
    """(BLOCK_J, BLOCK_C, num_warps) of the per-row kernels: the largest channel chunk (<= 256) that leaves at
    most 1/8 of the lanes idle over the row (1280 = 5 x 256, 768 = 3 x 256, 384 = 3 x 128), one warp per 32
    channels: ~120 registers, no spills in bf16 / fp16, whatever C (ptxas, sm_90 / sm_80,
    tests/test_kernels_compile.py); fp32 (IEEE dots) spills 28 B at C 768 / 1024 on sm_80."""
    chunk = 16
    for size in (256, 128, 64, 32):
        if 8 * C >= 7 * triton.cdiv(C, size) * size:  # idle lanes <= 1/8
            chunk = size
            break
    return 16, chunk, max(1, chunk // 32)


def _main_tile(J: int, K: int) -> tuple[int, int, int, int]:
    """(BLOCK_J, BLOCK_K, BLOCK_C, ROWS) of the backward main kernel: 32-channel chunks (parallelism over C),
    ROWS rows per iteration. (16, 8) keeps every CrossMAE k (13, 25, 33) under 255 registers without spills at
    8 warps (ptxas, sm_90 / sm_80, tests/test_kernels_compile.py); 32-channel chunks spill at k = 33."""
    return next_pow2(J, 16), next_pow2(K, 16), 16, 8


def feature_mix_forward(
    feats: torch.Tensor,
    weight: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float,
    *,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward kernel. Returns out (depth, N, C) contiguous, mean and rstd (depth, N) fp32."""
    _check_inputs(feats, weight, ln_weight, ln_bias)
    K, N, C = feats.shape
    J = weight.shape[0]
    ln_weight = ln_weight if ln_weight.stride(-1) == 1 else ln_weight.contiguous()
    ln_bias = ln_bias if ln_bias.stride(-1) == 1 else ln_bias.contiguous()
    if out is None:
        out = torch.empty((J, N, C), dtype=feats.dtype, device=feats.device)
    mean = torch.empty((J, N), dtype=torch.float32, device=feats.device)
    rstd = torch.empty((J, N), dtype=torch.float32, device=feats.device)
    block_j, block_c, num_warps = _row_chunk(C)
    split_w = feats.dtype != torch.float32
    _mix_ln_fwd_kernel[(N, triton.cdiv(J, block_j))](
        feats, weight, ln_weight, ln_bias, out, mean, rstd,
        *feats.stride(), *weight.stride(), ln_weight.stride(0), ln_bias.stride(0),
        N, C, K, J, eps,
        BLOCK_J=block_j, BLOCK_K=16, BLOCK_C=block_c, ONE_CHUNK=C <= block_c, SPLIT_W=split_w,
        DOT_PRECISION=dot_precision(feats.dtype),
        num_warps=num_warps,
    )
    return out, mean, rstd


def feature_mix_backward(
    dout: torch.Tensor,
    feats: torch.Tensor,
    weight: torch.Tensor,
    ln_weight: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    *,
    dfeats: torch.Tensor | None = None,
    row_groups: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward kernels. Returns dfeats (k, N, C) contiguous, dweight, dln_weight, dln_bias."""
    K, N, C = feats.shape
    J = weight.shape[0]
    ln_weight = ln_weight if ln_weight.stride(-1) == 1 else ln_weight.contiguous()
    dev = feats.device
    precision = dot_precision(feats.dtype)
    split_w = feats.dtype != torch.float32

    c1 = torch.empty((J, N), dtype=torch.float32, device=dev)
    c2 = torch.empty((J, N), dtype=torch.float32, device=dev)
    block_j, block_c, num_warps = _row_chunk(C)
    _mix_ln_bwd_stats_kernel[(N, triton.cdiv(J, block_j))](
        feats, weight, ln_weight, dout, mean, rstd, c1, c2,
        *feats.stride(), *weight.stride(), ln_weight.stride(0), *dout.stride(),
        N, C, K, J,
        BLOCK_J=block_j, BLOCK_K=16, BLOCK_C=block_c, SPLIT_W=split_w, DOT_PRECISION=precision,
        num_warps=num_warps,
    )

    block_j, block_k, block_c, rows = _main_tile(J, K)
    n_cblocks = triton.cdiv(C, block_c)
    if row_groups is None:
        row_groups = max(1, (8 * num_sms(dev)) // n_cblocks)
    rows_per_group = triton.cdiv(triton.cdiv(N, min(row_groups, N)), rows) * rows
    groups = triton.cdiv(N, rows_per_group)
    if dfeats is None:
        dfeats = torch.empty((K, N, C), dtype=feats.dtype, device=dev)
    dw_part = torch.empty((groups, n_cblocks, J, K), dtype=torch.float32, device=dev)
    dgamma_part = torch.empty((groups, J, C), dtype=torch.float32, device=dev)
    dbeta_part = torch.empty((groups, J, C), dtype=torch.float32, device=dev)
    _mix_ln_bwd_main_kernel[(n_cblocks, groups)](
        feats, weight, ln_weight, dout, mean, rstd, c1, c2, dfeats, dw_part, dgamma_part, dbeta_part,
        *feats.stride(), *weight.stride(), ln_weight.stride(0), *dout.stride(),
        N, C, K, J, rows_per_group,
        BLOCK_J=block_j, BLOCK_K=block_k, BLOCK_C=block_c, ROWS=rows, SPLIT_W=split_w, DOT_PRECISION=precision,
        num_warps=8,
    )
    dweight = dw_part.sum(dim=(0, 1))
    dgamma = dgamma_part.sum(dim=0)
    dbeta = dbeta_part.sum(dim=0)
    return dfeats, dweight, dgamma, dbeta


# --------------------------------------------------------------------------------------------------------------
# Custom ops
# --------------------------------------------------------------------------------------------------------------


def _feature_mix_bwd_launch(dout, feats, weight, ln_weight, mean, rstd):
    dfeats, dweight, dgamma, dbeta = feature_mix_backward(dout, feats, weight, ln_weight, mean, rstd)
    return dfeats, dweight.to(weight.dtype), dgamma.to(ln_weight.dtype), dbeta.to(ln_weight.dtype)


def _feature_mix_fake(feats, weight, ln_weight, ln_bias, eps):
    _, N, C = feats.shape
    stats = feats.new_empty((weight.shape[0], N), dtype=torch.float32)
    return feats.new_empty((weight.shape[0], N, C)), stats, torch.empty_like(stats)


_feature_mix_bwd_op = kernel_op(
    "crossmae::feature_mix_bwd(Tensor dout, Tensor feats, Tensor weight, Tensor ln_weight, Tensor mean, "
    "Tensor rstd) -> (Tensor, Tensor, Tensor, Tensor)",
    _feature_mix_bwd_launch,
    fake=lambda dout, feats, weight, ln_weight, mean, rstd: (
        feats.new_empty(feats.shape), weight.new_empty(weight.shape), ln_weight.new_empty(ln_weight.shape),
        ln_weight.new_empty(ln_weight.shape)),
)

_feature_mix_fwd_op = fused_op(
    "crossmae::feature_mix_fwd(Tensor feats, Tensor weight, Tensor ln_weight, Tensor ln_bias, float eps) -> "
    "(Tensor out, Tensor mean, Tensor rstd)",
    feature_mix_forward,
    fake=_feature_mix_fake,
    save=("feats", "weight", "ln_weight", "mean", "rstd"),
    differentiable=("out",),
    grads=("feats", "weight", "ln_weight", "ln_bias"),
    backward=lambda saved, grad_out: _feature_mix_bwd_op(grad_out, saved.feats, saved.weight, saved.ln_weight,
                                                         saved.mean, saved.rstd),
)


# --------------------------------------------------------------------------------------------------------------
# Public function
# --------------------------------------------------------------------------------------------------------------


def feature_mix_layernorm(
    feats: torch.Tensor,
    weight: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float = 1e-6,
) -> torch.Tensor:
    """out[j] = LayerNorm_j(sum_i weight[j, i] * feats[i]) with per-j affine ln_weight[j], ln_bias[j].

    feats (k, N, C) any strides, weight (depth, k), ln_weight / ln_bias (depth, C) -> (depth, N, C) contiguous in
    feats.dtype. Differentiable in all four tensors; traceable by torch.compile (custom op
    `crossmae::feature_mix_fwd`). Falls back to `kernels.reference.feature_mix_layernorm_reference` when Triton
    cannot run on these tensors (CPU without TRITON_INTERPRET=1).
    """
    _check_inputs(feats, weight, ln_weight, ln_bias)
    if not triton_can_run(feats, weight, ln_weight, ln_bias):
        return reference.feature_mix_layernorm_reference(feats, weight, ln_weight, ln_bias, eps)
    out, _, _ = _feature_mix_fwd_op(feats, weight, ln_weight, ln_bias, float(eps))
    return out
