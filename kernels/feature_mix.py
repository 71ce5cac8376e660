"""Inter-block feature mixing (CrossMAE's IBA): out[j] = LayerNorm_j(sum_i W[j, i] * f_i), forward and backward.

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
    Forward: one program per (row n, block of 16 decoder blocks): the mix for all j is one small dot
    W (16 x k) @ F_n (k x C), then each row of the tile is layer-normalised in registers and written once.
    Backward, two kernels, deterministic (no atomics):
    1. per row n: recompute the mix, c1 = mean_c(g), c2 = mean_c(g * xhat) with g = dout * gamma.
    2. per (C chunk, group of rows): dy = rstd * (g - c1 - xhat * c2); dfeats = W^T dy (written once);
       partial sums of dW = dy F^T, dgamma = sum dout * xhat, dbeta = sum dout per program, reduced in torch.

Tested on
    CPU interpreter only (TRITON_INTERPRET=1, triton 3.7.1, torch 2.13 CPU, 2026-11); not yet run on a GPU.
    Every launch at CrossMAE's shapes also compiles for sm_90 (Triton 3.7.1 code generator + bundled ptxas,
    no GPU: tests/test_kernels_compile.py, which prints registers / spills); Triton 3.6 is untested.
    Warp counts and chunk sizes are first guesses, not tuned.

Caveats
    * Whole rows live in registers in the forward (BLOCK_C = next power of two of C, 16 warps from C > 512):
      fine up to C = 2048 (ViT-H's 1280); larger C would spill.
    * Performance risks to check on a GPU: each forward program re-reads the (depth, C) LayerNorm parameters
      (from L2; fp32 parameters are ~2x the bytes of a bf16 row's DRAM traffic), and the backward reads the
      features and dout twice (stats kernel, then main kernel): about 1.65x the minimal traffic.
    * The 3xTF32 dot mode ("tf32x3", backward with fp16/bf16 inputs) has not been compiled on a GPU yet; if it
      fails there, `kernels._runtime.dot_precision` is the one switch (to "ieee": exact, slower).
    * Without Triton able to run (CPU tensors, no TRITON_INTERPRET) `feature_mix_layernorm` falls back to
      `kernels.reference.feature_mix_layernorm_reference`; the raw custom ops raise instead.
"""

import torch
import triton
import triton.language as tl

from . import reference
from ._runtime import check_dtype, dot_precision, next_pow2, num_sms, require_triton, triton_can_run

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
    BLOCK_C: tl.constexpr,
    SPLIT_W: tl.constexpr,  # fp16/bf16 features: split W in two (see _mix_dot)
    DOT_PRECISION: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs_j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    offs_c = tl.arange(0, BLOCK_C)
    mask_j = offs_j < J
    mask_c = offs_c < C
    mask_jc = mask_j[:, None] & mask_c[None, :]

    y = _mix_tile(feats_ptr, w_ptr, row, offs_j, mask_j, offs_c, mask_c, stride_fk, stride_fn, stride_fc,
                  stride_wj, stride_wk, K, BLOCK_J, BLOCK_K, BLOCK_C, SPLIT_W, DOT_PRECISION)
    mean = tl.sum(y, 1) / C
    diff = tl.where(mask_c[None, :], y - mean[:, None], 0.0)
    var = tl.sum(diff * diff, 1) / C
    rstd = 1.0 / tl.sqrt(var + eps)
    gamma = tl.load(gamma_ptr + offs_j[:, None] * stride_gj + offs_c[None, :], mask=mask_jc, other=0.0)
    beta = tl.load(beta_ptr + offs_j[:, None] * stride_bj + offs_c[None, :], mask=mask_jc, other=0.0)
    out = diff * rstd[:, None] * gamma.to(tl.float32) + beta.to(tl.float32)

    out_offs = (offs_j[:, None].to(tl.int64) * N + row) * C + offs_c[None, :]
    tl.store(out_ptr + out_offs, out.to(out_ptr.dtype.element_ty), mask=mask_jc)
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
    BLOCK_C: tl.constexpr,
    SPLIT_W: tl.constexpr,  # fp16/bf16 features: split W in two (see _mix_dot)
    DOT_PRECISION: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs_j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    offs_c = tl.arange(0, BLOCK_C)
    mask_j = offs_j < J
    mask_c = offs_c < C
    mask_jc = mask_j[:, None] & mask_c[None, :]

    y = _mix_tile(feats_ptr, w_ptr, row, offs_j, mask_j, offs_c, mask_c, stride_fk, stride_fn, stride_fc,
                  stride_wj, stride_wk, K, BLOCK_J, BLOCK_K, BLOCK_C, SPLIT_W, DOT_PRECISION)
    stat_offs = offs_j.to(tl.int64) * N + row
    mean = tl.load(mean_ptr + stat_offs, mask=mask_j, other=0.0)
    rstd = tl.load(rstd_ptr + stat_offs, mask=mask_j, other=0.0)
    xhat = (y - mean[:, None]) * rstd[:, None]
    gamma = tl.load(gamma_ptr + offs_j[:, None] * stride_gj + offs_c[None, :], mask=mask_jc, other=0.0)
    dout = tl.load(dout_ptr + offs_j[:, None].to(tl.int64) * stride_dj + row * stride_dn + offs_c[None, :] * stride_dc,
                   mask=mask_jc, other=0.0)
    g = dout.to(tl.float32) * gamma.to(tl.float32)  # zero outside the valid tile
    tl.store(c1_ptr + stat_offs, tl.sum(g, 1) / C, mask=mask_j)
    tl.store(c2_ptr + stat_offs, tl.sum(g * xhat, 1) / C, mask=mask_j)


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
    rows_per_group,
    BLOCK_J: tl.constexpr,  # >= J: all decoder blocks in one tile (dfeats sums over them)
    BLOCK_K: tl.constexpr,  # >= K: all feature maps in one tile (dW accumulates per map)
    BLOCK_C: tl.constexpr,  # chunk of channels handled by this program
    SPLIT_W: tl.constexpr,  # fp16/bf16 features: split W in two (see _mix_dot)
    DOT_PRECISION: tl.constexpr,  # for the fp32-operand dots (dfeats, dW): "ieee" or "tf32x3"
):
    pid_c = tl.program_id(0)
    pid_g = tl.program_id(1)
    offs_j = tl.arange(0, BLOCK_J)
    offs_k = tl.arange(0, BLOCK_K)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_j = offs_j < J
    mask_k = offs_k < K
    mask_c = offs_c < C
    mask_jc = mask_j[:, None] & mask_c[None, :]
    mask_kc = mask_k[:, None] & mask_c[None, :]

    w = tl.load(w_ptr + offs_j[:, None] * stride_wj + offs_k[None, :] * stride_wk,
                mask=mask_j[:, None] & mask_k[None, :], other=0.0).to(tl.float32)  # (BLOCK_J, BLOCK_K)
    wt = tl.trans(w)
    gamma = tl.load(gamma_ptr + offs_j[:, None] * stride_gj + offs_c[None, :], mask=mask_jc,
                    other=0.0).to(tl.float32)

    dw = tl.zeros([BLOCK_J, BLOCK_K], dtype=tl.float32)
    dgamma = tl.zeros([BLOCK_J, BLOCK_C], dtype=tl.float32)
    dbeta = tl.zeros([BLOCK_J, BLOCK_C], dtype=tl.float32)
    # int64 bounds make the loop index int64 (row * stride may exceed 2**31)
    row_start = pid_g.to(tl.int64) * rows_per_group
    row_end = tl.minimum(row_start + rows_per_group, N)
    for row in range(row_start, row_end):
        f = tl.load(feats_ptr + offs_k[:, None].to(tl.int64) * stride_fk + row * stride_fn
                    + offs_c[None, :] * stride_fc, mask=mask_kc, other=0.0)  # (BLOCK_K, BLOCK_C)
        y = _mix_dot(w, f, tl.zeros([BLOCK_J, BLOCK_C], dtype=tl.float32), SPLIT_W, DOT_PRECISION)
        stat_offs = offs_j.to(tl.int64) * N + row
        mean = tl.load(mean_ptr + stat_offs, mask=mask_j, other=0.0)
        rstd = tl.load(rstd_ptr + stat_offs, mask=mask_j, other=0.0)
        c1 = tl.load(c1_ptr + stat_offs, mask=mask_j, other=0.0)
        c2 = tl.load(c2_ptr + stat_offs, mask=mask_j, other=0.0)
        dout = tl.load(dout_ptr + offs_j[:, None].to(tl.int64) * stride_dj + row * stride_dn
                       + offs_c[None, :] * stride_dc, mask=mask_jc, other=0.0).to(tl.float32)
        xhat = (y - mean[:, None]) * rstd[:, None]
        dy = rstd[:, None] * (dout * gamma - c1[:, None] - xhat * c2[:, None])
        dy = tl.where(mask_jc, dy, 0.0)
        df = tl.dot(wt, dy, input_precision=DOT_PRECISION)  # (BLOCK_K, BLOCK_C)
        tl.store(dfeats_ptr + (offs_k[:, None].to(tl.int64) * N + row) * C + offs_c[None, :],
                 df.to(dfeats_ptr.dtype.element_ty), mask=mask_kc)
        dw = tl.dot(dy, tl.trans(f.to(tl.float32)), dw, input_precision=DOT_PRECISION)
        dgamma += dout * xhat  # dout is zero outside the valid tile
        dbeta += dout

    n_cblocks = tl.num_programs(0)
    dw_offs = ((pid_g * n_cblocks + pid_c) * J + offs_j[:, None]) * K + offs_k[None, :]
    tl.store(dw_part_ptr + dw_offs, dw, mask=mask_j[:, None] & mask_k[None, :])
    part_offs = (pid_g.to(tl.int64) * J + offs_j[:, None]) * C + offs_c[None, :]
    tl.store(dgamma_part_ptr + part_offs, dgamma, mask=mask_jc)
    tl.store(dbeta_part_ptr + part_offs, dbeta, mask=mask_jc)


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


def _row_tile(C: int) -> tuple[int, int, int]:
    """(BLOCK_J, BLOCK_C, num_warps) for the whole-row kernels."""
    block_c = next_pow2(C, 16)
    block_j = 16
    num_warps = max(4, min(16, block_j * block_c // 1024))
    return block_j, block_c, num_warps


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
    block_j, block_c, num_warps = _row_tile(C)
    split_w = feats.dtype != torch.float32
    _mix_ln_fwd_kernel[(N, triton.cdiv(J, block_j))](
        feats, weight, ln_weight, ln_bias, out, mean, rstd,
        *feats.stride(), *weight.stride(), ln_weight.stride(0), ln_bias.stride(0),
        N, C, K, J, eps,
        BLOCK_J=block_j, BLOCK_K=16, BLOCK_C=block_c, SPLIT_W=split_w,
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
    block_j, block_c, num_warps = _row_tile(C)
    _mix_ln_bwd_stats_kernel[(N, triton.cdiv(J, block_j))](
        feats, weight, ln_weight, dout, mean, rstd, c1, c2,
        *feats.stride(), *weight.stride(), ln_weight.stride(0), *dout.stride(),
        N, C, K, J,
        BLOCK_J=block_j, BLOCK_K=16, BLOCK_C=block_c, SPLIT_W=split_w, DOT_PRECISION=precision,
        num_warps=num_warps,
    )

    block_j = next_pow2(J, 16)
    block_k = next_pow2(K, 16)
    # (16 x 32) channel chunks keep the main kernel at ~230 registers without spills (ptxas -v, sm_90, bf16)
    block_c = max(16, min(next_pow2(C), 512 // max(block_j, block_k)))
    n_cblocks = triton.cdiv(C, block_c)
    if row_groups is None:
        row_groups = max(1, (8 * num_sms(dev)) // n_cblocks)
    rows_per_group = triton.cdiv(N, min(row_groups, N))
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
        BLOCK_J=block_j, BLOCK_K=block_k, BLOCK_C=block_c, SPLIT_W=split_w, DOT_PRECISION=precision,
        num_warps=8,
    )
    dweight = dw_part.sum(dim=(0, 1))
    dgamma = dgamma_part.sum(dim=0)
    dbeta = dbeta_part.sum(dim=0)
    return dfeats, dweight, dgamma, dbeta


# --------------------------------------------------------------------------------------------------------------
# Custom ops
# --------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("crossmae::feature_mix_fwd", mutates_args=())
def _feature_mix_fwd_op(feats: torch.Tensor, weight: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor,
                        eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    require_triton("feature_mix_layernorm", feats, weight, ln_weight, ln_bias)
    return feature_mix_forward(feats, weight, ln_weight, ln_bias, eps)


@_feature_mix_fwd_op.register_fake
def _(feats, weight, ln_weight, ln_bias, eps):
    _, N, C = feats.shape
    J = weight.shape[0]
    stats = feats.new_empty((J, N), dtype=torch.float32)
    return feats.new_empty((J, N, C)), stats, torch.empty_like(stats)


@torch.library.custom_op("crossmae::feature_mix_bwd", mutates_args=())
def _feature_mix_bwd_op(dout: torch.Tensor, feats: torch.Tensor, weight: torch.Tensor, ln_weight: torch.Tensor,
                        mean: torch.Tensor, rstd: torch.Tensor) -> tuple[
        torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    require_triton("feature_mix_layernorm backward", feats, weight, ln_weight)
    dfeats, dweight, dgamma, dbeta = feature_mix_backward(dout, feats, weight, ln_weight, mean, rstd)
    return dfeats, dweight.to(weight.dtype), dgamma.to(ln_weight.dtype), dbeta.to(ln_weight.dtype)


@_feature_mix_bwd_op.register_fake
def _(dout, feats, weight, ln_weight, mean, rstd):
    return (feats.new_empty(feats.shape), weight.new_empty(weight.shape), ln_weight.new_empty(ln_weight.shape),
            ln_weight.new_empty(ln_weight.shape))


def _feature_mix_setup_context(ctx, inputs, output):
    feats, weight, ln_weight, ln_bias, _ = inputs
    _, mean, rstd = output
    ctx.save_for_backward(feats, weight, ln_weight, mean, rstd)
    ctx.bias_dtype = ln_bias.dtype
    ctx.mark_non_differentiable(mean, rstd)


def _feature_mix_backward_formula(ctx, grad_out, grad_mean, grad_rstd):
    feats, weight, ln_weight, mean, rstd = ctx.saved_tensors
    dfeats, dweight, dgamma, dbeta = _feature_mix_bwd_op(grad_out, feats, weight, ln_weight, mean, rstd)
    return dfeats, dweight, dgamma, dbeta.to(ctx.bias_dtype), None


_feature_mix_fwd_op.register_autograd(_feature_mix_backward_formula, setup_context=_feature_mix_setup_context)


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
