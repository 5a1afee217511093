"""Assignment reconcile: the agent's holder and the collector's bucket diff agree."""

from __future__ import annotations

import sqlite3

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.assignment import Assignment, AssignmentChange
from client.digests import BUCKETS
from collector.service import (
    ASSIGNMENT_CHUNK,
    assignment_updates,
    bucket_updates,
    differing_buckets,
    reconcile,
)
from collector.store import Target
from collector.store.reads import active_intervals, targets_by_bucket

entries = st.dictionaries(
    st.integers(min_value=1, max_value=5 * BUCKETS),
    st.sampled_from([1.0, 5.0, 300.0, 900.0]),
    max_size=300,
)


def change_of(update: object) -> AssignmentChange:
    return AssignmentChange(
        upsert=tuple((t.url_id, t.url, t.interval_ms / 1000) for t in update.upsert),  # type: ignore[attr-defined]
        remove=tuple(update.remove),  # type: ignore[attr-defined]
        replace_buckets=tuple(update.replace_buckets),  # type: ignore[attr-defined]
        in_sync=update.in_sync,  # type: ignore[attr-defined]
    )


def holding(items: dict[int, float]) -> Assignment:
    a = Assignment()
    a.apply(AssignmentChange(upsert=tuple((u, f"http://x/{u}", i) for u, i in items.items())))
    return a


class TestAssignment:
    def test_upsert_remove_and_stop(self) -> None:
        """Upserts schedule, an unchanged upsert does nothing, removes stop."""
        a = holding({1: 5.0, 2: 5.0})
        applied = a.apply(
            AssignmentChange(upsert=((1, "http://x/1", 5.0), (2, "http://x/2", 9.0)), remove=(3,))
        )
        assert applied.schedule == ((2, 9.0),)
        assert applied.stop == ()
        assert a.apply(AssignmentChange(remove=(1,))).stop == (1,)
        assert a.url(1) is None and a.url(2) == "http://x/2"

    def test_replace_bucket_drops_what_is_not_listed(self) -> None:
        """A replaced bucket keeps exactly the URLs listed for it; other buckets are untouched."""
        a = holding({1: 5.0, 1 + BUCKETS: 5.0, 2: 5.0})
        applied = a.apply(AssignmentChange(upsert=((1, "http://x/1", 5.0),), replace_buckets=(1,)))
        assert applied.stop == (1 + BUCKETS,)
        assert set(a.ids()) == {1, 2}

    def test_empty_assignment_sends_no_digests(self) -> None:
        """An agent holding nothing sends an empty digest list."""
        assert Assignment().digest_list() == []
        assert len(holding({7: 1.0}).digest_list()) == BUCKETS


class TestReconcile:
    @given(entries, entries)
    @settings(max_examples=150)
    def test_reconcile_brings_any_agent_to_the_target_set(
        self, agent_has: dict[int, float], collector_has: dict[int, float]
    ) -> None:
        """Whatever the agent held, after the reconcile updates it holds exactly our set."""
        agent = holding(agent_has)
        targets = [Target(u, f"http://x/{u}", i) for u, i in sorted(collector_has.items())]
        updates = list(reconcile(targets, agent.digest_list()))
        assert updates[-1].in_sync
        for update in updates:
            agent.apply(change_of(update))
        assert agent.urls == {u: (f"http://x/{u}", i) for u, i in collector_has.items()}

    @given(entries)
    @settings(max_examples=50)
    def test_in_sync_agent_gets_nothing(self, items: dict[int, float]) -> None:
        """Identical sets produce a single empty in_sync update."""
        targets = [Target(u, f"http://x/{u}", i) for u, i in items.items()]
        (update,) = reconcile(targets, holding(items).digest_list())
        assert update.in_sync and not update.upsert and not update.replace_buckets


def url_table(
    items: dict[int, float], inactive: frozenset[int] = frozenset()
) -> sqlite3.Connection:
    """The columns of `urls` the assignment reads, in an in-memory database."""
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE urls (id INTEGER PRIMARY KEY, url TEXT, interval REAL, active INT)")
    conn.executemany(
        "INSERT INTO urls VALUES (?, ?, ?, ?)",
        [(u, f"http://x/{u}", i, int(u not in inactive)) for u, i in items.items()],
    )
    conn.commit()
    return conn


class TestStreamedReconcile:
    @given(entries, entries, st.frozensets(st.integers(min_value=1, max_value=5 * BUCKETS)))
    @settings(max_examples=100)
    def test_database_path_equals_reconcile(
        self, agent_has: dict[int, float], rows: dict[int, float], inactive: frozenset[int]
    ) -> None:
        """Digests over (id, interval) rows, then only the differing buckets' rows in bucket
        order (or every row, for an agent holding nothing), give exactly the updates of the
        in-memory reconcile of the active URLs."""
        conn = url_table(rows, inactive)
        theirs = holding(agent_has).digest_list()
        streamed = list(assignment_updates(conn, theirs))
        active = [Target(u, f"http://x/{u}", i) for u, i in rows.items() if u not in inactive]
        assert streamed == list(reconcile(active, theirs))

    def test_updates_are_cut_at_bucket_boundaries(self) -> None:
        """A fresh agent gets every bucket; no bucket is split between updates, and an update
        grows past ASSIGNMENT_CHUNK by at most one bucket."""
        rows = {u: 60.0 for u in range(1, 6 * ASSIGNMENT_CHUNK)}
        conn = url_table(rows)
        differ = differing_buckets(active_intervals(conn), [])
        assert differ == list(range(BUCKETS))
        updates = list(bucket_updates(targets_by_bucket(conn, differ, BUCKETS), differ))
        seen: dict[int, int] = {}
        for n, update in enumerate(updates):
            assert len(update.upsert) < ASSIGNMENT_CHUNK + len(rows) // BUCKETS + 1
            for t in update.upsert:
                assert seen.setdefault(t.url_id % BUCKETS, n) == n  # one update per bucket
        assert len(seen) == BUCKETS and sum(len(u.upsert) for u in updates) == len(rows)
        assert updates[-1].in_sync and not any(u.in_sync for u in updates[:-1])

    def test_targets_out_of_bucket_order_are_an_error(self) -> None:
        """bucket_updates refuses input that is not grouped as promised instead of losing it."""
        targets = [Target(2, "http://x/2", 1.0), Target(1, "http://x/1", 1.0)]
        with pytest.raises(ValueError, match="not in a differing bucket"):
            list(bucket_updates(targets, [1, 2]))
