"""Machine facts: what every benchmark number is written down with.

``machine_facts()`` returns the card, driver, CUDA, torch / triton / Python versions, the CPU and its load, the
git commit, the exact command line and the time; ``facts_markdown(facts)`` renders them as the lines under a
results title; ``gpu_slug(facts)`` names the card in file names.
"""

from __future__ import annotations

import os
import platform
import re
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def command_line() -> str:
    """The command as typed: ``pytest bench/... --benchmark`` or ``python -m pytest ...``."""
    argv0 = Path(sys.argv[0]).name if sys.argv else ""
    if argv0 in ("pytest", "py.test"):
        return "pytest " + shlex.join(sys.argv[1:])
    if argv0 == "__main__.py" and "pytest" in sys.argv[0]:
        return "python -m pytest " + shlex.join(sys.argv[1:])
    return shlex.join(sys.argv)


def _run(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, cwd=REPO)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                        platform.processor())
    except OSError:
        return platform.processor()


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # not installed, or broken: either way no version to report
        return None


def machine_facts() -> dict:
    """Everything a number needs beside it. Call it before the measurements (the load average then says
    whether something else was using the CPU)."""
    cuda = torch.cuda.is_available()
    now = datetime.now(timezone.utc)
    commit = _run(["git", "rev-parse", "--short=12", "HEAD"])
    if commit is not None and _run(["git", "status", "--porcelain", "--untracked-files=no"]):
        commit += "+dirty"
    facts = {
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "gpu_count": torch.cuda.device_count() if cuda else 0,
        "gpu_memory_gib": None, "sm_count": None, "compute_capability": None,
        "driver": None,
        "cuda_runtime": torch.version.cuda,
        "cpu": _cpu_name(), "cpu_count": os.cpu_count() or 1,
        "python": platform.python_version(), "torch": torch.__version__, "triton": _version("triton"),
        "numpy": _version("numpy"), "pillow": _version("PIL"), "platform": platform.platform(),
        "git_commit": commit,
        "load_average_1_5_15_min": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "command": command_line(),
        "argv": list(sys.argv),
        "cwd": os.getcwd(),
        "date": now.strftime("%Y-%m-%d %H:%M UTC"),
        "timestamp": now.isoformat(timespec="seconds"),
        "date_tag": now.strftime("%Y%m%d-%H%M%S"),
    }
    if cuda:
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        facts["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        facts["sm_count"] = props.multi_processor_count
        facts["compute_capability"] = f"{props.major}.{props.minor}"
        smi = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        facts["driver"] = smi.splitlines()[0].strip() if smi else None
        if facts["driver"] is None:
            try:  # the CUDA driver API version (e.g. 12080), when nvidia-smi is missing
                facts["driver"] = f"CUDA driver API {torch._C._cuda_getDriverVersion()}"
            except Exception:
                pass
    return facts


def gpu_slug(facts: dict) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia_h100_80gb_hbm3'; 'cpu' without a GPU."""
    return re.sub(r"[^a-z0-9]+", "_", (facts.get("gpu") or "cpu").lower()).strip("_")


def facts_markdown(facts: dict) -> list[str]:
    """The lines under a results title: date, card, versions, commit, command."""
    gpu = "none (CPU)" if not facts.get("gpu") else (
        f"{facts['gpu']} ({facts['gpu_memory_gib']} GiB, {facts['sm_count']} SMs, sm_{facts['compute_capability']})"
        + (f" x{facts['gpu_count']}" if facts.get("gpu_count", 1) > 1 else ""))
    load = facts.get("load_average_1_5_15_min")
    return [
        f"{facts['date']} · GPU: {gpu} · driver {facts.get('driver') or '—'} · CUDA {facts.get('cuda_runtime') or '—'}"
        f" · torch {facts['torch']} · triton {facts.get('triton') or 'not installed'} · Python {facts['python']}",
        "",
        f"CPU: {facts['cpu']} ({facts['cpu_count']} cores)"
        + (f", load average before the run {' / '.join(map(str, load))} (1/5/15 min)" if load else "")
        + f" · commit {facts.get('git_commit') or 'unknown'}",
        "",
        f"Command: `{facts['command']}`",
    ]
