"""Table 5 of the paper (runtime ablation), measured: full pre-training steps per configuration and backend.

    python -m pytest bench/test_table5.py --benchmark -q -s   # GPU: table5_<gpu>_<date>.{json,md,png} and
                                                             #      table5_latest.{json,md,png} (bench/results.py
                                                             #      says which folder; --save-results: bench/results/)
    python -m pytest bench/test_table5.py                     # smoke check in seconds (CPU is fine)

Rows (SPEC.md section 3), ViT-B/16 at 224 px: MAE; CrossMAE without inter-block attention (decoder reads the
last encoder layer) at gamma 0.75 and 0.25; CrossMAE with IBA at gamma 0.75 and 0.25 (the released
configuration). Also CrossMAE with IBA at gamma 0.25 / 0.75 for ViT-S/16, ViT-L/16 and ViT-H/14.
Each row for the pure-PyTorch reference (`backend="torch"`), the fused kernels (`backend="triton"`) and the
fused kernels under torch.compile. Where the triton backend is unavailable here, its rows read "n/a" with the
reason; any other failure is recorded as ERROR with its message and fails the run once the results are written.
An out-of-memory batch is retried at half the size (and recorded). Order: ViT-B eager rows, ViT-B compiled rows,
then the other sizes, each group led by the released configuration.

A step is the trainer's (train/step.py): forward + backward + AdamW (fused on CUDA) under bf16 autocast, batch
256, on synthetic images already on the GPU with the masking noise drawn on the GPU (no host synchronisation
inside the timed region). Per configuration: build, a first step (it compiles; its time is reported apart), >= 3
more warm-up steps, then the median of >= 10 steps timed with CUDA events; peak memory is
torch.cuda.max_memory_allocated over the timed steps.
min/epoch = 1,281,167 images / images/s on one GPU. FLOPs: model.flops_per_image(training=True).

Knobs (environment): BENCH_SIZES (extra sizes, default "S,L,H"; "" for ViT-B only), BENCH_VARIANTS (default
"torch,triton,triton+compile"; "torch+compile" may be added), BENCH_BATCH (256), BENCH_WARMUP (3),
BENCH_STEPS (10), BENCH_COMPILE_MODE (torch.compile mode, default none), BENCH_TABLE5_BUDGET_S (seconds for
the whole table; configurations run in priority order and those that would overrun are recorded as skipped).
Results are rewritten after every configuration, so a run cut short keeps what it measured.
Goal (issue 6, reported with PASS/FAIL, never asserted): every row faster on triton than on torch.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image

from bench.harness import (
    SESSION_REPORTS,
    SMOKE_TINY_OVERRIDES,
    StepSpec,
    TimeBudget,
    already_measured,
    bench_variants,
    crossmae_overrides,
    env_float,
    env_list,
    measure_train_step,
    one_line,
    step_settings,
    triton_unavailable_reason,
)
from bench.machine import facts_markdown, machine_facts
from bench.plots import bar_chart_png, matplotlib_missing
from bench.results import fmt, markdown_table, result_stem, status_cell, verdict, write_results

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")


@dataclass(frozen=True)
class Row:
    key: str
    label: str
    short: str
    family: str
    overrides: tuple[tuple[str, object], ...]
    paper_top1: float | None  # Table 5 (400 epochs)
    paper_min_per_epoch: float | None  # Table 5: 2x A100 80GB, FlashAttention-2
    paper_memory_mb: float | None  # Table 4, memory per GPU


ROWS = (
    Row("mae", "MAE (8 self-attention decoder blocks)", "MAE", "mae", (), 83.0, 9.35, 68386),
    Row("ca_0.75", "+ cross-attention: decoder reads the last encoder layer (γ 0.75, no IBA)", "cross-attn γ0.75",
        "crossmae", crossmae_overrides(0.75, inter_block=False), 82.9, 7.38, None),
    Row("ca_0.25", "+ partial reconstruction (γ 0.25, no IBA)", "partial γ0.25", "crossmae",
        crossmae_overrides(0.25, inter_block=False), 83.2, 6.32, None),
    Row("iba_0.75", "+ inter-block attention (12 blocks, γ 0.75)", "IBA γ0.75", "crossmae",
        crossmae_overrides(0.75), 83.3, 8.41, 57987),
    Row("iba_0.25", "inter-block attention at γ 0.25 (the released configuration)", "IBA γ0.25", "crossmae",
        crossmae_overrides(0.25), None, None, 36805),
)
ROW_BY_KEY = {row.key: row for row in ROWS}
EXTRA_ROWS = ("iba_0.25", "iba_0.75")  # the CrossMAE configurations also measured at other sizes
MAIN = "B"


@dataclass(frozen=True)
class Size:
    label: str
    short: str
    suffix: str  # model name = f"{family}_{suffix}"
    overrides: tuple[tuple[str, object], ...] = ()


FULL_SIZES = {
    "S": Size("ViT-S/16", "S", "vit_small_patch16"),
    "B": Size("ViT-B/16", "B", "vit_base_patch16"),
    "L": Size("ViT-L/16", "L", "vit_large_patch16"),
    "H": Size("ViT-H/14", "H", "vit_huge_patch14"),
}
# The smoke check keeps the table's shape with the tiny model cut to 2 encoder + 2 decoder blocks (the triton rows
# may run in Triton's CPU interpreter: seconds per step); its "extra size" is the whole tiny model.
SMOKE_SIZES = {
    "B": Size("tiny/8, 2+2 blocks (smoke)", "tiny-d2", "vit_tiny_patch8", SMOKE_TINY_OVERRIDES),
    "S": Size("tiny/8 (smoke)", "tiny", "vit_tiny_patch8"),
}
EXTRA_ORDER = ("S", "L", "H")
# Rough seconds per configuration on an H100 before one of its kind has been measured (budget planning only).
DEFAULT_SECONDS = {(False, "S"): 10, (False, "B"): 12, (False, "L"): 25, (False, "H"): 45,
                   (True, "S"): 60, (True, "B"): 80, (True, "L"): 150, (True, "H"): 200}


@dataclass(frozen=True)
class Item:
    size: str
    row: str
    variant: str
    spec: StepSpec | None  # None: not measured in this mode (see skip)
    skip: str | None = None


def layout(full: bool) -> tuple[dict, list[str], list[str]]:
    """(sizes, extra sizes, variants) for this mode."""
    if not full:
        return SMOKE_SIZES, ["S"], bench_variants(full)
    return FULL_SIZES, env_list("BENCH_SIZES", ["S", "L", "H"], allowed=EXTRA_ORDER), bench_variants(full)


def plan(full: bool) -> list[Item]:
    """Every (size, row, variant) of the table, in the order they are measured (most wanted first)."""
    sizes, extra, variants = layout(full)
    opts = step_settings(full)

    def item(size: str, key: str, variant: str) -> Item:
        row = ROW_BY_KEY[key]
        spec = StepSpec(model=f"{row.family}_{sizes[size].suffix}", overrides=row.overrides + sizes[size].overrides,
                        variant=variant, **opts)
        if not full and variant != "torch" and key != "iba_0.25":
            # The triton paths run in Triton's CPU interpreter here (seconds per step): one row shows they work.
            return Item(size, key, variant, None, "smoke check: only the γ 0.25 IBA row runs on this backend")
        if not full and variant != "torch" and size != MAIN:
            return Item(size, key, variant, None, "smoke check: only the main size runs on this backend")
        return Item(size, key, variant, spec)

    eager = [v for v in variants if "+compile" not in v]
    compiled = [v for v in variants if "+compile" in v]
    extra_pairs = [(s, k) for k in EXTRA_ROWS for s in ("L", "S", "H") if s in extra]  # L first: test_train_step
    # ViT-B eager first, then ViT-B compiled, then the other sizes (a budget cuts from the end); within each,
    # the goal configuration (γ 0.25 with IBA) leads.
    main_rows = ["iba_0.25"] + [row.key for row in ROWS if row.key != "iba_0.25"]
    order = [item(MAIN, k, v) for k in main_rows for v in eager]
    order += [item(MAIN, k, v) for k in main_rows for v in compiled]
    order += [item(s, k, v) for s, k in extra_pairs for v in eager]
    order += [item(s, k, v) for s, k in extra_pairs for v in compiled]
    return order


# ------------------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------------------


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def ok(record: dict | None) -> bool:
    return record is not None and record["status"] == "ok"


def value(record: dict | None, name: str) -> float | None:
    return record.get(name) if ok(record) else None


def pairs(full: bool) -> list[tuple[str, str]]:
    """(size, row) of every line of the table, in the paper's order."""
    _, extra, _ = layout(full)
    shown = [k for k in ROW_BY_KEY if k in EXTRA_ROWS]
    return [(MAIN, row.key) for row in ROWS] + [(s, k) for s in EXTRA_ORDER if s in extra for k in shown]


def derive(records: dict) -> dict:
    """Each measured record plus its ratios: to the MAE row on the same backend (ViT-B), and to the torch
    reference of the same row (images/s and peak memory)."""
    out = {}
    for (s, k, v), r in records.items():
        r = dict(r)
        if ok(r):
            mae, ref = records.get((s, "mae", v)), records.get((s, k, "torch"))
            r["time_ratio_to_mae"] = ratio(value(r, "step_ms"), value(mae, "step_ms"))
            r["memory_ratio_to_mae"] = ratio(value(r, "peak_memory_bytes"), value(mae, "peak_memory_bytes"))
            r["speedup_vs_torch"] = ratio(value(r, "images_per_s"), value(ref, "images_per_s"))
            r["memory_vs_torch"] = ratio(value(r, "peak_memory_bytes"), value(ref, "peak_memory_bytes"))
            r["faster_than_torch"] = None if v == "torch" or r["speedup_vs_torch"] is None else (
                r["speedup_vs_torch"] > 1.0)
        out[(s, k, v)] = r
    return out


def goals_of(full: bool, rows: dict) -> dict:
    """The issue's Table 5 goal per fast variant: every row faster than the torch reference."""
    _, _, variants = layout(full)
    table = pairs(full)
    goals = {}
    for v in variants:
        if v == "torch":
            continue
        got = [rows[(s, k, v)].get("faster_than_torch") for s, k in table if (s, k, v) in rows]
        got = [g for g in got if g is not None]
        passed = all(got) if got else None
        goals[v] = {"goal": f"every Table 5 row faster on {v} than on torch", "rows_total": len(table),
                    "rows_compared": len(got), "rows_faster": sum(got), "verdict": verdict(passed),
                    "complete": len(got) == len(table)}
    return goals


def pct(x: float | None) -> str:
    return fmt(None if x is None else 100 * x, 1, "%")


def build_report(facts: dict, opts: dict, full: bool, rows: dict, goals: dict) -> list[str]:
    sizes, extra, variants = layout(full)
    fast_variants = [v for v in variants if v != "torch"]
    main_label = sizes[MAIN].label
    timer = "CUDA events" if DEVICE.type == "cuda" else "perf_counter (CPU)"
    precision = "bf16 autocast" if opts["precision"] == "bf16" else "fp32 (no autocast)"
    lines = [f"# Table 5, runtime ablation: full training step ({main_label})", "", *facts_markdown(facts), ""]
    if not full:
        lines += [f"**Smoke check** (tiny model, {DEVICE.type}): exercises the harness, measures nothing. Triton "
                  "rows run in Triton's CPU interpreter or fall back to the kernels' references; compile uses "
                  "torch.compile(backend='eager').", ""]
    lines += [f"One step = the trainer's (train/step.py): forward + backward + AdamW (fused on CUDA), {precision}, "
              f"batch {opts['batch_size']}, synthetic "
              "images already on the device, masks drawn on the device each step; "
              f"a first step (it compiles: its time is the last column) and {opts['warmup']} more warm-up step(s), "
              f"then the median of {opts['steps']} step(s) timed with {timer}. img/s = batch / median step; "
              "min/epoch = 1,281,167 ImageNet-1K images on one GPU; peak = torch.cuda.max_memory_allocated over the "
              "timed steps; GFLOP = model.flops_per_image(training=True) (matmuls, forward + backward); MFU against "
              "the dense bf16 peak of train/cards.py. ×MAE: ratio to the MAE row on the same backend. The paper's "
              "numbers (2x A100 80GB, FlashAttention-2, 400 epochs; memory from its Table 4, per GPU at its own "
              "batch) are for orientation: compare the ratios, not the absolutes.", ""]

    mae_paper = ROWS[0]
    header = ["configuration", "paper top-1", "paper min/epoch", "paper time ×MAE", "paper mem ×MAE", "ms/step",
              "img/s", "min/epoch", "time ×MAE", "peak GiB", "mem ×MAE", "GFLOP/img", "TFLOP/s", "MFU",
              "first step s"]
    for v in variants:
        table = []
        for row in ROWS:
            r = rows.get((MAIN, row.key, v))
            table.append([
                row.label, fmt(row.paper_top1), fmt(row.paper_min_per_epoch, 2),
                fmt(ratio(row.paper_min_per_epoch, mae_paper.paper_min_per_epoch), 2),
                fmt(ratio(row.paper_memory_mb, mae_paper.paper_memory_mb), 2),
                status_cell(r) or fmt(value(r, "step_ms"), 1), fmt(value(r, "images_per_s"), 0),
                fmt(value(r, "minutes_per_epoch"), 2), fmt(value(r, "time_ratio_to_mae"), 2),
                fmt(value(r, "peak_memory_gib"), 2), fmt(value(r, "memory_ratio_to_mae"), 2),
                fmt(None if not ok(r) else r["flops_per_image"] / 1e9, 1), fmt(value(r, "achieved_tflops"), 1),
                pct(value(r, "mfu")), fmt(value(r, "first_step_s"), 1),
            ])
        lines += [f"## {main_label}, backend `{v}`", "", *markdown_table(header, table), ""]

    lines += ["## Backends side by side (goal: every row faster on triton than on torch)", ""]
    table = []
    for s, k in pairs(full):
        rs = {v: rows.get((s, k, v)) for v in variants}
        table.append([f"{sizes[s].label}: {ROW_BY_KEY[k].short}",
                      *[status_cell(rs[v]) or fmt(value(rs[v], "images_per_s"), 0) for v in variants],
                      *[fmt(value(rs[v], "speedup_vs_torch"), 2, "x") for v in fast_variants],
                      *[fmt(value(rs[v], "peak_memory_gib"), 2) for v in variants],
                      *[verdict(value(rs[v], "faster_than_torch")) for v in fast_variants]])
    lines += [*markdown_table(["configuration", *[f"{v} img/s" for v in variants],
                               *[f"{v} ÷ torch" for v in fast_variants], *[f"{v} peak GiB" for v in variants],
                               *[f"goal: {v} > torch" for v in fast_variants]], table), ""]
    for v, g in goals.items():
        partial = "" if g["complete"] else f", only {g['rows_compared']} of {g['rows_total']} rows measured"
        lines.append(f"- Goal, every row faster on `{v}` than on `torch`: **{g['verdict']}** "
                     f"({g['rows_faster']} of {g['rows_compared']} compared rows faster{partial})")
    lines.append("")

    if extra:
        table = []
        for s, k in pairs(full)[len(ROWS):]:
            for v in variants:
                r = rows.get((s, k, v))
                table.append([sizes[s].label, ROW_BY_KEY[k].short, v, value(r, "batch_size") or "—",
                              status_cell(r) or fmt(value(r, "step_ms"), 1), fmt(value(r, "images_per_s"), 0),
                              fmt(value(r, "minutes_per_epoch"), 2), fmt(value(r, "peak_memory_gib"), 2),
                              fmt(None if not ok(r) else r["flops_per_image"] / 1e9, 1),
                              fmt(value(r, "achieved_tflops"), 1), pct(value(r, "mfu")),
                              fmt(value(r, "speedup_vs_torch"), 2, "x"), fmt(value(r, "first_step_s"), 1)])
        lines += ["## Other sizes: CrossMAE with inter-block attention", "",
                  *markdown_table(["model", "configuration", "backend", "batch", "ms/step", "img/s", "min/epoch",
                                   "peak GiB", "GFLOP/img", "TFLOP/s", "MFU", "÷ torch", "first step s"], table), ""]

    notes: dict[str, list[str]] = {}  # one line per distinct reason
    for (s, k, v), r in rows.items():
        what = f"{sizes[s].short} {ROW_BY_KEY[k].short} `{v}`"
        if r["status"] != "ok":
            notes.setdefault(f"{r['status']}: {r['reason']}", []).append(what)
        elif r.get("oom_at_batch_sizes"):
            notes.setdefault(f"out of memory at batch {r['oom_at_batch_sizes']}, measured at batch "
                             f"{r['batch_size']}", []).append(what)
    notes = [f"- {', '.join(whats)}: {reason}" for reason, whats in notes.items()]
    if notes:
        lines += ["## Not measured, or measured differently", "", *notes, ""]
    return lines


def chart(rows: dict, full: bool, opts: dict, gpu: str | None) -> bytes | None:
    """The table as a bar chart (PNG bytes), or None without matplotlib."""
    sizes, _, variants = layout(full)
    table = pairs(full)
    categories = [f"{sizes[s].short}: {ROW_BY_KEY[k].short}" for s, k in table]
    panels = [("images/s", {v: [value(rows.get((s, k, v)), "images_per_s") for s, k in table] for v in variants}),
              ("peak memory GiB", {v: [value(rows.get((s, k, v)), "peak_memory_gib") for s, k in table]
                                   for v in variants})]
    return bar_chart_png(f"Table 5: training step, batch {opts['batch_size']}, {gpu or 'CPU'}", categories, panels)


def write_all(out_dir: Path, facts: dict, opts: dict, full: bool, records: dict, planned: int,
              draw: bool = True) -> dict:
    """Markdown and JSON (and with ``draw`` the chart) from everything measured so far; smoke runs write only
    the ``_latest`` files."""
    rows = derive(records)
    goals = goals_of(full, rows)
    lines = build_report(facts, opts, full, rows, goals)
    stem = result_stem("table5", facts) if full else "table5_latest"
    png = chart(rows, full, opts, facts.get("gpu")) if draw else None
    if draw:
        lines += [f"Chart: `{stem}.png`. JSON: `{stem}.json`." if png is not None else
                  f"{matplotlib_missing()}. JSON: `{stem}.json`."]
    else:
        lines += [f"(Run in progress: {len(records)} of {planned} configurations done.) JSON: `{stem}.json`."]
    sizes = layout(full)[0]
    paper = {row.key: {"label": row.label, "top1": row.paper_top1, "min_per_epoch": row.paper_min_per_epoch,
                       "memory_mb": row.paper_memory_mb} for row in ROWS}
    payload = {"setup": {**opts, "device": str(DEVICE), "full": full, "planned_configurations": planned,
                         "done_configurations": len(records)},
               "goals": goals, "paper": paper,
               "rows": [{"size": s, "size_label": sizes[s].label, "row": k, "label": ROW_BY_KEY[k].label, **r}
                        for (s, k, _v), r in rows.items()]}
    files = write_results(out_dir, "table5", facts, payload, lines, attachments={"png": png}, dated=full)
    return {"lines": lines, "rows": rows, "goals": goals, "files": files, "png": png}


# ------------------------------------------------------------------------------------------------------------
# the benchmark
# ------------------------------------------------------------------------------------------------------------


def test_table5(benchmark_full, results_dir):
    if benchmark_full and not CUDA:
        pytest.skip("the full Table 5 benchmark needs a CUDA GPU (without --benchmark it runs as a CPU smoke check)")
    facts = machine_facts()  # before the run: the load average says whether something else was running
    opts = step_settings(benchmark_full)
    items = plan(benchmark_full)
    budget = TimeBudget(env_float("BENCH_TABLE5_BUDGET_S", None) if benchmark_full else None)
    sizes = layout(benchmark_full)[0]
    records: dict[tuple[str, str, str], dict] = {}
    for it in items:
        key = (it.size, it.row, it.variant)
        kind = (it.variant.endswith("+compile"), it.size)
        if it.spec is None:
            records[key] = {"status": "skipped", "reason": it.skip, "variant": it.variant}
            continue
        if not already_measured(it.spec, DEVICE) and not budget.allows(kind, DEFAULT_SECONDS.get(kind, 60)):
            records[key] = {"status": "skipped", "variant": it.variant, "model": it.spec.model,
                            "reason": f"time budget BENCH_TABLE5_BUDGET_S={budget.seconds:g} s would be exceeded "
                                      f"({budget.elapsed():.0f} s spent): raise it or narrow BENCH_SIZES / "
                                      "BENCH_VARIANTS"}
            continue
        r = measure_train_step(it.spec, DEVICE)
        if not r["cached"]:
            budget.record(kind, r["seconds_spent"])
        records[key] = r
        numbers = one_line(r)
        print(f"[table5] {sizes[it.size].label:>12s} {ROW_BY_KEY[it.row].short:>16s} {it.variant:>14s} {numbers}",
              flush=True)
        if benchmark_full:  # rewritten after every configuration: a run cut short keeps what it measured
            write_all(results_dir, facts, opts, benchmark_full, records, len(items), draw=False)
    report = write_all(results_dir, facts, opts, benchmark_full, records, len(items))
    print("\n" + "\n".join(report["lines"]))
    SESSION_REPORTS["table5"] = {"goals": report["goals"], "device": str(DEVICE), "full": benchmark_full}

    # The code paths produce sane numbers. Goals are reported above, never asserted.
    rows = report["rows"]
    assert set(rows) == {(s, k, v) for s, k in pairs(benchmark_full) for v in layout(benchmark_full)[2]}
    for key, r in rows.items():
        assert r["status"] in ("ok", "oom", "n/a", "error", "skipped"), (key, r)
        if r["status"] != "ok":
            assert r["reason"], key
            continue
        assert r["step_ms"] > 0 and r["images_per_s"] > 0 and r["minutes_per_epoch"] > 0, (key, r)
        assert r["flops_per_image"] > r["forward_flops_per_image"] > 0 and r["achieved_tflops"] >= 0, (key, r)
        assert math.isfinite(r["loss_first"]) and math.isfinite(r["loss_last"]), (key, r)
        assert r["batch_size"] <= r["requested_batch_size"], (key, r)
        assert r["peak_memory_bytes"] > 0 if CUDA else r["peak_memory_bytes"] is None, (key, r)
        if key[1] == "mae":
            assert r["time_ratio_to_mae"] == 1.0, (key, r)
        if key[2] == "torch":
            assert r["speedup_vs_torch"] == 1.0, (key, r)
    # Any failure other than "triton unavailable here" fails the benchmark (after its results are written).
    errors = {key: r["reason"] for key, r in rows.items() if r["status"] == "error"}
    assert not errors, f"configurations failed: {errors}"
    text = report["files"].latest_markdown.read_text()
    assert all(row.label in text for row in ROWS) and facts["command"] in text
    assert json.loads(report["files"].latest_json.read_text())["rows"]
    assert set(report["goals"]) == set(layout(benchmark_full)[2]) - {"torch"}
    if report["png"] is not None:  # matplotlib installed
        with Image.open(report["files"].attachments["png"]) as png:
            assert png.format == "PNG" and png.size[0] > 100 and png.size[1] > 100
    else:
        assert matplotlib_missing() is not None and f"{matplotlib_missing()}. JSON" in text
    if not benchmark_full:
        # Every torch row ran, and each fast variant ran its one row (or is n/a with the reason).
        assert all(r["status"] == "ok" for (_s, _k, v), r in rows.items() if v == "torch")
        assert all(rows[(MAIN, row.key, "torch")]["time_ratio_to_mae"] > 0 for row in ROWS)
        expected = "ok" if triton_unavailable_reason() is None else "n/a"
        for variant in ("triton", "triton+compile"):
            assert rows[(MAIN, "iba_0.25", variant)]["status"] == expected, rows[(MAIN, "iba_0.25", variant)]
