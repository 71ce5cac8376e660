"""Index-driven gathers and scatters of CrossMAE's masking: visible tokens, query position rows, target patches.

Supported
    gather_visible(x, pos, ids)   x (B, L, C) any strides, pos (L, C), ids (B, n) -> (B, n, C) contiguous in
                                  x.dtype: x[b, ids] + pos[ids] (sum in fp32). Gradients to x and, if it
                                  requires grad, to pos.
    gather_rows(table, ids)       table (L, D), ids (B, n) -> (B, n, D) in table.dtype; gradient to table
                                  (scatter-add over b and t).
    gather_target_patches(imgs, ids, patch_size, norm_pix=True, eps=1e-6)
                                  imgs (B, c, H, W) any strides -> targets (B, n, p*p*c) in imgs.dtype, patch
                                  layout (h, w, p, q, c) (rows, columns, channel), each patch normalised by its
                                  own mean and unbiased variance if norm_pix; mean, var (B, n, 1) fp32 always.
                                  No gradient (targets are constants; imgs is detached).
    gather_patches(imgs, ids, patch_size)
                                  imgs (B, c, H, W) any strides -> the raw patches (B, n, p*p*c) in imgs.dtype,
                                  same layout; gradient to imgs (patch gradients summed into a zero image).
    scatter_patches(patches, ids, img_size, patch_size, base=None)
                                  patches (B, n, p*p*c) -> (B, c, H, W) contiguous in patches.dtype: patches
                                  pasted at ids on top of `base` (else zeros). Gradients to patches and base.
    ids: int64 (or int32) patch / row indices in [0, L), any strides. Out-of-range ids are NOT checked (that
    would need a host sync): on a GPU they read or write out of bounds. fp16 / bf16 / fp32 data, any C, any p.
    Static shapes only, no host synchronisation, no boolean indexing.

Algorithm
    Forward gathers: one program per (block of rows, chunk of channels) or per patch, reading each source
    element once and writing each output element exactly once. A patch is read plane by plane with the column
    fastest (coalesced runs of one image row, not three planes interleaved per warp) and permuted in registers
    to the (p, q, c) output order.
    Scatters and gradients are computed in gather form through an inverse index built on the device:
    inv[b, l] = the largest t with ids[b, t] == l (or -1) and cnt[b, l] = how many t hit l (int32 atomics,
    deterministic). Each output element is then written once, without float atomics:
    * d/dx of gather_visible: dx[b, l] = dout[b, inv[b, l]] (0 where no id hits l);
    * d/dtable of gather_rows: dtable[l] = sum_b dout[b, inv[b, l]], in fp32, in a fixed order over b;
    * rows hit by duplicate ids (cnt > 1) take a slow path summing every matching t in order, so duplicate ids
      give the exact scatter-add gradient, still deterministic;
    * scatter_patches writes every image pixel once (the patch value where a patch lands, else base or 0).
      With duplicate ids the LAST occurrence wins (and only it receives the gradient).
    * d/dimgs of gather_patches is the same pixel-by-pixel write of the patch gradients into a zero image;
      pixels of patches hit by duplicate ids (cnt > 1) sum every matching t in order (scatter-add, deterministic).

Tested on
    CPU interpreter only (TRITON_INTERPRET=1, triton 3.7.1, torch 2.13 CPU, 2026-12-01); not yet run on a GPU.
    Every launch of the S/B/L/H training steps compiles for sm_90 and sm_80 through Triton's launch-time
    specialisation, without spills (tests/test_kernels_compile.py; bench/results/kernel_resources.md);
    Triton 3.6 is untested. Block sizes are first guesses, not tuned.

Caveats
    * Without Triton able to run (CPU tensors, no TRITON_INTERPRET) the public functions fall back to the
      `kernels.reference` versions; the raw custom ops raise instead.
    * B * L, B * n < 2**31 (row indices are int32; element offsets are int64).
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from . import reference
from ._runtime import check_dtype, next_pow2, require_triton, triton_can_run

# --------------------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------------------


@triton.jit
def _gather_rows_kernel(
    x_ptr,  # (B, L, C) any strides; read only when HAS_X
    table_ptr,  # (L, C) any strides
    ids_ptr,  # (B, n) int64/int32 any strides
    out_ptr,  # (B, n, C) contiguous
    stride_xb, stride_xl, stride_xc,
    stride_tl, stride_tc,
    stride_ib, stride_it,
    num_rows, n_ids, C,  # num_rows = B * n
    HAS_X: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_r = rows < num_rows
    mask = mask_r[:, None] & (offs_c < C)[None, :]
    b = (rows // n_ids).to(tl.int64)
    t = rows % n_ids
    idx = tl.load(ids_ptr + b * stride_ib + t * stride_it, mask=mask_r, other=0).to(tl.int64)
    val = tl.load(table_ptr + idx[:, None] * stride_tl + offs_c[None, :] * stride_tc, mask=mask, other=0.0)
    val = val.to(tl.float32)
    if HAS_X:
        xv = tl.load(x_ptr + b[:, None] * stride_xb + idx[:, None] * stride_xl + offs_c[None, :] * stride_xc,
                     mask=mask, other=0.0)
        val += xv.to(tl.float32)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * C + offs_c[None, :], val.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _inverse_index_kernel(
    ids_ptr,  # (B, n) int64/int32 any strides
    inv_ptr,  # (B, L) int32 contiguous, pre-filled with -1; out: largest t with ids[b, t] == l
    cnt_ptr,  # (B, L) int32 contiguous, pre-filled with 0; out: number of t with ids[b, t] == l
    stride_ib, stride_it,
    num_rows, n_ids, L,  # num_rows = B * n
    BLOCK: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = rows < num_rows
    b = (rows // n_ids).to(tl.int64)
    t = rows % n_ids
    idx = tl.load(ids_ptr + b * stride_ib + t * stride_it, mask=mask, other=0).to(tl.int64)
    dest = b * L + idx
    tl.atomic_max(inv_ptr + dest, t.to(tl.int32), mask=mask)
    tl.atomic_add(cnt_ptr + dest, tl.full([BLOCK], 1, tl.int32), mask=mask)


@triton.jit
def _rows_grad(
    dout_ptr,  # (B, n, C) any strides
    ids_ptr,  # (B, n) any strides
    inv,  # (BLOCK_R,) int32: inv[b, l] of these rows
    cnt,  # (BLOCK_R,) int32: cnt[b, l] of these rows (0 for masked rows)
    b,  # (BLOCK_R,) int64 batch index of these rows
    lrow,  # (BLOCK_R,) int64 table row of these rows
    offs_c, mask_c,
    stride_db, stride_dt, stride_dc,
    stride_ib, stride_it,
    n_ids,
):
    """sum over t with ids[b, t] == l of dout[b, t, c], fp32, (BLOCK_R, BLOCK_C)."""
    hit = inv >= 0
    d_rows = dout_ptr + b * stride_db
    val = tl.load(d_rows[:, None] + inv[:, None].to(tl.int64) * stride_dt + offs_c[None, :] * stride_dc,
                  mask=hit[:, None] & mask_c[None, :], other=0.0).to(tl.float32)
    if tl.max(cnt, 0) > 1:
        # Duplicate ids in some row of this block: sum every matching t, in order (deterministic).
        acc = tl.zeros(val.shape, dtype=tl.float32)
        for t in range(0, n_ids):
            id_t = tl.load(ids_ptr + b * stride_ib + t * stride_it, mask=hit, other=-1).to(tl.int64)
            match = (id_t == lrow) & hit
            acc += tl.load(d_rows[:, None] + t * stride_dt + offs_c[None, :] * stride_dc,
                           mask=match[:, None] & mask_c[None, :], other=0.0).to(tl.float32)
        val = tl.where((cnt > 1)[:, None], acc, val)
    return val


@triton.jit
def _gather_rows_bwd_x_kernel(
    dout_ptr,  # (B, n, C) any strides
    ids_ptr,  # (B, n) any strides
    inv_ptr,  # (B, L) int32 contiguous
    cnt_ptr,  # (B, L) int32 contiguous
    dx_ptr,  # (B, L, C) contiguous
    stride_db, stride_dt, stride_dc,
    stride_ib, stride_it,
    num_rows, L, n_ids, C,  # num_rows = B * L
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_r = rows < num_rows
    mask_c = offs_c < C
    inv = tl.load(inv_ptr + rows, mask=mask_r, other=-1)
    cnt = tl.load(cnt_ptr + rows, mask=mask_r, other=0)
    b = (rows // L).to(tl.int64)
    lrow = (rows % L).to(tl.int64)
    val = _rows_grad(dout_ptr, ids_ptr, inv, cnt, b, lrow, offs_c, mask_c, stride_db, stride_dt, stride_dc,
                     stride_ib, stride_it, n_ids)
    tl.store(dx_ptr + rows[:, None].to(tl.int64) * C + offs_c[None, :], val.to(dx_ptr.dtype.element_ty),
             mask=mask_r[:, None] & mask_c[None, :])


@triton.jit
def _gather_rows_bwd_table_kernel(
    dout_ptr,  # (B, n, C) any strides
    ids_ptr,  # (B, n) any strides
    inv_ptr,  # (B, L) int32 contiguous
    cnt_ptr,  # (B, L) int32 contiguous
    dtable_ptr,  # (L, C) contiguous
    stride_db, stride_dt, stride_dc,
    stride_ib, stride_it,
    B, L, n_ids, C,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # table rows l
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_r = rows < L
    mask_c = offs_c < C
    lrow = rows.to(tl.int64)
    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    for b in range(0, B):
        bb = tl.zeros([BLOCK_R], dtype=tl.int64) + b
        inv = tl.load(inv_ptr + bb * L + lrow, mask=mask_r, other=-1)
        cnt = tl.load(cnt_ptr + bb * L + lrow, mask=mask_r, other=0)
        acc += _rows_grad(dout_ptr, ids_ptr, inv, cnt, bb, lrow, offs_c, mask_c, stride_db, stride_dt, stride_dc,
                          stride_ib, stride_it, n_ids)
    tl.store(dtable_ptr + lrow[:, None] * C + offs_c[None, :], acc.to(dtable_ptr.dtype.element_ty),
             mask=mask_r[:, None] & mask_c[None, :])


@triton.jit
def _patchify_kernel(
    imgs_ptr,  # (B, c, H, W) any strides
    ids_ptr,  # (B, n) any strides
    inv_ptr,  # (B, L) int32 contiguous; read only when OWNER_ONLY
    out_ptr,  # (B, n, P) contiguous, P = PATCH * PATCH * CHANNELS
    mean_ptr,  # (B, n) fp32 contiguous; written only when STATS
    var_ptr,  # (B, n) fp32 contiguous; written only when STATS
    stride_b, stride_c, stride_h, stride_w,
    stride_ib, stride_it,
    n_ids, grid_w, L,  # grid_w = W // PATCH patches per image row
    eps,
    PATCH: tl.constexpr,
    CHANNELS: tl.constexpr,
    BLOCK_Q: tl.constexpr,  # next power of two of PATCH
    BLOCK_CH: tl.constexpr,  # next power of two of CHANNELS
    STATS: tl.constexpr,  # compute mean and unbiased variance of the raw patch
    NORM: tl.constexpr,  # normalise the patch by them
    OWNER_ONLY: tl.constexpr,  # zero the patch unless t is the last occurrence of its id (scatter backward)
):
    pid = tl.program_id(0).to(tl.int64)  # = b * n + t
    b = pid // n_ids
    t = pid % n_ids
    patch = tl.load(ids_ptr + b * stride_ib + t * stride_it).to(tl.int64)
    gh = patch // grid_w
    gw = patch % grid_w
    P = PATCH * PATCH * CHANNELS  # constexpr arithmetic
    # Read the patch plane by plane, (channel, row, column) with the column fastest, so consecutive lanes load
    # consecutive pixels of one image row (coalesced); the (row, column, channel) output order is restored by
    # a register permute before the store.
    ch = tl.arange(0, BLOCK_CH)[:, None, None]
    r = tl.arange(0, BLOCK_Q)[None, :, None]
    col = tl.arange(0, BLOCK_Q)[None, None, :]
    mask = (ch < CHANNELS) & (r < PATCH) & (col < PATCH)
    x = tl.load(imgs_ptr + b * stride_b + ch * stride_c + (gh * PATCH + r) * stride_h + (gw * PATCH + col) * stride_w,
                mask=mask, other=0.0).to(tl.float32)  # (BLOCK_CH, BLOCK_Q, BLOCK_Q)
    if STATS:
        mean = tl.sum(tl.sum(tl.sum(x, 2), 1), 0) / P
        diff = tl.where(mask, x - mean, 0.0)
        var = tl.sum(tl.sum(tl.sum(diff * diff, 2), 1), 0) / (P - 1)
        tl.store(mean_ptr + pid, mean)
        tl.store(var_ptr + pid, var)
        if NORM:
            x = diff / tl.sqrt(var + eps)
    if OWNER_ONLY:
        owner = tl.load(inv_ptr + b * L + patch)
        x = tl.where(owner == t, x, 0.0)
    x = tl.permute(x, (1, 2, 0))  # (row, column, channel)
    r_o = tl.arange(0, BLOCK_Q)[:, None, None]
    col_o = tl.arange(0, BLOCK_Q)[None, :, None]
    ch_o = tl.arange(0, BLOCK_CH)[None, None, :]
    mask_o = (r_o < PATCH) & (col_o < PATCH) & (ch_o < CHANNELS)
    tl.store(out_ptr + pid * P + (r_o * PATCH + col_o) * CHANNELS + ch_o, x.to(out_ptr.dtype.element_ty),
             mask=mask_o)


@triton.jit
def _unpatchify_kernel(
    patches_ptr,  # (B, n, P) any strides; read only when HAS_PATCHES
    inv_ptr,  # (B, L) int32 contiguous: which t lands on patch l (-1: none)
    cnt_ptr,  # (B, L) int32 contiguous: how many t land on patch l; read only when SUM_DUPLICATES
    ids_ptr,  # (B, n) any strides; read only when SUM_DUPLICATES
    base_ptr,  # (B, c, H, W) any strides; read only when HAS_BASE
    out_ptr,  # (B, c, H, W) contiguous
    stride_pb, stride_pt, stride_pe,
    stride_ib, stride_it,
    stride_bb, stride_bc, stride_bh, stride_bw,
    num_rows, H, W, L, grid_w, n_ids,  # num_rows = B * c * H image rows
    PATCH: tl.constexpr,
    CHANNELS: tl.constexpr,
    HAS_PATCHES: tl.constexpr,  # False: write base where no patch lands and 0 elsewhere (d/dbase)
    HAS_BASE: tl.constexpr,
    SUM_DUPLICATES: tl.constexpr,  # a patch hit by several t gets their sum (gather gradient), else the last t
    BLOCK_Y: tl.constexpr,
    BLOCK_X: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_Y + tl.arange(0, BLOCK_Y)
    xs = tl.program_id(1) * BLOCK_X + tl.arange(0, BLOCK_X)
    mask_r = rows < num_rows
    mask = mask_r[:, None] & (xs < W)[None, :]
    y = rows % H
    ch = (rows // H) % CHANNELS
    b = (rows // (H * CHANNELS)).to(tl.int64)
    patch = (y // PATCH)[:, None] * grid_w + (xs // PATCH)[None, :]  # (BLOCK_Y, BLOCK_X)
    t = tl.load(inv_ptr + b[:, None] * L + patch, mask=mask, other=-1)
    pasted = t >= 0
    val = tl.zeros([BLOCK_Y, BLOCK_X], dtype=tl.float32)
    if HAS_BASE:
        bv = tl.load(base_ptr + b[:, None] * stride_bb + ch[:, None] * stride_bc + y[:, None] * stride_bh
                     + xs[None, :] * stride_bw, mask=mask & ~pasted, other=0.0)
        val = bv.to(tl.float32)
    if HAS_PATCHES:
        e = ((y % PATCH)[:, None] * PATCH + (xs % PATCH)[None, :]) * CHANNELS + ch[:, None]
        p_rows = patches_ptr + b[:, None] * stride_pb
        pv = tl.load(p_rows + t.to(tl.int64) * stride_pt + e * stride_pe, mask=mask & pasted, other=0.0)
        val = tl.where(pasted, pv.to(tl.float32), val)
        if SUM_DUPLICATES:
            cnt = tl.load(cnt_ptr + b[:, None] * L + patch, mask=mask, other=0)
            if tl.max(tl.max(cnt, 1), 0) > 1:
                # Some pixel of this tile is hit by duplicate ids: sum every matching t, in order (deterministic).
                acc = tl.zeros([BLOCK_Y, BLOCK_X], dtype=tl.float32)
                for s in range(0, n_ids):
                    id_s = tl.load(ids_ptr + b * stride_ib + s * stride_it, mask=mask_r, other=-1).to(tl.int64)
                    match = (id_s[:, None] == patch) & mask
                    acc += tl.load(p_rows + s * stride_pt + e * stride_pe, mask=match, other=0.0).to(tl.float32)
                val = tl.where(cnt > 1, acc, val)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * W + xs[None, :], val.to(out_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------------------
# Host functions
# --------------------------------------------------------------------------------------------------------------

_ROWS = 4  # rows per program of the row gathers: 4 x 256 tiles compile to ~40-60 registers (ptxas -v, sm_90)


def _col_block(C: int) -> int:
    return min(next_pow2(C, 16), 256)


def _check_ids(op: str, ids: torch.Tensor, batch: int | None = None) -> None:
    if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"kernels.{op}: ids must be (B, n) int64 or int32, got {tuple(ids.shape)} {ids.dtype}")
    if batch is not None and ids.shape[0] != batch:
        raise ValueError(f"kernels.{op}: ids has batch {ids.shape[0]}, expected {batch}")


def inverse_index(ids: torch.Tensor, num_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """inv (B, L) int32: largest t with ids[b, t] == l, else -1; cnt (B, L) int32: number of such t."""
    B, n = ids.shape
    inv = torch.full((B, num_rows), -1, dtype=torch.int32, device=ids.device)
    cnt = torch.zeros((B, num_rows), dtype=torch.int32, device=ids.device)
    block = 256
    _inverse_index_kernel[(triton.cdiv(B * n, block),)](ids, inv, cnt, *ids.stride(), B * n, n, num_rows, BLOCK=block)
    return inv, cnt


def gather_rows_forward(x: torch.Tensor | None, table: torch.Tensor, ids: torch.Tensor,
                        *, out: torch.Tensor | None = None) -> torch.Tensor:
    """out[b, t] = table[ids[b, t]] (+ x[b, ids[b, t]] when x is given), in x's dtype (else table's)."""
    B, n = ids.shape
    C = table.shape[1]
    dtype = x.dtype if x is not None else table.dtype
    if out is None:
        out = torch.empty((B, n, C), dtype=dtype, device=table.device)
    block_c = _col_block(C)
    xs = x if x is not None else table
    x_strides = x.stride() if x is not None else (0, 0, 0)
    _gather_rows_kernel[(triton.cdiv(B * n, _ROWS), triton.cdiv(C, block_c))](
        xs, table, ids, out, *x_strides, *table.stride(), *ids.stride(), B * n, n, C,
        HAS_X=x is not None, BLOCK_R=_ROWS, BLOCK_C=block_c,
    )
    return out


def gather_rows_backward_x(dout: torch.Tensor, ids: torch.Tensor, num_rows: int,
                           *, dx: torch.Tensor | None = None) -> torch.Tensor:
    """dx (B, L, C) in dout.dtype: dx[b, l] = sum over t with ids[b, t] == l of dout[b, t]."""
    B, n, C = dout.shape
    inv, cnt = inverse_index(ids, num_rows)
    if dx is None:
        dx = torch.empty((B, num_rows, C), dtype=dout.dtype, device=dout.device)
    block_c = _col_block(C)
    _gather_rows_bwd_x_kernel[(triton.cdiv(B * num_rows, _ROWS), triton.cdiv(C, block_c))](
        dout, ids, inv, cnt, dx, *dout.stride(), *ids.stride(), B * num_rows, num_rows, n, C,
        BLOCK_R=_ROWS, BLOCK_C=block_c,
    )
    return dx


def gather_rows_backward_table(dout: torch.Tensor, ids: torch.Tensor, num_rows: int, dtype: torch.dtype,
                               *, dtable: torch.Tensor | None = None) -> torch.Tensor:
    """dtable (L, C): dtable[l] = sum over (b, t) with ids[b, t] == l of dout[b, t], fp32 sums in a fixed order."""
    B, n, C = dout.shape
    inv, cnt = inverse_index(ids, num_rows)
    if dtable is None:
        dtable = torch.empty((num_rows, C), dtype=dtype, device=dout.device)
    block_c = _col_block(C)
    _gather_rows_bwd_table_kernel[(triton.cdiv(num_rows, _ROWS), triton.cdiv(C, block_c))](
        dout, ids, inv, cnt, dtable, *dout.stride(), *ids.stride(), B, num_rows, n, C,
        BLOCK_R=_ROWS, BLOCK_C=block_c,
    )
    return dtable


def _check_image(op: str, H: int, W: int, p: int) -> tuple[int, int]:
    if p <= 0 or H % p or W % p:
        raise ValueError(f"kernels.{op}: image size ({H}, {W}) must be divisible by patch_size {p}")
    return H // p, W // p


def gather_target_patches_forward(imgs: torch.Tensor, ids: torch.Tensor, patch_size: int, norm_pix: bool,
                                  eps: float, *, out: torch.Tensor | None = None
                                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, c, H, W = imgs.shape
    p = patch_size
    grid_h, grid_w = _check_image("gather_target_patches", H, W, p)
    n = ids.shape[1]
    P = p * p * c
    if out is None:
        out = torch.empty((B, n, P), dtype=imgs.dtype, device=imgs.device)
    mean = torch.empty((B, n, 1), dtype=torch.float32, device=imgs.device)
    var = torch.empty((B, n, 1), dtype=torch.float32, device=imgs.device)
    _patchify_kernel[(B * n,)](
        imgs, ids, ids, out, mean, var, *imgs.stride(), *ids.stride(), n, grid_w, grid_h * grid_w, eps,
        STATS=True, NORM=norm_pix, OWNER_ONLY=False, **_patch_tile(p, c),
    )
    return out, mean, var


def gather_patches_forward(imgs: torch.Tensor, ids: torch.Tensor, patch_size: int,
                           *, out: torch.Tensor | None = None) -> torch.Tensor:
    """The raw patches of imgs (B, c, H, W) at ids (B, n): (B, n, p*p*c) contiguous in imgs.dtype."""
    B, c, H, W = imgs.shape
    p = patch_size
    grid_h, grid_w = _check_image("gather_patches", H, W, p)
    n = ids.shape[1]
    if out is None:
        out = torch.empty((B, n, p * p * c), dtype=imgs.dtype, device=imgs.device)
    _patchify_kernel[(B * n,)](
        imgs, ids, ids, out, out, out, *imgs.stride(), *ids.stride(), n, grid_w, grid_h * grid_w, 0.0,
        STATS=False, NORM=False, OWNER_ONLY=False, **_patch_tile(p, c),
    )
    return out


def gather_patches_backward(dpatches: torch.Tensor, ids: torch.Tensor, patch_size: int, height: int,
                            width: int) -> torch.Tensor:
    """d/dimgs of gather_patches: dpatches (B, n, p*p*c) summed into a zero (B, c, H, W) image at ids
    (duplicate ids add up, in order), contiguous in dpatches.dtype."""
    B, _, P = dpatches.shape
    p = patch_size
    c = P // (p * p)
    grid_h, grid_w = _check_image("gather_patches", height, width, p)
    inv, cnt = inverse_index(ids, grid_h * grid_w)
    dimg = torch.empty((B, c, height, width), dtype=dpatches.dtype, device=dpatches.device)
    _launch_unpatchify(dpatches, inv, None, dimg, p, c, grid_w, ids=ids, cnt=cnt)
    return dimg


def _patch_tile(p: int, c: int) -> dict:
    """Block sizes and warps of the patch gather: (channel, row, column) tiles padded to powers of two."""
    block_q, block_ch = next_pow2(p), next_pow2(c)
    return {"PATCH": p, "CHANNELS": c, "BLOCK_Q": block_q, "BLOCK_CH": block_ch,
            "num_warps": 4 if block_ch * block_q * block_q <= 1024 else 8}


def scatter_patches_forward(patches: torch.Tensor, ids: torch.Tensor, height: int, width: int, patch_size: int,
                            base: torch.Tensor | None, *, out: torch.Tensor | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns the image (B, c, H, W) and the inverse index inv (B, L) int32 (saved for the backward)."""
    B, _, P = patches.shape
    p = patch_size
    c = P // (p * p)
    grid_h, grid_w = _check_image("scatter_patches", height, width, p)
    L = grid_h * grid_w
    inv, _ = inverse_index(ids, L)
    if out is None:
        out = torch.empty((B, c, height, width), dtype=patches.dtype, device=patches.device)
    _launch_unpatchify(patches, inv, base, out, p, c, grid_w)
    return out, inv


def _launch_unpatchify(patches, inv, base, out, p, c, grid_w, *, ids=None, cnt=None) -> None:
    """Write `out` in gather form; with ids and cnt given, patches hit by duplicate ids are summed."""
    B, _, H, W = out.shape
    block_x = min(next_pow2(W, 16), 128)
    block_y = 8
    p_strides = patches.stride() if patches is not None else (0, 0, 0)
    b_strides = base.stride() if base is not None else (0, 0, 0, 0)
    sum_duplicates = cnt is not None
    i_strides = ids.stride() if sum_duplicates else (0, 0)
    _unpatchify_kernel[(triton.cdiv(B * c * H, block_y), triton.cdiv(W, block_x))](
        patches if patches is not None else out, inv, cnt if sum_duplicates else inv,
        ids if sum_duplicates else inv, base if base is not None else out, out,
        *p_strides, *i_strides, *b_strides, B * c * H, H, W, inv.shape[1], grid_w,
        ids.shape[1] if sum_duplicates else 0,
        PATCH=p, CHANNELS=c, HAS_PATCHES=patches is not None, HAS_BASE=base is not None,
        SUM_DUPLICATES=sum_duplicates, BLOCK_Y=block_y, BLOCK_X=block_x,
    )


def scatter_patches_backward(dimg: torch.Tensor, ids: torch.Tensor, inv: torch.Tensor, patch_size: int,
                             need_patches: bool, need_base: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    B, c, H, W = dimg.shape
    p = patch_size
    grid_w = W // p
    n = ids.shape[1]
    dpatches = dbase = None
    if need_patches:
        P = p * p * c
        dpatches = torch.empty((B, n, P), dtype=dimg.dtype, device=dimg.device)
        _patchify_kernel[(B * n,)](
            dimg, ids, inv, dpatches, dpatches, dpatches, *dimg.stride(), *ids.stride(), n, grid_w, inv.shape[1],
            0.0, STATS=False, NORM=False, OWNER_ONLY=True, **_patch_tile(p, c),
        )
    if need_base:
        dbase = torch.empty((B, c, H, W), dtype=dimg.dtype, device=dimg.device)
        _launch_unpatchify(None, inv, dimg, dbase, p, c, grid_w)
    return dpatches, dbase


# --------------------------------------------------------------------------------------------------------------
# Custom ops
# --------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("crossmae::gather_rows_fwd", mutates_args=())
def _gather_rows_fwd_op(x: Optional[torch.Tensor],  # noqa: UP045 (torch 2.x schema inference)
                         table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    require_triton("gather_rows", table, ids)
    return gather_rows_forward(x, table, ids)


@_gather_rows_fwd_op.register_fake
def _(x, table, ids):
    dtype = x.dtype if x is not None else table.dtype
    return table.new_empty((ids.shape[0], ids.shape[1], table.shape[1]), dtype=dtype)


@torch.library.custom_op("crossmae::gather_rows_bwd_x", mutates_args=())
def _gather_rows_bwd_x_op(dout: torch.Tensor, ids: torch.Tensor, num_rows: int) -> torch.Tensor:
    require_triton("gather_rows backward", dout, ids)
    return gather_rows_backward_x(dout, ids, num_rows)


@_gather_rows_bwd_x_op.register_fake
def _(dout, ids, num_rows):
    return dout.new_empty((dout.shape[0], num_rows, dout.shape[2]))


@torch.library.custom_op("crossmae::gather_rows_bwd_table", mutates_args=())
def _gather_rows_bwd_table_op(dout: torch.Tensor, ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    # `table` only supplies the shape and dtype of the gradient
    require_triton("gather_rows backward", dout, ids)
    return gather_rows_backward_table(dout, ids, table.shape[0], table.dtype)


@_gather_rows_bwd_table_op.register_fake
def _(dout, ids, table):
    return table.new_empty(table.shape)


def _gather_rows_setup_context(ctx, inputs, output):
    x, table, ids = inputs
    ctx.save_for_backward(ids, table)
    ctx.num_rows = table.shape[0]
    ctx.x_dtype = x.dtype if x is not None else None


def _gather_rows_backward_formula(ctx, grad_out):
    ids, table = ctx.saved_tensors
    dx = dtable = None
    if ctx.needs_input_grad[0]:
        dx = _gather_rows_bwd_x_op(grad_out, ids, ctx.num_rows).to(ctx.x_dtype)
    if ctx.needs_input_grad[1]:
        dtable = _gather_rows_bwd_table_op(grad_out, ids, table)
    return dx, dtable, None


_gather_rows_fwd_op.register_autograd(_gather_rows_backward_formula, setup_context=_gather_rows_setup_context)


@torch.library.custom_op("crossmae::gather_target_patches", mutates_args=())
def _gather_target_patches_op(imgs: torch.Tensor, ids: torch.Tensor, patch_size: int, norm_pix: bool,
                              eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    require_triton("gather_target_patches", imgs, ids)
    return gather_target_patches_forward(imgs, ids, patch_size, norm_pix, eps)


@_gather_target_patches_op.register_fake
def _(imgs, ids, patch_size, norm_pix, eps):
    B, c = imgs.shape[:2]
    n = ids.shape[1]
    stats = imgs.new_empty((B, n, 1), dtype=torch.float32)
    return imgs.new_empty((B, n, patch_size * patch_size * c)), stats, torch.empty_like(stats)


@torch.library.custom_op("crossmae::gather_patches_fwd", mutates_args=())
def _gather_patches_fwd_op(imgs: torch.Tensor, ids: torch.Tensor, patch_size: int) -> torch.Tensor:
    require_triton("gather_patches", imgs, ids)
    return gather_patches_forward(imgs, ids, patch_size)


@_gather_patches_fwd_op.register_fake
def _(imgs, ids, patch_size):
    B, c = imgs.shape[:2]
    return imgs.new_empty((B, ids.shape[1], patch_size * patch_size * c))


@torch.library.custom_op("crossmae::gather_patches_bwd", mutates_args=())
def _gather_patches_bwd_op(dpatches: torch.Tensor, ids: torch.Tensor, patch_size: int, height: int,
                           width: int) -> torch.Tensor:
    require_triton("gather_patches backward", dpatches, ids)
    return gather_patches_backward(dpatches, ids, patch_size, height, width)


@_gather_patches_bwd_op.register_fake
def _(dpatches, ids, patch_size, height, width):
    B, _, P = dpatches.shape
    return dpatches.new_empty((B, P // (patch_size * patch_size), height, width))


def _gather_patches_setup_context(ctx, inputs, output):
    imgs, ids, patch_size = inputs
    ctx.save_for_backward(ids)
    ctx.patch_size = patch_size
    ctx.image = (imgs.shape[2], imgs.shape[3], imgs.dtype)


def _gather_patches_backward_formula(ctx, grad_patches):
    (ids,) = ctx.saved_tensors
    height, width, dtype = ctx.image
    dimg = _gather_patches_bwd_op(grad_patches.contiguous(), ids, ctx.patch_size, height, width)
    return dimg.to(dtype), None, None


_gather_patches_fwd_op.register_autograd(_gather_patches_backward_formula, setup_context=_gather_patches_setup_context)


@torch.library.custom_op("crossmae::scatter_patches_fwd", mutates_args=())
def _scatter_patches_fwd_op(patches: torch.Tensor, ids: torch.Tensor, height: int, width: int, patch_size: int,
                            base: Optional[torch.Tensor],  # noqa: UP045
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    require_triton("scatter_patches", patches, ids)
    return scatter_patches_forward(patches, ids, height, width, patch_size, base)


@_scatter_patches_fwd_op.register_fake
def _(patches, ids, height, width, patch_size, base):
    B, _, P = patches.shape
    c = P // (patch_size * patch_size)
    L = (height // patch_size) * (width // patch_size)
    return patches.new_empty((B, c, height, width)), ids.new_empty((B, L), dtype=torch.int32)


@torch.library.custom_op("crossmae::scatter_patches_bwd", mutates_args=())
def _scatter_patches_bwd_op(dimg: torch.Tensor, ids: torch.Tensor, inv: torch.Tensor, patch_size: int,
                            need_patches: bool, need_base: bool) -> tuple[torch.Tensor, torch.Tensor]:
    require_triton("scatter_patches backward", dimg, ids)
    dpatches, dbase = scatter_patches_backward(dimg, ids, inv, patch_size, need_patches, need_base)
    # custom ops cannot return None: empty placeholders for gradients nobody asked for
    if dpatches is None:
        dpatches = dimg.new_empty(0)
    if dbase is None:
        dbase = dimg.new_empty(0)
    return dpatches, dbase


@_scatter_patches_bwd_op.register_fake
def _(dimg, ids, inv, patch_size, need_patches, need_base):
    B, c = dimg.shape[:2]
    dpatches = dimg.new_empty((B, ids.shape[1], patch_size * patch_size * c)) if need_patches else dimg.new_empty(0)
    dbase = dimg.new_empty(dimg.shape) if need_base else dimg.new_empty(0)
    return dpatches, dbase


def _scatter_patches_setup_context(ctx, inputs, output):
    _, ids, _, _, patch_size, base = inputs
    _, inv = output
    ctx.save_for_backward(ids, inv)
    ctx.patch_size = patch_size
    ctx.base_dtype = base.dtype if base is not None else None
    ctx.mark_non_differentiable(inv)


def _scatter_patches_backward_formula(ctx, grad_img, grad_inv):
    ids, inv = ctx.saved_tensors
    need_patches, need_base = ctx.needs_input_grad[0], ctx.needs_input_grad[5]
    if not (need_patches or need_base):
        return None, None, None, None, None, None
    dpatches, dbase = _scatter_patches_bwd_op(grad_img, ids, inv, ctx.patch_size, need_patches, need_base)
    return (dpatches if need_patches else None, None, None, None, None,
            dbase.to(ctx.base_dtype) if need_base else None)


_scatter_patches_fwd_op.register_autograd(_scatter_patches_backward_formula,
                                          setup_context=_scatter_patches_setup_context)


# --------------------------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------------------------


def gather_visible(x: torch.Tensor, pos: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """x[b, ids[b, t]] + pos[ids[b, t]]: x (B, L, C), pos (L, C), ids (B, n) -> (B, n, C) contiguous, x.dtype.

    Gradient to x (and to pos if it requires grad). Falls back to the reference without a usable Triton.
    """
    check_dtype("gather_visible", "x", x)
    check_dtype("gather_visible", "pos", pos)
    if x.dim() != 3 or pos.shape != x.shape[1:]:
        raise ValueError(f"kernels.gather_visible: expected x (B, L, C) and pos (L, C), got {tuple(x.shape)} "
                         f"and {tuple(pos.shape)}")
    _check_ids("gather_visible", ids, x.shape[0])
    if not triton_can_run(x, pos, ids):
        return reference.gather_visible_reference(x, pos, ids)
    return _gather_rows_fwd_op(x, pos, ids)


def gather_rows(table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """table[ids]: table (L, D), ids (B, n) -> (B, n, D) contiguous, table.dtype. Gradient to table (scatter-add)."""
    check_dtype("gather_rows", "table", table)
    if table.dim() != 2:
        raise ValueError(f"kernels.gather_rows: table must be (L, D), got {tuple(table.shape)}")
    _check_ids("gather_rows", ids)
    if not triton_can_run(table, ids):
        return reference.gather_rows_reference(table, ids)
    return _gather_rows_fwd_op(None, table, ids)


def gather_target_patches(
    imgs: torch.Tensor,
    ids: torch.Tensor,
    patch_size: int,
    norm_pix: bool = True,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Target patches at ids: imgs (B, c, H, W), ids (B, n) -> (targets (B, n, p*p*c), mean (B, n, 1), var (B, n, 1)).

    Patch layout (h, w, p, q, c). With norm_pix, targets = (patch - mean) / sqrt(var + eps) with the unbiased
    variance. mean / var are fp32 raw-patch statistics (for un-normalising predictions). No gradient.
    """
    check_dtype("gather_target_patches", "imgs", imgs)
    if imgs.dim() != 4:
        raise ValueError(f"kernels.gather_target_patches: imgs must be (B, c, H, W), got {tuple(imgs.shape)}")
    _check_ids("gather_target_patches", ids, imgs.shape[0])
    _check_image("gather_target_patches", imgs.shape[2], imgs.shape[3], patch_size)
    if norm_pix and patch_size * patch_size * imgs.shape[1] < 2:
        raise ValueError("kernels.gather_target_patches: norm_pix needs at least 2 values per patch")
    imgs = imgs.detach()
    if not triton_can_run(imgs, ids):
        return reference.gather_target_patches_reference(imgs, ids, patch_size, norm_pix, eps)
    return _gather_target_patches_op(imgs, ids, int(patch_size), bool(norm_pix), float(eps))


def gather_patches(imgs: torch.Tensor, ids: torch.Tensor, patch_size: int) -> torch.Tensor:
    """The raw patches of imgs (B, c, H, W) at patch indices ids (B, n): (B, n, p*p*c) contiguous, imgs.dtype.

    Patch layout (h, w, p, q, c) as gather_target_patches. Differentiable in imgs: the gradient is the patch
    gradients summed into a zero image (duplicate ids add up), deterministic, no float atomics.
    """
    check_dtype("gather_patches", "imgs", imgs)
    if imgs.dim() != 4:
        raise ValueError(f"kernels.gather_patches: imgs must be (B, c, H, W), got {tuple(imgs.shape)}")
    _check_ids("gather_patches", ids, imgs.shape[0])
    _check_image("gather_patches", imgs.shape[2], imgs.shape[3], patch_size)
    if not triton_can_run(imgs, ids):
        return reference.gather_patches_reference(imgs, ids, patch_size)
    return _gather_patches_fwd_op(imgs, ids, int(patch_size))


def scatter_patches(
    patches: torch.Tensor,
    ids: torch.Tensor,
    img_size: int | tuple[int, int],
    patch_size: int,
    base: torch.Tensor | None = None,
) -> torch.Tensor:
    """Paste patches (B, n, p*p*c) at patch indices ids (B, n) into a (B, c, H, W) image (on `base`, else zeros).

    img_size is H (square) or (H, W). Returns a new contiguous image in patches.dtype. Gradients to patches and
    base. With duplicate ids the last occurrence wins.
    """
    check_dtype("scatter_patches", "patches", patches)
    height, width = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    p = patch_size
    if patches.dim() != 3 or patches.shape[2] % (p * p):
        raise ValueError(f"kernels.scatter_patches: patches must be (B, n, p*p*c) with p={p}, got "
                         f"{tuple(patches.shape)}")
    _check_ids("scatter_patches", ids, patches.shape[0])
    if ids.shape[1] != patches.shape[1]:
        raise ValueError(f"kernels.scatter_patches: ids {tuple(ids.shape)} does not match patches "
                         f"{tuple(patches.shape)}")
    _check_image("scatter_patches", height, width, p)
    c = patches.shape[2] // (p * p)
    if base is not None and base.shape != (patches.shape[0], c, height, width):
        raise ValueError(f"kernels.scatter_patches: base must be {(patches.shape[0], c, height, width)}, got "
                         f"{tuple(base.shape)}")
    if not triton_can_run(patches, ids):
        return reference.scatter_patches_reference(patches, ids, (height, width), p, base)
    img, _ = _scatter_patches_fwd_op(patches, ids, int(height), int(width), int(p), base)
    return img
