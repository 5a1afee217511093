"""StateCollector on a real SQLite file: scan at every scrape, or serve a scan up to max_age old."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.registry import Collector

from collector.attribution import PrefixTable
from collector.method import UrlState
from collector.metrics import StateCollector
from collector.store import Store, reads
from tests.test_store import NOW, PLANNER, open_store, report, res, table  # noqa: F401


class FakeMonotonic:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def states(registry: CollectorRegistry) -> dict[str, float]:
    """takedown_urls for provider Example, by state, as a scrape shows it."""
    return {
        s.labels["state"]: s.value
        for family in registry.collect()
        if family.name == "takedown_urls"
        for s in family.samples
        if s.labels["provider"] == "Example"
    }


def connected(registry: CollectorRegistry) -> dict[str, float]:
    return {
        s.labels["agent"]: s.value
        for family in registry.collect()
        if family.name == "takedown_agent_connected"
        for s in family.samples
    }


@pytest.fixture
def store(tmp_path: Path, table: PrefixTable) -> Store:  # noqa: F811
    s = open_store(tmp_path / "c.db", table)
    yield s  # type: ignore[misc]
    s.close()


def build(store: Store, max_age: float, live: set[int]) -> tuple[CollectorRegistry, FakeMonotonic]:
    clock = FakeMonotonic()
    registry = CollectorRegistry()
    registry.register(
        StateCollector(
            store.path,
            lambda: {a: ("a1", "net") for a in live},
            clock=lambda: NOW,
            max_age=max_age,
            monotonic=clock,
        )
    )
    return registry, clock


def test_without_max_age_every_scrape_scans(store: Store) -> None:
    """max_age 0: a change committed between two scrapes shows in the second."""
    url_id = store.submit_reports([report("http://x.example/a")], NOW, PLANNER)[0].url_id
    agent = store.register_agent("a1", "net", "t", NOW)
    registry, _ = build(store, 0.0, set())
    store.ingest(agent, [res(url_id, 1)], NOW)
    assert states(registry)["available"] == 1
    store.ingest(agent, [res(url_id, 2, 404), res(url_id, 3, 404)], NOW)
    assert states(registry)["removed"] == 1 and states(registry)["available"] == 0


def test_kept_scan_is_served_then_refreshed_in_the_background(store: Store) -> None:
    """Younger than max_age/2: the kept figures; older: the kept figures and a background scan
    whose result the next scrape shows; older than max_age: a scan before answering. Agent
    health is live throughout."""
    url_id = store.submit_reports([report("http://x.example/a")], NOW, PLANNER)[0].url_id
    agent = store.register_agent("a1", "net", "t", NOW)
    store.ingest(agent, [res(url_id, 1)], NOW)
    live: set[int] = set()
    registry, clock = build(store, 10.0, live)
    assert states(registry)["available"] == 1 and connected(registry) == {"a1": 0}

    store.ingest(agent, [res(url_id, 2, 404), res(url_id, 3, 404)], NOW)
    live.add(agent)
    clock.now += 4  # under half the age: kept figures, no scan
    assert states(registry)["available"] == 1
    assert connected(registry) == {"a1": 1}  # read live

    clock.now += 2  # over half: still the kept figures, a scan starts in the background
    assert states(registry)["available"] == 1
    deadline = time.monotonic() + 10
    while states(registry).get("removed") != 1:
        assert time.monotonic() < deadline, "the background scan never landed"
        time.sleep(0.01)

    store.ingest(agent, [res(url_id, 4)], NOW)  # back online
    clock.now += 10.5  # past max_age: a scan before answering
    assert states(registry) == {"pending": 0, "available": 1, "geoblocked": 0, "removed": 0}


def test_scrapes_racing_a_background_scan_start_no_other(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While one background scan runs, further scrapes past half the age serve the kept
    figures and start no second scan."""
    store.submit_reports([report("http://x.example/a")], NOW, PLANNER)
    clock = FakeMonotonic()
    state = StateCollector(store.path, dict, clock=lambda: NOW, max_age=10.0, monotonic=clock)
    first = state.figures()  # the first scan, in the scrape
    real = reads.provider_figures
    calls: list[int] = []
    release = threading.Event()

    def held(*args: Any) -> Any:
        calls.append(1)
        release.wait(10)
        return real(*args)

    monkeypatch.setattr(reads, "provider_figures", held)
    clock.now += 6
    for _ in range(20):
        assert state.figures() is first
    release.set()
    deadline = time.monotonic() + 10
    while not calls or state._scanning.locked():
        assert time.monotonic() < deadline, "the background scan never ended"
        time.sleep(0.01)
    assert len(calls) == 1
    assert state.figures() is not first  # the background scan's figures are served now


def test_prerendered_text_is_the_exposition_and_kept_fresh_without_scrapes(store: Store) -> None:
    """As the server runs it: the provider families are rendered once per scan, byte for byte
    what the registry would render; a refresher thread replaces the scan while nobody scrapes,
    so a scrape finds new figures without waiting for a scan."""
    url_id = store.submit_reports([report("http://x.example/a")], NOW, PLANNER)[0].url_id
    agent = store.register_agent("a1", "net", "t", NOW)
    store.ingest(agent, [res(url_id, 1)], NOW)
    plain = StateCollector(store.path, dict, clock=lambda: NOW)
    reference = CollectorRegistry()
    reference.register(plain)
    state = StateCollector(store.path, dict, clock=lambda: NOW, max_age=0.2, prerendered=True)
    registry = CollectorRegistry()
    registry.register(state)
    assert "takedown_urls" not in generate_latest(registry).decode()
    assert "takedown_agent_connected" in generate_latest(registry).decode()

    def providers(text: bytes) -> list[str]:
        return sorted(line for line in text.decode().splitlines() if "provider=" in line)

    first = state.provider_text()
    assert providers(first) == providers(generate_latest(reference))
    assert 'takedown_urls{provider="Example",state="available"} 1.0' in first.decode()

    stop = threading.Event()
    refresher = threading.Thread(target=state.refresh_forever, args=(stop,), daemon=True)
    refresher.start()
    try:
        store.ingest(agent, [res(url_id, 2, 404), res(url_id, 3, 404)], NOW)
        kept = state._kept
        deadline = time.monotonic() + 10
        while state._kept is kept:  # no scrape meanwhile: only the refresher scans
            assert time.monotonic() < deadline, "the refresher never replaced the scan"
            stop.wait(0.02)
        text = state.provider_text()
        assert 'takedown_urls{provider="Example",state="removed"} 1.0' in text.decode()
        assert providers(text) == providers(generate_latest(reference))
    finally:
        stop.set()
        refresher.join(10)
    assert not refresher.is_alive()


def test_provider_text_is_byte_for_byte_what_prometheus_client_writes(tmp_path: Path) -> None:
    """The hand-written exposition of the provider families equals generate_latest's for the
    same figures: awkward provider names (quotes, backslashes, newlines, non-ASCII), large
    counts, histograms, providers without removals."""
    names = ["Plain", 'Quote "q"', "Back\\slash", "New\nline", "Ünïcödé 株式会社", ""]
    buckets = [60.0, 3600.0, 86400.0]
    figures = [
        reads.ProviderFigures(
            provider=name,
            states={s.value: (i + 1) * 1_234_567 if s.value == "removed" else i for s in UrlState},
            overdue={d: i * 3 for d in (3600.0, 43200.0, 86400.0)},
            order_overdue=i,
            reappearances=2**40 if i == 1 else i,
            stale=i % 2,
            latency=None if i % 3 == 0 else ([i, 2 * i, 3 * i], 4 * i, 1e7 / (i + 1)),
        )
        for i, name in enumerate(names)
    ]
    state = StateCollector(tmp_path / "unused.db", dict, buckets=buckets, prerendered=True)
    fast = state._render(figures)

    class Families(Collector):
        def collect(self) -> Any:
            yield from state._urls(figures)
            yield from state._latency(figures)

    reference = CollectorRegistry(auto_describe=False)
    reference.register(Families())
    assert fast == generate_latest(reference)
    assert fast.count(b"\n") == 97  # 12 HELP and TYPE lines, 85 samples


@pytest.mark.integration
async def test_no_scrape_waits_for_a_scan_not_even_the_first_after_a_start(
    tmp_path: Path, prefixes: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real collector opens /metrics only once its refresher's first scan has landed (held
    back here), so the first scrape is served from it: a scrape that had to scan would fail."""
    import asyncio
    import dataclasses

    import aiohttp

    from collector.server import Collector
    from tests.conftest import collector_config

    config = dataclasses.replace(collector_config(tmp_path, prefixes), metrics_max_age=10.0)
    store = open_store(config.db, PrefixTable.from_csv(prefixes))
    store.submit_reports([report("http://a.example/1"), report("http://a.example/2")], NOW, PLANNER)
    store.close()
    scan_may_end = threading.Event()
    real_figures = reads.provider_figures

    def held_figures(*args: Any, **kwargs: Any) -> Any:
        assert scan_may_end.wait(30)
        return real_figures(*args, **kwargs)

    monkeypatch.setattr(reads, "provider_figures", held_figures)
    collector = Collector(config)
    starting = asyncio.ensure_future(collector.start())
    try:
        deadline = time.monotonic() + 30
        while collector._planning is None:  # serving gRPC, the first scan held back
            assert time.monotonic() < deadline and not starting.done()
            await asyncio.sleep(0.01)
        # However long the scan takes, start() waits for it before it opens /metrics.
        done, _ = await asyncio.wait({starting}, timeout=1.0)
        assert not done and collector.metrics_port == 0
        scan_may_end.set()
        await asyncio.wait_for(starting, 30)
        assert collector.state is not None

        def no_scan() -> Any:
            raise AssertionError("a scrape waited for a scan")

        collector.state.scan = no_scan  # type: ignore[method-assign]
        url = f"http://127.0.0.1:{collector.metrics_port}/metrics"
        async with aiohttp.ClientSession() as session, session.get(url) as response:
            assert response.status == 200
            text = await response.text()
        pending = [line for line in text.splitlines() if line.startswith("takedown_urls{")
                   and 'state="pending"' in line]  # fmt: skip
        assert pending and sum(float(line.rsplit(" ", 1)[1]) for line in pending) == 2
    finally:
        scan_may_end.set()
        if not starting.done():
            await asyncio.wait_for(starting, 30)
        await collector.stop(grace=1)
