"""The ledger's report: every (model, backend) accounted and evaluated at the requested batch, a roofline
*estimate* for a card of train/cards.py, and the Markdown tables and JSON the CLI prints and writes."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

from bench.ledger.fit import Linear
from bench.ledger.step import DEFAULT_SAMPLE_BATCHES, ledger_for
from bench.machine import facts_markdown
from bench.results import markdown_table
from train.cards import CARDS, Card

ROOFLINE_FORMULA = "t = FLOPs / peak_FLOPs + bytes / peak_BW (no overlap; launches x overhead shown apart)"

# The goals for the fused path against the reference (reported, never asserted).
GOALS = (("other_bytes", 0.5, "non-matmul bytes"), ("launches", 0.6, "ops launched"),
         ("saved_per_image", 0.8, "saved for backward per image"), ("flops", 1.0, "FLOPs"))


def roofline(flops: float, bytes_moved: float, launches: float, card: Card, precision: str) -> dict:
    """An estimate, not a measurement: the step's time if every FLOP ran at the card's dense peak and every
    byte at its peak bandwidth, one after the other (``ROOFLINE_FORMULA``)."""
    t_flops = flops / card.peak_flops[precision]
    t_bytes = bytes_moved / card.bandwidth
    return {"card": card.name, "peak_flops": card.peak_flops[precision], "peak_bandwidth": card.bandwidth,
            "t_flops_ms": 1e3 * t_flops, "t_bytes_ms": 1e3 * t_bytes, "estimate_ms": 1e3 * (t_flops + t_bytes),
            "launch_overhead_ms": 1e3 * launches * card.launch_overhead_s, "formula": ROOFLINE_FORMULA}


def summarize(result: dict, batch: int, card: Card) -> dict:
    """The numbers of one (model, backend) at ``batch``: per class and in total, plus saved bytes and roofline."""
    total = {q: fit.at(batch) for q, fit in result["total"].items()}
    by_class = {c: {q: fit.at(batch) for q, fit in row.items()} for c, row in result["by_class"].items()}
    by_op = {c: {q: fit.at(batch) for q, fit in row.items()} for c, row in result["by_op"].items()}
    saved = result["saved"]
    return {
        "total": total, "by_class": by_class,
        "top_ops_by_bytes": dict(sorted(by_op.items(), key=lambda kv: -kv[1]["bytes"])[:25]),
        "saved_bytes": saved.at(batch), "saved_per_image": saved.slope, "saved_const": saved.const,
        "roofline": roofline(total["flops"], total["bytes"], total["launches"], card, result["precision"]),
    }


def _label(spec: dict) -> str:
    extra = ", ".join(f"{k}={v}" for k, v in spec["overrides"].items())
    return spec["model"] + (f" ({extra})" if extra else "")


def _gb(v: float) -> str:
    return f"{v / 1e9:,.2f}"


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def run_ledger(models: Sequence[tuple[str, dict]], backends: Sequence[str], batch: int, precision: str,
               card_name: str, sample_batches: tuple[int, int] = DEFAULT_SAMPLE_BATCHES,
               check_batch: int | None = None, log: Callable[[str], None] = print) -> dict:
    """The ledger of every (model, backend); a backend that fails is recorded with its error, never hidden.
    ``check_batch``: also count that batch and report how far the extrapolation is from it."""
    if card_name not in CARDS:
        raise ValueError(f"card={card_name!r}: expected one of {sorted(CARDS)}")
    card = CARDS[card_name]
    rows = []
    for name, overrides in models:
        entry = {"model": name, "overrides": overrides, "backends": {}}
        for backend in backends:
            t0 = time.perf_counter()
            try:
                result = ledger_for(name, backend, overrides, precision, sample_batches,
                                    extra_batches=() if check_batch is None else (check_batch,))
            except Exception as exc:  # recorded and shown in the table; the caller decides whether to fail
                entry["backends"][backend] = {"status": "error", "error": f"{type(exc).__name__}: {exc}"}
                log(f"{_label(entry)} [{backend}]: ERROR {type(exc).__name__}: {exc}")
                continue
            summary = summarize(result, batch, card)
            entry["backends"][backend] = {"status": "ok", "seconds": result["seconds"], **summary,
                                          "params": result["params"],
                                          "model_flops_per_image": result["model_flops_per_image"],
                                          "sample_batches": result["sample_batches"],
                                          "extrapolation_checks": result["extrapolation_checks"],
                                          "fits": {"total": result["total"], "saved": result["saved"]}}
            tot = summary["total"]
            log(f"{_label(entry)} [{backend}]: {tot['launches']:,.0f} ops, {_gb(tot['other_bytes'])} GB other bytes, "
                f"{tot['flops'] / 1e12:,.2f} TFLOP, saved {summary['saved_per_image'] / 1e6:,.2f} MB/img "
                f"({time.perf_counter() - t0:.0f} s)")
        rows.append(entry)
    return {"batch": batch, "precision": precision, "card": card_name, "card_constants": vars(card),
            "sample_batches": list(sample_batches), "check_batch": check_batch, "formula": ROOFLINE_FORMULA,
            "models": rows}


# ------------------------------------------------------------------------------------------------------------
# Markdown and JSON
# ------------------------------------------------------------------------------------------------------------


def _check_lines(entry: dict) -> list[str]:
    out = []
    for be, r in entry["backends"].items():
        for c in r.get("extrapolation_checks", []) if r["status"] == "ok" else []:
            if c["exact"]:
                out.append(f"Extrapolation check, {be}: counted at batch {c['batch']}, every op, count and byte as "
                           "predicted.")
                continue
            ops = sorted({f"{i['op']} ({i['quantity']})" for i in c["inexact"]})
            out.append(f"Extrapolation check, {be}: counted at batch {c['batch']}: {len(ops)} op quantit"
                       f"{'y' if len(ops) == 1 else 'ies'} off the line, {c['bytes_error'] / 1e6:,.3f} MB "
                       f"({100 * c['bytes_error_fraction']:.3f}% of the bytes); saved {c['saved_measured']:,} B "
                       f"measured vs {c['saved_predicted']:,.0f} predicted: " + "; ".join(ops[:8]))
    return [*out, ""] if out else []


def _goal_lines(entry: dict) -> list[str]:
    ref, fused = entry["backends"].get("torch"), entry["backends"].get("triton")
    if not (ref and fused and ref["status"] == fused["status"] == "ok"):
        return []
    cells = []
    for key, target, label in GOALS:
        a = fused["saved_per_image"] if key == "saved_per_image" else fused["total"][key]
        b = ref["saved_per_image"] if key == "saved_per_image" else ref["total"][key]
        r = _ratio(a, b)
        cells.append(f"{label} {r:.2f}x (goal <= {target:g}x: {'PASS' if r is not None and r <= target else 'FAIL'})")
    return ["Goals, triton ÷ torch: " + "; ".join(cells) + ".", ""]


def _class_table(entry: dict, ok: list[str]) -> list[str]:
    """Per op class (free ones left out), most bytes first: ops, GB and GFLOP of each backend."""
    results = [entry["backends"][be] for be in ok]
    classes = sorted({c for r in results for c in r["by_class"] if c not in ("view", "alloc")},
                     key=lambda c: -max(r["by_class"].get(c, {}).get("bytes", 0) for r in results))
    header = ["op class"] + [f"{be} {col}" for be in ok for col in ("ops", "GB", "GFLOP")]
    body = []
    for c in classes:
        row = [c]
        for r in results:
            v = r["by_class"].get(c)
            row += ["—"] * 3 if v is None else [f"{v['launches']:,.0f}", _gb(v["bytes"]), f"{v['flops'] / 1e9:,.1f}"]
        body.append(row)
    return markdown_table(header, body)


def _total_rows(b: int) -> list[tuple[str, Callable[[dict], float | None], Callable[[dict], str]]]:
    """(label, the value the ratio column divides, the cell) for every row of the totals table at batch ``b``."""

    def number(get: Callable[[dict], float], form: str):
        return get, lambda r: form.format(get(r))

    def fwd_bwd(r: dict) -> str:
        return f"{r['total']['forward_flops'] / 1e12:,.3f} / {r['total']['backward_flops'] / 1e12:,.3f}"

    def estimate(r: dict) -> str:
        ms = r["roofline"]["estimate_ms"]
        return f"{ms:,.2f} ({b / ms * 1e3:,.0f})"

    return [("ops launched (issue rule: custom op = 1)", *number(lambda r: r["total"]["launches"], "{:,.0f}")),
            ("GPU kernels (aten ops + Triton kernels)", *number(lambda r: r["total"]["gpu_kernels"], "{:,.0f}")),
            ("Triton kernels", *number(lambda r: r["total"]["triton_kernels"], "{:,.0f}")),
            ("free ops (views, allocations)", *number(lambda r: r["total"]["free_ops"], "{:,.0f}")),
            ("non-matmul bytes, GB", *number(lambda r: r["total"]["other_bytes"] / 1e9, "{:,.2f}")),
            ("matmul-class bytes, GB", *number(lambda r: r["total"]["matmul_bytes"] / 1e9, "{:,.2f}")),
            ("all bytes, GB", *number(lambda r: r["total"]["bytes"] / 1e9, "{:,.2f}")),
            ("FLOPs, TFLOP", *number(lambda r: r["total"]["flops"] / 1e12, "{:,.3f}")),
            ("  forward / backward TFLOP", lambda r: None, fwd_bwd),
            ("  FLOPs with attention backward = 2x forward, TFLOP",
             *number(lambda r: r["total"]["flops_attention_bwd_2x"] / 1e12, "{:,.3f}")),
            ("model.flops_per_image x batch, TFLOP", *number(lambda r: r["model_flops_per_image"] * b / 1e12,
                                                             "{:,.3f}")),
            ("saved for backward, MB per image", *number(lambda r: r["saved_per_image"] / 1e6, "{:,.2f}")),
            ("saved for backward, constant MB", *number(lambda r: r["saved_const"] / 1e6, "{:,.1f}")),
            ("roofline: FLOPs / peak, ms", *number(lambda r: r["roofline"]["t_flops_ms"], "{:,.2f}")),
            ("roofline: bytes / BW, ms", *number(lambda r: r["roofline"]["t_bytes_ms"], "{:,.2f}")),
            ("roofline estimate, ms (img/s)", lambda r: r["roofline"]["estimate_ms"], estimate),
            ("launches x overhead, ms", *number(lambda r: r["roofline"]["launch_overhead_ms"], "{:,.2f}"))]


def _totals_table(entry: dict, ok: list[str], b: int) -> list[str]:
    both = {"torch", "triton"} <= set(ok)
    header = ["total", *ok] + (["triton ÷ torch"] if both else [])
    body = []
    for label, value, cell in _total_rows(b):
        results = {be: entry["backends"][be] for be in ok}
        row = [label, *(cell(r) for r in results.values())]
        if both:
            ratio = _ratio(value(results["triton"]), value(results["torch"]))
            row.append("—" if ratio is None else f"{ratio:.2f}")
        body.append(row)
    return markdown_table(header, body)


def markdown(report: dict, facts: dict) -> list[str]:
    """The report as Markdown lines: the machine facts and conventions, then per model its class table, its
    totals (with the triton ÷ torch ratio when both ran), the issue's goals and the extrapolation checks."""
    b, card = report["batch"], CARDS[report["card"]]
    lines = ["# Step ledger: one training step accounted op by op (CPU dispatch, extrapolated)", "",
             *facts_markdown(facts), "",
             f"Batch {b}, {report['precision']}{' autocast' if report['precision'] != 'fp32' else ''}, eager; "
             f"counted at batches {report['sample_batches'][0]} and {report['sample_batches'][1]} on the CPU and "
             "extrapolated linearly (value = const + slope x batch). One step = the trainer's (train/step.py "
             "TrainStep): noise draw, forward, loss, backward, the AdamW of train/optim.py build_optimizer (fused "
             "on CUDA, multi-tensor on the CPU), zero_grad. Bytes = read + written per op (views free); matmul "
             "class = GEMM/conv + attention. Counting rules: bench/ledger/rules.py docstring.", "",
             f"Roofline for {card.name} ({card.bandwidth / 1e12:g} TB/s, "
             f"{card.peak_flops[report['precision']] / 1e12:g} TFLOP/s dense {report['precision']}): "
             f"**an estimate, not a measurement**: {report['formula']}; launch overhead "
             f"{card.launch_overhead_s * 1e6:g} µs per launch.", "",
             "Conventions: attention backward FLOPs = 2.5x forward (flash kernels recompute the scores; the "
             "'2x' row drops the recomputation); a custom op (crossmae::*) is one launch with its own inputs + "
             "outputs, plus the torch ops of its body, and its Triton kernels are counted apart; the Triton "
             "interpreter's copies are not counted. This is the CPU's dispatch: CUDA autocast would also run the "
             "LayerNorms that see bf16 inputs in fp32 (CrossMAE's IBA norms on the torch path). The optimizer is "
             "the one the trainer builds on a GPU (fused AdamW), counted on the CPU.", ""]
    for entry in report["models"]:
        lines += [f"## {_label(entry)}", ""]
        for be, r in entry["backends"].items():
            if r["status"] != "ok":
                lines += [f"**{be}: ERROR** `{r['error'][:400]}`", ""]
        ok = [be for be, r in entry["backends"].items() if r["status"] == "ok"]
        lines += [*_class_table(entry, ok), "", *_totals_table(entry, ok, b), "", *_goal_lines(entry),
                  *_check_lines(entry)]
    return lines


def to_jsonable(report: dict) -> dict:
    """The report with every fitted line as {"const", "slope"} and integral floats as ints."""

    def conv(o):
        if isinstance(o, Linear):
            return {"const": o.const, "slope": o.slope}
        if isinstance(o, dict):
            return {k: conv(v) for k, v in o.items()}
        if isinstance(o, list | tuple):
            return [conv(v) for v in o]
        if isinstance(o, float) and math.isfinite(o) and o == int(o) and abs(o) < 2**62:
            return int(o)
        return o

    return conv(report)
