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
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from prometheus_client.parser import text_string_to_metric_families

from agent.keys import AgentKey, ResultSigner
from agent.link import encode
from agent.outbox import Outbox
from agent.result import ErrorClass, ProbeResult
from bench.common import (
    AgentStream,
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
from protos.takedown.v1 import takedown_pb2 as pb

PEER = "127.0.0.10"
PROVIDER = "Bench Hoster"
TARGET_RATE = 100_000.0


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
) -> IngestReport:
    db = workdir / "collector.db"
    prefixes = workdir / "prefixes.csv"
    prefixes.write_text(f"prefix,asn,provider\n{PEER}/32,64500,{PROVIDER}\n")
    log_key = init_log_key(workdir / "log-key", "bench/log")[0] if evidence else None
    collector = await asyncio.to_thread(start_collector, db, prefixes, 300.0, 120.0, 0.0, log_key)
    try:
        target = f"127.0.0.1:{collector.info['grpc_port']}"
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
            AgentStream(target, f"bench-agent-{a}", f"bench-net-{a}",
                        public_key=keys[a].public_key if evidence else b"")
            for a in range(agents)
        ]  # fmt: skip
        t_assign = time.perf_counter()
        for s in streams:
            await s.open(60.0)
        await asyncio.gather(*(s.in_sync(120.0) for s in streams))
        assign_seconds = time.perf_counter() - t_assign

        deadline = Deadline(seconds)
        cpu0, gen0 = cpu_seconds(collector.pid), cpu_seconds()
        family0 = family_cpu(collector.pid)
        t0 = time.perf_counter()
        sent_maps = await asyncio.gather(
            *(_send(s, batches, window, deadline) for s, batches in zip(streams, plan, strict=True))
        )
        wall = time.perf_counter() - t0
        collector_cpu = cpu_seconds(collector.pid) - cpu0
        workers_cpu = family_cpu_since(collector.pid, family0) - collector_cpu
        generator_cpu = cpu_seconds() - gen0
        latencies: list[float] = []
        stored = duplicates = rejected = sent = 0
        for s, sent_at in zip(streams, sent_maps, strict=True):
            for batch_id, at in sent_at.items():
                acked_at, ack = s.acks[batch_id]
                latencies.append(acked_at - at)
                stored += ack.stored
                duplicates += ack.duplicates
                rejected += ack.rejected
            sent += sum(1 for _ in sent_at)
        rss = memory(collector.pid)[1]
        counted = await _counted_results(collector.info["metrics_port"])
        for s in streams:
            await s.close()
    finally:
        await asyncio.to_thread(collector.stop, 60.0)
    return IngestReport(
        agents=agents,
        urls=urls,
        sent=sent,
        stored=stored,
        duplicates=duplicates,
        rejected=rejected,
        wall=wall,
        ack_p50=percentile(latencies, 50),
        ack_p99=percentile(latencies, 99),
        collector_cpu=collector_cpu,
        workers_cpu=workers_cpu,
        generator_cpu=generator_cpu,
        collector_rss=rss,
        db_bytes=file_size(db),
        metrics_results=counted,
        assign_seconds=assign_seconds,
    )


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
) -> IngestReport:
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        work = _ingest(agents, results, urls, batch_size, window, seconds, Path(tmp), evidence)
        report = run(work, loop)
    report.evidence = evidence
    report.text = _render(report, batch_size, window)
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
    args = parser.parse_args(argv)
    if args.quick:
        args.results, args.urls = min(args.results, 100_000), min(args.urls, 5_000)
    report = benchmark(
        args.agents, args.results, args.urls, args.batch_size, args.window, args.seconds,
        args.loop, args.evidence,
    )  # fmt: skip
    print(report.text)
    sys.stdout.flush()
    return report


if __name__ == "__main__":
    main()
