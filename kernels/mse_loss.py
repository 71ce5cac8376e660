"""Mean squared error of the reconstruction loss: loss = mean((pred.float() - target.float())**2), and its gradient.

Supported
    pred and target of one shape (any shape, e.g. (B, n_pred, p*p*3)), each fp16 / bf16 / fp32 (e.g. pred bf16,
    target fp32); non-contiguous inputs are copied once. loss is a 0-dim fp32 tensor. Differentiable in pred
    only: dpred = grad * 2 * (pred - target) / numel in pred.dtype, contiguous with pred's shape. Targets are
    constants: `mse_loss` refuses a target that requires grad. No host synchronisation (the backward reads the
    incoming gradient from device memory).

Algorithm
    Forward, two kernels, deterministic (no atomics):
    1. a fixed number of programs (at most 1024, the same on every GPU) each sums (pred - target)^2 in fp32
       over its own contiguous chunk of 4096-element blocks, keeping a 4096-wide fp32 running sum per program,
       and stores one fp32 partial sum;
    2. one program sums the <= 1024 partials (a fixed-shape tl.sum) and stores sum / numel as the 0-dim loss.
    Backward: one elementwise kernel reads pred, target and the scalar grad once and writes dpred once.
    The reference path reads and writes ~6 full tensors forward (cast, sub, pow, mean) and ~5 backward; this
    reads the two inputs once forward and once backward and writes dpred once.

Tested on
    CPU interpreter only (TRITON_INTERPRET=1, triton 3.7.1, torch 2.13 CPU, 2026-12), fp32 / fp16 pred with
    fp32 / fp16 target; not yet run on a GPU. At the S/B/L/H models' loss shapes (bf16 / fp16 pred, fp32
    target) the three kernels compile for sm_90 and sm_80 with the Triton 3.7.1 code generator and bundled
    ptxas, launch-faithfully (tests/test_kernels_compile.py's machinery): at most 40 registers, no spills.
    Triton 3.6 is untested. Block sizes and warp counts are first guesses, not tuned.

Caveats
    * The sum is fp32, but spread over 1024 programs x 4096 lanes, so each lane adds only ~10 terms at
      CrossMAE's ~10**7 .. 4 * 10**7 elements: the loss is accurate to ~1e-6 relative.
    * numel < 2**31 * 4096 (block indices are int32; element offsets are int64).
    * Without Triton able to run (CPU tensors without TRITON_INTERPRET, or no triton) `mse_loss` falls back to
      `kernels.reference.mse_loss_reference`; the raw custom ops raise instead.
"""

import torch

from . import reference
from ._custom_op import fused_op, kernel_op
from ._runtime import check_dtype, next_pow2, tl, triton, triton_can_run

_BLOCK = 4096  # elements per program step: 16 per thread at 8 warps
_MAX_PROGRAMS = 1024  # fixed (not per-GPU), so the loss is bit-identical across GPU models

# --------------------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------------------


@triton.jit
def _mse_partial_kernel(
    pred_ptr,  # (numel,) contiguous
    target_ptr,  # (numel,) contiguous
    partial_ptr,  # (programs,) fp32: this program's sum of squared errors
    numel,
    blocks_per_program,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    first = pid.to(tl.int64) * blocks_per_program  # int64 bounds make the loop index (and offsets) int64
    for blk in range(first, first + blocks_per_program):
        offs = blk * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        p = tl.load(pred_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        t = tl.load(target_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        d = p - t  # zero on masked lanes
        acc += d * d
    tl.store(partial_ptr + pid, tl.sum(acc, 0))


@triton.jit
def _mse_finish_kernel(
    partial_ptr,  # (programs,) fp32
    loss_ptr,  # () fp32
    programs,
    inv_numel,
    BLOCK_P: tl.constexpr,
):
    offs = tl.arange(0, BLOCK_P)
    parts = tl.load(partial_ptr + offs, mask=offs < programs, other=0.0)
    tl.store(loss_ptr, tl.sum(parts, 0) * inv_numel)


@triton.jit
def _mse_bwd_kernel(
    grad_ptr,  # () fp32: d(loss)
    pred_ptr,  # (numel,) contiguous
    target_ptr,  # (numel,) contiguous
    dpred_ptr,  # (numel,) contiguous, pred dtype
    numel,
    two_over_numel,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    scale = tl.load(grad_ptr).to(tl.float32) * two_over_numel
    p = tl.load(pred_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    t = tl.load(target_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(dpred_ptr + offs, ((p - t) * scale).to(dpred_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------------------
# Host functions
# --------------------------------------------------------------------------------------------------------------


def _check_inputs(pred: torch.Tensor, target: torch.Tensor) -> None:
    check_dtype("mse_loss", "pred", pred)
    check_dtype("mse_loss", "target", target)
    if target.device != pred.device:
        raise ValueError(f"kernels.mse_loss: target is on {target.device}, pred on {pred.device}; move both to "
                         "one device")
    if pred.shape != target.shape:
        raise ValueError(f"kernels.mse_loss: pred {tuple(pred.shape)} and target {tuple(target.shape)} must have "
                         "the same shape (no broadcasting)")
    if pred.numel() == 0:
        raise ValueError(f"kernels.mse_loss: empty inputs (shape {tuple(pred.shape)}) have no mean")


def mse_loss_forward(pred: torch.Tensor, target: torch.Tensor, *, programs: int | None = None) -> torch.Tensor:
    """Launch the forward kernels: 0-dim fp32 mean squared error. `programs` overrides the number of partials."""
    _check_inputs(pred, target)
    pred, target = pred.contiguous(), target.contiguous()
    numel = pred.numel()
    n_blocks = triton.cdiv(numel, _BLOCK)
    programs = min(programs or _MAX_PROGRAMS, n_blocks, _MAX_PROGRAMS)
    blocks_per_program = triton.cdiv(n_blocks, programs)
    programs = triton.cdiv(n_blocks, blocks_per_program)
    partials = torch.empty((programs,), dtype=torch.float32, device=pred.device)
    loss = torch.empty((), dtype=torch.float32, device=pred.device)
    _mse_partial_kernel[(programs,)](pred, target, partials, numel, blocks_per_program, BLOCK=_BLOCK, num_warps=8)
    _mse_finish_kernel[(1,)](partials, loss, programs, 1.0 / numel, BLOCK_P=next_pow2(programs, 16), num_warps=4)
    return loss


def mse_loss_backward(grad: torch.Tensor, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Launch the backward kernel: dpred = grad * 2 * (pred - target) / numel, contiguous, pred's shape and dtype."""
    _check_inputs(pred, target)
    if grad.numel() != 1:
        raise ValueError(f"kernels.mse_loss backward: grad must be a scalar, got shape {tuple(grad.shape)}")
    pred, target = pred.contiguous(), target.contiguous()
    numel = pred.numel()
    dpred = torch.empty(pred.shape, dtype=pred.dtype, device=pred.device)
    _mse_bwd_kernel[(triton.cdiv(numel, _BLOCK),)](
        grad, pred, target, dpred, numel, 2.0 / numel, BLOCK=_BLOCK, num_warps=8,
    )
    return dpred


# --------------------------------------------------------------------------------------------------------------
# Custom ops
# --------------------------------------------------------------------------------------------------------------

_mse_loss_bwd_op = kernel_op(
    "crossmae::mse_loss_bwd(Tensor grad, Tensor pred, Tensor target) -> Tensor",
    mse_loss_backward,
    fake=lambda grad, pred, target: pred.new_empty(pred.shape),
)

_mse_loss_fwd_op = fused_op(
    "crossmae::mse_loss_fwd(Tensor pred, Tensor target) -> Tensor loss",
    mse_loss_forward,
    fake=lambda pred, target: pred.new_empty((), dtype=torch.float32),
    save=("pred", "target"),
    grads=("pred",),  # targets are constants (mse_loss refuses a target that requires grad)
    backward=lambda saved, grad_loss: _mse_loss_bwd_op(grad_loss.float(), saved.pred, saved.target),
)


# --------------------------------------------------------------------------------------------------------------
# Public function
# --------------------------------------------------------------------------------------------------------------


def mse_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean((pred.float() - target.float())**2) as a 0-dim fp32 tensor; pred and target of one shape.

    Differentiable in pred (dpred in pred.dtype); target must not require grad (detach it: the reconstruction
    targets are constants). Traceable by torch.compile (custom op `crossmae::mse_loss_fwd`). Falls back to
    `kernels.reference.mse_loss_reference` when Triton cannot run on these tensors (CPU without
    TRITON_INTERPRET=1).
    """
    _check_inputs(pred, target)
    if target.requires_grad:
        raise ValueError("kernels.mse_loss: target requires grad; the reconstruction targets are constants, pass "
                         "target.detach()")
    if not triton_can_run(pred, target):
        return reference.mse_loss_reference(pred, target)
    return _mse_loss_fwd_op(pred, target)
