"""What the benchmarks share: deadlines, CPU and memory of processes, child processes, tables,
a collector in a child process, report submission and a simulated agent stream.

Only loopback (127.0.0.0/8) is ever a target. Every wait polls against a deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import ipaddress
import json
import os
import platform
import selectors
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

import grpc

from protos.takedown.v1 import takedown_pb2 as pb
from protos.takedown.v1 import takedown_pb2_grpc as pb_grpc

T = TypeVar("T")

LOOPBACK = ipaddress.ip_network("127.0.0.0/8")
CLK_TCK = os.sysconf("SC_CLK_TCK")
MIB = 1024 * 1024
GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", 16 * MIB),
    ("grpc.max_send_message_length", 16 * MIB),
]
SUBMIT_CHUNK = 10_000  # collector.service.MAX_REPORTS_PER_SUBMIT


def require_loopback(host: str) -> str:
    """The host, if it is a loopback address; benchmarks never send traffic anywhere else."""
    if ipaddress.ip_address(host) not in LOOPBACK:
        raise ValueError(f"{host} is not in {LOOPBACK}: benchmarks only use loopback")
    return host


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` (a loopback address) just now."""
    with socket.socket() as s:
        s.bind((require_loopback(host), 0))
        return int(s.getsockname()[1])


class Deadline:
    """A point in monotonic time that every bounded loop checks."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.at = time.monotonic() + seconds

    def left(self) -> float:
        return max(0.0, self.at - time.monotonic())

    @property
    def expired(self) -> bool:
        return time.monotonic() >= self.at


async def wait_for_state(
    condition: Callable[[], bool | Awaitable[bool]], within: float, what: str
) -> None:
    """Poll `condition` until it holds; TimeoutError naming `what` after `within` seconds."""
    deadline = Deadline(within)
    while True:
        value = condition()
        if not isinstance(value, bool):
            value = await value
        if value:
            return
        if deadline.expired:
            raise TimeoutError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.02)


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU seconds of a process (all its threads); this process when pid is None."""
    if pid is None:
        return time.process_time()
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat.rsplit(")", 1)[1].split()  # fields[0] is field 3 (state) of proc(5)
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def descendants(pid: int) -> list[int]:
    """The process ids of `pid`'s children, theirs, and so on (Linux /proc), alive now."""
    found: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{parent}/task").iterdir():
                kids = [int(c) for c in (task / "children").read_text().split()]
                found += kids
                todo += kids
    return found


def family_cpu(pid: int) -> dict[int, float]:
    """CPU seconds of `pid` and of each of its descendants (worker processes), by pid."""
    out: dict[int, float] = {}
    for p in (pid, *descendants(pid)):
        with contextlib.suppress(OSError):
            out[p] = cpu_seconds(p)
    return out


def family_cpu_since(pid: int, before: dict[int, float]) -> float:
    """CPU seconds `pid` and its descendants used since `before` (from `family_cpu`)."""
    return sum(cpu - before.get(p, 0.0) for p, cpu in family_cpu(pid).items())


def memory(pid: int | None = None) -> tuple[int, int]:
    """(resident, peak resident) bytes of a process, from /proc/PID/status."""
    rss = peak = 0
    status = Path(f"/proc/{pid or 'self'}/status").read_text()
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
        elif line.startswith("VmHWM:"):
            peak = int(line.split()[1]) * 1024
    return rss, peak


def reset_peak_rss(pid: int | None = None) -> None:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0: write 5 to clear_refs); ignored elsewhere."""
    with contextlib.suppress(OSError):
        Path(f"/proc/{pid or 'self'}/clear_refs").write_text("5")


def mib(n: float) -> str:
    return f"{n / MIB:,.1f} MiB"


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100); 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(p / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def table(title: str, headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain aligned text table; numbers right-aligned."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    numeric = [all(_is_number(row[i]) for row in rows) and bool(rows) for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        return "  ".join(
            v.rjust(w) if num else v.ljust(w)
            for v, w, num in zip(values, widths, numeric, strict=True)
        ).rstrip()

    out = [f"== {title}", line(headers), line(["-" * w for w in widths])]
    out.extend(line(r) for r in cells)
    return "\n".join(out)


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _cell(v: object) -> str:
    if isinstance(v, float):
        if v != v:  # NaN: not measured
            return "n/a"
        return f"{v:,.0f}" if abs(v) >= 100 else f"{v:,.3g}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


def machine() -> dict[str, str]:
    """What the figures were measured on."""
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    total = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                total = int(line.split()[1]) * 1024
    versions = {}
    for dist in ("grpcio", "aiohttp", "protobuf", "prometheus-client"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = "-"
    return {
        "cpu": f"{model} x {os.cpu_count()}",
        "memory": f"{total / 2**30:.1f} GiB",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        **versions,
    }


def loops() -> list[str]:
    """Event loops available: the default one, and uvloop when installed."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return ["asyncio"]
    return ["asyncio", "uvloop"]


def run(main: Coroutine[Any, Any, T], loop: str = "asyncio") -> T:
    """Run a coroutine on the default loop, or on uvloop when asked for (and installed)."""
    if loop == "uvloop":
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)


def file_size(path: Path) -> int:
    """Size of an SQLite database with its WAL and shared-memory files."""
    total = 0
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(OSError):
            total += Path(f"{path}{suffix}").stat().st_size
    return total


# --- child processes -------------------------------------------------------------------------


class Child:
    """A benchmark child process (`python -m MODULE ...`) speaking JSON lines on stdout.

    The child prints one JSON line when ready and stops when its stdin closes; `stop` closes
    it and, past the deadline, signals this child's own pid only.
    """

    def __init__(self, proc: subprocess.Popen[str], what: str) -> None:
        self.proc = proc
        self.what = what
        self.info: dict[str, Any] = {}

    @classmethod
    def start(
        cls, module: str, args: Sequence[str], within: float = 60.0, stderr: IO[str] | None = None
    ) -> Child:
        proc = subprocess.Popen(  # noqa: S603 - our own interpreter and module
            [sys.executable, "-m", module, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            cwd=Path(__file__).resolve().parent.parent,
        )
        child = cls(proc, module)
        try:
            child.info = child.read(within)
        except BaseException:
            child.stop(5.0)
            raise
        return child

    @property
    def pid(self) -> int:
        return self.proc.pid

    def read(self, within: float) -> dict[str, Any]:
        """The child's next JSON line; TimeoutError after `within` seconds, EOFError on exit."""
        assert self.proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not sel.select(within):
                raise TimeoutError(f"{self.what} said nothing within {within}s")
        line = self.proc.stdout.readline()
        if not line:
            raise EOFError(f"{self.what} exited with {self.proc.wait(5)}")
        value: dict[str, Any] = json.loads(line)
        return value

    def send(self, message: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(message) + "\n")
        self.proc.stdin.flush()

    def stop(self, within: float = 30.0) -> int:
        """Close stdin and wait; then SIGTERM, then SIGKILL this child only."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            with contextlib.suppress(BrokenPipeError):
                self.proc.stdin.close()
        try:
            for sig in (None, signal.SIGTERM, signal.SIGKILL):
                if sig is not None and self.proc.poll() is None:
                    self.proc.send_signal(sig)
                try:
                    return self.proc.wait(within if sig is None else 10.0)
                except subprocess.TimeoutExpired:
                    continue
            return self.proc.wait()
        finally:
            if self.proc.stdout is not None:
                self.proc.stdout.close()


def child_say(message: dict[str, Any]) -> None:
    """In a child: one JSON line to the parent."""
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def stdin_lines(
    loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[dict[str, Any] | None]
) -> None:
    """In a child: forward each JSON line of stdin to `queue`, then None at EOF (a thread)."""

    def pump() -> None:
        for line in sys.stdin:
            if line.strip():
                loop.call_soon_threadsafe(queue.put_nowait, json.loads(line))
        loop.call_soon_threadsafe(queue.put_nowait, None)

    threading.Thread(target=pump, name="stdin", daemon=True).start()


# --- a collector in a child process -----------------------------------------------------------


def start_collector(
    db: Path | str,
    prefixes: Path | None = None,
    interval: float = 300.0,
    within: float = 120.0,
    metrics_max_age: float = 0.0,
    log_key_file: Path | None = None,
    stderr: IO[str] | None = None,
) -> Child:
    """A real collector (grpc.aio, a SQLite file or a postgresql:// database, /metrics) in a
    child process on 127.0.0.1; with `log_key_file`, keeping the evidence log and checking
    agents' signatures."""
    args = ["collector", "--db", str(db), "--interval", str(interval)]
    args += ["--metrics-max-age", str(metrics_max_age)]
    if log_key_file is not None:
        args += ["--log-key-file", str(log_key_file)]
    if prefixes is not None:
        args += ["--prefixes", str(prefixes)]
    return Child.start("bench.common", args, within, stderr=stderr)


async def _collector_main(
    db: Path | str,
    prefixes: Path | None,
    interval: float,
    metrics_max_age: float,
    log_key_file: Path | None = None,
) -> None:
    from collector.schedule import Planner
    from collector.server import Collector, CollectorConfig

    config = CollectorConfig(
        db=db,
        listen="127.0.0.1:0",
        metrics_listen="127.0.0.1:0",
        prefixes=prefixes,
        planner=Planner.fixed(interval),
        replan_every=3600.0,
        metrics_max_age=metrics_max_age,
        log_key_file=log_key_file,
    )
    collector = Collector(config)
    await collector.start()
    queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
    stdin_lines(asyncio.get_running_loop(), queue)
    child_say(
        {
            "grpc_port": collector.grpc_port,
            "metrics_port": collector.metrics_port,
            "pid": os.getpid(),
        }
    )
    try:
        while await queue.get() is not None:
            pass
    finally:
        await collector.stop(grace=5.0)


# --- the wire, spoken like agent/link.py and collector/importer.py -----------------------------


async def submit_urls(
    target: str, urls: Sequence[str], notified_at: float, reference_prefix: str = ""
) -> list[int]:
    """Report every URL through Intake.Submit (chunks of 10,000); return their url ids in order."""
    ids: list[int] = []
    async with grpc.aio.insecure_channel(target, options=GRPC_OPTIONS) as channel:
        stub = pb_grpc.IntakeStub(channel)
        for start in range(0, len(urls), SUBMIT_CHUNK):
            chunk = urls[start : start + SUBMIT_CHUNK]
            request = pb.SubmitRequest(
                reports=[
                    pb.Report(
                        url=url,
                        notified_at_unix_us=round(notified_at * 1_000_000),
                        reference=f"{reference_prefix}{start + i}" if reference_prefix else "",
                    )
                    for i, url in enumerate(chunk)
                ]
            )
            response = await stub.Submit(request, timeout=600)
            for outcome in response.outcomes:
                if outcome.status == pb.SUBMIT_STATUS_REJECTED:
                    raise RuntimeError(f"report rejected: {outcome.error}")
                ids.append(outcome.url_id)
    return ids


def _identity(data: bytes) -> bytes:
    return data


@dataclass
class AgentStream:
    """One simulated agent's stream, in the order agent/link.py speaks it.

    Hello (with the digests it holds), Welcome, AssignmentUpdate messages until in_sync,
    then ResultBatch messages, each answered by a BatchAck. Messages are sent as bytes the
    caller serialized beforehand, so the load generator spends its CPU on the wire.
    """

    target: str
    name: str
    network: str = "bench"
    digests: Sequence[int] = ()
    public_key: bytes = b""  # the agent's Ed25519 key, for a collector that checks signatures
    upserts: int = 0
    updates: int = 0
    replaced_buckets: int = 0
    hello_at: float = 0.0
    in_sync_at: float = 0.0
    agent_id: int = 0
    acks: dict[int, tuple[float, pb.BatchAck]] = field(default_factory=dict)
    on_update: Callable[[pb.AssignmentUpdate], None] | None = None
    _channel: grpc.aio.Channel | None = None
    _call: Any = None
    _reader: asyncio.Task[None] | None = None
    _in_sync: asyncio.Event = field(default_factory=asyncio.Event)
    _acked: asyncio.Event = field(default_factory=asyncio.Event)

    async def open(self, within: float) -> None:
        """Connect, say hello and wait for the welcome."""
        self._channel = grpc.aio.insecure_channel(self.target, options=GRPC_OPTIONS)
        connect = self._channel.stream_stream(
            "/takedown.v1.AgentLink/Connect",
            request_serializer=_identity,
            response_deserializer=pb.CollectorMessage.FromString,
        )
        self._call = connect()  # type: ignore[call-arg]
        hello = pb.AgentMessage(
            hello=pb.Hello(
                agent=self.name,
                network=self.network,
                version="bench",
                sent_at_unix_us=time.time_ns() // 1000,
                assignment_digests=list(self.digests),
                public_key=self.public_key,
            )
        )
        self.hello_at = time.perf_counter()
        await self._call.write(hello.SerializeToString())
        first = await asyncio.wait_for(self._call.read(), within)
        if not isinstance(first, pb.CollectorMessage) or not first.HasField("welcome"):
            raise RuntimeError(f"{self.name}: no welcome")
        self.agent_id = first.welcome.agent_id
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        while True:
            message = await self._call.read()
            if not isinstance(message, pb.CollectorMessage):
                return
            kind = message.WhichOneof("kind")
            if kind == "ack":
                self.acks[message.ack.batch_id] = (time.perf_counter(), message.ack)
                self._acked.set()
            elif kind == "assignment":
                update = message.assignment
                self.updates += 1
                self.upserts += len(update.upsert)
                self.replaced_buckets += len(update.replace_buckets)
                if self.on_update is not None:
                    self.on_update(update)
                if update.in_sync and not self._in_sync.is_set():
                    self.in_sync_at = time.perf_counter()
                    self._in_sync.set()

    async def in_sync(self, within: float) -> float:
        """Wait for in_sync; return seconds from hello to in_sync."""
        await self._wait(self._in_sync, within, "in_sync")
        return self.in_sync_at - self.hello_at

    async def _wait(self, event: asyncio.Event, within: float, what: str) -> None:
        assert self._reader is not None
        waiter = asyncio.create_task(event.wait())
        done, _ = await asyncio.wait(
            {waiter, self._reader}, timeout=within, return_when=asyncio.FIRST_COMPLETED
        )
        waiter.cancel()
        if self._reader in done:
            self._reader.result()
            raise RuntimeError(f"{self.name}: stream closed while waiting for {what}")
        if not done:
            raise TimeoutError(f"{self.name}: no {what} within {within}s")

    async def send_batches(
        self,
        batches: Sequence[tuple[int, bytes]],
        window: int,
        deadline: Deadline,
        stamp: Callable[[bytes], bytes] = _identity,
    ) -> dict[int, float]:
        """Send serialized batches, at most `window` unacknowledged; return batch id → sent time.

        `stamp` finishes each message as it is sent. Stops early when the deadline passes,
        then waits for the acks of what it sent.
        """
        sent: dict[int, float] = {}
        for batch_id, data in batches:
            while len(sent) - len(self.acks) >= window:
                self._acked.clear()
                if len(sent) - len(self.acks) >= window:
                    await self._wait(self._acked, deadline.left() + 30.0, "an ack")
            if deadline.expired:
                break
            sent[batch_id] = time.perf_counter()
            await self._call.write(stamp(data))
        while len(self.acks) < len(sent):
            self._acked.clear()
            if len(self.acks) < len(sent):
                await self._wait(self._acked, deadline.left() + 60.0, "the last acks")
        return sent

    async def close(self) -> None:
        if self._call is not None:
            with contextlib.suppress(Exception):
                await self._call.done_writing()
            self._call.cancel()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await self._reader
        if self._channel is not None:
            await self._channel.close(None)


def main(argv: Sequence[str] | None = None) -> None:
    """Child entry points: `python -m bench.common collector --db PATH [...]`."""
    from collector.store.sql import database  # a file, or a postgresql:// URI

    parser = argparse.ArgumentParser(prog="python -m bench.common")
    sub = parser.add_subparsers(dest="command", required=True)
    col = sub.add_parser("collector", help="a collector on 127.0.0.1 (ports on stdout)")
    col.add_argument("--db", type=database, required=True)
    col.add_argument("--prefixes", type=Path)
    col.add_argument("--interval", type=float, default=300.0)
    col.add_argument("--metrics-max-age", type=float, default=0.0)
    col.add_argument("--log-key-file", type=Path)
    args = parser.parse_args(argv)
    if args.command == "collector":
        asyncio.run(
            _collector_main(
                args.db, args.prefixes, args.interval, args.metrics_max_age, args.log_key_file
            )
        )


if __name__ == "__main__":
    main()
