"""Patch gathers and scatters of CrossMAE's masking: target patches (norm-pix), raw patches, and their paste-back.

Supported
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
    ids: int64 (or int32) patch indices in [0, L), any strides. Out-of-range ids are NOT checked (that would
    need a host sync): on a GPU they read or write out of bounds. fp16 / bf16 / fp32 images, any c, any p.
    Static shapes only, no host synchronisation, no boolean indexing.

Algorithm
    Gathers: one program per patch, reading each source pixel once and writing each output element exactly
    once. A patch is read plane by plane with the column fastest (coalesced runs of one image row, not three
    planes interleaved per warp) and permuted in registers to the (p, q, c) output order.
    Scatters and gradients are computed in gather form through the inverse index of kernels/gather_rows.py
    (inv[b, l] = the largest t with ids[b, t] == l, or -1; cnt[b, l] = how many t hit l), so each output
    element is written once, without float atomics:
    * scatter_patches writes every image pixel once (the patch value where a patch lands, else base or 0).
      With duplicate ids the LAST occurrence wins (and only it receives the gradient).
    * d/dimgs of gather_patches is the same pixel-by-pixel write of the patch gradients into a zero image;
      pixels of patches hit by duplicate ids (cnt > 1) sum every matching t in order (scatter-add, deterministic).

Tested on
    CPU interpreter only (TRITON_INTERPRET=1, triton 3.7.1, torch 2.13 CPU), fp32 images with odd patch sizes,
    channels-last and transposed views, duplicate ids; not yet run on a GPU. Every patch launch of the S/B/L/H
    CrossMAE and MAE training steps (fp32 images under autocast; the gather_patches backward included) compiles
    for sm_90 and sm_80 with the Triton 3.7.1 code generator and bundled ptxas, launch-faithfully
    (tests/test_kernels_compile.py): patch gather 27-32 registers, paste-back 56-70, inverse index 18-22, no
    spills (2026-12). Triton 3.6 is untested. Block sizes are first guesses, not tuned.

Caveats
    * Without Triton able to run (CPU tensors without TRITON_INTERPRET, or no triton) gather_target_patches,
      gather_patches and scatter_patches fall back to their `kernels.reference` twins; the raw custom ops
      raise instead.
    * B * L, B * n < 2**31 (patch indices are int32; element offsets are int64).
"""

import torch

from . import reference
from ._custom_op import fused_op, kernel_op
from ._runtime import check_dtype, check_ids, next_pow2, tl, triton, triton_can_run
from .gather_rows import inverse_index

# --------------------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------------------


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


def _patches_like(imgs: torch.Tensor, ids: torch.Tensor, patch_size: int) -> torch.Tensor:
    return imgs.new_empty((imgs.shape[0], ids.shape[1], patch_size * patch_size * imgs.shape[1]))


def _gather_target_patches_fake(imgs, ids, patch_size, norm_pix, eps):
    stats = imgs.new_empty((imgs.shape[0], ids.shape[1], 1), dtype=torch.float32)
    return _patches_like(imgs, ids, patch_size), stats, torch.empty_like(stats)


# no autograd: the targets are constants
_gather_target_patches_op = kernel_op(
    "crossmae::gather_target_patches(Tensor imgs, Tensor ids, int patch_size, bool norm_pix, float eps) -> "
    "(Tensor, Tensor, Tensor)",
    gather_target_patches_forward,
    fake=_gather_target_patches_fake,
)

_gather_patches_bwd_op = kernel_op(
    "crossmae::gather_patches_bwd(Tensor dpatches, Tensor ids, int patch_size, int height, int width) -> Tensor",
    gather_patches_backward,
    fake=lambda dpatches, ids, patch_size, height, width: dpatches.new_empty(
        (dpatches.shape[0], dpatches.shape[2] // (patch_size * patch_size), height, width)),
)

_gather_patches_fwd_op = fused_op(
    "crossmae::gather_patches_fwd(Tensor imgs, Tensor ids, int patch_size) -> Tensor patches",
    gather_patches_forward,
    fake=_patches_like,
    save=("ids", "patch_size"),  # not the images: the backward needs only their shape
    grads=("imgs",),
    backward=lambda saved, grad_patches: _gather_patches_bwd_op(
        grad_patches.contiguous(), saved.ids, saved.patch_size, *saved.shapes["imgs"][2:]),
)


def _scatter_patches_bwd_launch(dimg, ids, inv, patch_size, need_patches, need_base):
    dpatches, dbase = scatter_patches_backward(dimg, ids, inv, patch_size, need_patches, need_base)
    # custom ops cannot return None: empty placeholders for gradients nobody asked for
    return (dpatches if dpatches is not None else dimg.new_empty(0),
            dbase if dbase is not None else dimg.new_empty(0))


def _scatter_patches_bwd_fake(dimg, ids, inv, patch_size, need_patches, need_base):
    B, c = dimg.shape[:2]
    dpatches = dimg.new_empty((B, ids.shape[1], patch_size * patch_size * c)) if need_patches else dimg.new_empty(0)
    dbase = dimg.new_empty(dimg.shape) if need_base else dimg.new_empty(0)
    return dpatches, dbase


def _scatter_patches_fake(patches, ids, height, width, patch_size, base):
    B, _, P = patches.shape
    L = (height // patch_size) * (width // patch_size)
    return (patches.new_empty((B, P // (patch_size * patch_size), height, width)),
            ids.new_empty((B, L), dtype=torch.int32))


_scatter_patches_bwd_op = kernel_op(
    "crossmae::scatter_patches_bwd(Tensor dimg, Tensor ids, Tensor inv, int patch_size, bool need_patches, "
    "bool need_base) -> (Tensor, Tensor)",
    _scatter_patches_bwd_launch,
    fake=_scatter_patches_bwd_fake,
)

_scatter_patches_fwd_op = fused_op(
    "crossmae::scatter_patches_fwd(Tensor patches, Tensor ids, int height, int width, int patch_size, "
    "Tensor? base) -> (Tensor img, Tensor inv)",
    scatter_patches_forward,
    fake=_scatter_patches_fake,
    save=("ids", "inv", "patch_size"),
    differentiable=("img",),
    grads=("patches", "base"),
    backward=lambda saved, grad_img: _scatter_patches_bwd_op(
        grad_img, saved.ids, saved.inv, saved.patch_size, saved.needs_grad["patches"], saved.needs_grad["base"]),
)


# --------------------------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------------------------


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
    check_ids("gather_target_patches", ids, imgs.shape[0])
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
    check_ids("gather_patches", ids, imgs.shape[0])
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
    check_ids("scatter_patches", ids, patches.shape[0])
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
