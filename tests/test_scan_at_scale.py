"""The image-folder scan at scale (issue #19, "Start-up at ImageNet scale"): its cache format, one scanner per cache
under concurrent processes, and Ctrl-C in every phase of a scan. The timings themselves live in
bench/scan_scale.py (a benchmark, not a timed test); these tests count probes, never seconds, except the
Ctrl-C bound, which is generous."""

from __future__ import annotations

import fcntl
import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from child_process import wait_for_line
from PIL import Image

from train.data import index as data_index
from train.data import scan_cache

ROOT = Path(__file__).resolve().parents[1]


def write_pngs(folder: Path, count: int, seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        size = (8 + i % 5, 6 + i % 3)
        paths.append(folder / f"{i:04d}.png")
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(paths[-1])
    return paths


@pytest.fixture
def counted_probes(monkeypatch) -> list[str]:
    calls: list[str] = []
    real_probe = data_index.probe_image
    monkeypatch.setattr(data_index, "probe_image", lambda p, v="decode": calls.append(p) or real_probe(p, v))
    return calls


def cache_file(cache: Path) -> Path:
    (path,) = (cache / "scan").glob("*.npz")
    return path


# --------------------------------------------------------------------------- the cache format


@pytest.fixture
def mixed_folder(tmp_path) -> Path:
    """Two classes; nested sub-folders; a truncated JPEG, an empty file, a name that is not UTF-8, a non-image."""
    root = tmp_path / "mixed"
    write_pngs(root / "a", 5)
    write_pngs(root / "a" / "deeper", 2, seed=1)
    write_pngs(root / "a" / "0", 1, seed=4)  # "a/0/0000.png" < "a/0000.png" < "a/deeper/...": not the walk's order
    write_pngs(root / "a-b", 3, seed=2)  # "a-b" < "a/...": the index orders each class's files by path
    write_pngs(root / "b", 4, seed=3)
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(buf, "JPEG")
    (root / "b" / "truncated.jpg").write_bytes(buf.getvalue()[:200])
    (root / "b" / "empty.jpg").write_bytes(b"")
    (root / "b" / "notes.txt").write_text("not an image")
    Image.new("RGB", (9, 7)).save(os.fsdecode(os.fsencode(root / "b") + b"/bad\xff\xfe.png"))
    return root


def index_fields(index: data_index.ImageIndex) -> tuple:
    return index.classes, index.files, index.labels.tolist(), index.sizes.tolist(), index.skipped, index.ignored


@pytest.mark.parametrize("classes", [True, False])
def test_the_cache_round_trips_and_a_cached_scan_probes_nothing(mixed_folder, tmp_path, counted_probes, classes):
    cache = tmp_path / "cache"
    first = data_index.scan_image_folder(mixed_folder, cache_dir=cache, classes=classes, num_threads=2)
    probed = len(counted_probes)
    assert probed == len(first.files) + len(first.skipped) == 18
    assert first.files == sorted(first.files, key=lambda p: (first.labels[first.files.index(p)], p))
    assert first.files[:2] == [str(mixed_folder / "a" / "0" / "0000.png"), str(mixed_folder / "a" / "0000.png")]
    assert any(os.fsencode(f).endswith(b"bad\xff\xfe.png") for f in first.files)
    assert sorted(Path(p).name for p in first.skipped) == ["empty.jpg", "truncated.jpg"]
    cached = scan_cache.load_cache(cache_file(cache), mixed_folder.absolute(), accepted=("decode",))
    assert cached is not None and len(cached.names) == 18
    assert sorted(cached.folders) == ["a", "a-b", "a/0", "a/deeper", "b"]
    assert len(cached.reasons) == 2 and "empty file" in cached.reasons.values()

    again = data_index.scan_image_folder(mixed_folder, cache_dir=cache, classes=classes)
    assert len(counted_probes) == probed  # every file vouched for by the cache, the bad ones too
    assert index_fields(again) == index_fields(first)


def test_a_changed_size_or_mtime_is_probed_again_and_a_header_cache_never_vouches_for_decode(tmp_path,
                                                                                             counted_probes):
    root, cache = tmp_path / "photos", tmp_path / "cache"
    paths = write_pngs(root / "c", 6)
    data_index.scan_image_folder(root, cache_dir=cache, validate="header")
    assert len(counted_probes) == 6
    data_index.scan_image_folder(root, cache_dir=cache, validate="header")
    assert len(counted_probes) == 6
    data_index.scan_image_folder(root, cache_dir=cache, validate="decode")  # the header cache does not count
    assert len(counted_probes) == 12
    data_index.scan_image_folder(root, cache_dir=cache, validate="header")  # a decode cache does
    assert len(counted_probes) == 12
    st = paths[2].stat()
    os.utime(paths[2], ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # same size, new mtime
    with open(paths[4], "ab") as f:  # new size
        f.write(b"\0")
    write_pngs(root / "d", 1)  # a new folder
    index = data_index.scan_image_folder(root, cache_dir=cache)
    assert counted_probes[12:] == [str(paths[2]), str(paths[4]), str(root / "d" / "0000.png")]
    assert len(index.files) == 7


def test_an_unwritable_cache_folder_means_no_cache_and_no_lock_but_a_scan(tmp_path, counted_probes, caplog):
    root = tmp_path / "photos"
    write_pngs(root / "c", 3)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with caplog.at_level(logging.DEBUG, logger="train.data"):
        for _ in range(2):
            assert len(data_index.scan_image_folder(root, cache_dir=blocker / "cache").files) == 3
    assert len(counted_probes) == 6
    assert "no scan lock" in caplog.text and "could not write the scan cache" in caplog.text


def _rewrite_npz(path: Path, **changes) -> None:
    with np.load(path) as data:
        arrays = {key: data[key] for key in data.files}
    arrays.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        del arrays[key]
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def _meta(path: Path, **changes) -> np.ndarray:
    with np.load(path) as data:
        meta = json.loads(data["meta"].tobytes())
    return np.frombuffer(json.dumps({**meta, **changes}).encode(), dtype=np.uint8)


DAMAGE = {
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "garbage bytes": lambda p: p.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, np.uint8).tobytes()),
    "a flipped byte": lambda p: p.write_bytes(_flip_a_data_byte(p.read_bytes())),
    "a JSON text": lambda p: p.write_text('{"version": 2, "entries": {"a.png": 5}}'),
    "an .npy array": lambda p: _write_npy(p, np.arange(3)),
    "a missing array": lambda p: _rewrite_npz(p, width=None),
    "arrays of other lengths": lambda p: _rewrite_npz(p, size=np.zeros(2, np.int64)),
    "a float array": lambda p: _rewrite_npz(p, mtime_ns=np.zeros(6, np.float64)),
    "a 2-d array": lambda p: _rewrite_npz(p, height=np.zeros((6, 1), np.int32)),
    "too few names": lambda p: _rewrite_npz(p, names=np.frombuffer(b"0000.png", np.uint8)),
    "negative counts": lambda p: _rewrite_npz(p, counts=np.asarray([7, -1], np.int64)),
    "a header that is a list": lambda p: _rewrite_npz(p, meta=np.frombuffer(b"[1, 2]", np.uint8)),
    "reasons that do not match": lambda p: _rewrite_npz(p, meta=_meta(p, reasons=["x", "y"])),
    "reasons of another type": lambda p: _rewrite_npz(p, meta=_meta(p, reasons=None)),
}


def _write_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, array)


def _flip_a_data_byte(blob: bytes) -> bytes:
    """One byte changed inside the size array's data (stored uncompressed): the zip's CRC no longer matches."""
    with zipfile.ZipFile(io.BytesIO(blob)) as z:
        offset = z.getinfo("size.npy").header_offset
    name_length, extra_length = (int.from_bytes(blob[offset + k:offset + k + 2], "little") for k in (26, 28))
    at = offset + 30 + name_length + extra_length + 130  # past the local header and the .npy header (128 bytes)
    return blob[:at] + bytes([blob[at] ^ 0xFF]) + blob[at + 1:]


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_cache_that_does_not_validate_is_rebuilt_with_a_warning(tmp_path, caplog, counted_probes, damage):
    root, cache = tmp_path / "photos", tmp_path / "cache"
    write_pngs(root / "c", 6)
    first = data_index.scan_image_folder(root, cache_dir=cache)
    DAMAGE[damage](cache_file(cache))
    with caplog.at_level(logging.WARNING, logger="train.data"):
        again = data_index.scan_image_folder(root, cache_dir=cache)
    assert index_fields(again) == index_fields(first) and len(counted_probes) == 12
    assert "scan cache" in caplog.text and "scanning again" in caplog.text
    data_index.scan_image_folder(root, cache_dir=cache)
    assert len(counted_probes) == 12  # rebuilt: the next scan probes nothing


def test_a_version_1_json_cache_is_replaced(tmp_path, counted_probes):
    root, cache = tmp_path / "photos", tmp_path / "cache"
    write_pngs(root / "c", 2)
    old = scan_cache.cache_file(root.absolute(), cache).with_suffix(".json")
    old.parent.mkdir(parents=True)
    old.write_text('{"version": 1, "root": "x", "validate": "decode", "entries": {}}')
    data_index.scan_image_folder(root, cache_dir=cache)
    assert not old.exists() and cache_file(cache).exists()


# --------------------------------------------------------------------------- processes: one scanner, Ctrl-C

# A child process: Python's own Ctrl-C handling (pytest may run as a background job, started with SIGINT ignored,
# which its children inherit), the scan's log on stdout, a prelude (e.g. a slow probe), then one scan.
CHILD = """
import logging, os, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="LOG %(message)s")
from train.data import index
PROBES = []
_real_probe = index.probe_image
def _counted(path, validate="decode"):
    PROBES.append(path)
    return _real_probe(path, validate)
index.probe_image = _counted
{prelude}
found = index.scan_image_folder(sys.argv[1], classes=False, cache_dir=sys.argv[2], num_threads=2)
print("DONE", len(found.files), "PROBES", len(PROBES), flush=True)
"""


def start_child(root: Path, cache: Path, prelude: str = "", **env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CHILD.format(prelude=prelude), str(root), str(cache)], cwd=ROOT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **env},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout: float = 120) -> str:
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        raise AssertionError(f"the child did not end:\n{output}") from None
    return output


def probes_of(output: str) -> int:
    (line,) = [line for line in output.splitlines() if line.startswith("DONE")]
    return int(line.split()[-1])


# The first probe waits until the file named by $RELEASE exists (the test creates it once the other process is
# seen waiting): deterministic, whatever the machine's speed.
HELD_AT_FIRST_PROBE = """
_first = [True]
def _held(path, validate="decode"):
    if _first:
        _first.clear()
        print("PROBING", flush=True)
        while not os.path.exists(os.environ["RELEASE"]):
            time.sleep(0.02)
    return _counted(path, validate)
index.probe_image = _held
"""


def test_a_second_process_waits_for_the_first_ones_scan_and_probes_nothing(tmp_path):
    root, cache, release = tmp_path / "photos", tmp_path / "cache", tmp_path / "release"
    write_pngs(root, 30)
    first = start_child(root, cache, HELD_AT_FIRST_PROBE, RELEASE=str(release))
    try:
        wait_for_line(first, "PROBING")
        second = start_child(root, cache)
        try:
            waited = wait_for_line(second, "waiting for another process's scan")
            release.touch()
            out_first, out_second = finish(first), waited + finish(second)
        finally:
            second.kill()
    finally:
        first.kill()
    assert f"of {root}" in waited and "cache" in waited
    assert probes_of(out_first) == 30 and probes_of(out_second) == 0, (out_first, out_second)
    assert "DONE 30" in out_second


# Every probe takes 0.02 s; the scan starts when the file named by $GO exists, in every process at once.
STARTED_TOGETHER = """
_p = index.probe_image
index.probe_image = lambda p, v="decode": time.sleep(0.02) or _p(p, v)
print("READY", flush=True)
while not os.path.exists(os.environ["GO"]):
    time.sleep(0.005)
"""


def test_processes_started_together_probe_each_file_once(tmp_path):
    root, cache, go = tmp_path / "photos", tmp_path / "cache", tmp_path / "go"
    write_pngs(root, 40)
    procs = [start_child(root, cache, STARTED_TOGETHER, GO=str(go)) for _ in range(3)]
    try:
        ready = [wait_for_line(p, "READY") for p in procs]
        go.touch()
        outputs = [r + finish(p) for r, p in zip(ready, procs, strict=True)]
    finally:
        for p in procs:
            p.kill()
    assert sum(probes_of(out) for out in outputs) == 40, outputs
    assert all("DONE 40" in out for out in outputs)


# Each phase made long without a huge folder: every probe, or every folder listed, takes 0.1 s (a full scan:
# 20 s or more); the child says when the phase has begun.
SLOW_PROBES = """
_first = [True]
def _slow(path, validate="decode"):
    if _first:
        _first.clear()
        print("PHASE", flush=True)
    time.sleep(0.1)
    return _counted(path, validate)
index.probe_image = _slow
"""
SLOW_LISTING = """
_add = index._Listing.add_folder
_first = [True]
def _slow_add(self, *args):
    if _first:
        _first.clear()
        print("PHASE", flush=True)
    time.sleep(0.1)
    return _add(self, *args)
index._Listing.add_folder = _slow_add
"""
PROMPT_S = 5.0  # "within a second", with room for a loaded machine


@pytest.mark.parametrize("phase", ["listing", "probing", "waiting for the lock"])
def test_ctrl_c_ends_a_scan_promptly_in_every_phase(tmp_path, phase):
    root, cache = tmp_path / "photos", tmp_path / "cache"
    if phase == "listing":
        for k in range(200):
            write_pngs(root / f"c{k:03d}", 1, seed=k)
    else:
        write_pngs(root, 400)
    lock_fd = None
    if phase == "waiting for the lock":  # another process's scan holds the lock for good
        lock_path = scan_cache.cache_file(root.absolute(), cache)
        lock_path = lock_path.with_name(f"{lock_path.name}.lock")
        lock_path.parent.mkdir(parents=True)
        lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT)
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
    marker = "waiting for another process's scan" if lock_fd is not None else "PHASE"
    proc = start_child(root, cache, {"listing": SLOW_LISTING, "probing": SLOW_PROBES}.get(phase, ""))
    try:
        wait_for_line(proc, marker)
        time.sleep(0.2)  # inside the phase, not at its first step
        proc.send_signal(signal.SIGINT)
        sent = time.monotonic()
        output = finish(proc, timeout=60)
        took = time.monotonic() - sent
    finally:
        proc.kill()
        if lock_fd is not None:
            os.close(lock_fd)
    assert "KeyboardInterrupt" in output and "DONE" not in output, output
    assert took < PROMPT_S, f"{took:.1f} s from the Ctrl-C to the end of the {phase}:\n{output}"
