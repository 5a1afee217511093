"""A tarpit hoster (accepts, never answers) beside normal hosts, probed by a real agent.

The agent, collector and hosts are real and on loopback. The tarpit holds many more due URLs
than the agent has global slots, so before per-host queues its probes held every slot and the
normal hosts' probes waited for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
import random
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from agent.main import Agent
from collector.importer import import_file
from collector.server import Collector
from demo.hoster import Hoster
from tests.conftest import HOST_A, HOST_B, agent_config, eventually, scrape
from tests.procs import readonly, value

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TARPIT = "127.0.0.12"
TARPIT_URLS = 60
NORMAL_PATHS = [f"/n{i}" for i in range(3)]
INTERVAL = 1.0  # the test collector's fixed probe interval
PROBES_PER_NORMAL_URL = 7
TIMEOUT = 2.0


@contextlib.asynccontextmanager
async def tarpit() -> AsyncIterator[int]:
    """A TCP server on TARPIT that accepts every connection and never writes a byte."""
    held: list[asyncio.StreamWriter] = []
    accepted = 0

    async def hold(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        held.append(writer)

    server = await asyncio.start_server(hold, TARPIT, 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for writer in held:
            writer.close()
        await server.wait_closed()


def _results(db: Path) -> list[tuple[str, float, str, str]]:
    with readonly(db) as conn:
        return list(
            conn.execute(
                "SELECT u.url, r.started_at, r.error, r.class FROM results r"
                " JOIN urls u ON u.id = r.url_id ORDER BY r.started_at"
            )
        )


async def test_tarpit_never_stalls_the_other_hosts(
    tmp_path: Path, collector: Collector, hoster: Hoster
) -> None:
    """Normal hosts keep their cadence within 10%; the tarpit's probes end as timeouts."""
    for path in NORMAL_PATHS:
        hoster.add(path)
    async with tarpit() as port:
        normal = [
            f"http://{host}:{hoster.port}{path}"
            for host in (HOST_A, HOST_B)
            for path in NORMAL_PATHS
        ]
        trapped = [f"http://{TARPIT}:{port}/t{i}" for i in range(TARPIT_URLS)]
        csv_file = tmp_path / "reports.csv"
        notified = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())
        csv_file.write_text(
            "url,notified_at,reference\n"
            + "".join(f"{url},{notified},case-{i}\n" for i, url in enumerate(trapped + normal))
        )
        assert (
            await import_file(csv_file, f"127.0.0.1:{collector.grpc_port}", out=io.StringIO()) == 0
        )

        base = agent_config(collector, "agent-1", "net-one", "127.0.0.2")
        config = replace(
            base,
            probe=replace(
                base.probe,
                total_timeout=TIMEOUT + 0.5,
                connect_timeout=TIMEOUT,
                read_timeout=TIMEOUT,
                concurrency=8,  # far fewer than the tarpit's due URLs
                per_host=2,
            ),
            jitter=0.02,
            host_backlog=10,
        )
        agent = Agent(config, rng=random.Random(1))
        stop = asyncio.Event()
        task = asyncio.create_task(agent.run(stop))
        db = collector.config.db

        def normal_probed_enough() -> bool:
            counts: dict[str, int] = {}
            for url, _, _, _ in _results(db):
                counts[url] = counts.get(url, 0) + 1
            return all(counts.get(url, 0) >= PROBES_PER_NORMAL_URL for url in normal)

        try:
            await eventually(normal_probed_enough, within=40, what="normal hosts probed")
            samples = await scrape(agent.metrics_port)
        finally:
            stop.set()
            await asyncio.wait_for(task, timeout=20)

    results = _results(db)
    for url in normal:
        times = [t for u, t, _, _ in results if u == url]
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert len(gaps) >= PROBES_PER_NORMAL_URL - 1
        assert all(0.9 * INTERVAL <= gap <= 1.1 * INTERVAL for gap in gaps), (url, gaps)
        classes = [(e, c) for u, _, e, c in results if u == url]
        # One network: the content's hash is agreed at its second sighting (docs/METHOD.md 2).
        assert classes[0] in {("none", "present"), ("none", "inconclusive")}
        assert set(classes[1:]) == {("none", "present")}
    trapped_results = [(e, c) for u, _, e, c in results if u in set(trapped)]
    assert trapped_results, "the tarpit was probed"
    assert set(trapped_results) == {("read_timeout", "inconclusive")}
    with readonly(db) as conn:
        removed = conn.execute(
            "SELECT COUNT(*) FROM url_state s JOIN urls u ON u.id = s.url_id"
            " WHERE u.url LIKE ? AND s.state = 'removed'",
            (f"http://{TARPIT}:%",),
        ).fetchone()[0]
    assert removed == 0
    assert value(samples, "takedown_agent_probe_backlog_refused_total", reason="full") > 0
    assert value(samples, "takedown_agent_probe_queue_wait_seconds_count") > 0
    assert value(samples, "takedown_agent_probes_tls_total", check="plaintext") > 0
