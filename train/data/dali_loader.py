"""NVIDIA DALI backend: one pipeline for GPU ("mixed") and CPU decoding.

`image_pipeline` is the whole augmentation: file read, ROI-aware decode of the crop window
(`fn.decoders.image_slice`: on the GPU, nvJPEG decodes only the window's region), bicubic antialiased
resize to img_size, mirror + ImageNet normalisation to float NCHW (`fn.crop_mirror_normalize`). The
only difference between the GPU and CPU variants is `decoder_device` ("mixed" or "cpu"; with "cpu"
the pipeline is built with device_id=None and never touches CUDA), so CI on a CPU runs the graph
that trains on the GPU.

The sample order, shards, crop windows and flips come from `EpochPlan` through an external source
instead of DALI's own reader shuffle and random ops: that makes batches a pure function of
(seed, epoch, batch index), hence exactly resumable, and identical to the PyTorch fallback's.

Run-time failures: the up-front scan removes files Pillow cannot decode. If DALI still fails on a
batch (a file damaged, deleted or unreadable since the scan: "File mapping failed"; the first batches of
a pass included, which run when the iterator is built), the loader finds the culprit files among the
batch and the batches prefetched after it: first those that no longer open (cheap), else by decoding
the files one by one. It replaces them within their batch, rebuilds the pipeline at that batch and
carries on; each rebuild must find new bad files, else the loader raises (RuntimeError) rather than
loop. The failures are counted like the torch backend's (train/data/folder.py: one warning line per
batch, `loader.skipped`), so a few bad files never end an epoch, while a data source that has gone
(a whole batch failed, the folder is gone, or too many failures in the last batches) raises
DataSourceLost. Rebuilding at each failing batch is slow when many files are gone; the failure window
stops the run within a few batches.

Tested with nvidia-dali-cuda130 2.4.0 (CPU pipelines; the mixed variant needs a GPU).
"""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Iterator

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from train.data.folder import FolderLoader, describe_failure
from train.data.index import ImageIndex
from train.data.plan import IMAGENET_MEAN, IMAGENET_STD, EpochPlan

logger = logging.getLogger("train.data")

DALI_VERSION = __import__("nvidia.dali", fromlist=["__version__"]).__version__


@pipeline_def(enable_conditionals=False)
def image_pipeline(source, *, decoder_device: str, img_size: int):
    """paths, relative windows (x0, y0) (w, h), flips, labels from `source` -> float (3, img_size, img_size), label."""
    paths, anchors, shapes, flips, labels = fn.external_source(
        source=source, num_outputs=5, batch=True, batch_info=True,
        dtype=[types.UINT8, types.FLOAT, types.FLOAT, types.INT32, types.INT64])
    encoded = fn.io.file.read(paths)
    images = fn.decoders.image_slice(encoded, anchors, shapes, device=decoder_device, output_type=types.RGB,
                                     axis_names="WH", normalized_anchor=True, normalized_shape=True)
    images = fn.resize(images, size=[img_size, img_size], interp_type=types.INTERP_CUBIC, antialias=True)
    images = fn.crop_mirror_normalize(images, mirror=flips, dtype=types.FLOAT, output_layout="CHW",
                                      mean=[255 * m for m in IMAGENET_MEAN], std=[255 * s for s in IMAGENET_STD])
    return images, labels


@pipeline_def(enable_conditionals=False)
def _decode_check_pipeline(source, *, decoder_device: str):
    encoded = fn.io.file.read(fn.external_source(source=source, batch=False, dtype=types.UINT8))
    return fn.decoders.image(encoded, device=decoder_device, output_type=types.RGB)


def _encode_path(path: str) -> np.ndarray:
    """The file name's bytes as the file system holds them (``os.fsencode``: a name that is not valid UTF-8,
    which Python carries with surrogate escapes, gets its original bytes back)."""
    return np.frombuffer(os.fsencode(path), dtype=np.uint8)


class _PlanSource:
    """External-source callback: batch `start + info.iteration` of `epoch`, StopIteration at the end."""

    def __init__(self, loader: DaliLoader):
        self.loader = weakref.proxy(loader)  # no cycle: the pipeline is freed with the loader
        self.epoch, self.start = 0, 0

    def __call__(self, info):
        index = self.start + info.iteration
        if index >= len(self.loader):
            raise StopIteration
        ids, boxes, flips, labels = self.loader._batch(self.epoch, index)
        # Windows relative to the image size: always inside the decoded image, even if its size differed
        # from the scan's (DALI rounds them back to the same integer window).
        rel = (boxes / np.tile(self.loader.plan.sizes[ids], 2)).astype(np.float32)
        rel[:, 2:] = np.minimum(rel[:, 2:], 1 - rel[:, :2])
        files = self.loader.files
        return ([_encode_path(files[i]) for i in ids], list(rel[:, :2]), list(rel[:, 2:]),
                list(flips.astype(np.int32)), list(labels))


class DaliLoader(FolderLoader):
    """Image-folder loader on an NVIDIA DALI pipeline (see FolderLoader for the contract).

    dali_device: "mixed" decodes on the GPU (needs CUDA; outputs land on that GPU), "cpu" runs every
    operator on the CPU (device_id=None) and copies the batch to `device`; "auto" picks mixed when
    `device` is a CUDA device.
    """

    backend = "dali"

    def __init__(self, index: ImageIndex, plan: EpochPlan, device: torch.device, with_labels: bool,
                 num_threads: int = 2, dali_device: str = "auto", prefetch_queue_depth: int = 2):
        super().__init__(index, plan, device, with_labels)
        if dali_device not in ("auto", "mixed", "cpu"):
            raise ValueError(f"dali_device={dali_device!r}: expected one of ('auto', 'mixed', 'cpu')")
        if dali_device == "auto":
            dali_device = "mixed" if self.device.type == "cuda" else "cpu"
        if dali_device == "mixed" and not torch.cuda.is_available():
            raise ValueError("dali_device='mixed' needs CUDA, which is not available: use 'cpu'")
        self.dali_device = dali_device
        self.num_threads = max(1, int(num_threads))
        self.prefetch_queue_depth = prefetch_queue_depth
        self._source = _PlanSource(self)
        self._iterator = None
        self._state = "none"  # "none": build before use, "done": reset before use, "open": mid-pass, rebuild

    def _device_id(self):
        if self.dali_device == "cpu":
            return None
        return self.device.index if self.device.type == "cuda" and self.device.index is not None \
            else torch.cuda.current_device()

    def _build(self) -> None:
        pipe = image_pipeline(self._source, decoder_device=self.dali_device, img_size=self.plan.img_size,
                              batch_size=self.plan.batch_size, num_threads=self.num_threads,
                              device_id=self._device_id(), prefetch_queue_depth=self.prefetch_queue_depth,
                              exec_async=True, exec_pipelined=True)
        self._iterator = DALIGenericIterator([pipe], ["images", "labels"], auto_reset=False,
                                             last_batch_policy=LastBatchPolicy.PARTIAL)

    def _start_pass(self, epoch: int, start: int) -> None:
        self._source.epoch, self._source.start = epoch, start
        if self._state == "done":
            self._iterator.reset()  # the callback is only called again after this, with the new epoch
        else:  # first use, or a pass abandoned mid-epoch: its prefetched batches belong to the old pass
            self._iterator = None
            self._build()
        self._state = "open"

    def _iterate(self, epoch: int, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if start >= len(self):  # nothing left of this epoch (resumed at its very end): DALI would refuse
            return
        index, restart = start, True
        found: dict[int, dict[int, str]] = {}  # failures isolated, by batch: counted when that batch is yielded
        while True:
            try:
                # Building the iterator (or resetting it) already runs the first batches: a bad file
                # there fails here, inside the guard, like one found later in the pass.
                if restart:
                    restart = False
                    self._start_pass(epoch, index)
                out = next(self._iterator)[0]
            except StopIteration:
                self._state = "done"
                return
            except RuntimeError as exc:  # a failed file stops the pipeline: isolate it, rebuild at this batch
                self._state = "none"
                self._recover(epoch, index, exc, found)
                restart = True
                continue
            labels = out["labels"].view(-1)
            failed = found.pop(index, None)
            if failed:
                ids = self.plan.batch(epoch, index)[0].tolist()
                self._account(epoch, index, len(ids), [(i, failed[i]) for i in ids if i in failed])
            else:
                self._account(epoch, index, labels.shape[0], [])
            index += 1
            yield out["images"].to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)

    def _recover(self, epoch: int, index: int, exc: RuntimeError, found: dict[int, dict[int, str]]) -> None:
        """After the pipeline failed while batch `index` was next: find and mark the failed files of that batch and
        of those prefetched after it (adding them to `found`), so that a rebuild at `index` replaces them. Raises
        DataSourceLost if one of those batches has no good file left, RuntimeError if no new failed file is found
        (a rebuild would fail again)."""
        batches = range(index, min(len(self), index + self.prefetch_queue_depth + 2))
        new = self._isolate_failures(epoch, batches)
        for b, failed in new.items():
            self._mark_bad(failed)
            found.setdefault(b, {}).update(failed)
        for b in batches:
            ids = self.plan.batch(epoch, b)[0].tolist()
            if all(i in self._bad for i in ids):  # nothing left to stand in: the data source is lost
                failed = found.pop(b, {})
                self._account(epoch, b, len(ids), [(i, failed.get(i, self._bad[i])) for i in ids])
        if not new:
            raise RuntimeError(f"DALI failed at batch {index} of epoch {epoch}, but every file of batches "
                               f"{batches.start}..{batches.stop - 1} loads on its own: {_dali_reason(exc)}") from exc

    def _isolate_failures(self, epoch: int, batches: range) -> dict[int, dict[int, str]]:
        """{batch: {file index: reason}} of new failed files among `batches`: those that no longer open, else (if
        every file opens) those of the first batch that has files DALI cannot decode on their own."""
        candidates = {b: [i for i in dict.fromkeys(self.plan.batch(epoch, b)[0].tolist()) if i not in self._bad]
                      for b in batches}
        unreadable = {b: {i: reason for i in ids if (reason := _open_error(self.index.files[i]))}
                      for b, ids in candidates.items()}
        if any(unreadable.values()):
            return {b: failed for b, failed in unreadable.items() if failed}
        for b, ids in candidates.items():
            failed = {i: reason for i in ids if (reason := self._decode_error(self.index.files[i]))}
            if failed:
                return {b: failed}
        return {}

    def _decode_error(self, path: str) -> str | None:
        """Why DALI cannot decode `path` on its own, or None if it can."""
        def once(info):
            return _encode_path(path)

        pipe = _decode_check_pipeline(once, decoder_device=self.dali_device, batch_size=1, num_threads=1,
                                      device_id=self._device_id(), prefetch_queue_depth=1)
        try:
            pipe.build()
            pipe.run()
            return None
        except RuntimeError as exc:
            return _dali_reason(exc, path)
        finally:
            del pipe


def _open_error(path: str) -> str | None:
    """Why `path` cannot be opened for reading (deleted, moved, permission), or None if it can."""
    try:
        with open(path, "rb"):
            return None
    except OSError as exc:
        return describe_failure(exc, path)


def _dali_reason(exc: RuntimeError, path: str = "") -> str:
    """The line of a DALI pipeline error that says what went wrong ("nvImageCodec failure: '#4'"), without `path`."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    after = [lines[k + 1] for k, line in enumerate(lines[:-1]) if line == "encountered:"]
    useful = [line for line in lines if "no longer valid" not in line and "Critical error" not in line]
    text = (after or useful[-1:] or [type(exc).__name__])[0]
    if path:
        text = text.replace(path, "").strip(" :")
    return f"DALI: {text[:160]}"
