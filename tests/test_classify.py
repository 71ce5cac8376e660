"""Fine-tuning and linear probing: classifier, layer decay, augmentation, LARS, end-to-end runs."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model import create_classifier, create_model, load_encoder
from test_official import fake_checkpoint
from train import classify
from train.checkpoint import LAST
from train.config.classify import DEMO_IMG_SIZE, parse_classify
from train.config.classify import build_parser as build_classify_parser
from train.data import build_loader, resolve_data_path
from train.data.augment import mixup_cutmix, rand_augment, random_erase, smooth_one_hot, soft_target_cross_entropy
from train.optim import LARS, layer_decay_groups

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["--img_size", "16", "--batch_size", "128", "--num_workers", "0", "--data_backend", "torch", "--epochs", "2",
         "--warmup_epochs", "0", "--log_every", "1000"]


# -- model --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pool", ["avg", "token"])
def test_classifier_shapes_and_heads(pool):
    clf = create_classifier("vit_tiny_patch8", num_classes=7, global_pool=pool, img_size=32)
    assert clf(torch.randn(3, 3, 32, 32)).shape == (3, 7)
    probe = create_classifier("vit_tiny_patch8", num_classes=7, global_pool=pool, linear_probe=True, img_size=32)
    assert isinstance(probe.head[0], torch.nn.BatchNorm1d) and not probe.head[0].affine


def test_official_checkpoint_loads_into_the_classifier():
    ckpt = fake_checkpoint("mae")  # the authors' MAE ViT-B keys, with the encoder's final norm
    clf = create_classifier("vit_base_patch16", num_classes=10, global_pool="token")
    unused = load_encoder(clf, ckpt)
    assert torch.equal(clf.blocks[11].mlp.fc2.weight, ckpt["model"]["blocks.11.mlp.fc2.weight"])
    assert torch.equal(clf.pos_embed, ckpt["model"]["pos_embed"])
    assert torch.equal(clf.norm.weight, ckpt["model"]["norm.weight"])
    assert "decoder_embed.weight" in unused and not any(k.startswith("blocks.") for k in unused)

    crossmae = fake_checkpoint("crossmae")  # no final encoder norm: avg pooling's fc_norm stays fresh
    clf = create_classifier("vit_base_patch16", num_classes=10)
    load_encoder(clf, crossmae)
    assert torch.equal(clf.patch_embed.proj.weight, crossmae["model"]["patch_embed.proj.weight"])
    assert torch.equal(clf.fc_norm.weight, torch.ones(768))


def test_our_pretraining_state_loads_and_bad_checkpoints_are_named():
    pre = create_model("crossmae_vit_tiny_patch8", img_size=32)
    clf = create_classifier("vit_tiny_patch8", num_classes=3, img_size=32)
    load_encoder(clf, {"model": pre.state_dict()})
    assert torch.equal(clf.blocks[0].attn.qkv.weight, pre.blocks[0].attn.qkv.weight)
    state = pre.state_dict()
    del state["blocks.3.norm1.bias"]
    before = clf.blocks[0].attn.qkv.weight.clone()
    with pytest.raises(KeyError, match=r"blocks\.3\.norm1\.bias"):
        load_encoder(create_classifier("vit_tiny_patch8", num_classes=3, img_size=32), {"model": state})
    with pytest.raises(ValueError, match="pos_embed"):
        load_encoder(create_classifier("vit_tiny_patch8", num_classes=3, img_size=64), {"model": pre.state_dict()})
    assert torch.equal(clf.blocks[0].attn.qkv.weight, before)


def test_layer_decay_groups_scale_by_depth_and_skip_decay_on_vectors():
    clf = create_classifier("vit_tiny_patch8", num_classes=5, img_size=32)
    groups = layer_decay_groups(clf, weight_decay=0.05, layer_decay=0.5)
    depth = clf.cfg.depth
    by_param = {id(p): g for g in groups for p in g["params"]}
    assert by_param[id(clf.patch_embed.proj.weight)]["lr_scale"] == 0.5 ** (depth + 1)
    assert by_param[id(clf.blocks[0].attn.qkv.weight)]["lr_scale"] == 0.5 ** depth
    assert by_param[id(clf.blocks[depth - 1].mlp.fc1.weight)]["lr_scale"] == 0.5
    assert by_param[id(clf.head.weight)]["lr_scale"] == 1.0
    assert by_param[id(clf.blocks[2].attn.qkv.weight)]["weight_decay"] == 0.05
    for vector in (clf.blocks[2].attn.qkv.bias, clf.fc_norm.weight, clf.cls_token, clf.pos_embed):
        assert by_param[id(vector)]["weight_decay"] == 0.0
    assert sum(len(g["params"]) for g in groups) == len(list(clf.parameters()))


# -- augmentation ---------------------------------------------------------------------------------------

def test_mixup_and_cutmix_targets_are_distributions_that_match_the_mix():
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    imgs = torch.stack([torch.full((3, 8, 8), float(k)) for k in range(6)])
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        mixed, targets = mixup_cutmix(imgs, labels, 10, g, smoothing=0.1)
        assert torch.allclose(targets.sum(1), torch.ones(6))
        assert (targets >= 0).all()
        # Image k (all pixels = k) is mixed with image 5 - k: the share lam of its own pixels in the mix
        # must be the share of its own label in the target (0.9 * lam + 0.01 after smoothing).
        lam = (targets[torch.arange(6), labels] - 0.01) / 0.9
        own, other = labels.float(), labels.flip(0).float()
        assert torch.allclose(mixed.mean(dim=(1, 2, 3)), lam * own + (1 - lam) * other, atol=1e-5), seed


def test_label_smoothing_and_soft_cross_entropy():
    t = smooth_one_hot(torch.tensor([2]), 4, 0.1)
    assert torch.allclose(t, torch.tensor([[0.025, 0.025, 0.925, 0.025]]))
    logits = torch.randn(5, 4)
    hard = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 3, 0]), 4).float()
    assert torch.allclose(soft_target_cross_entropy(logits, hard),
                          torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 3, 0])))


def test_rand_augment_and_random_erase_change_images_within_range():
    imgs = torch.randn(16, 3, 24, 24).clamp(-2, 2)
    g = torch.Generator().manual_seed(0)
    out = rand_augment(imgs, g)
    assert out.shape == imgs.shape and torch.isfinite(out).all()
    assert not torch.allclose(out, imgs)
    assert torch.allclose(rand_augment(imgs, g, prob=0.0), imgs, atol=1e-5)  # no op applied: identity
    erased = random_erase(imgs, g, prob=1.0)
    changed = (erased != imgs).flatten(1).any(1)
    assert changed.all()
    assert torch.equal(random_erase(imgs, g, prob=0.0), imgs)


def test_lars_scales_matrix_updates_by_the_trust_ratio():
    w = torch.nn.Parameter(torch.full((2, 2), 3.0))
    b = torch.nn.Parameter(torch.zeros(2))
    opt = LARS([w, b], lr=1.0, momentum=0.0, trust_coefficient=0.001)
    w.grad = torch.full((2, 2), 0.5)
    b.grad = torch.ones(2)
    opt.step()
    # ||w|| = 6, ||g|| = 1: the matrix moves by lr * 0.001 * 6 / 1 * g; the bias by lr * g.
    assert torch.allclose(w, torch.full((2, 2), 3.0 - 0.006 * 0.5))
    assert torch.allclose(b, -torch.ones(2))


# -- data and end to end ---------------------------------------------------------------------------------

def test_digits_demo_is_a_labelled_train_val_split():
    root = resolve_data_path("digits")
    train = build_loader(root / "train", batch_size=16, img_size=16, backend="torch", num_workers=0, with_labels=True)
    val = build_loader(root / "val", batch_size=16, img_size=16, train=False, backend="torch", num_workers=0,
                       with_labels=True)
    assert train.classes == val.classes == [str(d) for d in range(10)]
    assert train.num_images + val.num_images == 1797
    assert not set(map(str, train.files)) & set(map(str, val.files))
    _, labels = next(iter(train))
    assert labels.dtype == torch.long and 0 <= labels.min() and labels.max() < 10


@pytest.mark.parametrize("mode", ["finetune", "linprobe"])
def test_short_run_end_to_end_and_resume(mode, tmp_path):
    out = tmp_path / mode
    pre = tmp_path / "pre.pth"
    torch.save({"model": create_model("crossmae_vit_tiny_patch8", img_size=16).state_dict()}, pre)
    args = ["--output_dir", str(out), "--finetune", str(pre), *QUICK]
    assert classify.main(mode, args) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    for r in records:
        assert 0 <= r["val_top1"] <= r["val_top5"] <= 100 and math.isfinite(r["train_loss"])
        assert r["val_images"] == 359
    best = torch.load(out / "checkpoint-best.pth", weights_only=True)
    assert best["best_top1"] == max(r["val_top1"] for r in records)
    if mode == "linprobe":  # the encoder is frozen: only the head moved
        last = torch.load(out / LAST, weights_only=True)["model"]
        assert torch.equal(last["blocks.0.attn.qkv.weight"], torch.load(pre, weights_only=True)["model"][
            "blocks.0.attn.qkv.weight"])
    # More epochs with the same command resumes after epoch 2 instead of starting over.
    assert classify.main(mode, [*args, "--epochs", "3"]) == 0
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]


@pytest.mark.parametrize("mode", ["finetune", "linprobe"])
def test_help_shows_every_default_exactly_once(mode):
    text = build_classify_parser(mode).format_help()
    options = text[text.index("options:"):]
    blocks = re.split(r"\n(?=  -)", options)[1:]  # one block per flag, its help wrapped below it
    flags = [b.split()[0].rstrip(",") for b in blocks]
    assert "--epochs" in flags and "--seed" in flags and "--img_size" in flags
    for flag, block in zip(flags, blocks, strict=True):
        if flag != "-h":
            assert block.count("(default") == 1, block


def _parse(mode: str, argv: list[str]):
    """The model options a command line resolves to (sizes filled in from the checkpoint)."""
    return parse_classify(mode, argv).config.model


def test_image_and_patch_size_come_from_the_checkpoint(tmp_path, capsys):
    from train.trainer import config_dict

    pre = create_model("crossmae_vit_tiny_patch8", img_size=24, patch_size=4)
    ours = tmp_path / "ours.pth"  # a pre-training checkpoint: records its model config
    torch.save({"model": pre.state_dict(), "model_config": config_dict(pre.cfg)}, ours)
    bare = tmp_path / "bare.pth"  # the authors' / timm's files: only tensors, the size read off them
    torch.save(pre.state_dict(), bare)
    for path in (ours, bare):
        args = _parse("finetune", ["--finetune", str(path)])
        assert (args.img_size, args.patch_size) == (24, 4)
        args = _parse("linprobe", ["--finetune", str(path), "--img_size", "24"])  # agreeing values are fine
        assert (args.img_size, args.patch_size) == (24, 4)
    assert _parse("finetune", []).img_size == DEMO_IMG_SIZE  # no checkpoint: the demo's size
    for flags, message in ((["--img_size", "32"], "pre-trained with img_size 24"),
                           (["--patch_size", "8"], "pre-trained with patch_size 4")):
        with pytest.raises(SystemExit):
            _parse("finetune", ["--finetune", str(ours), *flags])
        assert message in capsys.readouterr().err
    clf = create_classifier("vit_tiny_patch8", 10, img_size=24, patch_size=4)
    load_encoder(clf, torch.load(ours, weights_only=True))  # the sizes found are the ones that load


def test_bad_flags_are_refused(tmp_path, capsys):
    for flags, message in [(["--data_path", str(tmp_path)], "train/"), (["--layer_decay", "0"], "--layer_decay"),
                           (["--finetune", str(tmp_path / "none.pth")], "none.pth"),
                           (["--model", "vit_gigantic_patch16"], "unknown model")]:
        with pytest.raises(SystemExit):
            classify.main("finetune", ["--output_dir", str(tmp_path / "o"), *flags])
        assert message in capsys.readouterr().err


def test_linear_probe_on_two_ddp_processes(tmp_path):
    """torchrun with gloo: the probe trains on disjoint shards and evaluates on all of val/ (padded to equal
    shares: 359 images -> 2 x 180)."""
    import os
    import subprocess
    import sys

    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                             "29541", "-m", "train.linprobe", "--output_dir", str(out), "--device", "cpu",
                             *QUICK, "--epochs", "1"],
                            capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["val_images"] == 360 and 0 <= record["val_top1"] <= 100


# -- resume equals a straight run ---------------------------------------------------------------------------

KILL_AFTER_EPOCH_1 = """
import os, signal
from train import monitor
_write = monitor.MetricsLog.write
def write(self, record):
    _write(self, record)
    if record.get("epoch") == 1:  # the epoch's checkpoint is written before its record
        os.kill(os.getpid(), signal.SIGKILL)
monitor.MetricsLog.write = write
"""
COMPARED = ("step", "epoch", "train_loss", "lr", "val_top1", "val_top5", "val_loss", "best_top1")


def classify_cli(mode: str, args: list[str], prelude: str = "") -> subprocess.CompletedProcess:
    """``python -m train.MODE ARGS`` as a child process of one thread (``prelude``: code it runs first, e.g. a
    patch)."""
    code = f"import sys\n{prelude}\nfrom train import classify\nsys.exit(classify.main({mode!r}, sys.argv[1:]))"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


def epoch_records(out) -> list[dict]:
    return [{k: r[k] for k in COMPARED} for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]


@pytest.mark.parametrize("mode", ["finetune", "linprobe"])
def test_a_run_killed_after_its_first_epoch_resumes_to_the_numbers_of_a_straight_run(mode, tmp_path):
    """SIGKILL right after epoch 1's checkpoint, then the same command: every epoch's metrics and the final
    weights equal those of an uninterrupted run, exactly (the CPU is deterministic). The recipes' defaults
    stay on: drop path and label smoothing (fine-tuning), the probe's BatchNorm statistics."""
    flags = [*QUICK, "--epochs", "2", "--warmup_epochs", "1", "--batch_size", "256", "--seed", "5"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    result = classify_cli(mode, ["--output_dir", str(straight), *flags])
    assert result.returncode == 0, result.stdout + result.stderr
    reference = epoch_records(straight)
    assert [r["epoch"] for r in reference] == [1, 2]

    result = classify_cli(mode, ["--output_dir", str(killed), *flags], prelude=KILL_AFTER_EPOCH_1)
    assert result.returncode == -signal.SIGKILL, result.stdout + result.stderr
    assert torch.load(killed / LAST, weights_only=True)["epoch"] == 1
    assert epoch_records(killed) == reference[:1]

    result = classify_cli(mode, ["--output_dir", str(killed), *flags])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "resumed from" in result.stdout + result.stderr
    assert epoch_records(killed) == reference
    want = torch.load(straight / LAST, weights_only=True)["model"]
    got = torch.load(killed / LAST, weights_only=True)["model"]
    assert want.keys() == got.keys()
    different = [name for name in want if not torch.equal(want[name], got[name])]
    assert not different, different
