"""Data that vanishes mid-run (issue #19, item 1): both image-folder backends, real files changed mid-iteration.

A few bad files are replaced, listed in `loader.skipped` and logged once per batch; a data source that has gone
(a quarter of the files deleted, the folder renamed) raises `DataSourceLost` from the iterator within a bounded
number of batches, with a one-line message naming a failed file; so does a batch with no file left, at that batch.
A failure no file explains raises instead of rebuilding DALI's pipeline forever. Each test reads a folder of 200
noise JPEGs (40x40, batches of 8) through torch in-process, torch with 2 worker processes, and DALI (CPU).
"""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

from train.data import DataSourceLost, build_loader, dali_available
from train.data.folder import FAILURE_COUNT_MIN, FAILURE_SHARE_LIMIT, FAILURE_WINDOW_BATCHES, FailureWindow

# (backend, workers, batches a loader may have decoded ahead of the one asked for)
LOADERS = [
    pytest.param("torch", 0, 0, id="torch-in-process"),
    pytest.param("torch", 2, 4, id="torch-2-workers"),  # prefetch_factor 2 per worker
    pytest.param("dali", 1, 3, id="dali", marks=pytest.mark.skipif(not dali_available(),
                                                                    reason="NVIDIA DALI is not installed")),
]
BATCH = 8
NUM_FILES = 200  # 25 batches of 8 per epoch


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CROSSMAE_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def photos(tmp_path):
    """tmp/photos/<0..3>/<k>.jpg: 200 40x40 noise JPEGs."""
    root = tmp_path / "photos"
    rng = np.random.default_rng(0)
    for k in range(NUM_FILES):
        folder = root / str(k % 4)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / f"{k:03d}.jpg", quality=85)
    return root


def make_loader(root, backend, workers):
    return build_loader(root, batch_size=BATCH, img_size=16, backend=backend, num_workers=workers, seed=0)


def garble(path: str) -> None:
    with open(path, "wb") as f:
        f.write(np.random.default_rng(len(path)).integers(0, 256, 900, dtype=np.uint8).tobytes())


def count_until_lost(batches) -> tuple[int, DataSourceLost]:
    """How many batches came before the iterator raised DataSourceLost, and the exception, its traceback dropped:
    that holds the loader in a cycle, and a torch DataLoader freed by the garbage collector waits 5 s per worker
    (in whichever test runs then)."""
    count = 0
    try:
        for _ in batches:
            count += 1
    except DataSourceLost as exc:
        return count, exc.with_traceback(None)
    pytest.fail(f"the pass ended after {count} more batches without DataSourceLost")


def failure_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "train.data" and "failed to load" in r.getMessage()]


def test_the_failure_window_counts_shares_over_its_last_batches():
    w = FailureWindow()
    for _ in range(FAILURE_WINDOW_BATCHES):
        w.add(100, 5, ("a.jpg", "FileNotFoundError"))  # 5% of each batch: never enough
        assert not w.exceeded()
    assert (w.batches, w.images, w.failed) == (FAILURE_WINDOW_BATCHES, 100 * FAILURE_WINDOW_BATCHES,
                                               5 * FAILURE_WINDOW_BATCHES)
    w = FailureWindow()
    w.add(10, FAILURE_COUNT_MIN - 1, ("a.jpg", "x"))  # 70%, but fewer than the minimum count
    assert not w.exceeded()
    w.add(10, 1, None)
    assert w.exceeded() and w.first == ("a.jpg", "x")
    for _ in range(FAILURE_WINDOW_BATCHES):  # the failures slide out of the window
        w.add(10, 0, None)
    assert not w.exceeded() and w.failed == 0 and w.first is None and w.total_failed == FAILURE_COUNT_MIN
    assert FAILURE_SHARE_LIMIT == 0.10


@pytest.mark.parametrize(("backend", "workers", "ahead"), LOADERS)
def test_a_quarter_of_the_files_deleted_mid_epoch_stops_the_run(photos, backend, workers, ahead, caplog):
    loader = make_loader(photos, backend, workers)
    batches = iter(loader)
    for _ in range(3):
        next(batches)
    rng = np.random.default_rng(1)
    deleted = set(rng.choice(loader.files, NUM_FILES // 4, replace=False).tolist())
    for path in deleted:
        os.unlink(path)
    with caplog.at_level(logging.WARNING, logger="train.data"):
        after, lost = count_until_lost(batches)
    # 25% failing: the window's share passes 10% within a few batches of the first failure.
    assert after <= ahead + 8, after
    message = str(lost)
    assert "\n" not in message and message.startswith("data source lost:")
    assert lost.path in deleted and lost.path in message and "FileNotFoundError" in lost.reason
    assert lost.root_exists and f"the data folder {photos} is there" in message
    assert lost.failed >= FAILURE_COUNT_MIN and lost.failed > FAILURE_SHARE_LIMIT * lost.images
    assert f"{lost.failed} of {lost.images} images failed in the last {lost.batches} batches" in message
    assert len(failure_lines(caplog)) < lost.batches  # at most one line per batch, never one per file
    assert set(loader.skipped) <= deleted and len(loader.skipped) >= lost.failed


@pytest.mark.parametrize(("backend", "workers", "ahead"), LOADERS)
def test_the_data_folder_renamed_mid_epoch_stops_at_the_next_batch_read(photos, backend, workers, ahead):
    loader = make_loader(photos, backend, workers)
    batches = iter(loader)
    for _ in range(3):
        next(batches)
    photos.rename(photos.with_name("photos-moved"))
    after, lost = count_until_lost(batches)
    assert after <= ahead, after  # only batches decoded before the rename may still come
    message = str(lost)
    assert "\n" not in message and f"the data folder {photos} is gone" in message
    assert not lost.root_exists and lost.root == str(photos)
    assert lost.path.startswith(str(photos)) and lost.path in message and "FileNotFoundError" in lost.reason


@pytest.mark.parametrize(("backend", "workers", "ahead"), LOADERS)
def test_two_files_turned_to_garbage_are_replaced_and_the_epoch_goes_on(photos, backend, workers, ahead, caplog):
    loader = make_loader(photos, backend, workers)
    plan = loader.batch_indices(0)
    batches = iter(loader)
    next(batches)
    garbled = [loader.files[plan[8][2]], loader.files[plan[15][5]]]  # read well after the prefetched batches
    for path in garbled:
        garble(path)
    with caplog.at_level(logging.WARNING, logger="train.data"):
        rest = [images for images, _ in batches]
    assert len(rest) == len(loader) - 1
    assert all(x.shape == (BATCH, 3, 16, 16) and bool(torch.isfinite(x).all()) for x in rest)
    assert sorted(loader.skipped) == sorted(garbled)
    assert loader.failures.total_failed == 2
    lines = failure_lines(caplog)
    assert len(lines) == 2 and all(path in line for path, line in zip(garbled, lines, strict=True))
    assert "epoch 0 batch 8: 1 of 8 images failed to load" in lines[0]


@pytest.mark.parametrize(("backend", "workers", "ahead"), LOADERS)
def test_failures_spread_thinly_over_many_batches_never_stop_the_run(photos, backend, workers, ahead):
    loader = make_loader(photos, backend, workers)
    plan = loader.batch_indices(0)
    batches = iter(loader)
    next(batches)
    # One file in every other batch from batch 5 on: 10 over the epoch, up to 8 in any 16 batches (the minimum
    # count) but 8 of 128 images is 6% (< 10%). DALI used to give up after batch_size (8) rebuilds in a pass.
    bad = [loader.files[plan[b][b % BATCH]] for b in range(5, len(loader), 2)]
    for k, path in enumerate(bad):
        os.unlink(path) if k % 2 else garble(path)
    assert len(bad) == 10
    assert sum(1 for _ in batches) == len(loader) - 1
    assert sum(1 for _ in loader) == len(loader)  # the next epoch: the known bad files are replaced, not counted
    assert sorted(loader.skipped) == sorted(bad)
    assert loader.failures.total_failed == len(bad) and loader.failures.failed <= FAILURE_COUNT_MIN


@pytest.mark.parametrize(("backend", "workers", "ahead"), LOADERS)
def test_every_file_of_a_batch_gone_stops_the_run_at_that_batch(photos, backend, workers, ahead):
    loader = make_loader(photos, backend, workers)
    plan = loader.batch_indices(0)
    batches = iter(loader)
    next(batches)
    gone = [loader.files[i] for i in plan[9]]  # 8 files of 200: nothing left to stand in for them in batch 9
    for path in gone:
        os.unlink(path)
    after, lost = count_until_lost(batches)
    assert 8 - ahead <= after <= 8, after  # batches 1..8 (DALI: up to its prefetch depth fewer)
    assert "every image of batch 9 of epoch 0 failed to load" in str(lost) and lost.path in gone
    assert lost.root_exists and "\n" not in str(lost)


@pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not installed")
def test_a_dali_failure_no_file_explains_raises_instead_of_rebuilding_forever(photos, monkeypatch):
    from train.data.dali_loader import _PlanSource

    real_call = _PlanSource.__call__
    calls = []

    def failing_batch_4(self, info):
        calls.append(info.iteration)
        if self.start + info.iteration == 4:
            raise RuntimeError("a failure no file explains")
        return real_call(self, info)

    monkeypatch.setattr(_PlanSource, "__call__", failing_batch_4)
    loader = make_loader(photos, "dali", 1)
    with pytest.raises(RuntimeError, match=r"every file of batches \d+\.\.\d+ loads on its own") as info:
        for _ in loader:
            pass
    assert not isinstance(info.value, DataSourceLost) and len(calls) < 20
