"""Faults of several collectors on one PostgreSQL database, with the real programs: a shard
holder killed or frozen past its lease, again and again, and the database away for a while.
The truth is what the agents journaled (every result they made) and a refold of what was
stored: nothing is lost, nothing stored or folded twice, the verdicts are a refold's."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from collector.method import Policy
from collector.store.reads import connect_readonly
from collector.store.shards import SHARDS
from demo.hoster import Fate, Hoster
from tests.pg import PostgresServer
from tests.procs import (
    Proc,
    Procs,
    agent_argv,
    collector_argv,
    free_port,
    journal,
    metrics,
    unacked,
    until,
)
from tests.test_postgres import refolded_on_sqlite, verdicts

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LEASE = 3.0  # seconds; --lease-time of the collectors here
HOSTS = ("127.0.0.10", "127.0.0.11")


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    registry = Procs(tmp_path)
    yield registry
    registry.close()


def query(dsn: str, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
    conn = connect_readonly(dsn)
    try:
        return list(conn.execute(sql, params).fetchall())
    finally:
        conn.close()


class Cluster:
    """Collectors on one database, an agent on each, a hoster with pages."""

    def __init__(self, procs: Procs, tmp: Path, dsn: str, prefixes: Path, n: int = 2) -> None:
        self.dsn = dsn
        self.tmp = tmp
        self.targets = [f"127.0.0.1:{free_port()}" for _ in range(n)]
        self.metrics_ports = [free_port() for _ in range(n)]
        self.collectors: list[Proc] = [
            procs.add(f"collector-{i}", collector_argv(
                dsn, target, f"127.0.0.1:{port}", prefixes=prefixes, probe_interval="0.5s",
                extra=["--lease-time", f"{LEASE}s", "--flush-every", "0"],
            ))
            for i, (target, port) in enumerate(zip(self.targets, self.metrics_ports, strict=True))
        ]  # fmt: skip
        self.agents: list[tuple[Proc, Path, int]] = []
        for i, target in enumerate(self.targets):
            state, port = tmp / f"agent-{i}", free_port()
            argv = agent_argv(target, f"agent-{i}", f"127.0.0.{2 + i}", state, port)
            self.agents.append((procs.add(f"agent-{i}", argv), state / "spool.db", port))

    async def start_collector(self, i: int) -> None:
        proc = self.collectors[i]
        proc.start()

        async def serving() -> bool:
            assert proc.running, f"{proc.name} exited:\n{proc.tail()}"
            return await metrics(self.metrics_ports[i]) is not None

        await until(serving, 30, f"{proc.name} to serve")

    def holders(self) -> dict[str, int]:
        """Live lease holders (lease not lapsed, by the database's clock): shards each."""
        rows = query(
            self.dsn,
            "SELECT owner, COUNT(*) FROM shard_leases WHERE owner IS NOT NULL AND expires_at >"
            " EXTRACT(EPOCH FROM clock_timestamp()) GROUP BY owner",
        )
        return {str(o): int(n) for o, n in rows}

    async def settled(self, collectors: int, within: float) -> None:
        """Every shard held, split evenly over `collectors` live ones."""

        def even() -> bool:
            held = self.holders()
            return (
                len(held) == collectors
                and sum(held.values()) == SHARDS
                and (max(held.values()) - min(held.values()) <= 1)
            )

        await until(even, within, f"the shards split over {collectors} collector(s)", 0.1)

    def stored(self, agent: str) -> dict[int, int]:
        rows = query(
            self.dsn,
            "SELECT r.seq, r.url_id FROM results r JOIN agents a ON a.id = r.agent_id"
            " WHERE a.name = ?",
            (agent,),
        )
        return {int(s): int(u) for s, u in rows}

    def check(self) -> None:
        """Every journaled result stored once, none left in the queue, each folded once."""
        for proc, spool, _ in self.agents:
            assert unacked(spool) == 0, f"{proc.name} left results unacknowledged"
            made, got = journal(spool), self.stored(proc.name)
            assert made == got, (proc.name, sorted(made.keys() ^ got.keys())[:10])
        assert query(self.dsn, "SELECT COUNT(*) FROM fold_queue")[0][0] == 0
        # Each result is counted by class once, when it is folded: by the collector that
        # stored it if it held the shard, else by the shard's holder from the queue.
        unfolded = query(self.dsn, "SELECT COUNT(*) FROM results WHERE class = ''")[0][0]
        assert unfolded == 0
        counted = query(
            self.dsn,
            "SELECT a.name, (SELECT COALESCE(SUM(n), 0) FROM result_counts c WHERE"
            " c.agent_id = a.id), (SELECT COUNT(*) FROM results r WHERE r.agent_id = a.id)"
            " FROM agents a ORDER BY a.name",
        )
        assert all(n == stored for _, n, stored in counted), counted


async def import_pages(cluster: Cluster, hoster: Hoster, n: int) -> list[str]:
    import io
    import json
    import time

    from collector.importer import import_file

    paths = [f"/p{i}" for i in range(n)]
    for p in paths:
        hoster.add(p)
    notified = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 5))
    reports = cluster.tmp / "reports.jsonl"
    reports.write_text("".join(
        json.dumps({"url": f"http://{HOSTS[i % 2]}:{hoster.port}{p}", "notified_at": notified,
                    "reference": f"case-{i}"}) + "\n"
        for i, p in enumerate(paths)
    ))  # fmt: skip
    out = io.StringIO()
    assert await import_file(reports, cluster.targets[0], out=out) == 0, out.getvalue()
    return paths


async def test_shard_holders_killed_and_frozen_lose_nothing(
    tmp_path: Path, procs: Procs, pg_dsn: str, prefixes: Path, hoster: Hoster
) -> None:
    """Two collectors, an agent on each. Three times a collector dies (SIGKILL) or freezes
    (SIGSTOP) past its lease while pages are removed: the other holds every shard within
    the lease time, the dead one comes back and takes its share again, the frozen one,
    thawed, finds its shards gone and writes no fold of them."""
    cluster = Cluster(procs, tmp_path, pg_dsn, prefixes)
    for i in range(2):
        await cluster.start_collector(i)
    await cluster.settled(2, LEASE * 3)
    for proc, _, _ in cluster.agents:
        proc.start()
    paths = await import_pages(cluster, hoster, 12)

    def results() -> int:
        return int(query(pg_dsn, "SELECT COUNT(*) FROM results")[0][0])

    for round_, (victim, how) in enumerate([(0, "kill"), (1, "stop"), (0, "kill")]):
        before = results()
        await until(lambda b=before: results() > b + 20, 30, "results flowing", 0.1)
        hoster.set_fate(paths[round_], Fate.GONE_404)
        proc = cluster.collectors[victim]
        if how == "kill":
            proc.kill()
        else:
            proc.popen.send_signal(signal.SIGSTOP)  # type: ignore[union-attr]
        await cluster.settled(1, LEASE + 5)  # the survivor holds everything
        if how == "kill":
            await cluster.start_collector(victim)
        else:
            proc.popen.send_signal(signal.SIGCONT)  # type: ignore[union-attr]
        await cluster.settled(2, LEASE * 3)

    def removed() -> bool:
        states = dict(query(pg_dsn, "SELECT u.url, s.state FROM urls u JOIN url_state s"
                                    " ON s.url_id = u.id"))  # fmt: skip
        return all(
            (state == "removed") == (url.rsplit("/", 1)[1] in ("p0", "p1", "p2"))
            for url, state in states.items()
        )

    await until(removed, 30, "the three removals confirmed, the rest online", 0.2)
    for proc, _, _ in cluster.agents:
        await proc.terminate(20)
    # What one collector stored for the other's shards is folded by that one within a tick
    # or two; stopped before, it would wait in the queue for the next start (durably).
    await until(lambda: not query(pg_dsn, "SELECT 1 FROM fold_queue LIMIT 1"), 15,
                "every queued result folded", 0.1)  # fmt: skip
    for proc in cluster.collectors:
        await proc.terminate(20)
    cluster.check()
    policy = Policy(confirmations=2)
    assert refolded_on_sqlite(pg_dsn, tmp_path / "refolded.db", prefixes, policy) == verdicts(
        pg_dsn
    )


async def test_the_database_away_for_a_while_loses_nothing(
    tmp_path: Path, procs: Procs, prefixes: Path, hoster: Hoster
) -> None:
    """The database stops while agents probe: the collector acknowledges nothing meanwhile,
    the agent keeps its results, and once the database is back every result it made is
    stored, once."""
    server = PostgresServer()
    await asyncio.to_thread(server.start)
    try:
        dsn = server.new_database()
        cluster = Cluster(procs, tmp_path, dsn, prefixes, n=1)
        await cluster.start_collector(0)
        agent, spool, _ = cluster.agents[0]
        agent.start()
        await import_pages(cluster, hoster, 4)
        await until(lambda: len(cluster.stored("agent-0")) > 10, 30, "results stored", 0.1)
        await asyncio.to_thread(server.pause)

        async def withheld() -> bool:
            return unacked(spool) > 20  # made, kept, not acknowledged

        await until(withheld, 30, "the agent keeping its results while the database is away")
        assert cluster.collectors[0].running
        await asyncio.to_thread(server.resume)
        await until(lambda: unacked(spool) == 0, 40, "the kept results acknowledged", 0.2)
        await agent.terminate(20)
        await cluster.collectors[0].terminate(20)
        log = cluster.collectors[0].text()
        assert "database unavailable" in log, log[-3000:]
        cluster.check()
    finally:
        await asyncio.to_thread(server.stop)
