"""Fused bias + exact GELU for the MLP's first layer: out = gelu(x + bias), forward and backward.

Supported
    x (..., N) fp16 / bf16 / fp32 with its last dim contiguous (leading dims any strides that flatten to one row
    stride, else x is copied once), bias (N,) fp16 / bf16 / fp32 (usually an fp32 parameter), any N (1536 ...
    5120 for ViT-S ... ViT-H, or 40: non-powers of two are masked), any number of rows. x + bias and the exact
    (erf) GELU are computed in fp32 and stored in x.dtype; out is contiguous with x's shape.
    bias_gelu(x, bias)            differentiable in x and bias; saves x and bias only, never the output.
    bias_gelu_fwd(x, bias)        the forward custom op (crossmae::bias_gelu_fwd): out. No input fallback; it
                                  carries bias_gelu's autograd formula, which is inert under no_grad (inside a
                                  torch.autograd.Function's forward / backward, where it is meant to be called).
    bias_gelu_bwd(dout, x, bias)  the backward custom op (crossmae::bias_gelu_bwd): (dx in x.dtype, dbias in
                                  bias.dtype), dbias = sum over all leading dims of dx, summed in fp32. No
                                  autograd of its own (no double backward).
    The raw ops serve a model's own torch.autograd.Function (an MLP that saves only the pre-activation and
    recomputes the GELU output in its backward with bias_gelu_fwd).

Algorithm
    gelu(z) = z * Phi(z), Phi(z) = (1 + erf(z / sqrt(2))) / 2;  gelu'(z) = Phi(z) + z * exp(-z^2 / 2) / sqrt(2 pi).
    Forward: one program per (8-row block, 512-column chunk); reads x once, bias once per program (from L2),
    writes out once: 2 bytes per element moved in bf16 each way, the minimum.
    Backward: one program per (512-column chunk, group of rows) walks its rows in 8-row blocks: reads x and
    dout once, writes dx once, and keeps an fp32 running sum of dx per column. Each program stores its column
    sums to an (groups, N) fp32 buffer, which one torch.sum over the groups reduces: deterministic (fixed
    order, no float atomics), and the buffer is ~1 MB at ViT-H shapes against ~400 MB of dout.

Tested on
    CPU interpreter only (TRITON_INTERPRET=1, triton 3.7.1, torch 2.13 CPU, 2026-12), fp32 and fp16 x with
    fp32 / fp16 bias; not yet run on a GPU. At every MLP launch of the S/B/L/H CrossMAE and MAE models
    (bf16 / fp16 x, fp32 bias) both kernels compile for sm_90 and sm_80 with the Triton 3.7.1 code generator
    and bundled ptxas, launch-faithfully (tests/test_kernels_compile.py's machinery): forward 40-42 registers,
    backward 92-98 registers, no spills. Triton 3.6 is untested. Block sizes and warps are first guesses.

Caveats
    * The number of backward row groups depends on the GPU's SM count, so dbias can differ in the last bits
      between GPU models (it is reproducible run to run on one GPU).
    * Row indices are int32 (rows < 2**31); element offsets are int64.
    * Without Triton able to run (CPU tensors without TRITON_INTERPRET, or no triton) `bias_gelu` falls back to
      `kernels.reference.bias_gelu_reference`; the raw custom ops raise instead.
"""

import torch

from . import reference
from ._custom_op import fused_op, kernel_op
from ._runtime import check_dtype, next_pow2, num_sms, tl, triton, triton_can_run

_INV_SQRT2 = tl.constexpr(0.7071067811865476)  # jit code may read only constexpr globals
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
_BLOCK_N_MAX = 512  # divides every ViT MLP width (1536, 2048, 3072, 4096, 5120): no masked lanes there
_TILE = 4096  # elements per program and loop step: 16 per thread at 8 warps

# --------------------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------------------


@triton.jit
def _bias_gelu_fwd_kernel(
    x_ptr,  # (rows, N), row stride stride_xr, last dim contiguous
    bias_ptr,  # (N,) contiguous
    out_ptr,  # (rows, N) contiguous, x dtype
    stride_xr,
    rows, N,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    mask = (offs_r < rows)[:, None] & mask_n[None, :]
    rows64 = offs_r.to(tl.int64)[:, None]
    x = tl.load(x_ptr + rows64 * stride_xr + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    b = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    z = x + b[None, :]
    out = z * (0.5 + 0.5 * tl.erf(z * _INV_SQRT2))
    tl.store(out_ptr + rows64 * N + offs_n[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bias_gelu_bwd_kernel(
    dout_ptr,  # (rows, N), row stride stride_dr, last dim contiguous
    x_ptr,  # (rows, N), row stride stride_xr, last dim contiguous
    bias_ptr,  # (N,) contiguous
    dx_ptr,  # (rows, N) contiguous, x dtype
    dbias_part_ptr,  # (groups, N) fp32 contiguous: this program's column sums of dx
    stride_dr, stride_xr,
    rows, N,
    rows_per_group,  # a multiple of BLOCK_R, so groups never share a row block
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_g = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    b = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32)
    row_start = pid_g * rows_per_group
    row_end = tl.minimum(row_start + rows_per_group, rows)
    for r0 in range(row_start, row_end, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask = (offs_r < row_end)[:, None] & mask_n[None, :]
        rows64 = offs_r.to(tl.int64)[:, None]
        x = tl.load(x_ptr + rows64 * stride_xr + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
        dout = tl.load(dout_ptr + rows64 * stride_dr + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
        z = x + b[None, :]
        cdf = 0.5 + 0.5 * tl.erf(z * _INV_SQRT2)
        pdf = tl.exp(-0.5 * z * z) * _INV_SQRT_2PI
        dx = dout * (cdf + z * pdf)  # zero on masked lanes (dout loaded as 0 there)
        tl.store(dx_ptr + rows64 * N + offs_n[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
        acc += dx
    tl.store(dbias_part_ptr + pid_g.to(tl.int64) * N + offs_n, tl.sum(acc, 0), mask=mask_n)


# --------------------------------------------------------------------------------------------------------------
# Host functions
# --------------------------------------------------------------------------------------------------------------


def _check_inputs(op: str, x: torch.Tensor, bias: torch.Tensor) -> None:
    check_dtype(op, "x", x)
    check_dtype(op, "bias", bias)
    if bias.device != x.device:
        raise ValueError(f"kernels.{op}: bias is on {bias.device}, x on {x.device}; move both to one device")
    if x.dim() == 0 or bias.dim() != 1 or bias.shape[0] != x.shape[-1] or bias.shape[0] == 0:
        raise ValueError(f"kernels.{op}: expected x (..., N) and bias (N,) with N > 0, got x {tuple(x.shape)} and "
                         f"bias {tuple(bias.shape)}")


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t as a (rows, N) view with a contiguous last dim (a copy only if no such view exists)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 or t2.shape[-1] == 1 else t2.contiguous()


def _tile(N: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_N, num_warps): 512-column chunks, 8 rows at the real widths (more rows when N is small)."""
    block_n = min(next_pow2(N, 16), _BLOCK_N_MAX)
    block_r = _TILE // block_n
    return block_r, block_n, 8


def bias_gelu_forward(x: torch.Tensor, bias: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Launch the forward kernel: gelu(x + bias), contiguous with x's shape, in x.dtype."""
    _check_inputs("bias_gelu", x, bias)
    N = x.shape[-1]
    x2 = _rows(x)
    bias = bias.contiguous()
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    rows = x2.shape[0]
    if rows == 0:
        return out
    block_r, block_n, num_warps = _tile(N)
    _bias_gelu_fwd_kernel[(triton.cdiv(rows, block_r), triton.cdiv(N, block_n))](
        x2, bias, out, x2.stride(0), rows, N,
        BLOCK_R=block_r, BLOCK_N=block_n, num_warps=num_warps,
    )
    return out


def bias_gelu_backward(
    dout: torch.Tensor,
    x: torch.Tensor,
    bias: torch.Tensor,
    *,
    row_groups: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward kernel. Returns dx (contiguous, x's shape, x.dtype) and dbias (N,) fp32."""
    _check_inputs("bias_gelu backward", x, bias)
    check_dtype("bias_gelu backward", "dout", dout)
    if dout.shape != x.shape:
        raise ValueError(f"kernels.bias_gelu backward: dout {tuple(dout.shape)} must have x's shape "
                         f"{tuple(x.shape)}")
    N = x.shape[-1]
    x2, dout2 = _rows(x), _rows(dout)
    bias = bias.contiguous()
    rows = x2.shape[0]
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if rows == 0:
        return dx, torch.zeros((N,), dtype=torch.float32, device=x.device)
    block_r, block_n, num_warps = _tile(N)
    n_cblocks = triton.cdiv(N, block_n)
    row_blocks = triton.cdiv(rows, block_r)
    if row_groups is None:
        # ~8 programs per SM in all: enough to stream at full bandwidth, few partial rows to reduce
        row_groups = max(1, (8 * num_sms(x.device)) // n_cblocks)
    blocks_per_group = triton.cdiv(row_blocks, min(row_groups, row_blocks))
    groups = triton.cdiv(row_blocks, blocks_per_group)
    dbias_part = torch.empty((groups, N), dtype=torch.float32, device=x.device)
    _bias_gelu_bwd_kernel[(n_cblocks, groups)](
        dout2, x2, bias, dx, dbias_part, dout2.stride(0), x2.stride(0), rows, N, blocks_per_group * block_r,
        BLOCK_R=block_r, BLOCK_N=block_n, num_warps=num_warps,
    )
    return dx, dbias_part.sum(dim=0)


# --------------------------------------------------------------------------------------------------------------
# Custom ops: the raw ops bias_gelu_fwd / bias_gelu_bwd are public (a model's own autograd.Function calls them)
# --------------------------------------------------------------------------------------------------------------


def _bias_gelu_bwd_launch(dout: torch.Tensor, x: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dx, dbias = bias_gelu_backward(dout, x, bias)
    return dx, dbias.to(bias.dtype)


# (dx in x.dtype, dbias in bias.dtype) of out = gelu(x + bias); no fallback, no autograd of its own
bias_gelu_bwd = kernel_op(
    "crossmae::bias_gelu_bwd(Tensor dout, Tensor x, Tensor bias) -> (Tensor, Tensor)",
    _bias_gelu_bwd_launch,
    fake=lambda dout, x, bias: (x.new_empty(x.shape), bias.new_empty(bias.shape)),
)

# gelu(x + bias) in x.dtype (contiguous, x's shape); no fallback; its autograd formula is bias_gelu's
bias_gelu_fwd = fused_op(
    "crossmae::bias_gelu_fwd(Tensor x, Tensor bias) -> Tensor out",
    bias_gelu_forward,
    fake=lambda x, bias: x.new_empty(x.shape),
    save=("x", "bias"),  # not the output: the backward recomputes gelu' from x + bias
    grads=("x", "bias"),
    backward=lambda saved, grad_out: bias_gelu_bwd(grad_out, saved.x, saved.bias),
)


# --------------------------------------------------------------------------------------------------------------
# Public function
# --------------------------------------------------------------------------------------------------------------


def bias_gelu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """gelu(x + bias) with the exact (erf) GELU: x (..., N), bias (N,) -> contiguous, x's shape, x.dtype.

    Computed in fp32. Differentiable in x and bias (saving x and bias, not the output); traceable by
    torch.compile (custom op `crossmae::bias_gelu_fwd`). Falls back to `kernels.reference.bias_gelu_reference`
    when Triton cannot run on these tensors (CPU without TRITON_INTERPRET=1).
    """
    _check_inputs("bias_gelu", x, bias)
    if not triton_can_run(x, bias):
        return reference.bias_gelu_reference(x, bias)
    return bias_gelu_fwd(x, bias)
