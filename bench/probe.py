"""Probe throughput: the agent's real Prober beside a bare aiohttp loop and blackbox_exporter.

A minimal HTTP/1.1 server in a child process serves 10 KiB bodies on 127.0.0.1, over HTTP and
over HTTPS (a trustme certificate). Three contenders fetch the same URLs at the same
concurrency, one after the other:

* agent: ``agent.probe.Prober`` (address policy allowing 127.0.0.0/8, body into SHA-256);
* bare: ``aiohttp`` GET + ``hashlib.sha256`` over the body, the ceiling for Python;
* blackbox: Prometheus blackbox_exporter probing the URLs through its ``/probe`` endpoint,
  driven by a local client (keep-alive to the exporter); its own CPU is read from
  ``/proc/PID/stat``.

Modes: ``http`` and ``https`` open a new connection per probe (as agents do); ``keepalive``
reuses connections (``ProbeConfig.keep_alive``), to show the cost of HTTP alone. blackbox_exporter
opens a connection per probe whatever it is asked, so it is not run in ``keepalive`` mode.

Every run stops at ``--probes`` probes or ``--seconds`` seconds, whichever comes first.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import ipaddress
import json
import logging
import math
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from agent.guard import AddressPolicy
from agent.probe import ProbeConfig, Prober
from agent.result import ErrorClass, ProbeResult, TlsCheck
from bench.common import (
    Child,
    Deadline,
    child_say,
    cpu_seconds,
    free_port,
    loops,
    require_loopback,
    run,
    stdin_lines,
    table,
    wait_for_state,
)

MODES = ("http", "https", "keepalive")
HOST = "127.0.0.1"
BODY_BYTES = 10 * 1024
BLACKBOX = "prometheus-blackbox-exporter"
DISTINCT_URLS = 1000

# Targets of issue 7 (probes per CPU-second; share of the bare loop).
TARGET_VS_BLACKBOX = 1.5
TARGET_VS_BARE = 0.85


# --- the server (child process) ----------------------------------------------------------------


def _response(body: bytes, close: bool) -> bytes:
    head = (
        "HTTP/1.1 200 OK\r\n"
        "Content-Type: text/html\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"Connection: {'close' if close else 'keep-alive'}\r\n\r\n"
    )
    return head.encode() + body


class _Http(asyncio.Protocol):
    """Answers every GET with the same page; keeps the connection unless asked to close."""

    def __init__(self, keep: bytes, close: bytes) -> None:
        self.keep = keep
        self.close = close
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            head, self.buffer = self.buffer[:end].lower(), self.buffer[end + 4 :]
            assert self.transport is not None
            # The client closes: the server never holds the TIME_WAIT side.
            self.transport.write(self.close if b"connection: close" in head else self.keep)


async def _serve(body_bytes: int, cert: Path, key: Path) -> None:
    loop = asyncio.get_running_loop()
    body = (b"<html><body>" + b"x" * body_bytes)[:body_bytes]
    keep, close = _response(body, close=False), _response(body, close=True)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    http = await loop.create_server(lambda: _Http(keep, close), HOST, 0, backlog=4096)
    https = await loop.create_server(lambda: _Http(keep, close), HOST, 0, ssl=tls, backlog=4096)
    queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
    stdin_lines(loop, queue)
    child_say(
        {
            "http_port": http.sockets[0].getsockname()[1],
            "https_port": https.sockets[0].getsockname()[1],
        }
    )
    while await queue.get() is not None:
        pass
    http.close()
    https.close()


# --- the contenders ----------------------------------------------------------------------------


@dataclass
class Run:
    who: str
    mode: str
    probes: int
    ok: int
    wall: float
    cpu: float  # CPU seconds of the process doing the probing
    note: str = ""

    @property
    def rate(self) -> float:
        return self.probes / self.wall if self.wall > 0 else 0.0

    @property
    def cpu_per_1000(self) -> float:
        return 1000 * self.cpu / self.probes if self.probes else math.nan

    @property
    def per_cpu_second(self) -> float:
        return self.probes / self.cpu if self.cpu > 0 else math.nan


async def _drive(
    urls: Sequence[str],
    n: int,
    concurrency: int,
    seconds: float,
    one: Callable[[str], Awaitable[bool]],
) -> tuple[int, int, float]:
    """`concurrency` workers call `one` until n calls or `seconds`; (calls, ok, wall seconds)."""
    deadline = Deadline(seconds)
    started = time.perf_counter()
    counter = 0
    ok = 0

    async def worker() -> None:
        nonlocal counter, ok
        while counter < n and not deadline.expired:
            url = urls[counter % len(urls)]
            counter += 1
            good = await one(url)
            ok += good

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return counter, ok, time.perf_counter() - started


async def _measure(
    who: str,
    mode: str,
    urls: Sequence[str],
    n: int,
    concurrency: int,
    seconds: float,
    one: Callable[[str], Awaitable[bool]],
    pid: int | None = None,
) -> Run:
    await _drive(urls, 2 * concurrency, concurrency, seconds, one)  # warm-up, not counted
    cpu0 = cpu_seconds(pid)
    done, ok, wall = await _drive(urls, n, concurrency, seconds, one)
    return Run(who, mode, done, ok, wall, cpu_seconds(pid) - cpu0)


def _probe_config(mode: str, concurrency: int) -> ProbeConfig:
    return ProbeConfig(
        total_timeout=10.0,
        connect_timeout=5.0,
        read_timeout=5.0,
        concurrency=concurrency,
        per_host=concurrency,  # one host here; agents spread probes over many
        keep_alive=mode == "keepalive",
    )


def _good(result: ProbeResult, mode: str) -> bool:
    """A full 200 whose certificate (over HTTPS) verified against the benchmark's CA."""
    tls = TlsCheck.VERIFIED if mode == "https" else TlsCheck.PLAINTEXT
    return (
        result.error is ErrorClass.NONE
        and result.status == 200
        and result.body_bytes == BODY_BYTES
        and result.tls is tls
    )


async def run_agent(
    mode: str, urls: Sequence[str], n: int, concurrency: int, seconds: float, ca_pem: str
) -> Run:
    """The Prober as agents run it: no verification in the handshake, the chain checked after."""
    policy = AddressPolicy.build(allow=["127.0.0.0/8"])
    async with Prober(_probe_config(mode, concurrency), policy, trust_pem=ca_pem) as prober:

        async def one(url: str) -> bool:
            return _good(await prober.probe(1, url), mode)

        return await _measure("agent Prober", mode, urls, n, concurrency, seconds, one)


async def run_agent_loop(
    mode: str, urls: Sequence[str], n: int, concurrency: int, seconds: float, ca_pem: str
) -> Run:
    """The whole probing path of an agent as the shipped units run it, with --state-dir.

    ``agent.main.Agent`` with its schedule, per-host queues, Prober and SQLite spool; the URLs
    are assigned at a short interval so probing never pauses. Its collector address is closed,
    so the link only retries in the background (sending is not what this measures) and the
    results stay in the spool. CPU is this whole process's, from /proc.
    """
    from agent.assignment import AssignmentChange
    from agent.main import Agent, AgentConfig

    quiet = logging.getLogger("agent")  # its retries towards the closed collector address
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="bench-agent-") as tmp:
        agent = Agent(
            AgentConfig(
                collector=f"{HOST}:{free_port(HOST)}",
                name="bench",
                network="bench",
                probe=_probe_config(mode, concurrency),
                allow_private=(ipaddress.ip_network("127.0.0.0/8"),),
                first_spread=0.0,
                state_dir=Path(tmp),
            ),
            trust_pem=ca_pem,
        )
        interval = max(0.05, len(urls) / 20_000)  # due faster than any contender probes
        agent._assign(AssignmentChange(upsert=tuple((i, u, interval) for i, u in enumerate(urls))))
        stop = asyncio.Event()
        task = asyncio.create_task(agent.run(stop))
        try:
            await wait_for_state(lambda: agent.probed >= 2 * concurrency, seconds, "warm-up")
            pid = os.getpid()
            cpu0, wall0, done0 = cpu_seconds(pid), time.perf_counter(), agent.probed
            good0 = agent.probes_by_tls.get(("verified" if mode == "https" else "plaintext"), 0)
            with contextlib.suppress(TimeoutError):  # --seconds caps the run
                await wait_for_state(
                    lambda: agent.probed - done0 >= n or task.done(), seconds, "probes"
                )
            cpu, wall = cpu_seconds(pid) - cpu0, time.perf_counter() - wall0
            done = agent.probed - done0
            good = agent.probes_by_tls.get(("verified" if mode == "https" else "plaintext"), 0)
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
            quiet.setLevel(level)
    errors = sum(v for k, v in agent.probes_by_error.items() if k != "none")
    return Run(
        "agent loop", mode, done, good - good0, wall, cpu, f"with --state-dir; {errors} errors"
    )


async def run_bare(
    mode: str, urls: Sequence[str], n: int, concurrency: int, seconds: float, tls: ssl.SSLContext
) -> Run:
    connector = aiohttp.TCPConnector(
        limit=concurrency, force_close=mode != "keepalive", ssl=tls, use_dns_cache=False
    )
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(url: str) -> bool:
            async with session.get(url) as response:
                digest = hashlib.sha256()
                size = 0
                async for chunk in response.content.iter_chunked(64 * 1024):
                    digest.update(chunk)
                    size += len(chunk)
                digest.digest()
                return response.status == 200 and size == BODY_BYTES

        return await _measure("bare aiohttp", mode, urls, n, concurrency, seconds, one)


async def run_blackbox(
    mode: str,
    urls: Sequence[str],
    n: int,
    concurrency: int,
    seconds: float,
    ca_file: Path,
    workdir: Path,
) -> Run:
    binary = shutil.which(BLACKBOX)
    if binary is None:
        return Run("blackbox_exporter", mode, 0, 0, 0.0, 0.0, f"{BLACKBOX} not installed")
    config = workdir / "blackbox.yml"
    config.write_text(
        json.dumps(  # JSON is YAML
            {
                "modules": {
                    "bench": {
                        "prober": "http",
                        "timeout": "10s",
                        "http": {
                            "preferred_ip_protocol": "ip4",
                            "tls_config": {"ca_file": str(ca_file)},
                        },
                    }
                }
            }
        )
    )
    port = free_port(HOST)
    proc = subprocess.Popen(  # noqa: ASYNC220, S603 - a fixed binary; waited on below
        [
            binary,
            f"--config.file={config}",
            f"--web.listen-address={HOST}:{port}",
            "--log.level=error",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={"PATH": os.environ.get("PATH", ""), "GOMAXPROCS": str(os.cpu_count() or 1)},
    )
    try:
        base = f"http://{HOST}:{port}"
        connector = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def healthy() -> bool:
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(f"{base}/-/healthy") as response:
                        return response.status == 200
                return False

            await wait_for_state(healthy, 30.0, "blackbox_exporter to listen")

            async def one(url: str) -> bool:
                params = {"module": "bench", "target": url}
                async with session.get(f"{base}/probe", params=params) as response:
                    text = await response.text()
                return "\nprobe_success 1\n" in text

            driver0 = cpu_seconds()
            result = await _measure(
                "blackbox_exporter", mode, urls, n, concurrency, seconds, one, proc.pid
            )
            driver = 1000 * (cpu_seconds() - driver0) / max(1, result.probes)
            result.note = f"driver CPU {driver:.3f} s/1000 (not counted)"
            return result
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


# --- the benchmark -----------------------------------------------------------------------------


@dataclass
class ProbeReport:
    runs: list[Run]
    concurrency: int
    rounds: int
    text: str

    def find(self, who: str, mode: str) -> Run | None:
        return next((r for r in self.runs if r.who.startswith(who) and r.mode == mode), None)

    def ratios(self) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        bases = {mode: (self.find("bare", mode), self.find("blackbox", mode)) for mode in MODES}
        for name, who in (("agent", "agent Prober"), ("loop", "agent loop")):
            for mode in MODES:
                agent = self.find(who, mode)
                bare, bb = bases[mode]
                if agent is None or not agent.probes:
                    continue
                row = out.setdefault(mode, {})
                if bare is not None and bare.probes:
                    row[f"{name}/bare probes/s"] = agent.rate / bare.rate
                    row[f"{name}/bare probes/CPU-s"] = agent.per_cpu_second / bare.per_cpu_second
                if bb is not None and bb.probes:
                    row[f"{name}/blackbox probes/CPU-s"] = agent.per_cpu_second / bb.per_cpu_second
        return out


def benchmark(
    probes: int = 5000,
    concurrency: int = 32,
    seconds: float = 30.0,
    modes: Sequence[str] = MODES,
    blackbox: bool = True,
    loop: str = "asyncio",
    who: Sequence[str] = ("agent", "loop", "bare", "blackbox"),
    rounds: int = 1,
) -> ProbeReport:
    """Run every contender in every mode against a server child process; print the tables."""
    import trustme

    require_loopback(HOST)
    with tempfile.TemporaryDirectory(prefix="bench-probe-") as tmp:
        workdir = Path(tmp)
        ca = trustme.CA()
        server_cert = ca.issue_cert(HOST)
        cert, key, ca_file = workdir / "cert.pem", workdir / "key.pem", workdir / "ca.pem"
        server_cert.cert_chain_pems[0].write_to_path(str(cert))
        server_cert.private_key_pem.write_to_path(str(key))
        ca.cert_pem.write_to_path(str(ca_file))
        server = Child.start(
            "bench.probe", ["--serve", "--cert", str(cert), "--key", str(key)], within=30.0
        )
        try:
            runs = run(
                _contenders(
                    server.info,
                    ca_file,
                    workdir,
                    probes,
                    concurrency,
                    seconds,
                    modes,
                    blackbox,
                    who,
                    rounds,
                ),
                loop,
            )
        finally:
            server.stop(10.0)
    report = ProbeReport(runs, concurrency, rounds, "")
    report.text = _render(report)
    return report


async def _contenders(
    ports: dict[str, int],
    ca_file: Path,
    workdir: Path,
    n: int,
    concurrency: int,
    seconds: float,
    modes: Sequence[str],
    blackbox: bool,
    who: Sequence[str] = ("agent", "loop", "bare", "blackbox"),
    rounds: int = 1,
) -> list[Run]:
    tls = ssl.create_default_context(cafile=str(ca_file))
    ca_pem = await asyncio.to_thread(ca_file.read_text)
    runs: list[Run] = []
    for _ in range(rounds):  # interleaved, so drift on a shared machine hits all alike
        for mode in modes:
            scheme, port = (
                ("https", ports["https_port"]) if mode == "https" else ("http", ports["http_port"])
            )
            urls = [f"{scheme}://{HOST}:{port}/page/{i}" for i in range(DISTINCT_URLS)]
            if "agent" in who:
                runs.append(await run_agent(mode, urls, n, concurrency, seconds, ca_pem))
            if "loop" in who and mode != "keepalive":
                runs.append(await run_agent_loop(mode, urls, n, concurrency, seconds, ca_pem))
            if "bare" in who:
                runs.append(await run_bare(mode, urls, n, concurrency, seconds, tls))
            if blackbox and "blackbox" in who and mode != "keepalive":
                runs.append(
                    await run_blackbox(mode, urls, n, concurrency, seconds, ca_file, workdir)
                )
    return pool(runs)


def pool(runs: Sequence[Run]) -> list[Run]:
    """One run per (who, mode): probes, time and CPU added up over the rounds."""
    pooled: dict[tuple[str, str], Run] = {}
    for r in runs:
        p = pooled.get((r.who, r.mode))
        if p is None:
            pooled[(r.who, r.mode)] = Run(r.who, r.mode, r.probes, r.ok, r.wall, r.cpu, r.note)
        else:
            p.probes, p.ok, p.wall, p.cpu = (
                p.probes + r.probes,
                p.ok + r.ok,
                p.wall + r.wall,
                p.cpu + r.cpu,
            )
    return sorted(pooled.values(), key=lambda r: (MODES.index(r.mode), r.who))


def _render(report: ProbeReport) -> str:
    rows = [
        [r.mode, r.who, r.probes, r.ok, r.rate, r.cpu_per_1000, r.per_cpu_second, r.note]
        for r in report.runs
    ]
    parts = [
        table(
            f"probe throughput, {BODY_BYTES // 1024} KiB bodies, concurrency"
            f" {report.concurrency}, {report.rounds} round(s) pooled",
            ["mode", "who", "probes", "ok", "probes/s", "CPU s/1000", "probes/CPU-s", "note"],
            rows,
        )
    ]
    ratio_rows = []
    targets = {
        "agent/bare probes/s": TARGET_VS_BARE,
        "agent/bare probes/CPU-s": TARGET_VS_BARE,
        "agent/blackbox probes/CPU-s": TARGET_VS_BLACKBOX,
    }
    for mode, ratios in report.ratios().items():
        for name, value in ratios.items():
            target = targets[name.replace("loop/", "agent/")]
            ratio_rows.append(
                [mode, name, value, f">= {target}", "ok" if value >= target else "MISSED"]
            )
    parts.append(table("probe ratios", ["mode", "ratio", "value", "target", ""], ratio_rows))
    return "\n\n".join(parts)


def main(argv: Sequence[str] | None = None) -> ProbeReport | None:
    parser = argparse.ArgumentParser(
        prog="python -m bench probe", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--probes", type=int, default=3000, help="probes per run")
    parser.add_argument("--rounds", type=int, default=3, help="runs per contender and mode")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=30.0, help="time cap per run")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated of {MODES}")
    parser.add_argument("--no-blackbox", action="store_true")
    parser.add_argument(
        "--who",
        default="agent,loop,bare,blackbox",
        help="contenders to run (loop: the whole agent with --state-dir)",
    )
    parser.add_argument("--loop", default="asyncio", choices=loops(), help="uvloop when installed")
    parser.add_argument("--quick", action="store_true", help="one round of 1,000 probes")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cert", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--key", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--body-bytes", type=int, default=BODY_BYTES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        run(_serve(args.body_bytes, args.cert, args.key), args.loop)
        return None
    if args.quick:
        args.probes, args.seconds, args.rounds = min(args.probes, 1000), min(args.seconds, 10.0), 1
    modes = [m for m in args.modes.split(",") if m]
    unknown = set(modes) - set(MODES)
    if unknown:
        parser.error(f"unknown modes {sorted(unknown)}")
    report = benchmark(
        args.probes,
        args.concurrency,
        args.seconds,
        modes,
        not args.no_blackbox,
        args.loop,
        [w for w in args.who.split(",") if w],
        args.rounds,
    )
    print(report.text)
    sys.stdout.flush()
    return report


if __name__ == "__main__":
    main()
