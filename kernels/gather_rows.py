"""Row gathers by index (CrossMAE's decoder position rows) and the inverse index the gathers' gradients use.

Supported
    gather_rows(table, ids)       table (L, D) any strides, ids (B, n) -> (B, n, D) contiguous in table.dtype:
                                  out[b, t] = table[ids[b, t]]. Gradient to table (scatter-add over b and t).
    inverse_index(ids, L)         ids (B, n) -> inv (B, L) int32, the largest t with ids[b, t] == l (else -1),
                                  and cnt (B, L) int32, how many t hit l: the gather form of every scatter here
                                  and in kernels/patches.py.
    ids: int64 (or int32) row indices in [0, L), any strides. Out-of-range ids are NOT checked (that would need
    a host sync): on a GPU they read or write out of bounds. fp16 / bf16 / fp32 tables, any D. Static shapes
    only, no host synchronisation, no boolean indexing.

Algorithm
    Forward: one program per (block of 4 rows, chunk of <= 256 columns) reads each gathered element once and
    writes each output element exactly once.
    Backward in gather form, without float atomics: the inverse index is built on the device (int32 atomics,
    deterministic), then dtable[l] = sum_b dout[b, inv[b, l]] in fp32, in a fixed order over b, each element
    written once. Rows hit by duplicate ids (cnt > 1) take a slow path summing every matching t in order, so
    duplicate ids give the exact scatter-add gradient, still deterministic.

Tested on
    CPU interpreter only (TRITON_INTERPRET=1, triton 3.7.1, torch 2.13 CPU), fp32 tables, int64 and int32 ids,
    duplicate ids; not yet run on a GPU. The position-row gathers of the S/B/L/H CrossMAE training steps (fp32
    tables, the models' only launches from this file) compile for sm_90 and sm_80 with the Triton 3.7.1 code
    generator and bundled ptxas, launch-faithfully (tests/test_kernels_compile.py): 24 / 26 registers, no
    spills (2026-12); the table-gradient kernel and the inverse index are compiled there too (2026-12-02).
    Triton 3.6 is untested. Block sizes are first guesses, not tuned.

Caveats
    * Without Triton able to run (CPU tensors without TRITON_INTERPRET, or no triton) `gather_rows` falls back to
      `kernels.reference.gather_rows_reference`; the raw custom ops raise instead.
    * B * L, B * n < 2**31 (row indices are int32; element offsets are int64).
    * 2026-12, issue 16: gather_visible (x[b, ids] + pos[ids], the HAS_X path of the row kernel and its own
      gradient kernel) was removed: no model used it.
"""

import torch

from . import reference
from ._custom_op import fused_op, kernel_op
from ._runtime import check_dtype, check_ids, next_pow2, tl, triton, triton_can_run

# --------------------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------------------


@triton.jit
def _gather_rows_kernel(
    table_ptr,  # (L, C) any strides
    ids_ptr,  # (B, n) int64/int32 any strides
    out_ptr,  # (B, n, C) contiguous
    stride_tl, stride_tc,
    stride_ib, stride_it,
    num_rows, n_ids, C,  # num_rows = B * n
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


# --------------------------------------------------------------------------------------------------------------
# Host functions
# --------------------------------------------------------------------------------------------------------------

_ROWS = 4  # rows per program of the row gathers: 4 x 256 tiles compile to ~40-60 registers (ptxas -v, sm_90)


def _col_block(C: int) -> int:
    return min(next_pow2(C, 16), 256)


def inverse_index(ids: torch.Tensor, num_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """inv (B, L) int32: largest t with ids[b, t] == l, else -1; cnt (B, L) int32: number of such t."""
    B, n = ids.shape
    inv = torch.full((B, num_rows), -1, dtype=torch.int32, device=ids.device)
    cnt = torch.zeros((B, num_rows), dtype=torch.int32, device=ids.device)
    block = 256
    _inverse_index_kernel[(triton.cdiv(B * n, block),)](ids, inv, cnt, *ids.stride(), B * n, n, num_rows, BLOCK=block)
    return inv, cnt


def gather_rows_forward(table: torch.Tensor, ids: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """out[b, t] = table[ids[b, t]]: (B, n, C) contiguous in table.dtype."""
    B, n = ids.shape
    C = table.shape[1]
    if out is None:
        out = torch.empty((B, n, C), dtype=table.dtype, device=table.device)
    block_c = _col_block(C)
    _gather_rows_kernel[(triton.cdiv(B * n, _ROWS), triton.cdiv(C, block_c))](
        table, ids, out, *table.stride(), *ids.stride(), B * n, n, C, BLOCK_R=_ROWS, BLOCK_C=block_c,
    )
    return out


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


# --------------------------------------------------------------------------------------------------------------
# Custom ops
# --------------------------------------------------------------------------------------------------------------


def _gather_rows_bwd_launch(dout: torch.Tensor, ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    return gather_rows_backward_table(dout, ids, table.shape[0], table.dtype)  # table: only its shape and dtype


_gather_rows_bwd_op = kernel_op(
    "crossmae::gather_rows_bwd_table(Tensor dout, Tensor ids, Tensor table) -> Tensor",
    _gather_rows_bwd_launch,
    fake=lambda dout, ids, table: table.new_empty(table.shape),
)

_gather_rows_fwd_op = fused_op(
    "crossmae::gather_rows_fwd(Tensor table, Tensor ids) -> Tensor out",
    gather_rows_forward,
    fake=lambda table, ids: table.new_empty((ids.shape[0], ids.shape[1], table.shape[1])),
    save=("ids", "table"),
    grads=("table",),
    backward=lambda saved, grad_out: _gather_rows_bwd_op(grad_out, saved.ids, saved.table),
)


# --------------------------------------------------------------------------------------------------------------
# Public function
# --------------------------------------------------------------------------------------------------------------


def gather_rows(table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """table[ids]: table (L, D), ids (B, n) -> (B, n, D) contiguous, table.dtype. Gradient to table (scatter-add).

    Traceable by torch.compile (custom op `crossmae::gather_rows_fwd`). Falls back to
    `kernels.reference.gather_rows_reference` when Triton cannot run on these tensors.
    """
    check_dtype("gather_rows", "table", table)
    if table.dim() != 2:
        raise ValueError(f"kernels.gather_rows: table must be (L, D), got {tuple(table.shape)}")
    check_ids("gather_rows", ids)
    if not triton_can_run(table, ids):
        return reference.gather_rows_reference(table, ids)
    return _gather_rows_fwd_op(table, ids)
