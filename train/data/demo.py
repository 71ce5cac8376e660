"""The embedded demo datasets: real photographs shipped inside installed packages, as image folders.

`materialize_demo()` builds, once, `<cache>/demo/<photo>/<photo>_NNN.jpg` (cache: `$CROSSMAE_CACHE`,
else `~/.cache/crossmae`): exactly 320 JPEG crops (160-256 px, random positions and scales, seed 0) of a
fixed list of photographs, nine shipped inside the wheels of scikit-image and matplotlib (both hard
dependencies; never the files scikit-image downloads). The list is explicit, so the set does not depend
on what else is installed. `materialize_demo_heldout()` builds `<cache>/demo_heldout/`: a few crops of
two other photographs of scikit-image's that the demo never trains on, drawn beside training images in
the reconstruction grids. No network. One folder per photo (pre-training needs no classes; the folders
only keep the crops of a photo together).

The folder appears atomically: it is written under a temporary name and renamed into place, and the
marker file is written last, so an interrupted build never leaves a half-built cache and racing
processes (DDP ranks) each either build and rename or find the winner's folder.

    python -m train.data.demo [--out DIR] [--force]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from train.data.index import cache_root

logger = logging.getLogger("train.data")

DEMO_IMAGES = 320
DEMO_HELDOUT_IMAGES = 4
DIGITS_SIZE = 32
_MARKER = "DEMO_COMPLETE.json"
# Per dataset: a marker of another version means the folder is rebuilt. demo 2: the fixed photo list,
# exactly DEMO_IMAGES crops, two photos held out.
_VERSIONS = {"demo": 2, "demo_heldout": 1, "digits": 1}
# (package, folder inside it, file): the training photos, then the held-out ones.
_DEMO_PHOTOS = (
    *(("skimage", "data", name) for name in ("astronaut.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png",
                                            "hubble_deep_field.jpg", "retina.jpg", "ihc.png", "coins.png")),
    ("matplotlib", "mpl-data/sample_data", "grace_hopper.jpg"),
)
_HELDOUT_PHOTOS = (("skimage", "data", "coffee.png"), ("skimage", "data", "camera.png"))


def _package_dir(name: str) -> Path | None:
    """The folder of an installed package, found without importing it (imports can be slow or noisy)."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _find_photos(listed: tuple[tuple[str, str, str], ...]) -> list[Path]:
    """The listed photographs, all of them, or FileNotFoundError naming the first missing one and the fix."""
    found = []
    for package, sub, name in listed:
        base = _package_dir(package)
        path = base / sub / name if base is not None else None
        if path is None or not path.is_file():
            pip_name = {"skimage": "scikit-image"}.get(package, package)
            raise FileNotFoundError(f"the demo photograph {package}/{sub}/{name} is missing ({package} is not "
                                    f"installed, or is another build): pip install {pip_name}")
        found.append(path)
    return found


def source_photos() -> list[Path]:
    """The demo's training photographs, in a fixed order (all of them, or FileNotFoundError)."""
    return _find_photos(_DEMO_PHOTOS)


def heldout_photos() -> list[Path]:
    """The photographs of the held-out demo images, which the demo never trains on."""
    return _find_photos(_HELDOUT_PHOTOS)


def _complete(folder: Path) -> bool:
    """Whether ``folder`` holds a finished build of this version: a marker that validates (a JSON object of the
    current version whose image count matches the files there). A marker that exists but does not validate
    (another shape, an old version, images deleted since) is reported, and the folder is rebuilt."""
    marker = folder / _MARKER
    try:
        info = json.loads(marker.read_text())
    except FileNotFoundError:
        return False
    except (OSError, ValueError) as e:
        logger.warning("%s is unreadable (%s): rebuilding %s", marker, e, folder)
        return False
    expected = info.get("images") if isinstance(info, dict) else None
    if isinstance(expected, dict):
        expected = sum(expected.values()) if all(isinstance(v, int) for v in expected.values()) else None
    if not isinstance(info, dict) or info.get("version") != _VERSIONS[folder.name] or not isinstance(expected, int):
        logger.warning("%s is not a marker of this version (%.80r): rebuilding %s", marker, info, folder)
        return False
    found = sum(1 for f in folder.rglob("*") if f.is_file() and f.name != _MARKER)
    if found != expected:
        logger.warning("%s holds %d of its %d images: rebuilding it", folder, found, expected)
        return False
    return True


def _write_demo(out: Path, photos: list[Path], num_images: int, seed: int) -> int:
    """Exactly ``num_images`` crops, spread as evenly as possible over ``photos`` (earlier photos get the
    remainder)."""
    rng = np.random.default_rng(seed)
    written = 0
    for i, photo in enumerate(photos):
        name = photo.stem
        (out / name).mkdir()
        with Image.open(photo) as im:
            im = im.convert("L" if im.mode in ("L", "I;16", "I") else "RGB")  # grayscale photos stay grayscale
            width, height = im.size
            for k in range(num_images // len(photos) + (i < num_images % len(photos))):
                # A window covering 25-100% of the shorter side, aspect 3/4..4/3, anywhere in the photo.
                side = min(width, height) * rng.uniform(0.25, 1.0)
                aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
                w = int(min(width, side * np.sqrt(aspect)))
                h = int(min(height, side / np.sqrt(aspect)))
                x0, y0 = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
                longest = int(rng.integers(160, 257))
                scale = longest / max(w, h)
                size = (max(1, round(w * scale)), max(1, round(h * scale)))
                crop = im.resize(size, Image.Resampling.BICUBIC, box=(x0, y0, x0 + w, y0 + h))
                if rng.random() < 0.5:
                    crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                crop.save(out / name / f"{name}_{k:03d}.jpg", quality=90)
                written += 1
    return written


def materialize_demo(cache_dir: str | os.PathLike | None = None, *, num_images: int = DEMO_IMAGES, seed: int = 0,
                     force: bool = False) -> Path:
    """The demo image folder, built on first use (see the module docstring). Returns its path."""
    def build(tmp: Path) -> dict:
        photos = source_photos()
        count = _write_demo(tmp, photos, num_images, seed)
        return {"images": count, "seed": seed, "sources": [str(p) for p in photos]}

    return _materialize("demo", build, cache_dir, force)


def materialize_demo_heldout(cache_dir: str | os.PathLike | None = None, *, force: bool = False) -> Path:
    """The held-out demo images (crops of photographs the demo does not train on), built on first use."""
    def build(tmp: Path) -> dict:
        photos = heldout_photos()
        count = _write_demo(tmp, photos, DEMO_HELDOUT_IMAGES, seed=1)
        return {"images": count, "seed": 1, "sources": [str(p) for p in photos]}

    return _materialize("demo_heldout", build, cache_dir, force)


def materialize_digits(cache_dir: str | os.PathLike | None = None, *, size: int = DIGITS_SIZE,
                       val_fraction: float = 0.2, seed: int = 0, force: bool = False) -> Path:
    """scikit-learn's handwritten digits (1,797 labelled 8x8 images, shipped in its wheel) as
    ``digits/{train,val}/<digit>/*.png``, upscaled to ``size`` pixels, RGB; a fixed stratified split.
    The embedded labelled dataset of the fine-tuning and linear-probing demos."""
    def build(tmp: Path) -> dict:
        try:
            from sklearn.datasets import load_digits
        except ImportError as e:
            raise FileNotFoundError("the digits dataset needs scikit-learn (pip install scikit-learn)") from e
        digits = load_digits()
        rng = np.random.default_rng(seed)
        counts = {"train": 0, "val": 0}
        for label in range(10):
            ids = rng.permutation(np.flatnonzero(digits.target == label))
            n_val = round(len(ids) * val_fraction)
            for split, chosen in (("val", ids[:n_val]), ("train", ids[n_val:])):
                folder = tmp / split / str(label)
                folder.mkdir(parents=True, exist_ok=True)
                for i in chosen:
                    pixels = (digits.images[i] * (255 / 16)).round().astype(np.uint8)
                    image = Image.fromarray(pixels).resize((size, size), Image.Resampling.BICUBIC).convert("RGB")
                    image.save(folder / f"{i:04d}.png")
                    counts[split] += 1
        return {"images": counts, "size": size, "seed": seed}

    return _materialize("digits", build, cache_dir, force)


def _materialize(name: str, build, cache_dir: str | os.PathLike | None, force: bool) -> Path:
    """Build ``<cache>/<name>`` once: ``build(tmp_folder)`` writes the files and returns a description,
    the marker goes in last, and one atomic rename publishes the folder."""
    base = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    final = base / name
    if _complete(final) and not force:
        return final
    try:
        base.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(base)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-tmp-", dir=base))
    except OSError as e:
        where = "$CROSSMAE_CACHE" if os.environ.get("CROSSMAE_CACHE") and cache_dir is None else "the cache folder"
        raise ValueError(f"{where} {base} cannot hold the {name} dataset ({e.strerror or e}): set CROSSMAE_CACHE to a "
                         "writable folder") from None
    try:
        t0 = time.perf_counter()
        info = build(tmp)
        (tmp / _MARKER).write_text(json.dumps({"version": _VERSIONS[name], **info}, indent=1))
        if force and final.exists():
            _move_aside(final, base)
        try:
            os.rename(tmp, final)  # atomic; fails if another process already put a complete folder there
        except OSError:
            if not _complete(final):  # a leftover that is not ours and not complete: replace it
                _move_aside(final, base)
                try:
                    os.rename(tmp, final)
                except OSError:  # another process, racing on the same outdated folder, published its build first
                    if not _complete(final):
                        raise
        else:
            logger.info("built the %s dataset in %s (%.1f s)", name, final, time.perf_counter() - t0)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # no-op after a successful rename
    return final


def _move_aside(folder: Path, base: Path) -> None:
    trash = Path(tempfile.mkdtemp(prefix=f".{folder.name}-old-", dir=base))
    try:
        os.rename(folder, trash / folder.name)
    except FileNotFoundError:
        pass
    shutil.rmtree(trash, ignore_errors=True)


def _remove_stale_temps(base: Path, max_age_s: float = 3600.0) -> None:
    """Temp folders of builds killed more than an hour ago (a live build takes seconds)."""
    for entry in [*base.glob(".*-tmp-*"), *base.glob(".*-old-*")]:
        try:
            if time.time() - entry.stat().st_mtime > max_age_s:
                shutil.rmtree(entry, ignore_errors=True)
        except OSError:
            pass


def main() -> None:
    parser = argparse.ArgumentParser(description="Build the embedded demo image folders (training, held out) and "
                                     "print their paths.")
    parser.add_argument("--out", default=None, help="cache folder (default $CROSSMAE_CACHE or ~/.cache/crossmae)")
    parser.add_argument("--force", action="store_true", help="rebuild even if it exists")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    print(materialize_demo(args.out, force=args.force))
    print(materialize_demo_heldout(args.out, force=args.force))


if __name__ == "__main__":
    main()
