"""An agent outlives a collector restart: it reconnects, resends, and nothing is counted twice."""

from __future__ import annotations

import asyncio
import io
import ipaddress
import json
import random
import socket
from pathlib import Path

import pytest

from agent.main import Agent, AgentConfig
from agent.probe import ProbeConfig
from collector.importer import import_file
from collector.schedule import Planner
from collector.server import Collector, CollectorConfig
from collector.store.reads import connect_readonly, results_count
from demo.hoster import Hoster
from tests.conftest import HOST_A, eventually, scrape

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stored(db: Path) -> int:
    conn = connect_readonly(db)
    try:
        return results_count(conn)
    finally:
        conn.close()


async def test_agent_reconnects_and_state_survives_restart(
    tmp_path: Path, prefixes: Path, hoster: Hoster
) -> None:
    """After a collector restart the gauges are unchanged and every acked result is stored once."""
    for path in ("/one", "/two"):
        hoster.add(path)
    config = CollectorConfig(
        db=tmp_path / "c.db",
        listen=f"127.0.0.1:{free_port()}",
        metrics_listen="127.0.0.1:0",
        prefixes=prefixes,
        planner=Planner.fixed(1.0),
    )
    first = Collector(config)
    await first.start()
    reports = tmp_path / "r.jsonl"
    notified = "2026-01-01T00:00:00Z"
    reports.write_text(
        "".join(
            json.dumps({"url": f"http://{HOST_A}:{hoster.port}{p}", "notified_at": notified}) + "\n"
            for p in ("/one", "/two")
        )
    )
    assert await import_file(reports, config.listen, out=io.StringIO()) == 0
    agent = Agent(
        AgentConfig(
            collector=config.listen,
            name="survivor",
            network="net",
            probe=ProbeConfig(total_timeout=3, source_address="127.0.0.2"),
            allow_private=(ipaddress.ip_network("127.0.0.0/8"),),
            flush_interval=0.1,
            first_spread=0.2,
        ),
        rng=random.Random(1),
    )
    stop = asyncio.Event()
    running = asyncio.create_task(agent.run(stop))
    second: Collector | None = None
    try:
        await eventually(lambda: stored(config.db) >= 4, 20, "results from the agent")
        before: dict[tuple[str, str], float] = {}

        async def both_available() -> bool:
            # Verdict states are written behind (within --flush seconds, sooner when idle).
            before.clear()
            for s in (await scrape(first.metrics_port))["takedown_urls"]:
                before[(s.labels["provider"], s.labels["state"])] = s.value
            return before.get(("Hoster A", "available")) == 2

        await eventually(both_available, 20, "both URLs available in /metrics")
        await first.stop(grace=0.5)
        await eventually(lambda: not agent.link.connected, 10, "the agent to notice")
        count_at_stop = stored(config.db)

        second = Collector(config)
        await second.start()
        after = {
            (s.labels["provider"], s.labels["state"]): s.value
            for s in (await scrape(second.metrics_port))["takedown_urls"]
        }
        assert after == before
        assert before[("Hoster A", "available")] == 2
        await eventually(lambda: agent.link.connected, 30, "the agent to reconnect")
        await eventually(lambda: stored(config.db) > count_at_stop + 4, 20, "new results")
    finally:
        stop.set()
        await asyncio.wait_for(running, 20)
        if second is not None:
            await second.stop(grace=1)
    assert agent.link.reconnects >= 1
    assert len(agent.outbox) == 0
    assert stored(config.db) == agent.outbox.acked == agent.probed
