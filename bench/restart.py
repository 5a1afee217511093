"""Restart: a collector's time from process start to serving, after a crash and after a stop.

A database is filled through the collector's own ``Store``: ``--urls`` reports, ``--agents``
agents, ``--history`` results per URL and agent a day apart (a third of the URLs removed), the
folds flushed. Then the real ``takedown-collector serve`` runs in a child process on 127.0.0.1
(plaintext, no tokens, ``--log-level INFO``), four times:

1. the first start after the fill; simulated agents (the fill's agents, holding their
   assignment: their Hello carries its digests) stream ResultBatch messages as bench/ingest.py's
   do, for ``--backlog`` seconds with nothing flushed (this child's ``--flush-every`` is longer
   than the run), then SIGKILL;
2. restarted after that crash, with ``--flush-every`` (default 5 s); serving, then SIGTERM;
3. restarted after the clean stop; it ingests for ``--backlog`` seconds again, now flushing
   every ``--flush-every``, then SIGKILL;
4. restarted after that crash; serving, then SIGTERM.

Before each start the database says what the start has to resume: the URLs in ``unflushed``,
and the results stored after the last flush (seq above each agent's ``fold_marks``). A start
is timed from the spawn of the child: its gRPC port accepting, the gRPC health service
answering SERVING for takedown.v1.AgentLink (set once start-up replanned), and /metrics
answering 200; serving is the later of the last two. Child CPU (/proc/PID/stat) and peak RSS
(VmHWM) are read once it serves, and the ``folds_resumed`` log line gives the resume figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.common import (
    AgentStream,
    Deadline,
    cpu_seconds,
    file_size,
    free_port,
    memory,
    mib,
    require_loopback,
    run,
    table,
    wait_for_state,
)
from bench.ingest import PEER, PROVIDER, build_batches, page_hash, stamp
from bench.scale import report_url
from client.digests import Digests
from collector.attribution import PrefixTable
from collector.method import Policy
from collector.reports_file import ReportIn
from collector.schedule import Planner
from collector.store import ResultIn, Store
from collector.store.reads import active_intervals, connect_readonly

HOST = require_loopback("127.0.0.1")
TARGET_SECONDS = 10.0  # issue 13: restart to serving with 1,000,000 URLs and a 30 s backlog
POLL = 0.05  # seconds between two looks at a starting child
FILL_CHUNK = 50_000  # URLs whose results the fill ingests before it flushes their folds
FILL_BATCH = 5_000
# Results built per agent for the first ingest: enough for this rate over the backlog and a
# lead-in (the second ingest's are built for 1.5 times the first one's rate). Should the
# collector take them faster, the ingest is cut short (before the writer could go idle and
# flush) and the figures say so.
PLAN_RATE = 20_000.0
PLAN_LEAD = 10.0
STEP = 0.0002  # seconds between an agent's consecutive results (started_at)
RESUMED = re.compile(r"folds_resumed urls=(\d+) refolds=(\d+) seconds=([\d.]+)")
NAN = float("nan")


def agent_name(a: int) -> str:
    return f"bench-agent-{a}"


def agent_network(a: int) -> str:
    return f"bench-net-{a}"


# --- the database ------------------------------------------------------------------------------


@dataclass
class Filled:
    pairs: list[tuple[int, str]]  # (url id, url) of every report
    seqs: list[int]  # each agent's highest seq
    results: int
    seconds: float


def fill(db: Path, prefixes: Path, urls: int, agents: int, history: int) -> Filled:
    """`urls` reports a week old; each agent probes each URL `history` times, a day apart (a
    third of the URLs are gone from the second round on); folds flushed every FILL_CHUNK URLs."""
    prefixes.write_text(f"prefix,asn,provider\n{PEER}/32,64500,{PROVIDER}\n")
    began = time.perf_counter()
    store = Store(db, PrefixTable.from_csv(prefixes), Policy(), flush_every=3600.0)
    results = 0
    seqs = [0] * agents
    try:
        now = time.time()
        start = now - 7 * 86_400
        ids = [store.register_agent(agent_name(a), agent_network(a), "bench", now)
               for a in range(agents)]  # fmt: skip
        names = [report_url(i) for i in range(urls)]
        url_ids: list[int] = []
        for first in range(0, urls, 10_000):
            chunk = [
                ReportIn(names[i], start + (i % 3600), None, f"ref-{i}")
                for i in range(first, min(urls, first + 10_000))
            ]
            url_ids += [o.url_id for o in store.submit_reports(chunk, start, Planner())]
        for first in range(0, urls, FILL_CHUNK):
            last = min(urls, first + FILL_CHUNK)
            for rnd in range(history):
                at = start + (rnd + 1) * 86_400
                for a, agent_id in enumerate(ids):
                    batch: list[ResultIn] = []
                    for i in range(first, last):
                        gone = rnd > 0 and i % 3 == 0
                        seqs[a] += 1
                        batch.append(
                            ResultIn(
                                url_id=url_ids[i], seq=seqs[a],
                                started_at=at + (i % 3600) + a, elapsed=0.05,
                                status=404 if gone else 200, final_url=names[i],
                                sha256=b"" if gone else page_hash(url_ids[i]),
                                body_bytes=0 if gone else 10_240, truncated=False,
                                peer_ip=PEER, error="none", redirects=0,
                            )
                        )  # fmt: skip
                        if len(batch) == FILL_BATCH or i == last - 1:
                            results += store.ingest(agent_id, batch, now).stored
                            batch = []
            store.flush(now)
    finally:
        store.close()
    pairs = list(zip(url_ids, names, strict=True))
    return Filled(pairs, seqs, results, time.perf_counter() - began)


@dataclass
class Backlog:
    """What a start has to resume, read from the database before it."""

    urls: int = 0  # rows of `unflushed`
    results: int = 0  # results stored after the last flush (seq above the agent's fold mark)
    span: float = 0.0  # seconds between the first and the last of them (stored_at)
    wal_bytes: int = 0


def backlog_of(db: Path) -> Backlog:
    """Read-only, so that nothing checkpoints the WAL a crash left before the restart does."""
    conn = connect_readonly(db)
    try:
        out = Backlog(urls=int(conn.execute("SELECT COUNT(*) FROM unflushed").fetchone()[0]))
        marks = dict(conn.execute("SELECT agent_id, seq FROM fold_marks").fetchall())
        first, last = math.inf, -math.inf
        for (agent_id,) in conn.execute("SELECT id FROM agents").fetchall():
            n, lo, hi = conn.execute(
                "SELECT COUNT(*), MIN(stored_at), MAX(stored_at) FROM results"
                " WHERE agent_id = ? AND seq > ?",
                (agent_id, marks.get(agent_id, -1)),
            ).fetchone()
            if n:
                out.results += int(n)
                first, last = min(first, lo), max(last, hi)
        out.span = last - first if out.results else 0.0
    finally:
        conn.close()
    with contextlib.suppress(OSError):
        out.wal_bytes = Path(f"{db}-wal").stat().st_size
    return out


def digests_of(db: Path) -> list[int]:
    """The assignment digests of an agent holding every active URL, as the collector has them."""
    ours = Digests()
    conn = connect_readonly(db)
    try:
        for url_id, interval in active_intervals(conn):
            ours.toggle(url_id, max(1, round(interval * 1000)))
    finally:
        conn.close()
    return list(ours.values)


# --- the collector: `takedown-collector serve` in a child process ------------------------------


def collector_command() -> list[str]:
    """The installed console script beside this interpreter, else the same entry point."""
    script = Path(sys.executable).with_name("takedown-collector")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from collector.cli import main; sys.exit(main())"]


@dataclass
class Served:
    """One `takedown-collector serve` child and what its start cost."""

    label: str
    proc: subprocess.Popen[bytes]
    grpc_port: int
    metrics_port: int
    log: Path
    flush_every: float
    spawned_wall: float
    spawned: float  # perf_counter at the spawn
    before: Backlog
    marks: dict[str, float] = field(default_factory=dict)  # seconds since the spawn
    cpu: float = NAN
    peak_rss: int = 0
    resumed: tuple[int, int, float] | None = None  # folds_resumed urls, refolds, seconds
    resumed_at: float = NAN  # seconds since the spawn, from the log line's time
    started_line_at: float = NAN
    stop_seconds: float = NAN

    @classmethod
    def spawn(cls, label: str, db: Path, prefixes: Path, flush_every: float, log: Path) -> Served:
        before = backlog_of(db)
        grpc_port, metrics_port = free_port(HOST), free_port(HOST)
        args = [
            *collector_command(), "serve", "--db", str(db),
            "--listen", f"{HOST}:{grpc_port}", "--metrics-listen", f"{HOST}:{metrics_port}",
            "--insecure", "--auth", "none", "--prefixes", str(prefixes),
            "--flush-every", f"{flush_every:g}s", "--replan-every", "1h", "--log-level", "INFO",
        ]  # fmt: skip
        with log.open("wb") as err:
            spawned_wall, spawned = time.time(), time.perf_counter()
            proc = subprocess.Popen(  # noqa: S603 - our own console script
                args,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                cwd=Path(__file__).resolve().parent.parent,
            )
        return cls(label, proc, grpc_port, metrics_port, log, flush_every, spawned_wall, spawned,
                   before)  # fmt: skip

    @property
    def target(self) -> str:
        return f"{HOST}:{self.grpc_port}"

    def since(self) -> float:
        return time.perf_counter() - self.spawned

    def alive(self) -> None:
        if self.proc.poll() is not None:
            tail = self.log.read_text(errors="replace").splitlines()[-5:]
            raise RuntimeError(f"collector exited with {self.proc.returncode}: {tail}")

    async def until_serving(self, within: float) -> None:
        """Poll the child until it serves; then read its CPU, peak RSS and log."""
        deadline = Deadline(within)
        marks = self.marks

        async def port() -> None:
            while not deadline.expired:
                self.alive()
                try:
                    _, writer = await asyncio.wait_for(
                        asyncio.open_connection(HOST, self.grpc_port), 1.0
                    )
                except (OSError, TimeoutError):
                    await asyncio.sleep(POLL)
                    continue
                marks["port"] = self.since()
                writer.close()
                return
            raise TimeoutError(f"{self.label}: gRPC port closed after {within}s")

        async def health() -> None:
            request = health_pb2.HealthCheckRequest(service="takedown.v1.AgentLink")
            while not deadline.expired:
                self.alive()
                if "port" in marks:
                    async with grpc.aio.insecure_channel(self.target) as channel:
                        stub = health_pb2_grpc.HealthStub(channel)
                        with contextlib.suppress(grpc.aio.AioRpcError):
                            answer = await stub.Check(request, timeout=min(2.0, deadline.left()))
                            if answer.status == health_pb2.HealthCheckResponse.SERVING:
                                marks["health"] = self.since()
                                return
                await asyncio.sleep(POLL)
            raise TimeoutError(f"{self.label}: not SERVING after {within}s")

        async def metrics() -> None:
            url = f"http://{HOST}:{self.metrics_port}/metrics"
            async with aiohttp.ClientSession() as session:
                while not deadline.expired:
                    self.alive()
                    timeout = aiohttp.ClientTimeout(total=max(0.1, deadline.left()))
                    with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                        async with session.get(url, timeout=timeout) as response:
                            await response.read()
                            if response.status == 200:
                                marks["metrics"] = self.since()
                                return
                    await asyncio.sleep(POLL)
            raise TimeoutError(f"{self.label}: /metrics did not answer within {within}s")

        await asyncio.gather(port(), health(), metrics())
        marks["serving"] = max(marks["health"], marks["metrics"])
        self.cpu = cpu_seconds(self.proc.pid)
        self.peak_rss = memory(self.proc.pid)[1]
        for line in self.log.read_text(errors="replace").splitlines():
            if (m := RESUMED.search(line)) is not None:
                self.resumed = (int(m.group(1)), int(m.group(2)), float(m.group(3)))
                self.resumed_at = self._at(line)
            elif "collector_started" in line:
                self.started_line_at = self._at(line)

    def _at(self, line: str) -> float:
        """Seconds from the spawn to a log line (its asctime, local time, milliseconds)."""
        try:
            stamp = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
        except ValueError:
            return NAN
        return stamp - self.spawned_wall

    def kill(self) -> None:
        """SIGKILL this child (and only it): the crash."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30.0)

    def terminate(self, within: float) -> None:
        """SIGTERM and time the clean stop; SIGKILL this child past `within` seconds."""
        began = time.perf_counter()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(within)
        except subprocess.TimeoutExpired:
            self.kill()
            raise TimeoutError(f"{self.label}: no clean stop within {within}s") from None
        self.stop_seconds = time.perf_counter() - began
        if code != 0:
            raise RuntimeError(f"{self.label}: exited with {code} after SIGTERM")


# --- a backlog of results, then the crash ------------------------------------------------------


@dataclass
class Crash:
    flush_every: float
    acked: int = 0  # results the agents had acknowledged before the kill
    seconds: float = 0.0  # from the first ack to the kill
    cut_short: bool = False  # the prepared results were running out
    after: Backlog = field(default_factory=Backlog)


async def ingest_then_kill(
    c: Served,
    db: Path,
    plans: Sequence[list[tuple[int, bytes]]],
    backlog: float,
    window: int,
    within: float,
) -> Crash:
    """The fill's agents stream `plans` into `c` for `backlog` seconds after the first ack,
    then `c` is SIGKILLed mid-ingest."""
    crash = Crash(c.flush_every)
    digests = await asyncio.to_thread(digests_of, db)
    streams = [
        AgentStream(c.target, agent_name(a), agent_network(a), digests=digests)
        for a in range(len(plans))
    ]
    sending: list[asyncio.Task[dict[int, float]]] = []
    try:
        for s in streams:
            await s.open(within)
        await asyncio.gather(*(s.in_sync(within) for s in streams))
        deadline = Deadline(backlog + within)
        sending = [
            asyncio.create_task(s.send_batches(p, window, deadline, stamp))
            for s, p in zip(streams, plans, strict=True)
        ]
        await wait_for_state(lambda: any(s.acks for s in streams), within, "the first ack")
        first_ack = min(at for s in streams for at, _ in s.acks.values())

        def due() -> bool:
            if any(t.done() for t in sending):
                return True
            if any(len(s.acks) >= len(p) - 2 * window for s, p in zip(streams, plans, strict=True)):
                crash.cut_short = True
                return True
            return time.perf_counter() - first_ack >= backlog

        await wait_for_state(due, backlog + within, f"{backlog:g} s of ingest")
        for t in sending:
            if t.done():
                t.result()  # a stream that ended on its own: say why
        crash.acked = sum(a.stored for s in streams for _, a in s.acks.values())
        crash.seconds = time.perf_counter() - first_ack
    finally:
        c.kill()  # the crash (or, on an error, the end of this child)
        if sending:  # each ends on its closed stream; what has not within 10 s is cancelled
            await asyncio.wait(sending, timeout=10.0)
        for t in sending:
            t.cancel()
        await asyncio.gather(*sending, return_exceptions=True)
        for s in streams:
            with contextlib.suppress(Exception):
                await s.close()
    crash.after = backlog_of(db)
    return crash


def copy_database(db: Path, prefixes: Path, to: Path) -> None:
    """The database as it is (with its WAL and shared memory, as a crash left them)."""
    to.mkdir(parents=True, exist_ok=True)
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            shutil.copy2(f"{db}{suffix}", to / f"collector.db{suffix}")
    shutil.copy2(prefixes, to / "prefixes.csv")


# --- the benchmark -----------------------------------------------------------------------------


@dataclass
class RestartReport:
    urls: int
    agents: int
    history: int
    backlog: float
    flush_every: float
    filled: Filled | None = None
    db_bytes: int = 0
    starts: list[Served] = field(default_factory=list)
    crashes: list[Crash] = field(default_factory=list)
    text: str = ""


async def _restart(
    urls: int,
    agents: int,
    history: int,
    backlog: float,
    flush_every: float,
    batch_size: int,
    window: int,
    within: float,
    workdir: Path,
    keep: Path | None,
) -> RestartReport:
    report = RestartReport(urls, agents, history, backlog, flush_every)
    db, prefixes = workdir / "collector.db", workdir / "prefixes.csv"
    filled = report.filled = await asyncio.to_thread(fill, db, prefixes, urls, agents, history)
    report.db_bytes = file_size(db)
    after = 0.0  # every result of a plan is probed after every one of the plan before

    def plan(rate: float, lead: float) -> list[list[tuple[int, bytes]]]:
        """Results for `rate` results/s over the backlog and a lead-in, each agent's in time
        order from one minute (the first plan: ten minutes) before now, after those before."""
        nonlocal after
        per_agent = math.ceil(rate * (backlog + PLAN_LEAD) / agents)
        start = max(time.time() - per_agent * STEP - lead, after)
        after = start + per_agent * STEP + 1.0
        return [
            build_batches(
                a,
                filled.pairs,
                per_agent,
                batch_size,
                start,
                first_seq=seqs[a],
                step=STEP,
                stagger=0.00001,
            )
            for a in range(agents)
        ]

    seqs = [s + 1 for s in filled.seqs]
    hold = max(flush_every, 2 * backlog + 300)  # nothing is flushed while the first one ingests
    current: Served | None = None

    async def start(label: str, flush: float) -> Served:
        nonlocal current
        n = len(report.starts) + 1
        current = Served.spawn(label, db, prefixes, flush, workdir / f"collector-{n}.log")
        report.starts.append(current)
        await current.until_serving(within)
        return current

    try:
        plans = await asyncio.to_thread(plan, PLAN_RATE, 600.0)
        c = await start("first start after the fill", hold)
        report.crashes.append(await ingest_then_kill(c, db, plans, backlog, window, within))
        if keep is not None:
            await asyncio.to_thread(copy_database, db, prefixes, keep)
        c = await start(f"after SIGKILL, {backlog:g} s unflushed", flush_every)
        await asyncio.to_thread(c.terminate, within)
        seqs = [s + len(p) * batch_size for s, p in zip(seqs, plans, strict=True)]
        rate = max(2_000.0, 1.5 * report.crashes[0].acked / max(1.0, report.crashes[0].seconds))
        plans = await asyncio.to_thread(plan, rate, 60.0)
        c = await start("after SIGTERM", flush_every)
        report.crashes.append(await ingest_then_kill(c, db, plans, backlog, window, within))
        c = await start(f"after SIGKILL, flush every {flush_every:g} s", flush_every)
        await asyncio.to_thread(c.terminate, within)
        current = None
    finally:
        if current is not None:
            current.kill()
    report.db_bytes = file_size(db)
    return report


def benchmark(
    urls: int = 100_000,
    agents: int = 2,
    history: int = 3,
    backlog: float = 30.0,
    flush_every: float = 5.0,
    batch_size: int = 500,
    window: int = 8,
    within: float = 600.0,
    keep: Path | None = None,
) -> RestartReport:
    with tempfile.TemporaryDirectory(prefix="bench-restart-") as tmp:
        work = _restart(urls, agents, history, backlog, flush_every, batch_size, window, within,
                        Path(tmp), keep)  # fmt: skip
        report = run(work)
    report.text = _render(report)
    return report


def _render(r: RestartReport) -> str:
    f = r.filled
    assert f is not None
    fill_rows: list[list[object]] = [
        ["URLs / agents", f"{r.urls:,} / {r.agents}"],
        ["results stored by the fill", f.results],
        ["fill through Store (s)", f.seconds],
        ["database at the end", mib(r.db_bytes)],
    ]
    for i, c in enumerate(r.crashes, 1):
        rate = c.acked / c.seconds if c.seconds else 0.0
        short = ", cut short: the prepared results ran out" if c.cut_short else ""
        fill_rows += [
            [f"ingest {i}: child --flush-every", f"{c.flush_every:g} s"],
            [f"ingest {i}: results acked before SIGKILL", c.acked],
            [f"ingest {i}: seconds from first ack to SIGKILL", f"{c.seconds:.1f}{short}"],
            [f"ingest {i}: results/s", rate],
            [f"ingest {i}: unflushed at the kill: URLs / results",
             f"{c.after.urls:,} / {c.after.results:,}"],
            [f"ingest {i}: unflushed results span (s)", c.after.span],
            [f"ingest {i}: WAL at the kill", mib(c.after.wal_bytes)],
        ]  # fmt: skip
    out = [table(f"restart: {r.urls:,} URLs, {r.agents} agents", ["figure", "value"], fill_rows)]

    def row(label: str, value: Any) -> list[object]:
        return [label, *(value(s) for s in r.starts)]

    rows: list[list[object]] = [
        row("child --flush-every (s)", lambda s: s.flush_every),
        row("unflushed URLs before the start", lambda s: s.before.urls),
        row("results after the last flush", lambda s: s.before.results),
        row("gRPC port accepting (s)", lambda s: s.marks.get("port", NAN)),
        row("folds_resumed logged (s)", lambda s: s.resumed_at),
        row("folds_resumed: urls", lambda s: s.resumed[0] if s.resumed else NAN),
        row("folds_resumed: refolds", lambda s: s.resumed[1] if s.resumed else NAN),
        row("folds_resumed: seconds", lambda s: s.resumed[2] if s.resumed else NAN),
        row("collector_started logged (s)", lambda s: s.started_line_at),
        row("/metrics answering (s)", lambda s: s.marks.get("metrics", NAN)),
        row("gRPC health SERVING (s)", lambda s: s.marks.get("health", NAN)),
        row("serving (s)", lambda s: s.marks.get("serving", NAN)),
        row("child CPU at serving (s)", lambda s: s.cpu),
        row("child peak RSS at serving (MiB)", lambda s: s.peak_rss / 2**20),
        row("clean stop after SIGTERM (s)", lambda s: s.stop_seconds),
        row(f"target <= {TARGET_SECONDS:g} s", lambda s: (
            "ok" if s.marks.get("serving", math.inf) <= TARGET_SECONDS else "MISSED")),
    ]  # fmt: skip
    headers = ["figure", *(s.label for s in r.starts)]
    out.append(table("start to serving, from the spawn", headers, rows))
    return "\n\n".join(out)


def main(argv: Sequence[str] | None = None) -> RestartReport:
    parser = argparse.ArgumentParser(
        prog="python -m bench restart", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--urls", type=int, default=100_000)
    parser.add_argument("--agents", type=int, default=2)
    parser.add_argument("--history", type=int, default=3, help="results per URL and agent")
    parser.add_argument(
        "--backlog", type=float, default=30.0, help="seconds of ingest before each SIGKILL"
    )
    parser.add_argument(
        "--flush-every", type=float, default=5.0, help="the restarted collectors' --flush-every"
    )
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--window", type=int, default=8, help="unacknowledged batches per agent")
    parser.add_argument("--seconds", type=float, default=600.0, help="time cap of each phase")
    parser.add_argument(
        "--keep-crashed", type=Path, help="copy the database as the first crash left it here"
    )
    parser.add_argument("--quick", action="store_true", help="10,000 URLs, a 5 s backlog")
    args = parser.parse_args(argv)
    if args.agents < 2:
        parser.error("--agents: at least 2 (the quorum of the default policy)")
    if args.quick:
        args.urls, args.backlog = min(args.urls, 10_000), min(args.backlog, 5.0)
    report = benchmark(
        args.urls, args.agents, args.history, args.backlog, args.flush_every, args.batch_size,
        args.window, args.seconds, args.keep_crashed,
    )  # fmt: skip
    print(report.text)
    sys.stdout.flush()
    return report


if __name__ == "__main__":
    main()
