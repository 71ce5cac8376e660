"""Writing an analysis's results: ``<name>.json`` (every number) and ``<name>.md`` (tables for a reader), each
written whole (a temporary renamed over the name), in the output folder.

JSON has no infinity: a non-finite number (a perfect patch's PSNR) is written as the string "inf", "-inf" or
"nan".
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from train.backend_check import machine_facts
from train.files import replace_atomically


def json_safe(value: Any) -> Any:
    """``value`` with tuples as lists and non-finite floats as strings, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def machine(device: torch.device) -> dict[str, Any]:
    """Where the numbers were measured: the device and card (``train.backend_check.machine_facts``: driver, CUDA,
    torch and triton versions), Python, the platform and the cores."""
    return {"device": str(device), **machine_facts(device), "python": sys.version.split()[0],
            "platform": platform.platform(), "cpu_cores": os.cpu_count()}


def write_report(out_dir: str | os.PathLike, name: str, data: dict[str, Any], markdown: str) -> list[Path]:
    """Write ``out_dir/name.json`` and ``out_dir/name.md`` (the folder is made if needed); returns both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.json", out / f"{name}.md"]
    text = json.dumps(json_safe(data), indent=1) + "\n"
    replace_atomically(paths[0], lambda f: f.write(text.encode()))
    replace_atomically(paths[1], lambda f: f.write(markdown.rstrip("\n").encode() + b"\n"))
    return paths


def number(value: float | None, digits: int = 3) -> str:
    """A table cell: fixed digits, "inf" for infinity, "-" for None."""
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return "inf" if value > 0 else ("-inf" if value < 0 else "nan")
    return f"{value:.{digits}f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub Markdown table; cells are written with ``str``."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
