"""The reference model: sizes, masking, exactness against SPEC.md, gradients, configuration errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import spec_reference
from kernels.reference import patchify_reference as patchify
from kernels.reference import unpatchify_reference
from model import FAMILIES, MAE, CrossMAE, build_model, create_model, family_of, get_config, list_models
from model.masking import MaskSplit, check_ratios, split_ids

TINY = "crossmae_vit_tiny_patch8"
TINY_MAE = "mae_vit_tiny_patch8"

# SPEC.md's table: (encoder, CrossMAE decoder with 12 blocks), millions of trainable parameters.
SPEC_PARAMS = {
    "small": (21.6, 10.5),
    "base": (85.6, 41.4),
    "large": (303.1, 44.5),
    "huge": (630.4, 47.6),
}
ENCODER_PREFIXES = ("patch_embed.", "cls_token", "blocks.")


def split_params(m: torch.nn.Module) -> tuple[int, int]:
    enc = sum(p.numel() for k, p in m.named_parameters() if k.startswith(ENCODER_PREFIXES))
    return enc, sum(p.numel() for p in m.parameters()) - enc


def randomize(m: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter (LayerNorm affine and biases included) a generic value, so a bug in a
    bias or a norm cannot hide behind MAE's zero/one initialisation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return m


# -- registry, sizes ------------------------------------------------------------------------------

def test_list_models_has_every_api_name():
    names = set(list_models())
    for family in ("crossmae", "mae"):
        for size in ("small", "base", "large"):
            assert f"{family}_vit_{size}_patch16" in names
        assert f"{family}_vit_huge_patch14" in names


@pytest.mark.parametrize("size", list(SPEC_PARAMS))
def test_crossmae_parameter_counts_match_spec(size):
    name = f"crossmae_vit_{size}_patch{14 if size == 'huge' else 16}"
    if size in ("small", "base"):
        m = create_model(name)
    else:
        with torch.device("meta"):
            m = create_model(name)
    enc, dec = split_params(m)
    assert round(enc / 1e6, 1) == SPEC_PARAMS[size][0]
    assert round(dec / 1e6, 1) == SPEC_PARAMS[size][1]


@pytest.mark.parametrize("size", list(SPEC_PARAMS))
def test_mae_parameter_counts(size):
    name = f"mae_vit_{size}_patch{14 if size == 'huge' else 16}"
    with torch.device("meta"):
        m = create_model(name)
    enc, dec = split_params(m)
    # Same encoder (plus its final LayerNorm, counted with the decoder side here).
    assert round(enc / 1e6, 1) == SPEC_PARAMS[size][0]
    cfg = m.cfg
    D, C = cfg.decoder_embed_dim, cfg.embed_dim
    block = 4 * D + (3 * D * D + 3 * D) + (D * D + D) + (4 * D * D + 4 * D) + (4 * D * D + D)
    expected = 2 * C + (C * D + D) + D + 8 * block + 2 * D + (D * cfg.patch_dim + cfg.patch_dim)
    assert cfg.decoder_depth == 8 and dec == expected


def test_position_tables_are_buffers_with_the_official_shapes():
    m = create_model("crossmae_vit_small_patch16")
    params = dict(m.named_parameters())
    buffers = dict(m.named_buffers())
    assert "pos_embed" not in params and "decoder_pos_embed" not in params
    assert buffers["pos_embed"].shape == (1, 197, 384)
    assert buffers["decoder_pos_embed"].shape == (1, 197, 256)
    assert torch.all(buffers["pos_embed"][0, 0] == 0)  # the cls row


@pytest.mark.parametrize("name", ["crossmae_vit_small_patch16", "mae_vit_small_patch16"])
def test_output_shapes_vit_small(name):
    m = create_model(name)
    out = m(torch.randn(2, 3, 224, 224))
    n_pred = 49 if name.startswith("crossmae") else 147
    assert out["loss"].shape == () and torch.isfinite(out.loss)
    assert out["pred"].shape == (2, n_pred, 768) and out["target"].shape == (2, n_pred, 768)
    assert out["pred_ids"].shape == (2, n_pred) and out["pred_ids"].dtype == torch.long
    assert out["visible_ids"].shape == (2, 49)


# -- masking ------------------------------------------------------------------------------------------

def test_split_sizes_for_vit_b():
    assert MaskSplit.from_ratios(196, 0.75, 0.25) == MaskSplit(196, 49, 98, 49)
    assert MaskSplit.from_ratios(196, 0.75, 0.75) == MaskSplit(196, 49, 0, 147)


# Every combination the CLI accepts on a 0.05 grid, at ViT-B/16 (196) and ViT-H/14 (256) patches.
RATIOS = [(m / 20, k / 20) for m in range(1, 20) for k in range(1, m + 1)]


@pytest.mark.parametrize("num_patches", [196, 256, 64])
def test_masking_splits_are_disjoint_and_exhaustive(num_patches):
    g = torch.Generator().manual_seed(1)
    noise = torch.rand(4, num_patches, generator=g)
    ids_shuffle = torch.argsort(noise, dim=1)
    for mask_ratio, kept in RATIOS:
        split = MaskSplit.from_ratios(num_patches, mask_ratio, kept)
        if split.len_keep < 1 or split.n_pred < 1:
            with pytest.raises(ValueError, match="mask_ratio"):
                check_ratios(num_patches, mask_ratio, kept)
            continue
        assert check_ratios(num_patches, mask_ratio, kept) == split
        assert split.len_keep == int(num_patches * (1 - mask_ratio))
        assert split.len_masked == int(num_patches * (mask_ratio - kept))
        visible, pred = split_ids(noise, split)
        assert visible.shape == (4, split.len_keep) and pred.shape == (4, split.n_pred)
        dropped = ids_shuffle[:, split.len_keep: split.len_keep + split.len_masked]
        everything = torch.cat([visible, dropped, pred], dim=1).sort(dim=1).values
        assert torch.equal(everything, torch.arange(num_patches).expand(4, -1))  # disjoint and exhaustive
        assert torch.equal(visible, ids_shuffle[:, : split.len_keep])  # the smallest noise is visible
        assert torch.equal(pred, ids_shuffle[:, num_patches - split.n_pred:].sort(dim=1).values)
        assert torch.all(pred[:, 1:] > pred[:, :-1])  # ascending patch order


def test_same_noise_same_split_and_loss():
    m = create_model(TINY)
    imgs, noise = torch.randn(2, 3, 64, 64), torch.rand(2, 64)
    a, b = m(imgs, noise), m(imgs, noise.clone())
    assert torch.equal(a.pred_ids, b.pred_ids) and torch.equal(a.visible_ids, b.visible_ids)
    assert torch.equal(a.loss, b.loss)
    c = m(imgs, torch.rand(2, 64))
    assert not torch.equal(a.pred_ids, c.pred_ids)


def test_patchify_layout_is_row_column_channel():
    imgs = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    patches = patchify(imgs, 2)
    assert patches.shape == (2, 4, 12)
    # Patch 1 = grid row 0, column 1; its element (row 1, col 0, channel 2) is pixel (2, 1, 2).
    assert patches[0, 1, (1 * 2 + 0) * 3 + 2] == imgs[0, 2, 1, 2]
    assert torch.equal(unpatchify_reference(patches, (4, 4), 2), imgs)


# -- exactness against the literal specification -----------------------------------------------------

EXACT_CASES = [
    (TINY, {}),  # IBA, gamma 0.25
    (TINY, {"kept_mask_ratio": 0.75}),  # IBA, gamma 0.75
    (TINY, {"inter_block": False}),  # the cross-attention row of Table 5
    (TINY, {"inter_block": False, "kept_mask_ratio": 0.75}),
    (TINY, {"use_input": False, "feature_layers": [0, 2, -1]}),
    (TINY, {"decoder_self_attn": True}),
    (TINY, {"norm_pix_loss": False}),
    (TINY_MAE, {}),
    (TINY_MAE, {"mask_ratio": 0.6, "norm_pix_loss": False}),
]


@pytest.mark.parametrize("name,overrides", EXACT_CASES)
def test_matches_spec_reference_in_fp32(name, overrides):
    m = randomize(create_model(name, **overrides))
    g = torch.Generator().manual_seed(3)
    imgs, noise = torch.randn(3, 3, 64, 64, generator=g), torch.rand(3, 64, generator=g)
    out = m(imgs, noise)
    forward = spec_reference.crossmae_forward if isinstance(m, CrossMAE) else spec_reference.mae_forward
    with torch.no_grad():
        loss, pred, target = forward(m.state_dict(), m.cfg, imgs, noise)
    assert (out.loss - loss).abs() / loss < 1e-5
    assert torch.allclose(out.pred, pred, rtol=1e-5, atol=1e-5 * pred.abs().max().item())
    assert torch.allclose(out.target, target, rtol=1e-5, atol=1e-6)


def test_matches_spec_reference_vit_small_at_224():
    m = randomize(create_model("crossmae_vit_small_patch16"), seed=5)
    g = torch.Generator().manual_seed(4)
    imgs, noise = torch.randn(2, 3, 224, 224, generator=g), torch.rand(2, 196, generator=g)
    out = m(imgs, noise)
    with torch.no_grad():
        loss, pred, _ = spec_reference.crossmae_forward(m.state_dict(), m.cfg, imgs, noise)
    assert (out.loss - loss).abs() / loss < 1e-5
    assert torch.allclose(out.pred, pred, rtol=1e-5, atol=1e-5 * pred.abs().max().item())


def test_norm_pix_target_is_per_patch_standardised():
    m = create_model(TINY)
    imgs = torch.randn(2, 3, 64, 64) * 3 + 1
    out = m(imgs)
    t = out.target
    assert torch.allclose(t.mean(-1), torch.zeros_like(t.mean(-1)), atol=1e-5)
    assert torch.allclose(t.var(-1), torch.ones_like(t.var(-1)), atol=1e-4)  # unbiased var, +1e-6 eps
    raw = patchify(imgs, 8).gather(1, out.pred_ids[..., None].expand(-1, -1, 192))
    expected = (raw - raw.mean(-1, keepdim=True)) / (raw.var(-1, keepdim=True) + 1e-6).sqrt()
    assert torch.allclose(t, expected, atol=1e-6)


# -- gradients --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,overrides", [(TINY, {}), (TINY, {"inter_block": False}),
                                            (TINY, {"decoder_self_attn": True}), (TINY_MAE, {})])
def test_gradients_reach_every_parameter_and_no_buffer(name, overrides):
    m = create_model(name, **overrides)
    m(torch.randn(2, 3, 64, 64)).loss.backward()
    for k, p in m.named_parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) > 0, f"no gradient for {k}"
    for k, b in m.named_buffers():
        assert not b.requires_grad and b.grad is None, k


# -- precision, compile, reconstruction ---------------------------------------------------------------

def test_bf16_autocast_runs_and_stays_close():
    m = create_model(TINY)
    imgs, noise = torch.randn(2, 3, 64, 64), torch.rand(2, 64)
    ref = m(imgs, noise).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(imgs, noise)
    out.loss.backward()
    assert out.loss.dtype == torch.float32
    assert (out.loss - ref).abs() / ref < 0.05


@pytest.mark.parametrize("name", [TINY, TINY_MAE])
def test_compiles_as_one_graph_without_host_sync(name):
    """fullgraph=True refuses graph breaks: a `.item()`, a boolean index or a data-dependent shape
    anywhere in forward would fail here."""
    torch._dynamo.reset()
    m = create_model(name, decoder_depth=1)
    imgs, noise = torch.randn(2, 3, 64, 64), torch.rand(2, 64)
    eager = m(imgs, noise)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    out = compiled(imgs, noise)
    out["loss"].backward()
    assert torch.allclose(out["loss"], eager.loss, rtol=1e-5)
    assert torch.equal(out["pred_ids"], eager.pred_ids)
    assert m.blocks[0].attn.qkv.weight.grad is not None


@pytest.mark.parametrize("name", [TINY, TINY_MAE])
def test_reconstruct_pastes_visible_patches_and_unnormalises(name, monkeypatch):
    m = create_model(name)
    imgs = torch.randn(2, 3, 64, 64)
    noise = torch.rand(2, 64)
    rec = m.reconstruct(imgs, noise)
    assert set(rec) == {"masked", "reconstruction", "pasted"}
    visible = m(imgs, noise).visible_ids
    patches = patchify(imgs, 8)
    vis_mask = torch.zeros(2, 64, dtype=torch.bool).scatter(1, visible, True)
    assert torch.equal(patchify(rec["pasted"], 8)[vis_mask], patches[vis_mask])
    assert torch.all(patchify(rec["masked"], 8)[~vis_mask] == 0)
    # A perfect norm-pix prediction must come back as the original pixels.
    patched = m._reconstruction(imgs, normalize(patches)[~vis_mask].view(2, -1, 192),
                                (~vis_mask).nonzero()[:, 1].view(2, -1), visible)
    assert torch.allclose(patched["pasted"], imgs, atol=1e-5)


def normalize(patches):
    from kernels.reference import normalize_patches_reference as normalize_patches

    return normalize_patches(patches)


# -- configuration errors ---------------------------------------------------------------------------

@pytest.mark.parametrize("overrides,argument", [
    ({"kept_mask_ratio": 0.8}, "kept_mask_ratio"),
    ({"kept_mask_ratio": 0.0}, "kept_mask_ratio"),
    ({"mask_ratio": 1.0}, "mask_ratio"),
    ({"mask_ratio": -0.1}, "mask_ratio"),
    ({"img_size": 60}, "img_size"),
    ({"decoder_num_heads": 3}, "decoder_embed_dim"),
    ({"decoder_depth": 0}, "decoder_depth"),
    ({"feature_layers": [6]}, "feature_layers"),
    ({"feature_layers": [1, -5]}, "feature_layers"),
    ({"use_input": False, "feature_layers": []}, "feature"),
    ({"backend": "cuda"}, "backend"),
    ({"not_an_argument": 1}, "not_an_argument"),
])
def test_bad_configuration_raises_value_error_naming_the_argument(overrides, argument):
    with pytest.raises(ValueError, match=argument):
        create_model(TINY, **overrides)


@pytest.mark.parametrize("overrides,argument", [
    ({"inter_block": True}, "inter_block"),
    ({"kept_mask_ratio": 0.25}, "kept_mask_ratio"),
    ({"decoder_self_attn": True}, "decoder_self_attn"),
])
def test_mae_rejects_crossmae_only_arguments(overrides, argument):
    with pytest.raises(ValueError, match=argument):
        create_model(TINY_MAE, **overrides)


def test_unknown_model_name_lists_the_choices():
    with pytest.raises(ValueError, match="crossmae_vit_base_patch16"):
        create_model("crossmae_vit_gigantic_patch16")


def test_bad_inputs_are_rejected_with_shapes():
    m = create_model(TINY)
    with pytest.raises(ValueError, match="imgs"):
        m(torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match="noise"):
        m(torch.randn(2, 3, 64, 64), torch.rand(2, 63))


def test_every_cli_ratio_builds_or_is_refused_by_name():
    for mask_ratio, kept in RATIOS:
        try:
            cfg = get_config(TINY, mask_ratio=mask_ratio, kept_mask_ratio=kept)
        except ValueError as e:
            assert "mask_ratio" in str(e)
            split = MaskSplit.from_ratios(64, mask_ratio, kept)
            assert split.len_keep < 1 or split.n_pred < 1
        else:
            assert cfg.split.n_pred >= 1 and cfg.split.len_keep >= 1


def test_mae_and_crossmae_types():
    assert isinstance(create_model(TINY), CrossMAE)
    assert isinstance(create_model(TINY_MAE), MAE)


# -- the family registry -------------------------------------------------------------------------------------

def test_every_model_is_built_from_its_family_entry():
    assert {family.name for family in FAMILIES.values()} == set(FAMILIES) == {"crossmae", "mae"}
    for name in list_models():
        family = family_of(name)
        cfg = get_config(name)
        assert family_of(cfg) is family and family_of(family.name) is family
        assert name.startswith(family.name + "_")
        assert cfg.inter_block == family.inter_block
        assert cfg.kept_mask_ratio == (family.kept_mask_ratio if family.partial_prediction else cfg.mask_ratio)
        if "tiny" not in name:
            assert cfg.decoder_depth == family.decoder_depth
    assert FAMILIES["crossmae"].decoder_depth == 12 and FAMILIES["mae"].decoder_depth == 8  # SPEC.md
    with torch.device("meta"):
        for name in (TINY, TINY_MAE):
            model = build_model(get_config(name, decoder_depth=1))
            assert type(model) is family_of(name).autoencoder and model.cfg.decoder_depth == 1


def test_partial_prediction_is_what_kept_mask_ratio_controls():
    """CrossMAE predicts kept_mask_ratio of all patches; MAE every masked one, whatever mask_ratio says."""
    assert family_of(TINY).partial_prediction and not family_of(TINY_MAE).partial_prediction
    assert get_config(TINY, kept_mask_ratio=0.5).split.n_pred == 32
    mae = get_config(TINY_MAE, mask_ratio=0.5)
    assert mae.kept_mask_ratio == 0.5 and mae.split.n_pred == 32


def test_unknown_family_and_foreign_configs_are_refused_by_name():
    with pytest.raises(ValueError, match="unknown model family 'vit'"):
        family_of("vit")
    with pytest.raises(ValueError, match="inter_block"):
        build_model(dataclasses.replace(get_config(TINY_MAE), inter_block=True))
    with pytest.raises(ValueError, match="kept_mask_ratio"):
        build_model(dataclasses.replace(get_config(TINY_MAE), kept_mask_ratio=0.25))


def test_sincos_table_matches_the_closed_form():
    """Row 1 + r*G + c: [sin(c w), cos(c w), sin(r w), cos(r w)], w_i = 10000^(-i/(dim/4)); row 0 zero."""
    import numpy as np

    from model.layers import sincos_pos_table

    dim, grid = 32, 5
    table = sincos_pos_table(dim, grid).numpy()
    w = 1.0 / 10000 ** (np.arange(dim // 4) / (dim // 4))
    for r, c in [(0, 0), (0, 3), (2, 1), (4, 4)]:
        row = np.concatenate([np.sin(c * w), np.cos(c * w), np.sin(r * w), np.cos(r * w)])
        assert np.allclose(table[1 + r * grid + c], row, atol=1e-7)
    assert not table[0].any()
