"""The four commands: a request (what the command line asked) in, files out.

Each command reads its images (train/analyze/inputs.py), runs its analysis, and writes ``<what>.json`` (every
number, the model's configuration, the command line, the machine), ``<what>.md`` (tables) and its pictures into
the output folder, which must exist; it returns the paths written.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from model.autoencoders import MaskedEncoder
from train.analyze.attention import measure_attention
from train.analyze.cost import PAPER_SPECS, measure_cost, paper_spec
from train.analyze.inputs import ImageSource
from train.analyze.loading import ModelSpec, load_model
from train.analyze.plots import plot_attention, plot_cost, plot_feature_mix, plot_psnr
from train.analyze.psnr import measure_psnr
from train.analyze.reconstruct import draw_reconstructions
from train.analyze.report import machine, markdown_table, number, write_report


@dataclass(frozen=True)
class Request:
    """What one command line asks for. ``spec`` None (cost only): the paper's configurations."""

    what: str
    spec: ModelSpec | None
    checkpoint_path: str | None
    checkpoint: Mapping | None
    device: torch.device
    output_dir: Path
    command: str
    seed: int = 0
    batch_size: int = 64
    data_path: str | None = None
    images: tuple[str, ...] = ()
    max_images: int | None = None

    def header(self) -> dict[str, Any]:
        """The part of every JSON that says what was measured, how and where."""
        info = {"analysis": self.what, "command": self.command, "checkpoint": self.checkpoint_path,
                "machine": machine(self.device)}
        if self.spec is not None:
            info["model"] = self.spec.describe()
        return info


def image_source(request: Request, img_size: int) -> ImageSource:
    return ImageSource(img_size, request.batch_size, request.device, request.data_path, request.images,
                       request.max_images)


def model_line(request: Request) -> str:
    spec = request.spec
    where = f"`{request.checkpoint_path}`" if request.checkpoint_path else "no checkpoint"
    return f"Model **{spec.name}** ({spec.source}, {where}); {spec.cfg.img_size}-pixel crops, " \
           f"{spec.cfg.patch_size}-pixel patches, mask ratio {spec.cfg.mask_ratio:g}."


def loaded_model(request: Request) -> MaskedEncoder:
    return load_model(request.spec, request.checkpoint, request.device)


# -- attention ---------------------------------------------------------------------------------------------------

def run_attention(request: Request) -> list[Path]:
    model = loaded_model(request)
    images = image_source(request, request.spec.cfg.img_size)
    batches = ((imgs, noise) for imgs, noise, _ in images.masked(request.seed, request.spec.cfg.num_patches))
    result = measure_attention(model, batches)
    out = request.output_dir
    title = f"{request.spec.name}: decoder attention of the {result['queries_per_image']} queries per image, " \
            f"{result['images']} images"
    plot_attention(result, out / "attention.png", title)
    written = [out / "attention.png"]
    if result.get("feature_mix"):
        plot_feature_mix(result["feature_mix"], out / "feature_mix.png",
                         f"{request.spec.name}: inter-block mixing weights W")
        written.append(out / "feature_mix.png")
    data = {**request.header(), "data": images.describe(request.seed), **result}
    return write_report(out, "attention", data, attention_markdown(request, result)) + written


def attention_markdown(request: Request, result: dict) -> str:
    types = list(result["keys"])
    header = ["block"] + [f"{view} {t}" for view in ("mass", "per key", "vs uniform") for t in types]

    def cells(entry: dict) -> list[str]:
        return [number(entry[view][t], digits) for view, digits in (("mass", 4), ("per_key", 5), ("vs_uniform", 3))
                for t in types]

    rows = [[b["block"], *cells(b)] for b in result["blocks"]]
    rows += [["**total**", *cells(result["total_over_blocks"])], ["mean", *cells(result["mean_over_blocks"])]]
    keys = ", ".join(f"{n} {t}" for t, n in result["keys"].items())
    lines = [f"# Decoder attention ({result['family']})", "", model_line(request), "",
             f"{result['images']} images, {result['queries_per_image']} queries per image; keys per query: {keys}. "
             f"Probabilities: {result['path']}.", "",
             "mass: the softmax weight a query puts on all keys of a type (the types sum to 1 per block), averaged "
             "over heads, queries and images; per key: mass / number of keys of the type; vs uniform: per key x "
             "number of keys (1 = uniform attention). total: sum over blocks; mean: mean over blocks.", "",
             markdown_table(header, rows)]
    mix = result.get("feature_mix")
    if mix:
        header = ["decoder block", *mix["candidates"], "largest abs(W)"]
        rows = [[j, *(number(v, 3) for v in row), mix["strongest"][j]] for j, row in enumerate(mix["W"])]
        lines += ["", "## Inter-block mixing weights W", "",
                  "Decoder block j reads keys and values from LayerNorm_j(sum_i W[j, i] f_i) (no softmax): "
                  "f_i the encoder input or an encoder block's output.", "", markdown_table(header, rows),
                  "", "![W](feature_mix.png)"]
    elif result["family"] == "crossmae":
        lines += ["", "No inter-block mixing: every decoder block reads the last encoder block, normalised."]
    if result.get("note"):
        lines += ["", f"Note: {result['note']}."]
    return "\n".join([*lines, "", "![attention](attention.png)"])


# -- psnr --------------------------------------------------------------------------------------------------------

def run_psnr(request: Request) -> list[Path]:
    model = loaded_model(request)
    images = image_source(request, request.spec.cfg.img_size)
    result = measure_psnr(model, images.masked(request.seed, request.spec.cfg.num_patches))
    out = request.output_dir
    plot_psnr([r["psnr_db"] for r in result["per_image"]], out / "psnr.png",
              f"{request.spec.name}: PSNR of the {result['hidden_patches_per_image']} hidden patches, "
              f"{result['images']} images")
    data = {**request.header(), "data": images.describe(request.seed), "definition": PSNR_DEFINITION,
            "backend": request.spec.cfg.backend, **result}
    return [*write_report(out, "psnr", data, psnr_markdown(request, result)), out / "psnr.png"]


PSNR_DEFINITION = ("every hidden patch predicted (CrossMAE: all of them, not only the kept_mask_ratio fraction); "
                   "norm-pix predictions un-normalised with the true patch's mean and std; prediction and original "
                   "un-normalised with ImageNet mean/std and clipped to [0, 1]; MSE over all values of the image's "
                   "hidden patches; PSNR = 10 log10(1 / MSE) per image; mean over images with MSE > 0 (MSE = 0: "
                   "PSNR +inf, counted in perfect_images, left out of the mean); pooled = 10 log10(1 / mean MSE)")


def psnr_markdown(request: Request, result: dict) -> str:
    rows = [["mean PSNR (dB), images with MSE > 0", number(result["mean_psnr_db"], 2)],
            ["pooled PSNR (dB), 10 log10(1 / mean MSE)", number(result["pooled_psnr_db"], 2)],
            ["median / min / max (dB)", " / ".join(number(result.get(k), 2) for k in
                                                   ("median_psnr_db", "min_psnr_db", "max_psnr_db"))],
            ["std over images (dB)", number(result.get("std_psnr_db"), 2)],
            ["images (perfect: MSE 0, PSNR inf)", f"{result['images']} ({result['perfect_images']})"],
            ["hidden patches per image", result["hidden_patches_per_image"]]]
    return "\n".join(["# Reconstruction PSNR on the hidden patches", "", model_line(request),
                      f"Backend {request.spec.cfg.backend}, fp32.", "", markdown_table(["", "value"], rows), "",
                      f"Definition: {PSNR_DEFINITION}.", "", "![PSNR](psnr.png)"])


# -- cost --------------------------------------------------------------------------------------------------------

def run_cost(request: Request) -> list[Path]:
    specs = [request.spec] if request.spec is not None else [paper_spec(*key) for key in PAPER_SPECS]
    result = measure_cost(specs)
    out = request.output_dir
    plot_cost(result["rows"], out / "cost.png", "forward GMACs per image")
    data = {**request.header(), **result}
    return [*write_report(out, "cost", data, cost_markdown(result)), out / "cost.png"]


def cost_markdown(result: dict) -> str:
    header = ["model", "gamma", "decoder blocks", "IBA", "encoder GMACs", "(all L embedded)", "decoder GMACs",
              "encoder params (M)", "decoder params (M)", "paper: encoder / decoder GMACs", "matches paper"]
    rows = []
    for r in result["rows"]:
        paper = r.get("paper")
        rows.append([r["model"], f"{r['kept_mask_ratio']:g}", r["decoder_depth"], "yes" if r["inter_block"] else "no",
                     f"{r['encoder_gmacs']:.4g}", f"{r['encoder_gmacs_all_patches_embedded']:.4g}",
                     f"{r['decoder_gmacs']:.4g}", f"{r['encoder_params_m']:.4g}", f"{r['decoder_params_m']:.4g}",
                     f"{paper['encoder_gmacs']} / {paper['decoder_gmacs']}" if paper else "-",
                     ("yes" if r["matches_paper"] else "**no**") if paper else "-"])
    return "\n".join(["# Compute and parameters per image", "", markdown_table(header, rows), "",
                      "GMACs: forward multiply-adds (the models' FLOP counts / 2), matmuls only. Encoder: its blocks "
                      "on 1 + len_keep tokens plus the patch embedding of the visible patches (the paper's count; "
                      "'all L embedded' counts the embedding of every patch, as the reference path runs it). "
                      "Decoder: everything after the encoder, prediction head and CrossMAE's inter-block mix "
                      "included (the paper counts both). Parameters: the position tables are buffers, not counted.",
                      "", "![cost](cost.png)"])


# -- reconstruct ---------------------------------------------------------------------------------------------------

def run_reconstruct(request: Request) -> list[Path]:
    model = loaded_model(request)
    images = image_source(request, request.spec.cfg.img_size)
    imgs, noise, indices = [], [], []
    for batch, batch_noise, batch_indices in images.masked(request.seed, request.spec.cfg.num_patches):
        imgs.append(batch)
        noise.append(batch_noise)
        indices += batch_indices.tolist()
    if not imgs:
        raise ValueError("no image to draw")
    out = request.output_dir
    heading = f"the first {len(indices)} of {request.data_path}" if images.loader else "the images given"
    rows = draw_reconstructions(model, request.spec, torch.cat(imgs), torch.cat(noise), out / "reconstruction.png",
                                heading)
    for row, index in zip(rows, indices, strict=True):
        row.update(index=index, file=images.files[index])
    data = {**request.header(), "data": images.describe(request.seed), "rows": rows}
    table = markdown_table(["row", "image", "PSNR of the hidden patches (dB)"],
                           [[r["row"], Path(r["file"]).name, number(r["psnr_db"], 2)] for r in rows])
    mean = [r["psnr_db"] for r in rows if math.isfinite(r["psnr_db"])]
    markdown = "\n".join(["# Reconstructions", "", model_line(request), "",
                          "Columns: original | visible patches | every hidden patch predicted | both together. "
                          "Norm-pix outputs are shown with the true patch's mean and std.", "", table, "",
                          f"Mean PSNR of these rows: {number(sum(mean) / len(mean) if mean else None, 2)} dB "
                          "(definition: psnr.md / train/analyze/psnr.py).", "", "![grid](reconstruction.png)"])
    return [*write_report(out, "reconstruct", data, markdown), out / "reconstruction.png"]


COMMANDS = {"attention": run_attention, "psnr": run_psnr, "cost": run_cost, "reconstruct": run_reconstruct}
