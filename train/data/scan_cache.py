"""The scan cache of train/data/index.py: what a scan found, kept so that a later scan probes only what changed.

One file per root, `<cache folder>/scan/<hash of the root>.npz` (the cache folder: the scan's `cache_dir`, else
`cache_root()`; numpy arrays, per folder: the file names, size, mtime_ns, width, height; a reason per bad file; ~42
bytes a file). A later scan only lists the folder (one scandir per folder, one fstatat per file: 4.4 µs a file on a
2-core VM, 5.6 s of one core for ImageNet's 1.28M files, see bench/results/scan_scale_latest.md) and probes again
only the files whose size or mtime_ns changed, or those it has never seen. A cache records the `validate` mode that
wrote it and is read only by a scan that accepts that mode: a "header" cache never vouches for a "decode" scan. A
cache that does not validate (truncated, garbage, wrong shape) is ignored with a warning and rebuilt.

One scanner per cache: a lock file beside the cache (`<cache>.npz.lock`, flock) is held shared while a scan reads
the cache and exclusive while it probes and writes it, so under torchrun every rank lists the folder but only one
rank per node (per shared cache) probes: the others log once that they wait, then find the cache warm. A Ctrl-C
ends the wait for the lock. An unwritable cache folder means no cache and no lock: every process scans on its own
(logged at debug level).

This module knows nothing of the scan: it stores and returns plain arrays.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger("train.data")

CACHE_VERSION = 2  # 1: a JSON dict of lists keyed by relative path (67 MB and ~20 s to read for ImageNet)


def cache_file(root: Path, cache_folder: Path) -> Path:
    """The cache of the (absolute) `root` under `cache_folder`."""
    digest = hashlib.sha1(str(root).encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return cache_folder / "scan" / f"{digest}.npz"


@dataclass
class ScanCache:
    """A scan cache as read: per folder (relative path) a span of the flat arrays, in the walk order it was saved."""

    validate: str
    folders: dict[str, tuple[int, int]]
    names: list[str]
    size: np.ndarray  # (N,) int64; -1: never a hit (the file could not be read when it was saved)
    mtime_ns: np.ndarray  # (N,) int64
    width: np.ndarray  # (N,) int32; -1: not a usable image, the reason in `reasons`
    height: np.ndarray  # (N,) int32
    reasons: dict[int, str]


def _split_names(blob: np.ndarray, count: int) -> list[str]:
    """The inverse of _join_names; raises ValueError unless `blob` holds exactly `count` names."""
    if blob.dtype != np.uint8 or blob.ndim != 1:
        raise ValueError(f"a name blob of dtype {blob.dtype} and shape {blob.shape}")
    text = blob.tobytes().decode("utf-8", "surrogateescape")
    names = text.split("\0") if count else []
    if len(names) != count or (not count and text):
        raise ValueError(f"{len(names)} names for {count} entries")
    return names


def _join_names(names: list[str]) -> np.ndarray:
    """NUL-separated file-system bytes (a name never holds NUL; names that are not UTF-8 round-trip)."""
    return np.frombuffer("\0".join(names).encode("utf-8", "surrogateescape"), dtype=np.uint8)


def _read_cache(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    with np.load(path, allow_pickle=False) as data:  # a non-zip file raises (or is an .npy array: no .files)
        arrays = {key: data[key] for key in data.files}
    meta = json.loads(arrays.pop("meta").tobytes())
    if not isinstance(meta, dict):
        raise ValueError("the header is not a JSON object")
    return meta, arrays


def load_cache(path: Path, root: Path, accepted: tuple[str, ...]) -> ScanCache | None:
    """The cache of `root` at `path` if it validates and was written by a scan of a `validate` mode in `accepted`;
    else None (a cache that does not validate is named in a warning)."""
    try:
        meta, arrays = _read_cache(path)
    except FileNotFoundError:
        return None
    except Exception as exc:  # truncated, garbage, another format: every way it can fail means "rebuild"
        logger.warning("scan cache %s does not validate (%s: %s): scanning again", path, type(exc).__name__, exc)
        return None
    if meta.get("version") != CACHE_VERSION or meta.get("root") != str(root):
        return None  # an older format, or another root with the same hash: rebuilt without a word
    if meta.get("validate") not in accepted:
        return None
    try:
        return _validated(meta, arrays)
    except (KeyError, TypeError, ValueError) as exc:
        logger.warning("scan cache %s does not have the cache's shape (%s): scanning again", path, exc)
        return None


def _validated(meta: dict, arrays: dict[str, np.ndarray]) -> ScanCache:
    """The cache's arrays checked against each other; raises KeyError / TypeError / ValueError naming the flaw."""
    for key, dtype in (("counts", np.int64), ("size", np.int64), ("mtime_ns", np.int64), ("width", np.int32),
                       ("height", np.int32)):
        if arrays[key].dtype != dtype or arrays[key].ndim != 1:
            raise ValueError(f"{key}: dtype {arrays[key].dtype}, shape {arrays[key].shape}")
    counts = arrays["counts"]
    n = int(counts.sum())
    if (counts < 0).any() or any(len(arrays[k]) != n for k in ("size", "mtime_ns", "width", "height")):
        raise ValueError(f"arrays of lengths {[len(arrays[k]) for k in ('size', 'mtime_ns', 'width', 'height')]} "
                         f"for {n} files")
    folders = _split_names(arrays["folders"], len(counts))
    names = _split_names(arrays["names"], n)
    width, height = arrays["width"], arrays["height"]
    bad = np.flatnonzero(width < 0)
    reasons = meta["reasons"]
    if (not isinstance(reasons, list) or len(reasons) != len(bad) or not all(isinstance(r, str) for r in reasons)
            or (width < -1).any() or (height < -1).any()):
        raise ValueError(f"{len(bad)} bad files and {len(reasons) if isinstance(reasons, list) else reasons!r} "
                         "reasons")
    ends = np.cumsum(counts).tolist()
    spans = dict(zip(folders, zip([0, *ends[:-1]], ends, strict=True), strict=True))
    if len(spans) != len(folders):
        raise ValueError("a folder listed twice")
    return ScanCache(meta["validate"], spans, names, arrays["size"], arrays["mtime_ns"], width, height,
                  dict(zip(bad.tolist(), reasons, strict=True)))


def save_cache(path: Path, root: Path, validate: str, *, folders: list[str], counts: list[int], names: list[str],
               size: np.ndarray, mtime_ns: np.ndarray, width: np.ndarray, height: np.ndarray,
               reasons: dict[int, str]) -> None:
    """Write a scan's results atomically: a reader sees the old file or the new one.

    folders, counts: the folders (relative to `root`) in walk order and how many files each holds; names, size,
    mtime_ns, width, height: per file, in the same order (`size` -1 for files not to vouch for); reasons: index ->
    why that file is not a usable image."""
    width = np.where(size >= 0, width, 0).astype(np.int32)
    height = np.where(size >= 0, height, 0).astype(np.int32)
    bad = [i for i in sorted(reasons) if size[i] >= 0]
    width[bad] = height[bad] = -1
    meta = {"version": CACHE_VERSION, "root": str(root), "validate": validate,
            "reasons": [reasons[i] for i in bad]}
    arrays = {"meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
              "folders": _join_names(folders), "counts": np.asarray(counts, dtype=np.int64),
              "names": _join_names(names), "size": size, "mtime_ns": np.asarray(mtime_ns, np.int64),
              "width": width, "height": height}
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)  # atomic: concurrent ranks never see half a file
    except OSError as exc:  # a read-only home is no reason to stop training
        logger.debug("could not write the scan cache %s: %s", path, exc)
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        return
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):
        path.with_suffix(".json").unlink(missing_ok=True)  # this root's version-1 cache (67 MB for ImageNet)


class ScanLock:
    """`<cache>.lock`, flock'ed: shared while a scan reads the cache, exclusive while it probes and writes it. No
    lock (every call a no-op) where the cache folder is unwritable or the file system has no flock."""

    def __init__(self, cache_path: Path, root: Path) -> None:
        self.path, self.cache_path, self.root = cache_path.with_name(f"{cache_path.name}.lock"), cache_path, root
        self.fd: int | None = None
        self.waited = False
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError as exc:
            try:  # a cache someone else wrote, read-only to us: its lock still tells when their scan is done
                self.fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                logger.debug("no scan lock %s (%s): scanning without a cache lock", self.path, exc)

    def acquire(self, exclusive: bool) -> None:
        """Take the lock (or turn the shared lock into an exclusive one), waiting for another process's scan if it
        is held; a Ctrl-C ends the wait (flock is retried after EINTR only when the signal handler returns)."""
        if self.fd is None:
            return
        op = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        try:
            fcntl.flock(self.fd, op | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        except OSError as exc:  # e.g. ENOLCK on a file system without locks
            logger.debug("cannot lock %s (%s): scanning without a cache lock", self.path, exc)
            self.close()
            return
        if not self.waited:
            self.waited = True
            logger.info("waiting for another process's scan of %s (cache %s)", self.root, self.cache_path)
        fcntl.flock(self.fd, op)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # releases the lock
            self.fd = None

