"""Encoders out to timm and timm ViT weights in (model/timm_format.py, train/export.py).

Checked against facts produced by real timm 1.0.29 (shared/reference/timm, copied to tests/data): the key
tables of its ViT state dicts and a small golden model with timm's own outputs. Where timm imports (the GPU
image), one more test loads an export in timm itself; it skips elsewhere.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from model import MAE, CrossMAE, create_classifier, create_model, load_encoder_weights, load_timm, read_weights, to_timm
from model.classifier import ViTClassifier
from model.config import ModelConfig
from train import classify, distributed, export
from train.checkpoint import LAST
from train.checkpointing import CheckpointManager
from train.config.classify import parse_classify

ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA = pathlib.Path(__file__).parent / "data"
SIZES = {"small": "vit_small_patch16_224", "base": "vit_base_patch16_224", "large": "vit_large_patch16_224",
         "huge": "vit_huge_patch14_224"}


def timm_table(name: str) -> list[tuple[str, tuple[int, ...], str]]:
    rows = []
    for line in (DATA / f"timm_{name}_keys.tsv").read_text().splitlines():
        key, shape, dtype = line.split("\t")
        rows.append((key, tuple(int(s) for s in shape.split("x")), dtype))
    return rows


def golden(pool: str) -> dict:
    return torch.load(DATA / f"timm_golden_tiny_{pool}.pt", weights_only=True)


def golden_config(family: str) -> ModelConfig:
    """Our configuration of the golden timm model (32 px, patch 8, width 64, depth 2, 4 heads)."""
    return ModelConfig(family=family, img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4,
                       decoder_embed_dim=32, decoder_num_heads=4, decoder_depth=1,
                       inter_block=family == "crossmae", kept_mask_ratio=0.25 if family == "crossmae" else 0.75)


def run_module(module: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


QUICK_PRETRAIN = ["--max_steps", "1", "--batch_size", "8", "--num_workers", "0", "--data_backend", "torch",
                  "--epochs", "1", "--warmup_epochs", "0", "--recon_every", "0", "--log_every", "1", "--knn_every", "0"]


@pytest.fixture(scope="module")
def default_run(tmp_path_factory) -> pathlib.Path:
    """checkpoint-last.pth of the default pre-training run (the tiny CrossMAE at 64 px), one step long."""
    out = tmp_path_factory.mktemp("default_run")
    result = run_module("train.pretrain", "--output_dir", str(out), *QUICK_PRETRAIN)
    assert result.returncode == 0, result.stdout + result.stderr
    return out / LAST


def encoder_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if k.startswith(("cls_token", "pos_embed", "patch_embed.",
                                                                         "blocks."))}


def untouched(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# -- export: timm's exact key tables ------------------------------------------------------------------

@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("variant", ["token", "avgpool"])
def test_exported_keys_shapes_and_dtypes_equal_timms_tables(size, variant):
    # The class-token layout needs the encoder's final norm (MAE has it); CrossMAE with inter-block mixing has
    # none and exports as the average-pooled layout.
    family = "mae" if variant == "token" else "crossmae"
    with torch.device("meta"):
        model = create_model(f"{family}_vit_{size}_patch{14 if size == 'huge' else 16}")
    state, meta = to_timm(model.state_dict())
    name = SIZES[size]
    table = [row for row in timm_table(name if variant == "token" else f"{name}.avgpool")
             if not row[0].startswith("head.")]
    ours = [(k, tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in state.items()]
    assert ours == table  # same keys, same order, same shapes and dtypes
    assert meta["timm_model"] == name
    assert meta["timm_kwargs"] == ({"num_classes": 0} if variant == "token" else {"num_classes": 0,
                                                                                  "global_pool": "avg"})
    assert meta["num_heads"] == model.cfg.num_heads
    if variant == "avgpool":
        assert "identity" in meta["final_norm"] and "inter-block" in meta["final_norm"]
        assert torch.equal(state["fc_norm.weight"], torch.ones(model.cfg.embed_dim))
        assert torch.equal(state["fc_norm.bias"], torch.zeros(model.cfg.embed_dim))


def test_token_layout_is_refused_for_an_encoder_without_final_norm():
    with pytest.raises(ValueError, match="--pool avg"):
        to_timm(create_model("crossmae_vit_tiny_patch8", img_size=32).state_dict(), pool="token")


# -- import: timm's golden outputs --------------------------------------------------------------------

@pytest.mark.parametrize("pool", ["token", "avg"])
def test_golden_timm_weights_reproduce_timms_outputs_in_our_classifier(pool):
    g = golden(pool)
    assert g["config"]["global_pool"] == pool and g["config"]["norm_eps"] == 1e-6
    clf = ViTClassifier(golden_config("crossmae"), num_classes=10, global_pool=pool).eval()
    assert load_timm(clf, g["state_dict"], with_head=True) == []  # every tensor used
    with torch.no_grad():
        tokens, pre, logits = clf.forward_tokens(g["input"]), clf.forward_features(g["input"]), clf(g["input"])
    torch.testing.assert_close(tokens, g["forward_features"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pre, g["pre_logits"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, g["logits"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_golden_timm_weights_reproduce_timms_features_in_our_pretraining_encoder(pool):
    """timm's pos_embed has a cls row that timm adds to the cls token; the encoder's table keeps a zero row,
    so the import folds the row into cls_token. With every patch visible the encoder then computes timm's
    forward_features (through MAE's final norm for the class-token layout)."""
    g = golden(pool)
    family = "mae" if pool == "token" else "crossmae"
    model = (MAE if family == "mae" else CrossMAE)(golden_config(family)).eval()
    unused = load_encoder_weights(model, g["state_dict"])
    assert unused == (["fc_norm.bias", "fc_norm.weight"] if pool == "avg" else []) + ["head.bias", "head.weight"]
    assert torch.equal(model.pos_embed[0, 0], torch.zeros(64))
    x = g["input"]
    all_patches = torch.arange(16).expand(x.shape[0], -1)
    with torch.no_grad():
        _, out = model.encode(x, all_patches, (1,), final_norm=model.norm if pool == "token" else None)
    torch.testing.assert_close(out, g["forward_features"], atol=1e-5, rtol=1e-5)


# -- round trips ----------------------------------------------------------------------------------------

def test_default_run_exports_reimports_and_matches_bit_exactly(default_run, tmp_path):
    ckpt = torch.load(default_run, weights_only=True)
    result = run_module("train.export", str(default_run), "--to", "timm", "--out", str(tmp_path / "timm"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "load it in timm with" in result.stdout and "fc_norm: identity" in result.stdout
    meta = json.loads((tmp_path / "timm" / export.META).read_text())
    cfg = ckpt["model_config"]  # the default run's demo recipe picks its own image and patch size
    size, patch = cfg["img_size"], cfg["patch_size"]
    assert meta["timm_model"] == "vit_tiny_patch16_224"
    assert meta["timm_kwargs"] == {"patch_size": patch, "depth": 6, "img_size": size, "num_classes": 0,
                                   "global_pool": "avg"}
    assert meta["img_size"] == size and any(f"{size} px, not 224" in n for n in meta["notes"])
    assert meta["mean"] == [0.485, 0.456, 0.406] and meta["std"] == [0.229, 0.224, 0.225]
    assert meta["source"]["kind"] == "train.pretrain checkpoint" and meta["source"]["step"] == 1
    assert meta["source"]["model"] == "crossmae_vit_tiny_patch8" and len(meta["source"]["sha256"]) == 64
    assert "checkpoint_path=" in meta["create_model"] and "global_pool='avg'" in meta["create_model"]
    weights = tmp_path / "timm" / export.WEIGHTS
    state = read_weights(weights)
    for k, v in ckpt["model"].items():
        if k in state:
            assert torch.equal(state[k], v), k
    assert len(state) == 4 + 6 * 12 + 2

    # Back into a pre-training model and into a classifier: every encoder tensor bit-exact.
    pre = create_model("crossmae_vit_tiny_patch8", img_size=size, patch_size=patch)
    assert load_encoder_weights(pre, weights) == ["fc_norm.bias", "fc_norm.weight"]
    clf = create_classifier("vit_tiny_patch8", num_classes=5, img_size=size, patch_size=patch)
    assert load_encoder_weights(clf, weights) == []
    for model in (pre, clf):
        for k, v in encoder_state(model).items():
            assert torch.equal(v, ckpt["model"][k]), k
    assert torch.equal(clf.fc_norm.weight, torch.ones(192))
    # And out again: the same file content.
    again, _ = to_timm(pre.state_dict(), num_heads=cfg["num_heads"])  # a bare state dict records no head count
    assert again.keys() == state.keys() and all(torch.equal(again[k], state[k]) for k in state if "fc_norm" not in k)


@pytest.mark.parametrize("family", ["crossmae", "mae"])
def test_vit_base_shaped_release_exports_reimports_and_matches(family, tmp_path):
    """A checkpoint saved the way the authors release theirs ({"model": state dict}, no config: the head count
    comes from the registry), ViT-B/16 at 224."""
    source = create_model(f"{family}_vit_base_patch16", decoder_depth=1)
    release = {"model": source.state_dict(), "epoch": 799,
               "args": argparse.Namespace(model=f"{family}_vit_base_patch16")}  # as the authors' files carry
    torch.save(release, tmp_path / "release.pth")
    pool = "token" if family == "mae" else "auto"
    meta = export.export_timm(tmp_path / "release.pth", tmp_path / "out", pool=pool)
    assert meta["timm_model"] == "vit_base_patch16_224" and meta["num_heads"] == 12
    assert meta["source"]["kind"].startswith("released") and meta["source"]["epoch"] == 799
    assert meta["source"]["model"] == f"{family}_vit_base_patch16"
    assert ("identity" in meta["final_norm"]) == (family == "crossmae")
    weights = tmp_path / "out" / export.WEIGHTS
    fresh = create_model(f"{family}_vit_base_patch16", decoder_depth=1)
    load_encoder_weights(fresh, weights)
    for k, v in encoder_state(source).items():
        assert torch.equal(fresh.state_dict()[k], v), k
    if family == "mae":
        assert torch.equal(fresh.norm.weight, source.norm.weight)  # the pre-trained final norm crossed too
    state = read_weights(weights)
    assert len(state) == 152 - 2  # timm's ViT-B table minus the head
    with pytest.raises(FileExistsError, match="--overwrite"):
        export.export_timm(tmp_path / "release.pth", tmp_path / "out")


def test_other_image_size_exports_the_sincos_table_for_that_size(tmp_path):
    source = create_model("crossmae_vit_tiny_patch8", img_size=32)
    torch.save({"model": source.state_dict()}, tmp_path / "pre.pth")
    meta = export.export_timm(tmp_path / "pre.pth", tmp_path / "out", img_size=48)
    assert meta["img_size"] == 48 and meta["timm_kwargs"]["img_size"] == 48
    assert any("remade" in n and "32 px" in n for n in meta["notes"])
    clf = create_classifier("vit_tiny_patch8", num_classes=3, img_size=48)
    load_encoder_weights(clf, tmp_path / "out" / export.WEIGHTS)
    assert torch.equal(clf.pos_embed, create_model("crossmae_vit_tiny_patch8", img_size=48).pos_embed)
    # A table that is not the fixed one cannot be remade.
    state = source.state_dict()
    state["pos_embed"] = state["pos_embed"] + 0.5
    with pytest.raises(ValueError, match="not the fixed sin-cos"):
        to_timm(state, img_size=48)


# -- refusals --------------------------------------------------------------------------------------------

def timm_tiny(pool: str = "avg") -> dict[str, torch.Tensor]:
    return dict(golden(pool)["state_dict"])


@pytest.mark.parametrize("target", ["classifier", "pretraining"])
def test_missing_unexpected_and_misshapen_keys_are_named_and_nothing_is_loaded(target, tmp_path):
    model = (ViTClassifier(golden_config("crossmae"), 10) if target == "classifier"
             else create_model("crossmae_vit_tiny_patch8", img_size=32, patch_size=8, depth=2, embed_dim=64,
                               num_heads=4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    missing = timm_tiny()
    del missing["blocks.1.mlp.fc2.bias"]
    with pytest.raises(KeyError, match=r"missing \[blocks\.1\.mlp\.fc2\.bias\]"):
        load_timm(model, missing)
    layer_scale = timm_tiny() | {"blocks.0.ls1.gamma": torch.ones(64)}  # a timm ViT with an extra we lack
    with pytest.raises(KeyError, match=r"unexpected \[blocks\.0\.ls1\.gamma\]"):
        load_timm(model, layer_scale)
    misshapen = timm_tiny() | {"pos_embed": torch.zeros(1, 50, 64)}
    with pytest.raises(ValueError, match=r"pos_embed: checkpoint \(1, 50, 64\) vs model \(1, 17, 64\)"):
        load_timm(model, misshapen)
    # The same through a file, in both formats.
    from safetensors.torch import save_file

    save_file(missing, tmp_path / "missing.safetensors")
    torch.save({"state_dict": misshapen}, tmp_path / "misshapen.pth")  # timm's training-script wrapping
    with pytest.raises(KeyError, match=r"fc2\.bias"):
        load_encoder_weights(model, tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="pos_embed"):
        load_encoder_weights(model, tmp_path / "misshapen.pth")
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "missing.safetensors").read_bytes()[:200])
    with pytest.raises(ValueError, match=r"cut\.safetensors"):
        load_encoder_weights(model, tmp_path / "cut.safetensors")
    assert untouched(model, before)


def test_export_cli_refuses_token_layout_without_norm_and_names_the_fix(default_run, tmp_path, capsys):
    assert export.main([str(default_run), "--to", "timm", "--out", str(tmp_path), "--pool", "token"]) == 2
    assert "--pool avg" in capsys.readouterr().out
    assert not (tmp_path / export.WEIGHTS).exists()



def test_export_under_a_file_is_refused_in_one_line(default_run, tmp_path, capsys):
    # Issue 19, item 7: --out FILE/sub ended in a NotADirectoryError traceback.
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert export.main([str(default_run), "--out", str(blocker / "sub")]) == 2
    text = capsys.readouterr().out
    assert f"--out {blocker / 'sub'}: cannot write there" in text and "Traceback" not in text
    assert blocker.read_text() == "not a folder"

# -- the training commands take timm weights --------------------------------------------------------------

def test_pretrain_init_encoder_takes_an_export(default_run, tmp_path):
    assert export.main([str(default_run), "--out", str(tmp_path / "timm")]) == 0
    weights = tmp_path / "timm" / export.WEIGHTS
    out = tmp_path / "pre"
    result = run_module("train.pretrain", "--output_dir", str(out), "--init_encoder", str(weights), *QUICK_PRETRAIN,
                        "--lr", "0")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "encoder initialised from" in result.stdout
    # lr 0 (AdamW then moves nothing, decay included) and a fixed table: the encoder is still the exported one.
    after = torch.load(out / LAST, weights_only=True)["model"]
    state = read_weights(weights)
    assert torch.equal(after["blocks.5.mlp.fc2.weight"], state["blocks.5.mlp.fc2.weight"])
    assert torch.equal(after["pos_embed"], state["pos_embed"])
    bad = run_module("train.pretrain", "--output_dir", str(tmp_path / "bad"), "--init_encoder",
                     str(DATA / "timm_golden_tiny_avg.pt"), *QUICK_PRETRAIN)  # timm's layout, another size
    assert bad.returncode != 0 and "--init_encoder" in bad.stdout and "missing [blocks.2" in bad.stdout


@pytest.mark.parametrize("mode", ["finetune", "linprobe"])
def test_finetune_and_linprobe_take_an_export(default_run, tmp_path, mode):
    # At 16 px, as the other classify tests run: the export's fixed sin-cos table remade for that size.
    assert export.main([str(default_run), "--out", str(tmp_path / "timm16"), "--img_size", "16"]) == 0
    weights = tmp_path / "timm16" / export.WEIGHTS
    resolved = parse_classify(mode, ["--output_dir", str(tmp_path / mode), "--finetune", str(weights), "--img_size",
                                     "16", "--num_workers", "0", "--data_backend", "torch", "--global_pool",
                                     "token" if mode == "linprobe" else "avg"])
    checkpoints = CheckpointManager(resolved.config.run.output_dir, classify.read_classify_checkpoint(mode))
    run = classify.ClassifyRun(resolved, distributed.init_distributed("cpu"), checkpoints)
    state = read_weights(weights)
    assert torch.equal(run.model.blocks[5].attn.qkv.weight, state["blocks.5.attn.qkv.weight"])
    assert torch.equal(run.model.pos_embed, state["pos_embed"])
    if mode == "finetune":
        assert torch.equal(run.model.fc_norm.weight, state["fc_norm.weight"])


# -- real timm, where it imports ---------------------------------------------------------------------------

def import_timm():
    try:
        import timm
    except Exception as e:  # on the CPU machine its torchvision fails to load beside the CPU torch
        pytest.skip(f"timm does not import here ({type(e).__name__}); runs where it does (the GPU image)")
    return timm


def test_an_export_loads_in_real_timm_with_the_recorded_line_and_matches(default_run, tmp_path):
    timm = import_timm()
    for name, ckpt, pool in [("tiny", default_run, "auto"), ("mae_s", None, "token")]:
        if ckpt is None:
            ckpt = tmp_path / "mae_s.pth"
            torch.save({"model": create_model("mae_vit_small_patch16", decoder_depth=1).state_dict()}, ckpt)
        meta = export.export_timm(ckpt, tmp_path / name, pool=pool)
        theirs = eval(meta["create_model"], {"timm": timm}).eval()  # the exact line the README shows
        assert tuple(theirs.pretrained_cfg["mean"]) == tuple(meta["mean"])
        ours = create_classifier(meta["timm_model"].removesuffix("_224") if name != "tiny" else "vit_tiny_patch8",
                                 num_classes=2, global_pool=meta["global_pool"], img_size=meta["img_size"],
                                 backend="torch").eval()
        load_encoder_weights(ours, tmp_path / name / export.WEIGHTS)
        x = torch.randn(2, 3, meta["img_size"], meta["img_size"], generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            torch.testing.assert_close(theirs.forward_features(x), ours.forward_tokens(x), atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(theirs.forward_head(theirs.forward_features(x), pre_logits=True),
                                       ours.forward_features(x), atol=1e-4, rtol=1e-4)
