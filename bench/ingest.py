"""Collector ingest: simulated agents stream result batches over real gRPC into a real collector.

The collector runs in a child process (grpc.aio, the single SQLite writer on a file, verdicts,
result counters, /metrics). URLs are reported through Intake.Submit. Each simulated agent
opens the AgentLink stream as agent/link.py does (hello, welcome, assignment until in_sync),
then sends ResultBatch messages with at most ``--window`` unacknowledged, and times each
batch from write to BatchAck. Batches are built with the agent's own ``Outbox`` and
``agent.link.encode`` and serialized before the clock starts; ``sent_at`` is stamped at send
time (a second serialized message appended; the parser merges an embedded message seen twice).

Results: 90% present (the URL's page hash), 5% 404, 5% read timeouts, peer 127.0.0.10
(attributed to one provider), so verdicts, episodes and counters all move.

`--db postgresql` runs the same on a PostgreSQL server of the benchmark's own (bench/pg.py:
fsync and synchronous_commit on), with `--collectors N` collector processes on its one
database: agent i streams to collector i % N, URLs are reported to the first, and the clock
stops when every batch is acknowledged and `fold_queue` is empty (every result folded by the
holder of its shard). CPU is counted per collector (with its worker processes) and for the
whole PostgreSQL server (the postmaster and every backend).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from prometheus_client.parser import text_string_to_metric_families

from agent.keys import AgentKey, ResultSigner
from agent.link import encode
from agent.outbox import Outbox
from agent.result import ErrorClass, ProbeResult
from bench import pg
from bench.common import (
    AgentStream,
    Child,
    Deadline,
    cpu_seconds,
    family_cpu,
    family_cpu_since,
    file_size,
    loops,
    memory,
    mib,
    percentile,
    run,
    start_collector,
    submit_urls,
    table,
)
from collector.evidence.logkey import init_log_key
from collector.store.shards import SHARDS
from protos.takedown.v1 import takedown_pb2 as pb

PEER = "127.0.0.10"
PROVIDER = "Bench Hoster"
TARGET_RATE = 100_000.0
DRAIN_WITHIN = 300.0  # seconds for fold_queue to empty after the last ack (PostgreSQL)


def page_hash(url_id: int) -> bytes:
    return hashlib.sha256(f"page {url_id}".encode()).digest()


def build_batches(
    agent: int,
    url_ids: Sequence[tuple[int, str]],
    count: int,
    batch_size: int,
    start: float,
    signer: ResultSigner | None = None,
    *,
    first_seq: int | None = None,
    step: float = 0.001,
    stagger: float = 0.0,
) -> list[tuple[int, bytes]]:
    """`count` results of one agent going round the URLs (90% present, 5% 404, 5% read
    timeouts), probed `step` seconds apart from `start` (+ `stagger` per agent), numbered by
    the agent's Outbox from `first_seq` (default: a million per agent), encoded (and with
    `signer`, signed) by agent.link."""
    if first_seq is None:
        first_seq = 1_000_000 * (agent + 1)
    outbox = Outbox(limit=batch_size * 2, first_seq=first_seq)
    out: list[tuple[int, bytes]] = []
    offset = agent * 7919
    for k in range(count):
        url_id, url = url_ids[(k + offset) % len(url_ids)]
        roll = (k * 37 + agent) % 100
        if roll < 90:
            status, error, digest = 200, ErrorClass.NONE, page_hash(url_id)
        elif roll < 95:
            status, error, digest = 404, ErrorClass.NONE, hashlib.sha256(b"gone").digest()
        else:
            status, error, digest = 0, ErrorClass.READ_TIMEOUT, b""
        outbox.add(
            ProbeResult(
                url_id=url_id,
                started_at=start + k * step + agent * stagger,
                elapsed=0.05,
                status=status,
                final_url=url,
                body_sha256=digest,
                body_bytes=len(digest) and 10_240,
                peer_ip=PEER if error is ErrorClass.NONE else "",
                error=error,
            )
        )
        if outbox.pending >= batch_size or k == count - 1:
            batch = outbox.take(batch_size)
            assert batch is not None
            message = encode(batch, sent_at=0.0, signer=signer)  # sent_at: stamped when sent
            out.append((batch.batch_id, message.SerializeToString()))
            outbox.ack(batch.batch_id)
    return out


@dataclass
class CollectorFigures:
    """One collector process's share of a run."""

    received: int  # results its agents had acknowledged
    cpu: float  # the collector process
    workers_cpu: float  # its worker processes
    rss: int  # peak


@dataclass
class IngestReport:
    agents: int
    urls: int
    sent: int
    stored: int
    duplicates: int
    rejected: int
    wall: float
    ack_p50: float
    ack_p99: float
    collector_cpu: float
    workers_cpu: float  # the collector's worker processes (signature checks)
    generator_cpu: float
    collector_rss: int
    db_bytes: int
    metrics_results: float
    assign_seconds: float
    text: str = ""
    evidence: bool = False
    db: str = "sqlite"
    # PostgreSQL: each collector, the server's CPU, the clock at the last ack (`wall` runs on
    # until fold_queue is empty), the rows in `results`, the most results seen queued.
    collectors: list[CollectorFigures] = field(default_factory=list)
    postgres_cpu: float = 0.0
    wall_acked: float = 0.0
    result_rows: int = 0
    queue_peak: int = 0
    queue_left: int = 0
    shards: dict[str, int] = field(default_factory=dict)
    waits: dict[str, int] = field(default_factory=dict)  # busy backends sampled, by wait
    log_lines: list[str] = field(default_factory=list)  # what the collectors wrote to stderr

    @property
    def rate(self) -> float:
        return self.stored / self.wall if self.wall > 0 else 0.0


def stamp(data: bytes) -> bytes:
    """A serialized batch with `sent_at` = now: a second `batch { sent_at_unix_us }` message is
    appended, and a parser merges an embedded message that appears twice."""
    extra = pb.AgentMessage(batch=pb.ResultBatch(sent_at_unix_us=time.time_ns() // 1000))
    return data + extra.SerializeToString()


async def _ingest(
    agents: int,
    results: int,
    urls: int,
    batch_size: int,
    window: int,
    seconds: float,
    workdir: Path,
    evidence: bool = False,
    db_kind: str = "sqlite",
    collectors: int = 1,
) -> IngestReport:
    db = workdir / "collector.db"
    prefixes = workdir / "prefixes.csv"
    prefixes.write_text(f"prefix,asn,provider\n{PEER}/32,64500,{PROVIDER}\n")
    log_key = init_log_key(workdir / "log-key", "bench/log")[0] if evidence else None
    server: pg.DurablePostgresServer | None = None
    watcher: pg.Watcher | None = None
    children: list[Child] = []
    logs = [workdir / f"collector-{i}.log" for i in range(collectors)]
    shards: dict[str, int] = {}
    try:
        if db_kind == "postgresql":
            server = pg.DurablePostgresServer()
            await asyncio.to_thread(server.start)
            dsn = await asyncio.to_thread(server.new_database)
            for log in logs:  # one after another: the first creates the schema
                with log.open("w") as err:
                    children.append(
                        await asyncio.to_thread(
                            pg.start_collector, dsn, prefixes, 300.0, 120.0, 0.0, err
                        )
                    )
            shards = await asyncio.to_thread(pg.wait_shards_shared, dsn, collectors, SHARDS, 60.0)
            watcher = await asyncio.to_thread(pg.Watcher, dsn)
        else:
            children.append(
                await asyncio.to_thread(start_collector, db, prefixes, 300.0, 120.0, 0.0, log_key)
            )
        collector = children[0]
        targets = [f"127.0.0.1:{c.info['grpc_port']}" for c in children]
        target = targets[0]
        now = time.time()
        names = [f"https://bench-{i % 997}.example.net/reported/{i:08d}.html" for i in range(urls)]
        ids = await submit_urls(target, names, now - 3600)
        pairs = list(zip(ids, names, strict=True))
        per_agent = results // agents
        start = now - per_agent * 0.001 - 60
        keys = [AgentKey(Ed25519PrivateKey.generate()) for _ in range(agents)]
        text_of = dict(pairs).get
        signers = [
            ResultSigner(keys[a], f"bench-agent-{a}", f"bench-net-{a}", text_of) if evidence
            else None
            for a in range(agents)
        ]  # fmt: skip
        plan = [
            build_batches(a, pairs, per_agent, batch_size, start, signers[a]) for a in range(agents)
        ]
        streams = [
            AgentStream(targets[a % len(targets)], f"bench-agent-{a}", f"bench-net-{a}",
                        public_key=keys[a].public_key if evidence else b"")
            for a in range(agents)
        ]  # fmt: skip
        t_assign = time.perf_counter()
        for s in streams:
            await s.open(60.0)
        await asyncio.gather(*(s.in_sync(120.0) for s in streams))
        assign_seconds = time.perf_counter() - t_assign

        deadline = Deadline(seconds)
        cpu0 = [cpu_seconds(c.pid) for c in children]
        gen0 = cpu_seconds()
        family0 = [family_cpu(c.pid) for c in children]
        pg0 = server.cpu_seconds() if server is not None else 0.0
        queue_peak = [0]
        waits: dict[str, int] = {}
        sampling = (
            asyncio.create_task(_sample_queue(watcher, queue_peak, waits)) if watcher is not None
            else None
        )  # fmt: skip
        t0 = time.perf_counter()
        sent_maps = await asyncio.gather(
            *(_send(s, batches, window, deadline) for s, batches in zip(streams, plan, strict=True))
        )
        wall_acked = time.perf_counter() - t0
        queue_left = 0
        if watcher is not None:
            assert sampling is not None
            sampling.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampling
            queue_left = await _drained(watcher, Deadline(DRAIN_WITHIN), queue_peak)
        wall = time.perf_counter() - t0
        each_cpu = [cpu_seconds(c.pid) - c0 for c, c0 in zip(children, cpu0, strict=True)]
        each_workers = [
            family_cpu_since(c.pid, f0) - cpu
            for c, f0, cpu in zip(children, family0, each_cpu, strict=True)
        ]
        postgres_cpu = server.cpu_seconds() - pg0 if server is not None else 0.0
        generator_cpu = cpu_seconds() - gen0
        latencies: list[float] = []
        stored = duplicates = rejected = sent = 0
        received = [0] * len(children)
        for a, (s, sent_at) in enumerate(zip(streams, sent_maps, strict=True)):
            for batch_id, at in sent_at.items():
                acked_at, ack = s.acks[batch_id]
                latencies.append(acked_at - at)
                stored += ack.stored
                duplicates += ack.duplicates
                rejected += ack.rejected
                received[a % len(children)] += ack.stored
            sent += sum(1 for _ in sent_at)
        peaks = [memory(c.pid)[1] for c in children]
        rss = peaks[0]
        counted = await _counted_results(collector.info["metrics_port"])
        result_rows = db_bytes = 0
        if watcher is not None:
            result_rows = await asyncio.to_thread(watcher.count, "SELECT COUNT(*) FROM results")
            db_bytes = await asyncio.to_thread(
                watcher.count, "SELECT pg_database_size(current_database())"
            )
        for s in streams:
            await s.close()
    finally:
        if watcher is not None:
            watcher.close()
        for c in children:
            await asyncio.to_thread(c.stop, 60.0)
        if server is not None:
            await asyncio.to_thread(server.stop)
    report = IngestReport(
        agents=agents,
        urls=urls,
        sent=sent,
        stored=stored,
        duplicates=duplicates,
        rejected=rejected,
        wall=wall,
        ack_p50=percentile(latencies, 50),
        ack_p99=percentile(latencies, 99),
        collector_cpu=sum(each_cpu),
        workers_cpu=sum(each_workers),
        generator_cpu=generator_cpu,
        collector_rss=rss,
        db_bytes=db_bytes if server is not None else file_size(db),
        metrics_results=counted,
        assign_seconds=assign_seconds,
        db=db_kind,
        wall_acked=wall_acked,
    )
    if server is not None:
        report.collectors = [
            CollectorFigures(*figures)
            for figures in zip(received, each_cpu, each_workers, peaks, strict=True)
        ]
        report.postgres_cpu = postgres_cpu
        report.result_rows = result_rows
        report.queue_peak = queue_peak[0]
        report.queue_left = queue_left
        report.shards = shards
        report.waits = waits
        for log in logs:
            with contextlib.suppress(OSError):
                report.log_lines += [
                    f"{log.stem}: {line}" for line in log.read_text().splitlines() if line
                ]
    return report


QUEUED = "SELECT COUNT(*) FROM fold_queue"


async def _sample_queue(watcher: pg.Watcher, peak: list[int], waits: dict[str, int]) -> None:
    """While the agents send, once a second: the results waiting in fold_queue (the most
    kept), and what the collectors' busy backends are waiting for (counted in `waits`)."""
    while True:
        peak[0] = max(peak[0], await asyncio.to_thread(watcher.count, QUEUED))
        for wait in await asyncio.to_thread(watcher.waits):
            waits[wait] = waits.get(wait, 0) + 1
        await asyncio.sleep(1.0)


async def _drained(watcher: pg.Watcher, deadline: Deadline, peak: list[int]) -> int:
    """Wait until fold_queue is empty (every stored result folded); what is left at the
    deadline (0 when it emptied)."""
    while True:
        left = await asyncio.to_thread(watcher.count, QUEUED)
        peak[0] = max(peak[0], left)
        if left == 0 or deadline.expired:
            return left
        await asyncio.sleep(0.05)


async def _send(
    stream: AgentStream, batches: list[tuple[int, bytes]], window: int, deadline: Deadline
) -> dict[int, float]:
    return await stream.send_batches(batches, window, deadline, stamp)


async def _counted_results(port: int) -> float:
    """takedown_probe_results_total summed over agents and classes, from /metrics."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/metrics") as response,
    ):
        text = await response.text()
    total = 0.0
    for family in text_string_to_metric_families(text):
        if family.name == "takedown_probe_results":
            total += sum(s.value for s in family.samples if s.name.endswith("_total"))
    return total


def benchmark(
    agents: int = 10,
    results: int = 1_000_000,
    urls: int = 20_000,
    batch_size: int = 500,
    window: int = 8,
    seconds: float = 120.0,
    loop: str = "asyncio",
    evidence: bool = False,
    db: str = "sqlite",
    collectors: int = 1,
) -> IngestReport:
    """`db`: "sqlite" (one collector on a file) or "postgresql" (`collectors` collectors on a
    server of the benchmark's own)."""
    if db not in ("sqlite", "postgresql"):
        raise ValueError(f"db is sqlite or postgresql, not {db!r}")
    if collectors < 1 or (collectors > 1 and db != "postgresql"):
        raise ValueError("several collectors need db='postgresql'")
    if evidence and db != "sqlite":
        raise ValueError("the evidence log is measured on SQLite only")
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        work = _ingest(
            agents, results, urls, batch_size, window, seconds, Path(tmp), evidence, db,
            collectors,
        )  # fmt: skip
        report = run(work, loop)
    report.evidence = evidence
    if db == "sqlite":
        report.text = _render(report, batch_size, window)
    else:
        report.text = _render_postgres(report, batch_size, window)
    return report


def _render(r: IngestReport, batch_size: int, window: int) -> str:
    per_100k = 100_000 * r.collector_cpu / r.stored if r.stored else float("nan")
    total = r.collector_cpu + r.workers_cpu
    with_workers = 100_000 * total / r.stored if r.stored else float("nan")
    rows: list[list[object]] = [
        ["agents x batch x window", f"{r.agents} x {batch_size} x {window}"],
        ["evidence log, signed results", "on" if r.evidence else "off"],
        ["URLs (assigned to every agent)", r.urls],
        ["assignment to all agents (s)", r.assign_seconds],
        ["results stored", r.stored],
        ["duplicates / rejected", f"{r.duplicates} / {r.rejected}"],
        ["results counted by /metrics", int(r.metrics_results)],
        ["wall (s)", r.wall],
        ["results/s", r.rate],
        ["ack latency p50 (ms)", 1000 * r.ack_p50],
        ["ack latency p99 (ms)", 1000 * r.ack_p99],
        ["collector CPU (s)", r.collector_cpu],
        ["collector CPU per 100k results (s)", per_100k],
        ["+ its worker processes (signature checks) (s)", r.workers_cpu],
        ["collector with workers, CPU per 100k results (s)", with_workers],
        ["collector CPU use (cores)", r.collector_cpu / r.wall if r.wall else 0.0],
        ["load generator CPU (s)", r.generator_cpu],
        ["collector peak RSS", mib(r.collector_rss)],
        ["database size", mib(r.db_bytes)],
        [
            "target results/s",
            f">= {TARGET_RATE:,.0f}: {'ok' if r.rate >= TARGET_RATE else 'MISSED'}",
        ],
    ]
    return table("collector ingest over gRPC", ["figure", "value"], rows)


def _per_100k(cpu: float, results: int) -> float:
    return 100_000 * cpu / results if results else float("nan")


def _waits(waits: dict[str, int]) -> str:
    """The most frequent waits, with their share of the samples."""
    total = sum(waits.values())
    top = sorted(waits.items(), key=lambda kv: -kv[1])[:4]
    return ", ".join(f"{w} {100 * n / total:.0f}%" for w, n in top) + f" (n={total})"


def _render_postgres(r: IngestReport, batch_size: int, window: int) -> str:
    n = len(r.collectors)
    rows: list[list[object]] = [
        ["database", "PostgreSQL (fsync, full_page_writes, synchronous_commit on)"],
        ["collectors on it (shards held)", f"{n} ({', '.join(map(str, r.shards.values()))})"],
        ["agents x batch x window", f"{r.agents} x {batch_size} x {window}"],
        ["URLs (assigned to every agent)", r.urls],
        ["assignment to all agents (s)", r.assign_seconds],
        ["results stored (acknowledged)", r.stored],
        ["rows in results", r.result_rows],
        ["duplicates / rejected", f"{r.duplicates} / {r.rejected}"],
        ["results counted by /metrics", int(r.metrics_results)],
        ["fold_queue: most seen / left at the end", f"{r.queue_peak:,} / {r.queue_left:,}"],
        ["wall to the last ack (s)", r.wall_acked],
        ["wall until fold_queue is empty (s)", r.wall],
        ["results/s (end to end)", r.rate],
        ["ack latency p50 (ms)", 1000 * r.ack_p50],
        ["ack latency p99 (ms)", 1000 * r.ack_p99],
    ]
    for i, c in enumerate(r.collectors):
        total = c.cpu + c.workers_cpu
        rows += [
            [f"collector {i}: results its agents sent", c.received],
            [f"collector {i}: CPU with workers (s)", total],
            [f"collector {i}: CPU per 100k of all results (s)", _per_100k(total, r.stored)],
            [f"collector {i}: CPU per 100k results it received (s)", _per_100k(total, c.received)],
            [f"collector {i}: CPU use (cores)", total / r.wall if r.wall else 0.0],
            [f"collector {i}: peak RSS", mib(c.rss)],
        ]
    collectors_cpu = r.collector_cpu + r.workers_cpu
    everything = collectors_cpu + r.postgres_cpu
    rows += [
        ["collectors together, CPU per 100k results (s)", _per_100k(collectors_cpu, r.stored)],
        ["PostgreSQL server CPU (s)", r.postgres_cpu],
        ["PostgreSQL CPU per 100k results (s)", _per_100k(r.postgres_cpu, r.stored)],
        ["PostgreSQL CPU use (cores)", r.postgres_cpu / r.wall if r.wall else 0.0],
        ["collectors + PostgreSQL, CPU per 100k results (s)", _per_100k(everything, r.stored)],
        ["results per CPU-second, collectors + PostgreSQL", r.stored / everything
         if everything else float("nan")],
        ["load generator CPU (s)", r.generator_cpu],
        ["database size", mib(r.db_bytes)],
        ["busy backends sampled each second, by wait", _waits(r.waits)],
        ["lines the collectors wrote to stderr", len(r.log_lines)],
        [
            "target results/s",
            f">= {TARGET_RATE:,.0f}: {'ok' if r.rate >= TARGET_RATE else 'MISSED'}",
        ],
    ]  # fmt: skip
    text = table(f"collector ingest over gRPC, {n} on PostgreSQL", ["figure", "value"], rows)
    if r.log_lines:
        shown = r.log_lines[:20]
        more = len(r.log_lines) - len(shown)
        text += "\n" + "\n".join(["collectors' stderr:", *shown])
        if more:
            text += f"\n... and {more} more lines"
    return text


def main(argv: Sequence[str] | None = None) -> IngestReport:
    parser = argparse.ArgumentParser(
        prog="python -m bench ingest", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--agents", type=int, default=10)
    parser.add_argument("--results", type=int, default=1_000_000, help="results in all")
    parser.add_argument("--urls", type=int, default=20_000)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--window", type=int, default=8, help="unacknowledged batches per agent")
    parser.add_argument("--seconds", type=float, default=120.0, help="time cap for sending")
    parser.add_argument("--loop", default="asyncio", choices=loops(), help="uvloop when installed")
    parser.add_argument("--quick", action="store_true", help="100,000 results over 5,000 URLs")
    parser.add_argument(
        "--evidence",
        action="store_true",
        help="agents sign every result; the collector checks them and keeps the evidence log",
    )
    parser.add_argument(
        "--db",
        default="sqlite",
        choices=("sqlite", "postgresql"),
        help="postgresql: a server of the benchmark's own (fsync on), the collectors on it",
    )
    parser.add_argument(
        "--collectors",
        type=int,
        default=1,
        help="collector processes on one PostgreSQL database (agent i to collector i %% N)",
    )
    args = parser.parse_args(argv)
    if args.collectors < 1 or (args.collectors > 1 and args.db != "postgresql"):
        parser.error("--collectors N > 1 needs --db postgresql")
    if args.evidence and args.db != "sqlite":
        parser.error("--evidence is measured on SQLite only")
    if args.collectors > args.agents:
        parser.error("--collectors must not exceed --agents (each collector needs an agent)")
    if args.quick:
        args.results, args.urls = min(args.results, 100_000), min(args.urls, 5_000)
    report = benchmark(
        args.agents, args.results, args.urls, args.batch_size, args.window, args.seconds,
        args.loop, args.evidence, args.db, args.collectors,
    )  # fmt: skip
    print(report.text)
    sys.stdout.flush()
    return report


if __name__ == "__main__":
    main()
