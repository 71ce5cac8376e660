"""Loading the authors' checkpoints: key names and shapes from shared/reference (copied to tests/data)."""

from __future__ import annotations

import argparse
import pathlib

import pytest
import torch

from model import create_model, load_official, read_checkpoint

DATA = pathlib.Path(__file__).parent / "data"


def official_shapes(family: str) -> dict[str, tuple[int, ...]]:
    rows = (DATA / f"official_{family}_vit_base_keys.tsv").read_text().splitlines()
    shapes = {}
    for row in rows:
        key, shape = row.split("\t")
        shapes[key] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    return shapes


def fake_checkpoint(family: str, seed: int = 0) -> dict:
    """A checkpoint with exactly the official keys and shapes and random values, wrapped the way
    the authors save it."""
    g = torch.Generator().manual_seed(seed)
    return {"model": {k: torch.randn(s, generator=g) for k, s in official_shapes(family).items()}, "epoch": 799}


@pytest.mark.parametrize("family", ["crossmae", "mae"])
def test_state_dict_has_exactly_the_official_keys_and_shapes(family):
    with torch.device("meta"):
        m = create_model(f"{family}_vit_base_patch16")
    ours = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert ours == official_shapes(family)


@pytest.mark.parametrize("family", ["crossmae", "mae"])
def test_load_official_round_trip(family, tmp_path):
    ckpt = fake_checkpoint(family)
    ckpt["args"] = argparse.Namespace(model=f"{family}_vit_base_patch16")  # as the authors' files carry
    path = tmp_path / "official.pth"
    torch.save(ckpt, path)
    m = create_model(f"{family}_vit_base_patch16")
    load_official(m, path)
    for k, v in m.state_dict().items():
        assert torch.equal(v, ckpt["model"][k]), k
    m2 = load_official(create_model(f"{family}_vit_base_patch16"), ckpt["model"])  # a bare state dict
    assert torch.equal(m2.decoder_pred.weight, ckpt["model"]["decoder_pred.weight"])
    out = m(torch.randn(1, 3, 224, 224))
    assert torch.isfinite(out.loss)


def untouched(model, before):
    return all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_missing_key_is_named_and_nothing_is_loaded():
    ckpt = fake_checkpoint("crossmae")
    del ckpt["model"]["wfm.linear.weight"]
    m = create_model("crossmae_vit_base_patch16")
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(KeyError, match=r"wfm\.linear\.weight"):
        load_official(m, ckpt)
    assert untouched(m, before)


def test_misshapen_key_is_named_with_both_shapes():
    ckpt = fake_checkpoint("crossmae")
    ckpt["model"]["decoder_blocks.3.cross_attn.kv.weight"] = torch.zeros(1024, 384)
    m = create_model("crossmae_vit_base_patch16")
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match=r"decoder_blocks\.3\.cross_attn\.kv\.weight: checkpoint \(1024, 384\)"):
        load_official(m, ckpt)
    assert untouched(m, before)


def test_wrong_configuration_is_reported_as_such():
    with pytest.raises(KeyError, match="configuration"):
        load_official(create_model("crossmae_vit_base_patch16", inter_block=False), fake_checkpoint("crossmae"))
    with pytest.raises(KeyError, match="unexpected"):
        load_official(create_model("crossmae_vit_base_patch16", decoder_depth=8), fake_checkpoint("crossmae"))


def test_truncated_and_missing_files_give_clear_errors(tmp_path):
    path = tmp_path / "ckpt.pth"
    torch.save(fake_checkpoint("mae"), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        read_checkpoint(path)
    with pytest.raises(FileNotFoundError, match=r"nope\.pth"):
        read_checkpoint(tmp_path / "nope.pth")


def test_pickled_code_is_refused_without_running(tmp_path):
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (pathlib.Path.touch, (marker,))

    path = tmp_path / "evil.pth"
    torch.save({"model": Evil()}, path)
    with pytest.raises(ValueError, match=r"evil\.pth"):
        read_checkpoint(path)
    assert not marker.exists()
