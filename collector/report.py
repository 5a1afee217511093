"""The per-provider table: how many URLs each provider was notified of, how fast it removed them.

Latency statistics come from a Kaplan–Meier estimate in which URLs still
online (or not yet measured) are censored at their current age, so a
provider that never removes does not look fast because its few removals were.
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from collector.store.reads import UrlOutcome
from collector.survival import kaplan_meier
from collector.verdict import ONLINE_STATES, UrlState

DAY = 86400.0


@dataclass(frozen=True)
class ProviderRow:
    provider: str
    asn: str
    reports: int
    urls: int
    removed: int
    online: int
    geoblocked: int
    pending: int
    median_latency_seconds: float | None
    removed_within_24h: float | None


def provider_table(outcomes: Sequence[UrlOutcome], now: float) -> list[ProviderRow]:
    """One row per provider, most-reported first."""
    by_provider: dict[str, list[UrlOutcome]] = {}
    for o in outcomes:
        by_provider.setdefault(o.provider, []).append(o)
    rows = []
    for provider, items in by_provider.items():
        durations: list[float] = []
        removed: list[bool] = []
        for o in items:
            if o.removal_latency is not None:
                durations.append(o.removal_latency)
                removed.append(True)
            else:
                durations.append(max(0.0, now - o.notified_at))
                removed.append(False)
        curve = kaplan_meier(durations, removed)
        asns = Counter(o.asn for o in items if o.asn is not None)
        judged = any(r or d >= DAY for d, r in zip(durations, removed, strict=True))
        within = curve.removed_share_by(DAY) if judged else None
        rows.append(
            ProviderRow(
                provider=provider,
                asn=f"AS{asns.most_common(1)[0][0]}" if asns else "AS?",
                reports=sum(o.reports for o in items),
                urls=len(items),
                removed=sum(removed),
                online=sum(1 for o in items if o.state in ONLINE_STATES),
                geoblocked=sum(1 for o in items if o.state == UrlState.GEOBLOCKED),
                pending=sum(1 for o in items if o.state == UrlState.PENDING),
                median_latency_seconds=curve.median(),
                removed_within_24h=within,
            )
        )
    rows.sort(key=lambda r: (-r.reports, r.provider))
    return rows


def human_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 2 * DAY:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / DAY:.1f}d"


def render(rows: Sequence[ProviderRow], fmt: str) -> str:
    """The table as text ("table"), "json" or "csv"."""
    if fmt == "json":
        return json.dumps([asdict(r) for r in rows], indent=2) + "\n"
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(ProviderRow.__dataclass_fields__)
        for r in rows:
            writer.writerow(asdict(r).values())
        return out.getvalue()
    if fmt != "table":
        raise ValueError(f"unknown format {fmt!r}: use table, json or csv")
    header = ["provider", "asn", "reports", "urls", "removed", "online", "geoblocked",
              "median latency", "removed ≤24h"]  # fmt: skip
    lines = [
        [r.provider, r.asn, str(r.reports), str(r.urls), str(r.removed), str(r.online),
         str(r.geoblocked), human_duration(r.median_latency_seconds),
         "-" if r.removed_within_24h is None else f"{100 * r.removed_within_24h:.0f}%"]
        for r in rows
    ]  # fmt: skip
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]

    def fmt_row(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i < 2 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    text = [fmt_row(header), fmt_row(["-" * w for w in widths])]
    text.extend(fmt_row(line) for line in lines)
    if not lines:
        text.append("(no reports yet)")
    return "\n".join(text) + "\n"
