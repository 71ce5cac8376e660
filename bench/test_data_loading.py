"""Data-loading throughput: DALI (CPU pipeline, and GPU "mixed" where there is one) vs the PyTorch fallback.

    pytest bench/test_data_loading.py --benchmark    # full: data_loading_<gpu>_<date>.{json,md} and
                                                     # data_loading_latest.{json,md} (folder: bench/results.py)
    pytest bench/test_data_loading.py                # smoke check in seconds

Input: a folder of ImageNet-sized JPEGs (500x375, quality 90, ~ImageNet's mean size) cut from the
demo photos, read as pre-training reads it: RandomResizedCrop 224 + flip + normalise, batch 64, every
CPU core given to the loader (DALI threads / DataLoader workers). Also the embedded default: the demo
folder at img_size 64. Images/s counts batches delivered on the training device, after one warm-up
epoch, over whole epochs.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch
from PIL import Image

from bench.machine import machine_facts as common_machine_facts
from bench.results import markdown_table, write_results
from train.data import build_loader, dali_available, resolve_data_path
from train.data.demo import source_photos

CPUS = os.cpu_count() or 1
HAS_GPU = torch.cuda.is_available()


def make_imagenet_like(folder, count: int, seed: int = 0) -> None:
    """`count` 500x375 JPEGs (q90) in 4 class folders, crops of the bundled photos."""
    rng = np.random.default_rng(seed)
    photos = [Image.open(p).convert("RGB") for p in source_photos()]
    for k in range(count):
        photo = photos[k % len(photos)]
        width, height = photo.size
        w = int(min(width, height * 4 / 3) * rng.uniform(0.6, 1.0))
        h = int(w * 3 / 4)
        x0, y0 = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
        out = folder / f"class{k % 4}"
        out.mkdir(parents=True, exist_ok=True)
        photo.resize((500, 375), Image.Resampling.BICUBIC, box=(x0, y0, x0 + w, y0 + h)).save(
            out / f"img{k:05d}.jpg", quality=90)


def images_per_second(loader, epochs: int) -> float:
    for _ in loader:  # warm-up: worker start, pipeline build, page cache
        pass
    torch.cuda.synchronize() if loader.device.type == "cuda" else None
    start, count = time.perf_counter(), 0
    for _ in range(epochs):
        for images, _ in loader:
            count += images.shape[0]
    if loader.device.type == "cuda":
        torch.cuda.synchronize()
    return count / (time.perf_counter() - start)


def configs(full: bool):
    """(name, data, img_size, build_loader kwargs); data is 'imagenet' or 'demo'."""
    device = torch.device("cuda" if HAS_GPU else "cpu")
    out = []
    if dali_available():
        out.append(("DALI CPU pipeline", "imagenet", 224, dict(backend="dali", dali_device="cpu", device=device)))
        if HAS_GPU:
            out.append(("DALI mixed (GPU decode)", "imagenet", 224, dict(backend="dali", dali_device="mixed",
                                                                          device=device)))
    out.append(("PyTorch DataLoader + Pillow", "imagenet", 224, dict(backend="torch", device=device)))
    if full:
        out.append(("PyTorch DataLoader + Pillow, no JPEG draft", "imagenet", 224,
                    dict(backend="torch", device=device, draft=False)))
    if dali_available():
        out.append(("DALI CPU pipeline", "demo", 64, dict(backend="dali", dali_device="cpu", device=device)))
    out.append(("PyTorch DataLoader + Pillow", "demo", 64, dict(backend="torch", device=device)))
    return out


def machine_facts() -> dict:
    """bench.machine's facts (card, versions, CPU, load average, command, date) plus the DALI version."""
    dali = None
    if dali_available():
        import nvidia.dali

        dali = nvidia.dali.__version__
    return {**common_machine_facts(), "dali": dali}


def report_lines(rows: list[dict], facts: dict, setup: dict) -> list[str]:
    load = facts["load_average_1_5_15_min"]
    lines = ["# Data loading throughput", "",
             f"{facts['date']} · CPU: {facts['cpu']} ({facts['cpu_count']} cores) · GPU: {facts['gpu'] or 'none'} · "
             f"torch {facts['torch']} · DALI {facts['dali'] or 'not installed'} · Pillow {facts['pillow']} · "
             f"Python {facts['python']} · load average before the run "
             f"{' / '.join(map(str, load)) if load else 'unknown'} (1/5/15 min) · commit {facts['git_commit']}", "",
             f"Command: `{facts['command']}`", "",
             f"ImageNet-like: {setup['imagenet_images']} JPEGs 500x375 q90; demo: the embedded folder "
             f"({setup['demo_images']} JPEGs, 160-256 px). Train augmentation (RandomResizedCrop + flip + normalise), "
             f"batch {setup['batch_size']}, {setup['workers']} DALI threads / DataLoader workers, "
             f"{setup['epochs']} timed epochs after one warm-up epoch.", ""]
    if not setup["full"]:
        lines += ["**Smoke check**: tiny folders, one epoch; exercises the loaders, measures nothing.", ""]
    return lines + markdown_table(["loader", "data", "img_size", "images/s"],
                                  [[r["loader"], r["data"], r["img_size"], f"{r['images_per_s']:,.0f}"] for r in rows])


def test_data_loading_throughput(tmp_path_factory, benchmark_full, results_dir):
    count, batch_size, epochs = (512, 64, 2) if benchmark_full else (16, 8, 1)
    folder = tmp_path_factory.mktemp("imagenet_like")
    make_imagenet_like(folder, count)
    demo = resolve_data_path("demo")
    facts = machine_facts()  # before the run: the load average tells whether others shared the CPU
    rows = []
    for name, data, img_size, kwargs in configs(benchmark_full):
        root = folder if data == "imagenet" else demo
        loader = build_loader(root, batch_size=batch_size, img_size=img_size, train=True, num_workers=CPUS,
                              seed=0, **kwargs)
        rate = images_per_second(loader, epochs)
        images, _ = next(iter(loader))
        assert images.shape == (batch_size, 3, img_size, img_size) and rate > 0
        rows.append({"loader": name, "data": data, "img_size": img_size, "images_per_s": round(rate, 1),
                     "backend": loader.backend, "device": str(loader.device)})
        print(f"{name:45s} {data:9s} {img_size:4d}  {rate:9.1f} images/s")
        del loader
    setup = {"imagenet_images": count, "demo_images": len(list(demo.rglob("*.jpg"))), "batch_size": batch_size,
             "workers": CPUS, "epochs": epochs, "full": benchmark_full}
    files = write_results(results_dir, "data_loading", facts, {"setup": setup, "results": rows},
                          report_lines(rows, facts, setup), dated=benchmark_full)
    assert "| PyTorch DataLoader + Pillow | demo | 64 |" in files.latest_markdown.read_text()


@pytest.mark.skipif(not (HAS_GPU and dali_available()), reason="DALI mixed decoding needs a CUDA GPU and DALI")
def test_dali_mixed_smoke(tmp_path):
    make_imagenet_like(tmp_path / "gpu", 16)
    loader = build_loader(tmp_path / "gpu", batch_size=8, img_size=224, backend="dali", device="cuda", num_workers=2)
    images, _labels = next(iter(loader))
    assert loader.dali_device == "mixed" and images.is_cuda and images.shape == (8, 3, 224, 224)
