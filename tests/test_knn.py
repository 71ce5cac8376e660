"""The online k-NN monitor (train/knn.py): the weighted vote against numbers worked out by hand, chunking, the
monitor's determinism and its contract with training (RNG, mode, losses, resumption), two ranks against one
process, and its wiring into the command line (on by default with the demo, a bad folder refused)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import pathlib
import random
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from model import build_model, get_config
from train import pretrain
from train.config import ConfigError, from_flat
from train.config import pretrain as P
from train.data import scan_image_folder
from train.knn import KnnMonitor, KnnResult, knn_class_scores, subset_index, top_n_hits
from train.reporting import StepReporter

ROOT = pathlib.Path(__file__).resolve().parents[1]
IMG = 16  # 16-pixel images in 8-pixel patches: 4 patches, the smallest the masking allows


def unit(degrees: float) -> list[float]:
    return [math.cos(math.radians(degrees)), math.sin(math.radians(degrees))]


def scores_by_hand(bank: list[list[float]], labels: list[int], query: list[float], k: int, temperature: float,
                   num_classes: int) -> list[float]:
    """The formula of train/knn.py written out: cosine of unit vectors, the k most similar, exp(s / T) per vote."""
    sims = sorted(((sum(a * b for a, b in zip(v, query, strict=True)), label) for v, label in zip(bank, labels,
                                                                                                 strict=True)),
                  reverse=True)[:k]
    scores = [0.0] * num_classes
    for s, label in sims:
        scores[label] += math.exp(s / temperature)
    return scores


# -- the vote ----------------------------------------------------------------------------------------------


def test_temperature_weighted_vote_by_hand_two_classes():
    # Query A at 0 degrees. Class 1 has two close neighbours (1 and 2 degrees away), class 0 three farther ones
    # (20, 22, 24 degrees) and two far ones. With k = 5 the plain majority is class 0 (3 votes to 2), but the
    # exp(cos / 0.07) weights make class 1 win: e^14.28 + e^14.28 (3.2e6) against e^13.42 + e^13.25 + e^13.05
    # (1.7e6).
    bank = [unit(1), unit(-2), unit(20), unit(-22), unit(24), unit(150), unit(170)]
    labels = [1, 1, 0, 0, 0, 0, 0]
    # Query B at 90 degrees (label 0): its nearest five are the vectors at 150, 24, 20, 170 and 1 degrees (60, 66,
    # 70, 80 and 89 degrees away): four votes of class 0, one of class 1: class 0 either way.
    queries = [unit(0), unit(90)]
    query_labels = [1, 0]
    k, t = 5, 0.07
    expected = [scores_by_hand(bank, labels, q, k, t, 2) for q in queries]
    assert expected[0][1] > expected[0][0] and expected[1][0] > expected[1][1]

    scores = knn_class_scores(torch.tensor(bank), torch.tensor(labels), torch.tensor(queries), k=k, num_classes=2,
                              temperature=t)
    assert torch.allclose(scores, torch.tensor(expected), rtol=1e-5, atol=0)
    assert top_n_hits(scores, torch.tensor(query_labels)) == [2, 2]  # top-1: both right; top-5 of 2 classes: all

    # The same neighbours with nearly uniform weights (T large): the majority, class 0, wins for query A.
    flat = knn_class_scores(torch.tensor(bank), torch.tensor(labels), torch.tensor(queries), k=k, num_classes=2,
                            temperature=100.0)
    by_hand = scores_by_hand(bank, labels, queries[0], k, 100.0, 2)
    assert flat[0].tolist() == pytest.approx(by_hand, rel=1e-5) and by_hand[0] > by_hand[1]
    assert top_n_hits(flat, torch.tensor(query_labels)) == [1, 2]  # query A is now a top-1 miss

    # Rows need not be unit length: the vote uses cosine similarity.
    scaled = knn_class_scores(3.0 * torch.tensor(bank), torch.tensor(labels), 0.5 * torch.tensor(queries), k=k,
                              num_classes=2, temperature=t)
    assert torch.allclose(scaled, scores, rtol=1e-5)
    # k above the bank's size: every train image votes.
    everyone = knn_class_scores(torch.tensor(bank), torch.tensor(labels), torch.tensor(queries), k=50, num_classes=2,
                                temperature=t)
    assert torch.allclose(everyone, torch.tensor([scores_by_hand(bank, labels, q, 7, t, 2) for q in queries]),
                          rtol=1e-5, atol=0)


def test_top_n_counts_a_tie_and_a_label_without_votes_as_misses():
    # Seven classes; the label's score and its rank among them, worked out per row.
    scores = torch.tensor([
        [9.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # label 0: first
        [5.0, 4.0, 3.0, 2.0, 1.0, 0.5, 0.0],  # label 4: fifth -> top-5 hit
        [5.0, 4.0, 3.0, 2.0, 1.0, 0.5, 0.0],  # label 5: sixth -> top-5 miss
        [3.0, 3.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # label 1: tied for first -> top-1 miss, top-5 hit
        [3.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # label 6: no vote, tied with four others -> top-5 miss
    ])
    labels = torch.tensor([0, 4, 5, 1, 6])
    assert top_n_hits(scores, labels) == [1, 3]
    assert top_n_hits(scores, labels, ns=(1, 2, 6, 7)) == [1, 2, 4, 5]


def test_chunking_gives_the_one_chunk_result():
    g = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(300, 16, generator=g), torch.randn(37, 16, generator=g)
    labels, query_labels = torch.randint(0, 10, (300,), generator=g), torch.randint(0, 10, (37,), generator=g)
    whole = knn_class_scores(bank, labels, queries, k=20, num_classes=10)
    for rows in (1, 7, 36):
        chunked = knn_class_scores(bank, labels, queries, k=20, num_classes=10, chunk_similarities=300 * rows)
        # One row is a matrix-vector product, several a matrix product: the similarities may differ in the last
        # bit (~1e-7), which exp(s / 0.07) magnifies 14 times; the hits are the same.
        assert torch.allclose(chunked, whole, rtol=1e-5, atol=0)
        assert top_n_hits(chunked, query_labels) == top_n_hits(whole, query_labels)
    assert 0 < top_n_hits(whole, query_labels)[0] < 37  # neither degenerate extreme


# -- the monitor -------------------------------------------------------------------------------------------


def write_labelled_folder(root: pathlib.Path, counts: dict[str, dict[str, int]], seed: int = 0) -> pathlib.Path:
    """``root/<split>/<class>/*.png``: 20-pixel images, class "left" bright on the left, "right" on the right,
    "top" on top, with seeded noise."""
    rng = np.random.default_rng(seed)
    for split, per_class in counts.items():
        for name, count in per_class.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 90, (20, 20, 3))
                region = {"left": np.s_[:, :10], "right": np.s_[:, 10:], "top": np.s_[:10, :]}[name]
                pixels[region] += 140
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i:03d}.png")
    return root


THREE_CLASSES = {"train": {"left": 5, "right": 4, "top": 4}, "val": {"left": 2, "right": 2, "top": 3}}


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> pathlib.Path:
    return write_labelled_folder(tmp_path_factory.mktemp("knn_folder"), THREE_CLASSES)


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(get_config("crossmae_vit_tiny_patch8", img_size=IMG, decoder_depth=1, backend="torch"))


def monitor_of(folder, **overrides) -> KnnMonitor:
    options = dict(k=3, max_train=None, img_size=IMG, batch_size=4, device=torch.device("cpu"), rank=0, world_size=1,
                   seed=0)
    return KnnMonitor(folder, **{**options, **overrides})


def rng_snapshot() -> tuple:
    return torch.get_rng_state().clone(), np.random.get_state()[1].copy(), random.getstate()


def test_evaluation_is_deterministic_and_leaves_rng_and_mode_as_they_were(labelled):
    model = tiny_model()
    monitor = monitor_of(labelled)
    assert (monitor.train_loader.num_images, monitor.val_loader.num_images) == (13, 7)
    before = rng_snapshot()
    first = monitor.evaluate(model, None)
    after = rng_snapshot()
    assert torch.equal(before[0], after[0]) and np.array_equal(before[1], after[1]) and before[2] == after[2]
    assert model.training  # put back in train mode
    second = monitor.evaluate(model.eval(), None)
    assert not model.training  # and an eval-mode model stays in eval mode
    assert first.seconds > 0 and dataclasses.replace(first, seconds=0) == dataclasses.replace(second, seconds=0)
    assert (first.num_train, first.num_val, first.k) == (13, 7, 3)
    for value in (first.cls_top1, first.cls_top5, first.avg_top1, first.avg_top5):  # percentages of 7 images
        assert 0 <= value <= 100 and abs(value * 7 / 100 - round(value * 7 / 100)) < 1e-9, first
    bank, queries = monitor.features(model, None)
    assert bank.ids.tolist() == list(range(13)) and queries.ids.tolist() == list(range(7))
    assert torch.allclose(bank.cls.norm(dim=1), torch.ones(13)) and bank.avg.shape == (13, 192)


def test_max_train_is_a_fixed_subset_drawn_from_the_seed(labelled):
    index = scan_image_folder(labelled / "train", classes=True)
    subset = subset_index(index, 5, seed=0)
    again = subset_index(index, 5, seed=0)
    other = subset_index(index, 5, seed=1)
    assert subset.files == again.files and len(subset.files) == 5 and subset.files != other.files
    assert subset.files == sorted(subset.files, key=index.files.index)  # in file order
    positions = [index.files.index(f) for f in subset.files]
    assert subset.labels.tolist() == index.labels[positions].tolist()
    assert subset_index(index, None, 0) is index and subset_index(index, 99, 0) is index
    assert monitor_of(labelled, max_train=5).evaluate(tiny_model(), None).num_train == 5
    smaller_than_k = monitor_of(labelled, max_train=2)  # k=3 votes over a bank of 2: all of it, and said so
    assert smaller_than_k.evaluate(tiny_model(), None).k == 2
    assert "k=2 (--knn_k 3: the bank holds 2 images)" in smaller_than_k.describe()
    assert ", k=3, " in monitor_of(labelled, max_train=5).describe()


def test_train_and_val_with_other_classes_are_refused_naming_the_flag(tmp_path):
    folder = write_labelled_folder(tmp_path, {"train": {"left": 2, "right": 2}, "val": {"left": 1, "top": 1}})
    with pytest.raises(ValueError, match=r"^--knn_data_path .*: train/ and val/ hold different classes"):
        monitor_of(folder)


# -- the monitor in a training run ---------------------------------------------------------------------------

# 16 synthetic images in batches of 8: 2 steps per epoch, 2 epochs; one decoder block; milliseconds a step.
RUN = ["--data_path", "synthetic", "--synthetic_images", "16", "--batch_size", "8", "--img_size", str(IMG),
       "--decoder_depth", "1", "--num_workers", "0", "--lr", "1e-3", "--warmup_epochs", "0", "--device", "cpu",
       "--recon_every", "0", "--log_every", "1", "--epochs", "2"]


def records(out: pathlib.Path) -> tuple[dict[int, float], dict[int, dict]]:
    """(loss per step, k-NN numbers per step) of a run's metrics.jsonl."""
    losses, knn = {}, {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            losses[record["step"]] = record["loss"]
        else:
            knn[record["step"]] = {k: v for k, v in record.items() if k.startswith("knn_") and k != "knn_seconds"}
    return losses, knn


def test_the_monitor_changes_no_loss_and_a_resumed_run_equals_an_uninterrupted_one(tmp_path, labelled):
    monitor = ["--knn_data_path", str(labelled), "--knn_every", "1", "--knn_k", "3"]
    off, on = tmp_path / "off", tmp_path / "on"
    assert pretrain.main([*RUN, "--output_dir", str(off), "--knn_every", "0"]) == 0
    # With the monitor: stopped mid-epoch by --max_steps 1 (evaluated there, at its end), then the same command
    # resumes and runs to the end.
    assert pretrain.main([*RUN, *monitor, "--output_dir", str(on), "--max_steps", "1"]) == 0
    assert pretrain.main([*RUN, *monitor, "--output_dir", str(on)]) == 0
    losses_off, knn_off = records(off)
    losses_on, knn_on = records(on)
    assert sorted(losses_off) == list(range(1, 5)) and knn_off == {}
    assert losses_on == losses_off  # exactly, step by step
    assert sorted(knn_on) == [0, 1, 2, 4]  # step 0 (the random encoder), the stop, every epoch of 2 steps, the end
    assert set(knn_on[4]) == {"knn_cls_top1", "knn_cls_top5", "knn_avg_top1", "knn_avg_top5"}

    # The numbers at the end are those of the uninterrupted run's encoder, evaluated on its own.
    model = build_model(P.parse_pretrain([*RUN, "--output_dir", str(tmp_path / "unused")]).model_config)
    model.load_state_dict(torch.load(off / "checkpoint-last.pth", weights_only=True)["model"])
    result = monitor_of(labelled, batch_size=8).evaluate(model, None)
    assert {k: v for k, v in result.record().items() if k != "knn_seconds"} == knn_on[4]
    assert knn_on[4] != knn_on[0]  # training moved them: the comparison is not between two random encoders


def test_results_go_to_their_own_record_and_into_the_next_summary_line(tmp_path, caplog):
    reporter = StepReporter(tmp_path, is_main=True, tensorboard=False, start_step=0, total_steps=4, epochs=2,
                            images_per_step=8, accum_iter=1, world_size=1, device=torch.device("cpu"),
                            flops_per_image=1.0, peak_flops=None)
    baseline = KnnResult(10.0, 50.0, 20.0, 60.0, seconds=1.5, num_train=13, num_val=7, k=3)
    later = KnnResult(30.0, 70.0, 40.0, 80.0, seconds=2.0, num_train=13, num_val=7, k=3)
    with caplog.at_level(logging.INFO, logger="train"), reporter:
        reporter.knn_done(0, 0.0, baseline)  # before any step: a line of its own
        reporter.step_done(torch.tensor(1.0), 0.0)
        reporter.step_done(torch.tensor(1.0), 0.0)
        reporter.knn_done(2, 1.0, later)  # shown by the next summary line, which names its step
        reporter.step_done(torch.tensor(1.0), 0.0)
        reporter.summary_line(1, 3, 1e-3)
        reporter.step_done(torch.tensor(1.0), 0.0)
        reporter.summary_line(2, 4, 1e-3)  # nothing new to show
    lines = [r.getMessage() for r in caplog.records]
    assert "step 0, before training: k-NN top-1/top-5: cls 10.0/50.0%, avg 20.0/60.0% (1.5 s)" in lines[0]
    assert lines[1].startswith("epoch 1/2  step 3/4") and lines[1].endswith(
        "k-NN top-1/top-5: cls 30.0/70.0%, avg 40.0/80.0% (2.0 s) at step 2")
    assert lines[2].startswith("epoch 2/2  step 4/4") and "k-NN" not in lines[2]
    written = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert written == [{"step": 0, "epoch": 0.0, **baseline.record()}, {"step": 2, "epoch": 1.0, **later.record()}]
    assert written[1] == {"step": 2, "epoch": 1.0, "knn_cls_top1": 30.0, "knn_cls_top5": 70.0, "knn_avg_top1": 40.0,
                          "knn_avg_top5": 80.0, "knn_seconds": 2.0}


def test_two_gloo_ranks_give_the_single_process_numbers(tmp_path):
    """torchrun --standalone (it picks a free port) with two CPU processes against the same worker run alone;
    odd folder sizes, so that the evaluation sharding pads the last shard with a repeated file."""
    folder = write_labelled_folder(tmp_path / "data", {"train": {"left": 4, "right": 3, "top": 4},
                                                       "val": {"left": 2, "right": 1, "top": 2}})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"}
    worker = str(ROOT / "tests" / "knn_ddp_worker.py")
    single = subprocess.run([sys.executable, worker, str(folder), str(tmp_path / "one.json")], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stdout[-3000:] + single.stderr[-3000:]
    with contextlib.ExitStack() as stack:
        busy = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))  # the default port, held
        with contextlib.suppress(OSError):
            busy.bind(("", 29500))
            busy.listen()
        two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                              worker, str(folder), str(tmp_path / "two.json")], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    one, both = (json.loads((tmp_path / name).read_text()) for name in ("one.json", "two.json"))
    assert (one["world_size"], both["world_size"]) == (1, 2)
    assert both["shard_sizes"] == [[6, 3], [6, 3]]  # 11 train and 5 val files: one padded copy in each folder
    assert (both["num_train"], both["num_val"]) == (one["num_train"], one["num_val"]) == (11, 5)
    assert both["numbers"] == one["numbers"]
    banks = [torch.load(tmp_path / f"{name}.pt") for name in ("one", "two")]
    for part in ("bank", "queries"):
        a, b = banks[0][part], banks[1][part]
        assert torch.equal(a["ids"], b["ids"]) and torch.equal(a["labels"], b["labels"])
        assert torch.allclose(a["cls"], b["cls"], atol=1e-5) and torch.allclose(a["avg"], b["avg"], atol=1e-5)


# -- the command line ----------------------------------------------------------------------------------------


def test_the_default_demo_run_monitors_the_digits():
    resolved = P.parse_pretrain([])
    knn = resolved.config.knn
    assert (knn.knn_data_path, knn.knn_every, knn.knn_k, knn.knn_max_train) == ("digits", 10, 20, 500)
    assert pathlib.Path(resolved.knn_root).name == "digits"
    assert all((pathlib.Path(resolved.knn_root) / split).is_dir() for split in ("train", "val"))
    assert resolved.demo_recipe.endswith("--knn_data_path digits --knn_max_train 500")
    assert P.parse_pretrain(["--knn_every", "0"]).knn_root is None  # the way to turn it off
    assert P.parse_pretrain(["--data_path", "synthetic"]).knn_root is None  # no demo, no folder: no monitor


def test_a_folder_without_train_or_val_is_refused_in_one_line_naming_the_flag(tmp_path, capsys):
    (tmp_path / "train" / "a").mkdir(parents=True)
    config = from_flat(P.PretrainConfig, {"data_path": "synthetic", "knn_data_path": str(tmp_path)})
    with pytest.raises(ValueError, match=r"^--knn_data_path .*: no val/ folder in it") as error:
        P.resolve_pretrain(config)
    assert isinstance(error.value, ConfigError) and "\n" not in str(error.value)
    with pytest.raises(SystemExit) as exit_:
        P.parse_pretrain(["--knn_data_path", str(tmp_path / "nowhere"), "--output_dir", str(tmp_path / "out")])
    assert exit_.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("python -m train.pretrain: error: --knn_data_path ") and "no such folder" in line
    assert "train/<class>/<image> and val/<class>/<image>" in line and "synthetic" not in line  # k-NN's advice
