"""The single writer's side of the store: every INSERT/UPDATE goes through `Store`.

`Store` is used from one thread only (see writer.py). Each public method is
one transaction: a batch of results, its verdict updates and its counters
commit together or not at all, so an acknowledgement sent after the call
returns covers everything the batch changed.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import sqlite_utils

from collector.attribution import PrefixTable
from collector.reports_file import ReportIn
from collector.store.model import (
    CorruptDatabase,
    Ingested,
    ResultIn,
    StorageFull,
    StoreError,
    SubmitOutcome,
    Submitted,
)
from collector.store.schema import migrations
from collector.verdict import (
    AgentTrack,
    Observation,
    Policy,
    ProbeClass,
    Reappearance,
    Removal,
    UrlState,
    UrlVerdict,
    classify,
)

_FULL_MESSAGES = ("database or disk is full", "disk i/o error")


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


def _dump_agents(tracks: dict[int, AgentTrack]) -> str:
    return json.dumps(
        {
            str(agent): [
                t.last_class.value if t.last_class else None,
                t.last_conclusive_at,
                t.removed_run,
                t.run_started_at,
                t.last_present_at,
            ]
            for agent, t in tracks.items()
        },
        separators=(",", ":"),
    )


def _load_agents(text: str) -> dict[int, AgentTrack]:
    return {
        int(agent): AgentTrack(
            last_class=ProbeClass(cls) if cls else None,
            last_conclusive_at=at,
            removed_run=run,
            run_started_at=started,
            last_present_at=present,
        )
        for agent, (cls, at, run, started, present) in json.loads(text).items()
    }


class Store:
    """Writes reports, agents and results, and keeps each URL's verdict up to date."""

    def __init__(self, path: Path, attribution: PrefixTable, policy: Policy) -> None:
        self.path = path
        self.db = open_database(path)
        self.conn: sqlite3.Connection = self.db.conn
        self.attribution = attribution
        self.policy = policy
        self._verdicts: dict[int, tuple[UrlVerdict, str, int | None]] = {}

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

    def submit_reports(self, reports: Sequence[ReportIn], now: float) -> list[SubmitOutcome]:
        """Store reports once: a known reference, or the same URL and notice, is not duplicated."""
        try:
            with self._transaction():
                return [self._submit_one(r, now) for r in reports]
        except sqlite3.Error as exc:
            raise translate(exc, self.path) from exc

    def _submit_one(self, report: ReportIn, now: float) -> SubmitOutcome:
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
        if new_url:
            url_id = c.execute(
                "INSERT INTO urls (url, created_at) VALUES (?, ?)", (report.url, now)
            ).lastrowid
            c.execute(
                "INSERT INTO url_state (url_id, state, notified_at, updated_at)"
                " VALUES (?, ?, ?, ?)",
                (url_id, UrlState.PENDING.value, report.notified_at, now),
            )
            c.execute(
                "INSERT INTO episodes (url_id, episode, opened_at) VALUES (?, 1, ?)",
                (url_id, report.notified_at),
            )
        else:
            url_id = row[0]
            c.execute(
                "UPDATE url_state SET notified_at = MIN(notified_at, ?) WHERE url_id = ?",
                (report.notified_at, url_id),
            )
            self._verdicts.pop(url_id, None)
        report_id = c.execute(
            "INSERT INTO reports (url_id, reference, notified_at, received_at, submitted_at)"
            " VALUES (?, ?, ?, ?, ?)",
            (url_id, report.reference, report.notified_at, report.received_at, now),
        ).lastrowid
        assert report_id is not None and url_id is not None
        return SubmitOutcome(Submitted.ACCEPTED, report_id, url_id, new_url=new_url)

    def ingest(self, agent_id: int, results: Sequence[ResultIn], now: float) -> Ingested:
        """Store a batch once, fold new results into the verdicts, commit all together."""
        try:
            with self._transaction():
                outcome = self._ingest(agent_id, results, now)
        except sqlite3.Error as exc:
            for url_id in {r.url_id for r in results}:
                self._verdicts.pop(url_id, None)
            raise translate(exc, self.path) from exc
        return outcome

    def _ingest(self, agent_id: int, results: Sequence[ResultIn], now: float) -> Ingested:
        c = self.conn
        seqs = [r.seq for r in results]
        known: set[int] = set()
        for i in range(0, len(seqs), 500):
            chunk = seqs[i : i + 500]
            marks = ",".join("?" * len(chunk))
            known.update(
                s
                for (s,) in c.execute(
                    f"SELECT seq FROM results WHERE agent_id = ? AND seq IN ({marks})",
                    [agent_id, *chunk],
                )
            )
        fresh: list[ResultIn] = []
        seen: set[int] = set()
        for r in results:
            if r.seq not in known and r.seq not in seen:
                seen.add(r.seq)
                fresh.append(r)
        duplicates = len(results) - len(fresh)
        verdicts = self._load_verdicts({r.url_id for r in fresh})
        accepted = [r for r in fresh if r.url_id in verdicts]
        rejected = len(fresh) - len(accepted)
        accepted.sort(key=lambda r: r.started_at)
        rows = []
        counts: dict[str, int] = {}
        touched: set[int] = set()
        for r in accepted:
            verdict, provider, asn = verdicts[r.url_id]
            obs = Observation(agent_id, r.started_at, r.status, r.error, r.sha256)
            cls = classify(obs, verdict.baseline, self.policy)
            where = self.attribution.lookup(r.peer_ip) if r.peer_ip else None
            if where is not None and (cls is ProbeClass.PRESENT or verdict.baseline is None):
                provider, asn = where.provider, where.asn
            for event in verdict.observe(obs, self.policy):
                self._record_event(r.url_id, event, provider)
            verdicts[r.url_id] = (verdict, provider, asn)
            self._verdicts[r.url_id] = verdicts[r.url_id]
            touched.add(r.url_id)
            counts[cls.value] = counts.get(cls.value, 0) + 1
            rows.append(
                (agent_id, r.seq, r.url_id, r.started_at, r.elapsed, r.status, r.final_url,
                 r.sha256 or None, r.body_bytes, int(r.truncated), r.peer_ip, r.error,
                 r.redirects, cls.value,
                 where.provider if where else "", where.asn if where else None, now)
            )  # fmt: skip
        c.executemany(
            "INSERT INTO results VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows
        )
        c.executemany(
            "INSERT INTO result_counts (agent_id, class, n) VALUES (?, ?, ?)"
            " ON CONFLICT(agent_id, class) DO UPDATE SET n = n + excluded.n",
            [(agent_id, cls, n) for cls, n in counts.items()],
        )
        for url_id in touched:
            self._save_verdict(url_id, now)
        if accepted:
            c.execute(
                "UPDATE agents SET last_result_at = MAX(COALESCE(last_result_at, 0), ?),"
                " last_seen = ? WHERE id = ?",
                (max(r.started_at for r in accepted), now, agent_id),
            )
        return Ingested(stored=len(accepted), duplicates=duplicates, rejected=rejected)

    def _record_event(self, url_id: int, event: object, provider: str) -> None:
        if isinstance(event, Removal):
            self.conn.execute(
                "UPDATE episodes SET last_present_at = ?, first_removed_at = ?, confirmed_at = ?,"
                " latency = ?, provider = ? WHERE url_id = ? AND episode = ?",
                (event.last_present_at, event.first_removed_at, event.confirmed_at,
                 event.latency, provider, url_id, event.episode),
            )  # fmt: skip
        elif isinstance(event, Reappearance):
            self.conn.execute(
                "INSERT INTO episodes (url_id, episode, opened_at, provider) VALUES (?, ?, ?, ?)",
                (url_id, event.episode, event.at, provider),
            )

    def _load_verdicts(self, url_ids: set[int]) -> dict[int, tuple[UrlVerdict, str, int | None]]:
        out = {u: self._verdicts[u] for u in url_ids if u in self._verdicts}
        missing = [u for u in url_ids if u not in out]
        for i in range(0, len(missing), 500):
            chunk = missing[i : i + 500]
            marks = ",".join("?" * len(chunk))
            for row in self.conn.execute(
                "SELECT url_id, state, notified_at, baseline, episode, episode_opened_at,"
                " last_present_at, first_removed_at, removal_last_present_at,"
                " removal_first_removed_at, removal_confirmed_at, removal_latency,"
                f" reappearances, agents, provider, asn FROM url_state WHERE url_id IN ({marks})",
                chunk,
            ):
                out[row[0]] = (self._row_to_verdict(row), row[14], row[15])
        self._verdicts.update(out)
        return out

    @staticmethod
    def _row_to_verdict(row: sqlite3.Row | tuple[Any, ...]) -> UrlVerdict:
        (_, state, notified_at, baseline, episode, opened_at, last_present, first_removed,
         r_present, r_removed, r_confirmed, r_latency, reappearances, agents, *_) = row  # fmt: skip
        first = None
        if r_removed is not None:
            first = Removal(1, r_present, r_removed, r_confirmed, r_latency)
        return UrlVerdict(
            notified_at=notified_at,
            state=UrlState(state),
            episode_opened_at=opened_at,
            baseline=baseline,
            episode=episode,
            last_present_at=last_present,
            first_removed_at=first_removed,
            removal=first if state == UrlState.REMOVED and episode == 1 else None,
            first_removal=first,
            reappearances=reappearances,
            agents=_load_agents(agents),
        )

    def _save_verdict(self, url_id: int, now: float) -> None:
        v, provider, asn = self._verdicts[url_id]
        first = v.first_removal
        self.conn.execute(
            "UPDATE url_state SET state = ?, baseline = ?, provider = ?, asn = ?, episode = ?,"
            " episode_opened_at = ?, last_present_at = ?, first_removed_at = ?,"
            " removal_last_present_at = ?, removal_first_removed_at = ?, removal_confirmed_at = ?,"
            " removal_latency = ?, reappearances = ?, agents = ?, updated_at = ? WHERE url_id = ?",
            (v.state.value, v.baseline, provider, asn, v.episode, v.episode_opened_at,
             v.last_present_at, v.first_removed_at,
             first.last_present_at if first else None, first.first_removed_at if first else None,
             first.confirmed_at if first else None, first.latency if first else None,
             v.reappearances, _dump_agents(v.agents), now, url_id),
        )  # fmt: skip
