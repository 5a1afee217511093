"""The per-provider table: how many URLs each provider was notified of, how fast it removed them.

Theory of operation
-------------------
Each URL contributes one observation from its first episode: a removal at its
latency (notice → first removed observation by default, or notice → last
present observation with ``latency_end="last_present"``, the two ends of the
interval in which the content went), or, if it is still online or not yet
measured, a censored observation at its current age. Median, p90 and the share
removed within 24h come from a Kaplan–Meier estimate over these, so a
provider that never removes does not look fast because its few removals were.

The latency bands (≤1h, 1–12h, 12–24h, 24–48h, >48h) are disjoint and count
URLs with a first-episode removal, so they add up to ``removed``; a URL removed
and then back online is counted in its band *and* as online and reappeared.

Providers with fewer than ``min_reports`` reports are listed but not ranked:
a handful of cases says little about a company. Ranked providers are ordered
by KM median (never reaching 50% is worst), then by the share removed within
24h (higher first), then by name.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Literal

from collector import method
from collector.attribution import UNATTRIBUTED
from collector.method import ONLINE_STATES, UrlState
from collector.store.reads import UrlOutcome
from collector.survival import SurvivalCurve, kaplan_meier, turnbull

HOUR = 3600.0
DAY = 86400.0
LatencyEnd = Literal["first_removed", "last_present"]
LATENCY_ENDS: tuple[str, ...] = ("first_removed", "last_present")
FORMATS: tuple[str, ...] = ("table", "csv", "json", "markdown")
BANDS: tuple[tuple[str, float], ...] = (
    ("removed_1h", HOUR),
    ("removed_1h_12h", 12 * HOUR),
    ("removed_12h_24h", DAY),
    ("removed_24h_48h", 2 * DAY),
    ("removed_over_48h", math.inf),
)
"""Field name and (inclusive) upper bound of each disjoint latency band."""


@dataclass(frozen=True)
class ProviderRow:
    """One provider's line of the public table; durations in seconds, shares in 0..1."""

    provider: str
    asn: str
    reports: int
    urls: int
    removed: int
    online: int
    asns: tuple[str, ...]
    report_share: float
    # Removals per latency band, allotted over each removal's whole interval (Turnbull):
    # expected counts, so they may be fractional and add up to `removed`.
    removed_1h: float
    removed_1h_12h: float
    removed_12h_24h: float
    removed_24h_48h: float
    removed_over_48h: float
    overdue: int
    geoblocked: int
    reappeared: int
    nxdomain: int
    pending: int
    median_latency_seconds: float | None
    p90_latency_seconds: float | None
    removed_within_24h: float | None
    rank: int | None
    not_observed_present: int = 0  # removed before any probe saw it: latency an upper bound
    stale: int = 0  # the state is held: no vantage point that matters is live
    cdn: bool = False
    median_interval_seconds: float | None = None  # Turnbull, from both ends of every interval
    removed_within_24h_interval: float | None = None
    method: str = ""
    countries: tuple[str, ...] = ()  # where the content was served from, most URLs first


def latency(o: UrlOutcome, latency_end: str = "first_removed") -> float | None:
    """First-episode latency at the chosen end of the removal interval; None if not removed."""
    if o.removal_latency is None:
        return None
    if latency_end == "first_removed":
        return max(0.0, o.removal_latency)
    if latency_end == "last_present":
        last_present = o.removal_last_present_at
        if last_present is None:
            return 0.0
        return max(0.0, last_present - o.notified_at)
    raise ValueError(f"unknown latency end {latency_end!r}: use {' or '.join(LATENCY_ENDS)}")


def measured(o: UrlOutcome) -> bool:
    """Whether a URL enters the estimates: removed after being seen, or seen while online.

    Pending URLs (nothing conclusive yet) and removals nobody saw present are listed, not
    estimated as if measured.
    """
    if o.removal_latency is not None:
        return o.observed_present
    return o.state in ONLINE_STATES and o.last_conclusive_at is not None


def survival_data(
    outcomes: Sequence[UrlOutcome], now: float, latency_end: str = "first_removed"
) -> tuple[list[float], list[bool]]:
    """Kaplan–Meier input: removals at their latency, the online censored at their last
    conclusive probe (what is known), the rest left out (see `measured`)."""
    durations: list[float] = []
    removed: list[bool] = []
    for o in outcomes:
        if not measured(o):
            continue
        value = latency(o, latency_end)
        if value is None:
            last = o.last_conclusive_at if o.last_conclusive_at is not None else now
            value = max(0.0, min(last, now) - o.notified_at)
        durations.append(value)
        removed.append(o.removal_latency is not None)
    return durations, removed


def removal_interval(o: UrlOutcome, now: float) -> tuple[float, float] | None:
    """(lower, upper] of the first episode's removal time after the notice, or None."""
    if o.removal_latency is not None:
        upper = max(0.0, o.removal_latency)
        lower = 0.0
        if o.removal_last_present_at is not None and o.observed_present:
            lower = min(upper, max(0.0, o.removal_last_present_at - o.notified_at))
        return (lower, upper)
    if o.state in ONLINE_STATES and o.last_conclusive_at is not None:
        return (max(0.0, min(o.last_conclusive_at, now) - o.notified_at), math.inf)
    return None


def survival_curve(
    outcomes: Sequence[UrlOutcome], now: float, latency_end: str = "first_removed"
) -> SurvivalCurve:
    """The Kaplan–Meier curve of one group of URLs."""
    return kaplan_meier(*survival_data(outcomes, now, latency_end))


def is_overdue(o: UrlOutcome, now: float, deadline: float, order_deadline: float) -> bool:
    """Still online past its episode's opening + deadline, or past its binding order's due time."""
    opened = o.opened_at if o.opened_at is not None else o.notified_at
    return method.is_overdue(o.state, opened, now, deadline) or method.is_order_overdue(
        o.state, o.order_issued_at, o.order_deadline, now, order_deadline
    )


def _row(
    provider: str,
    items: Sequence[UrlOutcome],
    now: float,
    total_reports: int,
    deadline: float,
    order_deadline: float,
    latency_end: str,
) -> ProviderRow:
    durations, removed = survival_data(items, now, latency_end)
    curve = kaplan_meier(durations, removed)
    intervals = [i for i in (removal_interval(o, now) for o in items) if i is not None]
    npmle = turnbull(intervals)
    bounds = [bound for _, bound in BANDS]
    bands = [0.0] * len(BANDS)
    for lo, hi in intervals:
        if math.isfinite(hi):
            for b, w in enumerate(npmle.allot(lo, hi, bounds)):
                bands[b] += w
    asns = Counter(o.asn for o in items if o.asn is not None)
    covered = bool(durations) and (max(durations) >= DAY or all(removed))
    covered_interval = bool(intervals) and (
        any(lo >= DAY for lo, _ in intervals) or all(hi <= DAY for _, hi in intervals)
    )
    reports = sum(o.reports for o in items)
    methods = sorted({o.method for o in items if o.method})
    return ProviderRow(
        provider=provider,
        asn=f"AS{asns.most_common(1)[0][0]}" if asns else "AS?",
        reports=reports,
        urls=len(items),
        removed=sum(1 for o in items if o.removal_latency is not None),
        online=sum(1 for o in items if o.state in ONLINE_STATES),
        asns=tuple(f"AS{a}" for a in sorted(asns)) or ("AS?",),
        report_share=reports / total_reports if total_reports else 0.0,
        removed_1h=round(bands[0], 3),
        removed_1h_12h=round(bands[1], 3),
        removed_12h_24h=round(bands[2], 3),
        removed_24h_48h=round(bands[3], 3),
        removed_over_48h=round(bands[4], 3),
        overdue=sum(1 for o in items if is_overdue(o, now, deadline, order_deadline)),
        geoblocked=sum(1 for o in items if o.state == UrlState.GEOBLOCKED),
        reappeared=sum(1 for o in items if o.reappearances > 0),
        nxdomain=sum(1 for o in items if o.removal_latency is not None and o.removal_nxdomain),
        pending=sum(1 for o in items if o.state == UrlState.PENDING and o.removal_latency is None),
        median_latency_seconds=curve.median(),
        p90_latency_seconds=curve.quantile(0.9),
        removed_within_24h=curve.removed_share_by(DAY) if covered else None,
        rank=None,
        not_observed_present=sum(
            1 for o in items if o.removal_latency is not None and not o.observed_present
        ),
        stale=sum(1 for o in items if o.stale),
        cdn=sum(o.cdn for o in items) * 2 > len(items),
        median_interval_seconds=npmle.median(),
        removed_within_24h_interval=npmle.removed_share_by(DAY) if covered_interval else None,
        method=",".join(methods),
        countries=_countries(items),
    )


def rankable(row: ProviderRow, min_reports: int) -> bool:
    """Only companies with enough distinct URLs are ranked; never a CDN or 'unattributed'."""
    return row.urls >= min_reports and not row.cdn and row.provider != UNATTRIBUTED.provider


def _countries(items: Sequence[UrlOutcome]) -> tuple[str, ...]:
    """The countries the provider's content was seen served from, by URLs, most first."""
    urls = Counter(c for o in items for c in o.countries)
    return tuple(c for c, _ in sorted(urls.items(), key=lambda kv: (-kv[1], kv[0])))


def _rank_key(row: ProviderRow) -> tuple[float, float, str]:
    median = math.inf if row.median_latency_seconds is None else row.median_latency_seconds
    share = -1.0 if row.removed_within_24h is None else row.removed_within_24h
    return (median, -share, row.provider)


def provider_table(
    outcomes: Sequence[UrlOutcome],
    now: float,
    *,
    min_reports: int = 10,
    deadline: float = DAY,
    order_deadline: float = 12 * HOUR,
    latency_end: str = "first_removed",
) -> list[ProviderRow]:
    """One row per provider: ranked ones by rank, then the unranked by reports, most first."""
    if latency_end not in LATENCY_ENDS:
        raise ValueError(f"unknown latency end {latency_end!r}: use {' or '.join(LATENCY_ENDS)}")
    by_provider: dict[str, list[UrlOutcome]] = {}
    for o in outcomes:
        by_provider.setdefault(o.provider, []).append(o)
    total = sum(o.reports for o in outcomes)
    rows = [
        _row(p, items, now, total, deadline, order_deadline, latency_end)
        for p, items in by_provider.items()
    ]
    ranked = sorted((r for r in rows if rankable(r, min_reports)), key=_rank_key)
    rank_of = {r.provider: i for i, r in enumerate(ranked, start=1)}
    out = [replace(r, rank=rank_of.get(r.provider)) for r in rows]
    out.sort(key=lambda r: (r.rank is None, r.rank or 0, -r.reports, r.provider))
    return out


def human_duration(seconds: float | None) -> str:
    """90s, 15m, 5.5h, 3.2d; "-" for None (never reached)."""
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 2 * DAY:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / DAY:.1f}d"


def count(n: float) -> str:
    """A band count: whole when it is, else one decimal (an expected count)."""
    return f"{n:.0f}" if abs(n - round(n)) < 0.05 else f"{n:.1f}"


def percent(share: float | None) -> str:
    return "-" if share is None else f"{100 * share:.0f}%"


def record(row: ProviderRow) -> dict[str, Any]:
    """A row as plain JSON values: seconds, fractions, the ASN list as a list."""
    out = asdict(row)
    out["asns"] = list(row.asns)
    out["countries"] = list(row.countries)
    return out


def _flat(row: ProviderRow) -> dict[str, Any]:
    out = record(row)
    out["asns"] = " ".join(row.asns)
    out["countries"] = " ".join(row.countries)
    return out


TABLE_HEADER = (
    "provider", "asn", "from", "reports", "urls", "removed", "online", "share", "≤1h", "1-12h",
    "12-24h", "24-48h", ">48h", "overdue", "geoblocked", "reappeared", "nxdomain", "pending",
    "unseen", "stale", "median", "p90", "≤24h", "rank",
)  # fmt: skip
_LEFT = 3  # provider, asn, from


def _cells(row: ProviderRow) -> list[str]:
    asn = row.asn if len(row.asns) < 2 else f"{row.asn}+{len(row.asns) - 1}"
    return [
        row.provider, asn, ",".join(row.countries) or "-", str(row.reports), str(row.urls),
        str(row.removed), str(row.online),
        percent(row.report_share), count(row.removed_1h), count(row.removed_1h_12h),
        count(row.removed_12h_24h), count(row.removed_24h_48h), count(row.removed_over_48h),
        str(row.overdue), str(row.geoblocked), str(row.reappeared),
        f"{row.nxdomain}!" if row.nxdomain else "0", str(row.pending),
        str(row.not_observed_present), str(row.stale),
        human_duration(row.median_latency_seconds), human_duration(row.p90_latency_seconds),
        percent(row.removed_within_24h), "-" if row.rank is None else str(row.rank),
    ]  # fmt: skip


def aligned(header: Sequence[str], lines: Sequence[Sequence[str]], left: int = _LEFT) -> list[str]:
    """Text columns: the first `left` left-aligned, the rest right-aligned, a rule below."""
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]

    def fmt_row(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i < left else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return [fmt_row(header), fmt_row(["-" * w for w in widths]), *map(fmt_row, lines)]


def markdown(header: Sequence[str], lines: Sequence[Sequence[str]], left: int = _LEFT) -> str:
    """A GitHub table; `|` in a cell is escaped."""

    def fmt_row(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    rule = ["---" if i < left else "---:" for i in range(len(header))]
    return "\n".join([fmt_row(header), fmt_row(rule), *map(fmt_row, lines)]) + "\n"


def csv_text(records: Sequence[dict[str, Any]], fields: Sequence[str]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(fields), lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: "" if v is None else v for k, v in r.items()} for r in records)
    return out.getvalue()


def _notes(rows: Sequence[ProviderRow], min_reports: int | None) -> list[str]:
    notes = [
        "median, p90 and ≤24h: Kaplan–Meier, URLs still online censored at their last"
        " conclusive probe; '-' where the follow-up does not reach 24h",
        "bands: each removal spread over its interval (last present, first removed],"
        " Turnbull estimate; fractions are expected counts",
    ]
    if any(r.rank is None for r in rows):
        few = f"fewer than {min_reports}" if min_reports is not None else "too few"
        notes.append(f"rank '-': not ranked ({few} distinct URLs, a CDN, or unattributed)")
    if any(r.nxdomain for r in rows):
        notes.append("nxdomain '!': removals that rest on DNS NXDOMAIN (content may remain)")
    if any(r.not_observed_present for r in rows):
        notes.append("unseen: removed before any probe saw it present; left out of the estimates")
    methods = sorted({m for r in rows for m in r.method.split(",") if m})
    if methods:
        notes.append(f"method: {', '.join(methods)}")
    return notes


def render(rows: Sequence[ProviderRow], fmt: str, *, min_reports: int | None = None) -> str:
    """The table as "table" (aligned text), "csv", "json" or "markdown"."""
    if fmt == "json":
        return json.dumps([record(r) for r in rows], indent=2, ensure_ascii=False) + "\n"
    if fmt == "csv":
        return csv_text([_flat(r) for r in rows], [f.name for f in fields(ProviderRow)])
    lines = [_cells(r) for r in rows]
    notes = _notes(rows, min_reports)
    if fmt == "markdown":
        if not lines:
            return markdown(TABLE_HEADER, lines) + "\n(no reports yet)\n"
        return markdown(TABLE_HEADER, lines) + "".join(f"\n{n}\n" for n in notes)
    if fmt != "table":
        raise ValueError(f"unknown format {fmt!r}: use {', '.join(FORMATS)}")
    text = aligned(TABLE_HEADER, lines)
    if not lines:
        text.append("(no reports yet)")
    else:
        text.extend(["", *notes])
    return "\n".join(text) + "\n"
