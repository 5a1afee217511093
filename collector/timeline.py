"""One URL's story for the operator: reports, probe runs, verdict changes and the deadline clock.

Pure: it takes a `UrlHistory` read by the store and the time `now`, builds a chronological list
of events and renders it as text or JSON, times in ISO 8601 UTC, durations in seconds (JSON) or
human units (text). Probe results arrive already compressed into runs of one agent's same class.

Deadlines are judged on the first episode, the one the provider table uses: removed before the
due time (first removed observation at or before it), removed after it (flagged when the removal
interval straddles the due time, i.e. the content was last seen before it), overdue (still
online past it), pending (no conclusive result yet) or not yet due.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from collector.durations import duration_label
from collector.method import ONLINE_STATES
from collector.report import human_duration
from collector.store.history import ProbeRun, UrlHistory

DEFAULT_DEADLINES: tuple[float, ...] = (3600.0, 12 * 3600.0, 86400.0)
DEFAULT_ORDER_DEADLINE = 12 * 3600.0
_KIND_ORDER = {"report": 0, "order": 1, "probes": 2, "provider": 3, "removal": 4,
               "reappearance": 5, "state": 6, "deadline": 7}  # fmt: skip


def iso(t: float | None) -> str | None:
    """ISO 8601 UTC with a Z, to the millisecond when the time has a fraction."""
    if t is None:
        return None
    spec = "seconds" if float(t).is_integer() else "milliseconds"
    return datetime.fromtimestamp(t, UTC).isoformat(timespec=spec).replace("+00:00", "Z")


@dataclass(frozen=True)
class Deadline:
    """One deadline regime (or the binding order) judged for this URL."""

    name: str
    due_at: float
    verdict: str  # removed_before | removed_after | overdue | pending | not_yet_due
    margin_seconds: float | None  # early (before), late (after), overdue by; due in (not yet due)
    straddles: bool = False


@dataclass(frozen=True)
class TimelineEvent:
    at: float
    kind: str
    text: str
    data: dict[str, Any] = field(default_factory=dict)


def judge_deadline(h: UrlHistory, name: str, due: float, now: float) -> Deadline:
    """Was the first episode's removal before `due`, after it, or is the URL overdue now?"""
    removed = h.removal_first_removed_at
    if removed is not None:
        if removed <= due:
            return Deadline(name, due, "removed_before", due - removed)
        last = h.removal_last_present_at
        return Deadline(name, due, "removed_after", removed - due, last is None or last < due)
    if now <= due:
        return Deadline(name, due, "not_yet_due", due - now)
    if h.state in ONLINE_STATES:
        return Deadline(name, due, "overdue", now - due)
    return Deadline(name, due, "pending", now - due)


def deadlines(
    h: UrlHistory,
    now: float,
    regimes: Sequence[float] = DEFAULT_DEADLINES,
    order_deadline: float = DEFAULT_ORDER_DEADLINE,
) -> list[Deadline]:
    """Every regime from the (earliest) notice, then the binding order's if there is one."""
    out = [judge_deadline(h, duration_label(d), h.notified_at + d, now) for d in regimes]
    if h.order_issued_at is not None:
        due = h.order_issued_at + (h.order_deadline or order_deadline)
        out.append(judge_deadline(h, "order", due, now))
    return out


def _deadline_text(d: Deadline) -> str:
    margin = human_duration(d.margin_seconds)
    text = {
        "removed_before": f"deadline {d.name}: removed before it ({margin} early)",
        "removed_after": f"deadline {d.name}: removed after it ({margin} late)",
        "overdue": f"deadline {d.name}: still online, overdue by {margin}",
        "pending": f"deadline {d.name}: passed {margin} ago, no conclusive result yet",
        "not_yet_due": f"deadline {d.name}: due in {margin}",
    }[d.verdict]
    if d.straddles:
        text += "; the removal interval straddles the due time"
    return text


def _run_text(r: ProbeRun) -> str:
    when = iso(r.first_at) if r.count == 1 else f"from {iso(r.first_at)} to {iso(r.last_at)}"
    seen = [str(s) for s in r.statuses if s] + list(r.errors)
    extra = f" [{', '.join(seen)}]" if seen else ""
    where = f" via {', '.join(r.providers)}" if r.providers else ""
    return f"{r.agent} {r.probe_class} ×{r.count} {when}{extra}{where}"


def _event_text(kind: str, d: dict[str, Any]) -> str:
    if kind == "provider":
        return f"provider {d.get('from')} → {d.get('to')}"
    if kind == "state":
        return f"state {d.get('from')} → {d.get('to')}"
    if kind == "removal":
        nx = " (rests on DNS NXDOMAIN)" if d.get("nxdomain") else ""
        if d.get("observed_present") is False:
            nx += " (not observed present: latency is an upper bound)"
        return (
            f"removal of episode {d.get('episode')} confirmed: went between"
            f" {iso(d.get('last_present_at')) or 'the notice (never seen present)'}"
            f" and {iso(d.get('first_removed_at'))}, latency {human_duration(d.get('latency'))}{nx}"
        )
    if kind == "reappearance":
        return f"reappeared: episode {d.get('episode')} opens"
    if kind == "renotified":
        return f"reported again after the removal: episode {d.get('episode')} opens"
    return f"{kind} {json.dumps(d, sort_keys=True)}"


def build_timeline(
    h: UrlHistory,
    now: float,
    regimes: Sequence[float] = DEFAULT_DEADLINES,
    order_deadline: float = DEFAULT_ORDER_DEADLINE,
) -> list[TimelineEvent]:
    """The URL's events in time order; deadlines appear at their due time."""
    events: list[TimelineEvent] = []
    for r in h.reports:
        events.append(TimelineEvent(r.notified_at, "report",
                                    f"notice sent (report {r.reference or '-'})",
                                    {"reference": r.reference}))  # fmt: skip
        if r.order_issued_at is not None:
            events.append(TimelineEvent(r.order_issued_at, "order", "binding order issued",
                                        {"reference": r.reference,
                                         "order_deadline": r.order_deadline}))  # fmt: skip
    for run in h.runs:
        events.append(TimelineEvent(run.first_at, "probes", _run_text(run), asdict(run)))
    for e in h.events:
        events.append(TimelineEvent(e.at, e.kind, _event_text(e.kind, e.detail), e.detail))
    for d in deadlines(h, now, regimes, order_deadline):
        events.append(TimelineEvent(d.due_at, "deadline", _deadline_text(d), asdict(d)))
    events.sort(key=lambda e: (e.at, _KIND_ORDER.get(e.kind, 9)))
    return events


def _baseline(h: UrlHistory) -> str:
    if h.baseline_sha256 is None:
        return "none yet (no 2xx body seen)"
    prefix = h.baseline_sha256.hex()[:16]
    source = "hotline reference hash" if h.baseline_from_reference else "agreed by vantage points"
    return f"{source} (sha256 {prefix}…)"


def last_probe_at(h: UrlHistory) -> float | None:
    """The newest probe result read: a state is only as fresh as this."""
    return max((r.last_at for r in h.runs), default=None)


def _cap_note(h: UrlHistory) -> str | None:
    if h.results_read >= h.results_total:
        return None
    return (
        f"only the newest {h.results_read} of {h.results_total} probe results were read;"
        " earlier runs are not shown"
    )


def timeline_document(
    h: UrlHistory,
    now: float,
    regimes: Sequence[float] = DEFAULT_DEADLINES,
    order_deadline: float = DEFAULT_ORDER_DEADLINE,
) -> dict[str, Any]:
    """The machine-readable view: ISO times for instants, seconds for durations."""
    return {
        "url_id": h.url_id,
        "url": h.url,
        "state": h.state,
        "provider": h.provider,
        "asn": h.asn,
        "cdn": h.cdn,
        "dynamic": h.dynamic,
        "active": h.active,
        "baseline": {
            "source": None if h.baseline_sha256 is None
            else "reference" if h.baseline_from_reference else "agreed",
            "sha256_prefix": h.baseline_sha256.hex()[:16] if h.baseline_sha256 else None,
        },
        "notified_at": iso(h.notified_at),
        "last_present_at": iso(h.last_present_at),
        "last_probe_at": iso(last_probe_at(h)),
        "episode": h.episode,
        "reappearances": h.reappearances,
        "method": h.method,
        "stale": h.active and h.live_until is not None and now > h.live_until,
        "live_until": iso(h.live_until),
        "truncated_vs_reference": h.truncated_vs_reference,
        "tls_unverified_results": h.tls_unverified,
        "removal": None if h.removal_first_removed_at is None else {
            "last_present_at": iso(h.removal_last_present_at),
            "first_removed_at": iso(h.removal_first_removed_at),
            "confirmed_at": iso(h.removal_confirmed_at),
            "latency_seconds": h.removal_latency,
            "nxdomain": h.removal_nxdomain,
            "observed_present": h.removal_observed_present,
        },
        "reports": [
            {"reference": r.reference, "notified_at": iso(r.notified_at),
             "received_at": iso(r.received_at), "order_issued_at": iso(r.order_issued_at),
             "order_deadline_seconds": r.order_deadline, "reference_hash": r.has_sha256}
            for r in h.reports
        ],
        "deadlines": [
            {"name": d.name, "due_at": iso(d.due_at), "verdict": d.verdict,
             "margin_seconds": d.margin_seconds, "straddles": d.straddles}
            for d in deadlines(h, now, regimes, order_deadline)
        ],
        "timeline": [
            {"at": iso(e.at), "kind": e.kind, "text": e.text}
            for e in build_timeline(h, now, regimes, order_deadline)
        ],
        "results_total": h.results_total,
        "results_read": h.results_read,
        "note": _cap_note(h),
    }  # fmt: skip


def render_timeline(
    h: UrlHistory,
    now: float,
    fmt: str = "text",
    regimes: Sequence[float] = DEFAULT_DEADLINES,
    order_deadline: float = DEFAULT_ORDER_DEADLINE,
) -> str:
    """The per-URL view as "text" or "json"."""
    if fmt == "json":
        doc = timeline_document(h, now, regimes, order_deadline)
        return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"
    if fmt != "text":
        raise ValueError(f"unknown format {fmt!r}: use text or json")
    asn = f"AS{h.asn}" if h.asn is not None else "AS?"
    lines = [
        f"url {h.url_id}: {h.url}",
        f"state: {h.state}, provider {h.provider} ({asn}{', CDN' if h.cdn else ''}),"
        f" episode {h.episode}, reappearances {h.reappearances}",
        f"baseline: {_baseline(h)}; dynamic page: {'yes' if h.dynamic else 'no'}",
        f"method: {h.method or 'not folded yet'}"
        + (
            f"; STALE: no vantage point that could change the state is live since"
            f" {iso(h.live_until)}"
            if h.active and h.live_until is not None and now > h.live_until
            else ""
        )
        + (f"; {h.tls_unverified} results over TLS that did not verify" if h.tls_unverified else "")
        + (
            f"; {h.truncated_vs_reference} truncated bodies not compared with the reference"
            if h.truncated_vs_reference
            else ""
        ),
        f"notified: {iso(h.notified_at)} (earliest notice); last seen present:"
        f" {iso(h.last_present_at) or 'never'}; last probe: {iso(last_probe_at(h)) or 'none yet'}",
        "reports:",
    ]
    for r in h.reports:
        order = ""
        if r.order_issued_at is not None:
            limit = human_duration(r.order_deadline) if r.order_deadline else "default"
            order = f", order issued {iso(r.order_issued_at)} ({limit})"
        ref_hash = ", reference hash" if r.has_sha256 else ""
        lines.append(f"  {r.reference or '-'}: notified {iso(r.notified_at)}{order}{ref_hash}")
    lines.append("timeline:")
    for e in build_timeline(h, now, regimes, order_deadline):
        lines.append(f"  {iso(e.at)}  {e.kind:<12} {e.text}")
    note = _cap_note(h)
    if note:
        lines.append(f"note: {note}")
    return "\n".join(lines) + "\n"
