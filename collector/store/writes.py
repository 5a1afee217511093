"""The single writer's side of the store: every INSERT/UPDATE goes through `Store`.

`Store` is used from one thread only (see writer.py). Each public method is
one transaction: a batch of results, its verdict updates and its counters
commit together or not at all, so an acknowledgement sent after the call
returns covers everything the batch changed.
"""

from __future__ import annotations

import json
import sqlite3
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import sqlite_utils

from collector.attribution import UNATTRIBUTED, Attribution
from collector.content import ContentMemory
from collector.reports_file import ReportIn
from collector.schedule import Planner
from collector.store.codec import dump_memory, load_memory
from collector.store.model import (
    CorruptDatabase,
    Ingested,
    ResultIn,
    StorageFull,
    StoreError,
    SubmitOutcome,
    Submitted,
    Target,
)
from collector.store.schema import migrations
from collector.verdict import (
    Event,
    Observation,
    Policy,
    ProbeClass,
    Reappearance,
    Removal,
    StateChange,
    UrlState,
    UrlVerdict,
)

_FULL_MESSAGES = ("database or disk is full", "disk i/o error")
# URLs whose verdicts stay in memory: about 2 KB each with ten agents, so the cache stays
# well under a gigabyte whatever the number of URLs.
CACHE_URLS = 250_000


def translate(exc: sqlite3.Error, path: Path) -> StoreError:
    """Turn a sqlite3 error into the store's own exception, naming the file."""
    text = str(exc)
    if any(m in text.lower() for m in _FULL_MESSAGES):
        return StorageFull(f"{path}: storage full or failing, nothing was committed ({text})")
    if "not a database" in text or "malformed" in text:
        return CorruptDatabase(f"{path}: not a usable SQLite database ({text})")
    return StoreError(f"{path}: {text}")


def open_database(path: Path) -> sqlite_utils.Database:
    """Open (creating if needed) and migrate the collector database, checking its integrity."""
    try:
        conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA busy_timeout=5000")
        check = conn.execute("PRAGMA quick_check").fetchone()[0]
        if check != "ok":
            raise CorruptDatabase(f"{path}: integrity check failed: {check}")
        db = sqlite_utils.Database(conn)
        migrations.apply(db)
        return db
    except sqlite3.Error as exc:
        raise translate(exc, path) from exc


class Attributor(Protocol):
    def lookup(self, ip: str) -> Attribution: ...


@dataclass(slots=True)
class UrlEntry:
    """A URL's verdict and what the store keeps beside it."""

    verdict: UrlVerdict
    provider: str
    asn: int | None
    cdn: bool
    origin_ip: str | None
    removed_at: float | None


_STATE_COLUMNS = (
    "url_id, state, notified_at, baseline, episode, last_present_at, removal_last_present_at,"
    " removal_first_removed_at, removal_confirmed_at, removal_latency, removal_nxdomain,"
    " reappearances, memory, provider, asn, cdn, origin_ip, removed_at, dynamic"
)


def _entry(row: Sequence[Any]) -> tuple[int, UrlEntry]:
    (url_id, state, notified_at, baseline, episode, last_present, r_present, r_removed,
     r_confirmed, r_latency, r_nx, reappearances, memory, provider, asn, cdn, origin_ip,
     removed_at, dynamic) = row  # fmt: skip
    first = None
    if r_removed is not None:
        first = Removal(1, r_present, r_removed, r_confirmed, r_latency, bool(r_nx))
    v = UrlVerdict(
        notified_at=notified_at,
        state=UrlState(state),
        episode=episode,
        last_present_at=last_present,
        first_removal=first,
        removal=first if state == UrlState.REMOVED and episode == 1 else None,
        reappearances=reappearances,
    )
    load_memory(v, memory, baseline, bool(dynamic))
    return url_id, UrlEntry(v, provider, asn, bool(cdn), origin_ip, removed_at)


_SAVE_STATE = (
    "UPDATE url_state SET state = ?, baseline = ?, provider = ?, asn = ?, cdn = ?,"
    " dynamic = ?, episode = ?, last_present_at = ?, removal_last_present_at = ?,"
    " removal_first_removed_at = ?, removal_confirmed_at = ?, removal_latency = ?,"
    " removal_nxdomain = ?, removed_at = ?, reappearances = ?, memory = ?,"
    " updated_at = ? WHERE url_id = ?"
)


def _state_row(url_id: int, entry: UrlEntry, now: float) -> tuple[Any, ...]:
    """The parameters of _SAVE_STATE for one URL's verdict."""
    v = entry.verdict
    first = v.first_removal
    return (v.state.value, v.baseline, entry.provider, entry.asn, int(entry.cdn),
            int(v.content.dynamic), v.episode, v.last_present_at,
            first.last_present_at if first else None, first.first_removed_at if first else None,
            first.confirmed_at if first else None, first.latency if first else None,
            int(first.nxdomain) if first else 0, entry.removed_at, v.reappearances,
            dump_memory(v), now, url_id)  # fmt: skip


class Store:
    """Writes reports, agents and results, and keeps each URL's verdict up to date."""

    def __init__(
        self,
        path: Path,
        attribution: Attributor,
        policy: Policy,
        cache_urls: int = CACHE_URLS,
    ) -> None:
        self.path = path
        self.db = open_database(path)
        self.conn: sqlite3.Connection = self.db.conn
        self.attribution = attribution
        self.policy = policy
        # Verdicts of the most recently touched URLs. Every batch persists what it changed,
        # so an entry dropped here is read back exactly as it was (as after a restart).
        self._entries: OrderedDict[int, UrlEntry] = OrderedDict()
        self._cache_urls = cache_urls

    def close(self) -> None:
        self.conn.close()

    def _transaction(self) -> Any:
        return self.db.atomic()

    def register_agent(self, name: str, network: str, version: str, now: float) -> int:
        """Record an agent's hello; return its id (stable across reconnects)."""
        try:
            with self._transaction():
                self.conn.execute(
                    "INSERT INTO agents (name, network, version, first_seen, last_seen)"
                    " VALUES (?, ?, ?, ?, ?) ON CONFLICT(name) DO UPDATE SET"
                    " network = excluded.network, version = excluded.version,"
                    " last_seen = excluded.last_seen",
                    (name, network, version, now, now),
                )
                row = self.conn.execute("SELECT id FROM agents WHERE name = ?", (name,)).fetchone()
        except sqlite3.Error as exc:
            raise translate(exc, self.path) from exc
        return int(row[0])

    def submit_reports(
        self, reports: Sequence[ReportIn], now: float, planner: Planner
    ) -> list[SubmitOutcome]:
        """Store reports once: a known reference, or the same URL and notice, is not duplicated."""
        try:
            with self._transaction():
                return [self._submit_one(r, now, planner) for r in reports]
        except sqlite3.Error as exc:
            self._entries.clear()
            raise translate(exc, self.path) from exc

    def _submit_one(self, report: ReportIn, now: float, planner: Planner) -> SubmitOutcome:
        c = self.conn
        if report.reference:
            known = c.execute(
                "SELECT id, url_id FROM reports WHERE reference = ?", (report.reference,)
            ).fetchone()
        else:
            known = c.execute(
                "SELECT r.id, r.url_id FROM reports r JOIN urls u ON u.id = r.url_id"
                " WHERE u.url = ? AND r.notified_at = ? AND r.reference IS NULL",
                (report.url, report.notified_at),
            ).fetchone()
        if known:
            return SubmitOutcome(Submitted.ALREADY_KNOWN, known[0], known[1], new_url=False)
        row = c.execute("SELECT id FROM urls WHERE url = ?", (report.url,)).fetchone()
        new_url = row is None
        due = planner.order_due(report.order_issued_at, report.order_deadline)
        interval = planner.interval(now, UrlState.PENDING, report.notified_at, due) or 0.0
        if new_url:
            url_id = c.execute(
                "INSERT INTO urls (url, created_at, interval) VALUES (?, ?, ?)",
                (report.url, now, interval),
            ).lastrowid
            memory = "{}"
            if report.sha256:
                reference = ContentMemory.with_reference(report.sha256)
                memory = dump_memory(UrlVerdict(report.notified_at, content=reference))
            c.execute(
                "INSERT INTO url_state (url_id, state, notified_at, order_issued_at,"
                " order_deadline, origin_ip, baseline, memory, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (url_id, UrlState.PENDING.value, report.notified_at, report.order_issued_at,
                 report.order_deadline, report.origin_ip, report.sha256, memory, now),
            )  # fmt: skip
            c.execute(
                "INSERT INTO episodes (url_id, episode, opened_at) VALUES (?, 1, ?)",
                (url_id, report.notified_at),
            )
        else:
            url_id = row[0]
            c.execute(
                "UPDATE url_state SET notified_at = MIN(notified_at, ?),"
                " order_issued_at = COALESCE(MIN(order_issued_at, ?), order_issued_at, ?),"
                " order_deadline = COALESCE(order_deadline, ?),"
                " origin_ip = COALESCE(origin_ip, ?) WHERE url_id = ?",
                (report.notified_at, report.order_issued_at, report.order_issued_at,
                 report.order_deadline, report.origin_ip, url_id),
            )  # fmt: skip
            c.execute("UPDATE urls SET active = 1 WHERE id = ?", (url_id,))
            self._entries.pop(url_id, None)
        report_id = c.execute(
            "INSERT INTO reports (url_id, reference, notified_at, received_at, submitted_at,"
            " sha256, order_issued_at, order_deadline, origin_ip)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (url_id, report.reference, report.notified_at, report.received_at, now,
             report.sha256, report.order_issued_at, report.order_deadline, report.origin_ip),
        ).lastrowid  # fmt: skip
        assert report_id is not None and url_id is not None
        return SubmitOutcome(Submitted.ACCEPTED, report_id, url_id, new_url, interval)

    def ingest(
        self,
        agent_id: int,
        results: Sequence[ResultIn],
        now: float,
        clock_offset: float | None = None,
    ) -> Ingested:
        """Store a batch once, fold new results into the verdicts, commit all together.

        `clock_offset` is the collector's estimate of the agent's clock minus its own;
        results from an agent off by more than the policy allows are flagged.
        """
        try:
            with self._transaction():
                return self._ingest(agent_id, results, now, clock_offset)
        except sqlite3.Error as exc:
            for url_id in {r.url_id for r in results}:
                self._entries.pop(url_id, None)
            raise translate(exc, self.path) from exc

    def _known_seqs(self, agent_id: int, seqs: list[int]) -> set[int]:
        known: set[int] = set()
        for i in range(0, len(seqs), 500):
            chunk = seqs[i : i + 500]
            marks = ",".join("?" * len(chunk))
            known.update(
                s
                for (s,) in self.conn.execute(
                    f"SELECT seq FROM results WHERE agent_id = ? AND seq IN ({marks})",
                    [agent_id, *chunk],
                )
            )
        return known

    def _ingest(
        self, agent_id: int, results: Sequence[ResultIn], now: float, offset: float | None
    ) -> Ingested:
        suspect = int(offset is not None and abs(offset) > self.policy.max_clock_offset)
        known = self._known_seqs(agent_id, [r.seq for r in results])
        fresh: dict[int, ResultIn] = {}
        for r in results:
            if r.seq not in known:
                fresh.setdefault(r.seq, r)
        entries = self._load({r.url_id for r in fresh.values()})
        accepted = sorted(
            (r for r in fresh.values() if r.url_id in entries), key=lambda r: r.started_at
        )
        rows = []
        counts: dict[str, int] = {}
        for r in accepted:
            entry = entries[r.url_id]
            obs = Observation(agent_id, r.started_at, r.status, r.error, r.sha256,
                              r.final_url, r.challenge)  # fmt: skip
            events = entry.verdict.observe(obs, self.policy)
            cls = entry.verdict.last_class or ProbeClass.INCONCLUSIVE
            where = self._attribute(r.peer_ip, entry.origin_ip)
            if where is not None:
                self._maybe_move(r.url_id, entry, where, cls, r.started_at)
            for event in events:
                self._record(r.url_id, entry, event)
            counts[cls.value] = counts.get(cls.value, 0) + 1
            rows.append(
                (agent_id, r.seq, r.url_id, r.started_at, r.elapsed, r.status, r.final_url,
                 r.sha256 or None, r.body_bytes, int(r.truncated), r.peer_ip, r.error,
                 r.redirects, int(r.challenge), suspect, cls.value,
                 where.provider if where else "", where.asn if where else None, now,
                 where.country if where else None)
            )  # fmt: skip
        self.conn.executemany(
            "INSERT INTO results (agent_id, seq, url_id, started_at, elapsed, status, final_url,"
            " sha256, body_bytes, truncated, peer_ip, error, redirects, challenge, clock_suspect,"
            " class, provider, asn, stored_at, country)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
        self.conn.executemany(
            "INSERT INTO result_counts (agent_id, class, n) VALUES (?, ?, ?)"
            " ON CONFLICT(agent_id, class) DO UPDATE SET n = n + excluded.n",
            [(agent_id, cls, n) for cls, n in counts.items()],
        )
        self.conn.executemany(
            _SAVE_STATE,
            [_state_row(u, entries[u], now) for u in sorted({r.url_id for r in accepted})],
        )
        if accepted:
            self.conn.execute(
                "UPDATE agents SET last_result_at = MAX(COALESCE(last_result_at, 0), ?),"
                " last_seen = ? WHERE id = ?",
                (accepted[-1].started_at, now, agent_id),
            )
        if offset is not None:
            self.conn.execute("UPDATE agents SET clock_offset = ? WHERE id = ?", (offset, agent_id))
        return Ingested(
            stored=len(accepted),
            duplicates=len(results) - len(fresh),
            rejected=len(fresh) - len(accepted),
        )

    def _attribute(self, peer_ip: str, origin_ip: str | None) -> Attribution | None:
        """The peer's attribution; behind a CDN, the hotline-supplied origin's instead."""
        if not peer_ip:
            return None
        where = self.attribution.lookup(peer_ip)
        if where.cdn and origin_ip:
            return self.attribution.lookup(origin_ip)
        return where

    def _maybe_move(
        self, url_id: int, entry: UrlEntry, where: Attribution, cls: ProbeClass, at: float
    ) -> None:
        """Attribute the URL to whoever serves the content (or anyone, until someone has)."""
        unknown = entry.provider == UNATTRIBUTED.provider
        if cls is not ProbeClass.PRESENT and not unknown:
            return
        if where.provider != entry.provider and not unknown:
            self._event(url_id, at, "provider", {"from": entry.provider, "to": where.provider})
        entry.provider, entry.asn, entry.cdn = where.provider, where.asn, where.cdn

    def _event(self, url_id: int, at: float, kind: str, detail: dict[str, Any]) -> None:
        self.conn.execute(
            "INSERT INTO url_events (url_id, at, kind, detail) VALUES (?, ?, ?, ?)",
            (url_id, at, kind, json.dumps(detail, separators=(",", ":"))),
        )

    def _record(self, url_id: int, entry: UrlEntry, event: Event) -> None:
        if isinstance(event, Removal):
            entry.removed_at = event.confirmed_at
            self.conn.execute(
                "UPDATE episodes SET last_present_at = ?, first_removed_at = ?, confirmed_at = ?,"
                " latency = ?, nxdomain = ?, provider = ? WHERE url_id = ? AND episode = ?",
                (event.last_present_at, event.first_removed_at, event.confirmed_at,
                 event.latency, int(event.nxdomain), entry.provider, url_id, event.episode),
            )  # fmt: skip
            self._event(url_id, event.confirmed_at, "removal", {
                "episode": event.episode, "last_present_at": event.last_present_at,
                "first_removed_at": event.first_removed_at, "latency": event.latency,
                "nxdomain": event.nxdomain})  # fmt: skip
        elif isinstance(event, Reappearance):
            entry.removed_at = None
            self.conn.execute(
                "INSERT INTO episodes (url_id, episode, opened_at, provider) VALUES (?, ?, ?, ?)",
                (url_id, event.episode, event.at, entry.provider),
            )
            self._event(url_id, event.at, "reappearance", {"episode": event.episode})
        elif isinstance(event, StateChange):
            self._event(url_id, event.at, "state", {"from": event.old.value, "to": event.new.value})

    def _load(self, url_ids: set[int]) -> dict[int, UrlEntry]:
        """The verdicts of those of `url_ids` that agents are assigned; others get no entry.

        Every agent is assigned every active URL (the quorum needs all vantage points), so an
        unknown id, or a URL retired since (after its watch period), is not assigned and its
        results are rejected, never stored. The cache holds active URLs only (`plan` drops
        the ones it retires), so only the ids missing from it are checked in the database.
        """
        cached = self._entries
        out: dict[int, UrlEntry] = {}
        missing: list[int] = []
        for u in url_ids:
            entry = cached.get(u)
            if entry is None:
                missing.append(u)
            else:
                out[u] = entry
                cached.move_to_end(u)
        for i in range(0, len(missing), 500):
            chunk = missing[i : i + 500]
            marks = ",".join("?" * len(chunk))
            for row in self.conn.execute(
                f"SELECT {_STATE_COLUMNS} FROM url_state WHERE url_id IN ({marks})"
                " AND url_id IN (SELECT id FROM urls WHERE active = 1)",
                chunk,
            ):
                url_id, loaded = _entry(row)
                out[url_id] = cached[url_id] = loaded
        while len(cached) > self._cache_urls:
            cached.popitem(last=False)
        return out

    def plan(self, now: float, planner: Planner) -> tuple[list[Target], list[int]]:
        """Recompute every active URL's probe interval; return the changes to push to agents."""
        try:
            with self._transaction():
                return self._plan(now, planner)
        except sqlite3.Error as exc:
            raise translate(exc, self.path) from exc

    def _plan(self, now: float, planner: Planner) -> tuple[list[Target], list[int]]:
        rows = self.conn.execute(
            "SELECT u.id, u.url, u.interval, s.state, s.notified_at, s.order_issued_at,"
            " s.order_deadline, s.removed_at FROM urls u JOIN url_state s ON s.url_id = u.id"
            " WHERE u.active = 1"
        ).fetchall()
        wanted: dict[int, float] = {}
        stop: list[int] = []
        for url_id, _, _, state, notified, order_at, order_deadline, removed_at in rows:
            interval = planner.interval(
                now, UrlState(state), notified, planner.order_due(order_at, order_deadline),
                removed_at,
            )  # fmt: skip
            if interval is None:
                stop.append(url_id)
            else:
                wanted[url_id] = interval
        wanted = planner.within_budget(wanted)
        changed = [
            Target(url_id, url, wanted[url_id])
            for url_id, url, current, *_ in rows
            if url_id in wanted and current != wanted[url_id]
        ]
        self.conn.executemany(
            "UPDATE urls SET interval = ? WHERE id = ?", [(t.interval, t.url_id) for t in changed]
        )
        self.conn.executemany("UPDATE urls SET active = 0 WHERE id = ?", [(u,) for u in stop])
        for url_id in stop:  # the cache holds active URLs only (see _load)
            self._entries.pop(url_id, None)
        return changed, stop
