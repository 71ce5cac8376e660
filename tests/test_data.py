"""Data loading: both image-folder backends (DALI CPU pipeline, PyTorch/Pillow), synthetic, demo, messy input.

Most tests read folders of solid-colour images: whatever the crop, an output image's colour tells
which file it came from, so order, sharding and resumption are checked on the pixels themselves.
"""

from __future__ import annotations

import io
import logging
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from train import data as data_mod
from train.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    available_backends,
    build_loader,
    dali_available,
    resolve_data_path,
    scan_image_folder,
)
from train.data import demo as demo_data
from train.data import index as data_index
from train.data.plan import (
    CROP_RATIO,
    RRC_ATTEMPTS,
    EpochPlan,
    center_crop_boxes,
    hash_uniform,
    random_resized_crop_boxes,
)

FOLDER_BACKENDS = [
    pytest.param("torch"),
    pytest.param("dali", marks=pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not installed")),
]
MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Keep scan caches and the demo folder out of the user's ~/.cache."""
    monkeypatch.setenv("CROSSMAE_CACHE", str(tmp_path / "cache"))


def to_rgb255(images: torch.Tensor) -> torch.Tensor:
    """Undo the normalisation: (B, 3, H, W) -> 0..255 float."""
    return (images.cpu() * STD + MEAN) * 255


def palette(n: int) -> np.ndarray:
    """n well-separated RGB colours (a 5x5x5 grid with steps of 50, spread out)."""
    levels = np.array([20, 70, 120, 170, 220])
    grid = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), -1).reshape(-1, 3)
    return grid[np.random.default_rng(0).permutation(len(grid))[:n]]


def make_colour_folder(root, n_per_class=(7, 7, 6), fmt="PNG") -> tuple[str, np.ndarray]:
    """root/c0.., one solid colour per image, sizes varying; returns (root, colours in index order)."""
    colours = palette(sum(n_per_class))
    k = 0
    for c, n in enumerate(n_per_class):
        (root / f"c{c}").mkdir(parents=True)
        for j in range(n):
            size = (40 + 7 * k % 30, 30 + 5 * k % 40)
            ext = "png" if fmt == "PNG" else "jpg"
            Image.new("RGB", size, tuple(int(v) for v in colours[k])).save(root / f"c{c}" / f"im{j:02d}.{ext}", fmt)
            k += 1
    return str(root), colours


def run_epoch(loader, epoch=None, start=0):
    if epoch is not None:
        loader.set_epoch(epoch, start)
    images, labels = [], []
    for x, y in loader:
        images.append(x)
        labels.append(y)
    return images, labels


@pytest.fixture
def colour_folder(tmp_path):
    return make_colour_folder(tmp_path / "colours")


# --------------------------------------------------------------------------- augmentation parameters

def test_random_resized_crop_boxes_respect_scale_ratio_and_bounds():
    sizes = np.array([[500, 375], [64, 64], [1000, 12], [12, 1000], [1, 1], [333, 777]] * 200)
    rand = hash_uniform(3, 1, np.arange(len(sizes)), 2 * RRC_ATTEMPTS + 2)
    boxes = random_resized_crop_boxes(sizes, rand)
    x0, y0, w, h = boxes.T
    assert (x0 >= 0).all() and (y0 >= 0).all() and (w >= 1).all() and (h >= 1).all()
    assert (x0 + w <= sizes[:, 0]).all() and (y0 + h <= sizes[:, 1]).all()
    big = sizes.min(1) >= 64
    area = w * h / sizes.prod(1)
    assert area[big].min() > 0.18 and area[big].max() <= 1.0 and area[big].mean() > 0.45
    aspect = w / h
    assert aspect[big].min() > CROP_RATIO[0] * 0.95 and aspect[big].max() < CROP_RATIO[1] * 1.05
    # Too-elongated images fall back to the largest centered window with the extreme allowed ratio.
    wide = boxes[2]
    assert wide[3] == 12 and wide[2] == 16 and wide[0] == (1000 - 16) // 2


def test_center_crop_boxes_match_resize_then_center_crop():
    boxes = center_crop_boxes(np.array([[256, 256], [512, 300], [300, 512]]), 224)
    assert boxes[0].tolist() == [16, 16, 224, 224]  # 256 -> resize 256 -> crop 224
    assert boxes[1].tolist() == [125, 19, 262, 262]  # 300 * 224/256 = 262.5 -> 262, centered
    assert boxes[2][2] == 262 and boxes[2][0] == 19


def test_epoch_plan_shards_are_disjoint_equal_and_reshuffled():
    sizes = np.full((103, 2), 50)
    plans = [EpochPlan(sizes, 8, 32, train=True, rank=r, world_size=3, seed=1) for r in range(3)]
    assert [p.num_batches for p in plans] == [4, 4, 4]  # 103 // (3 * 8) = 4, tail dropped
    orders = [p.order(0) for p in plans]
    assert len(set(np.concatenate(orders).tolist())) == 3 * 4 * 8
    assert not np.array_equal(plans[0].order(0), plans[0].order(1))
    flips = np.concatenate([p.batch(0, b)[2] for p in plans for b in range(4)])
    assert 0.3 < flips.mean() < 0.7
    evals = [EpochPlan(sizes, 8, 32, train=False, rank=r, world_size=3) for r in range(3)]
    assert {p.samples_per_rank for p in evals} == {35} and evals[0].num_batches == 5
    assert set(np.concatenate([p.order(0) for p in evals]).tolist()) == set(range(103))


# --------------------------------------------------------------------------- image-folder backends

@pytest.mark.parametrize("backend", FOLDER_BACKENDS)
def test_shapes_dtypes_and_solid_colours_normalise_exactly(colour_folder, backend):
    root, colours = colour_folder
    loader = build_loader(root, batch_size=4, img_size=24, backend=backend, num_workers=0, seed=0)
    assert loader.backend == backend and loader.num_images == 20 and len(loader) == 5
    assert loader.classes == ["c0", "c1", "c2"] and loader.skipped == []
    images, labels = run_epoch(loader)
    assert len(images) == 5
    for x, y in zip(images, labels, strict=True):
        assert x.shape == (4, 3, 24, 24) and x.dtype == torch.float32 and x.device.type == "cpu"
        assert y.shape == (4,) and y.dtype == torch.int64
        # Without classes, labels are file indices: the colour must be that file's colour.
        expected = torch.tensor(colours[y.numpy()], dtype=torch.float32)[:, :, None, None]
        expected = (expected / 255 - MEAN) / STD
        assert torch.allclose(x, expected.expand_as(x), atol=0.02)
    seen = torch.cat(labels)
    assert len(set(seen.tolist())) == 20  # one epoch = every file once


@pytest.mark.parametrize("backend", FOLDER_BACKENDS)
def test_labels_are_sorted_class_indices(colour_folder, backend):
    root, _ = colour_folder
    loader = build_loader(root, batch_size=5, img_size=16, backend=backend, num_workers=0, with_labels=True)
    _, labels = run_epoch(loader)
    counts = torch.bincount(torch.cat(labels), minlength=3).tolist()
    assert counts == [7, 7, 6]
    assert loader.index.labels.tolist() == [0] * 7 + [1] * 7 + [2] * 6


@pytest.mark.parametrize("backend", FOLDER_BACKENDS)
def test_demo_batches_have_plausible_statistics(backend):
    loader = build_loader("demo", batch_size=16, img_size=32, backend=backend, num_workers=0)
    x, _ = next(iter(loader))
    assert x.shape == (16, 3, 32, 32)
    assert -1.0 < x.mean().item() < 1.0 and 0.5 < x.std().item() < 1.6
    assert x.min().item() >= -2.2 and x.max().item() <= 2.7  # the range of normalised 0..255 pixels


@pytest.mark.parametrize("backend", FOLDER_BACKENDS)
def test_two_shards_are_disjoint_and_cover_the_data(colour_folder, backend):
    root, _ = colour_folder
    shards = [build_loader(root, batch_size=3, img_size=16, backend=backend, num_workers=0, rank=r, world_size=2,
                           seed=5) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 3  # 20 // (2 * 3)
    ids = [torch.cat(run_epoch(s, epoch=2)[1]).tolist() for s in shards]
    assert len(ids[0]) == len(ids[1]) == 9 and not set(ids[0]) & set(ids[1])
    full = build_loader(root, batch_size=3, img_size=16, backend=backend, num_workers=0, seed=5)
    assert set(ids[0]) | set(ids[1]) == set(full.plan.order(2)[:18].tolist())
    # Evaluation shards pad instead of dropping: together they cover every file.
    evals = [build_loader(root, batch_size=4, img_size=16, train=False, backend=backend, num_workers=0, rank=r,
                          world_size=3) for r in range(3)]
    covered = set()
    for e in evals:
        _, labels = run_epoch(e)
        assert sum(len(y) for y in labels) == 7  # ceil(20 / 3)
        covered |= set(torch.cat(labels).tolist())
    assert covered == set(range(20))


@pytest.mark.parametrize("backend", FOLDER_BACKENDS)
def test_same_seed_same_batches_other_epoch_or_seed_other_order(tmp_path, backend):
    root = tmp_path / "photos"
    demo = resolve_data_path("demo")
    for cls in ("a", "b"):  # real photos, so crops differ visibly
        (root / cls).mkdir(parents=True)
        for k, src in enumerate(sorted((demo / "chelsea").iterdir())[:8]):
            (root / cls / f"{k}.jpg").write_bytes(src.read_bytes())
    def make(seed):
        return build_loader(root, batch_size=4, img_size=24, backend=backend, num_workers=0, seed=seed)

    a, la = run_epoch(make(0), epoch=1)
    b, lb = run_epoch(make(0), epoch=1)
    assert all(torch.equal(x, y) for x, y in zip(a + la, b + lb, strict=True))
    c, lc = run_epoch(make(0), epoch=2)
    _d, ld = run_epoch(make(1), epoch=1)
    assert torch.cat(la).tolist() != torch.cat(lc).tolist()
    assert torch.cat(la).tolist() != torch.cat(ld).tolist()
    assert sorted(torch.cat(la).tolist()) == sorted(torch.cat(lc).tolist())  # 16 of 16 files, in another order
    assert not torch.equal(torch.cat(a), torch.cat(c))


@pytest.mark.parametrize("backend", FOLDER_BACKENDS)
def test_resume_mid_epoch_yields_exactly_the_remaining_batches(backend):
    root = resolve_data_path("demo")
    def make():
        return build_loader(root, batch_size=8, img_size=16, backend=backend, num_workers=0, seed=3)

    ref_x, ref_y = run_epoch(make(), epoch=4)
    resumed = make()
    x, y = run_epoch(resumed, epoch=4, start=29)
    assert len(x) == len(ref_x) - 29 == 11
    assert all(torch.equal(a, b) for a, b in zip(x, ref_x[29:], strict=True))
    assert all(torch.equal(a, b) for a, b in zip(y, ref_y[29:], strict=True))
    # Abandon a pass mid-epoch (prefetched batches in flight), then resume in the same loader.
    it = iter(resumed)
    next(it)
    next(it)
    del it
    x, y = run_epoch(resumed, epoch=4, start=37)
    assert len(x) == 3 and all(torch.equal(a, b) for a, b in zip(y, ref_y[37:], strict=True))
    assert all(torch.equal(a, b) for a, b in zip(x, ref_x[37:], strict=True))
    assert run_epoch(resumed, epoch=4, start=40) == ([], [])  # resumed at the very end: nothing left
    # Without set_epoch the next pass is the following epoch, from its start.
    nxt_x, nxt_y = run_epoch(resumed)
    assert resumed.epoch == 5 and len(nxt_x) == 40
    assert torch.cat(nxt_y).tolist() == np.concatenate(resumed.batch_indices(5)).tolist()


def test_torch_backend_with_worker_processes_matches_in_process(colour_folder):
    root, _ = colour_folder
    single = build_loader(root, batch_size=4, img_size=16, backend="torch", num_workers=0, seed=2)
    multi = build_loader(root, batch_size=4, img_size=16, backend="torch", num_workers=2, seed=2)
    for epoch, start in ((0, 0), (1, 2), (3, 0)):
        a, la = run_epoch(single, epoch, start)
        b, lb = run_epoch(multi, epoch, start)
        assert len(a) == len(b) == 5 - start
        assert all(torch.equal(x, y) for x, y in zip(a + la, b + lb, strict=True))


@pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not installed")
def test_dali_and_torch_produce_the_same_augmented_images(tmp_path):
    demo = resolve_data_path("demo")
    common = dict(batch_size=16, img_size=48, num_workers=0, seed=7)
    for train in (True, False):
        a, la = run_epoch(build_loader(demo, train=train, backend="dali", **common), epoch=0)
        b, lb = run_epoch(build_loader(demo, train=train, backend="torch", **common), epoch=0)
        assert torch.equal(torch.cat(la), torch.cat(lb))  # same files in the same order
        diff = (torch.cat(a) - torch.cat(b)).abs()
        # Same windows and flips; only the decoders' IDCT and the resize kernels differ (~1-3 levels of 255).
        assert diff.mean().item() < 0.06, diff.mean().item()
        assert diff.quantile(0.99).item() < 0.6


@pytest.mark.parametrize("backend", FOLDER_BACKENDS)
def test_flip_and_eval_center_crop(tmp_path, backend):
    root = tmp_path / "patterns"
    (root / "x").mkdir(parents=True)
    ramp = np.zeros((90, 120, 3), np.uint8)
    ramp[..., 0] = np.linspace(0, 255, 120).astype(np.uint8)[None, :]  # red grows left to right
    for k in range(16):
        Image.fromarray(ramp).save(root / "x" / f"ramp{k:02d}.png")
    loader = build_loader(root, batch_size=16, img_size=16, backend=backend, num_workers=0, seed=0)
    (x,), _ = run_epoch(loader, epoch=0)
    _, _, flips = loader.plan.batch(0, 0)
    red = to_rgb255(x)[:, 0].mean(dim=1)  # (B, W) column profile
    slope = red[:, -1] - red[:, 0]
    assert 0 < flips.sum() < 16
    assert ((slope < 0).numpy() == flips.astype(bool)).all()

    # Eval: shorter side -> 16 * 256/224 = 18, center 16 -> the window's middle 8/9; borders never show.
    root = tmp_path / "frames"
    (root / "y").mkdir(parents=True)
    frame = np.zeros((100, 200, 3), np.uint8)
    frame[:, :] = (0, 200, 0)
    frame[:, :40] = (200, 0, 0)  # left 40 px red: outside the central 89-px window (55..144)
    frame[:, 160:] = (0, 0, 200)
    frame[:4] = (200, 200, 200)  # top rows: outside vertically too (window rows 5..94)
    for k in range(3):
        Image.fromarray(frame).save(root / "y" / f"f{k}.png")
    ev = build_loader(root, batch_size=3, img_size=16, train=False, backend=backend, num_workers=0)
    (x,), _ = run_epoch(ev)
    rgb = to_rgb255(x)
    assert (rgb[:, 1] > 180).all() and (rgb[:, 0] < 25).all() and (rgb[:, 2] < 25).all()


# --------------------------------------------------------------------------- messy input

def _jpeg_bytes(colour=(200, 40, 40), size=(64, 48), mode="RGB") -> bytes:
    buf = io.BytesIO()
    img = Image.new("RGB", size, colour)
    (img.convert(mode) if mode != "RGB" else img).save(buf, "JPEG", quality=95)
    return buf.getvalue()


@pytest.fixture
def messy_folder(tmp_path):
    """Good images in odd modes and formats, beside every kind of bad file."""
    root = tmp_path / "messy"
    good, bad = {}, []
    for d in ("a", "b", "empty", ".hidden_class"):
        (root / d).mkdir(parents=True)
    (root / "a" / "nested").mkdir()

    def put(rel, colour, writer):
        writer(root / rel)
        good[rel] = colour

    put("a/rgb.jpg", (200, 40, 40), lambda p: p.write_bytes(_jpeg_bytes((200, 40, 40))))
    put("a/nested/rgb2.jpeg", (40, 40, 200), lambda p: p.write_bytes(_jpeg_bytes((40, 40, 200))))
    put("a/gray.jpg", (128, 128, 128), lambda p: Image.new("L", (50, 40), 128).save(p, quality=95))
    put("a/cmyk.jpg", (200, 40, 40), lambda p: p.write_bytes(_jpeg_bytes((200, 40, 40), mode="CMYK")))
    put("b/rgba.png", (10, 200, 30), lambda p: Image.new("RGBA", (40, 40), (10, 200, 30, 90)).save(p))
    put("b/la.png", (90, 90, 90), lambda p: Image.new("LA", (40, 30), (90, 40)).save(p))
    put("b/palette.png", (200, 200, 0), lambda p: Image.new("RGB", (30, 30), (200, 200, 0)).convert("P").save(p))
    put("b/deep.png", (128, 128, 128),
        lambda p: Image.fromarray(np.full((30, 30), 128 * 257, np.uint16)).save(p))  # 16-bit gray, half range
    put("b/x.bmp", (30, 160, 160), lambda p: Image.new("RGB", (40, 40), (30, 160, 160)).save(p))
    put("b/x.webp", (160, 30, 160), lambda p: Image.new("RGB", (40, 40), (160, 30, 160)).save(p, lossless=True))
    put("b/x.tiff", (60, 90, 120), lambda p: Image.new("RGB", (40, 40), (60, 90, 120)).save(p))
    full = _jpeg_bytes((100, 100, 100), size=(120, 90))
    broken = {"a/truncated.jpg": full[: len(full) // 2], "a/zero.jpg": b"", "a/text.jpg": b"this is not a jpeg",
              "b/header_garbage.jpg": full[:300] + bytes(500) + full[800:], "b/truncated.png": _png_half()}
    for rel, content in broken.items():
        (root / rel).write_bytes(content)
        bad.append(rel)
    (root / "a" / "notes.txt").write_text("not an image")
    (root / "a" / ".DS_Store").write_bytes(b"\0\1\2")
    (root / "a" / ".hidden.jpg").write_bytes(_jpeg_bytes())
    (root / ".hidden_class" / "x.jpg").write_bytes(_jpeg_bytes())
    (root / "README.md").write_text("root-level file")
    (root / "loose.jpg").write_bytes(_jpeg_bytes())  # not in a class folder
    os.symlink(root / "a", root / "a" / "nested" / "loop")  # a symlink cycle must not hang the scan
    return root, good, bad


def _png_half() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 60, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()[: len(buf.getvalue()) // 2]


def test_scan_skips_bad_files_ignores_others_and_logs_them(messy_folder, caplog):
    root, good, bad = messy_folder
    with caplog.at_level(logging.WARNING, logger="train.data"):
        index = scan_image_folder(root)
    assert index.classes == ["a", "b", "empty"]  # hidden folder left out, empty class kept
    assert sorted(os.path.relpath(f, root) for f in index.files) == sorted(good)
    assert sorted(os.path.relpath(f, root) for f in index.skipped) == sorted(bad)
    ignored = {os.path.relpath(f, root) for f in index.ignored}
    assert {"a/notes.txt", "README.md", "loose.jpg"} <= ignored
    assert not any(".hidden" in f or ".DS_Store" in f for f in index.files)
    warning = "\n".join(r.getMessage() for r in caplog.records)
    assert f"skipping {len(bad)} unreadable" in warning and "truncated.jpg" in warning and "empty" in warning


@pytest.mark.parametrize("backend", FOLDER_BACKENDS)
def test_messy_folder_loads_every_good_image_as_rgb(messy_folder, backend):
    root, good, bad = messy_folder
    good = {**good, "loose.jpg": (200, 40, 40)}  # without labels (pre-training) the root's own images count too
    loader = build_loader(root, batch_size=4, img_size=16, train=False, backend=backend, num_workers=0)
    assert loader.num_images == len(good) and len(loader.skipped) == len(bad)
    images, labels = run_epoch(loader)
    x, ids = torch.cat(images), torch.cat(labels)
    assert x.shape == (len(good), 3, 16, 16) and sorted(ids.tolist()) == list(range(len(good)))
    rgb = to_rgb255(x).mean(dim=(2, 3))
    for k, i in enumerate(ids.tolist()):
        rel = os.path.relpath(loader.files[i], root)
        tolerance = 12 if "cmyk" in rel else 4  # CMYK round trip through Pillow's naive conversion
        assert torch.allclose(rgb[k], torch.tensor(good[rel], dtype=torch.float32), atol=tolerance), (rel, rgb[k])


def test_exif_orientation_is_applied_consistently(tmp_path):
    root = tmp_path / "exif"
    (root / "r").mkdir(parents=True)
    stored = np.zeros((60, 80, 3), np.uint8)
    stored[:30] = (220, 0, 0)  # top half red, bottom half blue as stored
    stored[30:] = (0, 0, 220)
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise: top -> right
    Image.fromarray(stored).save(root / "r" / "rot.jpg", quality=95, exif=exif)
    index = scan_image_folder(root)
    assert index.sizes.tolist() == [[60, 80]]
    for backend in available_backends()[:-1]:
        (x,), _ = run_epoch(build_loader(root, batch_size=1, img_size=16, train=False, backend=backend, num_workers=0))
        rgb = to_rgb255(x)[0]
        assert rgb[0, :, -4:].mean() > 180 and rgb[2, :, -4:].mean() < 40, backend  # right: red
        assert rgb[2, :, :4].mean() > 180 and rgb[0, :, :4].mean() < 40, backend  # left: blue


def test_unreadable_file_is_skipped(tmp_path, monkeypatch):
    root, _ = make_colour_folder(tmp_path / "perm", n_per_class=(4,))
    locked = os.path.join(root, "c0", "im01.png")
    if os.geteuid() != 0:
        os.chmod(locked, 0)
    else:  # root reads everything: simulate the permission error where the scan opens the file
        real_open = data_index.Image.open

        def guarded_open(path, *args, **kwargs):
            if os.fspath(path) == locked:
                raise PermissionError(13, "Permission denied", locked)
            return real_open(path, *args, **kwargs)

        monkeypatch.setattr(data_index.Image, "open", guarded_open)
    try:
        index = scan_image_folder(root)
    finally:
        os.chmod(locked, 0o644)
    assert index.skipped == [locked] and len(index.files) == 3
    monkeypatch.undo()
    monkeypatch.setenv("CROSSMAE_CACHE", str(tmp_path / "cache"))
    assert len(scan_image_folder(root).files) == 4  # a read error is not cached: readable again, used again


def test_missing_empty_or_useless_roots_raise_before_training(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        resolve_data_path(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="nope"):
        build_loader(tmp_path / "nope", batch_size=2, backend="torch")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        build_loader(tmp_path / "empty", batch_size=2, backend="torch")
    (tmp_path / "only_bad" / "c").mkdir(parents=True)
    (tmp_path / "only_bad" / "c" / "x.jpg").write_bytes(b"")
    (tmp_path / "only_bad" / "d").mkdir()
    with pytest.raises(ValueError, match=r"only_bad.*no valid image"):
        build_loader(tmp_path / "only_bad", batch_size=2, backend="torch")
    (tmp_path / "file.jpg").write_bytes(_jpeg_bytes())
    with pytest.raises(ValueError, match="not a folder"):
        scan_image_folder(tmp_path / "file.jpg")
    root, _ = make_colour_folder(tmp_path / "small", n_per_class=(3,))
    with pytest.raises(ValueError, match="batch_size"):
        build_loader(root, batch_size=4, backend="torch")  # 3 images cannot fill one batch of 4


@pytest.mark.parametrize("backend", FOLDER_BACKENDS)
def test_file_breaking_after_the_scan_does_not_kill_the_epoch(colour_folder, backend, caplog):
    root, _colours = colour_folder
    loader = build_loader(root, batch_size=4, img_size=16, backend=backend, num_workers=0, seed=0)
    victim = loader.files[5]
    with open(victim, "r+b") as f:  # truncated behind the loader's back
        f.truncate(40)
    with caplog.at_level(logging.WARNING, logger="train.data"):
        images, labels = run_epoch(loader, epoch=0)
    assert len(images) == 5 and all(x.shape == (4, 3, 16, 16) for x in images)
    assert torch.isfinite(torch.cat(images)).all()
    assert victim in caplog.text
    if backend == "dali":  # replaced by another file of its batch, and remembered
        assert victim in loader.skipped and 5 not in torch.cat(labels).tolist()


def test_scan_cache_is_reused_and_invalidated_by_changes(colour_folder, monkeypatch):
    root, _ = colour_folder
    first = scan_image_folder(root)
    calls = []
    real_probe = data_index.probe_image
    monkeypatch.setattr(data_index, "probe_image", lambda p, v="decode": calls.append(p) or real_probe(p, v))
    again = scan_image_folder(root)
    assert calls == [] and again.files == first.files and np.array_equal(again.sizes, first.sizes)
    changed = first.files[3]
    Image.new("RGB", (77, 33), (1, 2, 3)).save(changed, "PNG")
    os.utime(changed, ns=(1, 1))
    third = scan_image_folder(root)
    assert calls == [changed] and third.sizes[3].tolist() == [77, 33]


# --------------------------------------------------------------------------- arguments and backends

def test_invalid_arguments_raise_value_errors_naming_them(colour_folder, monkeypatch):
    root, _ = colour_folder
    for kwargs, name in ((dict(batch_size=0), "batch_size"), (dict(backend="pillow"), "backend"),
                         (dict(rank=2, world_size=2), "rank"), (dict(num_workers=-1), "num_workers"),
                         (dict(img_size=0), "img_size"), (dict(validate="maybe"), "validate")):
        args = dict(batch_size=2, backend="torch") | kwargs
        with pytest.raises(ValueError, match=name):
            build_loader(root, **args)
    loader = build_loader(root, batch_size=4, backend="torch", num_workers=0)
    with pytest.raises(ValueError, match="start_batch"):
        loader.set_epoch(0, start_batch=6)
    monkeypatch.setattr(data_mod, "dali_available", lambda: False)
    with pytest.raises(ValueError, match=r"dali.*available: \['torch', 'synthetic'\]"):
        build_loader(root, batch_size=2, backend="dali")


def test_auto_backend_picks_dali_if_it_imports_else_torch_and_logs_it(colour_folder, monkeypatch, caplog):
    root, _ = colour_folder
    with caplog.at_level(logging.INFO, logger="train.data"):
        loader = build_loader(root, batch_size=2, num_workers=0)
    assert loader.backend == ("dali" if dali_available() else "torch")
    assert f"data backend: {loader.backend}" in caplog.text
    monkeypatch.setattr(data_mod, "dali_available", lambda: False)
    assert build_loader(root, batch_size=2, num_workers=0).backend == "torch"
    assert available_backends() == ["torch", "synthetic"]


def test_synthetic_backend_shapes_length_determinism_and_resume():
    loader = build_loader(None, batch_size=4, img_size=32, backend="synthetic", num_images=50, seed=1)
    assert loader.backend == "synthetic" and len(loader) == 12
    a, la = run_epoch(loader, epoch=0)
    assert len(a) == 12 and a[0].shape == (4, 3, 32, 32) and a[0].dtype == torch.float32
    assert abs(torch.cat(a).mean().item()) < 0.05 and 0.95 < torch.cat(a).std().item() < 1.05
    assert torch.cat(la).tolist() == list(range(48))
    again = build_loader("synthetic", batch_size=4, img_size=32, backend="auto", num_images=50, seed=1)
    assert again.backend == "synthetic"
    b, _ = run_epoch(again, epoch=0, start=9)
    assert len(b) == 3 and all(torch.equal(x, y) for x, y in zip(b, a[9:], strict=True))
    c, _ = run_epoch(again, epoch=1)
    assert not torch.equal(c[0], a[0])
    two = [build_loader(None, batch_size=4, img_size=8, backend="synthetic", num_images=50, rank=r, world_size=2)
           for r in range(2)]
    assert len(two[0]) == 6 and not torch.equal(next(iter(two[0]))[0], next(iter(two[1]))[0])
    labelled = build_loader(None, batch_size=64, img_size=8, backend="synthetic", num_images=64, with_labels=True)
    y = next(iter(labelled))[1]
    assert y.dtype == torch.int64 and 0 <= y.min() and y.max() < 1000 and len(set(y.tolist())) > 40


# --------------------------------------------------------------------------- the embedded demo

def test_demo_is_built_once_from_bundled_photos_and_reused(tmp_path, monkeypatch):
    cache = tmp_path / "democache"
    monkeypatch.setenv("CROSSMAE_CACHE", str(cache))
    root = resolve_data_path("demo")
    assert root == cache / "demo"
    jpegs = sorted(root.rglob("*.jpg"))
    classes = [d for d in root.iterdir() if d.is_dir()]
    assert 200 <= len(jpegs) <= 500 and len(classes) >= 4
    for path in jpegs[::37]:
        with Image.open(path) as im:
            assert im.format == "JPEG" and 160 <= max(im.size) <= 256
    assert not [p for p in cache.iterdir() if p.name.startswith(".demo-")]  # temp folder renamed, none left

    def must_not_rebuild(*args, **kwargs):
        raise AssertionError("the demo was rebuilt instead of reused")

    monkeypatch.setattr(demo_data, "_write_demo", must_not_rebuild)
    assert resolve_data_path("demo") == root


def test_interrupted_demo_build_leaves_no_cache_and_racing_builds_agree(tmp_path, monkeypatch):
    cache = tmp_path / "race"
    real_write = demo_data._write_demo

    def interrupted(out, photos, num_images, seed):
        real_write(out, photos[:1], 5, seed)
        raise KeyboardInterrupt

    monkeypatch.setattr(demo_data, "_write_demo", interrupted)
    with pytest.raises(KeyboardInterrupt):
        demo_data.materialize_demo(cache)
    assert not (cache / "demo").exists() and not list(cache.glob(".demo-*"))
    monkeypatch.setattr(demo_data, "_write_demo", real_write)

    results, errors = [], []

    def build():
        try:
            results.append(demo_data.materialize_demo(cache, num_images=40))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=build) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and results == [cache / "demo"] * 3
    assert len(list((cache / "demo").rglob("*.jpg"))) >= 40 and not list(cache.glob(".demo-*"))


def test_ctrl_c_while_the_scan_queues_its_probes_does_not_wait_for_them(tmp_path, monkeypatch):
    # Issue 19, item 8: a KeyboardInterrupt raised while Executor.map is still queueing the probes used to wait,
    # on leaving the pool, for every probe already queued (minutes at ImageNet scale). Here the 30th submission
    # is interrupted while each probe takes 0.1 s: the scan must end after the probes already running, not
    # after the 29 queued ones.
    import concurrent.futures
    import time

    root = tmp_path / "photos"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / f"{i}.png")
    probed = []
    real_probe = data_index.probe_image

    def slow_probe(path, validate="decode"):
        time.sleep(0.1)
        probed.append(path)
        return real_probe(path, validate)

    real_submit = concurrent.futures.ThreadPoolExecutor.submit
    submitted = []

    def interrupted_submit(self, fn, *args, **kwargs):
        if len(submitted) == 29:
            raise KeyboardInterrupt
        submitted.append(1)
        return real_submit(self, fn, *args, **kwargs)

    monkeypatch.setattr(data_index, "probe_image", slow_probe)
    monkeypatch.setattr(concurrent.futures.ThreadPoolExecutor, "submit", interrupted_submit)
    with pytest.raises(KeyboardInterrupt):
        data_index.scan_image_folder(root, classes=False, num_threads=2, cache_dir=tmp_path / "cache")
    time.sleep(0.3)  # the probes that were running finish; no queued one may start after the interrupt
    assert len(probed) <= 6, f"{len(probed)} of 29 queued probes ran after the Ctrl-C"


@pytest.mark.parametrize("garbage", ["[1, 2, 3]", "null", '{"version": 1, "entries": {"a.png": 5}}', '"x"'])
def test_a_scan_cache_of_the_wrong_shape_is_rebuilt_with_a_warning(tmp_path, caplog, garbage):
    # Issue 19, item 2: valid JSON of another shape used to end in AttributeError / TypeError tracebacks.
    root = tmp_path / "photos"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / f"{i}.png")
    data_index.scan_image_folder(root, classes=False, cache_dir=tmp_path / "cache")
    (cache_file,) = (tmp_path / "cache").rglob("*.npz")
    cache_file.write_text(garbage)
    with caplog.at_level(logging.WARNING, logger="train.data"):
        index = data_index.scan_image_folder(root, classes=False, cache_dir=tmp_path / "cache")
    assert len(index.files) == 3 and "scanning again" in caplog.text


@pytest.mark.parametrize("marker", ["[]", "null", '"x"', "deleted images"])
def test_a_demo_marker_that_does_not_validate_is_rebuilt(tmp_path, caplog, marker):
    # Issue 19, item 2: a marker of the wrong shape was a traceback; images deleted under an intact marker
    # trained silently on what was left.
    folder = demo_data.materialize_demo(tmp_path, num_images=12)
    if marker == "deleted images":
        for jpg in sorted(folder.rglob("*.jpg"))[:5]:
            jpg.unlink()
    else:
        (folder / demo_data._MARKER).write_text(marker)
    with caplog.at_level(logging.WARNING, logger="train.data"):
        again = demo_data.materialize_demo(tmp_path, num_images=12)
    assert "rebuilding" in caplog.text
    assert len(list(again.rglob("*.jpg"))) == 12


def test_two_builds_racing_on_an_outdated_demo_folder_both_succeed(tmp_path, monkeypatch):
    # Issue 19, item 4: both processes find an outdated marker; one publishes its build between the other's
    # moving the old folder aside and its own rename, which then failed with "Directory not empty".
    folder = demo_data.materialize_demo(tmp_path, num_images=6)
    (folder / demo_data._MARKER).write_text('{"version": -1, "images": 6}')  # outdated
    rival = demo_data.materialize_demo(tmp_path / "rival", num_images=6)  # the other process's finished build
    real_move_aside = demo_data._move_aside

    def move_aside_then_rival_publishes(path, base):
        real_move_aside(path, base)
        if path == folder and not path.exists():
            os.rename(rival, path)

    monkeypatch.setattr(demo_data, "_move_aside", move_aside_then_rival_publishes)
    assert demo_data.materialize_demo(tmp_path, num_images=6) == folder
    assert len(list(folder.rglob("*.jpg"))) == 6


@pytest.mark.parametrize("backend", FOLDER_BACKENDS)
def test_a_file_name_that_is_not_utf8_is_read(tmp_path, backend):
    # Issue 19, item 6: the scan accepted b"bad\xff\xfename.jpg" and DALI's path encoding then died with a
    # UnicodeEncodeError; the file system's own bytes are passed instead.
    root = tmp_path / "photos"
    root.mkdir()
    rng = np.random.default_rng(0)
    for name in (b"bad\xff\xfename.png", b"good.png"):
        Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(os.fsdecode(bytes(root) + b"/" + name))
    loader = build_loader(root, batch_size=2, img_size=8, train=False, backend=backend, num_workers=0,
                          cache_dir=tmp_path / "cache")
    assert loader.num_images == 2
    images, _ = next(iter(loader))
    assert images.shape == (2, 3, 8, 8) and bool(torch.isfinite(images).all())


@pytest.mark.parametrize("where", ["a file", "under a file", "/proc"])
def test_an_unwritable_cache_folder_is_named_in_one_line(tmp_path, monkeypatch, where):
    # Issue 19, item 3: CROSSMAE_CACHE pointing at a file, under a file or under /proc gave tracebacks
    # (FileExistsError, NotADirectoryError) or a misleading message.
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    cache = {"a file": blocker, "under a file": blocker / "sub", "/proc": Path("/proc/crossmae-test")}[where]
    monkeypatch.setenv("CROSSMAE_CACHE", str(cache))
    with pytest.raises(ValueError, match=r"\$CROSSMAE_CACHE .* cannot hold the demo dataset .*set CROSSMAE_CACHE"):
        demo_data.materialize_demo()


def test_the_first_scan_uses_every_core_the_process_may_use_unless_told(tmp_path, monkeypatch):
    # Issue 19, start-up at scale: the scan's threads followed --num_workers (default 2), not the cores.
    root = tmp_path / "photos"
    root.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(root / "a.png")
    threads = []
    real_scan = data_mod.scan_image_folder
    monkeypatch.setattr(data_mod, "scan_image_folder", lambda *a, **kw: threads.append(kw["num_threads"])
                        or real_scan(*a, **kw))
    monkeypatch.setattr(data_mod, "available_cores", lambda: 7)
    build_loader(root, batch_size=1, img_size=8, backend="torch", num_workers=0, cache_dir=tmp_path / "c1")
    build_loader(root, batch_size=1, img_size=8, backend="torch", num_workers=0, cache_dir=tmp_path / "c2",
                 scan_threads=3)
    assert threads == [7, 3]
