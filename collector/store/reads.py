"""Read queries over the collector database, for metrics, reports and assignment.

Reads use their own connections (WAL lets them run beside the writer) and
never write.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from collector.evidence.leaves import url_sha256
from collector.method import UrlState, order_overdue_sql, overdue_sql
from collector.store.model import DEFAULT_FLUSH_EVERY, CorruptDatabase, StoreError, Target
from collector.store.shards import SHARDS
from collector.store.sql import DB_ERRORS, Connection, connect, is_postgres, label, translate

# url_state is written behind (at most every DEFAULT_FLUSH_EVERY seconds), so a URL whose
# newest results are not written yet can show a `live_until` up to that much in the past: it is
# stale only once its live_until is older than that.
STALE_GRACE = DEFAULT_FLUSH_EVERY


def integrity_problem(path: Path | str) -> str | None:
    """What `PRAGMA quick_check` finds wrong with a SQLite file (None: nothing). It reads the
    whole file, on a read-only connection of its own, so writers go on meanwhile. PostgreSQL
    checks its own pages (data checksums, amcheck): nothing to do here."""
    if is_postgres(path):
        return None
    conn = connect_readonly(path)
    try:
        rows = [str(r[0]) for r in conn.execute("PRAGMA quick_check(20)")]
    except DB_ERRORS as exc:
        return str(exc)
    finally:
        conn.close()
    return None if rows == ["ok"] else "; ".join(rows)


def connect_readonly(target: Path | str) -> Connection:
    """A read-only connection (a file or a PostgreSQL URI); a missing or foreign database is a
    clear StoreError."""
    name = label(target)
    if not is_postgres(target) and not Path(target).exists():
        raise StoreError(f"{name}: no such database (start the collector with --db {name} first)")
    db = None
    try:
        db = connect(target, readonly=True)
        if not db.postgres:
            db.conn.execute("PRAGMA busy_timeout=5000")
        db.conn.execute("SELECT 1 FROM url_state LIMIT 1").fetchall()
    except DB_ERRORS as exc:
        if db is not None:
            db.close()
        if db is None:  # could not connect at all
            raise translate(exc, name) from exc
        raise CorruptDatabase(f"{name}: not a Takedown Monitor database ({exc})") from exc
    return db.conn  # type: ignore[no-any-return]


def active_targets(conn: Connection) -> Iterator[Target]:
    """Every URL agents should probe, with its current interval, in id order."""
    for url_id, url, interval in conn.execute(
        "SELECT id, url, interval FROM urls WHERE active = 1 ORDER BY id"
    ):
        yield Target(url_id, url, interval)


def active_intervals(conn: Connection) -> Iterator[tuple[int, float]]:
    """(url id, interval) of every URL agents should probe: the digests' input, no URL text."""
    yield from conn.execute("SELECT id, interval FROM urls WHERE active = 1")


def targets_by_bucket(conn: Connection, buckets: Sequence[int], n_buckets: int) -> Iterator[Target]:
    """The active targets whose bucket (id % n_buckets) is listed, bucket by bucket, in id order.

    Rows stream from SQLite's sorter, so the caller holds one chunk at a time, not the set.
    """
    if not buckets:
        return
    bucket = f"id % {int(n_buckets)}"
    where, params = "", [int(b) for b in buckets]
    if len(buckets) < n_buckets:
        where = f" AND {bucket} IN ({','.join('?' * len(params))})"
    else:
        params = []  # every bucket: no filter
    for url_id, url, interval in conn.execute(
        f"SELECT id, url, interval FROM urls WHERE active = 1{where} ORDER BY {bucket}, id", params
    ):
        yield Target(url_id, url, interval)


@dataclass(frozen=True)
class ProviderFigures:
    """What the per-provider metrics show of one provider, from one scan of url_state."""

    provider: str
    states: dict[str, int]  # URLs by state, every state of UrlState
    overdue: dict[float, int]  # by deadline: URLs still online past notice + deadline
    order_overdue: int  # URLs still online past their binding order's deadline
    reappearances: int  # reappearances ever recorded (a counter: never decreases)
    stale: int  # watched URLs on which no vantage point that matters is live
    # cumulative count per bucket bound, count, sum of latencies; None when no removal
    latency: tuple[list[int], int, float] | None


def provider_figures(
    conn: Connection,
    deadlines: Sequence[float],
    order_deadline: float,
    buckets: Sequence[float],
    now: float,
    shards: frozenset[int] | None = None,
) -> list[ProviderFigures]:
    """URLs by state, overdue URLs per deadline and per binding order, reappearances, stale URLs
    and the latency histogram of every provider, in provider order, from one scan of url_state.

    Every figure of a URL goes to the provider that hosted its first episode (`first_provider`),
    the same rule as the provider table's."""
    states = sorted(UrlState, key=lambda s: s.value)
    columns = [f"COUNT(*) FILTER (WHERE s.state = '{st.value}')" for st in states]
    columns += [
        f"COUNT(*) FILTER (WHERE {overdue_sql('s.state', 's.opened_at', '?', '?')})"
        for _ in deadlines
    ]
    order = order_overdue_sql("s.state", "s.order_issued_at", "s.order_deadline", "?", "?")
    columns.append(f"COUNT(*) FILTER (WHERE {order})")
    columns.append("COUNT(*) FILTER (WHERE u.active = 1 AND s.live_until < ?)")
    # FILTER: most rows have no latency, and a false filter skips the aggregate step.
    columns += [f"COUNT(*) FILTER (WHERE s.removal_latency <= {float(b)!r})" for b in buckets]
    columns += ["COUNT(s.removal_latency)", "SUM(s.removal_latency)"]
    params: list[float] = []
    for deadline in deadlines:
        params += [deadline, now]
    params += [order_deadline, now, now - STALE_GRACE]
    # Only the URLs of these shards (several collectors on PostgreSQL: shards.py).
    where, mine = "", ""
    if shards is not None:
        held = ",".join(str(int(s)) for s in sorted(shards)) or "-1"
        where = f" WHERE s.url_id % {SHARDS} IN ({held})"
        mine = f" WHERE url_id % {SHARDS} IN ({held})"
    reappeared = dict(
        conn.execute(
            f"SELECT provider, COUNT(*) FROM reappearance_log{mine} GROUP BY provider"
        ).fetchall()
    )
    out: list[ProviderFigures] = []
    for provider, *values in conn.execute(
        f"SELECT COALESCE(s.first_provider, s.provider), {', '.join(columns)}"
        f" FROM url_state s JOIN urls u ON u.id = s.url_id{where}"
        " GROUP BY COALESCE(s.first_provider, s.provider) ORDER BY 1",
        params,
    ):
        by_state = values[: len(states)]
        overdue = values[len(states) : len(states) + len(deadlines)]
        order, stale, *latency = values[len(states) + len(deadlines) :]
        cumulative, count, total = latency[: len(buckets)], latency[-2], latency[-1]
        out.append(
            ProviderFigures(
                provider=provider,
                states={st.value: int(n) for st, n in zip(states, by_state, strict=True)},
                overdue={d: int(n) for d, n in zip(deadlines, overdue, strict=True)},
                order_overdue=int(order),
                reappearances=int(reappeared.pop(provider, 0)),
                stale=int(stale or 0),
                latency=([int(c) for c in cumulative], int(count), float(total)) if count else None,
            )
        )
    for provider, n in sorted(reappeared.items()):  # counters never vanish
        empty = {st.value: 0 for st in states}
        out.append(
            ProviderFigures(provider, empty, dict.fromkeys(deadlines, 0), 0, int(n), 0, None)
        )
    return out


@dataclass(frozen=True)
class AgentRow:
    id: int
    name: str
    network: str
    version: str
    last_seen: float
    last_result_at: float | None
    clock_offset: float | None


def agents(conn: Connection) -> list[AgentRow]:
    return [
        AgentRow(*row)
        for row in conn.execute(
            "SELECT id, name, network, version, last_seen, last_result_at, clock_offset"
            " FROM agents ORDER BY name"
        )
    ]


def result_counts(conn: Connection) -> list[tuple[str, str, int]]:
    """(agent name, class, number of results stored)."""
    return [
        (str(name), str(cls), int(n))
        for name, cls, n in conn.execute(
            "SELECT a.name, c.class, SUM(c.n) FROM result_counts c JOIN agents a"
            " ON a.id = c.agent_id GROUP BY a.name, c.class"
        )
    ]


@dataclass(frozen=True)
class UrlOutcome:
    """One URL's measurement, as the provider table needs it."""

    provider: str
    asn: int | None
    state: str
    notified_at: float
    removal_latency: float | None  # first episode: notice -> first removed observation
    reports: int
    url_id: int = 0
    cdn: bool = False
    dynamic: bool = False
    removal_last_present_at: float | None = None  # the lower end of the removal interval
    removal_first_removed_at: float | None = None
    removal_nxdomain: bool = False  # the confirmed removal rested on NXDOMAIN
    reappearances: int = 0
    order_issued_at: float | None = None
    order_deadline: float | None = None  # None: the collector's default order deadline
    observed_present: bool = True  # False: removed before anyone saw it (latency: upper bound)
    last_conclusive_at: float | None = None  # newest conclusive probe of the current episode
    episode: int = 1
    opened_at: float | None = None  # the current episode's opening
    method: str = ""  # the method version that folded this verdict
    stale: bool = False
    countries: tuple[str, ...] = ()  # where the content was seen present, most results first


def url_outcomes(
    conn: Connection,
    since: float | None = None,
    until: float | None = None,
    now: float | None = None,
) -> list[UrlOutcome]:
    """Every URL's outcome, optionally only those first notified in [since, until)."""
    sql = (
        # The first episode's removal belongs to whoever hosted it then, even if the content
        # later reappeared elsewhere and url_state now names the new provider.
        "SELECT COALESCE(s.first_provider, s.provider), s.asn, s.state, s.notified_at,"
        " s.removal_latency, (SELECT COUNT(*) FROM reports r WHERE r.url_id = s.url_id),"
        " s.url_id, s.cdn, s.dynamic, s.removal_last_present_at, s.removal_first_removed_at,"
        " s.removal_nxdomain, s.reappearances, s.order_issued_at, s.order_deadline,"
        " s.removal_observed_present, s.last_conclusive_at, s.episode, s.opened_at, s.method,"
        " (u.active = 1 AND s.live_until < ?)"
        " FROM url_state s JOIN urls u ON u.id = s.url_id WHERE 1 = 1"
    )
    params: list[float] = [(now if now is not None else time.time()) - STALE_GRACE]
    if since is not None:
        sql += " AND s.notified_at >= ?"
        params.append(since)
    if until is not None:
        sql += " AND s.notified_at < ?"
        params.append(until)
    out = []
    for row in conn.execute(sql + " ORDER BY s.url_id", params):
        (provider, asn, state, notified, latency, reports, url_id, cdn, dynamic, last_present,
         first_removed, nxdomain, reappearances, order_at, order_deadline, observed,
         last_conclusive, episode, opened_at, method, stale) = row  # fmt: skip
        outcome = UrlOutcome(
            provider, asn, state, notified, latency, reports, url_id, bool(cdn),
            bool(dynamic), last_present, first_removed, bool(nxdomain), reappearances,
            order_at, order_deadline, bool(observed), last_conclusive, episode, opened_at,
            method, bool(stale),
        )  # fmt: skip
        out.append(outcome)
    served = served_from(conn)
    return [replace(o, countries=served[o.url_id]) if o.url_id in served else o for o in out]


def served_from(conn: Connection) -> dict[int, tuple[str, ...]]:
    """Per URL, the countries of the addresses its content was seen present at, most first."""
    rows = conn.execute(
        "SELECT url_id, country, COUNT(*) FROM results WHERE class = 'present'"
        " AND country IS NOT NULL GROUP BY url_id, country ORDER BY url_id, COUNT(*) DESC, country"
    )
    out: dict[int, list[str]] = {}
    for url_id, country, _ in rows:
        out.setdefault(url_id, []).append(country)
    return {u: tuple(c) for u, c in out.items()}


@dataclass(frozen=True)
class UrlStatus:
    """One URL's current verdict, for listings and the per-URL view."""

    url_id: int
    url: str
    state: str
    provider: str
    asn: int | None
    notified_at: float
    last_present_at: float | None
    removal_first_removed_at: float | None
    removal_latency: float | None
    episode: int
    reappearances: int


def url_statuses(conn: Connection) -> list[UrlStatus]:
    return [
        UrlStatus(*row)
        for row in conn.execute(
            "SELECT u.id, u.url, s.state, s.provider, s.asn, s.notified_at, s.last_present_at,"
            " s.removal_first_removed_at, s.removal_latency, s.episode, s.reappearances"
            " FROM url_state s JOIN urls u ON u.id = s.url_id ORDER BY u.id"
        )
    ]


def results_count(
    conn: Connection,
    agent: str | None = None,
    url_id: int | None = None,
    since: float | None = None,
) -> int:
    """Stored results, optionally of one agent, one URL, probed at or after `since`."""
    sql = "SELECT COUNT(*) FROM results r JOIN agents a ON a.id = r.agent_id WHERE 1 = 1"
    params: list[object] = []
    if agent is not None:
        sql += " AND a.name = ?"
        params.append(agent)
    if url_id is not None:
        sql += " AND r.url_id = ?"
        params.append(url_id)
    if since is not None:
        sql += " AND r.started_at >= ?"
        params.append(since)
    return int(conn.execute(sql, params).fetchone()[0])


def url_hashes(conn: Connection, ids: Sequence[int]) -> dict[int, bytes]:
    """The SHA-256 of each known URL's text (what agents sign and the evidence log holds)."""
    found: dict[int, bytes] = {}
    for i in range(0, len(ids), 500):
        chunk = list(ids[i : i + 500])
        marks = ",".join("?" * len(chunk))
        for url_id, url in conn.execute(f"SELECT id, url FROM urls WHERE id IN ({marks})", chunk):
            found[int(url_id)] = url_sha256(str(url))
    return found
