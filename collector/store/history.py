"""Everything the database knows about one URL, for the operator's per-URL timeline.

Probe results are read compressed: consecutive results of one agent with the same class become
one run (a gaps-and-islands query), and only the newest `max_results` results are read, so a URL
probed every five minutes for a year does not load a year of rows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from collector.store.sql import Connection, is_postgres_conn

MAX_RESULTS = 50_000


@dataclass(frozen=True)
class ReportRecord:
    """One report of the URL (a URL can be reported more than once)."""

    reference: str | None
    notified_at: float
    received_at: float | None
    submitted_at: float
    has_sha256: bool
    order_issued_at: float | None
    order_deadline: float | None


@dataclass(frozen=True)
class EpisodeRecord:
    episode: int
    opened_at: float
    last_present_at: float | None
    first_removed_at: float | None
    confirmed_at: float | None
    latency: float | None
    nxdomain: bool
    provider: str | None


@dataclass(frozen=True)
class EventRecord:
    """A row of url_events: provider, state, removal or reappearance, with its JSON detail."""

    at: float
    kind: str
    detail: dict[str, Any]


@dataclass(frozen=True)
class ProbeRun:
    """Consecutive results of one agent with the same probe class."""

    agent: str
    probe_class: str
    count: int
    first_at: float
    last_at: float
    statuses: tuple[int, ...]
    errors: tuple[str, ...]
    providers: tuple[str, ...]


@dataclass(frozen=True)
class UrlHistory:
    url_id: int
    url: str
    created_at: float
    active: bool
    state: str
    provider: str
    asn: int | None
    cdn: bool
    dynamic: bool
    notified_at: float
    order_issued_at: float | None
    order_deadline: float | None
    baseline_sha256: bytes | None
    baseline_from_reference: bool
    episode: int
    reappearances: int
    last_present_at: float | None
    removal_last_present_at: float | None
    removal_first_removed_at: float | None
    removal_confirmed_at: float | None
    removal_latency: float | None
    removal_nxdomain: bool
    removal_observed_present: bool
    method: str
    live_until: float | None
    truncated_vs_reference: int
    tls_unverified: int  # results served over TLS whose certificate did not verify
    reports: tuple[ReportRecord, ...]
    episodes: tuple[EpisodeRecord, ...]
    events: tuple[EventRecord, ...]
    runs: tuple[ProbeRun, ...]
    results_total: int
    results_read: int


_URL_COLUMNS = (
    "u.id, u.url, u.created_at, u.active, s.state, s.provider, s.asn, s.cdn, s.dynamic,"
    " s.notified_at, s.order_issued_at, s.order_deadline, s.baseline, s.memory, s.episode,"
    " s.reappearances, s.last_present_at, s.removal_last_present_at, s.removal_first_removed_at,"
    " s.removal_confirmed_at, s.removal_latency, s.removal_nxdomain,"
    " s.removal_observed_present, s.method, s.live_until, s.truncated_vs_reference"
)

_RUNS = """
WITH recent AS (
    SELECT agent_id, seq, started_at, class, status, error, provider FROM results
    WHERE url_id = ? ORDER BY started_at DESC, seq DESC LIMIT ?
), numbered AS (
    SELECT *,
        ROW_NUMBER() OVER (PARTITION BY agent_id ORDER BY started_at, seq)
        - ROW_NUMBER() OVER (PARTITION BY agent_id, class ORDER BY started_at, seq) AS island
    FROM recent
)
SELECT a.name, n.class, COUNT(*), MIN(n.started_at), MAX(n.started_at),
    {array}(DISTINCT n.status), {array}(DISTINCT n.error), {array}(DISTINCT n.provider)
FROM numbered n JOIN agents a ON a.id = n.agent_id
GROUP BY n.agent_id, a.name, n.class, n.island
ORDER BY MIN(n.started_at), a.name
"""


def _values(array: str | list[Any]) -> list[Any]:
    """A JSON array: SQLite gives its text, psycopg the decoded list."""
    values: list[Any] = json.loads(array) if isinstance(array, str) else array
    return sorted(v for v in values if v not in ("", None))


def _from_reference(memory: str) -> bool:
    try:
        data = json.loads(memory) if memory else {}
    except json.JSONDecodeError:
        return False
    content = data.get("content") if isinstance(data, dict) else None
    return isinstance(content, dict) and bool(content.get("reference", False))


def url_history(
    conn: Connection, key: int | str, max_results: int = MAX_RESULTS
) -> UrlHistory | None:
    """The URL with this id (int) or exact URL (str), or None when the database has no such URL."""
    where = "u.id = ?" if isinstance(key, int) else "u.url = ?"
    row = conn.execute(
        f"SELECT {_URL_COLUMNS} FROM urls u JOIN url_state s ON s.url_id = u.id WHERE {where}",
        (key,),
    ).fetchone()
    if row is None:
        return None
    (url_id, url, created_at, active, state, provider, asn, cdn, dynamic, notified_at, order_at,
     order_deadline, baseline, memory, episode, reappearances, last_present, r_present, r_removed,
     r_confirmed, r_latency, r_nx, r_observed, method, live_until, truncated) = row  # fmt: skip
    tls_unverified = int(
        conn.execute(
            "SELECT COUNT(*) FROM results WHERE url_id = ? AND tls = 3", (url_id,)
        ).fetchone()[0]
    )
    reports = tuple(
        ReportRecord(ref, notified, received, submitted, bool(has), o_at, o_deadline)
        for ref, notified, received, submitted, has, o_at, o_deadline in conn.execute(
            "SELECT reference, notified_at, received_at, submitted_at, sha256 IS NOT NULL,"
            " order_issued_at, order_deadline FROM reports WHERE url_id = ?"
            " ORDER BY notified_at, id",
            (url_id,),
        )
    )
    episodes = tuple(
        EpisodeRecord(ep, opened, present, removed, confirmed, lat, bool(nx), prov)
        for ep, opened, present, removed, confirmed, lat, nx, prov in conn.execute(
            "SELECT episode, opened_at, last_present_at, first_removed_at, confirmed_at, latency,"
            " nxdomain, provider FROM episodes WHERE url_id = ? ORDER BY episode",
            (url_id,),
        )
    )
    events = tuple(
        EventRecord(at, kind, json.loads(detail))
        for at, kind, detail in conn.execute(
            "SELECT at, kind, detail FROM url_events WHERE url_id = ? ORDER BY at, rowid LIMIT ?",
            (url_id, max_results),
        )
    )
    total = int(
        conn.execute("SELECT COUNT(*) FROM results WHERE url_id = ?", (url_id,)).fetchone()[0]
    )
    runs = tuple(
        ProbeRun(name, cls, int(n), first, last, tuple(int(s) for s in _values(statuses)),
                 tuple(e for e in _values(errors) if e != "none"), tuple(_values(providers)))
        for name, cls, n, first, last, statuses, errors, providers in conn.execute(
            _RUNS.format(array="json_agg" if is_postgres_conn(conn) else "json_group_array"),
            (url_id, max_results),
        )
    )  # fmt: skip
    return UrlHistory(
        url_id=url_id, url=url, created_at=created_at, active=bool(active), state=state,
        provider=provider, asn=asn, cdn=bool(cdn), dynamic=bool(dynamic), notified_at=notified_at,
        order_issued_at=order_at, order_deadline=order_deadline, baseline_sha256=baseline,
        baseline_from_reference=_from_reference(memory), episode=episode,
        reappearances=reappearances, last_present_at=last_present,
        removal_last_present_at=r_present,
        removal_first_removed_at=r_removed, removal_confirmed_at=r_confirmed,
        removal_latency=r_latency, removal_nxdomain=bool(r_nx),
        removal_observed_present=bool(r_observed), method=method, live_until=live_until,
        truncated_vs_reference=truncated, tls_unverified=tls_unverified,
        reports=reports, episodes=episodes,
        events=events, runs=runs, results_total=total, results_read=min(total, max_results),
    )  # fmt: skip
