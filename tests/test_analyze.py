"""python -m train.analyze: attention against an explicit softmax written here, PSNR against a hand computation,
cost against the paper's figures, reconstruction grids of our checkpoints and of the authors' file layout, the
command line end to end and its one-line refusals."""

from __future__ import annotations

import argparse
import json
import math
import pathlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from model import create_model, get_config
from model.masking import split_ids
from train import pretrain
from train.analyze.__main__ import main as analyze
from train.analyze.attention import measure_attention
from train.analyze.cost import PAPER, PAPER_SPECS, measure_cost, paper_figures, paper_spec
from train.analyze.inputs import fixed_noise, load_image_files
from train.analyze.loading import load_model, read_model_file, resolve_spec
from train.analyze.psnr import measure_psnr, reconstruction_mse
from train.analyze.report import json_safe
from train.data import IMAGENET_MEAN, IMAGENET_STD

MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
# Tiny models: 16-pixel images in 4-pixel patches (16 patches, 4 visible at mask ratio 0.75), two decoder blocks.
TINY = dict(img_size=16, patch_size=4, decoder_depth=2, backend="torch")


def write_images(folder: pathlib.Path, count: int, seed: int = 0) -> list[pathlib.Path]:
    """``count`` small random PNGs of assorted shapes."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        path = folder / f"img{i}.png"
        Image.fromarray((rng.random((36 + 5 * i, 44, 3)) * 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def normalised(pixels: torch.Tensor) -> torch.Tensor:
    return (pixels - MEAN) / STD


def ln(x: torch.Tensor, norm: torch.nn.LayerNorm) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], norm.weight.double(), norm.bias.double(), norm.eps)


def linear(x: torch.Tensor, layer: torch.nn.Linear, rows: slice = slice(None)) -> torch.Tensor:
    return x @ layer.weight[rows].double().T + layer.bias[rows].double()


def explicit_softmax(q: torch.Tensor, k: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, Nq, D), (B, Nk, D) -> (B, H, Nq, Nk): exp(s - max) / sum, s = q.k / sqrt(d), head by head."""
    B, Nq, D = q.shape
    d = D // heads
    q, k = q.view(B, Nq, heads, d).transpose(1, 2), k.view(B, -1, heads, d).transpose(1, 2)
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(d)
    e = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
    return e / e.sum(dim=-1, keepdim=True)


def attend(probs: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    B, Nk, D = v.shape
    out = probs @ v.view(B, Nk, heads, D // heads).transpose(1, 2)
    return out.transpose(1, 2).reshape(B, -1, D)


def mlp(x: torch.Tensor, blk) -> torch.Tensor:
    return linear(F.gelu(linear(ln(x, blk.norm2), blk.mlp.fc1)), blk.mlp.fc2)


# -- attention --------------------------------------------------------------------------------------------------

def test_mae_attention_matches_an_explicit_softmax():
    model = create_model("mae_vit_tiny_patch8", **TINY).eval()
    cfg, B = model.cfg, 3
    imgs, noise = torch.randn(B, 3, 16, 16), torch.rand(B, cfg.num_patches)
    result = measure_attention(model, [(imgs, noise)])

    # The decoder, written out here in float64: cls, then the patches in patch order (mask tokens where hidden).
    keep = torch.argsort(noise, dim=1)[:, :cfg.split.len_keep]
    with torch.no_grad():
        _, latent = model.encode(imgs, keep, (cfg.depth - 1,), final_norm=model.norm)
        x = linear(latent.double(), model.decoder_embed)
        D, L = x.shape[-1], cfg.num_patches
        seq = model.mask_token.double().expand(B, 1 + L, D).clone()
        seq[:, 0] = x[:, 0]
        visible = torch.zeros(B, L, dtype=torch.bool)
        for b in range(B):
            for r, patch in enumerate(keep[b].tolist()):
                seq[b, 1 + patch] = x[b, 1 + r]
                visible[b, patch] = True
        seq = seq + model.decoder_pos_embed.double()
        for j, blk in enumerate(model.decoder_blocks):
            y = ln(seq, blk.norm1)
            q, k, v = (linear(y, blk.attn.qkv, slice(i * D, (i + 1) * D)) for i in range(3))
            probs = explicit_softmax(q, k, blk.attn.num_heads)
            expected = torch.zeros(3, dtype=torch.float64)  # visible, mask, cls
            for b in range(B):
                rows = probs[b][:, 1 + torch.nonzero(~visible[b]).flatten()]  # the mask-token queries (H, n, 1 + L)
                expected += torch.stack([rows[..., 1:][..., visible[b]].sum(-1).mean(), rows[..., 1:][..., ~visible[b]]
                                         .sum(-1).mean(), rows[..., 0].mean()]) / B
            got = result["blocks"][j]["mass"]
            assert [got["visible"], got["mask"], got["cls"]] == pytest.approx(expected.tolist(), abs=1e-5)
            assert sum(got.values()) == pytest.approx(1.0, abs=1e-6)
            seq = seq + linear(attend(probs, v, blk.attn.num_heads), blk.attn.proj)
            seq = seq + mlp(seq, blk)

    counts = {"visible": 4, "mask": 12, "cls": 1}
    assert result["keys"] == counts and result["queries_per_image"] == 12 and result["images"] == B
    for block in result["blocks"]:
        for t, n in counts.items():
            assert block["per_key"][t] == pytest.approx(block["mass"][t] / n)
            assert block["vs_uniform"][t] == pytest.approx(block["mass"][t] / n * 17)
    assert sum(result["total_over_blocks"]["mass"].values()) == pytest.approx(cfg.decoder_depth, abs=1e-5)


def test_crossmae_attention_matches_an_explicit_softmax_and_reports_the_mix():
    model = create_model("crossmae_vit_tiny_patch8", **TINY).eval()
    cfg, B = model.cfg, 2
    imgs, noise = torch.randn(B, 3, 16, 16), torch.rand(B, cfg.num_patches)
    result = measure_attention(model, [(imgs, noise)])

    visible_ids, pred_ids = split_ids(noise, cfg.split)
    W = model.wfm.linear.weight.double()
    with torch.no_grad():
        features, _ = model.encode(imgs, visible_ids, (-1, *range(cfg.depth)))
        x = (model.decoder_pos_embed[0, 1:][pred_ids] + model.mask_token).double()
        D = x.shape[-1]
        for j, blk in enumerate(model.decoder_blocks):
            mixed = ln(sum(W[j, i] * f.double() for i, f in enumerate(features)), model.dec_norms[j])
            k, v = linear(mixed, blk.cross_attn.kv, slice(0, D)), linear(mixed, blk.cross_attn.kv, slice(D, 2 * D))
            probs = explicit_softmax(linear(ln(x, blk.norm1), blk.cross_attn.q), k, blk.cross_attn.num_heads)
            cls = probs[..., 0].mean().item()
            got = result["blocks"][j]["mass"]
            assert got["cls"] == pytest.approx(cls, abs=1e-5)
            assert got["patches"] == pytest.approx(1 - cls, abs=1e-5)
            x = x + linear(attend(probs, v, blk.cross_attn.num_heads), blk.cross_attn.proj)
            x = x + mlp(x, blk)

    assert result["keys"] == {"cls": 1, "patches": 4} and result["queries_per_image"] == cfg.split.n_pred
    mix = result["feature_mix"]
    assert mix["candidates"] == ["input"] + [f"block {i}" for i in range(cfg.depth)]
    assert np.array(mix["W"]).shape == (cfg.decoder_depth, cfg.depth + 1)
    assert torch.equal(torch.tensor(mix["W"]), model.wfm.linear.weight.detach())
    assert mix["strongest"] == [mix["candidates"][i] for i in W.abs().argmax(dim=1).tolist()]
    plain = create_model("crossmae_vit_tiny_patch8", inter_block=False, **TINY).eval()
    assert measure_attention(plain, [(imgs, noise)])["feature_mix"] is None


# -- psnr -------------------------------------------------------------------------------------------------------

class StubModel:
    """Predictions chosen by the test: 8-pixel images, 4-pixel patches (4 patches, 2 visible at mask ratio 0.5)."""

    def __init__(self, predicted_pixels: torch.Tensor):
        self.cfg = get_config("mae_vit_tiny_patch8", img_size=8, patch_size=4, mask_ratio=0.5)
        self.predicted = normalised(predicted_pixels)

    def reconstruct(self, imgs, noise):
        return {"reconstruction": self.predicted}


def test_psnr_by_hand_on_two_images_one_of_them_perfect():
    truth = torch.full((2, 3, 8, 8), 0.5)
    truth[1] = torch.rand(3, 8, 8)
    # Patch n covers rows 4 * (n // 2), columns 4 * (n % 2). Noise [0.1, 0.9, 0.2, 0.8]: visible 0, 2; hidden 1, 3.
    noise = torch.tensor([[0.1, 0.9, 0.2, 0.8], [0.3, 0.7, 0.1, 0.9]])
    predicted = truth.clone()
    predicted[0, :, :4, 4:] += 0.1  # patch 1: off by 0.1 everywhere
    predicted[0, :, 4:, 4:] = 2.0  # patch 3: beyond the range, clipped to 1, off by 0.5
    predicted[:, :, :, :4] = -3.0  # the visible patches are not scored
    mse0 = (0.1**2 + 0.5**2) / 2  # image 1 is exact on its hidden patches 1 and 3
    result = measure_psnr(StubModel(predicted), [(normalised(truth), noise, torch.tensor([0, 1]))])

    assert result["per_image"][0]["mse"] == pytest.approx(mse0, rel=1e-5)
    assert result["per_image"][0]["psnr_db"] == pytest.approx(10 * math.log10(1 / mse0), abs=1e-4)
    assert result["per_image"][1]["mse"] == 0 and result["per_image"][1]["psnr_db"] == math.inf
    assert result["perfect_images"] == 1 and result["images"] == 2 and result["hidden_patches_per_image"] == 2
    assert result["mean_psnr_db"] == pytest.approx(10 * math.log10(1 / mse0), abs=1e-4)  # the perfect image left out
    assert result["pooled_psnr_db"] == pytest.approx(10 * math.log10(2 / mse0), abs=1e-4)
    assert result["min_psnr_db"] == result["max_psnr_db"] == result["mean_psnr_db"]
    assert json_safe(result)["per_image"][1]["psnr_db"] == "inf"


def test_crossmae_psnr_scores_every_hidden_patch_unnormalised_by_the_true_statistics():
    model = create_model("crossmae_vit_tiny_patch8", kept_mask_ratio=0.25, **TINY).eval()
    imgs, noise = torch.randn(2, 3, 16, 16), torch.rand(2, model.cfg.num_patches)
    got = reconstruction_mse(model, imgs, noise)

    # The same weights predicting every hidden patch through the training forward pass (gamma = mask ratio).
    everything = create_model("crossmae_vit_tiny_patch8", kept_mask_ratio=0.75, **TINY).eval()
    everything.load_state_dict(model.state_dict())
    with torch.no_grad():
        out = everything(imgs, noise)
    assert out.pred.shape[1] == 12
    p = 4
    true_norm = imgs.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 4, 5, 1).reshape(2, 16, p * p * 3)
    true_norm = torch.gather(true_norm, 1, out.pred_ids[..., None].expand(-1, -1, p * p * 3))
    mean, var = true_norm.mean(-1, keepdim=True), true_norm.var(-1, keepdim=True)
    pred_norm = out.pred * (var + 1e-6) ** 0.5 + mean
    channel = torch.arange(p * p * 3) % 3
    std, avg = torch.tensor(IMAGENET_STD)[channel], torch.tensor(IMAGENET_MEAN)[channel]
    expected = ((pred_norm * std + avg).clamp(0, 1) - (true_norm * std + avg).clamp(0, 1)).square().mean((1, 2))
    assert got.tolist() == pytest.approx(expected.tolist(), rel=1e-5)


def test_masks_depend_on_the_seed_and_the_image_only():
    a = fixed_noise(3, [0, 1, 2, 3], 16, "cpu")
    assert torch.equal(a[2:], fixed_noise(3, [2, 3], 16, "cpu"))
    assert not torch.equal(a, fixed_noise(4, [0, 1, 2, 3], 16, "cpu"))


# -- cost -------------------------------------------------------------------------------------------------------

def test_cost_reproduces_the_papers_base_figures():
    rows = measure_cost([paper_spec(*key) for key in PAPER_SPECS])["rows"]
    for key, row in zip(PAPER_SPECS, rows, strict=True):
        assert round(row["decoder_gmacs"], 2) == PAPER[key]["decoder_gmacs"], key
        assert round(row["encoder_gmacs"], 2) == 4.32
        assert round(row["encoder_params_m"], 1) == 85.6
        assert row["matches_paper"]
    assert [round(r["decoder_params_m"], 1) for r in rows[1:]] == [41.4, 41.4]
    assert rows[0]["decoder_gmacs"] > rows[2]["decoder_gmacs"] > rows[1]["decoder_gmacs"]
    other = resolve_spec(None, "crossmae_vit_base_patch16", kept_mask_ratio=0.75, decoder_depth=8)
    assert paper_figures(other) is None and "paper" not in measure_cost([other])["rows"][0]
    assert paper_figures(resolve_spec(None, "crossmae_vit_base_patch16", kept_mask_ratio=0.75)) is not None


# -- which model a file holds -------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides", [dict(inter_block=True), dict(inter_block=False, decoder_self_attn=True)])
def test_released_crossmae_configuration_is_read_off_the_tensors_and_args(overrides):
    model = create_model("crossmae_vit_tiny_patch8", img_size=32, decoder_depth=3, backend="torch", **overrides)
    args = argparse.Namespace(model="mae_vit_base_patch16", mask_ratio=0.75, kept_mask_ratio=0.75, norm_pix_loss=False)
    spec = resolve_spec({"model": model.state_dict(), "args": args})
    cfg = spec.cfg
    assert spec.name == "crossmae_vit_tiny_patch8" and spec.source.startswith("released")
    assert (cfg.img_size, cfg.decoder_depth, cfg.kept_mask_ratio, cfg.norm_pix_loss) == (32, 3, 0.75, False)
    assert (cfg.inter_block, cfg.decoder_self_attn) == (overrides["inter_block"], overrides.get("decoder_self_attn",
                                                                                                 False))
    flagged = resolve_spec({"model": model.state_dict()}, kept_mask_ratio=0.5, mask_ratio=0.5)
    assert (flagged.cfg.kept_mask_ratio, flagged.cfg.mask_ratio, flagged.cfg.norm_pix_loss) == (0.5, 0.5, True)
    assert any("norm_pix_loss" in note for note in flagged.notes)


# -- reconstruct, command line ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[pathlib.Path, pathlib.Path]:
    """(a train.pretrain checkpoint of the tiny CrossMAE on 16-pixel crops after one step, its image folder)."""
    root = tmp_path_factory.mktemp("analyze")
    images = root / "images"
    write_images(images, 6)
    out = root / "run"
    status = pretrain.main(["--output_dir", str(out), "--data_path", str(images), "--img_size", "16", "--patch_size",
                            "4", "--batch_size", "4", "--num_workers", "0", "--data_backend", "torch", "--max_steps",
                            "1", "--lr", "1e-3", "--warmup_epochs", "0", "--epochs", "1", "--recon_every", "0",
                            "--device", "cpu"])
    assert status == 0
    return out / "checkpoint-last.pth", images


def written(folder: pathlib.Path, name: str) -> dict:
    for suffix in (".json", ".md"):
        assert (folder / f"{name}{suffix}").stat().st_size > 0
    return json.loads((folder / f"{name}.json").read_text())


def png_size(path: pathlib.Path) -> tuple[int, int]:
    with Image.open(path) as im:
        return im.size


def test_reconstruct_a_pretrain_checkpoint_and_an_mae_file_in_the_authors_layout(trained, tmp_path):
    checkpoint, images = trained
    assert analyze(["reconstruct", str(checkpoint), "--data_path", str(images), "--max_images", "3",
                    "--output_dir", str(tmp_path / "ours")]) == 0
    data = written(tmp_path / "ours", "reconstruct")
    assert [r["index"] for r in data["rows"]] == [0, 1, 2] and data["model"]["step"] == 1
    assert data["model"]["model"] == "crossmae_vit_tiny_patch8"
    assert png_size(tmp_path / "ours" / "reconstruction.png")[0] >= 4 * 128  # four columns of enlarged crops

    # A tiny MAE saved the way the authors save theirs: {"model": state dict, "epoch", "args": Namespace}.
    mae = create_model("mae_vit_tiny_patch8", img_size=32, backend="torch").eval()
    released = tmp_path / "mae_release.pth"
    # Their args name the model by their own registry (here wrongly): the size is read off the tensors.
    torch.save({"model": mae.state_dict(), "epoch": 799,
                "args": argparse.Namespace(model="mae_vit_large_patch16", mask_ratio=0.75, norm_pix_loss=True)},
               released)
    spec = resolve_spec(read_model_file(released))
    assert (spec.name, spec.cfg.img_size, spec.cfg.decoder_depth) == ("mae_vit_tiny_patch8", 32, 4)
    loaded = load_model(spec, read_model_file(released), "cpu")
    assert all(torch.equal(v, mae.state_dict()[k]) for k, v in loaded.state_dict().items())

    files = [str(p) for p in write_images(tmp_path / "given", 2, seed=1)]
    assert analyze(["reconstruct", str(released), "--images", *files, "--seed", "5",
                    "--output_dir", str(tmp_path / "theirs")]) == 0
    data = written(tmp_path / "theirs", "reconstruct")
    assert [r["file"] for r in data["rows"]] == files
    expected = reconstruction_mse(mae, load_image_files(files, 32, "cpu"), fixed_noise(5, [0, 1], 16, "cpu"))
    assert [r["mse"] for r in data["rows"]] == pytest.approx(expected.tolist(), rel=1e-6)
    assert (tmp_path / "theirs" / "reconstruction.png").is_file()


def test_cli_attention_psnr_and_cost_end_to_end(trained, tmp_path):
    checkpoint, images = trained
    common = ["--data_path", str(images), "--max_images", "5", "--device", "cpu"]
    assert analyze(["attention", str(checkpoint), *common, "--output_dir", str(tmp_path)]) == 0
    data = written(tmp_path, "attention")
    assert data["family"] == "crossmae" and data["images"] == 5 and len(data["blocks"]) == 4
    assert {"attention.png", "feature_mix.png"} <= {p.name for p in tmp_path.iterdir()}

    assert analyze(["psnr", str(checkpoint), *common, "--batch_size", "2", "--output_dir", str(tmp_path / "b2")]) == 0
    assert analyze(["psnr", str(checkpoint), *common, "--batch_size", "5", "--output_dir", str(tmp_path / "b5")]) == 0
    by2, by5 = written(tmp_path / "b2", "psnr"), written(tmp_path / "b5", "psnr")
    assert [r["index"] for r in by2["per_image"]] == list(range(5))
    assert [r["mse"] for r in by2["per_image"]] == pytest.approx([r["mse"] for r in by5["per_image"]], rel=1e-5)
    assert (tmp_path / "b2" / "psnr.png").is_file()

    assert analyze(["cost", "--model", "crossmae_vit_base_patch16", "--kept_mask_ratio", "0.75",
                    "--output_dir", str(tmp_path / "cost")]) == 0
    row = written(tmp_path / "cost", "cost")["rows"][0]
    assert round(row["decoder_gmacs"], 2) == 5.25 and row["matches_paper"]
    assert (tmp_path / "cost" / "cost.png").is_file()


@pytest.mark.parametrize("case", ["missing", "truncated", "wrong model", "empty folder"])
def test_bad_input_is_one_line_and_exit_2(case, trained, tmp_path, capsys):
    checkpoint, images = trained
    target, data, extra = str(checkpoint), str(images), []
    if case == "missing":
        target = str(tmp_path / "nowhere.pth")
    elif case == "truncated":
        target = str(tmp_path / "cut.pth")
        pathlib.Path(target).write_bytes(checkpoint.read_bytes()[:4000])
    elif case == "wrong model":
        extra = ["--decoder_depth", "3"]
    else:
        (tmp_path / "empty").mkdir()
        data = str(tmp_path / "empty")
    status = analyze(["psnr", target, "--data_path", data, "--output_dir", str(tmp_path / "out"), *extra])
    captured = capsys.readouterr()
    errors = [line for line in (captured.out + captured.err).splitlines() if " ERROR " in line]
    assert status == 2 and len(errors) == 1, captured
    assert "Traceback" not in captured.out + captured.err
    assert {"missing": "not found", "truncated": "truncated", "wrong model": "does not match",
            "empty folder": "no valid image"}[case] in errors[0]
