"""A durable outbox: results wait in a local SQLite file until the collector acknowledges them.

`Spool` has the interface and delivery semantics of `agent.outbox.Outbox`
(numbering, batches, acknowledgement, redelivery first after a lost stream),
and survives a restart of the agent.

Theory of operation
-------------------
Rows. Every result is one row of `results`, keyed by its sequence number. A
row whose `batch_id` is NULL has not been sent; a row with a batch id belongs
to that batch, which is either in flight or waiting to be sent again. A row is
deleted only when its batch is acknowledged (at-least-once delivery; the
collector stores each (agent, seq) once, so a batch delivered twice is stored
once).

What is durable when. `add` inserts the row into an open SQLite transaction
before it returns, so the row is in SQLite but not yet committed. A *flush*
commits the transaction; a result is committed once it is flushed. This is a
group commit: one commit covers every result added since the last one, and
every transaction is committed at most `flush_interval` (default 50 ms) after
it began, by whichever comes first of

* a timer the first write of a transaction arms (`call_later`, by default on
  the running asyncio loop), which commits a quiet transaction;
* `add`, when the transaction is `flush_interval` old or holds `flush_every`
  (500) results;
* `take`, before a batch is handed out: `take` never returns a result that is
  not committed, and the batch's id is committed together with it, so nothing
  the collector has seen can be renumbered or forgotten by a crash;
* `flush()` and `close()`, which the caller may invoke at any time.

So a result is committed within `flush_interval` plus however late the event
loop runs the timer: under 100 ms while the agent is healthy (tests/test_faults.py
measures it with SIGKILL). An acknowledgement's delete is committed by the next
flush; if a crash loses it, the batch is sent again after the restart, which the
collector absorbs.

What survives what. The file runs in WAL mode with `synchronous=NORMAL` and
automatic checkpoints off; a thread with its own connection (`_Checkpointer`)
checkpoints the WAL every `checkpoint_interval` (default 1 s).

* SIGTERM (and any orderly exit: `close()`): everything added, acknowledged or
  assigned; close commits and checkpoints.
* SIGKILL, or the agent crashing: every committed result (a commit is a write
  into the WAL, in the operating system's cache, which outlives the process):
  at most the last `flush_interval` of results is lost, none of them sent.
* Power loss or a kernel crash: with NORMAL a commit is not fsynced; the
  checkpoint fsyncs the WAL, copies it into the database and fsyncs that. So
  everything committed before the last completed checkpoint survives, and at
  most about `checkpoint_interval` + `flush_interval` (about 1 s) of results is
  lost. The file is never corrupted (WAL), provided the disk honours fsync.

Why NORMAL, and checkpoints in a thread: `FULL` fsyncs the WAL at every
commit, and commits happen on the event loop (the agent's only thread that
probes): 20 fsyncs a second would stall probing by 0.4 ms each on a virtio
disk, and by tens of milliseconds each on the SD cards and network volumes
small agents run on. A commit with NORMAL costs about 0.07 ms. The one fsync
a second happens in the checkpointer thread, which never blocks the writer
(PASSIVE checkpoints). A lost second of results costs a second of
observations, which the agent goes on making. `synchronous="FULL"` remains
for a fast disk where even that second matters.

Ordering. After a restart, the unacknowledged batches of the previous run
are pending again, oldest (lowest batch id) first, with their original ids
and contents, exactly as after `requeue`; unsent results follow in sequence
order. Batch ids come from a counter stored in the file and committed with
each new batch, so a new batch never reuses an id, in this run or any other.

Sequence numbers. Each flush commits a reservation: the next sequence number
plus `flush_every`. A flush happens at the latest after `flush_every`
numbers are issued, so the reservation is above every number issued before
the next commit, even those of results a crash then lost (never sent, but a
caller may have seen them). On open, numbering continues from the largest of
the reservation, one above the largest stored seq, and the clock in
microseconds: a number is never reused, even after its row was acked and
deleted, and even if the clock steps back; a lost or fresh file starts from
the clock, above the numbers of any earlier file (as `Outbox` does). Each
restart leaves a gap of at most `flush_every` numbers, which is harmless.

Bounds and the drop policy. The spool holds at most `limit` results and, if
`max_bytes` is given, at most that many bytes (the sum of an estimate of each
row's size). Each result's *outcome* is its class as the agent can tell it
from status and error (`evidence`): inconclusive, nxdomain, removed
(404/410/451, connection refused), present at its final URL (any 2xx), or
another status at its final URL. The body hash is not part of it: the agent
does not hold the reference hashes, and a page whose body changes on every
load would make every result a change, so the bound would never bite. A
result is a *repeat* when its outcome equals that of the previous result added
for the same url_id ("nothing new"), otherwise it is a *state change*; the
first result for a URL is a change. The price: a 2xx that turns into another
2xx (content replaced by a parked page, same URL) is a repeat to the spool, so
when full the spool may drop the results between the last baseline and the
first replacement, and the collector then dates that removal less precisely.
Per URL the spool keeps the last outcome (a 64-bit hash of the class), the seq
of the last result kept and whether that result was a repeat (in arrays in
memory, table `url_outcomes` in the file, committed with each flush), so this
survives restarts and acknowledgements.

When a new result does not fit, unsent rows are dropped in this order:

1. the oldest *inconclusive repeat* (a repeat whose outcome carries no
   evidence: a timeout, TLS or network error, 5xx, 429, bot challenge);
2. the oldest *repeat* of any other kind (present or removed again).

A state change is never dropped. Neither is the newest result kept for a URL:
when the next result is a change, that newest repeat is the last
observation before the change, one end of the interval in which the content
was removed (or came back), and the collector needs both ends. A repeat
becomes droppable only when another repeat follows it. Because only repeats
are dropped, and a repeat's outcome equals its predecessor's, the collector
still sees every state change of every URL, and its neighbours. Rows in a
batch (in flight or waiting to be resent) are never dropped: a batch is
resent unchanged.

If nothing is droppable, the new result is refused if it is a repeat
(reason `refused_repeat`), otherwise it is kept and the spool exceeds its
bound (counted in `over_limit`, logged as `spool_over_limit`): losing a
change would be worse than using more disk. Each drop increments `dropped`
and `drops_by_reason[reason]` and logs one line `spool_dropped reason=...
url_id=... seq=...` (never the URL).

Errors. One exception, `SpoolError`, whose message names the file: a file
that is not SQLite, fails its integrity check or belongs to another
program, a directory that cannot be written, a full disk. The spool never
resets a file it cannot read. After a failed write the object refuses further
use (its memory no longer matches the file); reopening resumes from the last
commit.

Assignment and journal. The spool also keeps the agent's assignment (url_id,
URL, interval), updated as the collector's changes arrive and committed with
the next flush, so an agent that restarts while the collector is unreachable
goes on probing; on reconnect its bucket digests tell the collector what to
resend. It is also where the agent keeps its URL texts: `url()` reads one
back by primary key when it is due (in the open transaction, so a change
shows before its commit), and the agent's memory holds only ids, intervals
and digests (agent/assignment.py). The file therefore holds reported URLs:
keep the state directory private (the agent creates it 0700).

With `journal=True`, every result kept is also written to `journal` (seq,
url_id) in the same transaction, and never deleted except when the drop
policy drops the result: an audit of exactly which results this agent
produced, to set against what the collector stored. It grows with every
result; enable it for audits and tests only.

Threads. Calls are synchronous and short (an insert; a commit without
fsync), so the agent calls them from its event loop; calls must not overlap.
The checkpointer thread only checkpoints, through its own connection.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from agent.migrations import Migrations
from agent.outbox import Batch
from agent.repeats import UrlMemory, evidence, is_inconclusive, outcome
from agent.result import ErrorClass, ProbeResult, TlsCheck

log = logging.getLogger(__name__)

__all__ = ["Spool", "SpoolError", "evidence", "is_inconclusive", "outcome", "row_size"]

APPLICATION_ID = 0x54444D53  # "TDMS" in the SQLite header: this file is a takedown spool
INCONCLUSIVE_REPEAT = "inconclusive_repeat"
REPEAT = "repeat"
REFUSED_REPEAT = "refused_repeat"
_REASONS = {1: INCONCLUSIVE_REPEAT, 2: REPEAT}  # the `rank` column: drop order
_ROW_OVERHEAD = 96  # bytes per row besides its strings, roughly, index entries included
_SELECT = (
    "SELECT seq, url_id, started_at, elapsed, status, final_url, body_sha256, body_bytes,"
    " truncated, peer_ip, error, redirects, challenge, tls FROM results"
)
_SELECT_BATCH = _SELECT + " WHERE batch_id = ? ORDER BY seq"
_SELECT_UNSENT = _SELECT + " WHERE batch_id IS NULL ORDER BY seq LIMIT ?"
_INSERT = (
    "INSERT INTO results (size, seq, url_id, started_at, elapsed, status, final_url, body_sha256,"
    " body_bytes, truncated, peer_ip, error, redirects, challenge, tls)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)

migrations = Migrations("takedown.agent.spool")


@migrations()
def m001_initial(db: sqlite3.Connection) -> None:
    for statement in (
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)",
        """CREATE TABLE results (
            seq INTEGER PRIMARY KEY,
            batch_id INTEGER,
            rank INTEGER,
            size INTEGER NOT NULL,
            url_id INTEGER NOT NULL,
            started_at REAL NOT NULL,
            elapsed REAL NOT NULL,
            status INTEGER NOT NULL,
            final_url TEXT NOT NULL,
            body_sha256 BLOB NOT NULL,
            body_bytes INTEGER NOT NULL,
            truncated INTEGER NOT NULL,
            peer_ip TEXT NOT NULL,
            error TEXT NOT NULL,
            redirects INTEGER NOT NULL,
            challenge INTEGER NOT NULL
        )""",
        "CREATE INDEX results_batch ON results(batch_id) WHERE batch_id IS NOT NULL",
        "CREATE INDEX results_droppable ON results(rank, seq)"
        " WHERE batch_id IS NULL AND rank IS NOT NULL",
        """CREATE TABLE urls (
            url_id INTEGER PRIMARY KEY,
            status INTEGER NOT NULL,
            error TEXT NOT NULL,
            body_sha256 BLOB NOT NULL,
            final_url TEXT NOT NULL,
            last_seq INTEGER NOT NULL,
            last_repeat INTEGER NOT NULL
        )""",
    ):
        db.execute(statement)


@migrations()
def m002_assignment_and_journal(db: sqlite3.Connection) -> None:
    """The URLs assigned (so a restart probes on without the collector) and a seq journal."""
    db.execute(
        "CREATE TABLE assignment (url_id INTEGER PRIMARY KEY, url TEXT NOT NULL,"
        " interval_ms INTEGER NOT NULL)"
    )
    db.execute("CREATE TABLE journal (seq INTEGER PRIMARY KEY, url_id INTEGER NOT NULL)")


@migrations()
def m003_outcome_by_class(db: sqlite3.Connection) -> None:
    """Repeats are judged by what the agent can tell (present, removed, ...), not by body hash.

    The per-hash outcomes of `urls` are not carried over: each URL's next result counts as a
    change once, which only keeps one more result.
    """
    db.execute(
        "CREATE TABLE url_outcomes (url_id INTEGER PRIMARY KEY, outcome INTEGER NOT NULL,"
        " last_seq INTEGER NOT NULL, last_repeat INTEGER NOT NULL)"
    )
    db.execute("DROP TABLE urls")


@migrations()
def m004_result_tls(db: sqlite3.Connection) -> None:
    """Whether the certificate verified, per result (older rows: unknown)."""
    db.execute("ALTER TABLE results ADD COLUMN tls TEXT NOT NULL DEFAULT 'unknown'")


class SpoolError(Exception):
    """The spool file cannot be opened, read or written; the message names the file."""


def row_size(result: ProbeResult) -> int:
    """An estimate of the bytes one result occupies in the file."""
    return _ROW_OVERHEAD + len(result.final_url) + len(result.peer_ip) + len(result.body_sha256)


def _from_row(row: tuple[Any, ...]) -> ProbeResult:
    (seq, url_id, started_at, elapsed, status, final_url, sha, body_bytes, truncated, peer_ip,
     error, redirects, challenge, tls) = row  # fmt: skip
    return ProbeResult(
        url_id=url_id,
        started_at=started_at,
        elapsed=elapsed,
        status=status,
        final_url=final_url,
        body_sha256=bytes(sha),
        body_bytes=body_bytes,
        truncated=bool(truncated),
        peer_ip=peer_ip,
        error=ErrorClass(error),
        redirects=redirects,
        challenge=bool(challenge),
        tls=TlsCheck(tls),
        seq=seq,
    )


class Spool:
    """Pending results, batches awaiting acknowledgement and the sequence counter, in a file."""

    def __init__(
        self,
        path: Path,
        *,
        limit: int = 1_000_000,
        max_bytes: int | None = None,
        clock: Callable[[], float] = time.time,
        flush_every: int = 500,
        flush_interval: float = 0.05,
        synchronous: Literal["NORMAL", "FULL"] = "NORMAL",
        journal: bool = False,
        checkpoint_interval: float | None = 1.0,
        call_later: Callable[[float, Callable[[], None]], object] | None = None,
    ) -> None:
        """`flush_interval`: the longest a write waits for its commit (the group commit);
        `checkpoint_interval`: how often a background thread checkpoints the WAL (the fsync
        that makes commits survive power loss), None for never (only at close);
        `call_later(delay, fn)`: the timer that commits a quiet transaction, by default the
        running asyncio loop's (without one, the next call on the spool commits)."""
        self.path = path
        self.journal = journal
        self.limit = limit
        self.max_bytes = max_bytes
        self.clock = clock
        self.flush_every = flush_every
        self.flush_interval = flush_interval
        self.dropped = 0
        self.acked = 0
        self.redelivered = 0
        self.over_limit = 0
        self.drops_by_reason: dict[str, int] = {}
        self._failure: str | None = None
        self._closed = False
        self._in_txn = False
        self._dirty: set[int] = set()
        self._call_later = call_later or _loop_timer
        self._timer: object | None = None
        self._txn_began = 0.0
        self._conn = self._open(synchronous)
        try:
            self._load()
        except sqlite3.Error as exc:
            self._conn.close()
            raise SpoolError(f"spool {path}: cannot read: {exc}") from exc
        self._flushed_seq = self._next_seq
        self._checkpointer: _Checkpointer | None = None
        if checkpoint_interval is not None:
            self._checkpointer = _Checkpointer(path, checkpoint_interval)

    def _open(self, synchronous: str) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise SpoolError(f"spool {self.path}: cannot open: {exc}") from exc
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={synchronous}")
            conn.execute("PRAGMA wal_autocheckpoint=0")  # the checkpointer thread does it
            check = conn.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise SpoolError(f"spool {self.path}: integrity check failed: {check}")
            app_id = conn.execute("PRAGMA application_id").fetchone()[0]
            if app_id != APPLICATION_ID:
                if conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
                    raise SpoolError(f"spool {self.path}: an SQLite file of another program")
                conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
            migrations.apply(conn)
        except sqlite3.Error as exc:
            conn.close()
            raise SpoolError(f"spool {self.path}: not a usable spool file: {exc}") from exc
        except SpoolError:
            conn.close()
            raise
        return conn

    def _load(self) -> None:
        c = self._conn
        meta = dict(c.execute("SELECT key, value FROM meta").fetchall())
        max_seq, max_batch, held, size = c.execute(
            "SELECT max(seq), max(batch_id), count(*), coalesce(sum(size), 0) FROM results"
        ).fetchone()
        self._next_seq = max(
            meta.get("next_seq", 0), (max_seq or 0) + 1, int(self.clock() * 1_000_000)
        )
        self._next_batch = max(meta.get("next_batch", 1), (max_batch or 0) + 1)
        self._held: int = held
        self._bytes: int = size
        self._batches: dict[int, tuple[int, int]] = {
            batch_id: (n, total)
            for batch_id, n, total in c.execute(
                "SELECT batch_id, count(*), sum(size) FROM results"
                " WHERE batch_id IS NOT NULL GROUP BY batch_id ORDER BY batch_id"
            )
        }
        self._resend: deque[int] = deque(self._batches)
        self._inflight: set[int] = set()
        self._unsent: int = held - sum(n for n, _ in self._batches.values())
        self._urls = UrlMemory()
        for url_id, out, last_seq, last_repeat in c.execute(
            "SELECT url_id, outcome, last_seq, last_repeat FROM url_outcomes"
        ):
            self._urls.set(url_id, out, last_seq, bool(last_repeat))

    @contextmanager
    def _writing(self) -> Iterator[sqlite3.Connection]:
        """Run statements in the open transaction (begun if needed); a failure breaks the spool."""
        self._check_usable()
        try:
            if not self._in_txn:
                self._conn.execute("BEGIN IMMEDIATE")
                self._in_txn = True
                self._txn_began = self.clock()
                if self._timer is None:
                    self._timer = self._call_later(self.flush_interval, self._on_timer)
            yield self._conn
        except sqlite3.Error as exc:
            self._failure = str(exc)
            self._in_txn = False
            self._conn.close()
            raise SpoolError(f"spool {self.path}: write failed, nothing since the last flush is"
                             f" kept: {exc}") from exc  # fmt: skip

    def _check_usable(self) -> None:
        if self._failure is not None:
            raise SpoolError(f"spool {self.path}: unusable after an earlier error: {self._failure}")
        if self._closed:
            raise SpoolError(f"spool {self.path}: closed")

    def add(self, result: ProbeResult) -> ProbeResult:
        """Number a new result and store it; if full, drop per the policy (see module docstring)."""
        self._check_usable()
        numbered = replace(result, seq=self._next_seq)
        self._next_seq += 1
        out = outcome(numbered)
        url = self._urls.get(numbered.url_id)
        repeat = url is not None and url[0] == out
        size = row_size(numbered)
        with self._writing() as c:
            if url is not None and repeat and url[2]:
                rank = 1 if is_inconclusive(numbered) else 2
                c.execute("UPDATE results SET rank = ? WHERE seq = ?", (rank, url[1]))
            if self._full(size):
                self._make_room(c, size)
            kept = not (repeat and self._full(size))
            if kept:
                self._insert(c, numbered, size)
        if kept:
            self._urls.set(numbered.url_id, out, numbered.seq, repeat)
            self._dirty.add(numbered.url_id)
            self._held += 1
            self._unsent += 1
            self._bytes += size
            if self._held > self.limit or (
                self.max_bytes is not None and self._bytes > self.max_bytes
            ):
                self.over_limit += 1
                log.warning("spool_over_limit url_id=%d seq=%d", numbered.url_id, numbered.seq)
        else:
            self._count_drop(REFUSED_REPEAT, numbered.url_id, numbered.seq)
        if (
            self._next_seq - self._flushed_seq >= self.flush_every
            or self.clock() - self._txn_began >= self.flush_interval
        ):
            self.flush()
        return numbered

    def _insert(self, c: sqlite3.Connection, r: ProbeResult, size: int) -> None:
        if self.journal:
            c.execute("INSERT INTO journal (seq, url_id) VALUES (?, ?)", (r.seq, r.url_id))
        c.execute(
            _INSERT,
            (size, r.seq, r.url_id, r.started_at, r.elapsed, r.status, r.final_url,
             r.body_sha256, r.body_bytes, r.truncated, r.peer_ip, r.error.value, r.redirects,
             r.challenge, r.tls.value),
        )  # fmt: skip

    def _full(self, size: int) -> bool:
        if self._held >= self.limit:
            return True
        return self.max_bytes is not None and self._bytes + size > self.max_bytes

    def _make_room(self, c: sqlite3.Connection, size: int) -> None:
        while self._full(size):
            row = c.execute(
                "SELECT seq, url_id, size, rank FROM results"
                " WHERE batch_id IS NULL AND rank IS NOT NULL ORDER BY rank, seq LIMIT 1"
            ).fetchone()
            if row is None:
                return
            seq, url_id, row_bytes, rank = row
            c.execute("DELETE FROM results WHERE seq = ?", (seq,))
            c.execute("DELETE FROM journal WHERE seq = ?", (seq,))
            self._held -= 1
            self._unsent -= 1
            self._bytes -= row_bytes
            self._count_drop(_REASONS[rank], url_id, seq)

    def _count_drop(self, reason: str, url_id: int, seq: int) -> None:
        self.dropped += 1
        self.drops_by_reason[reason] = self.drops_by_reason.get(reason, 0) + 1
        log.warning("spool_dropped reason=%s url_id=%d seq=%d", reason, url_id, seq)

    def flush(self) -> None:
        """Commit everything added or acknowledged so far: from now on it survives a crash."""
        self._check_usable()
        if not self._in_txn:
            return
        with self._writing() as c:
            c.executemany(
                "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                (("next_seq", self._next_seq + self.flush_every), ("next_batch", self._next_batch)),
            )
            c.executemany(
                "INSERT OR REPLACE INTO url_outcomes (url_id, outcome, last_seq, last_repeat)"
                " VALUES (?, ?, ?, ?)",
                ((url_id, *self._urls[url_id]) for url_id in self._dirty),
            )
            c.execute("COMMIT")
            self._in_txn = False
        self._dirty.clear()
        self._flushed_seq = self._next_seq

    def _on_timer(self) -> None:
        """The group commit's deadline: commit what waited `flush_interval` (never raises:
        a failure breaks the spool, and the agent's next call on it raises SpoolError)."""
        self._timer = None
        if self._closed or self._failure is not None or not self._in_txn:
            return
        try:
            self.flush()
        except SpoolError as exc:
            log.error("spool_commit_failed error=%s", exc)

    def take(self, max_results: int) -> Batch | None:
        """Flush, then the next batch: a batch to resend first, else up to max_results new ones."""
        self._check_usable()
        if self._resend:
            batch_id = self._resend.popleft()
            batch = Batch(batch_id, self._read(_SELECT_BATCH, batch_id))
            self.flush()
            self.redelivered += len(batch.results)
        elif self._unsent:
            with self._writing() as c:
                results = self._read(_SELECT_UNSENT, max_results)
                batch = Batch(self._next_batch, results)
                self._next_batch += 1
                c.execute(
                    "UPDATE results SET batch_id = ? WHERE seq BETWEEN ? AND ?"
                    " AND batch_id IS NULL",
                    (batch.batch_id, results[0].seq, results[-1].seq),
                )
            self.flush()
            self._unsent -= len(results)
            self._batches[batch.batch_id] = (len(results), sum(map(row_size, results)))
        else:
            self.flush()
            return None
        self._inflight.add(batch.batch_id)
        return batch

    def _read(self, query: str, arg: int) -> tuple[ProbeResult, ...]:
        try:
            rows = self._conn.execute(query, (arg,)).fetchall()
        except sqlite3.Error as exc:
            raise SpoolError(f"spool {self.path}: cannot read: {exc}") from exc
        return tuple(map(_from_row, rows))

    def ack(self, batch_id: int) -> int:
        """Forget an acknowledged batch; return how many results it held (0 if unknown)."""
        self._check_usable()
        if batch_id not in self._inflight:
            return 0
        with self._writing() as c:
            c.execute("DELETE FROM results WHERE batch_id = ?", (batch_id,))
        self._inflight.discard(batch_id)
        n, size = self._batches.pop(batch_id)
        self._held -= n
        self._bytes -= size
        self.acked += n
        return n

    def assignment(self) -> list[tuple[int, str, float]]:
        """The assignment last recorded: (url_id, url, interval seconds)."""
        self._check_usable()
        try:
            rows = self._conn.execute("SELECT url_id, url, interval_ms FROM assignment")
            return [(url_id, url, ms / 1000) for url_id, url, ms in rows]
        except sqlite3.Error as exc:
            raise SpoolError(f"spool {self.path}: cannot read: {exc}") from exc

    def url(self, url_id: int) -> str | None:
        """The assigned URL's text, or None (read in the open transaction: recorded changes
        show before they are committed). This is where an agent keeps its URL texts."""
        self._check_usable()
        try:
            row = self._conn.execute(
                "SELECT url FROM assignment WHERE url_id = ?", (url_id,)
            ).fetchone()
        except sqlite3.Error as exc:
            raise SpoolError(f"spool {self.path}: cannot read: {exc}") from exc
        return None if row is None else str(row[0])

    def held(self) -> Iterator[tuple[int, int, int]]:
        """(url_id, interval_ms, CRC-32 of the URL) of the assignment last recorded, streamed
        (a million URLs are never in memory at once); for `Assignment.resume`."""
        self._check_usable()
        try:
            cursor = self._conn.execute("SELECT url_id, interval_ms, url FROM assignment")
            while rows := cursor.fetchmany(1000):
                for url_id, interval_ms, url in rows:
                    yield url_id, interval_ms, zlib.crc32(url.encode())
        except sqlite3.Error as exc:
            raise SpoolError(f"spool {self.path}: cannot read: {exc}") from exc

    def record_assignment(
        self, upsert: Iterable[tuple[int, str, float]], remove: Iterable[int]
    ) -> None:
        """Keep the assignment in step with the collector (committed by the next flush)."""
        with self._writing() as c:
            c.executemany("DELETE FROM assignment WHERE url_id = ?", ((u,) for u in remove))
            c.executemany(
                "INSERT OR REPLACE INTO assignment (url_id, url, interval_ms) VALUES (?, ?, ?)",
                ((u, url, round(interval * 1000)) for u, url, interval in upsert),
            )

    def requeue(self) -> None:
        """After a lost stream: every unacknowledged batch is sent again, oldest first."""
        self._resend = deque(sorted((*self._resend, *self._inflight)))
        self._inflight.clear()

    def close(self) -> None:
        """Flush and close the file; later calls raise SpoolError. Closing twice is harmless."""
        if self._closed or self._failure is not None:
            return
        if self._checkpointer is not None:
            self._checkpointer.stop()
        self.flush()
        try:
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:
            raise SpoolError(f"spool {self.path}: checkpoint failed: {exc}") from exc
        finally:
            self._conn.close()
            self._closed = True

    def __enter__(self) -> Spool:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def pending(self) -> int:
        """Results waiting to be sent: batches to resend, then unsent results."""
        return self._unsent + sum(self._batches[b][0] for b in self._resend)

    @property
    def inflight(self) -> int:
        """Batches sent and not yet acknowledged."""
        return len(self._inflight)

    def __len__(self) -> int:
        return self._held

    @property
    def bytes(self) -> int:
        """Approximate bytes held: the summed size estimates of the rows."""
        return self._bytes


def _loop_timer(delay: float, callback: Callable[[], None]) -> object:
    """`call_later` on the running asyncio loop; None (no timer) outside of one."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return None
    return loop.call_later(delay, callback)


class _Checkpointer:
    """A thread with its own connection that checkpoints the WAL every `interval` seconds.

    With `synchronous=NORMAL` a commit is a write to the WAL without fsync; the checkpoint
    fsyncs the WAL, copies it into the database and fsyncs that, so a commit survives power
    loss once a checkpoint after it ended. PASSIVE never blocks the agent's connection, which
    goes on writing meanwhile; doing it here keeps every fsync off the event loop.
    """

    def __init__(self, path: Path, interval: float) -> None:
        self.path = path
        self.interval = interval
        self.checkpoints = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="spool-checkpoint", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            conn = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            log.warning("spool_checkpoint_failed error=%s", exc)
            return
        try:
            conn.execute("PRAGMA busy_timeout=1000")
            while not self._stop.wait(self.interval):
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                    self.checkpoints += 1
                except sqlite3.Error as exc:  # the data is safe in the WAL; try again later
                    log.warning("spool_checkpoint_failed error=%s", exc)
        finally:
            conn.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
