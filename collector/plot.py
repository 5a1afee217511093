"""Kaplan–Meier survival curves per provider, as a PNG: share still online vs hours since notice.

matplotlib is an optional extra (``takedown-monitor[plot]``); it is imported only when a plot is
drawn, with the non-interactive Agg backend, so the collector itself never needs it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from collector.report import HOUR, survival_curve
from collector.store.reads import UrlOutcome

MIN_HOURS = 1 / 60
"""Left edge of the log-scale x axis (one minute): a latency of 0 cannot sit on a log scale."""


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


def plot_survival(
    outcomes_by_provider: Mapping[str, Sequence[UrlOutcome]],
    path: Path,
    now: float,
    *,
    top: int = 8,
    latency_end: str = "first_removed",
    deadline: float = 24 * HOUR,
) -> list[str]:
    """Draw the curves of the `top` providers by reports into `path`; return the providers drawn."""
    try:
        import matplotlib  # type: ignore[import-not-found,unused-ignore]

        matplotlib.use("Agg")
        from matplotlib import pyplot  # type: ignore[import-not-found,unused-ignore]
    except ImportError as exc:
        raise PlotUnavailable("plotting needs matplotlib: install takedown-monitor[plot]") from exc
    chosen = sorted(
        outcomes_by_provider,
        key=lambda p: (-sum(o.reports for o in outcomes_by_provider[p]), p),
    )[:top]
    fig, ax = pyplot.subplots(figsize=(9, 5.5), dpi=100)
    try:
        longest = deadline / HOUR * 2
        for provider in chosen:
            items = outcomes_by_provider[provider]
            curve = survival_curve(items, now, latency_end)
            ages = [max(0.0, now - o.notified_at) for o in items]
            end = max([*ages, *curve.times, 0.0]) / HOUR
            longest = max(longest, end)
            xs = [MIN_HOURS, *(max(MIN_HOURS, t / HOUR) for t in curve.times), max(end, MIN_HOURS)]
            ys = [1.0, *curve.survival, curve.survival[-1] if curve.survival else 1.0]
            ax.step(xs, ys, where="post", label=f"{provider} (n={curve.n})")
        ax.axvline(deadline / HOUR, color="grey", linestyle="--", label=f"{deadline / HOUR:g}h")
        ax.set_xscale("log")
        ax.set_xlim(MIN_HOURS, max(longest, MIN_HOURS * 10))
        ax.set_ylim(0.0, 1.02)
        ax.set_xlabel("hours since notice (log scale)")
        ax.set_ylabel("share still online (Kaplan–Meier)")
        ax.set_title("Time to removal after notice, per provider")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="lower left", fontsize="small")
        fig.tight_layout()
        fig.savefig(path, format="png")
    finally:
        pyplot.close(fig)
    return chosen
