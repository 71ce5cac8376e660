"""Export a pre-trained encoder for timm: ``DIR/model.safetensors`` in timm's ``VisionTransformer`` layout
(no head) and ``DIR/export.json`` (timm model name and keywords, image size, mean/std, provenance).

    python -m train.export output/pretrain/checkpoint-last.pth --to timm --out export/tiny
    python -m train.export mae_pretrain_vit_base.pth --to timm --out export/mae_b --pool token

then, with timm installed, the line recorded in export.json as ``create_model``, for example

    model = timm.create_model("vit_base_patch16_224", checkpoint_path="export/b/model.safetensors",
                              num_classes=0, global_pool="avg", pretrained_cfg_overlay=dict(mean=..., std=...))

The checkpoint is ours (``train.pretrain``) or one of the authors' released CrossMAE / MAE files. See
``model/timm_format.py`` for the mapping; the README for the import direction (``--finetune``,
``--init_encoder`` take the exported file, or any timm ViT file, back).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from model.timm_format import POOLS, read_weights, to_timm
from train.checkpoint import FORMAT as TRAINING_FORMAT
from train.config import saved_settings
from train.data import IMAGENET_MEAN, IMAGENET_STD
from train.monitor import setup_logging

logger = logging.getLogger("train")

WEIGHTS = "model.safetensors"
META = "export.json"
FORMAT = "crossmae-timm-export-v1"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.export", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint", help="pre-training checkpoint: ours (checkpoint-last.pth) or the authors' release")
    p.add_argument("--to", choices=("timm",), default="timm", help="target layout")
    p.add_argument("--out", required=True, help=f"output folder: receives {WEIGHTS} and {META}")
    p.add_argument("--pool", choices=POOLS, default="auto",
                   help="token: timm's default layout with the encoder's final `norm` (MAE, CrossMAE without "
                        "inter-block mixing); avg: timm's global_pool='avg' layout with `fc_norm` (identity "
                        "when the encoder has no final norm); auto: token if the encoder has a final norm, else avg")
    p.add_argument("--img_size", type=int, default=None,
                   help="export the fixed sin-cos position table for this image size (default: the checkpoint's)")
    p.add_argument("--num_heads", type=int, default=None,
                   help="attention heads, only needed when neither the checkpoint nor the registry tells them")
    p.add_argument("--overwrite", action="store_true", help=f"replace an existing {WEIGHTS} in --out")
    return p


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def source_info(path: Path, checkpoint: dict[str, Any]) -> dict[str, Any]:
    """Where the weights came from: the file, its hash, and what our checkpoints record about the run."""
    info: dict[str, Any] = {"checkpoint": str(path.resolve()), "sha256": file_sha256(path)}
    if checkpoint.get("format") == TRAINING_FORMAT:
        info.update(kind="train.pretrain checkpoint", model=saved_settings(checkpoint).get("model"),
                    step=checkpoint.get("step"), epoch=checkpoint.get("epoch"))
    else:
        args = checkpoint.get("args")
        info.update(kind="released CrossMAE / MAE checkpoint, or a bare state dict",
                    model=getattr(args, "model", None), epoch=checkpoint.get("epoch"))
    return {k: v for k, v in info.items() if v is not None}


def create_model_line(meta: dict[str, Any], weights: Path) -> str:
    """The one ``timm.create_model`` call that builds this layout and loads the file (strictly)."""
    kwargs = [f"{k}={v!r}" for k, v in meta["timm_kwargs"].items()]
    overlay = f"dict(mean={tuple(meta['mean'])!r}, std={tuple(meta['std'])!r})"
    return (f"timm.create_model({meta['timm_model']!r}, checkpoint_path={str(weights)!r}, {', '.join(kwargs)}, "
            f"pretrained_cfg_overlay={overlay})")


def write_safetensors(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Atomically: a temporary file in the same folder, renamed over ``path``."""
    from safetensors.torch import save_file

    seen, tensors = set(), {}
    for k, v in state.items():
        v = v.cpu()
        ptr = v.untyped_storage().data_ptr()
        tensors[k] = v.clone() if ptr in seen else v  # safetensors refuses tensors that share memory
        seen.add(ptr)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make the export private to this user
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def export_timm(checkpoint_path: str | os.PathLike, out_dir: str | os.PathLike, pool: str = "auto",
                img_size: int | None = None, num_heads: int | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Write ``out_dir/model.safetensors`` and ``out_dir/export.json``; returns the JSON's content. The
    written file is read back and compared tensor by tensor before the JSON is written."""
    path, out = Path(checkpoint_path), Path(out_dir)
    weights = out / WEIGHTS
    if weights.exists() and not overwrite:
        raise FileExistsError(f"{weights} exists: pass --overwrite, or choose another --out")
    checkpoint = read_weights(path)  # ours and the authors' .pth, or a .safetensors state dict
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path} holds a {type(checkpoint).__name__}, not a checkpoint dict")
    state, meta = to_timm(checkpoint, num_heads=num_heads, pool=pool, img_size=img_size)
    mean, std = IMAGENET_MEAN, IMAGENET_STD  # what train.pretrain normalises with (and the authors)
    meta = {"format": FORMAT, **meta, "mean": list(mean), "std": list(std), "source": source_info(path, checkpoint)}
    meta["create_model"] = create_model_line(meta, weights)
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(state, weights, {"format": "pt", "exported_by": "crossmae train.export",
                                       "timm_model": meta["timm_model"], "source_sha256": meta["source"]["sha256"]})
    back = read_weights(weights)
    bad = [k for k in state if k not in back or not torch.equal(back[k], state[k].cpu())]
    if bad or set(back) != set(state):
        raise RuntimeError(f"{weights} does not read back as written (differs at {bad[:5]}); disk full or failing?")
    (out / META).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(True)
    if not Path(args.checkpoint).is_file():
        parser.error(f"checkpoint {args.checkpoint}: no such file")
    if args.img_size is not None and args.img_size < 1:
        parser.error(f"--img_size must be >= 1, got {args.img_size}")
    try:
        meta = export_timm(args.checkpoint, args.out, args.pool, args.img_size, args.num_heads, args.overwrite)
    except (FileNotFoundError, FileExistsError, KeyError, ValueError) as e:
        logger.error("%s", e.args[0] if isinstance(e, KeyError) and e.args else e)
        return 2
    except OSError as e:  # --out under a file, read-only, full: nothing half-written is left as the export
        logger.error("--out %s: cannot write there (%s%s): choose another folder", args.out, e.strerror or e,
                     f": {e.filename}" if e.filename else "")
        return 2
    logger.info("wrote %s (%d tensors, %s layout, %d px) and %s", Path(args.out) / WEIGHTS, meta["num_tensors"],
                meta["timm_model"] if not meta["timm_kwargs"].get("global_pool") else meta["timm_model"] + " avg-pool",
                meta["img_size"], Path(args.out) / META)
    logger.info("final norm: %s", meta["final_norm"])
    for note in meta["notes"]:
        logger.info("note: %s", note)
    logger.info("load it in timm with:\n  %s", meta["create_model"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
