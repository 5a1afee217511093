"""Tests for the per-host queues: pure, against a plain reference model, plus hand-made cases."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from agent.hosts import BUSY, FULL, Histogram, HostQueues, host_of

HOSTS = ("a", "b", "c")


class TestHostQueues:
    def test_one_slow_host_never_takes_the_others_slots(self) -> None:
        """With host a at its limit, b's probes start in the free global slots."""
        q = HostQueues(per_host=2, backlog=100)
        for i in range(50):
            q.offer("a", i, 0.0)
        q.offer("b", 100, 0.5)
        q.offer("b", 101, 0.5)
        starts = q.take(1.0, 10)
        assert [(s.host, s.url_id) for s in starts] == [("a", 0), ("a", 1), ("b", 100), ("b", 101)]
        assert (q.running, q.waiting, q.startable) == (4, 48, 0)

    def test_oldest_offer_first_across_hosts(self) -> None:
        """Probes start in the order they were offered when every host has room."""
        q = HostQueues(per_host=4, backlog=10)
        for i, host in enumerate("abcab"):
            q.offer(host, i, float(i))
        assert [s.url_id for s in q.take(10.0, 3)] == [0, 1, 2]
        assert [(s.url_id, s.waited) for s in q.take(10.0, 3)] == [(3, 7.0), (4, 6.0)]

    def test_full_backlog_refuses_and_counts(self) -> None:
        """Past the backlog bound an offer is refused and counted as full."""
        q = HostQueues(per_host=1, backlog=2)
        assert [q.offer("a", i, 0.0) for i in range(4)] == [True, True, False, False]
        assert q.dropped == {FULL: 2, BUSY: 0}

    def test_url_waiting_or_running_is_busy(self) -> None:
        """A URL due again while its probe waits or runs is refused as busy."""
        q = HostQueues(per_host=1, backlog=5)
        q.offer("a", 1, 0.0)
        assert not q.offer("a", 1, 1.0)
        [start] = q.take(1.0, 1)
        assert not q.offer("a", 1, 2.0)
        q.done("a", start.url_id)
        assert q.offer("a", 1, 3.0)
        assert q.dropped == {FULL: 0, BUSY: 2}

    def test_done_frees_the_slot_and_says_so(self) -> None:
        """Finishing a probe at a host with a backlog makes its next probe startable."""
        q = HostQueues(per_host=1, backlog=5)
        q.offer("a", 1, 0.0)
        q.offer("a", 2, 0.0)
        [first] = q.take(0.0, 5)
        assert q.take(0.0, 5) == []
        assert q.done("a", first.url_id) is True
        assert [s.url_id for s in q.take(1.0, 5)] == [2]
        assert q.done("a", 2) is False
        assert len(q) == 0  # idle hosts are forgotten

    def test_done_without_take_is_an_error(self) -> None:
        """Returning a slot that was never taken is a bug, not silently ignored."""
        with pytest.raises(KeyError):
            HostQueues(1, 1).done("a", 1)

    def test_limits_must_be_positive(self) -> None:
        """A host limit or backlog of zero would never start anything."""
        with pytest.raises(ValueError):
            HostQueues(0, 1)


class TestHostOf:
    @pytest.mark.parametrize(
        ("url", "host"),
        [
            ("http://Example.COM/a", "example.com"),
            ("https://user:pw@example.com:8443/x?y#z", "example.com"),
            ("http://127.0.0.12:8080/", "127.0.0.12"),
            ("http://[::1]:80/", "::1"),
            ("not a url", ""),
            ("http://[::1/", ""),
        ],
    )
    def test_host(self, url: str, host: str) -> None:
        """The host is the lowercased name without user, port or path."""
        assert host_of(url) == host

    @given(st.text(max_size=60))
    def test_never_raises(self, text: str) -> None:
        """Any text gives a string, so a malformed URL cannot break the loop."""
        assert isinstance(host_of(text), str)


class TestHistogram:
    def test_cumulative_buckets(self) -> None:
        """Buckets are cumulative and end with +Inf holding every observation."""
        h = Histogram((1.0, 2.0))
        for v in (0.5, 1.0, 1.5, 9.0):
            h.observe(v)
        assert h.buckets() == [("1.0", 2), ("2.0", 3), ("+Inf", 4)]
        assert (h.count, h.sum) == (4, 12.0)

    def test_bounds_checked(self) -> None:
        """Unsorted bounds are refused."""
        with pytest.raises(ValueError):
            Histogram((2.0, 1.0))


class HostQueuesMachine(RuleBasedStateMachine):
    """HostQueues against a list-based reference that scans everything on every step."""

    def __init__(self) -> None:
        super().__init__()
        self.per_host = 2
        self.backlog = 3
        self.q = HostQueues(self.per_host, self.backlog)
        self.waiting: list[tuple[int, str, int, float]] = []  # (order, host, url_id, offered_at)
        self.running: list[tuple[str, int]] = []
        self.order = 0
        self.now = 0.0
        self.dropped = {FULL: 0, BUSY: 0}

    def _running_at(self, host: str) -> int:
        return sum(1 for h, _ in self.running if h == host)

    def _expected_startable(self) -> int:
        return sum(
            min(
                sum(1 for w in self.waiting if w[1] == host),
                self.per_host - self._running_at(host),
            )
            for host in HOSTS
        )

    @rule(host=st.sampled_from(HOSTS), url_id=st.integers(0, 6))
    def offer(self, host: str, url_id: int) -> None:
        busy = any(w[1] == host and w[2] == url_id for w in self.waiting) or (
            (host, url_id) in self.running
        )
        full = sum(1 for w in self.waiting if w[1] == host) >= self.backlog
        accepted = self.q.offer(host, url_id, self.now)
        assert accepted == (not busy and not full)
        if busy:
            self.dropped[BUSY] += 1
        elif full:
            self.dropped[FULL] += 1
        else:
            self.waiting.append((self.order, host, url_id, self.now))
            self.order += 1

    @rule(limit=st.integers(0, 5), later=st.floats(0, 10))
    def take(self, limit: int, later: float) -> None:
        self.now += later
        expected = []
        while len(expected) < limit:
            candidates = [w for w in self.waiting if self._running_at(w[1]) < self.per_host]
            if not candidates:
                break
            first = min(candidates)
            self.waiting.remove(first)
            self.running.append((first[1], first[2]))
            expected.append((first[2], first[1], self.now - first[3]))
        got = [(s.url_id, s.host, s.waited) for s in self.q.take(self.now, limit)]
        assert [g[:2] for g in got] == [e[:2] for e in expected]
        assert [g[2] for g in got] == pytest.approx([e[2] for e in expected])

    @precondition(lambda self: bool(self.running))
    @rule(index=st.integers(0, 100))
    def done(self, index: int) -> None:
        before = self._expected_startable()
        host, url_id = self.running.pop(index % len(self.running))
        gained = self.q.done(host, url_id)
        assert gained == (self._expected_startable() > before)

    @invariant()
    def counts_agree(self) -> None:
        assert self.q.startable == self._expected_startable()
        assert (self.q.running, self.q.waiting) == (len(self.running), len(self.waiting))
        assert self.q.dropped == self.dropped
        for host in HOSTS:
            assert self._running_at(host) <= self.per_host
        assert len(self.q) == len({w[1] for w in self.waiting} | {h for h, _ in self.running})


TestHostQueuesModel = HostQueuesMachine.TestCase
TestHostQueuesModel.settings = settings(max_examples=100, stateful_step_count=30, deadline=None)
