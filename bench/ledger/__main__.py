"""``python -m bench.ledger``: the command line of the step ledger (see the package docstring)."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from typing import Any

import bench.ledger
from bench.ledger.report import markdown, run_ledger, to_jsonable
from bench.ledger.step import BACKENDS, DEFAULT_SAMPLE_BATCHES
from bench.machine import machine_facts
from bench.results import add_results_options, resolve_results_dir, write_results
from train.cards import CARDS
from train.step import PRECISIONS

KIND = "ledger"


def _parse_value(text: str) -> Any:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "none":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_models(text: str) -> list[tuple[str, dict]]:
    """'crossmae_vit_base_patch16:kept_mask_ratio=0.75,mae_vit_base_patch16' -> [(name, overrides), ...]."""
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, *pairs = item.split(":")
        overrides = {}
        for pair in pairs:
            if "=" not in pair:
                raise ValueError(f"--models: {pair!r} in {item!r} is not key=value (e.g. {name}:kept_mask_ratio=0.75)")
            key, value = pair.split("=", 1)
            overrides[key.strip()] = _parse_value(value.strip())
        out.append((name, overrides))
    if not out:
        raise ValueError("--models: give at least one model name")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ledger", description=bench.ledger.__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="crossmae_vit_base_patch16",
                        help="comma-separated registry names, each optionally with :key=value create_model overrides")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--precision", choices=PRECISIONS, default="bf16")
    parser.add_argument("--backends", default="torch,triton")
    parser.add_argument("--card", choices=sorted(CARDS), default="H200")
    parser.add_argument("--sample-batches", default=",".join(map(str, DEFAULT_SAMPLE_BATCHES)),
                        help="the two small batches counted on the CPU (default 2,3)")
    parser.add_argument("--check-batch", type=int, default=None,
                        help="also count this batch and report how far the extrapolation is from it")
    add_results_options(parser)
    args = parser.parse_args(argv)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    bad = [b for b in backends if b not in BACKENDS]
    if bad:
        parser.error(f"--backends: unknown {bad}; allowed: {', '.join(BACKENDS)}")
    try:
        samples = tuple(int(s) for s in args.sample_batches.split(","))
        models = parse_models(args.models)
    except ValueError as exc:
        parser.error(str(exc))
    if len(samples) != 2:
        parser.error(f"--sample-batches {args.sample_batches!r}: give two batches, e.g. 2,3")
    facts = machine_facts()
    facts["command"] = "python -m bench.ledger " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    report = run_ledger(models, backends, args.batch, args.precision, args.card, samples, args.check_batch,
                        log=lambda s: print(s, file=sys.stderr, flush=True))
    lines = markdown(report, facts)
    print("\n".join(lines))
    if not args.no_write:
        results_dir = args.results_dir or resolve_results_dir(full=True, save_results=args.save_results)
        files = write_results(results_dir, KIND, facts, to_jsonable(report), lines)
        print(f"\nwrote {files.json} and {files.markdown}", file=sys.stderr)
    failed = [(e["model"], be) for e in report["models"] for be, r in e["backends"].items() if r["status"] != "ok"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
