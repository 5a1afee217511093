"""The durable outbox: interface parity with Outbox, restarts, the drop policy, bad files."""

from __future__ import annotations

import logging
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from agent.outbox import Batch, Outbox
from agent.result import ErrorClass, ProbeResult
from agent.spool import (
    INCONCLUSIVE_REPEAT,
    REFUSED_REPEAT,
    REPEAT,
    Spool,
    SpoolError,
    evidence,
    outcome,
)
from tests.procs import until

T0 = 1_700_000_000.0
SEQ0 = int(T0 * 1_000_000)


def clock() -> float:
    return T0


def present(url_id: int = 1, sha: bytes = b"a" * 32) -> ProbeResult:
    return ProbeResult(url_id=url_id, started_at=T0, elapsed=0.1, status=200, body_sha256=sha)


def removed(url_id: int = 1) -> ProbeResult:
    return ProbeResult(url_id=url_id, started_at=T0, elapsed=0.1, status=404)


def timeout(url_id: int = 1) -> ProbeResult:
    return ProbeResult(url_id=url_id, started_at=T0, elapsed=5.0, error=ErrorClass.READ_TIMEOUT)


def open_spool(path: Path, **kwargs: object) -> Spool:
    return Spool(path, clock=clock, **kwargs)  # type: ignore[arg-type]


def drain(box: Outbox | Spool, size: int = 1000) -> list[Batch]:
    """Take every batch there is (without acknowledging)."""
    batches = []
    while (batch := box.take(size)) is not None:
        batches.append(batch)
    return batches


def seqs(batches: list[Batch]) -> list[int]:
    return [r.seq for b in batches for r in b.results]


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Spool]:
    s = open_spool(tmp_path / "spool.db")
    yield s
    s.close()


Factory = Callable[[Path], Outbox | Spool]
BOTH: list[Factory] = [
    lambda _: Outbox(first_seq=SEQ0),
    lambda tmp: open_spool(tmp / "spool.db"),
]


@pytest.mark.parametrize("make", BOTH, ids=["outbox", "spool"])
class TestOutboxInterface:
    def test_sequence_numbers_increase(self, make: Factory, tmp_path: Path) -> None:
        """Each result gets the next sequence number, starting from the clock in microseconds."""
        box = make(tmp_path)
        assert [box.add(present()).seq for _ in range(3)] == [SEQ0, SEQ0 + 1, SEQ0 + 2]

    def test_batches_hold_at_most_max_results(self, make: Factory, tmp_path: Path) -> None:
        """take() cuts batches of the requested size, in order, then returns None."""
        box = make(tmp_path)
        for _ in range(5):
            box.add(present())
        batches = drain(box, 2)
        assert [len(b.results) for b in batches] == [2, 2, 1]
        assert seqs(batches) == [SEQ0 + i for i in range(5)]
        assert box.take(2) is None

    def test_ack_forgets_only_that_batch(self, make: Factory, tmp_path: Path) -> None:
        """An acknowledged batch leaves once; the others stay in flight."""
        box = make(tmp_path)
        for _ in range(4):
            box.add(present())
        a, _ = drain(box, 2)
        assert box.ack(a.batch_id) == 2
        assert box.ack(a.batch_id) == 0
        assert (len(box), box.inflight, box.pending, box.acked) == (2, 1, 0, 2)

    def test_unacked_batches_are_resent_first_with_same_ids(
        self, make: Factory, tmp_path: Path
    ) -> None:
        """After a lost stream the same batches (same ids and seqs) go out before new results."""
        box = make(tmp_path)
        for _ in range(4):
            box.add(present())
        first = drain(box, 2)
        box.add(present())
        box.requeue()
        assert box.pending == 5 and box.inflight == 0
        again = drain(box, 10)
        assert again[:2] == first
        assert again[2].batch_id == first[1].batch_id + 1
        assert [r.seq for r in again[2].results] == [SEQ0 + 4]


class TestSpool:
    def test_results_round_trip_unchanged(self, spool: Spool) -> None:
        """Every field of a result comes back from the file exactly as added."""
        r = ProbeResult(
            url_id=7,
            started_at=T0 + 0.123456,
            elapsed=1.5,
            status=301,
            final_url="https://example.test/a",
            body_sha256=bytes(range(32)),
            body_bytes=1234,
            truncated=True,
            peer_ip="2001:db8::1",
            error=ErrorClass.TLS_ERROR,
            redirects=3,
            challenge=True,
        )
        numbered = spool.add(r)
        batch = spool.take(10)
        assert batch is not None and batch.results == (numbered,)

    def test_redelivered_counts_results_sent_again(self, spool: Spool) -> None:
        """Results in a batch sent again after requeue are counted as redelivered."""
        for _ in range(3):
            spool.add(present())
        spool.take(2)
        spool.requeue()
        drain(spool)
        assert spool.redelivered == 2

    def test_bytes_grow_with_results_and_shrink_on_ack(self, spool: Spool) -> None:
        """The byte estimate counts held rows and drops back to zero when all are acked."""
        for _ in range(3):
            spool.add(present())
        held = spool.bytes
        assert held > 3 * 32
        for batch in drain(spool):
            spool.ack(batch.batch_id)
        assert spool.bytes == 0 and len(spool) == 0

    def test_closed_spool_refuses_use(self, spool: Spool) -> None:
        """After close() the spool raises instead of losing results silently."""
        spool.close()
        with pytest.raises(SpoolError, match="closed"):
            spool.add(present())


class TestRestart:
    def test_restart_resumes_unacked_then_unsent(self, tmp_path: Path) -> None:
        """Unacked batches come back first with their ids and seqs, then unsent results; no dups."""
        path = tmp_path / "spool.db"
        with open_spool(path) as old:
            added = [old.add(present(url_id=i)) for i in range(6)]
            a, b = old.take(2), old.take(2)
            assert a and b
            old.ack(a.batch_id)
        with open_spool(path) as new:
            assert (len(new), new.pending, new.inflight) == (4, 4, 0)
            again = drain(new, 10)
            assert again[0] == b
            assert [r for batch in again for r in batch.results] == added[2:]

    def test_sequence_numbers_are_never_reused(self, tmp_path: Path) -> None:
        """After everything was acked and deleted, a restart still numbers above every old seq."""
        path = tmp_path / "spool.db"
        with open_spool(path) as old:
            last = [old.add(present()) for _ in range(3)][-1].seq
            for batch in drain(old):
                old.ack(batch.batch_id)
            assert len(old) == 0
        with open_spool(path) as new:
            assert new.add(present()).seq > last

    def test_clock_going_back_does_not_reuse_seqs(self, tmp_path: Path) -> None:
        """The stored counter wins over a clock that stepped back."""
        path = tmp_path / "spool.db"
        with open_spool(path) as old:
            last = old.add(present()).seq
        with Spool(path, clock=lambda: T0 - 3600) as new:
            assert new.add(present()).seq > last

    def test_new_batch_ids_do_not_collide_with_old_unacked_ones(self, tmp_path: Path) -> None:
        """After a restart new batches get ids above every batch ever issued, acked or not."""
        path = tmp_path / "spool.db"
        with open_spool(path) as old:
            for _ in range(3):
                old.add(present())
            a, b, c = drain(old, 1)
            old.ack(c.batch_id)
        with open_spool(path) as new:
            new.add(present())
            ids = [batch.batch_id for batch in drain(new, 1)]
            assert ids == [a.batch_id, b.batch_id, c.batch_id + 1]
            assert new.ack(a.batch_id) == 1

    def test_drop_state_survives_restart(self, tmp_path: Path) -> None:
        """The last outcome per URL is kept in the file: a repeat after restart is a repeat."""
        path = tmp_path / "spool.db"
        with open_spool(path, limit=2) as old:
            old.add(present(url_id=1))
            old.add(present(url_id=2))
        with open_spool(path, limit=2) as new:
            new.add(present(url_id=1))
            assert new.drops_by_reason == {REFUSED_REPEAT: 1}

    def test_crash_keeps_flushed_and_taken_results_only(self, tmp_path: Path) -> None:
        """A killed process keeps what was flushed or taken; unflushed results vanish whole."""
        path = tmp_path / "spool.db"
        script = f"""
import os
from pathlib import Path
from agent.result import ProbeResult
from agent.spool import Spool
s = Spool(Path({str(path)!r}), clock=lambda: {T0!r})
r = ProbeResult(url_id=1, started_at=0.0, elapsed=0.0, status=404)
for _ in range(3):
    s.add(r)
s.flush()
s.add(r)
s.take(2)
s.add(r)
os._exit(1)
"""
        subprocess.run([sys.executable, "-c", script], check=False, timeout=60)
        with open_spool(path) as new:
            assert (len(new), new.pending) == (4, 4)
            batches = drain(new, 10)
            assert [b.batch_id for b in batches] == [1, 2]
            assert seqs(batches) == [SEQ0, SEQ0 + 1, SEQ0 + 2, SEQ0 + 3]
            assert new.add(present()).seq > SEQ0 + 4, "the lost result's seq is not reused"


class TestAssignmentAndJournal:
    def test_assignment_survives_a_restart(self, tmp_path: Path) -> None:
        """Upserts and removals are committed by the next flush and read back after reopening."""
        path = tmp_path / "spool.db"
        with open_spool(path) as s:
            s.record_assignment(
                [(1, "http://a.example/1", 300.0), (2, "http://b.example/", 0.5)], []
            )
            s.record_assignment([(1, "http://a.example/1", 60.0)], [2])
            s.flush()
        with open_spool(path) as s:
            assert s.assignment() == [(1, "http://a.example/1", 60.0)]

    def test_unflushed_assignment_change_is_not_half_kept(self, tmp_path: Path) -> None:
        """A crash before the flush keeps the previous assignment whole."""
        path = tmp_path / "spool.db"
        s = open_spool(path)
        s.record_assignment([(1, "http://a.example/1", 300.0)], [])
        s.flush()
        s.record_assignment([(2, "http://b.example/", 300.0)], [1])
        s._conn.close()  # a crash: the open transaction is rolled back
        with open_spool(path) as again:
            assert again.assignment() == [(1, "http://a.example/1", 300.0)]

    def test_journal_keeps_every_kept_seq_after_ack(self, tmp_path: Path) -> None:
        """The journal outlives acknowledgement and leaves out results the policy dropped."""
        path = tmp_path / "spool.db"
        with open_spool(path, journal=True, limit=3) as s:
            first, repeat = s.add(present()).seq, s.add(present()).seq
            s.add(present())
            newest = s.add(present()).seq  # full: the oldest repeat makes room
            (batch,) = drain(s)
            s.ack(batch.batch_id)
        conn = sqlite3.connect(path)
        journal = [seq for (seq,) in conn.execute("SELECT seq FROM journal ORDER BY seq")]
        conn.close()
        assert set(journal) == {r.seq for r in batch.results}
        assert first in journal and newest in journal and repeat not in journal
        assert len(journal) == 3


class TestDropPolicy:
    def fill(self, spool: Spool) -> list[ProbeResult]:
        """Two runs of three: url 1 timing out, url 2 present (changes, repeats, newest)."""
        return [spool.add(timeout(1)) for _ in range(3)] + [spool.add(present(2)) for _ in range(3)]

    def test_inconclusive_repeats_go_first_then_other_repeats(self, tmp_path: Path) -> None:
        """A full spool drops the oldest inconclusive repeat, then the oldest other repeat."""
        with open_spool(tmp_path / "s.db", limit=6) as spool:
            t1, _, t3, p1, _, p3 = self.fill(spool)
            c1 = spool.add(removed(3))
            c2 = spool.add(removed(4))
            assert spool.drops_by_reason == {INCONCLUSIVE_REPEAT: 1, REPEAT: 1}
            assert spool.dropped == 2 and len(spool) == 6
            assert seqs(drain(spool)) == [t1.seq, t3.seq, p1.seq, p3.seq, c1.seq, c2.seq]

    def test_state_changes_are_kept_beyond_the_limit(self, tmp_path: Path) -> None:
        """With only changes and newest results left, a change is kept and counted over limit."""
        with open_spool(tmp_path / "s.db", limit=2) as spool:
            a, b = spool.add(present(1)), spool.add(removed(1))
            c = spool.add(present(1, sha=b"b" * 32))
            assert (spool.dropped, spool.over_limit, len(spool)) == (0, 1, 3)
            assert seqs(drain(spool)) == [a.seq, b.seq, c.seq]

    def test_a_repeat_is_refused_when_nothing_can_go(self, tmp_path: Path) -> None:
        """When nothing is droppable, a new repeat is refused and counted, never a change."""
        with open_spool(tmp_path / "s.db", limit=2) as spool:
            spool.add(present(1))
            spool.add(present(2))
            spool.add(present(1))
            assert spool.drops_by_reason == {REFUSED_REPEAT: 1} and len(spool) == 2

    def test_last_observation_before_a_change_is_kept(self, tmp_path: Path) -> None:
        """The newest present result before a removal survives: both ends of the interval stay."""
        with open_spool(tmp_path / "s.db", limit=3) as spool:
            first = spool.add(present(1))
            for _ in range(5):
                last_present = spool.add(present(1))
            gone = spool.add(removed(1))
            spool.add(removed(2))
            held = seqs(drain(spool))
            assert first.seq in held and last_present.seq in held and gone.seq in held

    def test_results_in_flight_are_never_dropped(self, tmp_path: Path) -> None:
        """Only unsent rows are dropped; a taken batch is resent whole."""
        with open_spool(tmp_path / "s.db", limit=3) as spool:
            for _ in range(3):
                spool.add(present(1))
            sent = drain(spool)
            spool.add(present(1))
            assert spool.drops_by_reason == {REFUSED_REPEAT: 1}
            spool.requeue()
            assert drain(spool) == sent

    def test_byte_limit_drops_repeats(self, tmp_path: Path) -> None:
        """max_bytes bounds the estimated size with the same policy."""
        with open_spool(tmp_path / "s.db", max_bytes=10_000) as spool:
            for _ in range(200):
                spool.add(timeout(1))
            assert 0 < spool.bytes <= 10_000
            assert spool.drops_by_reason[INCONCLUSIVE_REPEAT] == 200 - len(spool)

    def test_a_dynamic_page_is_bounded(self, tmp_path: Path) -> None:
        """A page whose hash changes on every load repeats by class: the bound holds."""
        with open_spool(tmp_path / "s.db", limit=10) as spool:
            for i in range(100):
                spool.add(present(1, sha=i.to_bytes(32, "big")))
            assert len(spool) == 10 and spool.over_limit == 0
            assert spool.drops_by_reason == {REPEAT: 90}

    def test_a_redirect_elsewhere_is_a_change(self, tmp_path: Path) -> None:
        """A 2xx at another final URL (a redirect away) is news even when full."""
        with open_spool(tmp_path / "s.db", limit=2) as spool:
            spool.add(present(1))
            spool.add(present(1))
            moved = spool.add(replace(present(1), final_url="http://parking.example/"))
            assert moved.seq in seqs(drain(spool)) and spool.dropped == 0

    def test_drop_is_logged_without_the_url(
        self, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Each drop logs one spool_dropped line with reason and url_id, never the URL."""
        url = "https://secret.example/abuse"
        with open_spool(tmp_path / "s.db", limit=2) as spool, caplog.at_level(logging.WARNING):
            for _ in range(3):
                spool.add(
                    ProbeResult(url_id=9, started_at=T0, elapsed=1, status=503, final_url=url)
                )
        lines = [r.getMessage() for r in caplog.records if "spool_dropped" in r.getMessage()]
        assert len(lines) == 1 and lines[0].startswith("spool_dropped reason=inconclusive_repeat")
        assert "url_id=9" in lines[0] and url not in caplog.text


class TestEvidence:
    @pytest.mark.parametrize(
        ("result", "expected"),
        [
            (ProbeResult(1, T0, 0.1, status=200, final_url="http://a/"), "present http://a/"),
            (ProbeResult(1, T0, 0.1, status=204, body_sha256=b"x" * 32), "present "),
            (ProbeResult(1, T0, 0.1, status=404), "removed"),
            (ProbeResult(1, T0, 0.1, status=410), "removed"),
            (ProbeResult(1, T0, 0.1, status=451), "removed"),
            (ProbeResult(1, T0, 0.1, error=ErrorClass.CONNECT_REFUSED), "removed"),
            (ProbeResult(1, T0, 0.1, error=ErrorClass.DNS_NXDOMAIN), "nxdomain"),
            (ProbeResult(1, T0, 0.1, status=503), "inconclusive"),
            (ProbeResult(1, T0, 0.1, status=429), "inconclusive"),
            (ProbeResult(1, T0, 0.1, status=200, challenge=True), "inconclusive"),
            (ProbeResult(1, T0, 5.0, error=ErrorClass.READ_TIMEOUT), "inconclusive"),
            (ProbeResult(1, T0, 0.1, error=ErrorClass.TLS_ERROR), "inconclusive"),
            (ProbeResult(1, T0, 0.1, status=403, final_url="http://a/"), "status 403 http://a/"),
        ],
    )
    def test_class_from_status_and_error(self, result: ProbeResult, expected: str) -> None:
        """The class is what status and error show, never the body hash."""
        assert evidence(result) == expected
        assert outcome(result) == outcome(replace(result, body_sha256=b"other", body_bytes=9))


class TestGroupCommit:
    def committed(self, path: Path) -> int:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            return int(conn.execute("SELECT count(*) FROM results").fetchone()[0])
        finally:
            conn.close()

    def test_the_timer_commits_a_quiet_transaction(self, tmp_path: Path) -> None:
        """The first write arms one timer of flush_interval; when it fires the rows commit."""
        timers: list[tuple[float, Callable[[], None]]] = []
        path = tmp_path / "s.db"
        with Spool(path, clock=clock, call_later=lambda d, f: timers.append((d, f))) as s:
            s.add(present(1))
            s.add(present(2))
            assert [d for d, _ in timers] == [0.05]
            assert self.committed(path) == 0
            timers.pop()[1]()
            assert self.committed(path) == 2
            s.add(present(3))
            assert len(timers) == 1, "the next transaction arms the next timer"

    def test_an_add_commits_a_transaction_past_its_deadline(self, tmp_path: Path) -> None:
        """Without a timer, the first add after flush_interval commits everything before it."""
        now = [T0]
        path = tmp_path / "s.db"
        with Spool(path, clock=lambda: now[0], call_later=lambda d, f: None) as s:
            s.add(present(1))
            now[0] += 0.049
            s.add(present(2))
            assert self.committed(path) == 0
            now[0] += 0.002
            s.add(present(3))
            assert self.committed(path) == 3

    def test_in_an_event_loop_a_result_commits_within_the_interval(self, tmp_path: Path) -> None:
        """With the default timer (the running loop), a lone result is committed promptly."""
        import asyncio

        path = tmp_path / "s.db"

        async def main() -> float:
            with Spool(path, flush_interval=0.02) as s:
                added = time.monotonic()
                s.add(present(1))
                await until(lambda: self.committed(path) == 1, 5, "the commit", every=0.005)
                return time.monotonic() - added

        assert asyncio.run(main()) < 1.0
        assert self.committed(path) == 1

    def test_the_checkpointer_backfills_the_wal(self, tmp_path: Path) -> None:
        """The background thread checkpoints committed frames (the fsync off the loop)."""
        path = tmp_path / "s.db"
        with Spool(path, clock=clock, checkpoint_interval=0.02) as s:
            s.add(present(1))
            s.flush()
            checkpointer = s._checkpointer
            assert checkpointer is not None
            deadline = time.monotonic() + 10
            while checkpointer.checkpoints < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert checkpointer.checkpoints >= 2
            conn = sqlite3.connect(path)
            busy, frames, backfilled = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            conn.close()
            assert busy == 0 and frames == backfilled


class TestBadFiles:
    def test_garbage_file_is_an_error_naming_it(self, tmp_path: Path) -> None:
        """A file that is not SQLite raises SpoolError naming the path and is left untouched."""
        path = tmp_path / "spool.db"
        path.write_bytes(b"not a database, just some bytes" * 100)
        with pytest.raises(SpoolError, match=str(path)):
            Spool(path)
        assert path.read_bytes().startswith(b"not a database")

    def test_foreign_sqlite_file_is_refused(self, tmp_path: Path) -> None:
        """Another program's SQLite file is refused rather than altered."""
        path = tmp_path / "other.db"
        with sqlite3.connect(path) as conn:
            conn.execute("CREATE TABLE t (x)")
        conn.close()
        with pytest.raises(SpoolError, match="another program"):
            Spool(path)

    def test_unwritable_location_is_an_error_naming_it(self, tmp_path: Path) -> None:
        """A spool path in a missing directory raises SpoolError naming the path."""
        path = tmp_path / "missing" / "spool.db"
        with pytest.raises(SpoolError, match=str(path)):
            Spool(path)

    def test_file_migrated_by_sqlite_utils_is_read(self, tmp_path: Path) -> None:
        """A spool whose schema sqlite_utils' Migrations recorded opens without re-running it."""
        sqlite_utils = pytest.importorskip("sqlite_utils")
        from sqlite_utils.migrations import Migrations

        from agent import spool as module

        path = tmp_path / "spool.db"
        old = Migrations("takedown.agent.spool")
        old()(module.m001_initial)
        old()(module.m002_assignment_and_journal)
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute(f"PRAGMA application_id={module.APPLICATION_ID}")
        old.apply(sqlite_utils.Database(conn))
        conn.close()
        with open_spool(path) as s:
            s.record_assignment([(1, "http://a.example/1", 300.0)], [])
            s.add(present())
        with open_spool(path) as s:
            assert len(s) == 1 and s.assignment() == [(1, "http://a.example/1", 300.0)]


class TestImports:
    @pytest.mark.usefixtures("programs_with_pandas")  # importable, as the dev extras install it
    def test_the_agent_imports_neither_sqlite_utils_nor_numpy(self) -> None:
        """The agent's modules stay off sqlite_utils, which pulls numpy and pandas in (RSS)."""
        script = (
            "import sys, agent.cli, agent.main;"
            " print(sorted(m for m in ('sqlite_utils', 'numpy', 'pandas') if m in sys.modules))"
        )
        out = subprocess.run(
            [sys.executable, "-c", script], check=True, capture_output=True, text=True, timeout=60
        )
        assert out.stdout.strip() == "[]"


OUTCOMES = [present, removed, timeout, lambda u: present(u, sha=b"b" * 32)]


class SpoolMachine(RuleBasedStateMachine):
    """Random adds, takes, acks, requeues and restarts against a model of what must hold."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.TemporaryDirectory()
        self.path = Path(self.dir.name) / "spool.db"
        self.spool = open_spool(self.path, limit=6)
        self.stored: set[int] = set()
        self.changes: set[int] = set()
        self.last: dict[int, object] = {}
        self.issued: set[int] = set()
        self.batches: dict[int, tuple[int, ...]] = {}
        self.inflight: set[int] = set()
        self.acked: list[int] = []
        self.dropped = 0  # rows dropped (refusals excluded), summed over restarts
        self.refused = 0

    @rule(url_id=st.integers(1, 3), kind=st.integers(0, len(OUTCOMES) - 1))
    def add(self, url_id: int, kind: int) -> None:
        before = self.spool.drops_by_reason.get(REFUSED_REPEAT, 0)
        r = self.spool.add(OUTCOMES[kind](url_id))
        assert r.seq not in self.issued
        self.issued.add(r.seq)
        change = self.last.get(url_id) != outcome(r)
        self.last[url_id] = outcome(r)
        if self.spool.drops_by_reason.get(REFUSED_REPEAT, 0) > before:
            assert not change
            self.refused += 1
        else:
            self.stored.add(r.seq)
            if change:
                self.changes.add(r.seq)

    @rule(size=st.integers(1, 4))
    def take(self, size: int) -> None:
        batch = self.spool.take(size)
        if batch is None:
            return
        contents = tuple(r.seq for r in batch.results)
        assert list(contents) == sorted(contents) and len(contents) > 0
        if batch.batch_id in self.batches:
            assert self.batches[batch.batch_id] == contents
        else:
            assert len(contents) <= size
            self.batches[batch.batch_id] = contents
        self.inflight.add(batch.batch_id)

    @precondition(lambda self: self.inflight)
    @rule(data=st.data())
    def ack(self, data: st.DataObject) -> None:
        batch_id = data.draw(st.sampled_from(sorted(self.inflight)))
        assert self.spool.ack(batch_id) == len(self.batches[batch_id])
        self.inflight.discard(batch_id)
        self.acked.extend(self.batches[batch_id])

    @rule()
    def requeue(self) -> None:
        self.spool.requeue()
        self.inflight.clear()

    @rule()
    def restart(self) -> None:
        self.dropped += self.spool.dropped - self.spool.drops_by_reason.get(REFUSED_REPEAT, 0)
        self.spool.close()
        self.spool = open_spool(self.path, limit=6)
        self.inflight.clear()

    def dropped_now(self) -> int:
        s = self.spool
        return self.dropped + s.dropped - s.drops_by_reason.get(REFUSED_REPEAT, 0)

    @invariant()
    def every_result_is_acked_once_held_or_dropped(self) -> None:
        assert len(self.acked) == len(set(self.acked))
        assert set(self.acked) <= self.stored
        assert len(self.spool) + len(self.acked) + self.dropped_now() == len(self.stored)

    def teardown(self) -> None:
        try:
            self.spool.requeue()
            held = seqs(drain(self.spool))
            assert len(held) == len(set(held)) and not set(held) & set(self.acked)
            lost = self.stored - set(held) - set(self.acked)
            assert len(lost) == self.dropped_now()
            assert not lost & self.changes, "a state change was dropped"
            self.spool.close()
        finally:
            self.dir.cleanup()


TestSpoolMachine = SpoolMachine.TestCase
TestSpoolMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
