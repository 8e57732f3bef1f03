"""Server-side plots of the monitoring page: matplotlib (Agg) to inline SVG, no script, no CDN."""

from __future__ import annotations

import io
import threading
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after choosing the backend
import numpy as np  # noqa: E402

from node.monitoring.drift import QUANTILE_LEVELS  # noqa: E402

_LOCK = threading.Lock()  # pyplot's state is global: one figure at a time


def _svg(fig: plt.Figure) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg") :]  # inline: without the XML prolog and DOCTYPE


def daily_svg(daily: Sequence[tuple[str, int, int]], title: str) -> str:
    """Runs per day (bars) and the share with a positive finding (line)."""
    with _LOCK:
        fig, ax = plt.subplots(figsize=(4.2, 2.4), dpi=100)
        days = [d[5:] for d, _, _ in daily]
        ax.bar(days, [n for _, n, _ in daily], color="#7fb2ff", label="runs")
        ax.set_ylabel("runs")
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=7)
        ax2 = ax.twinx()
        ax2.plot(
            days, [p / n if n else 0 for _, n, p in daily], color="#cf222e", marker="o", label="positive"
        )
        ax2.set_ylim(0, 1)
        ax2.set_ylabel("positive rate", fontsize=8)
        ax2.tick_params(labelsize=7)
        return _svg(fig)


def scores_svg(scores: Sequence[float], reference_quantiles: Sequence[float], title: str) -> str:
    """Empirical CDF of the live scores against the validation reference's."""
    with _LOCK:
        fig, ax = plt.subplots(figsize=(4.2, 2.4), dpi=100)
        if scores:
            x = np.sort(np.asarray(scores, dtype=float))
            ax.step(x, np.arange(1, x.size + 1) / x.size, where="post", color="#1d2a3a", label="live")
        if reference_quantiles:
            ax.plot(
                reference_quantiles,
                QUANTILE_LEVELS[: len(reference_quantiles)],
                "--",
                color="#1a7f37",
                label="validation",
            )
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("score", fontsize=8)
        ax.set_ylabel("cumulative share", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7, loc="lower right")
        return _svg(fig)


def scatter_svg(shadow: Sequence[float], active: Sequence[float], title: str) -> str:
    """Shadow model scores against the active model's on the same subjects."""
    with _LOCK:
        fig, ax = plt.subplots(figsize=(3.0, 3.0), dpi=100)
        ax.scatter(active, shadow, s=10, color="#1d2a3a", alpha=0.7)
        ax.plot([0, 1], [0, 1], ":", color="#888")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("active score", fontsize=8)
        ax.set_ylabel("shadow score", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=7)
        return _svg(fig)
