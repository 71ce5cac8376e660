"""Charts of benchmark results, drawn with matplotlib (optional: without it no chart is drawn, and the run
says so in one line; the JSON and Markdown results do not depend on it)."""

from __future__ import annotations

import io
from collections.abc import Sequence

PALETTE = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860"]


def matplotlib_missing() -> str | None:
    """None when matplotlib imports; else the one line to print instead of a chart."""
    try:
        import matplotlib  # noqa: F401
    except Exception as exc:  # not installed, or a broken install: either way no chart
        return f"no chart: matplotlib does not import ({type(exc).__name__}); pip install matplotlib to draw one"
    return None


def bar_chart_png(title: str, categories: Sequence[str],
                  panels: Sequence[tuple[str, dict[str, Sequence[float | None]]]]) -> bytes | None:
    """Grouped bars as PNG bytes: one panel per (y label, {series: one value per category}); None draws no bar.
    Returns None (after printing why) when matplotlib is not installed."""
    missing = matplotlib_missing()
    if missing is not None:
        print(missing, flush=True)
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display on a benchmark machine
    import matplotlib.pyplot as plt

    n = len(categories)
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(8.0, 0.9 * n + 3), 3.6 * len(panels)), squeeze=False)
    try:
        for ax, (ylabel, series) in zip(axes[:, 0], panels, strict=True):
            width = 0.8 / max(len(series), 1)
            for s, (name, values) in enumerate(series.items()):
                xs = [c + (s - (len(series) - 1) / 2) * width for c in range(n)]
                heights = [v if v is not None else 0.0 for v in values]
                ax.bar(xs, heights, width, label=name, color=PALETTE[s % len(PALETTE)])
            ax.set_ylabel(ylabel)
            ax.set_xticks(range(n))
            ax.set_xticklabels(categories, rotation=30, ha="right", fontsize=8)
            ax.grid(axis="y", alpha=0.3)
            ax.legend(fontsize=8)
        axes[0, 0].set_title(title, fontsize=10)
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=110)
    finally:
        plt.close(fig)
    return buffer.getvalue()
