"""What a newcomer meets first (issue #12): help defaults, any folder of images, the synthetic source's
size, the triton-on-CPU notice, summary lines that stay on screen, the fixed demo set, the pictures."""

from __future__ import annotations

import itertools
import json
import logging
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from train import pretrain, reporting
from train.config.pretrain import SYNTHETIC_IMAGES
from train.config.pretrain import build_parser as build_pretrain_parser
from train.data import build_loader, scan_image_folder
from train.data import demo as demo_data
from train.optim import lr_at, scaled_lr

ROOT = pathlib.Path(__file__).resolve().parents[1]
# 16 synthetic images in batches of 8 (2 steps per epoch), 16-pixel crops, one decoder block: milliseconds a step.
SYNTH = ["--data_path", "synthetic", "--synthetic_images", "16", "--batch_size", "8", "--img_size", "16",
         "--decoder_depth", "1", "--num_workers", "0", "--lr", "1e-3", "--warmup_epochs", "0", "--device", "cpu",
         "--recon_every", "0"]
PAPER_BLR = 1.5e-4  # --blr's default (SPEC.md section 2)


def option_blocks(help_text: str) -> dict[str, str]:
    """Each option's help block, keyed by its first flag."""
    blocks: dict[str, str] = {}
    current = None
    for line in help_text.splitlines():
        match = re.match(r"^  (-{1,2}[\w-]+)", line)
        if match:
            current = match.group(1)
            blocks[current] = line
        elif current is not None and line.startswith("    "):
            blocks[current] += " " + line.strip()
        else:
            current = None
    return blocks


def test_help_shows_every_default_exactly_once(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    parser = build_pretrain_parser()
    blocks = option_blocks(parser.format_help())
    flags = {a.option_strings[0] for a in parser._actions if a.option_strings and a.dest != "help"}
    assert flags <= set(blocks), flags - set(blocks)
    for flag in flags:
        assert blocks[flag].count("(default") == 1, blocks[flag]
    assert "(default: 4096)" in blocks["--synthetic_images"]
    assert "(default: 40)" in blocks["--epochs"] and "(default: the model's; 48 for the demo" in blocks["--img_size"]


def _write_images(folder: pathlib.Path, names: list[str]) -> None:
    rng = np.random.default_rng(0)
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(folder / name, quality=85)


def test_pretraining_reads_flat_and_nested_folders_fine_tuning_needs_classes(tmp_path, caplog):
    root = tmp_path / "flat"
    _write_images(root, [f"{i}.jpg" for i in range(12)] + ["deeper/a/x.jpg", "deeper/y.png"])
    (root / "notes.txt").write_text("not an image")
    loader = build_loader(root, batch_size=4, img_size=16, backend="torch", num_workers=0, cache_dir=tmp_path)
    assert loader.num_images == 14 and len(loader) == 3
    images, ids = next(iter(loader))
    assert images.shape == (4, 3, 16, 16) and ids.max() < 14
    index = scan_image_folder(root, classes=False, cache_dir=tmp_path)
    assert sorted(os.path.relpath(f, root) for f in index.files)[:2] == ["0.jpg", "1.jpg"]
    assert [os.path.relpath(f, root) for f in index.ignored] == ["notes.txt"]
    with pytest.raises(ValueError, match="class folders"):
        build_loader(root / "deeper" / "a", batch_size=1, backend="torch", num_workers=0, with_labels=True,
                     cache_dir=tmp_path)
    out = tmp_path / "run"
    assert pretrain.main(["--data_path", str(root), *SYNTH[2:], "--data_backend", "torch", "--max_steps", "2",
                          "--output_dir", str(out)]) == 0
    assert "14 images" in caplog.text and (out / "checkpoint-last.pth").exists()


def test_synthetic_source_size_sets_epoch_length_and_lr(tmp_path, caplog):
    assert build_pretrain_parser().parse_args([]).synthetic_images == SYNTHETIC_IMAGES == 4096
    out = tmp_path / "run"
    assert pretrain.main([*SYNTH, "--lr", "1e-3", "--epochs", "2", "--output_dir", str(out)]) == 0
    assert "synthetic backend, 16 images, 2 steps per epoch" in caplog.text
    assert "finished: 4 steps" in caplog.text
    caplog.clear()
    # Without --lr: the rule on the run's own effective batch (8), not ImageNet's 1,281,167 images (which gave a
    # 3-step smoke 4.9e-12). Every step's lr is the schedule's at the step's start: 2 steps an epoch, a warmup of
    # one epoch (0, lr/2), the peak at step 3, then the half-cosine to --min_lr over the 3 epochs left.
    args = [a for a in SYNTH if a not in ("--lr", "1e-3")]
    out = tmp_path / "r2"
    assert pretrain.main([*args, "--epochs", "4", "--warmup_epochs", "1", "--min_lr", "1e-7", "--log_every", "1",
                          "--output_dir", str(out)]) == 0
    lr = scaled_lr(PAPER_BLR, 8, mask_ratio=0.75, kept_mask_ratio=0.25)  # 1.5625e-6
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 9))
    expected = [lr_at((r["step"] - 1) / 2, lr, 1e-7, 1, 4) for r in records]
    assert [r["lr"] for r in records] == pytest.approx(expected, rel=1e-12, abs=0)
    logged = [r["lr"] for r in records]
    assert logged[0] == 0.0 and logged[1] == pytest.approx(lr / 2, rel=1e-12)
    assert logged[2] == max(logged) == pytest.approx(lr, rel=1e-12)
    assert all(a > b for a, b in itertools.pairwise(logged[2:])) and logged[-1] > 1e-7
    shown = re.findall(r"step (\d+)/8  epoch .*?  lr (\S+)  ", caplog.text)  # each step's line, as formatted
    assert shown == [(str(k), f"{value:.2e}") for k, value in enumerate(expected, 1)], caplog.text


def test_summary_lines_per_epoch_and_a_final_summary(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(reporting, "SUMMARY_MIN_STEPS", 1)  # one line per epoch; the default groups short epochs
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="train"):
        assert pretrain.main([*SYNTH, "--epochs", "3", "--log_every", "100", "--output_dir", str(out)]) == 0
    summaries = re.findall(r"epoch (\d)/3  step (\d)/6  loss \d\.\d{4} \(mean of steps (\d)-(\d)\)", caplog.text)
    assert summaries == [("1", "2", "1", "2"), ("2", "4", "3", "4"), ("3", "6", "5", "6")], caplog.text
    final = [r.getMessage() for r in caplog.records if r.getMessage().startswith("finished:")]
    assert len(final) == 1
    assert "finished: 6 steps (6 this run) in 0:" in final[0] and "48 images seen" in final[0]
    assert re.search(r"loss \d\.\d{4} -> \d\.\d{4}", final[0]) and str(out) in final[0]
    assert "checkpoint-last.pth" in final[0] and "loss.png" in final[0] and (out / "loss.png").exists()


def test_default_summary_grouping_keeps_short_epochs_readable(tmp_path, caplog):
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="train"):
        assert pretrain.main([*SYNTH, "--epochs", "3", "--output_dir", str(out)]) == 0
    assert len(re.findall(r"epoch \d/3  step", caplog.text)) == 1  # 6 steps < 50: one line, at the end


def test_progress_bar_keeps_log_lines_above_it(monkeypatch):
    """On a terminal, the train logger writes through rich's console while the bar is live (so lines stay
    on screen above it) and gets its own stream back afterwards."""
    import io

    from train.monitor import ProgressBar, setup_logging

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    setup_logging(True)
    handler = logging.getLogger("train").handlers[0]
    assert handler.stream is terminal
    bar = ProgressBar(10, 0, enabled=True)
    try:
        assert bar.progress is not None and handler.stream is not terminal
        logging.getLogger("train").info("a line that stays")
    finally:
        bar.close()
    assert handler.stream is terminal and "a line that stays" in terminal.getvalue()


def test_backend_triton_without_interpreter_says_it_runs_the_references(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    if "CUDA_VISIBLE_DEVICES" not in env:
        env["CUDA_VISIBLE_DEVICES"] = ""  # a GPU would run the kernels: the notice is about a CPU
    result = subprocess.run([sys.executable, "-m", "train.pretrain", *SYNTH, "--backend", "triton", "--max_steps",
                             "1", "--output_dir", str(tmp_path / "run")], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("PyTorch reference ops run instead") == 1, result.stdout


def test_demo_set_is_fixed_and_held_out_photos_are_not_in_it(tmp_path):
    train_root = demo_data.materialize_demo(tmp_path)
    heldout_root = demo_data.materialize_demo_heldout(tmp_path)
    trained = sorted(p.name for p in train_root.iterdir() if p.is_dir())
    held = sorted(p.name for p in heldout_root.iterdir() if p.is_dir())
    assert trained == sorted(name.rsplit(".", 1)[0] for _, _, name in demo_data._DEMO_PHOTOS)
    assert held == ["camera", "coffee"] and not set(held) & set(trained)
    assert len(list(train_root.rglob("*.jpg"))) == demo_data.DEMO_IMAGES == 320
    assert len(list(heldout_root.rglob("*.jpg"))) == demo_data.DEMO_HELDOUT_IMAGES
