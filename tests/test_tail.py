"""The fold's tail (collector.fold.Tail): results in any arrival order give the fold of their
event order, and results in order are each folded once."""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given, note, settings
from hypothesis import strategies as st

from collector.attribution import PrefixTable
from collector.fold import (
    TAIL_CUT,
    TAIL_LENGTH,
    Event,
    Method,
    Notice,
    Observation,
    OutOfOrder,
    Tail,
    UrlFold,
    event_order,
    refold,
)
from collector.method import Policy, UrlState
from collector.reports_file import ReportIn
from collector.schedule import Planner
from collector.store import ResultIn, Store
from collector.store.codec import dump_fold

INTERVAL = 10.0
PLANNER = Planner.fixed(INTERVAL)
CONTENT = hashlib.sha256(b"content").digest()
OTHER = hashlib.sha256(b"this file has been removed").digest()
URL = "http://host.example/file"
NOTICE = Notice(0.0)
NETWORKS = 2


def planned(now: float, s: UrlState, o: float, d: float | None, r: float | None) -> float:
    return PLANNER.interval(now, s, o, d, r) or PLANNER.watch_interval


METHOD = Method(Policy(), planned)


def observations(rng: random.Random) -> list[Observation]:
    """Four agents probing about every INTERVAL, in event order: the content present, then
    removed, back and removed again (each agent seeing a change a step or two apart from the
    others), with timeouts, other bodies, one agent sometimes blocked, and agents probing at
    the same instant."""
    changes = sorted(rng.sample(range(3, 40), 3))
    blocked = rng.random() < 0.3
    out: list[Observation] = []
    seqs = [0] * 4
    for step in range(rng.randint(8, 40)):
        for agent in range(4):
            if rng.random() < 0.2:
                continue
            at = step * INTERVAL + rng.choice([0.0, 0.0, 1.0, 2.5])
            removed = sum(step >= c + rng.randint(0, 1) for c in changes) % 2
            roll = rng.random()
            status, sha, error = 200, CONTENT, "none"
            if roll < 0.1:
                status, sha, error = 0, b"", "read_timeout"
            elif blocked and agent == 3:
                status, sha = 451, b""
            elif removed:
                status, sha = (404, b"") if roll < 0.8 else (200, OTHER)
            seqs[agent] += 1
            out.append(Observation(agent, f"n{agent}", at, status, error, sha, URL,
                                   seq=seqs[agent], provider=f"p{agent % 2}"))  # fmt: skip
    return sorted(out, key=event_order)


def arrivals(rng: random.Random, obs: list[Observation], lateness: int) -> list[list[Observation]]:
    """`obs` each delivered up to `lateness` places late, in batches of one to four."""
    order = sorted(range(len(obs)), key=lambda i: i + rng.randint(0, lateness))
    batches: list[list[Observation]] = []
    while order:
        size = rng.randint(1, 4)
        batches.append([obs[i] for i in order[:size]])
        del order[:size]
    return batches


def assert_consistent(tail: Tail) -> None:
    """`head`, `events` and the snapshot are what folding the kept observations onto `base`
    gives."""
    kept = tail.observations
    assert kept == sorted(kept, key=event_order)
    assert not kept or tail.base.newest_key <= event_order(kept[0])
    fold, events = tail.base.clone(), []
    for i, o in enumerate(kept, start=1):
        events += fold.observe(o, NETWORKS)
        if i == TAIL_CUT:
            assert tail.mid is not None and tail.mid_events == len(events)
            assert dump_fold(tail.mid) == dump_fold(fold)
    assert (tail.mid is None) == (len(kept) < TAIL_CUT)
    assert tail.events == events
    assert dump_fold(tail.head) == dump_fold(fold)


def through_a_tail(
    batches: list[list[Observation]], check: Callable[[Tail], None]
) -> tuple[UrlFold, list[Event], int]:
    """Deliver `batches` as the projection does: into the tail, trimmed after each batch once
    its events are written; a URL with a result older than the tail is refolded from every
    result stored. The head, the events written (as the history holds them) and how many
    refolds there were."""
    tail = Tail.of(UrlFold.start(NOTICE, METHOD))
    written: list[Event] = []  # the events before tail.base
    stored: list[Observation] = []
    refolds = 0
    for batch in batches:
        late = False
        for obs in batch:
            stored.append(obs)
            if late:
                continue
            try:
                tail.add(obs, NETWORKS)
            except OutOfOrder:
                late = True
            check(tail)
        if late:
            fold, written = refold([NOTICE], stored, METHOD, lambda _: NETWORKS)
            tail, refolds = Tail.of(fold), refolds + 1
            continue
        before = list(tail.events)
        tail.trim(NETWORKS)
        check(tail)
        written += before[: len(before) - len(tail.events)]
    return tail.head, written + tail.events, refolds


def result(url_id: int, seq: int, at: float, status: int) -> ResultIn:
    return ResultIn(url_id=url_id, seq=seq, started_at=at, elapsed=0.01, status=status,
                    final_url=URL, sha256=CONTENT if status == 200 else b"", body_bytes=7,
                    truncated=False, peer_ip="192.0.2.1", error="none", redirects=0)  # fmt: skip


@pytest.fixture
def observe_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """How often UrlFold.observe runs from here on (a one-element list, counting)."""
    calls = [0]
    real = UrlFold.observe

    def counted(fold: UrlFold, obs: Observation, networks: int) -> list[Event]:
        calls[0] += 1
        return real(fold, obs, networks)

    monkeypatch.setattr(UrlFold, "observe", counted)
    yield calls


class TestTail:
    @settings(max_examples=120, deadline=None)
    @given(st.randoms(use_true_random=False), st.integers(0, 12))
    def test_any_arrival_order_gives_the_fold_in_event_order(
        self, rng: random.Random, lateness: int
    ) -> None:
        """Results a little late (inserted within the tail), trimmed between batches, or older
        than it (a refold): the tail's events and final state are those of folding every result
        in event order, and at every step it holds what folding its observations onto its base
        gives."""
        obs = observations(rng)
        batches = arrivals(rng, obs, lateness)
        note(f"{len(obs)} results in {len(batches)} batches, up to {lateness} places late")
        whole, expected = refold([NOTICE], obs, METHOD, lambda _: NETWORKS)
        head, events, refolds = through_a_tail(batches, assert_consistent)
        note(f"{refolds} refolds")
        assert events == expected
        assert dump_fold(head) == dump_fold(whole)

    def test_a_trim_within_a_tie_keeps_the_events_of_the_results_kept(self) -> None:
        """Two agents' results at one instant, on each side of a trim's cut: the events of the
        one kept (a provider change, at the base's own time) stay the tail's, so a result
        inserted afterwards does not give them twice (a filter on the base's time dropped
        them, and the refold after the insertion gave them again)."""
        ats = [10.0 * i for i in range(TAIL_CUT)] + [10.0 * i for i in range(TAIL_CUT - 1, 15)]
        obs = [Observation(i % 2 + 1, f"n{i % 2 + 1}", at, 200, "none", CONTENT, URL, seq=i + 1,
                           provider=f"p{i % 2}") for i, at in enumerate(ats)]  # fmt: skip
        assert obs[TAIL_CUT].at == obs[TAIL_CUT - 1].at
        first = TAIL_LENGTH + 1  # then a trim cuts at TAIL_CUT
        batches = [[o] for o in obs[:first]]
        batches += [[obs[first + 1]], [obs[first]], *[[o] for o in obs[first + 2 :]]]
        whole, expected = refold([NOTICE], obs, METHOD, lambda _: NETWORKS)
        head, events, refolds = through_a_tail(batches, assert_consistent)
        assert refolds == 0 and events == expected
        assert dump_fold(head) == dump_fold(whole)

    def test_results_in_order_are_each_folded_once(self, observe_calls: list[int]) -> None:
        """One result per batch, in event order, trimmed after each: one observe per result."""
        obs = observations(random.Random(7))
        assert len(obs) > 4 * TAIL_CUT
        whole, expected = refold([NOTICE], obs, METHOD, lambda _: NETWORKS)
        observe_calls[0] = 0
        head, events, refolds = through_a_tail([[o] for o in obs], lambda _: None)
        assert observe_calls[0] == len(obs)
        assert refolds == 0 and events == expected
        assert dump_fold(head) == dump_fold(whole)

    def test_a_result_inserted_after_the_snapshot_refolds_from_it(
        self, observe_calls: list[int]
    ) -> None:
        """A result a little late, behind the snapshot: only the kept results after the
        snapshot are folded again."""
        obs = observations(random.Random(3))[: TAIL_CUT + 4]
        late = obs.pop(TAIL_CUT + 1)
        tail = Tail.of(UrlFold.start(NOTICE, METHOD))
        for o in obs:
            tail.add(o, NETWORKS)
        observe_calls[0] = 0
        tail.add(late, NETWORKS)
        assert observe_calls[0] == len(tail.observations) - TAIL_CUT
        assert_consistent(tail)
        whole, expected = refold([NOTICE], [*obs, late], METHOD, lambda _: NETWORKS)
        assert tail.events == expected and dump_fold(tail.head) == dump_fold(whole)

    def test_a_tail_made_with_observations_trims_by_folding_them(self) -> None:
        """Without a snapshot (a tail built holding observations) a trim folds the older ones
        into the base."""
        obs = observations(random.Random(5))[: TAIL_CUT + 6]
        head, events = refold([NOTICE], obs, METHOD, lambda _: NETWORKS)
        tail = Tail(UrlFold.start(NOTICE, METHOD), head, list(obs), list(events))
        tail.trim(NETWORKS)
        assert len(tail.observations) == TAIL_CUT - 1 and tail.mid is None
        assert_consistent(tail)


class TestThroughTheStore:
    def test_results_in_order_are_each_folded_once(
        self, tmp_path: Path, observe_calls: list[int]
    ) -> None:
        """Three agents' batches on twenty URLs, in event order, through Store.ingest (the
        projection trims each touched tail after its batch): one observe per result."""
        prefixes = tmp_path / "prefixes.csv"
        prefixes.write_text("prefix,asn,provider\n192.0.2.0/24,64500,Example\n")
        store = Store(tmp_path / "c.db", PrefixTable.from_csv(prefixes), Policy())
        now = time.time()
        reports = [ReportIn(url=f"http://x.example/{i}", notified_at=now - 60, received_at=None,
                            reference=None) for i in range(20)]  # fmt: skip
        urls = [s.url_id for s in store.submit_reports(reports, now, PLANNER)]
        agents = [store.register_agent(f"a{i}", f"net{i}", "t", now) for i in range(3)]
        results = 0
        observe_calls[0] = 0
        for step in range(12):
            for i, agent in enumerate(agents):
                at = now + step * INTERVAL + i
                batch = [
                    result(u, step * len(urls) + k + 1, at + k * 0.01, 200 if step < 6 else 404)
                    for k, u in enumerate(urls)
                ]
                store.ingest(agent, batch, at + 1)
                results += len(batch)
        states = {store.projection.entries[u].fold.state for u in urls}
        store.close()
        assert observe_calls[0] == results
        assert states == {UrlState.REMOVED}
