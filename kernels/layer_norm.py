"""LayerNorm over the last dimension, alone or fused with the residual add before it, forward and backward.

Supported
    layer_norm(x, weight, bias, eps=1e-6) -> y
    add_layer_norm(x, branch, weight, bias, eps=1e-6) -> (h, y) with h = x + branch, y = layer_norm(h)
    x (..., C) in fp16 / bf16 / fp32; branch the same shape in any of those dtypes (added in fp32); weight and bias
    (C,) in any of those dtypes (usually fp32 parameters). 1 <= C <= 8192 (tuned for ViT widths 384 ... 1280;
    a whole row is held in registers). x / branch whose leading dims flatten to rows of one stride with a
    contiguous last dim (e.g. x[:, :C] of a wider tensor) are read in place; other layouts are copied once.
    Outputs are contiguous in x.dtype: the residual stream stays in the activation dtype, while the statistics
    and all arithmetic are fp32. y normalises the stored (rounded) h, so the backward's
    recomputation sees exactly the forward's input. Saved for the backward: the LayerNorm input (x, or h) and
    mean / rstd (fp32, shape x.shape[:-1]); y is not saved.
    Gradients: dx in x.dtype; for add_layer_norm the one total dh_total = dh + LN_backward(dy) is the gradient
    of both x and branch (cast to branch.dtype if it differs); dweight / dbias in their own dtypes, summed in
    fp32, deterministic (no atomics).

Algorithm
    Forward, one kernel: one program per block of BLOCK_R rows, the whole (BLOCK_R, next_pow2(C)) tile in
    registers (several rows per program for small C, so each program moves ~4096 elements): x (+ branch) ->
    h stored once -> mean, var of the rounded h (two-pass in registers, no E[x^2] - E[x]^2 cancellation) -> y.
    Backward, one kernel plus a reduction: a fixed number of programs (2 per SM) each loop over a contiguous
    range of rows in blocks of BLOCK_R, recompute xhat from the saved input and mean / rstd, then
        g = dy * weight, dx = rstd * (g - mean_c(g) - xhat * mean_c(g * xhat)) (+ dh),
    writing dx once, while dweight = sum dy * xhat and dbias = sum dy accumulate in registers; each program
    writes its (C,) partial sums, which torch sums over programs in a fixed order.

Tested on
    CPU interpreter only (TRITON_INTERPRET=1, triton 3.7.1, torch 2.13 CPU, 2026-12), fp32 and fp16; not yet run
    on a GPU. Every launch of the S/B/L/H CrossMAE and MAE training steps (C = 256 ... 1280, N up to 256 * 197,
    bf16 and fp16, fp32 parameters) compiles for sm_90 and sm_80 (Triton 3.7.1 + bundled ptxas, launch-faithful
    specialisation, 8 warps): forward 46-58 registers, backward 97-128, no spills. Triton 3.6 is untested.
    Tile sizes and warp counts are chosen from those register counts, not timed.

Caveats
    * C is padded to a power of two inside the kernel: at C = 1280 (ViT-H) 37% of each row tile is masked
      lanes (no memory traffic, but registers and issue slots); fine for a bandwidth-bound kernel, a chunked
      column loop would reclaim it. C > 8192 is rejected (use torch.nn.functional.layer_norm).
    * bf16 cannot be tested under the interpreter (its bf16 arithmetic is wrong); fp16 can.
    * The backward's partial sums, 2 * programs * C fp32 written once and read once (2.7 MB at C = 1280 on 132
      SMs), add about 4% to the backward's traffic at CrossMAE's encoder (N = 256 * 50, C = 768), 1% at MAE's
      decoder (N = 256 * 197); they equal the row traffic only at N ~ 4 * programs. Their number follows the SM
      count, so dweight / dbias are bitwise reproducible on one GPU model but may differ in the last bits
      between models.
    * When autograd hands None for the gradient of h (h unused) the kernel skips reading it; when the
      gradient of y is None (y unused), dh passes straight through and dweight / dbias get no gradient.
    * No double backward. Without Triton able to run (CPU tensors without TRITON_INTERPRET, or no triton) the
      public functions fall back to `kernels.reference.layer_norm_reference` / `add_layer_norm_reference`; the
      raw custom ops raise instead.
"""

import torch

from . import reference
from ._custom_op import fused_op, kernel_op
from ._runtime import check_dtype, next_pow2, num_sms, tl, triton, triton_can_run

MAX_C = 8192
# Elements of one program's row tile (BLOCK_R * BLOCK_C). 4096 at 8 warps is 16 fp32 values per thread and
# tensor: enough bytes in flight per program, and the backward's ~7 live tiles stay well inside the registers.
_TILE = 4096
# Backward row ranges per SM: at 98-128 registers x 256 threads two programs fit on an SM, so two per SM is
# one full wave; more would only add partial sums to reduce.
_PROGRAMS_PER_SM = 2

# --------------------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------------------


@triton.jit
def _ln_fwd_kernel(
    x_ptr,  # (N, C) row stride stride_x, last dim contiguous
    branch_ptr,  # (N, C) row stride stride_b, last dim contiguous (read only with HAS_BRANCH)
    h_ptr,  # (N, C) contiguous, out: x + branch in h's dtype (written only with HAS_BRANCH)
    y_ptr,  # (N, C) contiguous, out
    w_ptr,  # (C,) contiguous
    b_ptr,  # (C,) contiguous
    mean_ptr,  # (N,) fp32, out
    rstd_ptr,  # (N,) fp32, out
    stride_x, stride_b,
    N, C,
    eps,
    HAS_BRANCH: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    mask_r = rows < N
    mask_c = cols < C
    mask = mask_r[:, None] & mask_c[None, :]

    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_BRANCH:
        x += tl.load(branch_ptr + rows[:, None] * stride_b + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        h = x.to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + rows[:, None] * C + cols[None, :], h, mask=mask)
        # normalise the rounded h that is stored and saved, so the backward recomputes exactly this xhat
        x = h.to(tl.float32)

    mean = tl.sum(x, 1) / C
    diff = tl.where(mask_c[None, :], x - mean[:, None], 0.0)
    var = tl.sum(diff * diff, 1) / C
    rstd = tl.rsqrt(var + eps)
    w = tl.load(w_ptr + cols, mask=mask_c, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=mask_c, other=0.0).to(tl.float32)
    y = diff * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(y_ptr + rows[:, None] * C + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + rows, mean, mask=mask_r)
    tl.store(rstd_ptr + rows, rstd, mask=mask_r)


@triton.jit
def _ln_bwd_kernel(
    dy_ptr,  # (N, C) row stride stride_dy, last dim contiguous
    x_ptr,  # (N, C) row stride stride_x, last dim contiguous: the LayerNorm input (x, or add_layer_norm's h)
    dh_ptr,  # (N, C) row stride stride_dh, last dim contiguous: added to dx (read only with HAS_DH)
    w_ptr,  # (C,) contiguous
    mean_ptr,  # (N,) fp32
    rstd_ptr,  # (N,) fp32
    dx_ptr,  # (N, C) contiguous, out
    dw_part_ptr,  # (programs, C) fp32 contiguous, out: this program's partial sum of dy * xhat
    db_part_ptr,  # (programs, C) fp32 contiguous, out: this program's partial sum of dy
    stride_dy, stride_x, stride_dh,
    N, C,
    rows_per_program,  # a multiple of BLOCK_R
    HAS_DH: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    mask_c = cols < C
    w = tl.load(w_ptr + cols, mask=mask_c, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)

    # int64 bounds make the loop index int64 (row * stride may exceed 2**31)
    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, N)
    for r0 in range(row_start, row_end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        mask_r = rows < row_end
        mask = mask_r[:, None] & mask_c[None, :]
        mean = tl.load(mean_ptr + rows, mask=mask_r, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=mask_r, other=0.0)
        x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        g = dy * w[None, :]  # zero outside the valid tile, as dy is
        c1 = tl.sum(g, 1) / C
        c2 = tl.sum(g * xhat, 1) / C
        dx = rstd[:, None] * (g - c1[:, None] - xhat * c2[:, None])
        if HAS_DH:
            dx += tl.load(dh_ptr + rows[:, None] * stride_dh + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + rows[:, None] * C + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dw_acc += dy * xhat
        db_acc += dy

    tl.store(dw_part_ptr + pid.to(tl.int64) * C + cols, tl.sum(dw_acc, 0), mask=mask_c)
    tl.store(db_part_ptr + pid.to(tl.int64) * C + cols, tl.sum(db_acc, 0), mask=mask_c)


# --------------------------------------------------------------------------------------------------------------
# Host functions
# --------------------------------------------------------------------------------------------------------------


def _check_inputs(op: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                  branch: torch.Tensor | None = None) -> None:
    named = [("x", x), ("weight", weight), ("bias", bias)] + ([("branch", branch)] if branch is not None else [])
    for name, t in named:
        check_dtype(op, name, t)
        if t.device != x.device:
            raise ValueError(f"kernels.{op}: {name} is on {t.device}, x on {x.device}")
    if x.dim() == 0:
        raise ValueError(f"kernels.{op}: x must have at least one dimension (..., C), got a scalar")
    C = x.shape[-1]
    if not 1 <= C <= MAX_C:
        raise ValueError(f"kernels.{op}: last dimension C={C} is outside 1..{MAX_C} (a whole row is held in "
                         "registers); use torch.nn.functional.layer_norm for such rows")
    for name, t in (("weight", weight), ("bias", bias)):
        if t.shape != (C,):
            raise ValueError(f"kernels.{op}: {name} must be (C={C},), got {tuple(t.shape)}")
    if branch is not None and branch.shape != x.shape:
        raise ValueError(f"kernels.{op}: branch shape {tuple(branch.shape)} != x shape {tuple(x.shape)} "
                         "(no broadcasting; expand and make it contiguous first)")


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t as an (N, C) matrix with unit column stride: a view when the layout allows, else one copy."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t.reshape(-1, t.shape[-1])


def _vector(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(0) == 1 else t.contiguous()


def _tile(C: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_C, num_warps): whole rows, ~_TILE elements per program, 16 fp32 values per thread."""
    block_c = next_pow2(C, 16)
    block_r = max(1, _TILE // block_c)
    num_warps = max(4, min(16, block_r * block_c // 512))
    return block_r, block_c, num_warps


def _forward(x, branch, weight, bias, eps):
    C = x.shape[-1]
    x2 = _rows(x)
    N = x2.shape[0]
    b2 = _rows(branch) if branch is not None else x2
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    h = torch.empty(x.shape, dtype=x.dtype, device=x.device) if branch is not None else None
    mean = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    if N == 0:
        return h, y, mean, rstd
    block_r, block_c, num_warps = _tile(C)
    _ln_fwd_kernel[(triton.cdiv(N, block_r),)](
        x2, b2, h if h is not None else y, y, _vector(weight), _vector(bias), mean, rstd,
        x2.stride(0), b2.stride(0),
        N, C, eps,
        HAS_BRANCH=branch is not None, BLOCK_R=block_r, BLOCK_C=block_c,
        num_warps=num_warps,
    )
    return h, y, mean, rstd


def layer_norm_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward kernel. Returns y (x.shape, contiguous, x.dtype), mean and rstd (x.shape[:-1]) fp32."""
    _check_inputs("layer_norm", x, weight, bias)
    _, y, mean, rstd = _forward(x, None, weight, bias, eps)
    return y, mean, rstd


def add_layer_norm_forward(x: torch.Tensor, branch: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the fused forward. Returns h = x + branch and y = LayerNorm(h) (both contiguous, x.dtype), mean, rstd."""
    _check_inputs("add_layer_norm", x, weight, bias, branch)
    return _forward(x, branch, weight, bias, eps)


def layer_norm_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    dh: torch.Tensor | None = None,
    *,
    programs: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward kernel. Returns dx (+ dh if given) in x.dtype shaped like x, dweight and dbias (C,) fp32.

    x is the LayerNorm's input as saved (add_layer_norm's h), mean / rstd its forward statistics. `programs`
    overrides the number of row ranges, i.e. of partial sums (tests check any split adds up).
    """
    C = x.shape[-1]
    for name, t in (("dy", dy), ("dh", dh)):
        if t is not None and t.shape != x.shape:
            raise ValueError(f"kernels.layer_norm backward: {name} shape {tuple(t.shape)} != {tuple(x.shape)}")
    x2, dy2 = _rows(x), _rows(dy)
    dh2 = _rows(dh) if dh is not None else x2
    N = x2.shape[0]
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    block_r, block_c, num_warps = _tile(C)
    n_blocks = triton.cdiv(N, block_r)
    if programs is None:
        programs = _PROGRAMS_PER_SM * num_sms(x.device)
    programs = max(1, min(programs, n_blocks))
    rows_per_program = triton.cdiv(n_blocks, programs) * block_r
    programs = triton.cdiv(N, rows_per_program) if N else 0
    dw_part = torch.empty((programs, C), dtype=torch.float32, device=x.device)
    db_part = torch.empty((programs, C), dtype=torch.float32, device=x.device)
    if programs:
        _ln_bwd_kernel[(programs,)](
            dy2, x2, dh2, _vector(weight), mean, rstd, dx, dw_part, db_part,
            dy2.stride(0), x2.stride(0), dh2.stride(0),
            N, C, rows_per_program,
            HAS_DH=dh is not None, BLOCK_R=block_r, BLOCK_C=block_c,
            num_warps=num_warps,
        )
    return dx, dw_part.sum(dim=0), db_part.sum(dim=0)


# --------------------------------------------------------------------------------------------------------------
# Custom ops (opaque to torch.compile, with fake-tensor and autograd registrations)
# --------------------------------------------------------------------------------------------------------------


def _stats_like(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[:-1], dtype=torch.float32)


# one backward for both forwards; dh: add_layer_norm's gradient of h, added to dx (None for layer_norm)
_layer_norm_bwd_op = kernel_op(
    "crossmae::layer_norm_bwd(Tensor dy, Tensor x, Tensor weight, Tensor mean, Tensor rstd, Tensor? dh) -> "
    "(Tensor, Tensor, Tensor)",
    layer_norm_backward,
    fake=lambda dy, x, weight, mean, rstd, dh: (
        x.new_empty(x.shape), *(x.new_empty(x.shape[-1:], dtype=torch.float32) for _ in range(2))),
)

_layer_norm_fwd_op = fused_op(
    "crossmae::layer_norm_fwd(Tensor x, Tensor weight, Tensor bias, float eps) -> (Tensor y, Tensor mean, "
    "Tensor rstd)",
    layer_norm_forward,
    fake=lambda x, weight, bias, eps: (x.new_empty(x.shape), _stats_like(x), _stats_like(x)),
    save=("x", "weight", "mean", "rstd"),
    differentiable=("y",),
    grads=("x", "weight", "bias"),
    backward=lambda saved, dy: _layer_norm_bwd_op(dy, saved.x, saved.weight, saved.mean, saved.rstd, None),
)


def _add_layer_norm_grads(saved, dh, dy):
    """d(x + branch)/dx = d(x + branch)/dbranch = 1: both get the one total gradient of h."""
    if dy is None:  # y unused: the LayerNorm contributes nothing
        return dh, dh, None, None
    dh_total, dweight, dbias = _layer_norm_bwd_op(dy, saved.h, saved.weight, saved.mean, saved.rstd, dh)
    return dh_total, dh_total, dweight, dbias


_add_layer_norm_fwd_op = fused_op(
    "crossmae::add_layer_norm_fwd(Tensor x, Tensor branch, Tensor weight, Tensor bias, float eps) -> (Tensor h, "
    "Tensor y, Tensor mean, Tensor rstd)",
    add_layer_norm_forward,
    fake=lambda x, branch, weight, bias, eps: (x.new_empty(x.shape), x.new_empty(x.shape), _stats_like(x),
                                               _stats_like(x)),
    save=("h", "weight", "mean", "rstd"),
    differentiable=("h", "y"),  # an unused one's gradient arrives as None, never as materialised zeros
    grads=("x", "branch", "weight", "bias"),
    backward=_add_layer_norm_grads,
)


# --------------------------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------------------------


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(x - mean) * rstd * weight + bias over the last dimension, in fp32, returned in x.dtype.

    x (..., C), weight / bias (C,) -> y shaped like x, contiguous. Differentiable in x, weight and bias;
    traceable by torch.compile (custom op `crossmae::layer_norm_fwd`). Falls back to
    `kernels.reference.layer_norm_reference` when Triton cannot run on these tensors.
    """
    _check_inputs("layer_norm", x, weight, bias)
    if not triton_can_run(x, weight, bias):
        return reference.layer_norm_reference(x, weight, bias, eps)
    if x.stride(-1) != 1:
        x = x.contiguous()  # copy once here, so the backward does not copy the saved x again
    y, _, _ = _layer_norm_fwd_op(x, weight, bias, float(eps))
    return y


def add_layer_norm(x: torch.Tensor, branch: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """h = x + branch (added in fp32, stored in x.dtype) and y = layer_norm(h, weight, bias, eps), in one pass.

    For pre-norm residual blocks: h is the new residual stream, y the next sub-layer's input. x / branch
    (..., C) of any float dtypes, weight / bias (C,). Both outputs contiguous in x.dtype. Differentiable in all
    four tensors; traceable by torch.compile (custom op `crossmae::add_layer_norm_fwd`). Falls back to
    `kernels.reference.add_layer_norm_reference` when Triton cannot run on these tensors.
    """
    _check_inputs("add_layer_norm", x, weight, bias, branch)
    if not triton_can_run(x, branch, weight, bias):
        return reference.add_layer_norm_reference(x, branch, weight, bias, eps)
    h, y, _, _ = _add_layer_norm_fwd_op(x, branch, weight, bias, float(eps))
    return h, y
