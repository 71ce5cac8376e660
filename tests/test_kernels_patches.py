"""Patch gathers and scatters (kernels/patches.py) against their references, gradients included, duplicate ids
too.
"""

from __future__ import annotations

import pytest
import torch

import kernels
from kernel_helpers import (
    DEVICE,
    GPU_DTYPES,
    RTOL,
    assert_close,
    distinct_ids,
    gpu,
    grads,
    requires_kernels,
)
from kernels import reference as ref

pytestmark = requires_kernels



# (B, c, H, W, patch_size, n)
PATCH_SHAPES = [(2, 3, 12, 8, 4, 4), (2, 3, 28, 28, 14, 3), (1, 1, 6, 9, 3, 5), (3, 3, 32, 32, 16, 3)]


@pytest.mark.parametrize("shape", PATCH_SHAPES, ids=lambda s: "B{}-c{}-{}x{}-p{}-n{}".format(*s))
@pytest.mark.parametrize("norm_pix", [True, False])
def test_gather_target_patches(shape, norm_pix):
    B, c, H, W, p, n = shape
    imgs = torch.randn(B, c, H, W, device=DEVICE) * 2 + 0.5
    ids = distinct_ids(B, (H // p) * (W // p), n)
    got = kernels.gather_target_patches(imgs, ids, p, norm_pix=norm_pix)
    want = ref.gather_target_patches_reference(imgs, ids, p, norm_pix=norm_pix)
    for name, g, w in zip(("targets", "mean", "var"), got, want, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype, name
        assert_close(g, w, 1e-5, name)


def test_gather_target_patches_layout_and_channels_last():
    """Patch layout (h, w, p, q, c) spelled out element by element, on a channels-last image."""
    B, c, H, W, p = 1, 3, 8, 12, 4
    imgs = torch.randn(B, c, H, W, device=DEVICE).to(memory_format=torch.channels_last)
    ids = torch.tensor([[5, 0, 3]], device=DEVICE)
    targets, _, _ = kernels.gather_target_patches(imgs, ids, p, norm_pix=False)
    grid_w = W // p
    for t, patch in enumerate(ids[0].tolist()):
        gh, gw = divmod(patch, grid_w)
        block = imgs[0, :, gh * p:(gh + 1) * p, gw * p:(gw + 1) * p]  # (c, p, q)
        assert torch.equal(targets[0, t], block.permute(1, 2, 0).reshape(-1))


@pytest.mark.parametrize("shape", [*PATCH_SHAPES, (2, 2, 15, 10, 5, 6)],
                         ids=lambda s: "B{}-c{}-{}x{}-p{}-n{}".format(*s))
def test_gather_patches(shape):
    """Raw patches and their gradient to the image (a strided view here) against autograd of the reference."""
    B, c, H, W, p, n = shape
    base = torch.randn(B, c, W, H, device=DEVICE, requires_grad=True)
    imgs = base.transpose(2, 3)  # (B, c, H, W) with the column stride > 1
    ids = distinct_ids(B, (H // p) * (W // p), n)
    out = kernels.gather_patches(imgs, ids, p)
    expected = ref.gather_patches_reference(imgs, ids, p)
    assert out.is_contiguous() and out.shape == (B, n, p * p * c) and out.dtype == imgs.dtype
    assert_close(out, expected, 0, "patches")
    dout = torch.randn_like(out)
    assert_close(grads(out, (base,), dout)[0], grads(expected, (base,), dout)[0], 0, "dimgs")


def test_gather_patches_duplicate_ids_add_up():
    """Duplicate ids (legal, though masking never makes them): the image gradient is the exact scatter-add."""
    B, c, H, W, p = 2, 3, 8, 12, 4
    imgs = torch.randn(B, c, H, W, device=DEVICE, requires_grad=True)
    ids = torch.tensor([[1, 4, 1, 1, 0], [5, 5, 2, 3, 5]], device=DEVICE)
    out = kernels.gather_patches(imgs, ids, p)
    expected = ref.gather_patches_reference(imgs, ids, p)
    assert_close(out, expected, 0, "patches")
    dout = torch.randn_like(out)
    assert_close(grads(out, (imgs,), dout)[0], grads(expected, (imgs,), dout)[0], 1e-6, "dimgs")


def test_gather_patches_custom_ops_and_every_element_written(monkeypatch):
    """opcheck of both custom ops (schema, fake kernel, autograd); NaN-poisoned torch.empty buffers never
    survive into the patches or the image gradient (pixels no patch covers must be written as zeros)."""
    imgs = torch.randn(2, 3, 8, 12, device=DEVICE)
    ids = distinct_ids(2, 6, 3)
    torch.library.opcheck(torch.ops.crossmae.gather_patches_fwd, (imgs.clone().requires_grad_(), ids, 4))
    torch.library.opcheck(torch.ops.crossmae.gather_patches_bwd, (torch.randn(2, 3, 48, device=DEVICE), ids, 4, 8,
                                                                  12))
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: real_empty(*a, **k).fill_(float("nan")))
    leaf_imgs = imgs.clone().requires_grad_()
    out = kernels.gather_patches(leaf_imgs, ids, 4)
    dimgs = grads(out, (leaf_imgs,), torch.ones_like(out))[0]
    monkeypatch.undo()
    assert not torch.isnan(out).any() and not torch.isnan(dimgs).any()
    assert (dimgs == 0).sum() == 2 * 3 * 3 * 16  # the 3 patches per image nobody gathered


@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("shape", [(2, 3, 12, 8, 4, 4), (1, 3, 28, 42, 14, 5)],
                         ids=lambda s: "B{}-c{}-{}x{}-p{}-n{}".format(*s))
def test_scatter_patches(shape, with_base):
    B, c, H, W, p, n = shape
    patches = torch.randn(B, n, p * p * c, device=DEVICE, requires_grad=True)
    base = torch.randn(B, c, H, W, device=DEVICE, requires_grad=True) if with_base else None
    ids = distinct_ids(B, (H // p) * (W // p), n)
    out = kernels.scatter_patches(patches, ids, (H, W), p, base=base)
    expected = ref.scatter_patches_reference(patches, ids, (H, W), p, base=base)
    assert out.is_contiguous() and out.shape == (B, c, H, W)
    assert_close(out, expected, 0, "image")
    leaves = (patches, base) if with_base else (patches,)
    dout = torch.randn_like(out)
    names = ("dpatches", "dbase")[: len(leaves)]
    for name, g, w in zip(names, grads(out, leaves, dout), grads(expected, leaves, dout), strict=True):
        assert_close(g, w, 0, name)


def test_scatter_patches_duplicate_ids_last_wins():
    B, c, H, p = 1, 2, 4, 2
    patches = torch.randn(B, 3, p * p * c, device=DEVICE, requires_grad=True)
    ids = torch.tensor([[1, 1, 2]], device=DEVICE)
    out = kernels.scatter_patches(patches, ids, H, p)
    expected = ref.scatter_patches_reference(patches[:, 1:], ids[:, 1:], H, p)
    assert_close(out, expected, 0, "image")
    dpatches = grads(out, (patches,), torch.ones_like(out))[0]
    assert torch.all(dpatches[0, 0] == 0) and torch.all(dpatches[0, 1:] == 1)


def test_patches_reject_bad_inputs():
    with pytest.raises(ValueError, match="divisible"):
        kernels.gather_target_patches(torch.randn(1, 3, 10, 10, device=DEVICE), distinct_ids(1, 4, 2), 4)
    with pytest.raises(ValueError, match="divisible"):
        kernels.gather_patches(torch.randn(1, 3, 10, 10, device=DEVICE), distinct_ids(1, 4, 2), 4)
    with pytest.raises(ValueError, match="ids has batch"):
        kernels.gather_patches(torch.randn(2, 3, 8, 8, device=DEVICE), distinct_ids(1, 4, 2), 4)


@gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
def test_patches_gpu(dtype):
    B, p = 16, 16
    ids = distinct_ids(B, 196, 49)
    imgs = torch.randn(B, 3, 224, 224, device=DEVICE, dtype=dtype)
    got = kernels.gather_target_patches(imgs, ids, p)
    want = ref.gather_target_patches_reference(imgs, ids, p)
    for name, g, w in zip(("targets", "mean", "var"), got, want, strict=True):
        assert_close(g, w, RTOL[dtype], name)
    patches = torch.randn(B, 49, p * p * 3, device=DEVICE, dtype=dtype)
    assert_close(kernels.scatter_patches(patches, ids, 224, p, base=imgs),
                 ref.scatter_patches_reference(patches, ids, 224, p, base=imgs), 0, "scatter_patches")
