"""Training input: image folders through NVIDIA DALI or PyTorch/Pillow, or synthetic batches.

    from train.data import build_loader, available_backends, resolve_data_path

    root = resolve_data_path("demo")        # the embedded demo photos, or any folder of images
    loader = build_loader(root, batch_size=64, img_size=224, train=True, backend="auto",
                          device=torch.device("cuda"), rank=rank, world_size=world_size, seed=0)
    for epoch in range(start_epoch, epochs):
        loader.set_epoch(epoch, start_batch=k if epoch == start_epoch else 0)   # exact resumption
        for images, labels in loader:       # float32 (B, 3, H, W) normalised, int64 (B,), on `device`
            ...

Backends (`--data_backend`):
- "dali": NVIDIA DALI; decodes on the GPU (nvJPEG, ROI decode of the crop window) when `device` is
  CUDA, on the CPU otherwise. Needs `pip install nvidia-dali-cuda130` (or the cuda12x wheel).
- "torch": torch.utils.data.DataLoader workers decoding with Pillow. Always available.
- "synthetic": random normalised images generated on `device` (no files, no host work), for
  measuring the model alone. `root` may be None or "synthetic"; `num_images` sets the epoch length.

Folders: with `with_labels=True` (fine-tuning, probing) `<root>/<class>/<image>`; without (pre-training)
any folder of images, read recursively, a flat one included.
- "auto": dali if it imports, else torch (logged).

Training batches: RandomResizedCrop(img_size, scale (0.2, 1), ratio (3/4, 4/3), bicubic) + horizontal
flip + ImageNet mean/std. Evaluation batches (train=False): resize the shorter side to
img_size * 256/224, center crop img_size. The dali and torch backends read the same files in the same
order with the same crop windows; see train/data/plan.py for the sharding and resumption rules.

Files that fail at run time are replaced within their batch and listed in `loader.skipped`; a data source
that has gone (too many failures in the last batches, a whole batch, or the folder itself) raises
`DataSourceLost` from the iterator, before the batch: see train/data/folder.py for the thresholds.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
from pathlib import Path

import numpy as np
import torch

from train.data.folder import DataSourceLost, FolderLoader
from train.data.index import VALIDATE_MODES, ImageIndex, available_cores, cache_root, scan_image_folder
from train.data.plan import IMAGENET_MEAN, IMAGENET_STD, EpochPlan
from train.data.synthetic import IMAGENET_TRAIN_SIZE, SyntheticLoader

__all__ = ["BACKENDS", "IMAGENET_MEAN", "IMAGENET_STD", "DataSourceLost", "FolderLoader", "ImageIndex",
           "SyntheticLoader", "available_backends", "available_cores", "build_loader", "cache_root", "dali_available",
           "resolve_data_path", "scan_image_folder"]

logger = logging.getLogger("train.data")

BACKENDS = ("auto", "dali", "torch", "synthetic")


@functools.cache
def dali_available() -> bool:
    """True if NVIDIA DALI and its PyTorch plugin import (checked once; DALI is optional)."""
    try:
        importlib.import_module("nvidia.dali.plugin.pytorch")  # imports nvidia.dali too
    except Exception as exc:  # ImportError, or a broken install raising anything at import
        logger.debug("DALI is not available: %s: %s", type(exc).__name__, exc)
        return False
    return True


def available_backends() -> list[str]:
    """Data backends usable here, best first (excluding "auto")."""
    return (["dali"] if dali_available() else []) + ["torch", "synthetic"]


def resolve_data_path(data_path: str | os.PathLike | None) -> Path | None:
    """"demo" -> the embedded demo folder (built once in the cache); "digits[/train|/val]" -> the embedded
    labelled digits (train/ and val/ folders); "synthetic"/None -> None; else the path.

    Raises FileNotFoundError naming the path if it does not exist.
    """
    if data_path is None or str(data_path) == "synthetic":
        return None
    if str(data_path) == "demo":
        from train.data.demo import materialize_demo

        return materialize_demo()
    if str(data_path).split("/")[0] == "digits":  # "digits", "digits/train", "digits/val"
        from train.data.demo import materialize_digits

        return materialize_digits() / str(data_path)[len("digits"):].lstrip("/")
    path = Path(data_path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"data_path {str(data_path)!r} does not exist: pass a folder of images "
                                f"(<root>/<class>/<image> for fine-tuning and probing), 'demo' for the embedded "
                                f"photos, or use --data_backend synthetic")
    return path


def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name}={value!r}: expected an integer >= {low}")
    return int(value)


def build_loader(root: str | os.PathLike | None, batch_size: int, img_size: int = 224, train: bool = True,
                 backend: str = "auto", device: torch.device | str = "cpu", rank: int = 0, world_size: int = 1,
                 seed: int = 0, num_workers: int = 2, with_labels: bool = False, *, num_images: int | None = None,
                 validate: str = "decode", cache_dir: str | os.PathLike | None = None, dali_device: str = "auto",
                 index: ImageIndex | None = None, scan_threads: int | None = None,
                 **backend_options) -> FolderLoader | SyntheticLoader:
    """A loader of (images, labels) batches; see the module docstring and FolderLoader.

    root: a folder of images, read recursively (`<root>/<class>/<image>` with `with_labels`), or "demo"
    (see resolve_data_path); ignored by the synthetic backend.
    num_workers: DALI threads or DataLoader worker processes (0: in-process).
    num_images: epoch length of the synthetic backend (default ImageNet-1k's 1,281,167).
    validate: the up-front scan's depth, "decode" or "header" (see train/data/index.py).
    dali_device: "auto" | "mixed" | "cpu" (DALI only). backend_options go to the backend's loader.
    index: the folder's scan, when another loader of ``root`` already made it (no second scan).
    scan_threads: threads of the folder scan's first pass (default: every core this process may use).
    Raises ValueError naming the argument for invalid arguments, FileNotFoundError for a missing root.
    """
    batch_size = _check_int("batch_size", batch_size, 1)
    img_size = _check_int("img_size", img_size, 1)
    world_size = _check_int("world_size", world_size, 1)
    rank = _check_int("rank", rank, 0)
    num_workers = _check_int("num_workers", num_workers, 0)
    if rank >= world_size:
        raise ValueError(f"rank={rank}: must be < world_size={world_size}")
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: expected one of {BACKENDS}")
    if validate not in VALIDATE_MODES:
        raise ValueError(f"validate={validate!r}: expected one of {VALIDATE_MODES}")
    device = torch.device(device)

    if backend == "auto":
        if root is None or str(root) == "synthetic":
            backend = "synthetic"
        else:
            backend = "dali" if dali_available() else "torch"
        logger.info("data backend: %s (available: %s)", backend, ", ".join(available_backends()))
    elif backend == "dali" and not dali_available():
        raise ValueError(f"backend='dali' needs NVIDIA DALI, which does not import here "
                         f"(pip install nvidia-dali-cuda130); available: {available_backends()}")

    if backend == "synthetic":
        return SyntheticLoader(batch_size, img_size, device, num_images=num_images or IMAGENET_TRAIN_SIZE, rank=rank,
                               world_size=world_size, seed=seed, with_labels=with_labels, **backend_options)

    if root is None or str(root) == "synthetic":
        raise ValueError(f"backend={backend!r} reads image files: pass root (a folder or 'demo')")
    path = resolve_data_path(root)
    if index is None:
        index = scan_image_folder(path, validate=validate, num_threads=scan_threads or available_cores(),
                                  cache_dir=cache_dir, classes=with_labels)
    plan = EpochPlan(index.sizes, batch_size, img_size, train=train, rank=rank, world_size=world_size, seed=seed)
    if backend == "dali":
        from train.data.dali_loader import DaliLoader

        loader = DaliLoader(index, plan, device, with_labels, num_threads=max(1, num_workers),
                            dali_device=dali_device, **backend_options)
    else:
        from train.data.torch_loader import TorchLoader

        loader = TorchLoader(index, plan, device, with_labels, num_workers=num_workers, **backend_options)
    logger.info("%s loader: %d images, %d batches of %d per epoch on rank %d/%d, img_size %d, %s%s",
                backend, index.files.__len__(), len(loader), batch_size, rank, world_size, img_size,
                "train" if train else "eval", f", decoding on {loader.dali_device}" if backend == "dali" else "")
    return loader
