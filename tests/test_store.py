"""The store on a real SQLite file: idempotency, restarts, storage faults."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import re
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from collector.attribution import PrefixTable
from collector.method import Policy
from collector.projection import REFOLD_DELAY
from collector.reports_file import ReportIn
from collector.schedule import Planner
from collector.store import (
    CorruptDatabase,
    Ingested,
    ResultIn,
    StorageFull,
    Store,
    Submitted,
    Writer,
)
from collector.store.reads import (
    connect_readonly,
    integrity_problem,
    results_count,
    url_outcomes,
    url_statuses,
)

NOW = time.time()
CONTENT = hashlib.sha256(b"content").digest()
PLANNER = Planner()


def report(url: str, reference: str | None = None) -> ReportIn:
    return ReportIn(url=url, notified_at=NOW - 60, received_at=None, reference=reference)


def res(url_id: int, seq: int, status: int = 200, peer: str = "192.0.2.1") -> ResultIn:
    return ResultIn(
        url_id=url_id,
        seq=seq,
        started_at=NOW + seq,
        elapsed=0.01,
        status=status,
        final_url="http://x.example/",
        sha256=CONTENT if status == 200 else b"",
        body_bytes=7,
        truncated=False,
        peer_ip=peer,
        error="none",
        redirects=0,
    )


@pytest.fixture
def table(tmp_path: Path) -> PrefixTable:
    path = tmp_path / "prefixes.csv"
    path.write_text(
        "prefix,asn,provider\n192.0.2.0/24,64500,Example\n198.51.100.0/24,64501,Elsewhere\n"
    )
    return PrefixTable.from_csv(path)


def open_store(path: Path, table: PrefixTable) -> Store:
    return Store(path, table, Policy(confirmations=2, min_vantage_points=1))  # one network


class TestStore:
    def test_verdict_survives_a_restart(self, tmp_path: Path, table: PrefixTable) -> None:
        """State folded before a restart continues after it: one more removed result confirms."""
        db = tmp_path / "c.db"
        store = open_store(db, table)
        url_id = store.submit_reports([report("http://x.example/a", "R")], NOW, PLANNER)[0].url_id
        agent = store.register_agent("a1", "net", "t", NOW)
        store.ingest(agent, [res(url_id, 1), res(url_id, 2, 404)], NOW)
        store.close()
        store = open_store(db, table)
        store.ingest(agent, [res(url_id, 3, 404)], NOW)
        store.close()
        conn = connect_readonly(db)
        (status,) = url_statuses(conn)
        conn.close()
        assert status.state == "removed"
        assert status.provider == "Example" and status.asn == 64500
        assert status.removal_first_removed_at == NOW + 2

    def test_first_removal_stays_with_the_provider_that_removed_it(
        self, tmp_path: Path, table: PrefixTable
    ) -> None:
        """Content that reappears at another provider moves the URL, not the first latency."""
        db = tmp_path / "c.db"
        store = open_store(db, table)
        url_id = store.submit_reports([report("http://x.example/a")], NOW, PLANNER)[0].url_id
        agent = store.register_agent("a1", "net", "t", NOW)
        removed = [res(url_id, 1), res(url_id, 2, 404), res(url_id, 3, 404)]
        back = [res(url_id, 4, peer="198.51.100.9")]
        store.ingest(agent, [*removed, *back], NOW)
        store.close()
        conn = connect_readonly(db)
        (status,), (outcome,) = url_statuses(conn), url_outcomes(conn)
        conn.close()
        assert status.provider == "Elsewhere" and status.state == "available"
        assert outcome.provider == "Example"
        assert outcome.removal_first_removed_at == NOW + 2

    def test_same_seq_is_stored_once_across_restarts(
        self, tmp_path: Path, table: PrefixTable
    ) -> None:
        """A batch redelivered after a collector restart is recognised as duplicate."""
        db = tmp_path / "c.db"
        store = open_store(db, table)
        url_id = store.submit_reports([report("http://x.example/a")], NOW, PLANNER)[0].url_id
        agent = store.register_agent("a1", "net", "t", NOW)
        first = store.ingest(agent, [res(url_id, s) for s in range(10)], NOW)
        store.close()
        store = open_store(db, table)
        again = store.ingest(agent, [res(url_id, s) for s in range(5, 15)], NOW)
        store.close()
        assert (first.stored, again.stored, again.duplicates) == (10, 5, 5)
        conn = connect_readonly(db)
        assert results_count(conn) == 15
        conn.close()

    def test_same_url_new_reference_shares_the_url(
        self, tmp_path: Path, table: PrefixTable
    ) -> None:
        """A second report of the same URL is a new report on the same monitored URL."""
        store = open_store(tmp_path / "c.db", table)
        a, b = store.submit_reports(
            [report("http://x.example/a", "R1"), report("http://x.example/a", "R2")], NOW, PLANNER
        )
        store.close()
        assert a.status is b.status is Submitted.ACCEPTED
        assert a.url_id == b.url_id and a.report_id != b.report_id
        assert a.new_url and not b.new_url

    def test_reference_hash_is_the_baseline(self, tmp_path: Path, table: PrefixTable) -> None:
        """With a hotline hash, a body with that hash is present and a stable other body is not."""
        db = tmp_path / "c.db"
        store = open_store(db, table)
        ref = ReportIn("http://x.example/a", NOW - 60, None, "R", sha256=CONTENT)
        other = ReportIn("http://x.example/b", NOW - 60, None, "S", sha256=bytes(32))
        a, b = (o.url_id for o in store.submit_reports([ref, other], NOW, PLANNER))
        agent = store.register_agent("a1", "net", "t", NOW)
        store.ingest(agent, [res(a, 1), res(b, 2), res(b, 3), res(b, 4)], NOW)
        store.close()
        conn = connect_readonly(db)
        states = {s.url_id: s.state for s in url_statuses(conn)}
        conn.close()
        assert states == {a: "available", b: "removed"}

    def test_results_for_a_url_retired_while_cached_are_rejected(
        self, tmp_path: Path, table: PrefixTable
    ) -> None:
        """A removed URL whose watch period ends is retired by plan: its verdict, cached by an
        earlier batch, goes too, and later results for it are rejected, not stored."""
        store = open_store(tmp_path / "c.db", table)
        url_id = store.submit_reports([report("http://x.example/a")], NOW, PLANNER)[0].url_id
        agent = store.register_agent("a1", "net", "t", NOW)
        done = store.ingest(agent, [res(url_id, 1), res(url_id, 2, 404), res(url_id, 3, 404)], NOW)
        assert done.stored == 3 and url_id in store.projection.entries
        _, retired = store.plan(NOW + 3600, Planner.fixed(60.0, watch_period=60.0))
        assert retired == [url_id] and url_id not in store.projection.entries
        late = store.ingest(agent, [res(url_id, 4, 404)], NOW + 3600)
        store.close()
        assert (late.stored, late.rejected) == (0, 1)
        conn = connect_readonly(tmp_path / "c.db")
        assert results_count(conn, "a1") == 3
        conn.close()

    def test_full_disk_commits_nothing_and_says_so(
        self, tmp_path: Path, table: PrefixTable
    ) -> None:
        """When the database cannot grow, the batch fails as StorageFull and earlier data stays."""
        db = tmp_path / "c.db"
        store = open_store(db, table)
        url_id = store.submit_reports([report("http://x.example/a")], NOW, PLANNER)[0].url_id
        agent = store.register_agent("a1", "net", "t", NOW)
        store.ingest(agent, [res(url_id, 1)], NOW)
        pages = store.conn.execute("PRAGMA page_count").fetchone()[0]
        store.conn.execute(f"PRAGMA max_page_count = {pages}")
        big = [res(url_id, s) for s in range(2, 5000)]
        with pytest.raises(StorageFull, match="full"):
            store.ingest(agent, big, NOW)
        store.close()
        conn = connect_readonly(db)
        assert results_count(conn) == 1
        conn.close()

    def test_corrupt_file_is_refused_at_start(self, tmp_path: Path, table: PrefixTable) -> None:
        """A file that is not a SQLite database is named in a clear error, not overwritten."""
        db = tmp_path / "c.db"
        db.write_bytes(b"this is not a database" * 100)
        with pytest.raises(CorruptDatabase, match=r"c\.db"):
            open_store(db, table)
        assert db.read_bytes().startswith(b"this is not a database")

    def test_readonly_connection_names_a_missing_file(self, tmp_path: Path) -> None:
        """Reading a database that does not exist says which file and how to create it."""
        with pytest.raises(Exception, match="no such database"):
            connect_readonly(tmp_path / "missing.db")


class TestWriter:
    async def test_writes_run_in_order_off_the_loop(
        self, tmp_path: Path, table: PrefixTable
    ) -> None:
        """Work submitted to the writer runs in submission order and returns its value."""
        writer = Writer(lambda: open_store(tmp_path / "c.db", table))
        await writer.start()
        ids = [
            await writer.run(lambda s, i=i: s.register_agent(f"a{i}", "n", "v", NOW))
            for i in range(5)
        ]
        await writer.close()
        assert ids == sorted(ids) and len(set(ids)) == 5

    async def test_start_fails_clearly_on_a_corrupt_file(
        self, tmp_path: Path, table: PrefixTable
    ) -> None:
        """Opening a corrupt database through the writer raises the store's error."""
        db = tmp_path / "c.db"
        db.write_bytes(b"garbage" * 1000)
        writer = Writer(lambda: open_store(db, table))
        with pytest.raises(CorruptDatabase):
            await writer.start()

    async def test_errors_reach_the_caller(self, tmp_path: Path, table: PrefixTable) -> None:
        """An exception inside the writer thread is raised in the awaiting task."""
        writer = Writer(lambda: open_store(tmp_path / "c.db", table))
        await writer.start()

        def boom(store: Store) -> None:
            store.conn.execute("SELECT * FROM no_such_table")

        with pytest.raises(sqlite3.OperationalError):
            await writer.run(boom)
        await writer.close()


class GroupingStore(Store):
    """A store that records the size of each group commit, and cannot attribute one peer."""

    POISON = "203.0.113.66"
    groups: list[int]

    def ingest_group(self, items):  # type: ignore[no-untyped-def]
        self.groups = [*getattr(self, "groups", []), len(items)]
        return super().ingest_group(items)

    def _attribute(self, peer_ip, origin_ip):  # type: ignore[no-untyped-def]
        if peer_ip == self.POISON:
            raise ValueError("no attribution for this peer")
        return super()._attribute(peer_ip, origin_ip)


async def test_queued_batches_commit_together(tmp_path: Path, table: PrefixTable) -> None:
    """Batches waiting in the writer's queue commit as one group; each gets its own outcome,
    a poison result is refused alone, and the verdicts equal those of one batch at a time."""
    policy = Policy(confirmations=2, min_vantage_points=1)
    stores: list[GroupingStore] = []

    def open_grouping(db: Path) -> GroupingStore:
        store = GroupingStore(db, table, policy)
        stores.append(store)
        return store

    batches = [[res(1, 10 * b + k, 404 if b >= 3 else 200) for k in range(3)] for b in range(6)]
    batches[4][1] = dataclasses.replace(batches[4][1], peer_ip=GroupingStore.POISON)
    outcomes = []
    for db, grouped in ((tmp_path / "g.db", True), (tmp_path / "s.db", False)):
        writer = Writer(lambda db=db: open_grouping(db))
        await writer.start()
        agent = await writer.run(lambda s: s.register_agent("a", "n", "v", NOW))
        await writer.run(lambda s: s.submit_reports([report("http://x.example/")], NOW, PLANNER))
        if grouped:
            release = threading.Event()
            # Hold the writer thread until every batch is queued behind it.
            hold = asyncio.ensure_future(writer.run(lambda s, r=release: r.wait(10)))
            tasks = [asyncio.ensure_future(writer.ingest(agent, b, NOW + 100, None))
                     for b in batches]  # fmt: skip
            await asyncio.sleep(0)  # each task has put its batch in the queue
            release.set()
            assert await hold
            done = await asyncio.gather(*tasks)
        else:
            done = [await writer.ingest(agent, b, NOW + 100, None) for b in batches]
        outcomes.append([(d.stored, d.rejected) for d in done])
        await writer.close()
    grouped_store, single_store = stores
    assert max(grouped_store.groups) > 1
    assert max(single_store.groups) == 1
    assert outcomes[0] == outcomes[1]
    assert outcomes[0][4] == (2, 1)
    snapshots = []
    for db in (tmp_path / "g.db", tmp_path / "s.db"):
        conn = connect_readonly(db)
        try:
            snapshots.append(
                (
                    [(s.state, s.removal_first_removed_at) for s in url_statuses(conn)],
                    results_count(conn, "a"),
                )
            )
        finally:
            conn.close()
    assert snapshots[0] == snapshots[1]
    assert snapshots[0][1] == 17


def test_bounded_verdict_cache_changes_nothing(tmp_path: Path, table: PrefixTable) -> None:
    """A store that keeps one verdict in memory writes exactly what an unbounded one writes."""
    dumps = []
    for cache_urls in (1, 1_000_000):
        store = Store(tmp_path / f"c{cache_urls}.db", table, Policy(confirmations=2), cache_urls)
        try:
            ids = [
                o.url_id
                for o in store.submit_reports(
                    [report(f"http://x.example/{i}") for i in range(6)], NOW, PLANNER
                )
            ]
            agents = [store.register_agent(f"a{n}", "net", "1", NOW) for n in range(2)]
            seq = 0
            for rnd in range(5):
                for agent in agents:
                    batch = []
                    for k, url_id in enumerate(ids):
                        seq += 1
                        status = 404 if rnd >= 2 and k % 2 else 200
                        peer = "198.51.100.7" if k == 5 and rnd == 4 else "192.0.2.1"
                        batch.append(res(url_id, seq, status, peer))
                    store.ingest(agent, batch, NOW + seq)
            assert len(store.projection.entries) <= cache_urls
            dumps.append(
                [
                    store.conn.execute(f"SELECT * FROM {t} ORDER BY 1, 2").fetchall()
                    for t in ("url_state", "episodes", "url_events", "result_counts")
                ]
            )
        finally:
            store.close()
    assert dumps[0] == dumps[1]


def test_late_refolds_are_spread_over_transactions(tmp_path: Path, table: PrefixTable) -> None:
    """After an outage every URL of a network may need a refold from its whole history: each
    transaction does a budget's worth (at least one URL), so acks are never held for all of
    them, and the refolds left over reach the same verdicts as a full refold."""
    store = Store(tmp_path / "c.db", table, Policy(confirmations=2, min_vantage_points=1))
    try:
        ids = [
            o.url_id
            for o in store.submit_reports(
                [report(f"http://x.example/{i}") for i in range(6)], NOW, PLANNER
            )
        ]
        first, second = (store.register_agent(f"a{n}", f"net{n}", "1", NOW) for n in (1, 2))
        watched, other = ids[:5], ids[5]

        def probe(url_id: int, t: int, status: int = 200) -> ResultIn:
            r = res(url_id, t * 10 + url_id, status)  # a seq of its own per URL and time
            return dataclasses.replace(r, started_at=NOW + t)

        store.ingest(first, [probe(u, t, 404 if t > 20 else 200) for t in range(1, 31)
                             for u in watched], NOW + 40)  # fmt: skip
        # The second network's spool arrives after the first's newer results: late for all.
        store.ingest(second, [probe(u, t, 404 if t > 25 else 200) for t in range(1, 31)
                              for u in watched], NOW + 100)  # fmt: skip

        def waiting() -> int:
            (n,) = store.conn.execute(
                "SELECT COUNT(*) FROM url_state WHERE refold_pending = 1"
            ).fetchone()
            return int(n)

        assert waiting() == 5
        store.projection.refold_budget = 0.0  # one URL per transaction, whatever the machine
        store.ingest(first, [probe(other, 31)], NOW + 100 + REFOLD_DELAY)
        assert waiting() == 4
        store.idle()
        assert waiting() == 3
        store.refold_due(NOW + 200, limited=False)
        assert waiting() == 0

        def history() -> list[list[tuple[object, ...]]]:
            return [
                store.conn.execute(f"SELECT * FROM {t} ORDER BY 1, 2").fetchall()
                for t in ("episodes", "url_events")
            ]

        before = history()
        changes = store.refold(now=NOW + 300)
        assert all(b == a for _, b, a in changes), "a spread refold decided differently"
        assert history() == before
        states = {s for (s,) in store.conn.execute("SELECT state FROM url_state")}
        assert states == {"removed", "available"}  # the five watched, and the other one
    finally:
        store.close()


VERDICTS = (
    ("url_state", "url_id, state, episode, last_present_at, folded, removal_first_removed_at,"
     " removal_confirmed_at, memory"),
    ("episodes", "*"),
    ("url_events", "url_id, at, kind, detail"),
)  # fmt: skip


@pytest.mark.parametrize("damaged", [False, True], ids=["intact", "damaged"])
def test_restart_resumes_folds_from_the_flushed_states(
    tmp_path: Path, table: PrefixTable, caplog: pytest.LogCaptureFixture, damaged: bool
) -> None:
    """Killed between flushes, a store resumes each unflushed URL from its url_state row and
    folds only the results stored after it, rather than refolding whole histories; the
    verdicts are those of a store that wrote every state with its batch. A damaged row (cut
    short, or a field missing) is said in the log and refolded from the stored results."""
    ids: list[int] = []

    def feed(store: Store, agents: list[int], steps: range) -> None:
        for t in steps:
            for n, agent in enumerate(agents):
                batch = [
                    dataclasses.replace(
                        res(u, t * 10 + u, 404 if t > 15 and u in ids[:2] else 200),
                        started_at=NOW + t + n / 2,  # the second network half a second later
                    )
                    for u in ids
                ]
                store.ingest(agent, batch, NOW + t + 1)

    snapshots = []
    for label, flush_every in (("every", 0.0), ("behind", 1e9)):
        db = tmp_path / f"{label}.db"
        store = Store(db, table, Policy(confirmations=2), flush_every=flush_every)
        ids = [
            o.url_id
            for o in store.submit_reports(
                [report(f"http://x.example/{i}") for i in range(4)], NOW, PLANNER
            )
        ]
        agents = [store.register_agent(f"a{n}", f"net{n}", "1", NOW) for n in (1, 2)]
        feed(store, agents, range(1, 11))
        store.flush(NOW + 11)
        feed(store, agents, range(11, 21))
        if label == "behind":
            store.conn.close()  # SIGKILL: the last ten rounds are in no url_state row
            if damaged:
                with sqlite3.connect(db) as conn:
                    (memory,) = conn.execute(
                        "SELECT memory FROM url_state WHERE url_id = ?", (ids[0],)
                    ).fetchone()
                    conn.execute(
                        "UPDATE url_state SET memory = ? WHERE url_id = ?",
                        (memory[: len(memory) // 2], ids[0]),
                    )
                    conn.execute(
                        "UPDATE url_state SET memory = json_remove(memory, '$.tracks')"
                        " WHERE url_id = ?",
                        (ids[1],),
                    )
            with caplog.at_level(logging.INFO, logger="collector.store.writes"):
                store = Store(db, table, Policy(confirmations=2), flush_every=flush_every)
            want = "urls=2 refolds=0 .*refolded: 2" if damaged else "urls=4 refolds=0 .*refolded: 0"
            assert re.search(f"folds_resumed {want}", caplog.text), caplog.text
            for url_id in ids[:2] if damaged else ():
                assert f"fold_state_unreadable url_id={url_id} " in caplog.text
        store.flush(NOW + 21)  # the folds as resumed (every state is written already)
        snapshots.append(
            [
                store.conn.execute(f"SELECT {c} FROM {t} ORDER BY 1, 2").fetchall()
                for t, c in VERDICTS
            ]
        )
        feed(store, agents, range(21, 31))
        store.close()
        with sqlite3.connect(db) as conn:
            snapshots.append(
                [conn.execute(f"SELECT {c} FROM {t} ORDER BY 1, 2").fetchall() for t, c in VERDICTS]
            )
    assert snapshots[2:] == snapshots[:2]  # right after the restart, and at the end
    assert {row[1] for row in snapshots[1][0]} == {"removed", "available"}


def test_full_disk_in_a_group_commit_loses_nothing_and_recovers(
    tmp_path: Path, table: PrefixTable
) -> None:
    """The disk fills during a group commit: every batch of the group gets StorageFull (so
    none is acknowledged), nothing of it is stored and no verdict moves; when space returns,
    the agents' resent batches are stored once and the verdicts equal a run without the fault."""
    policy = Policy(confirmations=2, min_vantage_points=1)
    snapshots = []
    for db, fault in ((tmp_path / "full.db", True), (tmp_path / "calm.db", False)):
        store = Store(db, table, policy, flush_every=5.0)
        try:
            ids = [
                o.url_id
                for o in store.submit_reports(
                    [report(f"http://x.example/{i}") for i in range(3)], NOW, PLANNER
                )
            ]
            agents = [store.register_agent(f"a{n}", "net", "1", NOW) for n in range(3)]
            first = [(a, [res(u, 10 * u + n) for u in ids], NOW, None)
                     for n, a in enumerate(agents)]  # fmt: skip
            assert all(not isinstance(o, BaseException) for o in store.ingest_group(first))
            # The removals: large enough that the file must grow.
            group = [(a, [res(u, 1000 * (n + 1) + k * 10 + u, 404) for k in range(300)
                          for u in ids], NOW + 10, None)
                     for n, a in enumerate(agents)]  # fmt: skip
            if fault:
                before = store.conn.execute("SELECT url_id, state FROM url_state").fetchall()
                pages = store.conn.execute("PRAGMA page_count").fetchone()[0]
                store.conn.execute(f"PRAGMA max_page_count = {pages}")
                outcomes = store.ingest_group(group)
                assert all(isinstance(o, StorageFull) for o in outcomes), outcomes
                assert "full" in str(outcomes[0])
                assert results_count(store.conn) == 9
                assert (
                    store.conn.execute("SELECT url_id, state FROM url_state").fetchall() == before
                )
                store.conn.execute(f"PRAGMA max_page_count = {2**31}")  # space returns
            outcomes = store.ingest_group(group)  # the agents resend what was not acknowledged
            assert [o.stored for o in outcomes if isinstance(o, Ingested)] == [900] * 3
            store.flush(NOW + 20)
            snapshots.append(
                (
                    results_count(store.conn),
                    store.conn.execute(
                        "SELECT url_id, state, removal_first_removed_at, folded, memory"
                        " FROM url_state ORDER BY url_id"
                    ).fetchall(),
                )
            )
        finally:
            store.close()
    assert snapshots[0] == snapshots[1]
    assert snapshots[0][0] == 9 + 2700
    assert {row[1] for row in snapshots[0][1]} == {"removed"}


def test_integrity_is_known_only_once_checked(
    tmp_path: Path, table: PrefixTable, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PRAGMA quick_check reads the whole file (5 s at 2.3 GB), so opening the store never runs
    it; the store says whether a check is due (a new database, an unclean stop, or a clean stop
    of a store never checked) and a clean stop after a passed check makes it not due."""
    statements: list[str] = []
    connect = sqlite3.connect

    def traced(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        conn = connect(*args, **kwargs)
        conn.set_trace_callback(statements.append)
        return conn

    monkeypatch.setattr(sqlite3, "connect", traced)
    db = tmp_path / "c.db"

    def opened() -> Store:
        statements.clear()
        store = open_store(db, table)
        assert not any("quick_check" in s for s in statements)
        return store

    store = opened()
    assert store.unchecked  # a new database
    store.submit_reports([report("http://x.example/a")], NOW, PLANNER)
    store.close()
    store = opened()
    assert store.unchecked  # stopped cleanly, but never checked
    assert integrity_problem(db) is None
    store.unchecked = False  # as the collector records a passed check
    store.close()
    store = opened()
    assert not store.unchecked  # a clean stop of a checked database
    store.conn.close()  # SIGKILL
    store = opened()
    assert store.unchecked  # after a crash
    (url_id,) = store.conn.execute("SELECT id FROM urls").fetchone()
    agent = store.register_agent("a1", "net", "t", NOW)
    store.ingest(agent, [res(url_id, 1)], NOW)
    store.close()
    conn = connect_readonly(db)
    assert results_count(conn) == 1
    conn.close()


def test_a_damaged_database_is_named_and_then_takes_nothing(
    tmp_path: Path, table: PrefixTable
) -> None:
    """The integrity check names what is damaged; once told, the store refuses every report
    and result with that reason, and stores nothing."""
    db = tmp_path / "c.db"
    store = open_store(db, table)
    ids = [o.url_id for o in store.submit_reports(
        [report(f"http://x.example/{i}") for i in range(300)], NOW, PLANNER)]  # fmt: skip
    agent = store.register_agent("a1", "net", "t", NOW)
    store.ingest(agent, [res(u, u) for u in ids], NOW + 400)
    store.close()
    with sqlite3.connect(db) as conn:
        (root,) = conn.execute(
            "SELECT rootpage FROM sqlite_master WHERE type = 'table' AND name = 'results'"
        ).fetchone()
        (size,) = conn.execute("PRAGMA page_size").fetchone()
    with db.open("r+b") as f:  # scribble over the results table's root page: its B-tree
        f.seek(size * (root - 1))
        f.write(b"\xff" * 512)
    problem = integrity_problem(db)
    assert problem is not None and problem != "ok"
    store = open_store(db, table)
    try:
        store.refuse_writes(problem)
        with pytest.raises(CorruptDatabase, match="integrity check failed"):
            store.ingest(agent, [res(ids[0], 10_000)], NOW + 500)
        with pytest.raises(CorruptDatabase, match="integrity check failed"):
            store.submit_reports([report("http://x.example/new")], NOW, PLANNER)
        (outcome,) = store.ingest_group([(agent, [res(ids[0], 10_001)], NOW + 500, None)])
        assert isinstance(outcome, CorruptDatabase)
        (n,) = store.conn.execute("SELECT COUNT(*) FROM results WHERE seq >= 10000").fetchone()
        assert n == 0
    finally:
        store.close()


def test_outdated_counts_states_of_other_method_versions(
    tmp_path: Path, table: PrefixTable
) -> None:
    """What `serve` refolds at start: states folded by an earlier (or later) method version,
    or by none (''), counted through the index on url_state.method."""
    store = open_store(tmp_path / "c.db", table)
    try:
        store.submit_reports([report(f"http://x.example/{i}") for i in range(4)], NOW, PLANNER)
        assert store.outdated() == 0
        for url_id, method in ((1, "tm-2025.01"), (2, ""), (3, "tm-9999.99")):
            store.conn.execute("UPDATE url_state SET method = ? WHERE url_id = ?", (method, url_id))
        assert store.outdated() == 3
        plan = " ".join(
            str(row) for row in store.conn.execute(
                "EXPLAIN QUERY PLAN SELECT COUNT(*) FROM url_state WHERE method < ? OR method > ?",
                ("a", "a"),
            )
        )  # fmt: skip
        assert "url_state_method" in plan, plan
    finally:
        store.close()


@pytest.mark.parametrize("how", ["refold command", "late result"])
def test_results_after_a_refold_survive_a_crash_before_the_flush(
    tmp_path: Path, table: PrefixTable, how: str
) -> None:
    """A refold writes its URL's state and takes it off the unflushed list; results folded
    after it, before the next flush, must put it back, or a crash then leaves the URL's state
    as the refold wrote it and the restart does not know it is behind. Here the results after
    the refold confirm a removal: after the crash the URL is removed, as without the crash."""
    db = tmp_path / "c.db"
    store = Store(db, table, Policy(confirmations=2, min_vantage_points=1), flush_every=1e9)
    (url_id,) = [o.url_id for o in store.submit_reports([report("http://x.example/r")], NOW,
                                                         PLANNER)]  # fmt: skip
    a, b = (store.register_agent(name, name, "1", NOW) for name in ("a", "b"))
    store.ingest(a, [res(url_id, 10), res(url_id, 20)], NOW + 21)
    store.flush(NOW + 21)
    if how == "refold command":
        store.refold(now=NOW + 22)
    else:  # older than the fold's tail: refolded once REFOLD_DELAY has passed
        store.projection.retire([url_id])  # out of the cache: the tail starts at its state
        store.ingest(b, [res(url_id, 15, 404)], NOW + 22)  # b: never a witness
        assert store.projection.pending == 1
        store.refold_due(NOW + 22 + REFOLD_DELAY)
        assert store.projection.pending == 0
    store.ingest(a, [res(url_id, 30, 404), res(url_id, 40, 404)], NOW + 41)
    store.conn.close()  # SIGKILL before the next flush
    store = Store(db, table, Policy(confirmations=2, min_vantage_points=1), flush_every=1e9)
    try:
        conn = connect_readonly(db)
        try:
            (status,) = [s for s in url_statuses(conn) if s.url_id == url_id]
        finally:
            conn.close()
        assert status.state == "removed"
        assert status.removal_first_removed_at == NOW + 30
    finally:
        store.close()


def test_a_plan_gives_up_when_the_writer_is_stopping(tmp_path: Path, table: PrefixTable) -> None:
    """A stop must not wait for a replan of every URL: once `interrupted` says so, the plan
    changes nothing and says so in the log; the next plan does the work."""
    store = open_store(tmp_path / "c.db", table)
    try:
        ids = [o.url_id for o in store.submit_reports(
            [report(f"http://x.example/{i}") for i in range(3)], NOW, PLANNER)]  # fmt: skip
        intervals = "SELECT id, interval FROM urls ORDER BY id"
        before = store.conn.execute(intervals).fetchall()
        later = NOW + 30 * 86400  # a month on, every interval is another
        asked: list[int] = []

        def stopping_after(n: int) -> Callable[[], bool]:
            return lambda: asked.append(1) is None and len(asked) > n

        store.interrupted = stopping_after(1)  # stops inside the plan, after its first look
        assert store.plan(later, PLANNER) == ([], [])
        assert store.conn.execute(intervals).fetchall() == before
        store.interrupted = lambda: False
        changed, _ = store.plan(later, PLANNER)
        assert sorted(t.url_id for t in changed) == ids
        assert store.conn.execute(intervals).fetchall() != before
    finally:
        store.close()


def test_tails_beyond_the_cap_go_and_a_late_result_is_refolded(
    tmp_path: Path, table: PrefixTable
) -> None:
    """Only the most recently folded URLs keep a tail; one whose tail went takes a slightly
    late result through the refold from stored results, and ends as if it came in order."""
    policy = Policy(confirmations=2, min_vantage_points=1)
    stores = [Store(tmp_path / f"{name}.db", table, policy) for name in ("capped", "in-order")]
    try:
        for store in stores:
            store.submit_reports([report(f"http://x.example/{i}") for i in range(4)], NOW,
                                 PLANNER)  # fmt: skip
            for name in ("a", "b"):
                store.register_agent(name, name, "1", NOW)
        capped, in_order = stores
        capped.projection.tail_urls = 2
        capped.ingest(1, [res(1, 10)], NOW + 10)
        capped.ingest(2, [res(1, 30, 404)], NOW + 30)
        assert capped.projection.entries[1].tail is not None
        capped.ingest(1, [res(2, 31), res(3, 32), res(4, 33)], NOW + 33)  # URL 1's tail goes
        assert capped.projection.entries[1].tail is None
        capped.ingest(1, [res(1, 20, 404)], NOW + 34)  # before b's 404: the fold is past it
        assert capped.projection.pending == 1
        capped.refold_due(NOW + 34 + REFOLD_DELAY)
        assert capped.projection.pending == 0
        capped.ingest(1, [res(1, 40, 404)], NOW + 40)  # a's second 404 confirms

        in_order.ingest(1, [res(1, 10)], NOW + 10)
        in_order.ingest(1, [res(1, 20, 404)], NOW + 20)
        in_order.ingest(2, [res(1, 30, 404)], NOW + 30)
        in_order.ingest(1, [res(2, 31), res(3, 32), res(4, 33)], NOW + 33)
        in_order.ingest(1, [res(1, 40, 404)], NOW + 40)
        for store in stores:
            store.flush(NOW + 41)
        states = [
            [(s.url_id, s.state, s.removal_first_removed_at) for s in url_statuses(store.conn)]
            for store in stores
        ]
        assert states[0] == states[1]
        assert (1, "removed", NOW + 20) in states[0]
    finally:
        for store in stores:
            store.close()
