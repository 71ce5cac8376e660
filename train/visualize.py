"""What a pre-training run draws: reconstruction grids (original | visible | predicted | pasted), training
images beside held-out ones, and the loss curve of ``metrics.jsonl``; and the matplotlib figure helpers
(``new_figure``, ``save_figure``) that the analyses' pictures (train/analyze/plots.py) share."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from train.data import IMAGENET_MEAN, IMAGENET_STD
from train.files import replace_atomically

MIN_CELL = 128  # pixels: small crops are enlarged (nearest neighbour, so patch edges stay visible) to this


def to_pixels(imgs: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalised (B, 3, H, W) -> float32 pixels in [0, 1] (un-normalised, then clipped), same shape."""
    mean = torch.tensor(IMAGENET_MEAN, device=imgs.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=imgs.device).view(1, 3, 1, 1)
    return (imgs.float() * std + mean).clamp(0, 1)


def to_uint8(imgs: torch.Tensor) -> np.ndarray:
    """ImageNet-normalised (B, 3, H, W) -> uint8 (B, H, W, 3)."""
    return (to_pixels(imgs) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def _save_png(image: Image.Image, path: str | os.PathLike) -> None:
    replace_atomically(path, lambda f: image.save(f, format="png"))  # a viewer (or a kill) never sees half a file


@torch.no_grad()
def save_reconstruction_grid(model: torch.nn.Module, imgs: torch.Tensor, noise: torch.Tensor,
                             path: str | os.PathLike, gap: int = 2, heldout: int = 0, title: str = "",
                             heading: str = "training images") -> None:
    """One row per image, four labelled columns: the original, the visible patches, the prediction of every
    hidden patch, and both together. The first rows are drawn under ``heading``; the last ``heldout`` rows are
    images the run does not train on, under their own heading. Masked-out areas show as the dataset's mean
    colour."""
    was_training = model.training
    model.eval()
    rec = model.reconstruct(imgs, noise)
    model.train(was_training)
    columns = [to_uint8(imgs), to_uint8(rec["masked"]), to_uint8(rec["reconstruction"]), to_uint8(rec["pasted"])]
    B, H, W, _ = columns[0].shape
    scale = max(1, math.ceil(MIN_CELL / max(H, W)))
    h, w = H * scale, W * scale
    cfg = getattr(model, "cfg", None)
    if cfg is not None:
        hidden = cfg.num_patches - cfg.split.len_keep
        names = ["original", f"visible {cfg.split.len_keep}/{cfg.num_patches}", f"predicted {hidden} hidden",
                 "visible + predicted"]
    else:
        names = ["original", "visible", "predicted", "visible + predicted"]
    font = ImageFont.load_default()
    band = 16  # a line of the default font
    sections = [(heading, range(0, B - heldout))] if B > heldout else []
    if heldout:
        sections.append(("held out: never trained on", range(B - heldout, B)))
    width = 4 * (w + gap) - gap
    caption = _wrap(title, width // 6) if title else []
    height = band * (len(caption) + 1) + sum(band + len(rows) * (h + gap) for _, rows in sections)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    y = 0
    for line in caption:
        draw.text((2, y + 2), line, fill="black", font=font)
        y += band
    for c, name in enumerate(names):
        draw.text((c * (w + gap) + 2, y + 2), name, fill="black", font=font)
    y += band
    for heading, rows in sections:
        draw.text((2, y + 2), heading, fill=(160, 0, 0) if heading.startswith("held") else (0, 0, 160), font=font)
        y += band
        for r in rows:
            for c, col in enumerate(columns):
                cell = Image.fromarray(col[r]).resize((w, h), Image.Resampling.NEAREST)
                canvas.paste(cell, (c * (w + gap), y))
            y += h + gap
    _save_png(canvas, path)


def _wrap(text: str, chars: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > chars:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return lines + ([line] if line else [])


def read_losses(metrics: str | os.PathLike) -> tuple[list[int], list[float]]:
    """(steps, losses) of ``metrics.jsonl``; a step logged twice (before a kill, after the resume) keeps
    its last value; torn lines are passed over."""
    per_step: dict[int, float] = {}
    try:
        text = Path(metrics).read_text()
    except FileNotFoundError:
        return [], []
    for line in text.splitlines():
        try:
            record = json.loads(line)
            per_step[int(record["step"])] = float(record["loss"])
        except (ValueError, KeyError, TypeError):
            continue
    steps = sorted(per_step)
    return steps, [per_step[s] for s in steps]


def save_loss_curve(metrics: str | os.PathLike, path: str | os.PathLike, title: str = "",
                    norm_pix: bool = True) -> bool:
    """Plot the loss of ``metrics.jsonl`` against the step (matplotlib, no display needed); ``norm_pix``:
    the loss is norm-pix MSE, whose 1.0 line is drawn. Returns False, writing nothing, when there is no
    record yet."""
    steps, losses = read_losses(metrics)
    if not steps:
        return False
    fig = new_figure((6, 3.6))
    ax = fig.add_subplot()
    ax.plot(steps, losses, lw=1.5, color="tab:blue", marker="." if len(steps) < 30 else None)
    if norm_pix:
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.text(steps[0], 1.0, " 1.0: each patch predicted as its own mean", va="bottom", fontsize=8, color="gray")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (norm-pix MSE)" if norm_pix else "training loss (pixel MSE)")
    ax.set_title(title or f"loss {losses[0]:.3f} -> {losses[-1]:.3f} over {steps[-1]} steps", fontsize=10)
    ax.grid(alpha=0.3)
    save_figure(fig, path)
    return True


def new_figure(size: tuple[float, float], dpi: int = 100):
    """A matplotlib ``Figure`` on an Agg canvas: the object API, so no pyplot global state and no GUI backend
    (safe in any process, display or not)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path: str | os.PathLike) -> None:
    """Lay ``fig`` out and write it as a PNG, atomically (a viewer never sees half a file)."""
    fig.tight_layout()
    replace_atomically(path, lambda f: fig.savefig(f, format="png"))
