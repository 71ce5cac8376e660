"""Index an image folder and validate every image once, up front.

Two layouts: `classes=True` (fine-tuning, probing) reads `<root>/<class>/<image>`, labels from the
class folders; `classes=False` (pre-training, which needs no labels) reads every image under the root,
at any depth, a flat folder included.

DALI's decoders stop the whole pipeline on a corrupt file, so a file that cannot be decoded must be
found before training starts. `scan_image_folder` lists the files, keeps those with an image
extension DALI decodes, and opens each with Pillow: `validate="decode"` (default) decodes the whole
entropy stream (JPEGs at 1/8 scale, which is cheap and still catches truncation), `"header"` only
parses the header (much faster on huge folders; the DALI loader still catches what slips through at
run time). The first scan probes on every core the process may use (`num_threads` threads: Pillow decodes outside
the GIL, but parses headers in Python, so a header scan, or a decode scan of tiny files, gains little from them).

The first scan of a folder is cached, so that a later scan probes only what changed, and under torchrun only one
process per cache probes: see train/data/scan_cache.py. A Ctrl-C ends a scan in any phase (listing, probing, waiting
for another process's scan) within a second: queued probes are dropped and running ones stop after their current file.

What is kept: regular files with a known extension under a non-hidden class folder (any depth;
with `classes=False` anywhere under the root), size > 0, that Pillow opens as one of the formats DALI
decodes. What is skipped (listed in `ImageIndex.skipped`, logged with a count and paths): image-named
files that fail that check, files that cannot be read (permission denied), image-named entries that are not
regular files (a FIFO would block the scan). What is ignored (`ImageIndex.ignored`): hidden files and folders,
other extensions, and with `classes=True` files directly under the root.
"""

from __future__ import annotations

import itertools
import logging
import operator
import os
import stat
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from train.data.scan_cache import ScanCache, ScanLock, cache_file, load_cache, save_cache

logger = logging.getLogger("train.data")

# The still-image formats DALI's decoders read (fn.readers.file's default filters, audio removed).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".pnm", ".ppm", ".pgm", ".pbm", ".jp2", ".webp")
# Pillow's names for those formats ("MPO" is the multi-picture JPEG some cameras write).
DECODABLE_FORMATS = frozenset({"JPEG", "MPO", "PNG", "BMP", "TIFF", "PPM", "JPEG2000", "WEBP"})
VALIDATE_MODES = ("decode", "header")
_EXIF_ORIENTATION = 0x0112
_PROGRESS_EVERY_S = 30.0  # a first scan of ImageNet takes minutes: say how far it got


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


# ------------------------------------------------------------------------------------------------------------
# listing: one scandir per folder, one stat per image-named file
# ------------------------------------------------------------------------------------------------------------


@dataclass
class _Listing:
    """The image-named files under a root in walk order (each folder's files sorted by name), with their stat."""

    classes: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)  # -1 where the file could not be statted (reason in `errors`)
    mtimes: list[int] = field(default_factory=list)
    folders: list[tuple[str, int, int, int]] = field(default_factory=list)  # (relative path, class, start, end)
    errors: dict[int, str] = field(default_factory=dict)  # index -> why it cannot be used now (not cached)
    ignored: list[str] = field(default_factory=list)

    def add_folder(self, prefix: str, rel: str, label: int, files: list[os.DirEntry]) -> None:
        """Stat `files` (image-named entries of the folder `prefix`, which ends with a separator; a folder opened
        by file descriptor must still be open) and append them as the folder `rel` of class `label`."""
        if not files:
            return
        files.sort(key=_NAME)
        start = len(self.paths)
        names = [e.name for e in files]
        self.names += names
        self.paths += [prefix + name for name in names]
        sizes, mtimes = self.sizes, self.mtimes
        for k, entry in enumerate(files, start):  # the hot loop of a cached scan: one stat, two appends
            try:
                st = entry.stat()  # follows symbolic links, as the decoders will
            except OSError as exc:
                self.errors[k] = f"{type(exc).__name__}: {exc}"
                sizes.append(-1)
                mtimes.append(-1)
                continue
            if st.st_mode & _FILE_TYPE != _REGULAR_FILE:  # a FIFO would block the probe for good
                self.errors[k] = "not a regular file"
                sizes.append(-1)
                mtimes.append(-1)
                continue
            sizes.append(st.st_size)
            mtimes.append(st.st_mtime_ns)
        self.folders.append((rel, label, start, len(self.paths)))


_NAME = operator.attrgetter("name")
_FILE_TYPE, _REGULAR_FILE = stat.S_IFMT(0o177777), stat.S_IFREG


def _list_folder(root: Path, with_classes: bool = True) -> _Listing:
    """The classes (folders directly under the root) and the image-named files: under the class folders at any
    depth, and without classes also directly under the root (class -1, listed first). Hidden files and folders
    are left out, other files go to `ignored`."""
    listing = _Listing()
    loose = []
    with os.scandir(root) as it:
        top = sorted(it, key=_NAME)
    for entry in top:
        if entry.name.startswith("."):
            continue
        if entry.is_dir(follow_symlinks=True):
            listing.classes.append(entry.name)
        elif with_classes or not entry.name.lower().endswith(IMAGE_EXTENSIONS):
            listing.ignored.append(entry.path)
        else:
            loose.append(entry)
    if with_classes:
        stray = [p for p in listing.ignored if p.lower().endswith(IMAGE_EXTENSIONS)]
        if stray:
            logger.warning("ignoring %d image file(s) directly under %s: fine-tuning and probing need class "
                           "folders <root>/<class>/<image>", len(stray), root)
    listing.add_folder(os.path.join(root, ""), "", -1, loose)
    unreadable: list[str] = []
    visited: set[tuple[int, int]] = set()  # (device, inode) of every folder read: symlink loops are read once
    for label, name in enumerate(listing.classes):
        stack = [(os.path.join(root, name), name)]
        while stack:  # depth first, sub-folders in name order (os.walk's order, without its second stat per file)
            folder, rel = stack.pop()
            subfolders = _read_folder(listing, folder, rel, label, visited, unreadable)
            stack += [(os.path.join(folder, d), f"{rel}/{d}") for d in sorted(subfolders, reverse=True)]
    if unreadable:
        logger.warning("could not list %d folder(s) under %s: %s", len(unreadable), root, unreadable)
    return listing


def _read_folder(listing: _Listing, folder: str, rel: str, label: int, visited: set[tuple[int, int]],
                 unreadable: list[str]) -> list[str]:
    """List one folder into `listing`; returns its sub-folders to read. The folder is opened once and its files are
    statted relative to it (fstatat: one path component to resolve instead of the whole path)."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):  # vanished while listing
        return []
    except OSError:
        unreadable.append(folder)
        return []
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) in visited:
            return []
        visited.add((st.st_dev, st.st_ino))
        prefix = os.path.join(folder, "")
        subfolders, files = [], []
        try:
            with os.scandir(fd) as it:
                for entry in it:
                    name = entry.name
                    try:
                        is_dir = entry.is_dir()  # the type from the listing: no system call unless a link
                    except OSError:
                        is_dir = False
                    if is_dir:
                        if not name.startswith("."):
                            subfolders.append(name)
                    elif name.startswith(".") or not name.lower().endswith(IMAGE_EXTENSIONS):
                        listing.ignored.append(prefix + name)
                    else:
                        files.append(entry)
        except OSError:
            unreadable.append(folder)
            return []
        listing.add_folder(prefix, rel, label, files)
        return subfolders
    finally:
        os.close(fd)


def _index_order(listing: _Listing) -> np.ndarray | None:
    """The order of the index (root files, then class by class, each class's files sorted by path) as a permutation
    of the walk order; None when they agree (flat class folders: every class is one sorted folder)."""
    spans: dict[int, list[tuple[int, int]]] = {}
    for _, label, start, end in listing.folders:
        spans.setdefault(label, []).append((start, end))
    if all(len(s) == 1 for s in spans.values()):
        return None
    order = []
    for label in sorted(spans):
        indices = [i for start, end in spans[label] for i in range(start, end)]
        order += sorted(indices, key=listing.paths.__getitem__) if len(spans[label]) > 1 else indices
    return np.asarray(order, dtype=np.int64)


# ------------------------------------------------------------------------------------------------------------
# the scan
# ------------------------------------------------------------------------------------------------------------


@dataclass
class _Results:
    """Per listed file: (width, height) where `good`, else a reason; `todo` the files to probe."""

    width: np.ndarray
    height: np.ndarray
    good: np.ndarray
    reasons: dict[int, str]
    todo: list[int]


def _match(listing: _Listing, size: np.ndarray, mtime: np.ndarray, cache: ScanCache | None) -> _Results:
    """Look every listed file up in the cache: a hit where the folder, name, size and mtime_ns agree."""
    n = len(listing.paths)
    where = np.full(n, -1, dtype=np.int64)  # index in the cache, -1: not there
    if cache is not None:
        for rel, _, start, end in listing.folders:
            span = cache.folders.get(rel)
            if span is None:
                continue
            names = cache.names[span[0]:span[1]]
            if names == listing.names[start:end]:  # the common case: the folder did not change
                where[start:end] = np.arange(*span)
            else:
                position = dict(zip(names, range(*span), strict=True))
                where[start:end] = [position.get(name, -1) for name in listing.names[start:end]]
    known = where >= 0
    hit = np.zeros(n, dtype=bool)
    width, height = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
    if known.any():
        at = where[known]
        hit[known] = (cache.size[at] == size[known]) & (cache.mtime_ns[at] == mtime[known])
        hit &= size >= 0
        width[hit], height[hit] = cache.width[where[hit]], cache.height[where[hit]]
    good = hit & (width > 0)
    reasons = dict(listing.errors)
    reasons.update((int(i), cache.reasons[int(where[i])]) for i in np.flatnonzero(hit & ~good))
    todo = np.flatnonzero(~hit & (size >= 0)).tolist()
    return _Results(width, height, good, reasons, todo)


def _probe_all(root: Path, listing: _Listing, results: _Results, validate: str, num_threads: int,
               uncacheable: set[int]) -> None:
    """Probe `results.todo` on `num_threads` threads (Pillow decodes outside the GIL), filling `results`. A
    Ctrl-C (or an error) drops the queued probes and stops the running ones after their current file."""
    todo, paths = results.todo, listing.paths
    if not todo:
        return
    # Small tasks for an even load and a prompt stop, large enough that the pool's overhead (~20 µs a task)
    # stays small beside a probe (0.1-1 ms).
    chunk = max(1, min(64, len(todo) // (64 * num_threads)))
    stop = threading.Event()

    def probe(indices: list[int]) -> None:
        for i in indices:
            if stop.is_set():
                return
            try:
                results.width[i], results.height[i] = probe_image(paths[i], validate)
                results.good[i] = True
            except _DecodeError as exc:
                results.reasons[i] = str(exc)
            except OSError as exc:  # permission denied, vanished: not cached, may be fixed before the next run
                results.reasons[i] = f"{type(exc).__name__}: {exc}"
                uncacheable.add(i)

    logger.info("probing %d file(s) under %s (validate=%r, %d thread(s))", len(todo), root,
                validate, num_threads)
    pool = ThreadPoolExecutor(num_threads)
    try:
        futures = [pool.submit(probe, todo[k:k + chunk]) for k in range(0, len(todo), chunk)]
        started = last = time.monotonic()
        for done, future in enumerate(futures, 1):
            future.result()
            if time.monotonic() - last > _PROGRESS_EVERY_S:
                last = time.monotonic()
                files = min(done * chunk, len(todo))
                logger.info("probed %d of %d file(s) (%.0f/s)", files, len(todo), files / (last - started))
    except BaseException:
        # A Ctrl-C (or an error) while probes are queued or running: drop the queued ones instead of waiting for
        # every file of the folder (minutes at ImageNet scale); the running ones stop after their current file.
        stop.set()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. under a job scheduler), at least 1."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else max(1, os.cpu_count() or 1)


def scan_image_folder(root: str | os.PathLike, *, validate: str = "decode", num_threads: int | None = None,
                      cache_dir: str | os.PathLike | None = None, use_cache: bool = True,
                      classes: bool = True) -> ImageIndex:
    """List and validate `<root>/<class>/<image>` (`classes=True`) or every image under `root` at any
    depth (`classes=False`: no labels, for pre-training); raise before training if nothing usable is there.

    num_threads: probing threads of a first scan (default: every core this process may use).
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
    listing = _list_folder(root, with_classes)
    classes = listing.classes
    if with_classes and not classes:
        raise ValueError(f"data path {str(root)!r} has no class folders: fine-tuning and probing expect "
                         "<root>/<class>/<image> files (pre-training reads any folder of images)")

    size, mtime = np.asarray(listing.sizes, dtype=np.int64), np.asarray(listing.mtimes, dtype=np.int64)
    threads = max(1, num_threads or available_cores())
    if not use_cache:
        results = _match(listing, size, mtime, None)
        _probe_all(root, listing, results, validate, threads, set())
        return _build_index(root, listing, results, with_classes, layout)
    cache_path = cache_file(root, Path(cache_dir) if cache_dir is not None else cache_root())
    accepted = ("decode",) if validate == "decode" else VALIDATE_MODES  # a header scan never vouches for decode
    lock = ScanLock(cache_path, root)
    try:
        lock.acquire(exclusive=False)  # waits while another process probes and writes the cache
        results = _match(listing, size, mtime, load_cache(cache_path, root, accepted))
        if results.todo and lock.fd is not None:
            # Become the one scanner. Another waiting process may have become it first: read its cache again.
            lock.acquire(exclusive=True)
            results = _match(listing, size, mtime, load_cache(cache_path, root, accepted))
        if results.todo:
            uncacheable: set[int] = set()
            _probe_all(root, listing, results, validate, threads, uncacheable)
            saved = size.copy()
            saved[list(uncacheable | set(listing.errors))] = -1
            save_cache(cache_path, root, validate, folders=[rel for rel, *_ in listing.folders],
                       counts=[end - start for _, _, start, end in listing.folders], names=listing.names,
                       size=saved, mtime_ns=mtime, width=results.width, height=results.height,
                       reasons=results.reasons)
    finally:
        lock.close()
    return _build_index(root, listing, results, with_classes, layout)


def _build_index(root: Path, listing: _Listing, results: _Results, with_classes: bool, layout: str) -> ImageIndex:
    classes = listing.classes
    n = len(listing.paths)
    labels = np.empty(n, dtype=np.int64)
    for _, label, start, end in listing.folders:
        labels[start:end] = label
    order = _index_order(listing)
    good = results.good if order is None else results.good[order]
    ordered = range(n) if order is None else order.tolist()
    paths = listing.paths if order is None else [listing.paths[i] for i in ordered]
    files = list(itertools.compress(paths, good.tolist()))
    chosen = np.arange(n)[good] if order is None else order[good]
    sizes = np.stack([results.width[chosen], results.height[chosen]], axis=1)
    if order is None:
        skipped_at = sorted(results.reasons)
    else:
        rank = np.empty(n, dtype=np.int64)
        rank[order] = np.arange(n)
        skipped_at = sorted(results.reasons, key=rank.__getitem__)
    skipped = [listing.paths[i] for i in skipped_at]
    if skipped:
        shown = "\n".join(f"  {listing.paths[i]}: {results.reasons[i]}" for i in skipped_at[:100])
        more = f"\n  ... and {len(skipped) - 100} more" if len(skipped) > 100 else ""
        logger.warning("skipping %d unreadable image file(s) under %s:\n%s%s", len(skipped), root, shown, more)
    if not files:
        where = f"in its {len(classes)} class folder(s)" if with_classes else "under it"
        raise ValueError(f"data path {str(root)!r} holds no valid image {where} ({len(skipped)} unreadable, "
                         f"{len(listing.ignored)} ignored); expected {layout} with extensions "
                         f"{', '.join(IMAGE_EXTENSIONS)}")
    labels = labels[chosen]
    empty = sorted(set(classes) - {classes[k] for k in np.unique(labels).tolist() if k >= 0}) if with_classes else []
    if empty:
        logger.warning("%d class folder(s) under %s hold no valid image: %s", len(empty), root, empty[:20])
    logger.info("found %d images in %d %s under %s (%d skipped, %d ignored)", len(files), len(classes),
                "classes" if with_classes else "folders (read recursively)", root, len(skipped),
                len(listing.ignored))
    return ImageIndex(root=root, classes=classes, files=files, labels=labels, sizes=sizes.reshape(-1, 2),
                      skipped=skipped, ignored=listing.ignored)
