"""Tests for agent.schedule: due times, jitter, catch-up and lazy deletion, in simulated time."""

from __future__ import annotations

import itertools
import math
import random
import tracemalloc

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from agent.schedule import Schedule

EPS = 1e-9


def _schedule(jitter: float = 0.1, first_spread: float = 60.0, seed: int = 1) -> Schedule:
    return Schedule(random.Random(seed), jitter=jitter, first_spread=first_spread)


def _run(schedule: Schedule, start: float, end: float, step: float) -> dict[int, list[float]]:
    """Call pop_due every step seconds and record when each id was returned."""
    returned: dict[int, list[float]] = {}
    for tick in range(math.ceil((end - start) / step) + 1):
        now = start + tick * step
        for url_id in schedule.pop_due(now):
            returned.setdefault(url_id, []).append(now)
    return returned


class TestFirstDue:
    def test_spread_within_first_spread(self) -> None:
        """A big assignment is spread over [now, now + first_spread], not fired at once."""
        schedule = _schedule(first_spread=60.0)
        for url_id in range(1000):
            schedule.set(url_id, 3600.0, now=1000.0)
        first_due = schedule.next_due()
        assert first_due is not None
        assert first_due >= 1000.0
        first_half = schedule.pop_due(1030.0)
        second_half = schedule.pop_due(1060.0)
        assert 300 < len(first_half) < 700
        assert sorted(first_half + second_half) == list(range(1000))
        assert schedule.pop_due(1060.0 + EPS) == []

    def test_all_first_probes_in_window(self) -> None:
        """Every new URL is first due within min(interval, first_spread) of being set."""
        schedule = _schedule(first_spread=60.0)
        for url_id in range(500):
            schedule.set(url_id, 10.0 if url_id % 2 else 3600.0, now=0.0)
        early = set(schedule.pop_due(10.0))
        assert early >= set(range(1, 500, 2))
        assert early | set(schedule.pop_due(60.0)) == set(range(500))

    def test_zero_first_spread_is_immediate(self) -> None:
        """With first_spread 0 a new URL is due at once."""
        schedule = _schedule(first_spread=0.0)
        schedule.set(7, 3600.0, now=5.0)
        assert schedule.next_due() == 5.0
        assert schedule.pop_due(5.0) == [7]


class TestPopDue:
    def test_earliest_first(self) -> None:
        """Due ids come out in due-time order, not insertion order."""
        schedule = _schedule(first_spread=0.0)
        order = list(range(50))
        random.Random(3).shuffle(order)
        for url_id in order:
            schedule.set(url_id, 3600.0, now=float(url_id))
        assert schedule.pop_due(100.0) == list(range(50))

    def test_interval_respected_within_jitter(self) -> None:
        """Over many rounds each gap is interval x (1 +/- jitter) and the mean does not drift."""
        schedule = _schedule(jitter=0.1, first_spread=10.0)
        for url_id in range(200):
            schedule.set(url_id, 10.0, now=0.0)
        step = 0.25
        returned = _run(schedule, 0.0, 2000.0, step)
        gaps = [b - a for times in returned.values() for a, b in itertools.pairwise(times)]
        assert len(returned) == 200
        assert min(gaps) >= 9.0 - EPS
        assert max(gaps) <= 11.0 + step + EPS
        assert abs(sum(gaps) / len(gaps) - 10.0) < 0.2

    def test_jitter_desynchronises(self) -> None:
        """URLs that start at the same instant drift apart instead of firing together forever."""
        schedule = _schedule(jitter=0.1, first_spread=0.0)
        for url_id in range(100):
            schedule.set(url_id, 60.0, now=0.0)
        _run(schedule, 0.0, 3000.0, 0.5)
        dues: list[float] = []
        while (due := schedule.next_due()) is not None and len(dues) < 100:
            dues.append(due)
            schedule.remove(schedule.pop_due(due, limit=1)[0])
        assert max(dues) - min(dues) > 30.0

    def test_no_jitter_is_exact(self) -> None:
        """With jitter 0 an on-time agent sees exactly the interval."""
        schedule = _schedule(jitter=0.0, first_spread=0.0)
        schedule.set(1, 5.0, now=0.0)
        assert _run(schedule, 0.0, 20.0, 1.0) == {1: [0.0, 5.0, 10.0, 15.0, 20.0]}

    def test_fallen_behind_does_not_burst(self) -> None:
        """An agent that missed many intervals probes each URL once, then waits an interval."""
        schedule = _schedule(jitter=0.1, first_spread=60.0)
        for url_id in range(100):
            schedule.set(url_id, 60.0, now=0.0)
        late = 10_000.0
        assert sorted(schedule.pop_due(late)) == list(range(100))
        assert schedule.pop_due(late + 60.0 * 0.9 - EPS) == []
        assert sorted(schedule.pop_due(late + 60.0 * 1.1)) == list(range(100))

    def test_limit_respected(self) -> None:
        """At most limit ids are returned, the rest stay due for the next call."""
        schedule = _schedule(first_spread=0.0)
        for url_id in range(10):
            schedule.set(url_id, 3600.0, now=float(url_id))
        assert schedule.pop_due(100.0, limit=0) == []
        assert schedule.pop_due(100.0, limit=4) == [0, 1, 2, 3]
        assert schedule.pop_due(100.0, limit=4) == [4, 5, 6, 7]
        assert schedule.pop_due(100.0) == [8, 9]
        with pytest.raises(ValueError, match="limit"):
            schedule.pop_due(100.0, limit=-1)

    def test_nothing_due(self) -> None:
        """Before the first due time nothing is returned; an empty schedule has no next due."""
        schedule = _schedule(first_spread=0.0)
        assert schedule.next_due() is None
        assert schedule.pop_due(0.0) == []
        schedule.set(1, 10.0, now=100.0)
        assert schedule.pop_due(99.0) == []


class TestMembership:
    def test_removed_never_returned(self) -> None:
        """A removed id is never returned, and removing an unknown id is fine."""
        schedule = _schedule(first_spread=10.0)
        for url_id in range(100):
            schedule.set(url_id, 10.0, now=0.0)
        for url_id in range(0, 100, 2):
            schedule.remove(url_id)
        schedule.remove(12345)
        returned = _run(schedule, 0.0, 100.0, 0.5)
        assert set(returned) == set(range(1, 100, 2))
        assert len(schedule) == 50
        assert 0 not in schedule
        assert 1 in schedule

    def test_readd_after_remove(self) -> None:
        """An id removed and set again is scheduled once, with its new interval."""
        schedule = _schedule(jitter=0.0, first_spread=0.0)
        schedule.set(1, 10.0, now=0.0)
        schedule.remove(1)
        schedule.set(1, 20.0, now=0.0)
        assert _run(schedule, 0.0, 40.0, 1.0) == {1: [0.0, 20.0, 40.0]}

    def test_accessors_and_clear(self) -> None:
        """len, in, interval and ids reflect the live set; clear empties it."""
        schedule = _schedule()
        schedule.set(1, 10.0, now=0.0)
        schedule.set(2, 20, now=0.0)
        assert schedule.interval(2) == 20.0
        assert schedule.interval(3) is None
        for url_id in schedule.ids():
            schedule.remove(url_id)
        assert len(schedule) == 0
        schedule.set(4, 1.0, now=0.0)
        schedule.clear()
        assert (len(schedule), schedule.next_due(), schedule.heap_size) == (0, None, 0)

    @pytest.mark.parametrize("interval", [0.0, -1.0, math.nan, math.inf])
    def test_bad_interval(self, interval: float) -> None:
        """Intervals must be positive and finite."""
        with pytest.raises(ValueError, match="interval"):
            _schedule().set(1, interval, now=0.0)

    @pytest.mark.parametrize("jitter", [-0.1, 1.0, math.nan])
    def test_bad_jitter(self, jitter: float) -> None:
        """Jitter must be in [0, 1) so a next due time is always in the future."""
        with pytest.raises(ValueError, match="jitter"):
            _schedule(jitter=jitter)


class TestIntervalChange:
    def test_shorter_interval_takes_effect_now(self) -> None:
        """Shortening an interval makes the URL due within the new interval, not the old."""
        schedule = _schedule(jitter=0.1, first_spread=0.0)
        schedule.set(1, 3600.0, now=0.0)
        assert schedule.pop_due(0.0) == [1]
        schedule.set(1, 60.0, now=100.0)
        assert schedule.interval(1) == 60.0
        returned = _run(schedule, 100.0, 400.0, 1.0)[1]
        assert 100.0 + 54.0 <= returned[0] <= 100.0 + 66.0 + 1.0
        assert all(54.0 - EPS <= b - a <= 67.0 for a, b in itertools.pairwise(returned))

    def test_longer_interval_keeps_current_due(self) -> None:
        """Lengthening an interval does not postpone the probe already due."""
        schedule = _schedule(jitter=0.0, first_spread=0.0)
        schedule.set(1, 60.0, now=0.0)
        assert schedule.pop_due(0.0) == [1]
        schedule.set(1, 3600.0, now=10.0)
        assert schedule.next_due() == 60.0
        assert schedule.pop_due(60.0) == [1]
        assert schedule.next_due() == 3660.0

    def test_same_interval_is_a_no_op(self) -> None:
        """Re-assigning a URL with its current interval leaves its due time alone."""
        schedule = _schedule()
        schedule.set(1, 60.0, now=0.0)
        before = schedule.next_due()
        schedule.set(1, 60.0, now=30.0)
        assert (schedule.next_due(), schedule.heap_size) == (before, 1)


class TestCompaction:
    def test_heap_bounded_after_mass_remove(self) -> None:
        """Removing most URLs shrinks the heap to about twice the live set."""
        schedule = _schedule()
        for url_id in range(10_000):
            schedule.set(url_id, 60.0, now=0.0)
        for url_id in range(9_900):
            schedule.remove(url_id)
        assert schedule.heap_size <= 2 * len(schedule) + 64
        assert sorted(_run(schedule, 0.0, 60.0, 1.0)) == list(range(9_900, 10_000))

    def test_heap_bounded_under_interval_flapping(self) -> None:
        """Changing intervals over and over does not grow the heap without bound."""
        schedule = _schedule()
        for url_id in range(10):
            schedule.set(url_id, 60.0, now=0.0)
        for round_ in range(1000):
            for url_id in range(10):
                schedule.set(url_id, 30.0 if round_ % 2 else 60.0, now=float(round_))
            assert schedule.heap_size <= 2 * len(schedule) + 64
        assert sorted(schedule.pop_due(2000.0)) == list(range(10))


class TestWheel:
    def test_earliest_first_across_buckets(self) -> None:
        """Popping one at a time yields due times in order, and next_due names each one."""
        schedule = _schedule(first_spread=30.0)
        for url_id in range(2000):
            schedule.set(url_id, 100.0, now=0.0)
        seen: list[float] = []
        while (due := schedule.next_due()) is not None and due <= 30.0:
            assert schedule.pop_due(due, limit=1) != []
            seen.append(due)
        assert len(seen) == 2000 and seen == sorted(seen)

    def test_a_url_due_sooner_than_the_loaded_bucket_comes_first(self) -> None:
        """After the ready heap was loaded far ahead, a URL due earlier is still earliest."""
        schedule = _schedule(jitter=0.0, first_spread=0.0)
        schedule.set(1, 3600.0, now=0.0)
        assert schedule.pop_due(0.0) == [1]
        assert schedule.next_due() == 3600.0  # the bucket of 3600 s is loaded now
        schedule.set(2, 10.0, now=5.0)
        assert schedule.next_due() == 5.0
        assert schedule.pop_due(3600.0) == [2, 1]

    def test_urls_cost_no_object_each(self) -> None:
        """Per URL the schedule holds array cells, not Python objects (< 48 bytes each)."""
        schedule = _schedule()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for url_id in range(1, 100_001):
                schedule.set(url_id, 300.0, now=0.0)
            assert schedule.next_due() is not None
            used = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        assert used / 100_000 < 48, f"{used / 100_000:.0f} bytes per URL"

    def test_far_due_times_share_buckets(self) -> None:
        """URLs due over a month take a few far buckets, not one bucket each."""
        schedule = _schedule(first_spread=30 * 86400.0)
        for url_id in range(10_000):
            schedule.set(url_id, 30 * 86400.0, now=0.0)
        assert len(schedule._far.buckets) + len(schedule._near.buckets) < 2600
        seen = []
        for _ in range(50):
            due = schedule.next_due()
            assert due is not None
            seen.append(due)
            schedule.pop_due(due, limit=1)
        assert seen == sorted(seen)

    def test_bad_resolution(self) -> None:
        """A wheel bucket must have a positive, finite width."""
        with pytest.raises(ValueError, match="resolution"):
            Schedule(random.Random(1), resolution=0.0)


JITTER = 0.1
SPREAD = 5.0


class ScheduleMachine(RuleBasedStateMachine):
    """Random set/remove/pop_due sequences against a model of deadlines per id."""

    resolution = 1.0  # everything in the near wheel

    def __init__(self) -> None:
        super().__init__()
        self.schedule = Schedule(
            random.Random(0), jitter=JITTER, first_spread=SPREAD, resolution=self.resolution
        )
        self.now = 0.0
        self.intervals: dict[int, float] = {}
        self.earliest: dict[int, float] = {}
        self.deadline: dict[int, float] = {}

    @rule(url_id=st.integers(0, 15), interval=st.sampled_from([0.5, 1.0, 3.0, 10.0, 40.0]))
    def set(self, url_id: int, interval: float) -> None:
        old = self.intervals.get(url_id)
        if old is None:
            self.earliest[url_id] = self.now
            self.deadline[url_id] = self.now + min(interval, SPREAD)
        elif old != interval:
            low, high = self.now + interval * (1 - JITTER), self.now + interval * (1 + JITTER)
            self.earliest[url_id] = min(self.earliest[url_id], low)
            self.deadline[url_id] = min(self.deadline[url_id], high)
        self.intervals[url_id] = interval
        self.schedule.set(url_id, interval, self.now)

    @rule(url_id=st.integers(0, 15))
    def remove(self, url_id: int) -> None:
        self.intervals.pop(url_id, None)
        self.schedule.remove(url_id)

    @rule(dt=st.floats(0.0, 2.0))
    def advance_and_pop(self, dt: float) -> None:
        self.now += dt
        overdue = {i for i in self.intervals if self.deadline[i] <= self.now - EPS}
        first = self.schedule.next_due()
        returned = self.schedule.pop_due(self.now)
        assert bool(returned) == (first is not None and first <= self.now)
        assert len(returned) == len(set(returned))
        assert set(returned) <= set(self.intervals)
        assert overdue <= set(returned)
        for url_id in returned:
            assert self.now >= self.earliest[url_id] - EPS
            interval = self.intervals[url_id]
            self.earliest[url_id] = self.now + interval * (1 - JITTER)
            self.deadline[url_id] = self.now + interval * (1 + JITTER)

    @invariant()
    def matches_model(self) -> None:
        assert len(self.schedule) == len(self.intervals)
        assert sorted(self.schedule.ids()) == sorted(self.intervals)
        assert all(self.schedule.interval(i) == v for i, v in self.intervals.items())
        assert self.schedule.heap_size <= 2 * len(self.schedule) + 64


TestScheduleMachine = ScheduleMachine.TestCase


class FineWheelMachine(ScheduleMachine):
    """The same with 10 ms near buckets: far buckets of 10.24 s, cascaded all the time."""

    resolution = 0.01


TestFineWheelMachine = FineWheelMachine.TestCase
