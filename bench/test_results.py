"""The results folder rule and the one writer (bench/results.py), and the chart (bench/plots.py): benchmarks never
dirty the checkout unless asked."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from bench.machine import REPO, gpu_slug, machine_facts
from bench.plots import bar_chart_png, matplotlib_missing
from bench.results import LOCAL_RESULTS_DIR, RESULTS_DIR, resolve_results_dir, write_results


def test_results_folder_rule(monkeypatch, tmp_path):
    monkeypatch.delenv("BENCH_RESULTS_DIR", raising=False)
    assert resolve_results_dir(full=True, save_results=False) == LOCAL_RESULTS_DIR
    assert resolve_results_dir(full=False, save_results=False) == LOCAL_RESULTS_DIR / "smoke"
    assert resolve_results_dir(full=True, save_results=True) == RESULTS_DIR
    with pytest.raises(ValueError, match="--save-results without --benchmark"):
        resolve_results_dir(full=False, save_results=True)
    monkeypatch.setenv("BENCH_RESULTS_DIR", str(tmp_path))
    assert resolve_results_dir(full=True, save_results=False) == tmp_path
    assert resolve_results_dir(full=False, save_results=False) == tmp_path / "smoke"
    with pytest.raises(ValueError, match="unset BENCH_RESULTS_DIR or drop --save-results"):
        resolve_results_dir(full=True, save_results=True)


def test_write_results_names_and_rewrites(tmp_path):
    facts = machine_facts()
    first = write_results(tmp_path, "demo_kind", facts, {"rows": [1]}, ["# one"], attachments={"png": b"\x89PNG"})
    assert first.json.name == f"demo_kind_{gpu_slug(facts)}_{facts['date_tag']}.json"
    again = write_results(tmp_path, "demo_kind", facts, {"rows": [1, 2]}, ["# two"], attachments={"png": None})
    assert again.json == first.json  # the same run rewrites its own files
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted([first.json.name, first.markdown.name, first.json.with_suffix(".png").name,
                            "demo_kind_latest.json", "demo_kind_latest.md", "demo_kind_latest.png"]), names
    data = json.loads(again.latest_json.read_text())
    assert data["kind"] == "demo_kind" and data["rows"] == [1, 2] and data["machine"]["command"] == facts["command"]
    assert again.latest_markdown.read_text() == "# two\n"
    smoke = write_results(tmp_path / "smoke", "demo_kind", facts, {}, ["x"], dated=False)
    assert sorted(p.name for p in smoke.json.parent.iterdir()) == ["demo_kind_latest.json", "demo_kind_latest.md"]
    with pytest.raises(ValueError, match="kind='a b'"):
        write_results(tmp_path, "a b", facts, {}, [])


@pytest.mark.skipif(shutil.which("git") is None or not (REPO / ".git").exists(), reason="needs a git checkout")
def test_a_benchmark_run_leaves_the_checkout_clean():
    """A benchmark writes its results (here the data-loading smoke: seconds) and bench/results/ stays as git
    has it: nothing tracked changes, nothing untracked appears outside the ignored local/ folder."""
    def status() -> str:
        return subprocess.run(["git", "status", "--porcelain", "--untracked-files=all", "--", "bench/results"],
                              cwd=REPO, capture_output=True, text=True, check=True).stdout

    before = status()
    env = {k: v for k, v in os.environ.items() if k != "BENCH_RESULTS_DIR"}
    latest = LOCAL_RESULTS_DIR / "smoke" / "data_loading_latest.json"
    stamp = latest.stat().st_mtime_ns if latest.exists() else 0
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "bench/test_data_loading.py::test_data_loading_throughput"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert latest.exists() and latest.stat().st_mtime_ns > stamp  # it did write, into the ignored folder
    assert status() == before


def test_save_results_needs_a_full_run():
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--save-results",
                           "--collect-only", "bench/test_results.py"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 4 and "--save-results without --benchmark" in proc.stderr, proc.stderr[-2000:]


def test_chart_is_drawn_or_said_missing_in_one_line(capsys):
    png = bar_chart_png("title γ 0.25", ["a", "b"], [("images/s", {"torch": [1.0, None], "triton": [2.0, 3.0]})])
    if matplotlib_missing() is None:
        assert png is not None and png.startswith(b"\x89PNG")
    else:
        assert png is None
        assert capsys.readouterr().out.strip() == matplotlib_missing()
