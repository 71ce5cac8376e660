"""Where benchmark results go, how they are named, and the one writer every benchmark uses.

The folder (``results_dir``):

* ``--save-results`` (full ``--benchmark`` runs only): ``bench/results/``, the committed results;
* else ``$BENCH_RESULTS_DIR`` when set (bench/gpu_all.sh points it into ``$OUT``);
* else ``bench/results/local/``, which git ignores: running a benchmark never dirties the checkout unless asked.

Smoke runs (no ``--benchmark``) write into ``<that folder>/smoke/`` and never into ``bench/results/`` itself.

The names: ``<kind>_<gpu>_<YYYYmmdd-HHMMSS>.<ext>`` (one per run, kept) and ``<kind>_latest.<ext>`` (the newest),
for ext in json, md and any attachment (png). Smoke runs write only the ``_latest`` files, so that the test suite
does not pile up dated copies. Every file is written atomically (a temporary file in the same folder, then
``os.replace``): a run killed mid-write leaves the previous version, and two processes never see a torn file.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench.machine import REPO, gpu_slug

RESULTS_DIR = REPO / "bench" / "results"  # committed: only --save-results writes here
LOCAL_RESULTS_DIR = RESULTS_DIR / "local"  # the default; listed in .gitignore
RESULTS_DIR_ENV = "BENCH_RESULTS_DIR"


def resolve_results_dir(full: bool, save_results: bool) -> Path:
    """The folder a benchmark session writes into (see the module docstring); raises ValueError for a
    combination that would write smoke numbers over the committed results or is ambiguous."""
    env = os.environ.get(RESULTS_DIR_ENV, "").strip()
    if save_results and not full:
        raise ValueError("--save-results without --benchmark: smoke checks measure nothing worth committing; "
                         "add --benchmark (full run) or drop --save-results")
    if save_results and env:
        raise ValueError(f"--save-results writes bench/results/ but {RESULTS_DIR_ENV}={env!r} asks for another "
                         f"folder: unset {RESULTS_DIR_ENV} or drop --save-results")
    if save_results:
        return RESULTS_DIR
    base = Path(env).expanduser() if env else LOCAL_RESULTS_DIR
    return base if full else base / "smoke"


# ------------------------------------------------------------------------------------------------------------
# formatting
# ------------------------------------------------------------------------------------------------------------


def fmt(value: float | None, digits: int = 1, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return f"{value:,.{digits}f}{suffix}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(map(cell, headers)) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(map(cell, row)) + " |" for row in rows]
    return lines


def verdict(passed: bool | None) -> str:
    """A goal's cell: PASS / FAIL, or '—' when a number it needs was not measured. Goals are reported, never
    asserted."""
    return "—" if passed is None else ("PASS" if passed else "FAIL")


def status_cell(record: dict | None) -> str:
    """What a table shows instead of numbers for a configuration that was not measured ('' when measured)."""
    if record is None:
        return "not run"
    return {"ok": "", "oom": "OOM", "n/a": "n/a", "error": "ERROR", "skipped": "skipped"}.get(record["status"],
                                                                                           record["status"])


def to_json(obj: Any) -> str:
    def default(o):
        if isinstance(o, Path):
            return str(o)
        if hasattr(o, "__dataclass_fields__"):
            return asdict(o)
        if isinstance(o, torch.Tensor):
            return o.tolist()
        return repr(o)

    return json.dumps(obj, indent=1, default=default) + "\n"


# ------------------------------------------------------------------------------------------------------------
# writing
# ------------------------------------------------------------------------------------------------------------


@dataclass
class ResultFiles:
    """The files one ``write_results`` call wrote (``json`` / ``markdown`` are the dated ones, or the latest
    ones when the call was not dated); ``attachments``: suffix -> the latest file."""

    json: Path
    markdown: Path
    latest_json: Path
    latest_markdown: Path
    attachments: dict[str, Path] = field(default_factory=dict)


def result_stem(kind: str, facts: dict) -> str:
    """``<kind>_<gpu>_<date>``: the dated name of one run's files."""
    return f"{kind}_{gpu_slug(facts)}_{facts['date_tag']}"


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader sees the old file or the new one, never a torn one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; results are for everyone to read
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_results(results_dir: Path, kind: str, facts: dict, payload: dict, markdown: Sequence[str],
                  attachments: Mapping[str, bytes | None] | None = None, dated: bool = True) -> ResultFiles:
    """Write one result: ``{"kind", "machine": facts, **payload}`` as JSON and ``markdown`` (a list of lines),
    plus ``attachments`` (suffix -> bytes; None is skipped, e.g. a chart matplotlib could not draw), as
    ``<kind>_latest.*`` and, when ``dated``, ``<kind>_<gpu>_<date>.*``. Call it again with more rows to
    update the same files (the date comes from ``facts``, taken once per run)."""
    if not kind or any(c in kind for c in "/\\ "):
        raise ValueError(f"kind={kind!r}: expected a file-name word such as 'table5'")
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    texts = {"json": to_json({"kind": kind, "machine": facts, **payload}).encode(),
             "md": ("\n".join(markdown).rstrip("\n") + "\n").encode()}
    texts.update({suffix: data for suffix, data in (attachments or {}).items() if data is not None})
    stems = [f"{kind}_latest"] + ([result_stem(kind, facts)] if dated else [])
    for stem in stems:
        for suffix, data in texts.items():
            write_atomic(results_dir / f"{stem}.{suffix}", data)
    own = results_dir / stems[-1]
    latest = results_dir / stems[0]
    return ResultFiles(json=own.with_suffix(".json"), markdown=own.with_suffix(".md"),
                       latest_json=latest.with_suffix(".json"), latest_markdown=latest.with_suffix(".md"),
                       attachments={s: latest.with_suffix(f".{s}") for s in texts if s not in ("json", "md")})


def add_results_options(parser: argparse.ArgumentParser) -> None:
    """A benchmark command's options for where its results go: --results-dir, --save-results, --no-write."""
    parser.add_argument("--results-dir", type=Path, default=None,
                        help="where to write (default: bench/results/local/, git-ignored, or $BENCH_RESULTS_DIR)")
    parser.add_argument("--save-results", action="store_true",
                        help="write the committed bench/results/ instead (a deliberate update)")
    parser.add_argument("--no-write", action="store_true", help="print the table, write nothing")
