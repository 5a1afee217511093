"""`report --format html`: the per-provider table as one self-contained page.

The page renders from the same records `report --format json` prints (`report.record`),
so its figures are those figures; each figure cell also carries the JSON value in a
`data-value` attribute, for a reader's script (and the test) to check against. Survival
curves are inline SVG with the time axis fitted to the data: no script, no network, no
external file, and no matplotlib (that stays optional, for --plot PNG).
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from collector.durations import duration_label
from collector.report import human_duration, percent
from collector.survival import SurvivalCurve

# (JSON key, column head, how a value reads); a key the records lack is left out, so the
# page follows the table's fields as they change.
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("rank", "Rank", "int"),
    ("provider", "Provider", "text"),
    ("asns", "AS numbers", "list"),
    ("countries", "Served from", "list"),
    ("reports", "Reports", "int"),
    ("report_share", "Share of reports", "share"),
    ("urls", "URLs", "int"),
    ("removed", "Removed", "int"),
    ("removed_1h", "≤ 1 h", "int"),
    ("removed_1h_12h", "1–12 h", "int"),
    ("removed_12h_24h", "12–24 h", "int"),
    ("removed_24h_48h", "24–48 h", "int"),
    ("removed_over_48h", "> 48 h", "int"),
    ("median_latency_seconds", "Median (KM)", "duration"),
    ("p90_latency_seconds", "90th pct (KM)", "duration"),
    ("removed_within_24h", "Removed ≤ 24 h (KM)", "share"),
    ("online", "Still online", "int"),
    ("overdue", "Overdue", "int"),
    ("reappeared", "Reappeared", "int"),
    ("geoblocked", "Geo-blocked", "int"),
    ("nxdomain", "DNS gone", "int"),
    ("pending", "Not yet seen", "int"),
)
PALETTE = ("#1b6ca8", "#d1495b", "#2e933c", "#edae49", "#6a4c93", "#00798c", "#8d6a9f", "#555")


@dataclass(frozen=True)
class Window:
    """What the page covers: notices in [since, until), measured up to `now` (Unix seconds)."""

    since: float | None
    until: float | None
    now: float


def cell_text(kind: str, value: Any) -> str:
    """How a JSON value reads in the page's table."""
    if value is None:
        return "–"
    if kind == "share":
        return percent(float(value))
    if kind == "duration":
        return human_duration(float(value))
    if kind == "list":
        return ", ".join(str(v) for v in value) or "–"
    return str(value)


def _when(ts: float | None, empty: str) -> str:
    if ts is None:
        return empty
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M UTC")


def _table(records: Sequence[Mapping[str, Any]]) -> str:
    present = {k for r in records for k in r}
    columns = [c for c in COLUMNS if c[0] in present] if records else list(COLUMNS)
    head = "".join(
        f'<th scope="col" data-field="{key}">{html.escape(label)}</th>' for key, label, _ in columns
    )
    rows = []
    for r in records:
        cells = []
        for key, _, kind in columns:
            value = r.get(key)
            text = html.escape(cell_text(kind, value))
            raw = html.escape(_json_scalar(value), quote=True)
            tag = 'th scope="row"' if key == "provider" else "td"
            cls = "num" if kind not in ("text", "list") else "txt"
            cells.append(
                f'<{tag} class="{cls}" data-field="{key}" data-value="{raw}">{text}'
                f"</{tag.split()[0]}>"
            )
        ranked = "ranked" if r.get("rank") is not None else "unranked"
        provider = html.escape(str(r.get("provider", "")), quote=True)
        rows.append(f'<tr class="{ranked}" data-provider="{provider}">{"".join(cells)}</tr>')
    if not rows:
        rows.append(f'<tr><td colspan="{len(columns)}">No reports in this window.</td></tr>')
    return (
        '<table id="providers"><thead><tr>'
        + head
        + "</tr></thead><tbody>"
        + "".join(rows)
        + "</tbody></table>"
    )


def _json_scalar(value: Any) -> str:
    """The JSON value as text: numbers as JSON writes them, lists space-separated, null empty."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return " ".join(str(v) for v in value)
    return str(value)


def time_unit(longest: float) -> tuple[float, str]:
    """Seconds per axis unit, and its name, for an axis `longest` seconds long."""
    if longest <= 2 * 3600:
        return 60.0, "minutes"
    if longest <= 4 * 86400:
        return 3600.0, "hours"
    return 86400.0, "days"


def nice_ticks(top: float, count: int = 6) -> list[float]:
    """Round tick values from 0 to at least `top` (1, 2, 2.5 or 5 times a power of ten)."""
    if top <= 0:
        return [0.0, 1.0]
    raw = top / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    n = math.ceil(top / step - 1e-9)
    return [round(i * step, 10) for i in range(n + 1)]


def _curves_svg(curves: Mapping[str, tuple[SurvivalCurve, float]], deadline: float | None) -> str:
    """Step curves of the share still online, one per provider; x axis fitted to the data."""
    if not curves:
        return "<p>No survival curves: no URLs in this window.</p>"
    longest = max([end for _, end in curves.values()] + [1.0])
    unit, unit_name = time_unit(longest)
    ticks = nice_ticks(longest / unit)
    x_top = ticks[-1] * unit
    left, top, width, height = 56, 16, 560, 260
    legend_x = left + width + 24
    total_w = legend_x + 240
    total_h = top + height + 48

    def x(seconds: float) -> float:
        return left + width * min(seconds, x_top) / x_top

    def y(share: float) -> float:
        return top + height * (1 - share)

    parts = [
        f'<svg viewBox="0 0 {total_w} {total_h}"'
        f' width="{total_w}" height="{total_h}" role="img"'
        ' aria-label="Kaplan–Meier curves: share of URLs still online by time since notice">'
    ]
    for t in ticks:
        px = x(t * unit)
        parts.append(
            f'<line class="grid" x1="{px:.1f}" y1="{top}" x2="{px:.1f}" y2="{top + height}"/>'
        )
        parts.append(
            f'<text class="tick" x="{px:.1f}" y="{top + height + 16}"'
            f' text-anchor="middle">{t:g}</text>'
        )
    for share in (0.0, 0.25, 0.5, 0.75, 1.0):
        py = y(share)
        parts.append(
            f'<line class="grid" x1="{left}" y1="{py:.1f}" x2="{left + width}" y2="{py:.1f}"/>'
        )
        parts.append(
            f'<text class="tick" x="{left - 6}" y="{py + 4:.1f}"'
            f' text-anchor="end">{100 * share:.0f}%</text>'
        )
    if deadline is not None and deadline <= x_top:
        px = x(deadline)
        parts.append(
            f'<line class="deadline" x1="{px:.1f}" y1="{top}" x2="{px:.1f}" y2="{top + height}"/>'
        )
        parts.append(
            f'<text class="tick" x="{px + 4:.1f}" y="{top + 12}">deadline'
            f" {duration_label(deadline)}</text>"
        )
    for i, (provider, (curve, end)) in enumerate(curves.items()):
        colour = PALETTE[i % len(PALETTE)]
        points = [(0.0, 1.0)]
        level = 1.0
        for t, s in zip(curve.times, curve.survival, strict=True):
            points += [(t, level), (t, s)]
            level = s
        points.append((max(end, points[-1][0]), level))
        path = " ".join(f"{x(t):.1f},{y(s):.1f}" for t, s in points)
        name = html.escape(provider)
        parts.append(
            f'<polyline class="curve" data-provider="{html.escape(provider, quote=True)}"'
            f' points="{path}" stroke="{colour}"><title>{name}</title></polyline>'
        )
        ly = top + 14 + 20 * i
        parts.append(
            f'<line x1="{legend_x}" y1="{ly - 4}" x2="{legend_x + 22}" y2="{ly - 4}"'
            f' stroke="{colour}" stroke-width="3"/>'
        )
        parts.append(
            f'<text class="legend" x="{legend_x + 28}" y="{ly}">{name} (n={curve.n})</text>'
        )
    parts.append(
        f'<line class="axis" x1="{left}" y1="{top + height}" x2="{left + width}"'
        f' y2="{top + height}"/>'
    )
    parts.append(f'<line class="axis" x1="{left}" y1="{top}" x2="{left}" y2="{top + height}"/>')
    parts.append(
        f'<text class="label" x="{left + width / 2}" y="{total_h - 8}"'
        f' text-anchor="middle">{unit_name} since notice</text>'
    )
    parts.append("</svg>")
    return "".join(parts)


STYLE = """
body { font-family: Georgia, 'Times New Roman', serif; margin: 2rem auto; max-width: 80rem;
       color: #111; padding: 0 1rem; }
h1 { font-size: 1.6rem; margin-bottom: .2rem; }
.meta { color: #444; margin-top: 0; }
table { border-collapse: collapse; font-size: .82rem; margin: 1rem 0; width: 100%; }
caption { caption-side: bottom; text-align: left; color: #444; padding-top: .4rem; }
th, td { border-bottom: 1px solid #ccc; padding: .25rem .4rem; }
thead th { border-bottom: 2px solid #111; text-align: right; vertical-align: bottom; }
thead th[data-field=provider], thead th[data-field=asns], thead th[data-field=countries]
  { text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.txt, th[scope=row] { text-align: left; }
th[scope=row] { white-space: nowrap; }
tr.unranked { color: #666; font-style: italic; }
svg { font-family: sans-serif; max-width: 100%; height: auto; }
svg .grid { stroke: #e3e3e3; } svg .axis { stroke: #111; }
svg .deadline { stroke: #888; stroke-dasharray: 5 4; }
svg .curve { fill: none; stroke-width: 2.2; }
svg .tick, svg .legend { font-size: 12px; fill: #222; } svg .label { font-size: 13px; }
dl.how dt { font-weight: bold; margin-top: .5rem; } dl.how dd { margin-left: 1.2rem; }
"""


def render_html(
    records: Sequence[Mapping[str, Any]],
    curves: Mapping[str, tuple[SurvivalCurve, float]],
    window: Window,
    *,
    method: str,
    deadline: float,
    min_reports: int,
    latency_end: str,
    title: str = "Removal of reported material, per hosting provider",
) -> str:
    """The page. `curves` maps a provider to its KM curve and its longest follow-up (seconds)."""
    since = _when(window.since, "the first report")
    until = _when(window.until, "the last report")
    end = (
        "first probe that saw it gone"
        if latency_end == "first_removed"
        else ("last probe that saw it online")
    )
    how = f"""
<dl class="how">
<dt>What a row is</dt><dd>One hosting provider: the company the content was served from,
found from the IP address the agents connected to (longest-prefix match to an AS and
organisation, plus an operator override list). "Served from" names the countries of those
addresses. A CDN or "unattributed" is listed but never ranked.</dd>
<dt>Latency</dt><dd>From the notice (or a binding order) to removal, measured to the {end}.
Removal counts only when every network that saw the content confirmed it gone.</dd>
<dt>Bands</dt><dd>"≤ 1 h" … "&gt; 48 h" count removed URLs by latency; they add up to
"Removed".</dd>
<dt>KM figures</dt><dd>Median, 90th percentile and "removed ≤ 24 h" come from a Kaplan–Meier
estimate: URLs still online count as censored at their age, so a provider does not look fast
because only its quick removals are finished. "–" means the estimate never gets there
(or, for ≤ 24 h, that no URL has been followed for 24 hours yet).</dd>
<dt>Rank</dt><dd>By KM median, then by the share removed within 24 h. Providers with fewer
than {min_reports} reports are shown in grey italics and not ranked: a handful of cases says
little about a company.</dd>
<dt>Overdue</dt><dd>Still online past {duration_label(deadline)} after the notice, or past a
binding order's deadline.</dd>
<dt>Curves</dt><dd>The share of each provider's URLs still online against time since notice
(Kaplan–Meier). A curve that falls early and steeply is a provider that removes fast.</dd>
</dl>"""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title>
<style>{STYLE}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<p class="meta" id="window">Reports notified from <span id="since">{since}</span> until
<span id="until">{until}</span>; measured up to <span id="now">{_when(window.now, "")}</span>.</p>
<p class="meta">Method: <span id="method">{html.escape(method)}</span></p>
<h2>Per provider</h2>
{_table(records)}
<h2>Time to removal</h2>
{_curves_svg(curves, deadline)}
<h2>How to read this</h2>
{how}
</body></html>
"""


def method_label(latency_end: str) -> str:
    """The method the figures were made with, as the page states it."""
    from collector.method import METHOD_VERSION

    return f"{METHOD_VERSION}, latency to the {latency_end.replace('_', ' ')} probe"
