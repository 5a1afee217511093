"""The agent's outbox: numbering, batching, acknowledgement and redelivery."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from agent.outbox import Outbox
from agent.result import ProbeResult


def result(url_id: int = 1) -> ProbeResult:
    return ProbeResult(url_id=url_id, started_at=1.0, elapsed=0.1, status=200)


class TestOutbox:
    def test_sequence_numbers_increase(self) -> None:
        """Each result gets the next sequence number."""
        box = Outbox(first_seq=100)
        assert [box.add(result()).seq for _ in range(3)] == [100, 101, 102]

    def test_default_sequence_starts_from_the_clock(self) -> None:
        """Without a stored counter, numbering starts from the clock: restarts keep increasing."""
        first = Outbox().add(result()).seq
        assert Outbox().add(result()).seq > first

    def test_batches_hold_at_most_max_results(self) -> None:
        """take() cuts batches of the requested size, in order."""
        box = Outbox(first_seq=1)
        for _ in range(5):
            box.add(result())
        a, b, c = box.take(2), box.take(2), box.take(2)
        assert a and b and c
        assert [r.seq for r in a.results] == [1, 2]
        assert [r.seq for r in c.results] == [5]
        assert box.take(2) is None

    def test_ack_forgets_only_that_batch(self) -> None:
        """An acknowledged batch leaves; the others stay in flight."""
        box = Outbox(first_seq=1)
        for _ in range(4):
            box.add(result())
        a, b = box.take(2), box.take(2)
        assert a and b
        assert box.ack(a.batch_id) == 2
        assert box.ack(a.batch_id) == 0
        assert len(box) == 2 and box.inflight == 1

    def test_unacked_batches_are_resent_first_with_same_ids(self) -> None:
        """After a lost stream the same batches (same seqs) go out again before new results."""
        box = Outbox(first_seq=1)
        for _ in range(4):
            box.add(result())
        a, b = box.take(2), box.take(2)
        box.add(result())
        box.requeue()
        again = [box.take(10), box.take(10), box.take(10)]
        assert [x.batch_id for x in again if x] == [a.batch_id, b.batch_id, b.batch_id + 1]  # type: ignore[union-attr]
        assert [r.seq for r in again[2].results] == [5]  # type: ignore[union-attr]

    def test_full_outbox_drops_oldest_pending_and_counts(self) -> None:
        """Past its limit the outbox drops the oldest pending result and counts the drop."""
        box = Outbox(limit=3, first_seq=1)
        for _ in range(5):
            box.add(result())
        assert box.dropped == 2
        batch = box.take(10)
        assert batch and [r.seq for r in batch.results] == [3, 4, 5]

    @given(st.lists(st.sampled_from(["add", "take", "ack", "requeue"]), max_size=80))
    def test_every_result_is_acked_exactly_once_or_still_held(self, ops: list[str]) -> None:
        """Across any interleaving, each result is acknowledged at most once and none vanish."""
        box = Outbox(first_seq=1)
        added: set[int] = set()
        acked: list[int] = []
        inflight: dict[int, tuple[int, ...]] = {}
        for op in ops:
            if op == "add":
                added.add(box.add(result()).seq)
            elif op == "take":
                batch = box.take(3)
                if batch:
                    inflight[batch.batch_id] = tuple(r.seq for r in batch.results)
            elif op == "ack" and inflight:
                batch_id = min(inflight)
                box.ack(batch_id)
                acked.extend(inflight.pop(batch_id))
            elif op == "requeue":
                box.requeue()
                inflight.clear()
        assert len(acked) == len(set(acked))
        assert len(box) + len(acked) == len(added)
