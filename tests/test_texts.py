"""Compacting the URL texts of an agent without --state-dir, in steps (agent/texts.py).

A compaction copies every live text into a new file: over a second for a million URLs.
`TempTexts(compact_in_steps=True)` does it a few pages of ids per `compact_step`, and the
agent runs the steps on its event loop, so everything else keeps running meanwhile; the
store answers every read and takes every change while it compacts.
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent.assignment import AssignmentChange
from agent.main import Agent, AgentConfig
from agent.probe import ProbeConfig
from agent.texts import COMPACT_STEP_PAGES, TempTexts, TextsError
from demo.hoster import Hoster
from tests.conftest import eventually, scrape

LOOPBACK = "127.0.0.1"
MONTH = 30 * 86400.0


def open_files_in(directory: Path) -> int:
    """This process's open files in `directory` (its texts' files have no name there)."""
    count = 0
    for fd in Path("/proc/self/fd").iterdir():
        try:
            if str(fd.readlink()).startswith(f"{directory}/"):
                count += 1
        except OSError:  # closed meanwhile
            continue
    return count


Upsert = list[tuple[int, str, float]]


def churn(rng: random.Random, model: dict[int, str], round_: int) -> tuple[Upsert, list[int]]:
    """One assignment change: new ids (some on new pages), new texts for held ids, removals."""
    upsert = []
    for u in rng.sample(range(1, 3_000), 400):
        url = f"http://h{u % 13}.example/{round_}/{u}/" + "ü" * rng.randrange(3)
        upsert.append((u, url, 300.0))
    remove = rng.sample(sorted(model), min(len(model), 100)) if model else []
    return upsert, remove


def apply(model: dict[int, str], upsert: Upsert, remove: list[int]) -> None:
    for u in remove:
        model.pop(u, None)
    for u, url, _ in upsert:
        model[u] = url


class TestSteppedCompaction:
    def test_every_text_reads_back_at_every_step(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Changes (new ids, new texts, removals) arrive between the steps of compactions:
        after each change and each step every id reads back its latest text; many
        compactions start, run over several steps each and end with the old file closed."""
        monkeypatch.setattr("agent.texts._MIN_GARBAGE_BEFORE_COMPACT", 4096)
        rng = random.Random(7)
        model: dict[int, str] = {}
        files = []  # the current file of each compaction (of the store's generations)
        checked_while_compacting = 0

        def check() -> None:
            nonlocal checked_while_compacting
            assert {u: texts.url(u) for u in model} == model
            assert open_files_in(tmp_path) == (2 if texts.compacting else 1)
            checked_while_compacting += texts.compacting
            if texts._file is not files[-1]:
                files.append(texts._file)

        with TempTexts(tmp_path, compact_in_steps=True) as texts:
            files.append(texts._file)
            for round_ in range(80):
                upsert, remove = churn(rng, model, round_)
                texts.record_assignment(upsert, remove)
                apply(model, upsert, remove)
                check()
                for _ in range(rng.randrange(4)):  # a few steps, then the next change
                    texts.compact_step(pages=1)
                    check()
            while texts.compact_step(pages=1):
                check()
            check()
            assert not texts.compacting and len(texts) == len(model)
            assert texts.url(3_001) is None
            live = sum(len(url.encode()) for url in model.values())
            assert texts.nbytes <= 2 * live + 4096, "the garbage was compacted"
        assert len(files) > 5 and checked_while_compacting > 50, (files, checked_while_compacting)
        assert open_files_in(tmp_path) == 0 and list(tmp_path.iterdir()) == []

    def test_driven_to_the_end_it_is_the_compaction_done_at_once(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The same changes into a store compacting at once and one compacting in steps
        finished after each change: the same texts in files of the same size."""
        monkeypatch.setattr("agent.texts._MIN_GARBAGE_BEFORE_COMPACT", 4096)
        rng = random.Random(8)
        model: dict[int, str] = {}
        with TempTexts(tmp_path) as at_once, TempTexts(tmp_path, compact_in_steps=True) as steps:
            for round_ in range(30):
                upsert, remove = churn(rng, model, round_)
                apply(model, upsert, remove)
                at_once.record_assignment(upsert, remove)
                steps.record_assignment(upsert, remove)
                assert not at_once.compacting
                while steps.compact_step(pages=2):
                    pass
                assert steps.nbytes == at_once.nbytes
            assert {u: steps.url(u) for u in model} == {u: at_once.url(u) for u in model} == model

    def test_closing_while_compacting_frees_both_files(self, tmp_path: Path) -> None:
        texts = TempTexts(tmp_path, compact_in_steps=True)
        urls = [(u, f"http://h.example/{u:07d}/{'x' * 70}", 5.0) for u in range(30_000)]
        texts.record_assignment(urls, [])
        texts.record_assignment([(u, url[:-1], 5.0) for u, url, _ in urls], [])
        assert texts.compacting and open_files_in(tmp_path) == 2
        assert texts.compact_step() and texts.url(29_999) == urls[-1][1][:-1]
        texts.close()
        assert open_files_in(tmp_path) == 0
        with pytest.raises(TextsError, match="closed"):
            texts.compact_step()


class Ticker:
    """Counts its turns on the event loop and the longest time between two of them."""

    def __init__(self) -> None:
        self.turns = 0
        self.longest = 0.0
        self.stop = False
        self._last: float | None = None

    def reset(self) -> None:
        """Count from the next turn on."""
        self.turns, self.longest, self._last = 0, 0.0, None

    async def run(self) -> None:
        while not self.stop:
            await asyncio.sleep(0)
            now = time.perf_counter()
            if self._last is not None:
                self.turns += 1
                self.longest = max(self.longest, now - self._last)
            self._last = now


@pytest.fixture
async def site() -> AsyncIterator[Hoster]:
    hoster = Hoster()
    await hoster.start([LOOPBACK])
    for i in range(20):
        hoster.add(f"/page/{i}")
    yield hoster
    await hoster.stop()


@pytest.mark.integration
@pytest.mark.slow
async def test_the_agent_keeps_probing_while_its_texts_compact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, site: Hoster
) -> None:
    """An agent without --state-dir holding 300,000 URLs gets new texts for all of them: the
    compaction this starts runs in steps on the agent's loop. While it runs, the agent probes
    (a loopback hoster every 0.1 s), answers /metrics and reads every text right; no turn of
    the loop waits for more than a fifth of the compaction (in one piece, it is all of it)."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)  # gettempdir() reads TMPDIR again
    steps = 0
    step = TempTexts.compact_step

    def counted(texts: TempTexts, pages: int = COMPACT_STEP_PAGES) -> bool:
        nonlocal steps
        steps += 1
        return step(texts, pages)

    monkeypatch.setattr(TempTexts, "compact_step", counted)
    config = AgentConfig(
        collector=f"{LOOPBACK}:1",  # nothing listens there: the link retries meanwhile
        name="compacting",
        network="n",
        probe=ProbeConfig(total_timeout=5, connect_timeout=2, read_timeout=3),
        allow_private=(ipaddress.ip_network(f"{LOOPBACK}/32"),),
        first_spread=MONTH,  # the 300,000 come due over a month: hardly any in this test
        jitter=0.0,
        metrics_listen=f"{LOOPBACK}:0",
        drain_timeout=0.0,  # at the stop, no collector will ever take the results: don't wait
    )
    agent = Agent(config, rng=random.Random(5))
    texts = agent.texts
    assert texts is not None and texts.compact_in_steps
    base = f"http://{LOOPBACK}:{site.port}"
    pages = tuple((i, f"{base}/page/{i}", 0.1) for i in range(20))
    many = tuple((i, f"{base}/held/{i:09d}/a-path-of-some-length/x.jpg", MONTH)
                 for i in range(1_000, 301_000))  # fmt: skip
    stop = asyncio.Event()
    run = asyncio.create_task(agent.run(stop))
    ticker = Ticker()
    ticking = asyncio.create_task(ticker.run())
    try:
        agent._assign(AssignmentChange(upsert=pages + many))  # as the link hands it over
        await eventually(lambda: agent.probed >= 20 and agent.metrics_port > 0, 30, "probes")
        assert not texts.compacting and steps == 0

        renamed = tuple((i, url.replace("/held/", "/k/"), MONTH) for i, url, _ in many)
        agent._assign(AssignmentChange(upsert=renamed))  # every text replaced by a shorter one
        assert texts.compacting, "the compaction is started, not done, by the change"
        started, probed = time.perf_counter(), agent.probed
        ticker.reset()
        scrapes = reads = probed_meanwhile = 0
        rng = random.Random(6)
        async with asyncio.timeout(120):
            while texts.compacting:
                samples = await scrape(agent.metrics_port)
                if texts.compacting:  # answered, and the compaction still runs
                    scrapes += 1
                    probed_meanwhile = agent.probed - probed
                assert samples["takedown_agent_assigned_urls"][0].value == 300_020
                for i, url, _ in rng.sample(renamed, 50):
                    assert agent.assignment.url(i) == url
                reads += 50
        took = time.perf_counter() - started
        turns, longest = ticker.turns, ticker.longest
        assert steps >= 100, f"{steps} steps: not a large compaction"
        assert probed_meanwhile >= 1, f"no probe in {took:.2f} s of compaction"
        assert scrapes >= 1, "/metrics answered no scrape while compacting"
        assert turns >= steps // 2, f"the loop turned {turns} times in {steps} steps"
        assert longest < took / 5, f"a turn waited {longest:.3f} s of {took:.3f} s"
        assert agent._fatal is None and run.done() is False
        assert all(agent.assignment.url(i) == url for i, url, _ in renamed)
        assert all(agent.assignment.url(i) == url for i, url, _ in pages)
        assert open_files_in(tmp_path) == 1 and list(tmp_path.iterdir()) == []
        print(
            f"compaction {took:.2f} s, {steps} steps; meanwhile {probed_meanwhile} probes,"
            f" {scrapes} scrapes, {reads} reads; longest turn {longest * 1000:.1f} ms"
        )
    finally:
        ticker.stop = True
        await ticking
        stop.set()
        await asyncio.wait_for(run, 30)
    assert open_files_in(tmp_path) == 0
