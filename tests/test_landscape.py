"""Issue 11 on real processes: agents that start apart, die and join late; verdicts vs the truth.

The collector and four agents run as the installed programs (tests/procs.py); the hoster
(demo/hoster.py) runs in the test's loop on 127.0.0.10 and records when each page changed (the
truth). Agent 1 starts first and is blocked (451) from two pages; agents 2 and 3 start seconds
later; agent 3 is SIGKILLed before the removals; agent 4 joins after them. Every verdict is held
against the hoster's truth: no removal the hoster did not make, no invented reappearance, every
removal dated within one probe interval (plus jitter) after the truth, and the stored verdicts
equal to `takedown-collector refold` of the stored results.
"""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from collector.importer import import_file
from demo.hoster import Fate, Hoster
from tests.conftest import HOST_A
from tests.procs import (
    Procs,
    agent_argv,
    collector_argv,
    free_port,
    metrics,
    readonly,
    refold_unchanged,
    states,
    until,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

INTERVAL = 1.0
JITTER = 0.1
SLACK = 0.5  # an agent stamps a probe before it waits for a free connection (issue 12)
SOURCES = {"agent-1": "127.0.0.2", "agent-2": "127.0.0.3", "agent-3": "127.0.0.4",
           "agent-4": "127.0.0.5"}  # fmt: skip
PAGES = {
    "/blocked-first": "online, blocked (451) for agent-1, the first agent to start",
    "/blocked-then-404": "blocked for agent-1, then removed (404) for everyone",
    "/dynamic-replaced": "a page that changes on every load, replaced by a stable 200 page",
    "/removed-after-kill": "removed (410) after agent-3 was killed",
    "/online": "never removed",
}
BLOCKED = {"/blocked-first", "/blocked-then-404"}
REMOVE = {
    "/blocked-then-404": Fate.GONE_404,
    "/dynamic-replaced": Fate.REPLACED,
    "/removed-after-kill": Fate.GONE_410,
}


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    registry = Procs(tmp_path)
    yield registry
    registry.close()


def verdicts(db: Path) -> dict[str, tuple[object, ...]]:
    with readonly(db) as conn:
        rows = conn.execute(
            "SELECT u.url, s.state, s.episode, s.reappearances, s.removal_last_present_at,"
            " s.removal_first_removed_at, s.removal_observed_present"
            " FROM urls u JOIN url_state s ON s.url_id = u.id"
        ).fetchall()
    return {url.split("/", 3)[3]: tuple(rest) for url, *rest in rows}


def history(db: Path) -> list[tuple[object, ...]]:
    with readonly(db) as conn:
        return conn.execute(
            "SELECT url_id, at, kind, detail FROM url_events ORDER BY url_id, at, kind, detail"
        ).fetchall()


def removal_kinds(db: Path) -> dict[str, list[str]]:
    with readonly(db) as conn:
        rows = conn.execute(
            "SELECT u.url, e.kind FROM url_events e JOIN urls u ON u.id = e.url_id"
            " WHERE e.kind IN ('removal', 'reappearance') ORDER BY e.at"
        ).fetchall()
    out: dict[str, list[str]] = {}
    for url, kind in rows:
        out.setdefault(url.split("/", 3)[3], []).append(kind)
    return out


async def test_verdicts_hold_against_the_hosters_truth(tmp_path: Path, procs: Procs) -> None:
    """Staggered, killed and late agents on real processes: every verdict matches the truth."""
    hoster = Hoster()
    for path in PAGES:
        hoster.add(path, blocked_for=[SOURCES["agent-1"]] if path in BLOCKED else [])
    hoster.set_fate("/dynamic-replaced", Fate.DYNAMIC)
    port = await hoster.start([HOST_A])
    db = tmp_path / "collector.db"
    target = f"127.0.0.1:{free_port()}"
    metrics_port = free_port()
    collector = procs.add(
        "collector",
        collector_argv(db, target, f"127.0.0.1:{metrics_port}", probe_interval=f"{INTERVAL}s"),
    )
    agents = {
        name: procs.add(
            name,
            agent_argv(
                target, name, source, tmp_path / name, free_port(), extra=("--jitter", str(JITTER))
            ),
        )
        for name, source in SOURCES.items()
    }
    try:
        collector.start()
        await until(lambda: metrics(metrics_port), 20, "the collector to serve")
        notified = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        reports = tmp_path / "reports.csv"
        reports.write_text(
            "url,notified_at,reference\n"
            + "".join(
                f"http://{HOST_A}:{port}{p},{notified},case-{i}\n" for i, p in enumerate(PAGES)
            )
        )
        assert await import_file(reports, target, out=io.StringIO()) == 0

        agents["agent-1"].start()
        # Agent 1 alone for a while: its 451s must not remove anything.
        await until(lambda: _probed(hoster, "agent-1") >= 20, 20, "agent-1 probing alone")
        alone = states(db)
        assert alone["blocked-first"] == alone["blocked-then-404"] == "pending", alone
        agents["agent-2"].start()
        await asyncio.sleep(2)  # the landscape: agents start seconds apart
        agents["agent-3"].start()
        seen = {p.lstrip("/"): "geoblocked" if p in BLOCKED else "available" for p in PAGES}
        await until(lambda: states(db) == seen, 30, "the content seen by the unblocked agents")
        agents["agent-3"].kill()
        truth = {}
        for path, fate in REMOVE.items():
            truth[path] = hoster.set_fate(path, fate)
        await until(
            lambda: all(states(db).get(p.lstrip("/")) == "removed" for p in REMOVE),
            30, "every removal confirmed by the live witnesses",
        )  # fmt: skip
        agents["agent-4"].start()
        await until(lambda: _probed(hoster, "agent-4") >= 10, 20, "agent-4 probing")
        for name in ("agent-1", "agent-2", "agent-4"):
            code, _ = await agents[name].terminate(20)
            assert code == 0, agents[name].tail()
        code, _ = await collector.terminate(20)
        assert code == 0, collector.tail()
    finally:
        await hoster.stop()

    final = verdicts(db)
    kinds = removal_kinds(db)
    assert final["online"][0] == "available" and "online" not in kinds
    assert final["blocked-first"][0] == "geoblocked", final["blocked-first"]
    assert "blocked-first" not in kinds, "a blocked network credited a removal"
    for path, changed in truth.items():
        state, episode, reappeared, last_present, first_removed, observed = final[path.lstrip("/")]
        assert (state, episode, reappeared) == ("removed", 1, 0), (path, final[path.lstrip("/")])
        assert kinds[path.lstrip("/")] == ["removal"], (path, kinds)
        assert observed == 1
        assert isinstance(first_removed, float) and isinstance(last_present, float)
        assert last_present <= changed + SLACK, (path, last_present, changed)
        assert changed - SLACK <= first_removed <= changed + INTERVAL * (1 + JITTER) + SLACK, (
            path, first_removed - changed,
        )  # fmt: skip

    before, events = final, history(db)
    await refold_unchanged(db, f"{INTERVAL}s")
    assert verdicts(db) == before and history(db) == events


def _probed(hoster: Hoster, agent: str) -> int:
    return sum(1 for remote, _ in hoster.requests if remote == SOURCES[agent])
