"""The command line: ``python -m train.analyze attention|psnr|cost|reconstruct [CHECKPOINT] [flags]``.

Exit status 0 when the files are written; 2, with one line naming the problem and no traceback, for a missing,
empty or truncated checkpoint, a model that does not fit the file, an empty or missing image folder, an unknown
model or a bad flag value, an output folder that cannot be written (as the training commands: train/run_control.py).
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

import torch

from train.analyze import __doc__ as PACKAGE_DOC
from train.analyze.commands import COMMANDS, Request
from train.analyze.loading import OVERRIDES, read_model_file, resolve_spec
from train.monitor import setup_logging
from train.run_control import EXIT_DONE, EXIT_REFUSED

logger = logging.getLogger("train")

DEFAULT_RECONSTRUCT_IMAGES = 8


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.analyze", description=PACKAGE_DOC.split("\n\n")[0])
    p.add_argument("what", choices=tuple(COMMANDS), help="the analysis")
    p.add_argument("checkpoint", nargs="?", default=None,
                   help="pre-training checkpoint: ours (checkpoint-last.pth) or the authors' released CrossMAE / MAE "
                        "file (or a state dict in their layout); optional for cost")
    data = p.add_argument_group("images")
    data.add_argument("--data_path", default=None, help="folder of images (read recursively, sorted), or 'demo'")
    data.add_argument("--images", nargs="+", default=(), metavar="FILE", help="image files, instead of --data_path")
    data.add_argument("--max_images", type=int, default=None,
                      help=f"read only the first N images (default: all; for reconstruct, the first "
                           f"{DEFAULT_RECONSTRUCT_IMAGES} of --data_path)")
    data.add_argument("--seed", type=int, default=0,
                      help="mask seed (default 0): image i's noise is numpy's default_rng([seed, i]).random(L)")
    data.add_argument("--batch_size", type=int, default=64,
                      help="images per forward pass (default 64; no effect on the results)")
    run = p.add_argument_group("run")
    run.add_argument("--output_dir", default="output/analyze",
                     help="receives <what>.json, <what>.md and pictures (default output/analyze)")
    run.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when there is one")
    run.add_argument("--backend", choices=("torch", "triton"), default="torch",
                     help="the model's ops for psnr and reconstruct (default torch, the reference; attention always "
                          "uses the reference path)")
    model = p.add_argument_group("model (a checkpoint's own configuration is the default; the authors' files are "
                                 "read off their tensors and args)")
    model.add_argument("--model", default=None, help="registry name, e.g. crossmae_vit_base_patch16")
    for name, kind in (("img_size", int), ("patch_size", int), ("mask_ratio", float), ("kept_mask_ratio", float),
                       ("decoder_depth", int)):
        model.add_argument(f"--{name}", type=kind, default=None)
    for name in ("inter_block", "decoder_self_attn", "norm_pix_loss"):
        model.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, default=None)
    return p


def choose_device(name: str | None) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU is visible; use --device cpu")
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def make_request(args: argparse.Namespace, command: str) -> Request:
    """Check the flags, read the checkpoint and resolve the model; raises ValueError / FileNotFoundError /
    KeyError naming the problem."""
    for flag in ("max_images", "batch_size"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag} must be >= 1, got {value}")
    if args.what != "cost" and args.checkpoint is None:
        raise ValueError(f"{args.what} needs a CHECKPOINT (ours or the authors' release)")
    device = choose_device(args.device)
    checkpoint = read_model_file(args.checkpoint) if args.checkpoint is not None else None
    overrides = {name: getattr(args, name) for name in OVERRIDES}
    if args.what == "cost" and checkpoint is None and args.model is None:
        if any(v is not None for v in overrides.values()):
            raise ValueError("model flags need --model NAME (or a CHECKPOINT); without either, cost lists the "
                             "paper's configurations")
        spec = None
    else:  # attention reads probabilities from the reference path whatever --backend says
        spec = resolve_spec(checkpoint, args.model, "torch" if args.what == "attention" else args.backend,
                            **overrides)
    max_images = args.max_images
    if max_images is None and args.what == "reconstruct" and not args.images:
        max_images = DEFAULT_RECONSTRUCT_IMAGES
    return Request(args.what, spec, args.checkpoint, checkpoint, device, Path(args.output_dir), command,
                   seed=args.seed, batch_size=args.batch_size, data_path=args.data_path, images=tuple(args.images),
                   max_images=max_images)


def one_line(error: BaseException) -> str:
    message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    return " ".join(str(message).split()) or type(error).__name__


def main(argv: list[str] | None = None) -> int:
    """Run one analysis; returns the exit status (0 done, 2 refused)."""
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    setup_logging(True)
    command = "python -m train.analyze " + shlex.join(argv)
    try:
        request = make_request(args, command)
        if request.spec is not None:
            logger.info("model %s (%s): %s", request.spec.name, request.spec.source, "; ".join(request.spec.notes))
        request.output_dir.mkdir(parents=True, exist_ok=True)
        written = COMMANDS[args.what](request)
    except (FileNotFoundError, ValueError, KeyError, TypeError) as e:
        logger.error("%s", one_line(e))
        return EXIT_REFUSED
    except OSError as e:  # the output folder: under a file, read-only, full
        logger.error("--output_dir %s: cannot write there (%s%s); choose another folder", args.output_dir,
                     e.strerror or one_line(e), f": {e.filename}" if e.filename else "")
        return EXIT_REFUSED
    for path in written:
        logger.info("wrote %s", path)
    return EXIT_DONE


if __name__ == "__main__":
    sys.exit(main())
