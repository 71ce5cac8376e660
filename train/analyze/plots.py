"""The analyses' pictures (matplotlib, Agg canvas, written atomically: ``train.visualize.new_figure`` /
``save_figure``): attention per decoder block, the inter-block mixing weights, the PSNR histogram and the cost
bars."""

from __future__ import annotations

import math
import os

from train.visualize import new_figure, save_figure

TYPE_COLOURS = {"visible": "tab:blue", "mask": "tab:orange", "cls": "tab:green", "patches": "tab:blue"}


def plot_attention(result: dict, path: str | os.PathLike, title: str) -> None:
    """Left: per decoder block, the attention mass of the queries on each key type (stacked to 1). Right: the
    same as ``vs_uniform`` (weight per key relative to uniform attention), on a log scale when it spans more than a
    factor 10."""
    blocks = result["blocks"]
    types = list(blocks[0]["mass"])
    x = list(range(len(blocks)))
    fig = new_figure((10, 3.8))
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    bottom = [0.0] * len(blocks)
    for t in types:
        values = [b["mass"][t] for b in blocks]
        left.bar(x, values, bottom=bottom, color=TYPE_COLOURS.get(t), label=f"{t} ({result['keys'][t]} keys)")
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
        right.plot(x, [b["vs_uniform"][t] for b in blocks], marker="o", color=TYPE_COLOURS.get(t), label=t)
    left.set_xlabel("decoder block")
    left.set_ylabel("attention mass (sums to 1)")
    left.set_ylim(0, 1)
    left.legend(fontsize=8, loc="lower right")
    right.axhline(1.0, color="gray", lw=0.8, ls="--")
    ratios = [b["vs_uniform"][t] for b in blocks for t in types if b["vs_uniform"][t] > 0]
    if ratios and max(ratios) / min(ratios) > 10:  # a log scale only where the values span orders of magnitude
        right.set_yscale("log")
    right.set_xlabel("decoder block")
    right.set_ylabel("weight per key / uniform")
    right.legend(fontsize=8)
    for ax in (left, right):
        ax.set_xticks(x)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(title, fontsize=9)
    save_figure(fig, path)


def plot_feature_mix(mix: dict, path: str | os.PathLike, title: str) -> None:
    """Heat map of W: rows are decoder blocks, columns the candidate feature maps, diverging colours around 0."""
    W = mix["W"]
    names = mix["candidates"]
    limit = max(abs(v) for row in W for v in row) or 1.0
    fig = new_figure((max(5.0, 0.45 * len(names) + 2.5), max(3.0, 0.35 * len(W) + 1.8)))
    ax = fig.add_subplot()
    image = ax.imshow(W, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(W)))
    ax.set_ylabel("decoder block")
    ax.set_xlabel("encoder feature map (input = patch embedding + position)")
    if len(W) * len(names) <= 400:
        for j, row in enumerate(W):
            for i, v in enumerate(row):
                ax.text(i, j, f"{v:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if abs(v) > 0.6 * limit else "black")
    fig.colorbar(image, ax=ax, label="W[j, i]")
    ax.set_title(title, fontsize=9)
    save_figure(fig, path)


def plot_psnr(psnr_db: list[float], path: str | os.PathLike, title: str) -> None:
    """Histogram of the finite per-image PSNRs, the mean marked."""
    finite = [p for p in psnr_db if math.isfinite(p)]
    fig = new_figure((6, 3.6))
    ax = fig.add_subplot()
    if finite:
        ax.hist(finite, bins=min(50, max(5, len(finite) // 4)), color="tab:blue", alpha=0.8)
        mean = sum(finite) / len(finite)
        ax.axvline(mean, color="black", lw=1, ls="--")
        ax.text(mean, ax.get_ylim()[1] * 0.95, f" mean {mean:.2f} dB", va="top", fontsize=8)
    ax.set_xlabel("PSNR of the hidden patches (dB)")
    ax.set_ylabel("images")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def plot_cost(rows: list[dict], path: str | os.PathLike, title: str) -> None:
    """Encoder and decoder GMACs per image, one pair of bars per configuration, the paper's decoder figure marked."""
    labels = [f"{r['model'].replace('_patch', '/')}\ngamma {r['kept_mask_ratio']:g}, {r['decoder_depth']} blocks"
              for r in rows]
    x = list(range(len(rows)))
    fig = new_figure((max(5.0, 2.2 * len(rows) + 1.5), 4.0))
    ax = fig.add_subplot()
    ax.bar([i - 0.2 for i in x], [r["encoder_gmacs"] for r in rows], width=0.4, label="encoder", color="tab:gray")
    ax.bar([i + 0.2 for i in x], [r["decoder_gmacs"] for r in rows], width=0.4, label="decoder", color="tab:blue")
    marked = [i for i, r in enumerate(rows) if "paper" in r]
    for i in marked:
        ax.plot([i + 0.2], [rows[i]["paper"]["decoder_gmacs"]], "k_", markersize=18,
                label="paper (decoder)" if i == marked[0] else None)
    ax.set_xticks(x)
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel("GMACs per image (forward)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    ax.set_title(title, fontsize=9)
    save_figure(fig, path)
