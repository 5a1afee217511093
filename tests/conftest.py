"""Shared fixtures: a real collector (grpc.aio + SQLite + /metrics), real agents, a real hoster."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from agent.main import Agent, AgentConfig
from agent.probe import ProbeConfig
from collector.method import Policy
from collector.schedule import Planner
from collector.server import Collector, CollectorConfig
from demo.hoster import Hoster
from tests.procs import samples_of, until

HOST_A = "127.0.0.10"
HOST_B = "127.0.0.11"
PREFIXES = (
    "prefix,asn,provider,country,cdn\n"
    f"{HOST_A}/32,64500,Hoster A,NL,false\n"
    f"{HOST_B}/32,AS64501,Hoster B,DE,no\n"
)


async def eventually(
    condition: Callable[[], Awaitable[bool] | bool], within: float = 30.0, what: str = ""
) -> None:
    """Poll `condition` until it holds; fail naming `what` after `within` seconds."""
    await until(condition, within, what or str(condition), every=0.05)


async def scrape(port: int, host: str = "127.0.0.1") -> dict[str, list[Any]]:
    """Fetch /metrics and return samples grouped by sample name."""
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
        session.get(f"http://{host}:{port}/metrics") as response,
    ):
        assert response.status == 200
        text = await response.text()
    return samples_of(text)


# PYTHONPATH as the tests found it, before `programs_without_pandas` (None: not set).
PYTHONPATH = os.environ.get("PYTHONPATH")


@pytest.fixture(scope="session", autouse=True)
def programs_without_pandas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The programs the tests start find no pandas, as in the product's own installs.

    pandas is here only for the tests' own cross-checks (lifelines, the dev extra); the
    product neither depends on it nor uses it. But sqlite_utils imports pandas whenever it is
    installed, so every process the tests start that loads the collector's store (about 120 a
    run: the `takedown-collector` commands, the collector's signature workers, the benchmarks'
    children) spent 0.5-0.7 s of CPU importing pandas. A package named pandas first on
    PYTHONPATH that fails to import stands in for its absence, as bench/scale.py does for its
    agent child; this process (pytest, lifelines) keeps the real one. A test whose programs
    must find pandas asks for `programs_with_pandas`.
    """
    stub = tmp_path_factory.mktemp("no-pandas") / "pandas"
    stub.mkdir()
    (stub / "__init__.py").write_text(
        'raise ImportError("pandas is not installed for the programs under test")\n'
    )
    with pytest.MonkeyPatch.context() as env:
        env.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(stub.parent), PYTHONPATH])))
        yield


@pytest.fixture
def programs_with_pandas(monkeypatch: pytest.MonkeyPatch) -> None:
    """The programs this test starts see PYTHONPATH as the tests found it: pandas is back."""
    if PYTHONPATH is None:
        monkeypatch.delenv("PYTHONPATH", raising=False)
    else:
        monkeypatch.setenv("PYTHONPATH", PYTHONPATH)


@pytest.fixture
def prefixes(tmp_path: Path) -> Path:
    path = tmp_path / "prefixes.csv"
    path.write_text(PREFIXES)
    return path


def collector_config(tmp_path: Path, prefixes: Path) -> CollectorConfig:
    """The test collector: loopback ports chosen by the kernel, 1 s probes, 2 confirmations."""
    return CollectorConfig(
        db=tmp_path / "collector.db",
        listen="127.0.0.1:0",
        metrics_listen="127.0.0.1:0",
        prefixes=prefixes,
        planner=replace(Planner.fixed(1.0), deadlines=(3600.0, 86400.0)),
        policy=Policy(confirmations=2),
        deadlines=(3600.0, 86400.0),
    )


def agent_config(
    collector: Collector, name: str, network: str, source: str, **changes: Any
) -> AgentConfig:
    """A test agent of `collector`, probing from the loopback `source` address, quick to flush."""
    config = AgentConfig(
        collector=f"127.0.0.1:{collector.grpc_port}",
        name=name,
        network=network,
        probe=ProbeConfig(
            total_timeout=5, connect_timeout=2, read_timeout=3, source_address=source
        ),
        allow_private=(ipaddress.ip_network("127.0.0.0/8"),),
        flush_interval=0.2,
        first_spread=0.5,
        metrics_listen="127.0.0.1:0",
    )
    return replace(config, **changes)


@contextlib.asynccontextmanager
async def logging_collector(
    tmp_path: Path, prefixes: Path, key_file: Path, **changes: Any
) -> AsyncIterator[Collector]:
    """The test collector keeping an evidence log signed with `key_file`, stopped gracefully."""
    config = replace(
        collector_config(tmp_path, prefixes), log_key_file=key_file, checkpoint_every=3600.0,
        **changes,
    )  # fmt: skip
    collector = Collector(config)
    await collector.start()
    try:
        yield collector
    finally:
        await collector.stop(grace=1)


@pytest.fixture
async def collector(
    request: pytest.FixtureRequest, tmp_path: Path, prefixes: Path
) -> AsyncIterator[Collector]:
    """The test collector on SQLite; on PostgreSQL (a database of the session's server) where a
    test parametrizes it with "postgresql" (indirect=True)."""
    config = collector_config(tmp_path, prefixes)
    if getattr(request, "param", "sqlite") == "postgresql":
        config = replace(config, db=request.getfixturevalue("pg_dsn"))
    c = Collector(config)
    await c.start()
    yield c
    await c.stop(grace=1)


@pytest.fixture
async def hoster() -> AsyncIterator[Hoster]:
    h = Hoster()
    await h.start([HOST_A, HOST_B])
    yield h
    await h.stop()


AgentFactory = Callable[[str, str, str], Agent]


@pytest.fixture
async def agents(collector: Collector) -> AsyncIterator[Callable[[str, str, str], Agent]]:
    """Start agents bound to a loopback source address; all are stopped gracefully at the end."""
    running: list[tuple[Agent, asyncio.Event, asyncio.Task[None]]] = []

    def start(name: str, network: str, source: str) -> Agent:
        agent = Agent(agent_config(collector, name, network, source), rng=random.Random(name))
        stop = asyncio.Event()
        running.append((agent, stop, asyncio.create_task(agent.run(stop))))
        return agent

    yield start
    for _, stop, _ in running:
        stop.set()
    for _, _, task in running:
        await asyncio.wait_for(task, timeout=15)


@pytest.fixture(scope="session")
def postgres() -> Iterator[Any]:
    """A real PostgreSQL server for the session (tests/pg.py)."""
    from tests.pg import PostgresServer

    server = PostgresServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def pg_dsn(postgres: Any) -> str:
    """The DSN of a fresh, empty database on the session's PostgreSQL server."""
    return str(postgres.new_database())
