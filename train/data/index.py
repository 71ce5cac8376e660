"""Index an image folder and validate every image once, up front.

Two layouts: `classes=True` (fine-tuning, probing) reads `<root>/<class>/<image>`, labels from the
class folders; `classes=False` (pre-training, which needs no labels) reads every image under the root,
at any depth, a flat folder included.

DALI's decoders stop the whole pipeline on a corrupt file, so a file that cannot be decoded must be
found before training starts. `scan_image_folder` lists the files, keeps those with an image
extension DALI decodes, and opens each with Pillow: `validate="decode"` (default) decodes the whole
entropy stream (JPEGs at 1/8 scale, which is cheap and still catches truncation), `"header"` only
parses the header (much faster on huge folders; the DALI loader still catches what slips through at
run time). Results are cached per file keyed by (size, mtime), so a second scan of a large folder
only stats the files. Under DDP every rank scans; ranks sharing a file system share the cache, so
pre-scan a large folder once (`python -c "from train.data import scan_image_folder as s; s('PATH')"`)
to spare the ranks the parallel first scan.

What is kept: regular files with a known extension under a non-hidden class folder (any depth;
with `classes=False` anywhere under the root), size > 0, that Pillow opens as one of the formats DALI
decodes. What is skipped (listed in `ImageIndex.skipped`, logged with a count and paths): image-named
files that fail that check, files that cannot be read (permission denied). What is ignored
(`ImageIndex.ignored`): hidden files and folders, other extensions, and with `classes=True` files
directly under the root.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

logger = logging.getLogger("train.data")

# The still-image formats DALI's decoders read (fn.readers.file's default filters, audio removed).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".pnm", ".ppm", ".pgm", ".pbm", ".jp2", ".webp")
# Pillow's names for those formats ("MPO" is the multi-picture JPEG some cameras write).
DECODABLE_FORMATS = frozenset({"JPEG", "MPO", "PNG", "BMP", "TIFF", "PPM", "JPEG2000", "WEBP"})
VALIDATE_MODES = ("decode", "header")
_SCAN_CACHE_VERSION = 1
_EXIF_ORIENTATION = 0x0112


def cache_root() -> Path:
    """The project's cache folder: `$CROSSMAE_CACHE`, else `~/.cache/crossmae`."""
    env = os.environ.get("CROSSMAE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "crossmae"


@dataclass
class ImageIndex:
    """The valid images of a folder, in a fixed order (class name, then path; files directly under the
    root, read with classes=False, first)."""

    root: Path
    classes: list[str]  # the folders directly under the root
    files: list[str]  # absolute paths
    labels: np.ndarray  # (N,) int64, index into `classes`; -1 for a file directly under the root (classes=False)
    sizes: np.ndarray  # (N, 2) int64, (width, height) after EXIF orientation
    skipped: list[str] = field(default_factory=list)  # image-named files that cannot be decoded or read
    ignored: list[str] = field(default_factory=list)  # non-image, hidden, or outside any class folder

    def __len__(self) -> int:
        return len(self.files)


class _DecodeError(Exception):
    """A file that is not a decodable image (cached, unlike transient read errors)."""


def probe_image(path: str, validate: str = "decode") -> tuple[int, int]:
    """(width, height) of the image as decoders return it (EXIF orientation applied); raises if unusable."""
    if os.path.getsize(path) == 0:
        raise _DecodeError("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DecompressionBombWarning, palette transparency, EXIF noise
            with Image.open(path) as im:
                if im.format not in DECODABLE_FORMATS:
                    raise _DecodeError(f"format {im.format} is not decoded by DALI")
                width, height = im.size
                orientation = im.getexif().get(_EXIF_ORIENTATION, 1) if im.format in ("JPEG", "MPO") else 1
                if validate == "decode":
                    if im.format in ("JPEG", "MPO"):
                        im.draft(None, (1, 1))  # DCT-domain 1/8 scale: walks every scan, ~10x cheaper
                    im.load()
    except (PermissionError, FileNotFoundError):
        raise
    except _DecodeError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, EOFError) as exc:
        raise _DecodeError(f"{type(exc).__name__}: {exc}") from exc
    if width < 1 or height < 1:
        raise _DecodeError("zero-sized image")
    if orientation in (5, 6, 7, 8):  # transposed orientations: decoders return the image rotated by 90 degrees
        width, height = height, width
    return width, height


def _list_folder(root: Path, with_classes: bool = True) -> tuple[list[str], list[tuple[str, str]], list[str]]:
    """(classes, [(class, abs path)] of image-named files, ignored paths). Without classes the image
    files directly under the root are candidates too, of class "" (listed first)."""
    classes, candidates, ignored = [], [], []
    with os.scandir(root) as entries:
        top = sorted(entries, key=lambda e: e.name)
    for entry in top:
        if entry.name.startswith("."):
            continue
        if entry.is_dir(follow_symlinks=True):
            classes.append(entry.name)
        elif with_classes or not entry.name.lower().endswith(IMAGE_EXTENSIONS):
            ignored.append(entry.path)
        else:
            candidates.append(("", entry.path))
    loose = [p for p in ignored if p.lower().endswith(IMAGE_EXTENSIONS)]
    if loose:
        logger.warning("ignoring %d image file(s) directly under %s: fine-tuning and probing need class "
                       "folders <root>/<class>/<image>", len(loose), root)
    unreadable_dirs, visited = [], set()
    for name in classes:
        found = []
        for dirpath, dirnames, filenames in os.walk(root / name, followlinks=True,
                                                    onerror=lambda err: unreadable_dirs.append(str(err.filename))):
            try:
                st = os.stat(dirpath)
            except OSError:  # vanished while listing
                dirnames[:] = []
                continue
            if (st.st_dev, st.st_ino) in visited:  # a symlink loop, or two links to one folder: read it once
                dirnames[:] = []
                continue
            visited.add((st.st_dev, st.st_ino))
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for fname in filenames:
                path = os.path.join(dirpath, fname)
                if fname.startswith(".") or not fname.lower().endswith(IMAGE_EXTENSIONS):
                    ignored.append(path)
                else:
                    found.append(path)
        candidates.extend((name, p) for p in sorted(found))
    if unreadable_dirs:
        logger.warning("could not list %d folder(s) under %s: %s", len(unreadable_dirs), root, unreadable_dirs)
    return classes, candidates, ignored


def _cache_file(root: Path, cache_dir: Path | None) -> Path:
    digest = hashlib.sha1(str(root).encode()).hexdigest()[:16]
    return (cache_dir if cache_dir is not None else cache_root()) / "scan" / f"{digest}.json"


def _load_cache(path: Path, root: Path, validate: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        logger.warning("scan cache %s is unreadable (%s): scanning again", path, e)
        return {}
    entries = data.get("entries") if isinstance(data, dict) else None
    if not isinstance(entries, dict) or not all(_valid_entry(v) for v in entries.values()):
        logger.warning("scan cache %s does not have the cache's shape: scanning again", path)
        return {}
    if data.get("version") != _SCAN_CACHE_VERSION or data.get("root") != str(root):
        return {}
    # A "header" scan must not vouch for a later "decode" scan; the reverse is fine.
    if validate == "decode" and data.get("validate") != "decode":
        return {}
    return entries


def _valid_entry(entry) -> bool:
    """[size, mtime_ns, width, height] of a good image or [size, mtime_ns, reason] of a bad one."""
    if not isinstance(entry, list) or len(entry) not in (3, 4):
        return False
    ints = entry if len(entry) == 4 else entry[:2]
    return all(isinstance(v, int) and not isinstance(v, bool) for v in ints) and (len(entry) == 4 or
                                                                                isinstance(entry[2], str))


def _save_cache(path: Path, root: Path, validate: str, entries: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"version": _SCAN_CACHE_VERSION, "root": str(root), "validate": validate,
                                   "entries": entries}, separators=(",", ":")))
        os.replace(tmp, path)  # atomic: concurrent ranks never see half a file
    except OSError as exc:  # a read-only home is no reason to stop training
        logger.debug("could not write the scan cache %s: %s", path, exc)


def scan_image_folder(root: str | os.PathLike, *, validate: str = "decode", num_threads: int = 4,
                      cache_dir: str | os.PathLike | None = None, use_cache: bool = True,
                      classes: bool = True) -> ImageIndex:
    """List and validate `<root>/<class>/<image>` (`classes=True`) or every image under `root` at any
    depth (`classes=False`: no labels, for pre-training); raise before training if nothing usable is there.

    Raises FileNotFoundError if `root` does not exist, ValueError if it is not a folder or holds no
    valid image. Class folders without valid images stay in `classes`, so label indices only depend
    on the folder names.
    """
    if validate not in VALIDATE_MODES:
        raise ValueError(f"validate={validate!r}: expected one of {VALIDATE_MODES}")
    root = Path(root).expanduser().absolute()
    layout = "<root>/<class>/<image> files" if classes else "image files under it (any depth)"
    if not root.exists():
        raise FileNotFoundError(f"data path {str(root)!r} does not exist (expected {layout})")
    if not root.is_dir():
        raise ValueError(f"data path {str(root)!r} is not a folder (expected {layout})")
    with_classes = classes
    classes, candidates, ignored = _list_folder(root, with_classes)
    if with_classes and not classes:
        raise ValueError(f"data path {str(root)!r} has no class folders: fine-tuning and probing expect "
                         "<root>/<class>/<image> files (pre-training reads any folder of images)")

    cache_path = _cache_file(root, Path(cache_dir) if cache_dir is not None else None)
    cached = _load_cache(cache_path, root, validate) if use_cache else {}
    entries: dict[str, list] = {}
    results: list[tuple[int, int] | str | None] = [None] * len(candidates)
    todo = []
    for i, (_, path) in enumerate(candidates):
        rel = os.path.relpath(path, root)
        try:
            st = os.stat(path)
        except OSError as exc:
            results[i] = f"{type(exc).__name__}: {exc}"
            continue
        hit = cached.get(rel)
        if hit is not None and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
            results[i] = (hit[2], hit[3]) if len(hit) == 4 else hit[2]
            entries[rel] = hit
        else:
            todo.append((i, rel, st))

    def probe(item):
        i, rel, st = item
        try:
            return i, rel, st, probe_image(candidates[i][1], validate), True
        except _DecodeError as exc:
            return i, rel, st, str(exc), True
        except OSError as exc:  # permission denied, vanished: not cached, may be fixed before the next run
            return i, rel, st, f"{type(exc).__name__}: {exc}", False

    if todo:
        pool = ThreadPoolExecutor(max(1, num_threads))  # Pillow decodes outside the GIL
        try:
            for i, rel, st, result, cacheable in pool.map(probe, todo):
                results[i] = result
                if cacheable:
                    entries[rel] = [st.st_size, st.st_mtime_ns, *result] if isinstance(result, tuple) else \
                        [st.st_size, st.st_mtime_ns, result]
        except BaseException:
            # A Ctrl-C (or an error) while probes are queued or running: drop the queued ones instead of
            # waiting for every file of the folder (minutes at ImageNet scale); running probes end on their own.
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()
        if use_cache:
            _save_cache(cache_path, root, validate, entries)

    class_index = {"": -1, **{name: k for k, name in enumerate(classes)}}
    files, labels, sizes, skipped, reasons = [], [], [], [], []
    for (name, path), result in zip(candidates, results, strict=True):
        if isinstance(result, tuple):
            files.append(path)
            labels.append(class_index[name])
            sizes.append(result)
        else:
            skipped.append(path)
            reasons.append(result)
    if skipped:
        shown = "\n".join(f"  {p}: {r}" for p, r in list(zip(skipped, reasons, strict=True))[:100])
        more = f"\n  ... and {len(skipped) - 100} more" if len(skipped) > 100 else ""
        logger.warning("skipping %d unreadable image file(s) under %s:\n%s%s", len(skipped), root, shown, more)
    if not files:
        where = f"in its {len(classes)} class folder(s)" if with_classes else "under it"
        raise ValueError(f"data path {str(root)!r} holds no valid image {where} ({len(skipped)} unreadable, "
                         f"{len(ignored)} ignored); expected {layout} with extensions {', '.join(IMAGE_EXTENSIONS)}")
    empty = sorted(set(classes) - {classes[k] for k in set(labels) if k >= 0}) if with_classes else []
    if empty:
        logger.warning("%d class folder(s) under %s hold no valid image: %s", len(empty), root, empty[:20])
    logger.info("found %d images in %d %s under %s (%d skipped, %d ignored)", len(files), len(classes),
                "classes" if with_classes else "folders (read recursively)", root, len(skipped), len(ignored))
    return ImageIndex(root=root, classes=classes, files=files, labels=np.asarray(labels, dtype=np.int64),
                      sizes=np.asarray(sizes, dtype=np.int64).reshape(-1, 2), skipped=skipped, ignored=ignored)
