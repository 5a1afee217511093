"""The single writer's side of the store: every INSERT/UPDATE goes through `Store`.

`Store` is used from one thread only (see writer.py). Each public method is
one transaction: a batch of results, its verdict updates and its counters
commit together or not at all, so an acknowledgement sent after the call
returns covers everything the batch changed.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

from collector.attribution import Attribution
from collector.evidence import leaves as ev
from collector.evidence.note import NoteSigner
from collector.fold import Notice, Observation, UrlFold
from collector.method import Policy, UrlState, is_order_overdue, is_overdue
from collector.projection import CACHE_URLS, Projection, method_of, refusal
from collector.reports_file import ReportIn
from collector.schedule import Planner
from collector.store.codec import dump_fold
from collector.store.evidence import EvidenceLog
from collector.store.ledger import OBSERVATION_COLUMNS, SqlLedger, observation_of_row, us
from collector.store.model import (
    AgentKeyRefused,
    CorruptDatabase,
    Ingested,
    ResultIn,
    StoreError,
    SubmitOutcome,
    Submitted,
    Target,
)
from collector.store.schema import migrations
from collector.store.shards import LEASE_SECONDS, SHARDS, Leases, collector_name
from collector.store.sql import DB_ERRORS, Connection, Database, connect, label, translate

log = logging.getLogger(__name__)


def open_database(target: Path | str) -> tuple[Database, bool]:
    """Open (creating if needed) and migrate the collector database, a SQLite file or a
    PostgreSQL URI; also whether the last store on it stopped cleanly. A SQLite file's
    integrity is not checked here: `PRAGMA quick_check` reads the whole file (5 s at 2.3 GB),
    so after an unclean stop the collector runs it once serving (reads.integrity_problem). A
    damaged page found before fails its statement as CorruptDatabase."""
    name = label(target)
    db = None
    try:
        db = connect(target)
        if not db.postgres:
            db.conn.execute("PRAGMA journal_mode=WAL")
            db.conn.execute("PRAGMA synchronous=FULL")
            db.conn.execute("PRAGMA foreign_keys=ON")
            db.conn.execute("PRAGMA busy_timeout=5000")
        clean = _stopped_cleanly(db)
        migrations.apply(db)
        db.conn.execute("UPDATE lifecycle SET clean_stop = 0")  # until close() says otherwise
        return db, clean
    except DB_ERRORS as exc:
        if db is not None:
            db.close()
        raise translate(exc, name) from exc


def _stopped_cleanly(db: Database) -> bool:
    if not db.table_exists("lifecycle"):
        return False  # a new database, or one from before m009
    row = db.conn.execute("SELECT clean_stop FROM lifecycle").fetchone()
    return bool(row and row[0])


# PostgreSQL advisory lock held by the collector keeping the evidence log ("TMLOG").
_LOG_LOCK = 0x544D4C4F47

# Assignment log rows read again at each look (see Store.assignment_changes).
ASSIGNMENT_WINDOW = 10_000

# Queued results a tick folds at most (about 0.1 s of work).
QUEUE_CHUNK = 5_000

# Rows a plan reads between two looks at `Store.interrupted` (about 0.1 s of work).
PLAN_CHECK_EVERY = 10_000


class PlanInterrupted(Exception):
    """The writer is stopping: the plan in progress is abandoned (see Store.plan)."""


class Attributor(Protocol):
    def lookup(self, ip: str) -> Attribution: ...


class Store:
    """Writes reports, agents and results, and keeps each URL's fold up to date."""

    def __init__(
        self,
        path: Path | str,
        attribution: Attributor,
        policy: Policy,
        cache_urls: int = CACHE_URLS,
        planner: Planner | None = None,
        log_signer: NoteSigner | None = None,
        flush_every: float = 0.0,
        lease_seconds: float = LEASE_SECONDS,
    ) -> None:
        self.path = path
        self.name = label(path)  # how messages name the database
        self.db, clean = open_database(path)
        try:
            self._open(clean, attribution, policy, cache_urls, planner, log_signer,
                       flush_every, lease_seconds)  # fmt: skip
        except BaseException:
            self.db.close()
            raise

    def _open(
        self, clean: bool, attribution: Attributor, policy: Policy, cache_urls: int,
        planner: Planner | None, log_signer: NoteSigner | None, flush_every: float,
        lease_seconds: float,
    ) -> None:  # fmt: skip
        # Not known to be intact until an integrity check passes (see open_database): a new
        # database, or the last stop was not clean. A clean stop says so only once it is known.
        self.unchecked = not clean
        self.damaged: str | None = None  # what an integrity check found (see refuse_writes)
        self.conn: Connection = self.db.conn
        self.attribution = attribution
        self.policy = policy
        self.planner = planner or Planner()
        self.method = method_of(policy, self.planner)
        # Whether the writer is stopping (see Writer and plan): long jobs give up early.
        self.interrupted: Callable[[], bool] = lambda: False
        # The evidence log, when the collector has a log key: every notice, stored result and
        # verdict event is a leaf appended in the transaction that stores the fact.
        self.evidence = EvidenceLog(self.conn, log_signer) if log_signer is not None else None
        self.ledger = SqlLedger(self.conn, self.method, self.planner, self.evidence, cache_urls)
        # PostgreSQL: several collectors may share the database, each folding the URL shards
        # it holds a lease on (shards.py); the others' results wait in fold_queue. Their next
        # holder reads their folds from url_state, so states are written with every batch.
        self.leases: Leases | None = None
        self._assignment_seen: set[int] = set()
        self._counter = ""
        self._assignment_cursor = 0
        if self.db.postgres:
            (last,) = self.conn.execute(
                "SELECT COALESCE(MAX(id), 0) FROM assignment_log"
            ).fetchone()
            self._assignment_cursor = int(last)  # agents get the rest at their hello
            self._one_log_writer(self.conn)
            self.db.conn.on_connect.append(self._one_log_writer)
            self.leases = Leases(self.conn, collector_name(), lease_seconds)
            self._counter = self.leases.name  # result_counts rows of its own (m015)
            self.ledger.owns = self.leases.owns
            flush_every = 0.0
            self.leases.tick()
        # The verdicts: each URL's fold in memory, its url_state row written behind, at most
        # every `flush_every` seconds (0: with every batch).
        self.projection = Projection(
            self.ledger, self.method, policy.min_vantage_points, cache_urls, flush_every
        )
        self.projection.reload_pending()
        # A crash left URLs whose url_state is older than their results: resume their folds
        # from it, or refold them.
        self._resume_unflushed()
        if self.projection.pending:  # a crash left refolds due
            self.refold_due(0.0, limited=False)

    def refuse_writes(self, problem: str) -> None:
        """An integrity check found the database damaged: take no report or result from now
        on (they stay with their senders: agents spool, intake clients retry)."""
        self.damaged = problem

    def _refusing(self) -> StoreError | None:
        if self.damaged is None:
            return None
        return CorruptDatabase(f"{self.name}: integrity check failed ({self.damaged}); nothing"
                               " is accepted until the database is restored")  # fmt: skip

    def _resume_unflushed(self) -> None:
        began = time.monotonic()
        with self._transaction():
            outcomes = self.projection.resume_unflushed()
        if any(outcomes.values()):
            log.info(
                "folds_resumed urls=%d refolds=%d seconds=%.3f (damaged states refolded: %d)",
                outcomes["resumed"], outcomes["due"], time.monotonic() - began,
                outcomes["refolded"],
            )  # fmt: skip

    def close(self) -> None:
        """Refold what is due (a clean stop leaves no refold for the next start), then close."""
        try:
            now = self.projection.last_now
            self.refold_due(now, limited=False)
            self.flush(now)
            if self.leases is not None:
                # What others queued for the shards held is folded before they are handed
                # over (bounded: a chunk at a time while chunks come back full).
                for _ in range(100):
                    if self.fold_queued(now) < QUEUE_CHUNK:
                        break
                self.leases.release()
            elif not self.unchecked:
                self.conn.execute("UPDATE lifecycle SET clean_stop = 1")
        finally:
            self.conn.close()

    def idle(self) -> None:
        """Nothing to do for a while: refold what a rollback left behind and a budget's worth
        of the late refolds due, write the dirty folds (see flush)."""
        p = self.projection
        if p.stale:
            try:
                with self._transaction():
                    p.refold_stale()
            except DB_ERRORS as exc:
                p.forget()
                raise translate(exc, self.name) from exc
        if p.pending:
            self.refold_due(p.last_now, everything=False)
        if p.dirty:
            self.flush(p.last_now)

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """A transaction (a savepoint inside another); what the evidence log holds of it is
        written before it ends."""
        outermost = not self.conn.in_transaction
        with self.db.atomic():
            if outermost and self.leases is not None:
                lost = self.leases.fence()
                if lost:
                    self._drop_shards(lost)
            yield
            if self.evidence is not None:
                self.evidence.write()

    def _one_log_writer(self, conn: Connection) -> None:
        """PostgreSQL: the evidence log has one writer (its tree's frontier is in memory), so
        a collector keeping it holds a session lock for its life, and no other collector,
        with the log or without it (its results would be missing from the log), runs
        beside it. Several collectors run with the log off."""
        (got,) = conn.execute("SELECT pg_try_advisory_lock(?)", (_LOG_LOCK,)).fetchone()
        if not got:
            raise StoreError(
                f"{self.name}: another collector keeping the evidence log runs on this database;"
                " the log has one writer: run one collector with --log-key-file, or several"
                " without it (docs/EVIDENCE.md)"
            )
        if self.evidence is None:
            conn.execute("SELECT pg_advisory_unlock(?)", (_LOG_LOCK,))

    def _assignment_changed(self, url_ids: Sequence[int]) -> None:
        """Several collectors (PostgreSQL): tell the others' agents too (assignment_changes),
        in one statement however many URLs a plan changed. The rows name their writer: this
        collector pushes its own changes itself and skips them."""
        if self.leases is None or not url_ids:
            return
        self.conn.execute(
            "INSERT INTO assignment_log (url_id, writer) SELECT unnest(?::bigint[]), ?",
            (list(url_ids), self.leases.name),
        )

    def assignment_changes(self) -> tuple[list[Target], list[int]]:
        """The assignment changes other collectors made since the last call (PostgreSQL):
        targets to push to this collector's agents, and URLs they no longer probe.

        A log row's id is drawn before its transaction commits, so rows may appear out of
        id order: the rows of the last ASSIGNMENT_WINDOW ids are read again each time, and
        those already pushed are skipped (this collector's own were pushed as it made them)."""
        if self.leases is None:
            return [], []
        try:
            rows = self.conn.execute(
                "SELECT l.id, u.id, u.url, u.interval, u.active FROM assignment_log l"
                " JOIN urls u ON u.id = l.url_id WHERE l.id > ? AND l.writer <> ? ORDER BY l.id",
                (self._assignment_cursor - ASSIGNMENT_WINDOW, self.leases.name),
            ).fetchall()
        except DB_ERRORS as exc:
            raise translate(exc, self.name) from exc
        seen = self._assignment_seen
        targets: dict[int, Target] = {}
        retired: dict[int, None] = {}
        for index, url_id, url, interval, active in rows:
            if index in seen:
                continue
            seen.add(index)
            if active:
                targets[url_id] = Target(url_id, url, interval)
                retired.pop(url_id, None)
            else:
                retired[url_id] = None
                targets.pop(url_id, None)
        if rows:
            self._assignment_cursor = max(self._assignment_cursor, int(rows[-1][0]))
        low = self._assignment_cursor - ASSIGNMENT_WINDOW
        self._assignment_seen = {i for i in seen if i > low}
        return list(targets.values()), list(retired)

    def _drop_shards(self, shards: frozenset[int]) -> None:
        """Shards no longer held: their folds leave memory (their holder writes them now)."""
        p = self.projection
        p.forget(u for u in [*p.entries, *p.dirty_ids()] if u % SHARDS in shards)
        p.drop_pending(lambda u: u % SHARDS in shards)

    def tick(self, now: float) -> int:
        """Every TICK_SECONDS on the writer (PostgreSQL): renew and rebalance the shard leases,
        take up the refolds other collectors asked for, and fold the queued results of the
        shards held (at most `limit` each call); return how many were folded."""
        if self.leases is None:
            return 0
        try:
            moved = self.leases.tick()
        except DB_ERRORS as exc:
            raise translate(exc, self.name) from exc
        if moved.lost:
            self._drop_shards(moved.lost)
        self.projection.adopt_pending(self.ledger.refolds_pending(), now)
        if moved.gained and self.projection.pending:
            # As at a start: a shard's refolds owed (its last holder died before them) are
            # done before anything new of it is folded, within the usual budget.
            self.refold_due(now)
        self._refold_requested(now)
        return self.fold_queued(now)

    def _refold_requested(self, now: float) -> None:
        """Refold the URLs other collectors took a new report for, claiming each request in
        the transaction that refolds it (see m016)."""
        assert self.leases is not None
        try:
            with self._transaction():
                if not self.leases.owned:
                    return
                asked = self.conn.execute(
                    f"DELETE FROM refold_requests WHERE url_id % {SHARDS} = ANY(?)"
                    " RETURNING url_id",
                    (sorted(self.leases.owned),),
                ).fetchall()
                for url_id in sorted({int(u) for (u,) in asked}):
                    self.projection.renotified(url_id, now)
                self._checkpoint_if_verdict(now)
        except DB_ERRORS as exc:
            self._rolled_back()
            raise translate(exc, self.name) from exc

    def fold_queued(self, now: float, limit: int = QUEUE_CHUNK) -> int:
        """Fold results other collectors stored for the shards this one holds, oldest
        probes first, in one transaction with the claim on them; return how many."""
        if self.leases is None:
            return 0
        try:
            with self._transaction():
                if not self.leases.owned:
                    return 0
                rows = self.conn.execute(
                    _CLAIM_QUEUED, (sorted(self.leases.owned), limit)
                ).fetchall()
                if rows:
                    self._fold_stored(rows, now)
                    self.projection.refold_pending(now, self.projection.refold_budget)
                    self._checkpoint_if_verdict(now)
        except DB_ERRORS as exc:
            self._rolled_back()
            raise translate(exc, self.name) from exc
        return len(rows)

    def _fold_stored(self, rows: Sequence[Any], now: float) -> None:
        """Fold results already stored (claimed from the queue) and record their classes."""
        p = self.projection
        entries = p.load({int(row[0]) for row in rows})
        batch = []
        for url_id, *fields in rows:
            obs = observation_of_row(fields)
            if p.admit(url_id, obs.at, entries) is not None:
                continue  # retired meanwhile: stored, and a refold would read it
            batch.append((url_id, obs))
        folded = p.fold(entries, batch)
        p.record(folded, now)
        counts: dict[tuple[int, str], int] = {}
        for (_, obs), cls in zip(batch, folded.classes, strict=True):
            counts[(obs.agent_id, cls.value)] = counts.get((obs.agent_id, cls.value), 0) + 1
        self.conn.executemany(
            "UPDATE results SET class = ? WHERE agent_id = ? AND seq = ?",
            [(cls.value, obs.agent_id, obs.seq) for (_, obs), cls in zip(batch, folded.classes,
                                                                       strict=True)],
        )  # fmt: skip
        self._count(counts)

    def _count(self, counts: dict[tuple[int, str], int]) -> None:
        self.conn.executemany(
            "INSERT INTO result_counts (agent_id, class, counter, n) VALUES (?, ?, ?, ?)"
            " ON CONFLICT(agent_id, class, counter) DO UPDATE SET n = result_counts.n + excluded.n",
            [(agent, cls, self._counter, n) for (agent, cls), n in sorted(counts.items())],
        )

    def _reload_log(self) -> None:
        """After a rollback: the log's frontier is what was committed."""
        if self.evidence is not None:
            self.evidence.reload()
        self.ledger.verdict_logged = False

    def _checkpoint_if_verdict(self, now: float) -> None:
        """A checkpoint with every transaction that logged a verdict, so each removal,
        reappearance and deadline verdict is covered by a signed tree head at once."""
        if self.evidence is not None and self.ledger.verdict_logged:
            self.evidence.checkpoint(now)
            self.ledger.verdict_logged = False

    def checkpoint(self, now: float) -> str | None:
        """Sign a checkpoint of the evidence log as it is (None without a log key)."""
        if self.evidence is None:
            return None
        try:
            with self._transaction():
                self.ledger.verdict_logged = False
                return self.evidence.checkpoint(now)
        except DB_ERRORS as exc:
            self._reload_log()
            raise translate(exc, self.name) from exc

    def register_agent(
        self, name: str, network: str, version: str, now: float, public_key: bytes = b""
    ) -> int:
        """Record an agent's hello; return its id (stable across reconnects).

        A public key is pinned at the agent's first hello that carries one (unless `agents
        add --public-key` registered it first); a later hello must carry the same key, and an
        agent with a pinned key cannot say hello without it (AgentKeyRefused).
        """
        try:
            with self._transaction():
                self._pin_key(name, network, public_key, "hello", now)
                self.conn.execute(
                    "INSERT INTO agents (name, network, version, first_seen, last_seen)"
                    " VALUES (?, ?, ?, ?, ?) ON CONFLICT(name) DO UPDATE SET"
                    " network = excluded.network, version = excluded.version,"
                    " last_seen = excluded.last_seen",
                    (name, network, version, now, now),
                )
                row = self.conn.execute("SELECT id FROM agents WHERE name = ?", (name,)).fetchone()
        except DB_ERRORS as exc:
            self._reload_log()
            raise translate(exc, self.name) from exc
        except AgentKeyRefused:
            self._reload_log()
            raise
        return int(row[0])

    def _pin_key(self, name: str, network: str, key: bytes, source: str, now: float) -> None:
        row = self.conn.execute(
            "SELECT public_key, leaf FROM agent_keys WHERE name = ?", (name,)
        ).fetchone()
        pinned = bytes(row[0]) if row else b""
        if pinned and key != pinned:
            raise AgentKeyRefused(
                f"agent {name!r} has a pinned public key and its hello carried "
                + ("another one" if key else "none")
                + "; if its key was replaced on purpose, register the new one with"
                " 'takedown-collector agents add NAME --public-key FILE --replace'"
            )
        if not key:
            return
        if not pinned:
            self.conn.execute(
                "INSERT INTO agent_keys (name, public_key, source, accepted_at)"
                " VALUES (?, ?, ?, ?)",
                (name, key, source, now),
            )
        if self.evidence is not None and (row is None or row[1] is None):
            # Logged at the first hello after the key was accepted (a key registered with
            # `agents add` while no log key was configured is logged when the log starts).
            index = self.evidence.append(ev.AgentKeyLeaf(name, network, key, us(now)))
            self.conn.execute("UPDATE agent_keys SET leaf = ? WHERE name = ?", (index, name))

    def submit_reports(
        self, reports: Sequence[ReportIn], now: float, planner: Planner, source: str = ""
    ) -> list[SubmitOutcome]:
        """Store reports once per (hotline, reference), or per URL and notice without one.

        `source` names the hotline (its intake credential). A report for a URL already known
        refolds it, so a new notice for removed or retired content opens a new episode and
        the URL is assigned to agents again.
        """
        if (refused := self._refusing()) is not None:
            raise refused
        try:
            with self._transaction():
                outcomes = [self._submit_one(r, now, planner, source) for r in reports]
                self._checkpoint_if_verdict(now)
                return outcomes
        except BaseException as exc:
            self._rolled_back()
            if isinstance(exc, DB_ERRORS):
                raise translate(exc, self.name) from exc
            raise

    def _submit_one(
        self, report: ReportIn, now: float, planner: Planner, source: str
    ) -> SubmitOutcome:
        c = self.conn
        if report.reference:
            known = c.execute(
                "SELECT r.id, r.url_id, u.url FROM reports r JOIN urls u ON u.id = r.url_id"
                " WHERE r.source = ? AND r.reference = ?",
                (source, report.reference),
            ).fetchone()
            if known and known[2] != report.url:
                return SubmitOutcome(
                    Submitted.REJECTED, known[0], known[1], new_url=False,
                    error=f"reference {report.reference!r} already names URL id {known[1]}"
                    f" ({known[2]}), not {report.url}",
                )  # fmt: skip
        else:
            known = c.execute(
                "SELECT r.id, r.url_id FROM reports r JOIN urls u ON u.id = r.url_id"
                " WHERE u.url = ? AND r.notified_at = ? AND r.reference IS NULL",
                (report.url, report.notified_at),
            ).fetchone()
        if known:
            return SubmitOutcome(Submitted.ALREADY_KNOWN, known[0], known[1], new_url=False)
        row = c.execute("SELECT id, active FROM urls WHERE url = ?", (report.url,)).fetchone()
        new_url = row is None
        due = planner.order_due(report.order_issued_at, report.order_deadline)
        interval = planner.interval(now, UrlState.PENDING, report.notified_at, due) or 0.0
        if new_url:
            url_id = c.execute(
                "INSERT INTO urls (url, created_at, interval) VALUES (?, ?, ?) RETURNING id",
                (report.url, now, interval),
            ).fetchone()[0]
            fold = UrlFold.start(Notice(report.notified_at, report.sha256, due), self.method)
            c.execute(
                "INSERT INTO url_state (url_id, state, notified_at, opened_at, order_issued_at,"
                " order_deadline, origin_ip, baseline, memory, method, updated_at, folded)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0)",
                (url_id, UrlState.PENDING.value, report.notified_at, report.notified_at,
                 report.order_issued_at, report.order_deadline, report.origin_ip, report.sha256,
                 dump_fold(fold), self.method.version, now),
            )  # fmt: skip
            c.execute(
                "INSERT INTO episodes (url_id, episode, opened_at) VALUES (?, 1, ?)",
                (url_id, report.notified_at),
            )
        else:
            url_id = row[0]
            c.execute(
                "UPDATE url_state SET"
                " order_issued_at = COALESCE(CASE WHEN order_issued_at < ? THEN order_issued_at"
                " ELSE ? END, order_issued_at),"
                " order_deadline = COALESCE(order_deadline, ?),"
                " origin_ip = COALESCE(origin_ip, ?) WHERE url_id = ?",
                (report.order_issued_at, report.order_issued_at, report.order_deadline,
                 report.origin_ip, url_id),
            )  # fmt: skip
        report_id = c.execute(
            "INSERT INTO reports (url_id, source, reference, notified_at, received_at,"
            " submitted_at, sha256, order_issued_at, order_deadline, origin_ip)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
            (url_id, source, report.reference, report.notified_at, report.received_at, now,
             report.sha256, report.order_issued_at, report.order_deadline, report.origin_ip),
        ).fetchone()[0]  # fmt: skip
        if self.evidence is not None:
            self.ledger.url_hashes[url_id] = digest = ev.url_sha256(report.url)
            reference, form = ev.NoticeLeaf.hashing_reference(report.reference or "")
            self.evidence.append(
                ev.NoticeLeaf(
                    url_sha256=digest,
                    received_at_us=us(report.received_at if report.received_at else now),
                    notified_at_us=us(report.notified_at),
                    order_issued_at_us=us(report.order_issued_at or 0.0),
                    order_deadline_seconds=round(report.order_deadline or 0),
                    reference=reference,
                    reference_form=form,
                    content_sha256=report.sha256 or b"",
                    logged_at_us=us(now),
                    url_prev=self.evidence.head(url_id),
                ),
                url_id,
            )
        reassign = new_url
        if new_url:
            self._assignment_changed([url_id])
        if not new_url:
            if self.leases is None or self.leases.owns(url_id):
                self.projection.renotified(url_id, now)
            else:  # its shard's holder refolds it (Store.tick)
                c.execute("INSERT INTO refold_requests (url_id) VALUES (?)", (url_id,))
            if not row[1]:
                c.execute("UPDATE urls SET active = 1 WHERE id = ?", (url_id,))
                self._assignment_changed([url_id])
                reassign = True
        return SubmitOutcome(Submitted.ACCEPTED, report_id, url_id, reassign, interval)

    def ingest(
        self,
        agent_id: int,
        results: Sequence[ResultIn],
        now: float,
        clock_offset: float | None = None,
    ) -> Ingested:
        """Store a batch once, fold new results into the verdicts, commit all together.

        `clock_offset` is the collector's estimate of the agent's clock minus its own;
        results from an agent off by more than the policy allows are flagged. Whatever goes
        wrong, the folds are left as before the batch (the touched ones are dropped from the
        cache and read back as committed). A batch that fails for a reason other than the
        database is retried one result at a time, and a result that fails on its own is
        refused with the reason, so one poison result never blocks an agent's stream.
        """
        if (refused := self._refusing()) is not None:
            raise refused
        try:
            with self._transaction():
                done = self._ingest(agent_id, results, now, clock_offset)
                self.projection.refold_pending(now, self.projection.refold_budget)
                self._checkpoint_if_verdict(now)
        except DB_ERRORS as exc:
            self._rolled_back(results)
            raise translate(exc, self.name) from exc
        except Exception:
            self._rolled_back(results, pending=False)
            if len(results) <= 1:
                raise
            return self._ingest_one_by_one(agent_id, results, now, clock_offset)
        self._flush_if_due(now)
        return done

    def ingest_group(self, items: Sequence[IngestCall]) -> list[Ingested | BaseException]:
        """Several batches in one transaction and one fsync (group commit); the outcome of each.

        Each batch runs in a savepoint: one that fails for a reason other than the database is
        rolled back alone and, after the group committed, ingested again on its own (one result
        at a time, as `ingest` does). A database error fails the whole group: nothing of it was
        committed, and every batch gets the error (agents resend, unacknowledged).
        """
        if (refused := self._refusing()) is not None:
            return [refused] * len(items)
        if len(items) == 1:
            return [_outcome(self.ingest, items[0])]
        outcomes: list[Ingested | BaseException | None] = [None] * len(items)
        again: list[int] = []
        latest = max(item[2] for item in items)
        try:
            with self._transaction():
                for i, (agent_id, results, now, offset) in enumerate(items):
                    try:
                        with self._transaction():  # a savepoint
                            outcomes[i] = self._ingest(agent_id, results, now, offset)
                    except DB_ERRORS:
                        raise
                    except Exception:
                        # What memory holds of the URLs it touched is not what is stored. (The
                        # verdicts earlier batches of the group logged still want a checkpoint.)
                        self.projection.forget(r.url_id for r in results)
                        self.projection.reload_pending()
                        if self.evidence is not None:
                            self.evidence.reload()
                        again.append(i)
                self.projection.refold_pending(latest, self.projection.refold_budget)
                self._checkpoint_if_verdict(latest)
        except DB_ERRORS as exc:
            self._rolled_back()
            error = translate(exc, self.name)
            return [error] * len(items)
        for i in again:
            outcomes[i] = _outcome(self.ingest, items[i])
        self._flush_if_due(latest)
        return [o if o is not None else StoreError("batch not ingested") for o in outcomes]

    def _rolled_back(self, results: Sequence[ResultIn] | None = None, pending: bool = True) -> None:
        """After a rollback: the folds it touched (all of them, without `results`), the late
        URLs and the evidence log's frontier are read back as committed."""
        self.projection.forget(None if results is None else (r.url_id for r in results))
        if pending:
            self.projection.reload_pending()
        self._reload_log()

    def _flush_if_due(self, now: float) -> None:
        """After a committed batch: write the folds behind if `flush_every` has passed. A
        failure is logged, not raised: the batch is stored, its folds stay dirty."""
        if self.projection.flush_due(now):
            try:
                self.flush(now)
            except StoreError as exc:
                log.error("flush_failed error=%s", exc)

    def refold_due(self, now: float, limited: bool = True, everything: bool = True) -> int:
        """Refold the URLs waiting for one, or those waiting REFOLD_DELAY (not `everything`),
        for at most `refold_budget` seconds (all of them unless `limited`, as at start and
        stop); return how many were waiting."""
        p = self.projection
        n = p.pending
        if n:
            try:
                with self._transaction():
                    p.refold_pending(now, p.refold_budget if limited else None, everything)
                    self._checkpoint_if_verdict(now)
            except DB_ERRORS as exc:
                self._rolled_back()
                raise translate(exc, self.name) from exc
        return n

    def flush(self, now: float) -> int:
        """Write the url_state rows of every URL folded since the last flush; return how many.

        Its own transaction: if it fails the folds stay dirty (and listed in `unflushed`, so
        a crash before the next flush resumes or refolds them at start).
        """
        p = self.projection
        if not p.dirty:
            p.flushed(now)
            return 0
        try:
            with self._transaction():
                n = p.flush(now)
        except DB_ERRORS as exc:
            raise translate(exc, self.name) from exc
        p.flushed(now)
        return n

    def _ingest_one_by_one(
        self, agent_id: int, results: Sequence[ResultIn], now: float, offset: float | None
    ) -> Ingested:
        stored = duplicates = rejected = 0
        refused: list[str] = []
        for r in results:
            try:
                with self._transaction():
                    done = self._ingest(agent_id, [r], now, offset)
                    self._checkpoint_if_verdict(now)
            except DB_ERRORS as exc:
                self._rolled_back([r], pending=False)
                raise translate(exc, self.name) from exc
            except Exception as exc:
                self._rolled_back([r], pending=False)
                rejected += 1
                refused.append(f"seq {r.seq}: cannot be folded ({type(exc).__name__}: {exc})")
                continue
            stored += done.stored
            duplicates += done.duplicates
            rejected += done.rejected
            refused += done.refused
        return Ingested(stored, duplicates, rejected, tuple(refused))

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

    def _network_of(self, agent_id: int) -> str:
        row = self.conn.execute("SELECT network FROM agents WHERE id = ?", (agent_id,)).fetchone()
        if row is None:
            raise StoreError(f"agent id {agent_id} is not registered")
        return str(row[0])

    def _ingest(
        self, agent_id: int, results: Sequence[ResultIn], now: float, offset: float | None
    ) -> Ingested:
        suspect = int(offset is not None and abs(offset) > self.policy.max_clock_offset)
        network = self._network_of(agent_id)
        known = self._known_seqs(agent_id, [r.seq for r in results])
        fresh: dict[int, ResultIn] = {}
        for r in results:
            if r.seq not in known:
                fresh.setdefault(r.seq, r)
        owned = list(fresh.values())
        refused: list[str] = []
        queued: list[ResultIn] = []
        if self.leases is not None:  # the other shards' results wait for their holders
            owns = self.leases.owns
            queued = self._queue(agent_id, [r for r in owned if not owns(r.url_id)], suspect,
                                 now, refused)  # fmt: skip
            owned = [r for r in owned if owns(r.url_id)]
        p = self.projection
        entries = p.load({r.url_id for r in owned})
        accepted: list[ResultIn] = []
        for r in sorted(owned, key=lambda r: (r.started_at, r.seq)):
            why = p.admit(r.url_id, r.started_at, entries)
            if why is None:
                accepted.append(r)
            else:
                refused.append(f"seq {r.seq}: {why}")
        wheres = [self._attribute(r.peer_ip, entries[r.url_id].origin_ip) for r in accepted]
        batch = [
            (r.url_id, Observation(
                agent_id, network, r.started_at, r.status, r.error, r.sha256, r.final_url,
                r.challenge, r.truncated, r.seq, where.provider if where else "",
                where.asn if where else None, bool(where and where.cdn),
            ))
            for r, where in zip(accepted, wheres, strict=True)
        ]  # fmt: skip
        folded = p.fold(entries, batch)
        leaves: Sequence[int | None] = [None] * len(accepted)
        if self.evidence is not None:
            leaves = self._log_observations(accepted, wheres, now)
        counts: dict[str, int] = {}
        rows = []
        for r, where, (_, obs), cls, leaf in zip(
            accepted, wheres, batch, folded.classes, leaves, strict=True
        ):
            counts[cls.value] = counts.get(cls.value, 0) + 1
            rows.append(
                (agent_id, r.seq, r.url_id, r.started_at, r.elapsed, r.status, r.final_url,
                 r.sha256 or None, r.body_bytes, int(r.truncated), r.peer_ip, r.error,
                 r.redirects, int(r.challenge), suspect, cls.value, obs.provider, obs.asn, now,
                 r.tls, int(obs.cdn), where.country if where else None, leaf)
            )  # fmt: skip
        self.db.insert_rows("results", _RESULT_COLUMNS, rows)
        p.record(folded, now)
        self._count({(agent_id, cls): n for cls, n in counts.items()})
        accepted += queued
        if accepted:
            newest = max(r.started_at for r in accepted)
            self.conn.execute(
                "UPDATE agents SET last_result_at = CASE WHEN last_result_at > ? THEN"
                " last_result_at ELSE ? END, last_seen = ? WHERE id = ?",
                (newest, newest, now, agent_id),
            )
        if offset is not None:
            self.conn.execute("UPDATE agents SET clock_offset = ? WHERE id = ?", (offset, agent_id))
        return Ingested(
            stored=len(accepted),
            duplicates=len(results) - len(fresh),
            rejected=len(fresh) - len(accepted),
            refused=tuple(refused),
        )

    def _queue(
        self, agent_id: int, results: Sequence[ResultIn], suspect: int, now: float,
        refused: list[str],
    ) -> list[ResultIn]:  # fmt: skip
        """Store results of shards another collector holds, and queue them for it to fold;
        return those stored. Admitted as a fold would admit them (a watched URL, probed
        after it was reported); `refused` gets the others' reasons."""
        if not results:
            return []
        ids = sorted({r.url_id for r in results})
        watched = {
            int(u): (float(created), origin)
            for u, created, origin in self.conn.execute(
                "SELECT u.id, u.created_at, s.origin_ip FROM urls u JOIN url_state s"
                " ON s.url_id = u.id WHERE u.active = 1 AND u.id = ANY(?)",
                (ids,),
            )
        }
        accepted = []
        for r in sorted(results, key=lambda r: (r.started_at, r.seq)):
            known = watched.get(r.url_id)
            why = refusal(r.url_id, None if known is None else known[0], r.started_at)
            if why is None:
                accepted.append(r)
            else:
                refused.append(f"seq {r.seq}: {why}")
        wheres = [self._attribute(r.peer_ip, watched[r.url_id][1]) for r in accepted]
        leaves: Sequence[int | None] = [None] * len(accepted)
        if self.evidence is not None:
            leaves = self._log_observations(accepted, wheres, now)
        self.db.insert_rows("results", _RESULT_COLUMNS, [
            (agent_id, r.seq, r.url_id, r.started_at, r.elapsed, r.status, r.final_url,
             r.sha256 or None, r.body_bytes, int(r.truncated), r.peer_ip, r.error, r.redirects,
             int(r.challenge), suspect, "", where.provider if where else "",
             where.asn if where else None, now, r.tls, int(bool(where and where.cdn)),
             where.country if where else None, leaf)
            for r, where, leaf in zip(accepted, wheres, leaves, strict=True)
        ])  # fmt: skip
        self.conn.executemany(
            "INSERT INTO fold_queue (shard, agent_id, seq) VALUES (?, ?, ?)",
            [(r.url_id % SHARDS, agent_id, r.seq) for r in accepted],
        )
        return accepted

    def _log_observations(
        self, accepted: Sequence[ResultIn], wheres: Sequence[Attribution | None], now: float
    ) -> list[int]:
        """One observation leaf per stored result, in the order they are stored, each after
        its batch's leaf (logged once); their indices."""
        log = self.evidence
        assert log is not None
        received = us(now)
        indices = []
        batches: dict[int, int] = {}  # id of a SignedBatch: its batch leaf
        for r, where in zip(accepted, wheres, strict=True):
            evidence = r.evidence
            if evidence is None:
                raise StoreError(
                    f"seq {r.seq}: the evidence log is on but the result came without its"
                    " observation"
                )
            if evidence.url_sha256 != self.ledger.url_sha256(r.url_id):
                raise StoreError(f"seq {r.seq}: the observation is of another URL")
            b = evidence.batch
            batch = batches.get(id(b))  # the results of one batch share its SignedBatch
            if batch is None:
                leaf = ev.BatchLeaf(b.agent, b.network, b.size, b.root, b.signature, received)
                batch = batches[id(b)] = log.batch(leaf, b.hashes)
            attribution = (
                ev.Attribution(where.provider, where.asn or 0, where.cdn)
                if where
                else ev.Attribution("unattributed", 0, False)
            )
            indices.append(
                log.observation(evidence.data, batch, evidence.index, attribution, received,
                                r.url_id)
            )  # fmt: skip
        return indices

    def _attribute(self, peer_ip: str, origin_ip: str | None) -> Attribution | None:
        """The peer's attribution; behind a CDN, the hotline-supplied origin's instead."""
        if not peer_ip:
            return None
        where = self.attribution.lookup(peer_ip)
        if where.cdn and origin_ip:
            return self.attribution.lookup(origin_ip)
        return where

    def _log_deadlines(self, now: float, planner: Planner) -> None:
        """A `deadline_passed` verdict for each deadline an online URL's episode has passed
        (the --deadline values from the episode's opening, and a binding order's due time)."""
        rows = self.conn.execute(
            "SELECT url_id, state, episode, opened_at, order_issued_at, order_deadline,"
            " last_present_at FROM url_state s JOIN urls u ON u.id = s.url_id WHERE u.active = 1"
        ).fetchall()
        for url_id, state, episode, opened, order_at, order_deadline, seen in rows:
            for deadline in planner.deadlines:
                if is_overdue(state, opened, now, deadline):
                    self.ledger.log_verdict(
                        url_id, ev.VerdictEvent.DEADLINE_PASSED, self.method.version, episode,
                        now, seen or 0.0, 0.0, deadline, opened + deadline,
                    )  # fmt: skip
            if is_order_overdue(state, order_at, order_deadline, now, planner.order_deadline):
                due = order_deadline or planner.order_deadline
                self.ledger.log_verdict(
                    url_id, ev.VerdictEvent.DEADLINE_PASSED, self.method.version, episode,
                    now, seen or 0.0, 0.0, due, order_at + due,
                )  # fmt: skip

    def refold(
        self, since: float | None = None, now: float = 0.0, held_only: bool = False
    ) -> list[tuple[int, UrlState, UrlState]]:
        """Recompute every URL's verdict (or those with results probed at or after `since`).

        On PostgreSQL with other collectors running, `held_only` refolds the URLs of the
        shards this one holds (a start under a new method version: each collector refolds
        its own, and a shard taken over later refolds as its states are read); without it
        the call is refused, since the others fold the rest."""
        sql = "SELECT id FROM urls ORDER BY id"
        params: tuple[Any, ...] = ()
        if since is not None:
            sql = "SELECT DISTINCT url_id FROM results WHERE started_at >= ? ORDER BY url_id"
            params = (since,)
        ids = [u for (u,) in self.conn.execute(sql, params)]
        if self.leases is not None:
            if not held_only and self.leases.others_live():
                raise StoreError(
                    f"{self.name}: other collectors are running on this database; each"
                    " refolds the shards it holds at its start under a new method version"
                    " (stop them all to refold everything from here)"
                )
            ids = [u for u in ids if self.leases.owns(u)]
        try:
            with self._transaction():
                changed = self.projection.refold_all(ids, now)
                self._checkpoint_if_verdict(now)
                return changed
        except DB_ERRORS as exc:
            self._rolled_back()
            raise translate(exc, self.name) from exc

    def outdated(self) -> int:
        """URLs whose verdict was folded by another method version than this one."""
        row = self.conn.execute(
            "SELECT COUNT(*) FROM url_state WHERE method < ? OR method > ?",  # the index
            (self.method.version, self.method.version),
        ).fetchone()
        return int(row[0])

    def plan(self, now: float, planner: Planner) -> tuple[list[Target], list[int]]:
        """Recompute every active URL's probe interval; return the changes to push to agents.

        A plan reads every watched URL (10 s at a million): once `interrupted()` says the
        writer is stopping it gives up, changing nothing (the next start plans again), so a
        stop never waits for it.
        """
        if self.interrupted():
            return [], []
        self.flush(now)  # the plan reads url_state
        try:
            with self._transaction():
                if self.evidence is not None:
                    self._log_deadlines(now, planner)
                    self._checkpoint_if_verdict(now)
                return self._plan(now, planner)
        except DB_ERRORS as exc:
            self._reload_log()
            raise translate(exc, self.name) from exc
        except PlanInterrupted:
            self._reload_log()
            log.info("replan_interrupted (stopping): nothing changed, the next start replans")
            return [], []

    def _plan(self, now: float, planner: Planner) -> tuple[list[Target], list[int]]:
        # The scan reads numbers only; the URL texts (a hundred bytes each, a million of them
        # at the first plan after a long stop, when every interval changes) are read for the
        # changed URLs alone, 500 at a time.
        rows = self.conn.execute(
            "SELECT u.id, u.interval, s.state, s.opened_at, s.order_issued_at,"
            " s.order_deadline, s.removed_at FROM urls u JOIN url_state s ON s.url_id = u.id"
            " WHERE u.active = 1"
        ).fetchall()
        wanted: dict[int, float] = {}
        stop: list[int] = []
        for i, (url_id, _, state, notified, order_at, order_deadline, removed_at) in enumerate(
            rows
        ):
            if i % PLAN_CHECK_EVERY == 0 and self.interrupted():
                raise PlanInterrupted
            interval = planner.interval(
                now, UrlState(state), notified, planner.order_due(order_at, order_deadline),
                removed_at,
            )  # fmt: skip
            if interval is None:
                stop.append(url_id)
            else:
                wanted[url_id] = interval
        wanted = planner.within_budget(wanted)
        moved = [
            url_id for url_id, current, *_ in rows if url_id in wanted and current != wanted[url_id]
        ]
        del rows
        # In id order: collectors sharing a PostgreSQL database plan the same URLs, and two
        # transactions updating rows in different orders can deadlock.
        moved.sort()
        stop.sort()
        changed: list[Target] = []
        for chunk in range(0, len(moved), 500):
            if chunk % PLAN_CHECK_EVERY == 0 and self.interrupted():
                raise PlanInterrupted
            ids = moved[chunk : chunk + 500]
            marks = ",".join("?" * len(ids))
            texts = dict(self.conn.execute(f"SELECT id, url FROM urls WHERE id IN ({marks})", ids))
            changed += (Target(u, texts[u], wanted[u]) for u in ids)
        self.conn.executemany(
            "UPDATE urls SET interval = ? WHERE id = ?", [(t.interval, t.url_id) for t in changed]
        )
        self.conn.executemany("UPDATE urls SET active = 0 WHERE id = ?", [(u,) for u in stop])
        self._assignment_changed([t.url_id for t in changed] + stop)
        self.projection.retire(stop)  # the cache holds active URLs only (see Projection.load)
        return changed, stop


_RESULT_COLUMNS = (
    "agent_id", "seq", "url_id", "started_at", "elapsed", "status", "final_url", "sha256",
    "body_bytes", "truncated", "peer_ip", "error", "redirects", "challenge", "clock_suspect",
    "class", "provider", "asn", "stored_at", "tls", "cdn", "country", "leaf",
)  # fmt: skip
# Claim up to N queued results of the given shards (PostgreSQL; other collectors skip the
# rows claimed) and read them as the fold does, in event order.
_CLAIM_QUEUED = (
    "WITH claimed AS (DELETE FROM fold_queue WHERE (agent_id, seq) IN (SELECT agent_id, seq"
    " FROM fold_queue WHERE shard = ANY(?) LIMIT ? FOR UPDATE SKIP LOCKED)"
    " RETURNING agent_id, seq)"
    f" SELECT r.url_id, {OBSERVATION_COLUMNS}"
    " JOIN claimed q ON q.agent_id = r.agent_id AND q.seq = r.seq"
    " ORDER BY r.started_at, r.agent_id, r.seq"
)

IngestCall = tuple[int, Sequence[ResultIn], float, "float | None"]
"""The arguments of one `Store.ingest`: agent id, results, now, clock offset."""


def _outcome(ingest: Any, call: IngestCall) -> Ingested | BaseException:
    try:
        return ingest(*call)  # type: ignore[no-any-return]
    except Exception as exc:
        return exc
