"""The store's incremental fold equals a refold from its stored results, however batches arrive."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import random
import sqlite3
import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from collector.attribution import PrefixTable
from collector.method import Policy
from collector.projection import REFOLD_DELAY
from collector.reports_file import ReportIn
from collector.schedule import Planner
from collector.store import ResultIn, Store

T0 = 1_800_000_000.0
PLANNER = Planner.fixed(10.0)
CONTENT = hashlib.sha256(b"content").digest()
OTHER = hashlib.sha256(b"suspended").digest()
PEERS = ("192.0.2.1", "198.51.100.1")


def table(tmp: Path) -> PrefixTable:
    path = tmp / "prefixes.csv"
    path.write_text("prefix,asn,provider\n192.0.2.0/24,64500,One\n198.51.100.0/24,64501,Two\n")
    return PrefixTable.from_csv(path)


def snapshot(db: Path) -> tuple[list[tuple[object, ...]], ...]:
    conn = sqlite3.connect(db)
    try:
        return (
            conn.execute(
                "SELECT url_id, state, episode, last_present_at, removal_last_present_at,"
                " removal_first_removed_at, removal_confirmed_at, reappearances, first_provider,"
                " live_until, last_conclusive_at FROM url_state ORDER BY url_id"
            ).fetchall(),
            conn.execute("SELECT * FROM episodes ORDER BY url_id, episode").fetchall(),
            conn.execute(
                "SELECT url_id, at, kind, detail FROM url_events ORDER BY url_id, at, kind, detail"
            ).fetchall(),
        )
    finally:
        conn.close()


@st.composite
def deliveries(draw: st.DrawFn) -> tuple[list[tuple[int, list[ResultIn]]], int]:
    """Three agents' results on two URLs, cut into batches, some delivered twice: shuffled,
    or in about the order they were probed (agents a few seconds apart), as when all is well."""
    rng = random.Random(draw(st.integers(0, 2**32)))
    removed_at = {1: draw(st.sampled_from([200.0, 400.0, None])), 2: 300.0}
    blocked = draw(st.sampled_from([set(), {1}]))
    batches: list[tuple[int, list[ResultIn]]] = []
    for agent in (1, 2, 3):
        start = draw(st.sampled_from([0.0, 50.0, 150.0]))
        stop = draw(st.sampled_from([600.0, 250.0]))
        out: list[ResultIn] = []
        seq = 0
        t = start + agent
        while t < stop:
            for url_id in (1, 2):
                seq += 1
                gone = removed_at[url_id] is not None and t >= removed_at[url_id]  # type: ignore[operator]
                if agent in blocked:
                    status, sha = 451, b""
                elif gone:
                    status, sha = (200, OTHER) if url_id == 2 else (404, b"")
                else:
                    status, sha = 200, CONTENT
                if rng.random() < 0.1:
                    status, sha = 503, b""
                out.append(ResultIn(url_id, seq, t + rng.random(), 0.01, status, "http://x/a",
                                    sha, 7, False, PEERS[url_id - 1], "none", 0))  # fmt: skip
            t += 10.0
        size = draw(st.integers(1, 8))
        batches += [(agent, out[i : i + size]) for i in range(0, len(out), size)]
    if draw(st.booleans()):
        rng.shuffle(batches)
    else:
        # Each agent delivers in its own order (its seqs rising), some seconds behind. A
        # batch's first probe was made in the step floor(started_at); the sort is stable.
        delay = {agent: rng.uniform(0.0, 20.0) for agent in (1, 2, 3)}
        batches.sort(key=lambda b: math.floor(b[1][0].started_at) + delay[b[0]])
    again = draw(st.integers(0, 3))
    batches += rng.sample(batches, min(again, len(batches)))
    return batches, draw(st.integers(1, 3))


class TestStoreReplay:
    @settings(max_examples=40, deadline=None)
    @given(deliveries(), st.sampled_from([None, 0, 1, 2, 3, 5, 8, 13]))
    def test_incremental_equals_refold(
        self, case: tuple[list[tuple[int, list[ResultIn]]], int], flush: int | None
    ) -> None:
        """Batches in any order, some twice, a small cache: the stored verdicts equal a refold.
        With `flush`, states are written behind and flushed every `flush` batches (0: once,
        at the start), so late URLs refold from those checkpoints where they can."""
        batches, cache = case
        with tempfile.TemporaryDirectory() as tmp:
            db = Path(tmp) / "c.db"
            store = Store(db, table(Path(tmp)), Policy(), cache_urls=cache, planner=PLANNER,
                          flush_every=0.0 if flush is None else 1e9)  # fmt: skip
            try:
                ids = {a: store.register_agent(f"a{a}", f"n{a}", "t", T0) for a in (1, 2, 3)}
                reports = [ReportIn("http://x/a", T0, None, "r1"),
                           ReportIn("http://x/b", T0, None, "r2")]  # fmt: skip
                store.submit_reports(reports, T0, PLANNER)
                for n, (agent, batch) in enumerate(batches):
                    if flush is not None and (n == 0 if flush == 0 else n % flush == 0):
                        store.flush(T0 + 1000)
                    # Refolds come due as they do between batches (REFOLD_DELAY).
                    store.ingest(ids[agent], [_shift(r) for r in batch], T0 + 1000 + 3 * n)
                store.refold_due(T0 + 10_000, limited=False)  # every refold owed (replans do)
                store.flush(T0 + 10_000)
                incremental = snapshot(db)
                changes = store.refold(now=T0 + 2000)
            finally:
                store.close()
            assert all(before is after for _, before, after in changes)
            assert snapshot(db) == incremental


def _shift(r: ResultIn) -> ResultIn:
    return dataclasses.replace(r, started_at=T0 + r.started_at)


class TestWriteBehind:
    @settings(max_examples=25, deadline=None)
    @given(deliveries(), st.integers(0, 10_000), st.integers(0, 10_000))
    def test_crash_before_a_flush_loses_no_verdict(
        self, case: tuple[list[tuple[int, list[ResultIn]]], int], cut: int, flush: int
    ) -> None:
        """States written behind (flushed once, at some point), the process gone later: after
        a restart (which resumes the unflushed URLs from their checkpoints, or refolds them)
        and the rest of the batches, the verdicts equal those of a store that wrote every
        state with its batch."""
        batches, cache = case
        cut %= len(batches) + 1
        flush %= len(batches) + 1
        reports = [ReportIn("http://x/a", T0, None, "r1"), ReportIn("http://x/b", T0, None, "r2")]
        with tempfile.TemporaryDirectory() as tmp:
            snapshots = []
            for flush_every, crash_at in ((0.0, None), (1e9, cut)):
                db = Path(tmp) / f"c-{flush_every}.db"

                def open_store(db: Path = db, flush_every: float = flush_every) -> Store:
                    return Store(db, table(Path(tmp)), Policy(), cache_urls=cache,
                                 planner=PLANNER, flush_every=flush_every)  # fmt: skip

                store = open_store()
                ids = {a: store.register_agent(f"a{a}", f"n{a}", "t", T0) for a in (1, 2, 3)}
                store.submit_reports(reports, T0, PLANNER)
                for n, (agent, batch) in enumerate(batches):
                    if crash_at is not None and n == flush:
                        store.flush(T0 + 1000)  # a checkpoint the restart may resume from
                    if n == crash_at:
                        store.conn.close()  # SIGKILL: no flush, no refold, memory gone
                        store = open_store()
                    # Time passes as batches arrive, so late results' refolds come due
                    # between them (and before the crash), as in a running collector.
                    now = T0 + 1000 + n * REFOLD_DELAY
                    store.ingest(ids[agent], [_shift(r) for r in batch], now)
                store.close()  # refolds what is due and flushes
                snapshots.append(snapshot(db))
            assert snapshots[1] == snapshots[0]
