"""The config layer (train/config/): policies, the generated command lines, recipes, derivations, the resume
comparison and the plain-data round trip. No model is built and nothing trains: every test is quick."""

from __future__ import annotations

import argparse
import dataclasses
import json
import pickle
import re
from pathlib import Path

import pytest
import torch

from model import classifier_names, list_models
from train.config import (
    CONFIG_FILE,
    ConfigError,
    Policy,
    compare,
    concern_fields,
    flat_settings,
    from_dict,
    from_flat,
    load_recipe,
    option,
    option_specs,
    saved_settings,
    to_dict,
)
from train.config import classify as C
from train.config import pretrain as P

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "configs").rglob("*.yaml"))
CONFIG_CLASSES = [P.PretrainConfig, C.ClassifyConfig, C.FinetuneConfig, C.LinprobeConfig]
MODELS = f"one of: {', '.join(list_models())}"
ENCODERS = f"encoder: one of {', '.join(classifier_names())}"

# Every flag of the three commands as they were before the config layer (plus --config): default, type,
# choices, kind, help. The generated parsers must keep them (the user's interface); --backend's help is the
# one deliberate change (it claimed triton on CUDA while the code defaulted to torch); --backend auto (issue 17) is
# the default of all three commands since, with the help text below.
BACKEND_HELP = ("model ops: torch (the PyTorch references), triton (the fused Triton kernels; on CUDA the run first "
                "checks their numbers and refuses if one fails) or auto (on a CUDA GPU: the fused kernels that pass "
                "that check and only if faster, the verdict cached per card and setting; elsewhere torch)")
FLAGS = {
    "pretrain": {
        "--model": ('crossmae_vit_tiny_patch8', None, None, "store",
                 MODELS),
        "--img_size": (None, 'int', None, "store",
                 "input size (default: the model's; 48 for the demo, see --data_path)"),
        "--patch_size": (None, 'int', None, "store",
                 "patch size (default: the model's; 4 for the demo, see --data_path)"),
        "--mask_ratio": (0.75, 'float', None, "store",
                 'fraction of the patches the encoder does not see'),
        "--kept_mask_ratio": (0.25, 'float', None, "store",
                 "CrossMAE's prediction ratio gamma (fraction of all patches); ignored for MAE"),
        "--decoder_depth": (None, 'int', None, "store",
                 "decoder blocks (default: the model's: 12 CrossMAE, 8 MAE)"),
        "--norm_pix_loss": (True, None, None, "negatable",
                 'the loss compares each patch normalised by its own mean and std'),
        "--backend": ('auto', None, ('torch', 'triton', 'auto'), "store",
                 BACKEND_HELP),
        "--batch_size": (64, 'int', None, "store",
                 'per process, per accumulation step'),
        "--accum_iter": (1, 'int', None, "store",
                 'micro-batches per optimizer step'),
        "--epochs": (40, 'int', None, "store",
                 "passes over the data (the lr schedule's length)"),
        "--warmup_epochs": (4, 'float', None, "store",
                 'linear lr warmup, then a half-cosine decay'),
        "--blr": (None, 'float', None, "store",
                 "base lr: lr = (gamma/p) * blr * eff_batch / 256 (default: 0.00015, the paper's)"),
        "--lr": (None, 'float', None, "store",
                 'absolute lr, overrides --blr (default: 0.001 for --data_path demo without --blr, else from --blr)'),
        "--min_lr": (0.0, 'float', None, "store",
                 'the lr the cosine decays to'),
        "--weight_decay": (0.05, 'float', None, "store",
                 'AdamW weight decay (not on norms and biases)'),
        "--precision": (None, None, ('bf16', 'fp16', 'fp32'), "store",
                 'autocast dtype (default: bf16 on GPU, fp32 on CPU)'),
        "--compile": (False, None, None, "store_true",
                 'torch.compile the model'),
        "--max_steps": (None, 'int', None, "store",
                 'stop after this many optimizer steps in all (default: none, the whole schedule)'),
        "--data_path": ('demo', None, None, "store",
                 "a folder of images, read recursively (flat or in sub-folders), 'demo' (the embedded photos; "
                 'unless given, the default model then runs at --img_size 48 --patch_size 4 and --lr 0.001), or '
                 "'synthetic'"),
        "--data_backend": ('auto', None, ('auto', 'dali', 'torch', 'synthetic'), "store",
                 'auto: dali if it imports, else torch; synthetic: random images, no files'),
        "--synthetic_images": (4096, 'int', None, "store",
                 'images per epoch of --data_backend synthetic (sets steps per epoch, hence the lr schedule)'),
        "--num_workers": (2, 'int', None, "store",
                 'DALI threads or DataLoader worker processes'),
        "--scan_threads": (None, 'int', None, "store",
                 'threads of the first scan of the image folder (default: every core this process may use)'),
        "--output_dir": ('output/pretrain', None, None, "store",
                 'checkpoints, metrics, pictures'),
        "--resume": (None, None, None, "store",
                 'checkpoint to resume from (default: <output_dir>/checkpoint-last.pth)'),
        "--init_encoder": (None, None, None, "store",
                 'start the encoder from these weights: timm ViT (.safetensors or .pth, e.g. from train.export) '
                 'or a pre-training checkpoint; ignored when the run resumes (default: none)'),
        "--seed": (0, 'int', None, "store",
                 'data order, crops, masks and initialisation'),
        "--device": (None, None, ('cuda', 'cpu'), "store",
                 'training device (default: cuda if available)'),
        "--save_every": (500, 'int', None, "store",
                 'write checkpoint-last every N steps (and per epoch)'),
        "--keep_every": (50, 'int', None, "store",
                 'keep checkpoint-<epoch>.pth every N epochs'),
        "--log_every": (10, 'int', None, "store",
                 'log every N steps (with the summary lines, the only host syncs)'),
        "--recon_every": (10, 'int', None, "store",
                 'reconstruction grid and loss curve every N epochs (and at the end)'),
        "--tensorboard": (False, None, None, "store_true",
                 'also write TensorBoard events'),
        "--config": (None, None, None, "store",
                 "a YAML recipe (configs/pretrain/*.yaml): flag names without the dashes as keys; flags given here "
                 "override it (default: none)"),
        # The k-NN monitor (issue 18).
        "--knn_data_path": (None, None, None, "store",
                 "a labelled folder <root>/train/<class>/* and <root>/val/<class>/* (or 'digits', the embedded "
                 "handwritten digits): the frozen encoder's features (cls token, average of the patch tokens) of the "
                 "whole image are scored by a weighted k-NN from train to val, top-1/top-5 in the summary lines and "
                 "metrics.jsonl (default: 'digits' with --data_path demo, else none: no monitor)"),
        "--knn_every": (10, 'int', None, "store",
                 "k-NN evaluation every N epochs, at the run's end and at step 0 of a fresh run (the random "
                 "encoder); 0: no monitor"),
        "--knn_k": (20, 'int', None, "store",
                 'neighbours that vote in the k-NN monitor (weights exp(cosine / 0.07))'),
        "--knn_max_train": (None, 'int', None, "store",
                 "at most N images of the k-NN monitor's train/ folder: the first N of a permutation drawn from "
                 "--seed, in file order, for quick checks (default: all)"),
    },
}
CLASSIFY_FLAGS = {  # the rows train.finetune and train.linprobe share
    "--model": ('vit_tiny_patch8', None, None, "store",
             ENCODERS),
    "--finetune": (None, None, None, "store",
             "pre-trained weights: a pre-training checkpoint (ours or the authors') or timm ViT weights "
             '(.safetensors / .pth, e.g. from train.export) (default: none, random initialisation)'),
    "--img_size": (None, 'int', None, "store",
             "input size (default: the --finetune checkpoint's, else 32)"),
    "--patch_size": (None, 'int', None, "store",
             "patch size (default: the --finetune checkpoint's, else the model's)"),
    "--backend": ('auto', None, ('torch', 'triton', 'auto'), "store",
             BACKEND_HELP),
    "--data_path": ('digits', None, None, "store",
             "folder with train/ and val/ image folders, or 'digits'"),
    "--data_backend": ('auto', None, ('auto', 'dali', 'torch', 'synthetic'), "store",
             'image loader'),
    "--num_workers": (2, 'int', None, "store",
             'loader workers (DALI threads)'),
    "--scan_threads": (None, 'int', None, "store",
             'threads of the first scan of the image folder (default: every core this process may use)'),
    "--accum_iter": (1, 'int', None, "store",
             'gradient accumulation steps'),
    "--epochs": (10, 'int', None, "store",
             'training epochs'),
    "--warmup_epochs": (1, 'float', None, "store",
             'linear lr warmup, in epochs'),
    "--lr": (None, 'float', None, "store",
             'absolute lr (default: from --blr)'),
    "--global_pool": ('avg', None, ('avg', 'token'), "store",
             'features: average of the patch tokens + fc_norm, or the cls token after the final norm'),
    "--precision": (None, None, ('bf16', 'fp32'), "store",
             'autocast dtype (default: bf16 on GPU, fp32 on CPU)'),
    "--device": (None, None, ('cuda', 'cpu'), "store",
             'training device (default: cuda if visible, else cpu)'),
    "--seed": (0, 'int', None, "store",
             'seed of the initialisation, data order and augmentation'),
    "--log_every": (20, 'int', None, "store",
             'log the running loss every N steps'),
    "--config": (None, None, None, "store",
             "a YAML recipe (configs/finetune/*.yaml, configs/linprobe/*.yaml): flag names without the dashes "
             "as keys; flags given here override it (default: none)"),
}
FLAGS["finetune"] = {**CLASSIFY_FLAGS, **{
        "--batch_size": (64, 'int', None, "store",
                 'images per process and step'),
        "--blr": (0.004, 'float', None, "store",
                 'base lr: lr = blr * eff_batch / 256'),
        "--min_lr": (1e-06, 'float', None, "store",
                 'lr at the end of the cosine schedule'),
        "--weight_decay": (0.05, 'float', None, "store",
                 'weight decay'),
        "--layer_decay": (0.75, 'float', None, "store",
                 'layer-wise lr decay: the head trains at lr, block i of d at lr * layer_decay^(d - i), the '
                 'embeddings at lr * layer_decay^(d + 1)'),
        "--drop_path": (0.1, 'float', None, "store",
                 'stochastic depth rate of the last block'),
        "--mixup": (0.0, 'float', None, "store",
                 'mixup alpha (0 = off)'),
        "--cutmix": (0.0, 'float', None, "store",
                 'CutMix alpha (0 = off)'),
        "--smoothing": (0.1, 'float', None, "store",
                 'label smoothing'),
        "--reprob": (0.0, 'float', None, "store",
                 'random erasing probability'),
        "--randaug": (False, None, None, "negatable",
                 'RandAugment, 2 ops at magnitude 9 (std 0.5)'),
        "--output_dir": ('output/finetune', None, None, "store",
                 'checkpoints and metrics.jsonl; a run resumes from the checkpoint found here'),
}}
FLAGS["linprobe"] = {**CLASSIFY_FLAGS, **{
        "--batch_size": (128, 'int', None, "store",
                 'images per process and step'),
        "--blr": (0.2, 'float', None, "store",
                 'base lr: lr = blr * eff_batch / 256'),
        "--min_lr": (0.0, 'float', None, "store",
                 'lr at the end of the cosine schedule'),
        "--weight_decay": (0.0, 'float', None, "store",
                 'weight decay'),
        "--optimizer": ('sgd', None, ('lars', 'sgd'), "store",
                 "LARS (MAE's ImageNet probe) or SGD with momentum 0.9"),
        "--output_dir": ('output/linprobe', None, None, "store",
                 'checkpoints and metrics.jsonl; a run resumes from the checkpoint found here'),
}}

# A checkpoint of today's format stores ``args``: the namespace after check_args wrote derived values into it
# (lr and the size for the demo, blr, data_backend "synthetic", demo_recipe, data_root), and the model config.
OLD_PRETRAIN_ARGS = {
    "model": "crossmae_vit_tiny_patch8", "img_size": 48, "patch_size": 4, "mask_ratio": 0.75,
    "kept_mask_ratio": 0.25, "decoder_depth": None, "norm_pix_loss": True, "backend": None, "batch_size": 64,
    "accum_iter": 1, "epochs": 40, "warmup_epochs": 4, "blr": 0.00015, "lr": 0.001, "min_lr": 0.0,
    "weight_decay": 0.05, "precision": None, "compile": False, "max_steps": None, "data_path": "demo",
    "data_backend": "auto", "synthetic_images": 4096, "num_workers": 2, "output_dir": "output/pretrain",
    "resume": None, "init_encoder": None, "seed": 0, "device": None, "save_every": 500, "keep_every": 50,
    "log_every": 10, "recon_every": 10, "tensorboard": False, "demo_recipe": "--lr 0.001 --img_size 48 --patch_size 4",
    "data_root": "/home/user/.cache/crossmae/demo",
}
OLD_PRETRAIN_MODEL_CONFIG = {
    "family": "crossmae", "img_size": 48, "patch_size": 4, "in_chans": 3, "embed_dim": 192, "depth": 6,
    "num_heads": 3, "decoder_embed_dim": 128, "decoder_depth": 4, "decoder_num_heads": 4, "mlp_ratio": 4.0,
    "mask_ratio": 0.75, "kept_mask_ratio": 0.25, "inter_block": True, "use_input": True, "feature_layers": None,
    "decoder_self_attn": False, "norm_pix_loss": True, "backend": "torch",
}
# python -m train.pretrain --model mae_vit_tiny_patch8 --data_path synthetic --lr 1e-3, as it was saved.
OLD_MAE_ARGS = {**OLD_PRETRAIN_ARGS, "model": "mae_vit_tiny_patch8", "img_size": None, "patch_size": None,
                "data_path": "synthetic", "data_backend": "synthetic", "demo_recipe": "", "data_root": None}
OLD_MAE_MODEL_CONFIG = {**OLD_PRETRAIN_MODEL_CONFIG, "family": "mae", "img_size": 64, "patch_size": 8,
                        "kept_mask_ratio": 0.75, "inter_block": False}
OLD_CLASSIFY_ARGS = {
    "finetune": {
        "model": "vit_tiny_patch8", "finetune": None, "img_size": 32, "patch_size": None, "data_path": "digits",
        "data_backend": "auto", "num_workers": 2, "batch_size": 64, "accum_iter": 1, "epochs": 10,
        "warmup_epochs": 1, "blr": 0.004, "lr": None, "min_lr": 1e-06, "weight_decay": 0.05, "global_pool": "avg",
        "layer_decay": 0.75, "drop_path": 0.1, "mixup": 0.0, "cutmix": 0.0, "smoothing": 0.1, "reprob": 0.0,
        "randaug": False, "precision": None, "device": None, "output_dir": "output/finetune", "seed": 0,
        "log_every": 20, "mode": "finetune", "data_root": "/home/user/.cache/crossmae/digits",
    },
    "linprobe": {  # no fine-tuning-only flags: the probe's parser did not have them
        "model": "vit_tiny_patch8", "finetune": None, "img_size": 32, "patch_size": None, "data_path": "digits",
        "data_backend": "auto", "num_workers": 2, "batch_size": 128, "accum_iter": 1, "epochs": 10,
        "warmup_epochs": 1, "blr": 0.2, "lr": None, "min_lr": 0.0, "weight_decay": 0.0, "global_pool": "avg",
        "optimizer": "sgd", "precision": None, "device": None, "output_dir": "output/linprobe", "seed": 0,
        "log_every": 20, "mode": "linprobe", "data_root": "/home/user/.cache/crossmae/digits",
    },
}

KINDS = {argparse._StoreAction: "store", argparse._StoreTrueAction: "store_true",
         argparse.BooleanOptionalAction: "negatable"}
PARSERS = {"pretrain": P.build_parser, "finetune": lambda: C.build_parser("finetune"),
           "linprobe": lambda: C.build_parser("linprobe")}


def flag_table(parser: argparse.ArgumentParser) -> dict[str, tuple]:
    return {a.option_strings[0]: (repr(a.default), getattr(a.type, "__name__", None),
                                  tuple(a.choices) if a.choices else None, KINDS[type(a)], a.help)
            for a in parser._actions if a.option_strings and a.dest != "help"}


def synthetic(**flags) -> P.PretrainConfig:
    return from_flat(P.PretrainConfig, {"data_path": "synthetic", **flags})


def write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def refusal(capsys, call, *args) -> str:
    """Run a parse that must refuse; returns its one error line."""
    with pytest.raises(SystemExit) as exc:
        call(*args)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert ": error: " in err[-1], err
    return err[-1]


# -- policies and the generated command lines ------------------------------------------------------------


@pytest.mark.parametrize("cls", CONFIG_CLASSES, ids=lambda cls: cls.__name__)
def test_every_option_has_a_policy_and_its_own_flag(cls):
    assert [f.name for f in dataclasses.fields(cls)] == [f.name for f in concern_fields(cls)]  # only concerns
    names = []
    for concern in concern_fields(cls):
        for f in dataclasses.fields(concern.default_factory):
            meta = f.metadata.get("option")
            assert meta is not None and isinstance(meta.policy, Policy), f"{concern.name}.{f.name} has no policy"
            names.append(f.name)
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
    assert [s.name for s in option_specs(cls)] == names


def test_an_option_cannot_be_declared_without_a_policy():
    with pytest.raises(TypeError, match="Policy"):
        option(1, "help", "match")
    with pytest.raises(TypeError, match="relax"):
        option(1, "help", Policy.WARN, relax=lambda saved, current: "never")

    @dataclasses.dataclass(frozen=True)
    class Loose:
        seed: int = 0  # a plain field: no help, no policy

    @dataclasses.dataclass(frozen=True)
    class Config:
        run: Loose = dataclasses.field(default_factory=Loose)

    with pytest.raises(TypeError, match=r"Loose\.seed is not declared with option"):
        option_specs(Config)


def _by_policy(cls) -> dict[Policy, set[str]]:
    groups: dict[Policy, set[str]] = {policy: set() for policy in Policy}
    for spec in option_specs(cls):
        groups[spec.meta.policy].add(spec.name)
    return groups


def test_pretraining_policies():
    groups = _by_policy(P.PretrainConfig)
    assert groups[Policy.MATCH] == {"model", "img_size", "patch_size", "mask_ratio", "kept_mask_ratio",
                                    "decoder_depth", "norm_pix_loss", "batch_size", "accum_iter", "seed", "blr",
                                    "lr", "min_lr", "weight_decay", "warmup_epochs", "epochs"}
    assert groups[Policy.FREE] == {"resume", "max_steps", "init_encoder", "config", "scan_threads", "knn_data_path",
                                   "knn_every", "knn_k", "knn_max_train"}  # the k-NN monitor never changes training
    assert "backend" in groups[Policy.WARN] and "output_dir" in groups[Policy.WARN]


def test_classify_policies():
    groups = _by_policy(C.ClassifyConfig)
    assert groups[Policy.MATCH] == {"model", "img_size", "patch_size", "global_pool", "batch_size", "accum_iter",
                                    "seed", "warmup_epochs", "blr", "lr", "min_lr", "weight_decay", "layer_decay",
                                    "optimizer", "drop_path", "mixup", "cutmix", "smoothing", "reprob", "randaug"}
    # --epochs may grow on resume: re-running a finished run with more epochs continues it (test_classify.py).
    assert groups[Policy.FREE] == {"finetune", "config", "scan_threads"}
    assert {"epochs", "output_dir", "num_workers", "log_every"} <= groups[Policy.WARN]


@pytest.mark.parametrize("command", FLAGS)
def test_generated_command_line_keeps_every_flag(command):
    expected = {flag: (repr(default), *rest) for flag, (default, *rest) in FLAGS[command].items()}
    assert flag_table(PARSERS[command]()) == expected


@pytest.mark.parametrize("command", FLAGS)
def test_help_ends_every_flag_with_its_default_once(command, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    text = PARSERS[command]().format_help()
    blocks = re.split(r"\n(?=  -)", text[text.index("options:"):])[1:]
    assert len(blocks) == len(FLAGS[command]) + 1  # and -h
    for block in blocks:
        assert block.lstrip().startswith("-h") or block.count("(default") == 1, block


def test_each_command_offers_only_its_own_options():
    for mode, foreign in (("linprobe", ["--mixup", "0.8"]), ("linprobe", ["--layer_decay", "0.65"]),
                          ("finetune", ["--optimizer", "lars"])):
        with pytest.raises(SystemExit):
            C.build_parser(mode).parse_args(foreign)
    assert C.LinprobeConfig().optim.layer_decay == 1.0 and C.FinetuneConfig().optim.optimizer == "adamw"


# -- recipe files --------------------------------------------------------------------------------------------


def test_recipe_values_sit_between_the_defaults_and_the_flags(tmp_path):
    recipe = write(tmp_path, "# a comment\nbatch_size: 32\nepochs: 7\nwarmup_epochs: 2\nlr: 1e-3\ncompile: true\n"
                             "norm_pix_loss: false\ndata_path: synthetic\n")
    out = str(tmp_path / "out")
    resolved = P.parse_pretrain(["--config", str(recipe), "--batch_size", "16", "--output_dir", out])
    o = resolved.config.optim
    assert o.batch_size == 16  # the flag
    assert (o.epochs, o.warmup_epochs, o.lr, o.compile) == (7, 2.0, 1e-3, True)  # the file (1e-3: YAML 1.1 text)
    assert isinstance(o.lr, float) and isinstance(o.warmup_epochs, float)
    assert resolved.config.model.norm_pix_loss is False and resolved.data_backend == "synthetic"
    assert (o.accum_iter, o.min_lr, resolved.config.data.num_workers) == (1, 0.0, 2)  # the defaults
    assert resolved.config.run.config == str(recipe)
    again = P.parse_pretrain([f"--config={recipe}", "--norm_pix_loss", "--output_dir", out])
    assert again.config.model.norm_pix_loss is True  # a negatable flag overrides the file's false


@pytest.mark.parametrize("text,message", [
    ("batch_sise: 32\n", "unknown key 'batch_sise' (is not a flag name; did you mean 'batch_size'?"),
    ("optim:\n  batch_size: 32\n", "unknown key 'optim'"),
    ("model:\n  model: mae_vit_base_patch16\n", "model: a mapping is not a value: recipes are flat"),
    ("epochs: ten\n", "--config RECIPE: epochs: expected an integer, got 'ten'"),
    ("epochs: 10.5\n", "epochs: expected an integer, got 10.5"),
    ("compile: 1\n", "compile: expected true or false, got 1"),
    ("precision: fp8\n", "precision: 'fp8' is not one of bf16, fp16, fp32"),
    ("batch_size: null\n", "batch_size: a value is required"),
    ("config: other.yaml\n", "key 'config': a recipe cannot name another recipe"),
    ("batch_size: [1\n", "not valid YAML at line 2"),
    ("- batch_size\n", "expected a mapping of flag names to values"),
])
def test_a_bad_recipe_is_refused_with_one_line_naming_the_file(tmp_path, capsys, text, message):
    recipe = write(tmp_path, text)
    line = refusal(capsys, P.parse_pretrain, ["--config", str(recipe), "--data_path", "synthetic"])
    assert line.startswith(f"python -m train.pretrain: error: --config {recipe}: ")
    assert message.replace("RECIPE", str(recipe)) in line


def test_an_unreadable_recipe_and_an_option_of_the_other_command_are_refused(tmp_path, capsys):
    line = refusal(capsys, P.parse_pretrain, ["--config", str(tmp_path / "none.yaml")])
    assert f"--config {tmp_path / 'none.yaml'}: cannot read the file (No such file or directory)" in line
    recipe = write(tmp_path, "mixup: 0.8\n")
    line = refusal(capsys, C.parse_classify, "linprobe", ["--config", str(recipe)])
    assert "unknown key 'mixup' (is not an option of this command" in line
    assert load_recipe(C.FinetuneConfig, recipe) == {"mixup": 0.8}


# -- derived values ----------------------------------------------------------------------------------------


def test_demo_defaults_are_returned_not_written_back():
    namespace = P.build_parser().parse_args([])
    before = dict(vars(namespace))
    config = from_flat(P.PretrainConfig, vars(namespace))
    resolved = P.resolve_pretrain(config)
    assert vars(namespace) == before
    assert (config.optim.lr, config.optim.blr, config.model.img_size, config.model.patch_size) == (None,) * 4
    m, o = resolved.config.model, resolved.config.optim
    assert (o.lr, o.blr, m.img_size, m.patch_size) == (P.DEMO_LR, P.BLR, 48, 4)
    assert resolved.demo_recipe == (
        "--lr 0.001 --img_size 48 --patch_size 4 --knn_data_path digits --knn_max_train 500")
    assert resolved.config.knn.knn_data_path == "digits" and config.knn.knn_data_path is None
    assert (resolved.model_config.img_size, resolved.model_config.patch_size) == (48, 4)
    assert resolved.data_backend == "auto" and Path(resolved.data_root).is_dir()
    # Each demo default fills only what is not given.
    resolved = P.parse_pretrain(["--blr", "1e-4"])
    assert resolved.config.optim.lr is None
    assert resolved.demo_recipe == "--img_size 48 --patch_size 4 --knn_data_path digits --knn_max_train 500"
    assert P.parse_pretrain(["--knn_max_train", "9"]).config.knn.knn_max_train == 9  # a given cap is kept
    resolved = P.parse_pretrain(["--img_size", "32", "--knn_every", "0"])
    assert (resolved.config.model.img_size, resolved.config.model.patch_size) == (32, 8)
    assert resolved.demo_recipe == "--lr 0.001" and resolved.knn_root is None
    resolved = P.parse_pretrain(["--data_path", "synthetic"])
    assert (resolved.config.optim.lr, resolved.config.optim.blr, resolved.demo_recipe) == (None, P.BLR, "")
    assert (resolved.data_backend, resolved.config.data.data_backend) == ("synthetic", "synthetic")
    assert resolved.data_root is None and resolved.knn_root is None and resolved.config.knn.knn_data_path is None


def test_the_model_s_values_are_filled_in():
    resolved = P.parse_pretrain(["--model", "mae_vit_tiny_patch8", "--data_path", "synthetic"])
    m = resolved.config.model
    assert (m.img_size, m.patch_size, m.decoder_depth, m.kept_mask_ratio, m.backend) == (64, 8, 4, 0.75, "auto")
    assert resolved.model_config.family == "mae"


@pytest.mark.parametrize("flags,message", [
    (["--warmup_epochs", "50", "--epochs", "10"], "--warmup_epochs must be in [0, --epochs=10], got 50.0"),
    (["--kept_mask_ratio", "0.9"], "kept_mask_ratio"),
    (["--model", "crossmae_vit_enormous_patch16"], "unknown model 'crossmae_vit_enormous_patch16'"),
    (["--precision", "fp16", "--device", "cpu"], "--precision fp16 needs a CUDA GPU"),
    (["--img_size", "8", "--patch_size", "8"], "gives 1 patch(es); masking needs at least 4"),
    (["--data_backend", "torch"], "--data_path synthetic needs --data_backend synthetic (or auto)"),
    (["--lr", "inf"], "--lr must be a finite number >= 0, got inf"),
    (["--batch_size", "0"], "--batch_size must be >= 1, got 0"),
    (["--max_steps", "0"], "--max_steps must be >= 1, got 0"),
    (["--init_encoder", "/nonexistent/enc.pth"], "--init_encoder /nonexistent/enc.pth: no such file"),
])
def test_impossible_pretraining_flags_are_refused_with_one_line(tmp_path, capsys, flags, message):
    line = refusal(capsys, P.parse_pretrain, ["--data_path", "synthetic", "--output_dir", str(tmp_path), *flags])
    assert message in line


def test_output_folder_and_resume_checks(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        P.resolve_pretrain(synthetic(output_dir=str(tmp_path / "file")))
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint-last.pth").write_bytes(b"this run")
    (run / "checkpoint-0001.pth").write_bytes(b"this run, kept")
    (tmp_path / "other.pth").write_bytes(b"another run")
    with pytest.raises(ConfigError, match=r"already holds checkpoint-last\.pth of another run"):
        P.resolve_pretrain(synthetic(output_dir=str(run), resume=str(tmp_path / "other.pth")))
    P.resolve_pretrain(synthetic(output_dir=str(run), resume=str(run / "checkpoint-0001.pth")))  # rewinds: fine


def test_classify_sizes_come_from_the_checkpoint(tmp_path, capsys):
    encoder = tmp_path / "encoder.pth"
    torch.save({"model_config": {"img_size": 24, "patch_size": 4}}, encoder)
    resolved = C.parse_classify("finetune", ["--finetune", str(encoder)])
    assert (resolved.config.model.img_size, resolved.config.model.patch_size) == (24, 4)
    assert (resolved.model_config.img_size, resolved.model_config.patch_size) == (24, 4)
    assert C.parse_classify("linprobe", []).config.model.img_size == C.DEMO_IMG_SIZE  # no checkpoint: the demo's
    line = refusal(capsys, C.parse_classify, "finetune", ["--finetune", str(encoder), "--img_size", "32"])
    assert f"--img_size 32: the encoder in {encoder} was pre-trained with img_size 24" in line


@pytest.mark.parametrize("flags,message", [
    (["--layer_decay", "0"], "--layer_decay must be in (0, 1], got 0.0"),
    (["--smoothing", "1"], "--smoothing must be in [0, 1) and --reprob in [0, 1]"),
    (["--warmup_epochs", "20"], "--warmup_epochs must be in [0, --epochs=10], got 20.0"),
    (["--lr", "nan"], "--lr must be a finite number >= 0, got nan"),
    (["--img_size", "0"], "--img_size must be >= 1, got 0"),
    (["--model", "vit_gigantic_patch16"], "unknown model 'vit_gigantic_patch16'"),
    (["--finetune", "/nonexistent/enc.pth"], "--finetune /nonexistent/enc.pth: no such file"),
    (["--data_path", "TMP"], "expected the folders train/ (and train/, val/) inside"),
])
def test_impossible_classify_flags_are_refused_with_one_line(tmp_path, capsys, flags, message):
    flags = [str(tmp_path) if flag == "TMP" else flag for flag in flags]
    assert message in refusal(capsys, C.parse_classify, "finetune", flags)


# -- comparison on resume ----------------------------------------------------------------------------------


def test_compare_by_policy():
    base = synthetic(lr=1e-3)
    assert compare(to_dict(base), base) == ([], [])
    changed = synthetic(lr=1e-3, batch_size=32, num_workers=8, max_steps=5, backend="triton", resume="x.pth")
    refused, warned = compare(to_dict(base), changed)
    assert refused == ["--batch_size 64 -> 32"]
    assert warned == ["--backend 'auto' -> 'triton'", "--num_workers 2 -> 8"]
    assert compare(flat_settings(base), changed) == (refused, warned)  # flat settings compare alike


def test_a_new_blr_is_refused_unless_lr_is_given_in_both_runs():
    refused, warned = compare(to_dict(synthetic(lr=1e-3, blr=1e-4)), synthetic(lr=1e-3, blr=2e-4))
    assert (refused, warned) == ([], ["--blr 0.0001 -> 0.0002 (no effect: --lr is given)"])
    refused, warned = compare(to_dict(synthetic(blr=1e-4)), synthetic(lr=1e-3, blr=2e-4))
    assert (refused, warned) == (["--blr 0.0001 -> 0.0002", "--lr None -> 0.001"], [])


def test_an_option_the_checkpoint_lacks_compares_as_its_default():
    saved = flat_settings(synthetic())
    del saved["seed"]
    assert compare(saved, synthetic()) == ([], [])
    assert compare(saved, synthetic(seed=1)) == (["--seed 0 -> 1"], [])


def test_old_pretraining_checkpoints_resume_without_spurious_differences():
    # Old runs built backend "torch"; the default is now "auto" (issue 17): a warning, the one difference.
    auto = ["--backend 'torch' -> 'auto'"]
    old = {"args": OLD_PRETRAIN_ARGS, "model_config": OLD_PRETRAIN_MODEL_CONFIG}
    assert compare(saved_settings(old), P.parse_pretrain([]).config) == ([], auto)
    assert compare(saved_settings(old), P.parse_pretrain(["--backend", "torch"]).config) == ([], [])
    changed = P.parse_pretrain(["--batch_size", "32", "--num_workers", "1"]).config
    refused, warned = compare(saved_settings(old), changed)
    assert (refused, warned) == (["--batch_size 64 -> 32"], [*auto, "--num_workers 2 -> 1"])
    old = {"args": OLD_MAE_ARGS, "model_config": OLD_MAE_MODEL_CONFIG}
    flags = ["--model", "mae_vit_tiny_patch8", "--data_path", "synthetic", "--lr", "1e-3"]
    assert compare(saved_settings(old), P.parse_pretrain(flags).config) == ([], auto)
    # The model's own size, now given explicitly, is the same run (today compared the model configs alike).
    assert compare(saved_settings(old), P.parse_pretrain([*flags, "--img_size", "64"]).config) == ([], auto)


@pytest.mark.parametrize("mode", ["finetune", "linprobe"])
def test_old_classify_checkpoints_resume_without_spurious_differences(mode):
    old = {"args": OLD_CLASSIFY_ARGS[mode]}
    assert compare(saved_settings(old), C.parse_classify(mode, []).config) == ([], [])
    refused, _ = compare(saved_settings(old), C.parse_classify(mode, ["--seed", "3"]).config)
    assert refused == ["--seed 0 -> 3"]


def test_saved_settings_of_the_new_format_and_of_neither():
    config = synthetic(batch_size=8)
    assert saved_settings({"config": to_dict(config), "args": {"batch_size": 1}}) == flat_settings(config)
    assert saved_settings({"model": {}}) == {}


# -- plain data ---------------------------------------------------------------------------------------------


def test_plain_data_round_trip():
    for config in (P.PretrainConfig(), synthetic(lr=1e-3, max_steps=3), C.FinetuneConfig(), C.LinprobeConfig()):
        data = json.loads(json.dumps(to_dict(config)))
        assert list(data) == [f.name for f in concern_fields(type(config))]
        assert from_dict(type(config), data) == config
    assert from_dict(P.PretrainConfig, {"optim": {"batch_size": 8}}).optim.batch_size == 8  # the rest: defaults
    with pytest.raises(ValueError, match="unknown option"):
        from_dict(P.PretrainConfig, {"optim": {"batch_sise": 8}})
    with pytest.raises(ValueError, match="unknown section"):
        from_dict(P.PretrainConfig, {"optimizer": {}})
    for config in (C.LinprobeConfig(), synthetic()):  # the per-command classes pickle too (worker processes)
        assert pickle.loads(pickle.dumps(config)) == config


def test_the_config_written_at_start_is_a_recipe_of_the_same_run(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    resolved = P.parse_pretrain(["--data_path", "synthetic", "--batch_size", "8", "--lr", "2e-3",
                                 "--output_dir", str(out)])
    path = P.write_resolved(resolved)
    assert path == out / CONFIG_FILE and path.read_text().startswith("# The resolved configuration")
    again = P.parse_pretrain(["--config", str(path)])
    assert again.config == dataclasses.replace(
        resolved.config, run=dataclasses.replace(resolved.config.run, config=str(path)))
    resolved = C.parse_classify("linprobe", ["--output_dir", str(out), "--optimizer", "lars"])
    path = C.write_resolved(resolved)
    assert C.parse_classify("linprobe", ["--config", str(path)]).config.optim.optimizer == "lars"


# -- the paper's recipes (configs/) ------------------------------------------------------------------------

SIZES = ("vit_small_patch16", "vit_base_patch16", "vit_large_patch16", "vit_huge_patch14")
EFFECTIVE = re.compile(r"Effective batch: (\d+) = (\d+) \(batch_size\) x (\d+) \(accum_iter\) x (\d+) GPUs")


def test_every_configuration_of_the_paper_has_a_recipe():
    expected = {"pretrain/crossmae_vit_base_patch16_g0.25_448.yaml"}
    for size in SIZES:
        expected |= {f"pretrain/crossmae_{size}_g0.25.yaml", f"pretrain/crossmae_{size}_g0.75.yaml",
                     f"pretrain/mae_{size}.yaml", f"finetune/{size}.yaml", f"linprobe/{size}.yaml"}
    assert {path.relative_to(ROOT / "configs").as_posix() for path in RECIPES} == expected


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imagenet")
    for split in ("train", "val"):
        (root / split / "n01440764").mkdir(parents=True)
    return root


@pytest.fixture(scope="module")
def encoders(tmp_path_factory) -> dict[int, Path]:
    """Pre-training checkpoints as far as the size check reads them: their recorded model config."""
    folder = tmp_path_factory.mktemp("encoders")
    for patch in (14, 16):
        torch.save({"model_config": {"img_size": 224, "patch_size": patch}}, folder / f"p{patch}.pth")
    return {patch: folder / f"p{patch}.pth" for patch in (14, 16)}


@pytest.mark.parametrize("path", RECIPES, ids=lambda path: f"{path.parent.name}/{path.stem}")
def test_every_recipe_resolves_with_the_paper_s_numbers(path, data_root, encoders, tmp_path):
    command, name, text = path.parent.name, path.stem, path.read_text()
    assert text.startswith("# ") and "SPEC.md" in text and "data_path" in text  # the header: source, data
    effective, batch, accum, gpus = map(int, EFFECTIVE.search(text).groups())
    assert batch * accum * gpus == effective
    flags = ["--config", str(path), "--data_path", str(data_root), "--output_dir", str(tmp_path / "out")]
    if command == "pretrain":
        resolved = P.parse_pretrain(flags)
        m, o = resolved.config.model, resolved.config.optim
        gamma = float(name.split("_g")[1][:4]) if "_g" in name else m.mask_ratio  # MAE predicts every masked patch
        hi_res = name.endswith("_448")
        assert (effective, o.blr, o.weight_decay, o.min_lr, m.mask_ratio, m.kept_mask_ratio) == (
            4096, 1.5e-4, 0.05, 0.0, 0.75, gamma)
        assert (o.epochs, o.warmup_epochs, m.img_size) == ((400, 20, 448) if hi_res else (800, 40, 224))
        assert m.model == name.removesuffix("_448").split("_g")[0] and m.norm_pix_loss
        assert m.decoder_depth == (12 if name.startswith("crossmae") else 8)
        assert load_recipe(P.PretrainConfig, path)["data_path"] == "/data/imagenet/train"
    else:
        patch = 14 if name.endswith("patch14") else 16
        resolved = C.parse_classify(command, [*flags, "--finetune", str(encoders[patch])])
        m, o, a = resolved.config.model, resolved.config.optim, resolved.config.augment
        assert (m.model, m.img_size, m.patch_size) == (name, 224, patch)
        assert load_recipe(C.CONFIGS[command], path)["data_path"] == "/data/imagenet"
        if command == "finetune":
            assert (effective, o.warmup_epochs, o.weight_decay, m.drop_path, m.global_pool) == (
                1024, 5, 0.05, 0.1, "avg")
            assert (a.mixup, a.cutmix, a.smoothing, a.reprob, a.randaug) == (0.8, 1.0, 0.1, 0.25, True)
            small = "small" in name or "base" in name
            assert (o.epochs, o.blr, o.layer_decay) == ((100, 5e-4, 0.65) if small else (50, 1e-3, 0.75))
        else:
            assert (effective, o.optimizer, o.blr, o.weight_decay, o.epochs, o.warmup_epochs, m.global_pool) == (
                16384, "lars", 0.1, 0.0, 90, 10, "token")
    assert (o.batch_size, o.accum_iter) == (batch, accum)
