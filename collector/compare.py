"""Two reporting windows side by side: reports, median latency and share removed ≤24h per provider.

A window selects URLs by their first notice, [since, until). The previous window has the same
length and ends where the current one starts. Both are measured as of the same `now`, with
censoring at each URL's current age, so a slower provider does not look better in the older
window just because fewer of its URLs have been judged.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from typing import Any

from collector.report import FORMATS, aligned, csv_text, human_duration, markdown, provider_table
from collector.store.reads import UrlOutcome

Window = tuple[float, float]


def windows(since: float | None, until: float | None, now: float) -> tuple[Window, Window]:
    """The current window [since, until or now) and the previous one of equal length."""
    if since is None:
        raise ValueError("comparing windows needs a start (--since)")
    end = now if until is None else until
    if end <= since:
        raise ValueError("the window is empty: --until must be after --since")
    return (since, end), (since - (end - since), since)


@dataclass(frozen=True)
class ComparisonRow:
    """One provider in both windows; a change is None when either side is unknown."""

    provider: str
    reports: int
    reports_previous: int
    reports_change: int
    median_latency_seconds: float | None
    median_latency_seconds_previous: float | None
    median_latency_seconds_change: float | None
    removed_within_24h: float | None
    removed_within_24h_previous: float | None
    removed_within_24h_change: float | None


def _change(current: float | None, previous: float | None) -> float | None:
    return None if current is None or previous is None else current - previous


def compare_windows(
    current: Sequence[UrlOutcome],
    previous: Sequence[UrlOutcome],
    now: float,
    **table_options: Any,
) -> list[ComparisonRow]:
    """Per provider in either window: current, previous and change; most reports now first.

    `table_options` are passed to `provider_table` (deadline, latency_end, ...).
    """
    now_rows = {r.provider: r for r in provider_table(current, now, **table_options)}
    then_rows = {r.provider: r for r in provider_table(previous, now, **table_options)}
    out = []
    for provider in now_rows.keys() | then_rows.keys():
        a, b = now_rows.get(provider), then_rows.get(provider)
        median_a = a.median_latency_seconds if a else None
        median_b = b.median_latency_seconds if b else None
        share_a = a.removed_within_24h if a else None
        share_b = b.removed_within_24h if b else None
        reports_a, reports_b = (a.reports if a else 0), (b.reports if b else 0)
        out.append(
            ComparisonRow(
                provider,
                reports_a,
                reports_b,
                reports_a - reports_b,
                median_a,
                median_b,
                _change(median_a, median_b),
                share_a,
                share_b,
                _change(share_a, share_b),
            )
        )
    out.sort(key=lambda r: (-r.reports, -r.reports_previous, r.provider))
    return out


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _signed_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    sign = "+" if seconds > 0 else "-" if seconds < 0 else "±"
    return sign + human_duration(abs(seconds))


def _signed_points(share: float | None) -> str:
    return "-" if share is None else f"{100 * share:+.0f}pp"


def _pct(share: float | None) -> str:
    return "-" if share is None else f"{100 * share:.0f}%"


HEADER = (
    "provider", "reports", "prev", "Δ", "median", "prev", "Δ", "≤24h", "prev", "Δ",
)  # fmt: skip


def render_comparison(
    rows: Sequence[ComparisonRow], fmt: str, current: Window, previous: Window
) -> str:
    """The comparison as "table", "csv", "json" or "markdown"; windows named in ISO 8601 UTC."""
    if fmt == "json":
        doc = {
            "window": {"since": _iso(current[0]), "until": _iso(current[1])},
            "previous_window": {"since": _iso(previous[0]), "until": _iso(previous[1])},
            "providers": [asdict(r) for r in rows],
        }
        return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"
    if fmt == "csv":
        return csv_text([asdict(r) for r in rows], [f.name for f in fields(ComparisonRow)])
    lines = [
        [r.provider, str(r.reports), str(r.reports_previous), f"{r.reports_change:+d}",
         human_duration(r.median_latency_seconds),
         human_duration(r.median_latency_seconds_previous),
         _signed_duration(r.median_latency_seconds_change), _pct(r.removed_within_24h),
         _pct(r.removed_within_24h_previous), _signed_points(r.removed_within_24h_change)]
        for r in rows
    ]  # fmt: skip
    title = (
        f"window {_iso(current[0])} .. {_iso(current[1])}"
        f" vs {_iso(previous[0])} .. {_iso(previous[1])}"
    )
    if fmt == "markdown":
        return f"{title}\n\n" + markdown(HEADER, lines, left=1)
    if fmt != "table":
        raise ValueError(f"unknown format {fmt!r}: use {', '.join(FORMATS)}")
    text = [title, "", *aligned(HEADER, lines, left=1)]
    if not lines:
        text.append("(no reports in either window)")
    return "\n".join(text) + "\n"
