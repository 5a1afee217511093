"""Assignment reconcile: the agent's holder and the collector's bucket diff agree."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.assignment import Assignment, AssignmentChange
from collector.service import reconcile
from collector.store import Target
from protos.takedown.v1.assignment import BUCKETS

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
