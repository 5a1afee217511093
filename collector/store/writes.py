"""The single writer's side of the store: every INSERT/UPDATE goes through `Store`.

`Store` is used from one thread only (see writer.py). Each public method is
one transaction: a batch of results, its verdict updates and its counters
commit together or not at all, so an acknowledgement sent after the call
returns covers everything the batch changed.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import sqlite_utils

from collector.attribution import Attribution
from collector.evidence import leaves as ev
from collector.evidence.note import NoteSigner
from collector.fold import (
    Event,
    Method,
    Notice,
    Observation,
    OutOfOrder,
    ProviderChange,
    Reappearance,
    Removal,
    Renotified,
    StateChange,
    Tail,
    UrlFold,
    classify,
    event_order,
    refold,
)
from collector.method import Policy, ProbeClass, UrlState, is_order_overdue, is_overdue
from collector.reports_file import ReportIn
from collector.schedule import Planner
from collector.store.codec import UnreadableState, dump_fold, load_fold
from collector.store.evidence import EvidenceLog
from collector.store.model import (
    AgentKeyRefused,
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

log = logging.getLogger(__name__)
_FULL_MESSAGES = ("database or disk is full", "disk i/o error")
# URLs whose verdicts stay in memory: about 2 KB each with ten agents, so the cache stays
# well under a gigabyte whatever the number of URLs.
CACHE_URLS = 250_000
# How long a URL that got a result older than its tail waits for its refold (see ingest).
REFOLD_DELAY = 2.0
# Seconds of late refolds one writer transaction does at most (always at least one URL): a
# refold reads a URL's whole history, and after an outage every URL of a network may be due,
# seconds of work that would hold back every ack. The rest waits for the next transaction.
REFOLD_BUDGET = 0.1
# A result probed this long before its URL was reported cannot be one of ours.
ANCIENT_SLACK = 86400.0


def translate(exc: sqlite3.Error, path: Path) -> StoreError:
    """Turn a sqlite3 error into the store's own exception, naming the file."""
    text = str(exc)
    if any(m in text.lower() for m in _FULL_MESSAGES):
        return StorageFull(f"{path}: storage full or failing, nothing was committed ({text})")
    if "not a database" in text or "malformed" in text:
        return CorruptDatabase(f"{path}: not a usable SQLite database ({text})")
    return StoreError(f"{path}: {text}")


def open_database(path: Path) -> sqlite_utils.Database:
    """Open (creating if needed) and migrate the collector database, checking its integrity
    unless the last store on it stopped cleanly (`PRAGMA quick_check` reads the whole file:
    5 s at 2.3 GB). A damaged page found later fails its statement as CorruptDatabase."""
    try:
        conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA busy_timeout=5000")
        if not _stopped_cleanly(conn):
            check = conn.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise CorruptDatabase(f"{path}: integrity check failed: {check}")
        db = sqlite_utils.Database(conn)
        migrations.apply(db)
        conn.execute("UPDATE lifecycle SET clean_stop = 0")  # until close() says otherwise
        return db
    except sqlite3.Error as exc:
        raise translate(exc, path) from exc


def _stopped_cleanly(conn: sqlite3.Connection) -> bool:
    try:
        row = conn.execute("SELECT clean_stop FROM lifecycle").fetchone()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return False  # a new database, or one from before m009
        raise
    return bool(row and row[0])


class Attributor(Protocol):
    def lookup(self, ip: str) -> Attribution: ...


@dataclass(slots=True)
class UrlEntry:
    """A URL's fold and what the store keeps beside it."""

    fold: UrlFold
    provider: str
    asn: int | None
    cdn: bool
    origin_ip: str | None
    created_at: float
    first_notice: float
    tail: Tail | None = None  # recent observations, in memory only (see fold.Tail)
    folded: int = -1  # stored results folded into `fold` (-1: not known)


_STATE_COLUMNS = "url_id, memory, provider, asn, cdn, origin_ip, method"


_SAVE_STATE = (
    "UPDATE url_state SET state = ?, baseline = ?, provider = ?, asn = ?, cdn = ?,"
    " dynamic = ?, episode = ?, last_present_at = ?, removal_last_present_at = ?,"
    " removal_first_removed_at = ?, removal_confirmed_at = ?, removal_latency = ?,"
    " removal_nxdomain = ?, removal_observed_present = ?, removed_at = ?, reappearances = ?,"
    " memory = ?, method = ?, opened_at = ?, live_until = ?, last_conclusive_at = ?,"
    " first_provider = ?, truncated_vs_reference = ?, notified_at = ?, updated_at = ?,"
    " folded = ? WHERE url_id = ?"
)


def _state_row(
    url_id: int, entry: UrlEntry, now: float, checkpoint: bool = True
) -> tuple[Any, ...]:
    """The parameters of _SAVE_STATE for one URL's fold. Only a `checkpoint` (a flush, or a
    state written with its batch) records how many results it folded: a restart resumes from
    it (see Store._resume); other writes record -1, and a restart refolds such a URL."""
    f = entry.fold
    first = f.first_removal
    first_provider = first.provider if first and first.provider else entry.provider
    return (f.state.value, f.content.baseline, entry.provider, entry.asn, int(entry.cdn),
            int(f.content.dynamic), f.episode, f.last_present_at,
            first.last_present_at if first else None, first.first_removed_at if first else None,
            first.confirmed_at if first else None, first.latency if first else None,
            int(first.nxdomain) if first else 0, int(first.observed_present) if first else 1,
            f.removed_at, f.reappearances, dump_fold(f), f.method.version, f.opened_at,
            f.live_until, f.last_conclusive_at, first_provider, f.truncated_vs_reference,
            entry.first_notice, now, entry.folded if checkpoint else -1, url_id)  # fmt: skip


_OBSERVATIONS = (
    "SELECT r.agent_id, a.network, r.started_at, r.status, r.error, r.sha256, r.final_url,"
    " r.challenge, r.truncated, r.seq, r.provider, r.asn, r.cdn"
    " FROM results r JOIN agents a ON a.id = r.agent_id WHERE r.url_id = ?"
    " ORDER BY r.started_at, r.agent_id, r.seq"
)
# Results stored after the last flush's marks (see Store._after_checkpoint), probed at or after
# a time.
_OBSERVATIONS_AFTER_MARKS = _OBSERVATIONS.replace(
    "WHERE r.url_id = ?",
    "WHERE r.url_id = ? AND r.started_at >= ? AND r.seq >"
    " COALESCE((SELECT m.seq FROM fold_marks m WHERE m.agent_id = r.agent_id), -1)",
)
_HISTORY_KINDS = ("state", "removal", "reappearance", "provider", "renotified")


class Store:
    """Writes reports, agents and results, and keeps each URL's fold up to date."""

    def __init__(
        self,
        path: Path,
        attribution: Attributor,
        policy: Policy,
        cache_urls: int = CACHE_URLS,
        planner: Planner | None = None,
        log_signer: NoteSigner | None = None,
        flush_every: float = 0.0,
    ) -> None:
        self.path = path
        self.db = open_database(path)
        self.conn: sqlite3.Connection = self.db.conn
        self.attribution = attribution
        self.policy = policy
        self.planner = planner or Planner()
        self.method = method_of(policy, self.planner)
        # Folds of the most recently touched URLs. Every batch persists what it changed, so an
        # entry dropped here is read back exactly as it was (as after a restart).
        self._entries: OrderedDict[int, UrlEntry] = OrderedDict()
        self._cache_urls = cache_urls
        self._pending: dict[int, float] = {}
        self.refold_budget = REFOLD_BUDGET
        self._last_now = 0.0
        # The evidence log, when the collector has a log key: every notice, stored result and
        # verdict event is a leaf appended in the transaction that stores the fact.
        self.evidence = EvidenceLog(self.conn, log_signer) if log_signer is not None else None
        self._url_hashes: dict[int, bytes] = {}
        self._verdict_logged = False
        # Write-behind of the verdict projection: a batch stores its results, episodes and
        # events, and marks its URLs in `unflushed`; their url_state rows are written at most
        # every `flush_every` seconds (0: with every batch). `_dirty` holds those folds (the
        # cache may drop them, these stay); `_stale` the URLs whose fold in memory was lost
        # by a rollback, so the database's url_state is behind: they are refolded on next use.
        self.flush_every = flush_every
        self._dirty: dict[int, UrlEntry] = {}
        self._stale: set[int] = set()
        self._flushed_at = 0.0
        self._pending_reload()
        # A crash left URLs whose url_state is older than their results: resume their folds
        # from it, or refold them.
        self._resume_unflushed()
        if self._pending:  # a crash left refolds due
            self.refold_due(0.0, limited=False)

    def _resume_unflushed(self) -> None:
        """At start, after a crash: each URL folded since its url_state row was written
        resumes from that row (the results after it folded on top), or is marked for a refold
        from its whole history where that cannot be proven equal."""
        unflushed = [u for (u,) in self.conn.execute("SELECT url_id FROM unflushed ORDER BY 1")]
        if not unflushed:
            return
        began = time.monotonic()
        outcomes = {"resumed": 0, "refolded": 0, "due": 0}
        with self._transaction():
            for url_id in unflushed:
                outcome = "due" if url_id in self._pending else self._resume(url_id)
                if outcome == "due":
                    self._pending.setdefault(url_id, 0.0)
                outcomes[outcome] += 1
        log.info(
            "folds_resumed urls=%d refolds=%d seconds=%.3f (damaged states refolded: %d)",
            outcomes["resumed"], outcomes["due"], time.monotonic() - began, outcomes["refolded"],
        )  # fmt: skip

    def _resume(self, url_id: int) -> str:
        """Fold the results stored after the URL's checkpoint onto it ("resumed"); "due" if
        that would not equal a refold (the row is no checkpoint, or a result it does not
        cover is older than its newest input); "refolded" if its state was unreadable (see
        _load).

        The uncovered results (see _after_checkpoint) come after the checkpoint in event
        time, or it is refused.
        """
        row = self.conn.execute(
            "SELECT folded, method FROM url_state WHERE url_id = ?", (url_id,)
        ).fetchone()
        if row is None or row[0] < 0 or row[1] != self.method.version:
            return "due"
        folded = int(row[0])
        refolded: set[int] = set()
        entry = self._load({url_id}, active_only=False, refolded=refolded).get(url_id)
        if entry is None:
            return "due"
        if refolded:
            return "refolded"  # in full: nothing to resume
        fold = entry.fold
        after = self._after_checkpoint(url_id, folded, fold.newest_at)
        if after is None or (after and event_order(after[0]) < fold.newest_key):
            return "due"
        for obs in after:
            fold.observe(obs, self.networks_at(obs.at))
        entry.tail, entry.folded = None, folded + len(after)
        self._dirty[url_id] = entry
        return "resumed"

    def close(self) -> None:
        """Refold what is due (a clean stop leaves no refold for the next start), then close."""
        try:
            self.refold_due(self._last_now, limited=False)
            self.flush(self._last_now)
            self.conn.execute("UPDATE lifecycle SET clean_stop = 1")
        finally:
            self.conn.close()

    def idle(self) -> None:
        """Nothing to do for a while: refold what a rollback left behind and a budget's worth
        of the late refolds due, write the dirty folds (see flush)."""
        if self._stale:
            try:
                with self._transaction():
                    self._refold_urls(sorted(self._stale), self._last_now)
            except sqlite3.Error as exc:
                self._forget()
                raise translate(exc, self.path) from exc
        if self._pending:
            self.refold_due(self._last_now, everything=False)
        if self._dirty:
            self.flush(self._last_now)

    def _transaction(self) -> Any:
        return self.db.atomic()

    def _reload_log(self) -> None:
        """After a rollback: the log's frontier is what was committed."""
        if self.evidence is not None:
            self.evidence.reload()
        self._verdict_logged = False

    def _checkpoint_if_verdict(self, now: float) -> None:
        """A checkpoint with every transaction that logged a verdict, so each removal,
        reappearance and deadline verdict is covered by a signed tree head at once."""
        if self.evidence is not None and self._verdict_logged:
            self.evidence.checkpoint(now)
            self._verdict_logged = False

    def _url_sha256(self, url_id: int) -> bytes:
        digest = self._url_hashes.get(url_id)
        if digest is None:
            row = self.conn.execute("SELECT url FROM urls WHERE id = ?", (url_id,)).fetchone()
            if row is None:
                raise StoreError(f"URL id {url_id} is not known")
            if len(self._url_hashes) >= self._cache_urls:
                self._url_hashes.clear()
            digest = self._url_hashes[url_id] = ev.url_sha256(str(row[0]))
        return digest

    def checkpoint(self, now: float) -> str | None:
        """Sign a checkpoint of the evidence log as it is (None without a log key)."""
        if self.evidence is None:
            return None
        try:
            with self._transaction():
                self._verdict_logged = False
                return self.evidence.checkpoint(now)
        except sqlite3.Error as exc:
            self._reload_log()
            raise translate(exc, self.path) from exc

    def networks_at(self, _at: float) -> int:
        """Networks the fold counts as deployed: `min_vantage_points`, whoever said hello.

        A collector cannot know which agents are still to come: counting only those that said
        hello would let the first agent to start decide alone (its 451s would be a removal).
        A single-network deployment says so with `--min-vantage-points 1`.
        """
        return self.policy.min_vantage_points

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
        except sqlite3.Error as exc:
            self._reload_log()
            raise translate(exc, self.path) from exc
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
            index = self.evidence.append(ev.AgentKeyLeaf(name, network, key, _us(now)))
            self.conn.execute("UPDATE agent_keys SET leaf = ? WHERE name = ?", (index, name))

    def submit_reports(
        self, reports: Sequence[ReportIn], now: float, planner: Planner, source: str = ""
    ) -> list[SubmitOutcome]:
        """Store reports once per (hotline, reference), or per URL and notice without one.

        `source` names the hotline (its intake credential). A report for a URL already known
        refolds it, so a new notice for removed or retired content opens a new episode and
        the URL is assigned to agents again.
        """
        try:
            with self._transaction():
                outcomes = [self._submit_one(r, now, planner, source) for r in reports]
                self._checkpoint_if_verdict(now)
                return outcomes
        except BaseException as exc:
            self._forget()
            self._reload_log()
            if isinstance(exc, sqlite3.Error):
                raise translate(exc, self.path) from exc
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
                "INSERT INTO urls (url, created_at, interval) VALUES (?, ?, ?)",
                (report.url, now, interval),
            ).lastrowid
            assert url_id is not None
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
                " order_issued_at = COALESCE(MIN(order_issued_at, ?), order_issued_at, ?),"
                " order_deadline = COALESCE(order_deadline, ?),"
                " origin_ip = COALESCE(origin_ip, ?) WHERE url_id = ?",
                (report.order_issued_at, report.order_issued_at, report.order_deadline,
                 report.origin_ip, url_id),
            )  # fmt: skip
        report_id = c.execute(
            "INSERT INTO reports (url_id, source, reference, notified_at, received_at,"
            " submitted_at, sha256, order_issued_at, order_deadline, origin_ip)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (url_id, source, report.reference, report.notified_at, report.received_at, now,
             report.sha256, report.order_issued_at, report.order_deadline, report.origin_ip),
        ).lastrowid  # fmt: skip
        assert report_id is not None
        if self.evidence is not None:
            self._url_hashes[url_id] = digest = ev.url_sha256(report.url)
            reference, form = ev.NoticeLeaf.hashing_reference(report.reference or "")
            self.evidence.append(
                ev.NoticeLeaf(
                    url_sha256=digest,
                    received_at_us=_us(report.received_at if report.received_at else now),
                    notified_at_us=_us(report.notified_at),
                    order_issued_at_us=_us(report.order_issued_at or 0.0),
                    order_deadline_seconds=round(report.order_deadline or 0),
                    reference=reference,
                    reference_form=form,
                    content_sha256=report.sha256 or b"",
                    logged_at_us=_us(now),
                    url_prev=self.evidence.head(url_id),
                ),
                url_id,
            )
        reassign = new_url
        if not new_url:
            self._entries.pop(url_id, None)
            self._refold_urls([url_id], now)
            if not row[1]:
                c.execute("UPDATE urls SET active = 1 WHERE id = ?", (url_id,))
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
        try:
            with self._transaction():
                done = self._ingest(agent_id, results, now, clock_offset)
                self._refold_pending(now, budget=self.refold_budget)
                self._checkpoint_if_verdict(now)
        except sqlite3.Error as exc:
            self._forget(results)
            self._pending_reload()
            self._reload_log()
            raise translate(exc, self.path) from exc
        except Exception:
            self._forget(results)
            self._reload_log()
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
                    except sqlite3.Error:
                        raise
                    except Exception:
                        # What memory holds of the URLs it touched is not what is stored. (The
                        # verdicts earlier batches of the group logged still want a checkpoint.)
                        self._forget(results)
                        self._pending_reload()
                        if self.evidence is not None:
                            self.evidence.reload()
                        again.append(i)
                self._refold_pending(latest, budget=self.refold_budget)
                self._checkpoint_if_verdict(latest)
        except sqlite3.Error as exc:
            self._forget()
            self._pending_reload()
            self._reload_log()
            error = translate(exc, self.path)
            return [error] * len(items)
        for i in again:
            outcomes[i] = _outcome(self.ingest, items[i])
        self._flush_if_due(latest)
        return [o if o is not None else StoreError("batch not ingested") for o in outcomes]

    def _flush_if_due(self, now: float) -> None:
        """After a committed batch: write the folds behind if `flush_every` has passed. A
        failure is logged, not raised: the batch is stored, its folds stay dirty."""
        if self._dirty and now - self._flushed_at >= self.flush_every:
            try:
                self.flush(now)
            except StoreError as exc:
                log.error("flush_failed error=%s", exc)

    def _refold_pending(self, now: float, budget: float | None, everything: bool = False) -> None:
        """Refold the URLs that got a result older than their tail, once it waited REFOLD_DELAY
        (`everything`: all of them), the longest waiting first, for at most `budget` seconds
        (None: no limit); what is left stays due for the next call.

        A spool delivered late arrives in many batches; refolding its URLs from the stored
        results after each would cost a read of their whole history per batch. Meanwhile the
        late results are stored, the URL's newer ones keep folding, and `refold_pending` in the
        database says a refold is due (done at start after a crash).
        """
        self._last_now = max(self._last_now, now)
        due = sorted(
            (since, u)
            for u, since in self._pending.items()
            if everything or now - since >= REFOLD_DELAY
        )
        if not due:
            return
        began = time.monotonic()
        done = 0
        for _, url_id in due:
            if not self._refold_from_checkpoint(url_id):
                self._refold_urls([url_id], now, None)
            done += 1
            if budget is not None and time.monotonic() - began >= budget:
                break
        log.debug(
            "refolded_late urls=%d left=%d seconds=%.3f",
            done, len(self._pending), time.monotonic() - began,
        )  # fmt: skip

    def _after_checkpoint(
        self, url_id: int, folded: int, newest_at: float
    ) -> list[Observation] | None:
        """The results a URL's checkpoint does not cover, in event order, or None if it may
        not cover exactly the others. `folded` and `newest_at` are the checkpoint's.

        A checkpoint written by a flush covers every result stored before it: each agent's
        results up to its highest seq then (`fold_marks`). If as many of the stored results
        are within the marks as it folded, the covered set is exactly the folded one (any
        result stored after the flush with a seq within the marks would make one too many).
        Only those probed at or after `newest_at` are read: one outside the marks but older
        is missing from the list, and the count then refuses.
        """
        after = self._observations(url_id, after_marks_since=newest_at)
        (total,) = self.conn.execute(
            "SELECT COUNT(*) FROM results WHERE url_id = ?", (url_id,)
        ).fetchone()
        return after if total - len(after) == folded else None

    def _refold_from_checkpoint(self, url_id: int) -> bool:
        """Refold a late URL from its flushed url_state row and the results stored after it,
        where that equals a refold from scratch; False (nothing done) where it may not.

        If every result the row does not cover (see _after_checkpoint: a late one stored since
        the flush is among them) was probed after the row's newest input, the fold is the
        row's with those folded on top in event order, and only the history after the row is
        rewritten, so a network's spool delivered late costs the results since the last flush
        (seconds) rather than the URL's whole history.
        """
        if self.flush_every <= 0:
            return False  # no flushes, no checkpoints
        entry = self._entries.get(url_id) or self._dirty.get(url_id)
        row = self.conn.execute(
            "SELECT folded, method, memory FROM url_state WHERE url_id = ?", (url_id,)
        ).fetchone()
        if entry is None or row is None or row[0] < 0 or row[1] != self.method.version:
            return False
        try:
            base = load_fold(row[2], self.method)
        except UnreadableState:
            return False
        after = self._after_checkpoint(url_id, int(row[0]), base.newest_at)
        if not after or after[0].at <= base.newest_at:
            return False
        head = base.clone()
        events: list[Event] = []
        for obs in after:  # in event order
            events += head.observe(obs, self.networks_at(obs.at))
        entry.fold, entry.folded = head, int(row[0]) + len(after)
        entry.tail = Tail(base, head, [], events)
        self._rewrite_tail(url_id, entry)
        entry.tail = None
        self._stale.discard(url_id)
        if self._pending.pop(url_id, None) is not None:
            self.conn.execute("UPDATE url_state SET refold_pending = 0 WHERE url_id = ?", (url_id,))
        # Its url_state row stays the checkpoint, older than its results (see _resume).
        self.conn.execute("INSERT OR IGNORE INTO unflushed (url_id) VALUES (?)", (url_id,))
        self._dirty[url_id] = entry
        return True

    def _pending_reload(self) -> None:
        """After a rollback: the pending set is what the database says."""
        self._pending = {
            u: 0.0
            for (u,) in self.conn.execute("SELECT url_id FROM url_state WHERE refold_pending = 1")
        }

    def refold_due(self, now: float, limited: bool = True, everything: bool = True) -> int:
        """Refold the URLs waiting for one, or those waiting REFOLD_DELAY (not `everything`),
        for at most `refold_budget` seconds (all of them unless `limited`, as at start and
        stop); return how many were waiting."""
        n = len(self._pending)
        if n:
            budget = self.refold_budget if limited else None
            try:
                with self._transaction():
                    self._refold_pending(now, budget, everything)
                    self._checkpoint_if_verdict(now)
            except sqlite3.Error as exc:
                self._forget()
                self._pending_reload()
                self._reload_log()
                raise translate(exc, self.path) from exc
        return n

    def _forget(self, results: Sequence[ResultIn] | None = None) -> None:
        """After a rollback: drop the folds it touched (all, without `results`). Their next
        use reads them back as committed, or refolds them if url_state is behind."""
        touched = (
            {r.url_id for r in results} if results is not None
            else {*self._entries, *self._dirty}
        )  # fmt: skip
        for url_id in touched:
            self._entries.pop(url_id, None)
            if self._dirty.pop(url_id, None) is not None:
                self._stale.add(url_id)

    def flush(self, now: float) -> int:
        """Write the url_state rows of every URL folded since the last flush; return how many.

        Its own transaction: if it fails the folds stay dirty (and listed in `unflushed`, so
        a crash before the next flush refolds them at start).
        """
        dirty = self._dirty
        if not dirty:
            self._flushed_at = now
            return 0
        try:
            with self._transaction():
                self.conn.executemany(
                    _SAVE_STATE, [_state_row(u, dirty[u], now) for u in sorted(dirty)]
                )
                # What these states cover: every result stored so far, i.e. up to each agent's
                # highest seq (see _resume). URLs a rollback left stale stay unflushed.
                self.conn.execute(
                    "INSERT OR REPLACE INTO fold_marks (agent_id, seq) SELECT a.id,"
                    " (SELECT MAX(r.seq) FROM results r WHERE r.agent_id = a.id) FROM agents a"
                    " WHERE EXISTS (SELECT 1 FROM results r WHERE r.agent_id = a.id)"
                )
                self.conn.execute("DELETE FROM unflushed")
                self.conn.executemany(
                    "INSERT INTO unflushed (url_id) VALUES (?)", [(u,) for u in self._stale]
                )
        except sqlite3.Error as exc:
            raise translate(exc, self.path) from exc
        n = len(dirty)
        self._dirty = {}
        self._flushed_at = now
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
            except sqlite3.Error as exc:
                self._forget([r])
                self._reload_log()
                raise translate(exc, self.path) from exc
            except Exception as exc:
                self._forget([r])
                self._reload_log()
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
        entries = self._load({r.url_id for r in fresh.values()})
        refused: list[str] = []
        accepted: list[ResultIn] = []
        for r in sorted(fresh.values(), key=lambda r: (r.started_at, r.seq)):
            entry = entries.get(r.url_id)
            if entry is None:
                refused.append(f"seq {r.seq}: URL id {r.url_id} is unknown or no longer watched")
            elif r.started_at < entry.created_at - ANCIENT_SLACK:
                refused.append(
                    f"seq {r.seq}: started_at {r.started_at:.0f} is before URL id {r.url_id}"
                    " was reported"
                )
            else:
                accepted.append(r)
        rows = []
        counts: dict[str, int] = {}
        history: dict[int, list[Event]] = {}  # events to append, per URL
        rewrite: set[int] = set()  # URLs whose events since their tail's base changed
        late: set[int] = set()  # URLs to refold from the stored results
        wheres: list[Attribution | None] = []
        for r in accepted:
            entry = entries[r.url_id]
            where = self._attribute(r.peer_ip, entry.origin_ip)
            wheres.append(where)
            obs = Observation(
                agent_id, network, r.started_at, r.status, r.error, r.sha256, r.final_url,
                r.challenge, r.truncated, r.seq, where.provider if where else "",
                where.asn if where else None, bool(where and where.cdn),
            )  # fmt: skip
            cls = classify(obs, self.policy) or ProbeClass.INCONCLUSIVE
            if r.url_id not in late:
                if entry.tail is None:
                    entry.tail = Tail.of(entry.fold)
                try:
                    events, changed = entry.tail.add(obs, self.networks_at(r.started_at))
                except OutOfOrder:
                    late.add(r.url_id)
                else:
                    entry.fold = entry.tail.head
                    if entry.folded >= 0:
                        entry.folded += 1
                    history.setdefault(r.url_id, []).extend(events)
                    if changed:
                        rewrite.add(r.url_id)
                    else:
                        cls = entry.fold.last_class or cls
            counts[cls.value] = counts.get(cls.value, 0) + 1
            rows.append(
                (agent_id, r.seq, r.url_id, r.started_at, r.elapsed, r.status, r.final_url,
                 r.sha256 or None, r.body_bytes, int(r.truncated), r.peer_ip, r.error,
                 r.redirects, int(r.challenge), suspect, cls.value, obs.provider, obs.asn, now,
                 r.tls, int(obs.cdn), where.country if where else None)
            )  # fmt: skip
        if self.evidence is not None:
            self._log_observations(accepted, wheres, now)
        self.conn.executemany(
            "INSERT INTO results (agent_id, seq, url_id, started_at, elapsed, status, final_url,"
            " sha256, body_bytes, truncated, peer_ip, error, redirects, challenge, clock_suspect,"
            " class, provider, asn, stored_at, tls, cdn, country)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
        for url_id, events in history.items():
            if url_id in late:
                continue
            if url_id in rewrite:
                self._rewrite_tail(url_id, entries[url_id])
            else:
                self._record(url_id, entries[url_id], events)
        for url_id in late:
            history.pop(url_id, None)
            self._pending.setdefault(url_id, now)
        if late:
            self.conn.executemany(
                "UPDATE url_state SET refold_pending = 1 WHERE url_id = ?", [(u,) for u in late]
            )
        for url_id in history:
            tail = entries[url_id].tail
            if tail is not None:
                tail.trim(self.networks_at(now))
        self.conn.executemany(
            "INSERT INTO result_counts (agent_id, class, n) VALUES (?, ?, ?)"
            " ON CONFLICT(agent_id, class) DO UPDATE SET n = n + excluded.n",
            [(agent_id, cls, n) for cls, n in counts.items()],
        )
        if self.flush_every <= 0:
            self.conn.executemany(
                _SAVE_STATE, [_state_row(u, entries[u], now) for u in sorted(history)]
            )
        else:
            new = [u for u in history if u not in self._dirty]
            self.conn.executemany(
                "INSERT OR IGNORE INTO unflushed (url_id) VALUES (?)", [(u,) for u in new]
            )
            for u in history:
                self._dirty[u] = entries[u]
        if accepted:
            self.conn.execute(
                "UPDATE agents SET last_result_at = MAX(COALESCE(last_result_at, 0), ?),"
                " last_seen = ? WHERE id = ?",
                (max(r.started_at for r in accepted), now, agent_id),
            )
        if offset is not None:
            self.conn.execute("UPDATE agents SET clock_offset = ? WHERE id = ?", (offset, agent_id))
        return Ingested(
            stored=len(accepted),
            duplicates=len(results) - len(fresh),
            rejected=len(fresh) - len(accepted),
            refused=tuple(refused),
        )

    def _log_observations(
        self, accepted: Sequence[ResultIn], wheres: Sequence[Attribution | None], now: float
    ) -> None:
        """One observation leaf per stored result, in the order they are stored."""
        log = self.evidence
        assert log is not None
        for r, where in zip(accepted, wheres, strict=True):
            if r.evidence is None:
                raise StoreError(
                    f"seq {r.seq}: the evidence log is on but the result came without its"
                    " observation"
                )
            observation, signature = r.evidence
            if observation.url_sha256 != self._url_sha256(r.url_id):
                raise StoreError(f"seq {r.seq}: the observation is of another URL")
            attribution = (
                ev.Attribution(where.provider, where.asn or 0, where.cdn)
                if where
                else ev.Attribution("unattributed", 0, False)
            )
            log.append(
                ev.ObservationLeaf(
                    observation, signature, attribution, _us(now), log.head(r.url_id),
                ),
                r.url_id,
            )  # fmt: skip

    def _attribute(self, peer_ip: str, origin_ip: str | None) -> Attribution | None:
        """The peer's attribution; behind a CDN, the hotline-supplied origin's instead."""
        if not peer_ip:
            return None
        where = self.attribution.lookup(peer_ip)
        if where.cdn and origin_ip:
            return self.attribution.lookup(origin_ip)
        return where

    # -- the fold's history in SQL --------------------------------------------------------------

    def _event(self, url_id: int, at: float, kind: str, detail: dict[str, Any]) -> None:
        self.conn.execute(
            "INSERT INTO url_events (url_id, at, kind, detail) VALUES (?, ?, ?, ?)",
            (url_id, at, kind, json.dumps(detail, separators=(",", ":"))),
        )

    def _record(self, url_id: int, entry: UrlEntry, events: Sequence[Event]) -> None:
        """Write what the fold reported: episodes, the timeline, the reappearance log."""
        c = self.conn
        for event in events:
            if isinstance(event, Removal):
                c.execute(
                    "UPDATE episodes SET last_present_at = ?, first_removed_at = ?,"
                    " confirmed_at = ?, latency = ?, nxdomain = ?, observed_present = ?,"
                    " provider = ? WHERE url_id = ? AND episode = ?",
                    (event.last_present_at, event.first_removed_at, event.confirmed_at,
                     event.latency, int(event.nxdomain), int(event.observed_present),
                     event.provider or entry.provider, url_id, event.episode),
                )  # fmt: skip
                self._log_verdict(
                    url_id, ev.VerdictEvent.REMOVAL_CONFIRMED, entry, event.episode,
                    event.confirmed_at, event.last_present_at or 0.0, event.first_removed_at,
                )  # fmt: skip
                self._event(url_id, event.confirmed_at, "removal", {
                    "episode": event.episode, "last_present_at": event.last_present_at,
                    "first_removed_at": event.first_removed_at, "latency": event.latency,
                    "nxdomain": event.nxdomain, "observed_present": event.observed_present,
                    "method": entry.fold.method.version})  # fmt: skip
            elif isinstance(event, Reappearance | Renotified):
                kind = "reappearance" if isinstance(event, Reappearance) else "renotified"
                c.execute(
                    "INSERT INTO episodes (url_id, episode, opened_at, provider, opened_by)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (url_id, event.episode, event.at, event.provider or entry.provider, kind),
                )
                if isinstance(event, Reappearance):
                    self._log_verdict(
                        url_id, ev.VerdictEvent.REAPPEARANCE, entry, event.episode, event.at,
                        event.at, 0.0,
                    )  # fmt: skip
                    c.execute(
                        "INSERT OR IGNORE INTO reappearance_log (url_id, episode, provider, at)"
                        " VALUES (?, ?, ?, ?)",
                        (url_id, event.episode, event.provider or entry.provider, event.at),
                    )
                self._event(url_id, event.at, kind, {"episode": event.episode})
            elif isinstance(event, StateChange):
                self._event(url_id, event.at, "state", {"from": event.old, "to": event.new})
            elif isinstance(event, ProviderChange):
                self._event(url_id, event.at, "provider", {"from": event.old, "to": event.new})
        f = entry.fold
        if f.provider:
            entry.provider, entry.asn, entry.cdn = f.provider, f.asn, f.cdn

    def _log_verdict(
        self, url_id: int, kind: ev.VerdictEvent, entry: UrlEntry | None, episode: int,
        decided: float, last_present: float, first_removed: float, deadline: float = 0.0,
        deadline_at: float = 0.0,
    ) -> None:  # fmt: skip
        """A verdict leaf, unless the log holds this very verdict already.

        A refold writes a URL's history again; a verdict it decides again, with the same
        times and method, is already in the log. One that differs is logged: the log keeps
        what was decided when, and a bundle shows the latest verdict of each episode. A
        deadline verdict is logged once per episode and deadline.
        """
        if self.evidence is None:
            return
        method = entry.fold.method.version if entry is not None else self.method.version
        if kind is ev.VerdictEvent.DEADLINE_PASSED:
            key = f"{kind.value}|{episode}|{_us(deadline_at)}|{round(deadline)}"
        else:
            key = f"{kind.value}|{episode}|{_us(last_present)}|{_us(first_removed)}|{method}"
        inserted = self.conn.execute(
            "INSERT OR IGNORE INTO log_verdicts (url_id, key) VALUES (?, ?)", (url_id, key)
        ).rowcount
        if not inserted:
            return
        self.evidence.append(
            ev.VerdictLeaf(
                url_sha256=self._url_sha256(url_id), event=kind, method=method,
                decided_at_us=_us(decided), episode=episode, last_present_us=_us(last_present),
                first_removed_us=_us(first_removed), deadline_seconds=round(deadline),
                deadline_at_us=_us(deadline_at), basis=(), url_prev=self.evidence.head(url_id),
            ),
            url_id,
        )  # fmt: skip
        self._verdict_logged = True

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
                    self._log_verdict(
                        url_id, ev.VerdictEvent.DEADLINE_PASSED, None, episode, now, seen or 0.0,
                        0.0, deadline, opened + deadline,
                    )  # fmt: skip
            if is_order_overdue(state, order_at, order_deadline, now, planner.order_deadline):
                due = order_deadline or planner.order_deadline
                self._log_verdict(
                    url_id, ev.VerdictEvent.DEADLINE_PASSED, None, episode, now, seen or 0.0,
                    0.0, due, order_at + due,
                )  # fmt: skip

    def _rewrite_tail(self, url_id: int, entry: UrlEntry) -> None:
        """Replace the history written since the tail's base with the tail's events."""
        tail = entry.tail
        assert tail is not None
        base = tail.base
        marks = ",".join("?" * len(_HISTORY_KINDS))
        self.conn.execute(
            f"DELETE FROM url_events WHERE url_id = ? AND at > ? AND kind IN ({marks})",
            (url_id, base.newest_at, *_HISTORY_KINDS),
        )
        self.conn.execute(
            "DELETE FROM episodes WHERE url_id = ? AND episode > ?", (url_id, base.episode)
        )
        r = base.removal
        self.conn.execute(
            "UPDATE episodes SET last_present_at = ?, first_removed_at = ?, confirmed_at = ?,"
            " latency = ?, nxdomain = ?, observed_present = ? WHERE url_id = ? AND episode = ?",
            (r.last_present_at if r else None, r.first_removed_at if r else None,
             r.confirmed_at if r else None, r.latency if r else None,
             int(r.nxdomain) if r else 0, int(r.observed_present) if r else 1,
             url_id, base.episode),
        )  # fmt: skip
        self._record(url_id, entry, tail.events)

    def _notices(self, url_id: int) -> list[Notice]:
        return [
            Notice(at, sha256, self.planner.order_due(order_at, deadline))
            for at, sha256, order_at, deadline in self.conn.execute(
                "SELECT notified_at, sha256, order_issued_at, order_deadline FROM reports"
                " WHERE url_id = ? ORDER BY notified_at, id",
                (url_id,),
            )
        ]

    def _observations(
        self, url_id: int, after_marks_since: float | None = None
    ) -> list[Observation]:
        """The URL's stored results in event order (with `after_marks_since`: those stored
        after the last flush's marks and probed at or after that time)."""
        sql, params = _OBSERVATIONS, (url_id,)  # type: tuple[str, tuple[Any, ...]]
        if after_marks_since is not None:
            sql, params = _OBSERVATIONS_AFTER_MARKS, (url_id, after_marks_since)
        return [
            Observation(
                agent,
                network,
                at,
                status,
                error,
                sha or b"",
                final,
                bool(challenge),
                bool(truncated),
                seq,
                provider,
                asn,
                bool(cdn),
            )
            for (
                agent,
                network,
                at,
                status,
                error,
                sha,
                final,
                challenge,
                truncated,
                seq,
                provider,
                asn,
                cdn,
            ) in self.conn.execute(sql, params)
        ]

    def _refold_urls(
        self, url_ids: Sequence[int], now: float, entries: dict[int, UrlEntry] | None = None
    ) -> list[tuple[int, UrlState, UrlState]]:
        """Recompute URLs from their stored notices and results; rewrite their history.

        Returns (url id, state before, state after) of each URL refolded.
        """
        changed = []
        for url_id in url_ids:
            self._stale.discard(url_id)  # refolded from what was committed, whatever memory held
            entry = (entries or {}).get(url_id) or self._load({url_id}, active_only=False).get(
                url_id
            )
            if entry is None:
                continue
            before = entry.fold.state
            notices = self._notices(url_id)
            if not notices:
                continue
            observations = self._observations(url_id)
            fold, events = refold(notices, observations, self.method, self.networks_at)
            entry.fold, entry.tail, entry.folded = fold, None, len(observations)
            if self._pending.pop(url_id, None) is not None:
                self.conn.execute(
                    "UPDATE url_state SET refold_pending = 0 WHERE url_id = ?", (url_id,)
                )
            self.conn.execute("DELETE FROM episodes WHERE url_id = ?", (url_id,))
            marks = ",".join("?" * len(_HISTORY_KINDS))
            self.conn.execute(
                f"DELETE FROM url_events WHERE url_id = ? AND kind IN ({marks})",
                (url_id, *_HISTORY_KINDS),
            )
            self.conn.execute(
                "INSERT INTO episodes (url_id, episode, opened_at) VALUES (?, 1, ?)",
                (url_id, notices[0].at),
            )
            self._record(url_id, entry, events)
            self.conn.execute(*_save(url_id, entry, now))
            self.conn.execute("DELETE FROM unflushed WHERE url_id = ?", (url_id,))
            if self.flush_every > 0:  # the next flush writes it as a checkpoint (see _resume)
                self._dirty[url_id] = entry
            changed.append((url_id, before, fold.state))
        return changed

    def refold(
        self, since: float | None = None, now: float = 0.0
    ) -> list[tuple[int, UrlState, UrlState]]:
        """Recompute every URL's verdict (or those with results probed at or after `since`)."""
        sql = "SELECT id FROM urls ORDER BY id"
        params: tuple[Any, ...] = ()
        if since is not None:
            sql = "SELECT DISTINCT url_id FROM results WHERE started_at >= ? ORDER BY url_id"
            params = (since,)
        ids = [u for (u,) in self.conn.execute(sql, params)]
        try:
            with self._transaction():
                self._entries.clear()
                changed = self._refold_urls(ids, now)
                self._checkpoint_if_verdict(now)
                return changed
        except sqlite3.Error as exc:
            self._forget()
            self._reload_log()
            raise translate(exc, self.path) from exc

    def outdated(self) -> int:
        """URLs whose verdict was folded by another method version than this one."""
        row = self.conn.execute(
            "SELECT COUNT(*) FROM url_state WHERE method < ? OR method > ?",  # the index
            (self.method.version, self.method.version),
        ).fetchone()
        return int(row[0])

    def _load(
        self, url_ids: set[int], active_only: bool = True, refolded: set[int] | None = None
    ) -> dict[int, UrlEntry]:
        """The folds of those of `url_ids` that agents are assigned; others get no entry.

        Every agent is assigned every active URL (the quorum needs all vantage points), so an
        unknown id, or a URL retired since (after its watch period), is not assigned and its
        results are refused, never stored. The cache holds active URLs only (`plan` drops
        the ones it retires), so only the ids missing from it are checked in the database.
        A fold state this version cannot read is refolded from the stored results (its id
        added to `refolded`).
        """
        cached = self._entries
        out: dict[int, UrlEntry] = {}
        missing: list[int] = []
        for u in url_ids:
            entry = cached.get(u) or self._dirty.get(u)
            if u in self._stale:
                # Its url_state is behind what was committed (see flush): refold it.
                self._refold_urls([u], self._last_now)
                entry = self._dirty.get(u) or cached.get(u)
            if entry is None:
                missing.append(u)
            else:
                out[u] = entry
                cached[u] = entry
                cached.move_to_end(u)
        active = " AND u.active = 1" if active_only else ""
        for i in range(0, len(missing), 500):
            chunk = missing[i : i + 500]
            marks = ",".join("?" * len(chunk))
            for (url_id, memory, provider, asn, cdn, origin_ip, method, created, notified,
                 folded) in self.conn.execute(
                "SELECT s.url_id, s.memory, s.provider, s.asn, s.cdn, s.origin_ip, s.method,"
                " u.created_at, s.notified_at, s.folded"
                " FROM url_state s JOIN urls u ON u.id = s.url_id"
                f" WHERE s.url_id IN ({marks}){active}",
                chunk,
            ).fetchall():  # fmt: skip
                stale = method != self.method.version  # an upgrade: refolded, quietly
                try:
                    fold = None if stale else load_fold(memory, self.method)
                except UnreadableState as exc:
                    log.warning("fold_state_unreadable url_id=%d reason=%s: refolded from"
                                " its stored results", url_id, exc)  # fmt: skip
                    stale, fold = True, None
                if fold is None:
                    fold = UrlFold.start(Notice(notified), self.method)
                entry = UrlEntry(fold, provider, asn, bool(cdn), origin_ip, created, notified)
                entry.folded = folded
                if stale:
                    self._refold_urls([url_id], 0.0, {url_id: entry})
                    if refolded is not None:
                        refolded.add(url_id)
                out[url_id] = entry
                if active_only:
                    cached[url_id] = entry
        while len(cached) > self._cache_urls:
            cached.popitem(last=False)
        return out

    def plan(self, now: float, planner: Planner) -> tuple[list[Target], list[int]]:
        """Recompute every active URL's probe interval; return the changes to push to agents."""
        self.flush(now)  # the plan reads url_state
        try:
            with self._transaction():
                if self.evidence is not None:
                    self._log_deadlines(now, planner)
                    self._checkpoint_if_verdict(now)
                return self._plan(now, planner)
        except sqlite3.Error as exc:
            self._reload_log()
            raise translate(exc, self.path) from exc

    def _plan(self, now: float, planner: Planner) -> tuple[list[Target], list[int]]:
        rows = self.conn.execute(
            "SELECT u.id, u.url, u.interval, s.state, s.opened_at, s.order_issued_at,"
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


IngestCall = tuple[int, Sequence[ResultIn], float, "float | None"]
"""The arguments of one `Store.ingest`: agent id, results, now, clock offset."""


def _outcome(ingest: Any, call: IngestCall) -> Ingested | BaseException:
    try:
        return ingest(*call)  # type: ignore[no-any-return]
    except Exception as exc:
        return exc


def _us(seconds: float) -> int:
    return round(seconds * 1_000_000)


def _save(url_id: int, entry: UrlEntry, now: float) -> tuple[str, tuple[Any, ...]]:
    return _SAVE_STATE, _state_row(url_id, entry, now, checkpoint=False)


def method_of(policy: Policy, planner: Planner) -> Method:
    """The method the collector folds with: its policy and its planned probe intervals."""

    last: list[Any] = [None, 0.0]  # the fold asks twice per observation with the same values

    def planned(
        now: float, state: UrlState, opened_at: float, due: float | None, removed: float | None
    ) -> float:
        key = (now, state, opened_at, due, removed)
        if last[0] == key:
            return float(last[1])
        interval = planner.interval(now, state, opened_at, due, removed)
        value = planner.watch_interval if interval is None else interval
        last[0], last[1] = key, value
        return value

    return Method(policy, planned)
