"""Agent memory: the real `takedown-agent` process, empty and holding N assigned URLs.

A collector child process (bench.common) gets N reports through Intake.Submit; then real
`takedown-agent` processes (the console script of this interpreter's environment, as shipped:
nothing is blocked from importing) connect over plaintext gRPC on 127.0.0.1 and receive the
whole assignment. RSS is VmRSS of the whole agent process from /proc/PID/status, read once it
is steady; the peak is VmHWM.

Phases: an agent with --state-dir connected to the empty collector (empty RSS); a fresh agent
with --state-dir receiving all N URLs (URL texts in its spool file); the same agent restarted,
resuming the N URLs from its spool before it reconnects; an agent without --state-dir
receiving all N (texts in an unnamed temporary file, agent.texts.TempTexts).
`--empty-only` runs only the first phase, `--runs` times (a fresh state directory each, so
each agent makes its key), and also reads the RSS of the agent's interpreter that has only
imported `agent.cli` (what the modules cost before anything runs).

The agents probe (almost) nothing: the collector plans every URL once per 30 days and the
agents spread first probes over as long (`--first-spread`), so a run of minutes makes a few
dozen probes, and every URL is a loopback address the agent's guard refuses before
connecting (no --allow-private): no packet leaves the machine, not even a DNS query.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from prometheus_client.parser import text_string_to_metric_families

from bench.common import (
    Deadline,
    cpu_seconds,
    free_port,
    memory,
    mib,
    require_loopback,
    start_collector,
    submit_urls,
    table,
)

TARGET_RSS = 150 * 1000 * 1000  # the "150 MB"
TARGET_EMPTY = 70 * 1000 * 1000
MONTH = 30 * 86400.0
AGENT = Path(sys.executable).parent / "takedown-agent"


def report_url(i: int) -> str:
    """A URL of about 70 characters at a loopback address (refused by the agent's guard)."""
    return f"http://127.0.0.{1 + i % 250}:9/files-{i % 50_000}/share/{i:09d}/image.jpg?dl=1"


@dataclass
class MemoryReport:
    urls: int
    figures: dict[str, Any] = field(default_factory=dict)
    text: str = ""


class AgentProcess:
    """One real takedown-agent; stdout and stderr go to a log file."""

    def __init__(
        self, argv: list[str], log: IO[bytes], metrics_port: int, env: dict[str, str] | None = None
    ) -> None:
        self.argv = argv
        self.log = log
        self.metrics_port = metrics_port
        self.proc = subprocess.Popen(  # noqa: S603 - our own console script
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def samples(self) -> dict[str, float]:
        """Unlabelled-sum samples of the agent's /metrics; empty while it does not answer."""
        if self.proc.poll() is not None:
            raise RuntimeError(f"takedown-agent exited with {self.proc.returncode}")
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                text = response.read().decode()
        except OSError:
            return {}
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                out[sample.name] = out.get(sample.name, 0.0) + sample.value
        return out

    def stop(self, within: float = 30.0) -> int:
        """SIGTERM (the agent drains and exits), then SIGKILL this process only."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(within)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait(10)


async def _until(condition: Any, within: float, what: str) -> None:
    deadline = Deadline(within)
    while not condition():
        if deadline.expired:
            raise TimeoutError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.25)


async def _steady_rss(pid: int, within: float = 30.0) -> tuple[int, int]:
    """(RSS, peak RSS) once three readings 0.5 s apart agree within 1% (or at the deadline)."""
    deadline = Deadline(within)
    readings = [memory(pid)[0]]
    while not deadline.expired:
        await asyncio.sleep(0.5)
        readings.append(memory(pid)[0])
        last = readings[-3:]
        if len(last) == 3 and max(last) - min(last) <= 0.01 * max(last):
            break
    return readings[-1], memory(pid)[1]


def _agent_argv(target: str, name: str, port: int, state_dir: Path | None) -> list[str]:
    argv = [str(AGENT), "--collector", target, "--insecure", "--name", name,
            "--network", f"bench-{name}", "--metrics-listen", f"127.0.0.1:{port}",
            "--first-spread", str(MONTH), "--log-level", "WARNING"]  # fmt: skip
    if state_dir is not None:
        argv += ["--state-dir", str(state_dir)]
    return argv


def _unnamed_bytes(pid: int, directory: Path) -> int:
    """Bytes of the process's open, deleted files in `directory` (its file of URL texts)."""
    total = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            if str(fd.readlink()).startswith(f"{directory}/") and fd.stat().st_nlink == 0:
                total += fd.stat().st_size
    return total


async def _holding(agent: AgentProcess, n: int, within: float) -> float:
    """Seconds until the agent holds n URLs and its stream is up."""
    started = time.perf_counter()

    def done() -> bool:
        m = agent.samples()
        return m.get("takedown_agent_assigned_urls") == n and m.get("takedown_agent_stream_up") == 1

    await _until(done, within, f"the agent to hold {n:,} URLs")
    return time.perf_counter() - started


async def _measure(n: int, seconds: float, workdir: Path) -> MemoryReport:
    report = MemoryReport(n)
    f = report.figures
    collector = await asyncio.to_thread(start_collector, workdir / "collector.db", None, MONTH)
    agents: list[AgentProcess] = []
    log = (workdir / "agents.log").open("ab")

    def start(
        name: str, state_dir: Path | None, port: int | None = None, tmpdir: Path | None = None
    ) -> AgentProcess:
        port = port or free_port()
        env = None if tmpdir is None else {**os.environ, "TMPDIR": str(tmpdir)}
        agent = AgentProcess(_agent_argv(target, name, port, state_dir), log, port, env)
        agents.append(agent)
        return agent

    try:
        target = require_loopback("127.0.0.1") + f":{collector.info['grpc_port']}"
        # 1. empty: connected, holding nothing
        empty = start("empty", workdir / "empty")
        await _holding(empty, 0, 60)
        f["empty_rss"], f["empty_peak"] = await _steady_rss(empty.pid)
        empty.stop()

        # 2. N reports, then a fresh agent with --state-dir receives them all
        started = time.perf_counter()
        await submit_urls(target, [report_url(i) for i in range(n)], time.time() - 600)
        f["import_s"] = time.perf_counter() - started
        spooled = start("spooled", workdir / "spooled")
        f["assign_s"] = await _holding(spooled, n, seconds)
        f["assign_cpu_s"] = cpu_seconds(spooled.pid)
        f["spooled_rss"], f["spooled_peak"] = await _steady_rss(spooled.pid)
        f["probes"] = spooled.samples().get("takedown_agent_probes_total", 0.0)
        f["spool_bytes"] = sum(
            p.stat().st_size for p in (workdir / "spooled").iterdir() if p.is_file()
        )
        port = spooled.metrics_port
        spooled.stop()

        # 3. the same agent restarted: resumes from its spool, then reconciles
        resumed = start("spooled", workdir / "spooled", port)
        f["resume_s"] = await _holding(resumed, n, seconds)
        f["resume_cpu_s"] = cpu_seconds(resumed.pid)
        f["resumed_rss"], f["resumed_peak"] = await _steady_rss(resumed.pid)
        resumed.stop()

        # 4. without --state-dir: the URL texts in an unnamed temporary file
        tmpdir = workdir / "agent-tmp"
        tmpdir.mkdir()
        memory_only = start("memory-only", None, tmpdir=tmpdir)
        f["memory_assign_s"] = await _holding(memory_only, n, seconds)
        f["memory_assign_cpu_s"] = cpu_seconds(memory_only.pid)
        f["memory_rss"], f["memory_peak"] = await _steady_rss(memory_only.pid)
        f["texts_bytes"] = _unnamed_bytes(memory_only.pid, tmpdir)
        f["tmp_names"] = len(list(tmpdir.iterdir()))  # the file has no name: 0
        memory_only.stop()
        f["tmp_names"] += len(list(tmpdir.iterdir()))
    finally:
        for agent in agents:
            with contextlib.suppress(Exception):
                agent.stop(10)
        log.close()
        await asyncio.to_thread(collector.stop, 60.0)
    return report


def _rss_split(pid: int) -> tuple[int, int]:
    """(RssAnon, RssFile) bytes of a process: its own memory, and mapped files' pages."""
    anon = file = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            anon = int(line.split()[1]) * 1024
        elif line.startswith("RssFile:"):
            file = int(line.split()[1]) * 1024
    return anon, file


def imported_rss() -> int:
    """VmRSS of a fresh interpreter of the agent's environment once it imported agent.cli."""
    code = (
        "import agent.cli, pathlib; print(next(int(l.split()[1]) * 1024 for l in"
        " pathlib.Path('/proc/self/status').read_text().splitlines() if l.startswith('VmRSS:')))"
    )
    python = AGENT.parent / "python"
    out = subprocess.run(  # noqa: S603 - this environment's interpreter, fixed code
        [str(python), "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    return int(out.stdout.strip())


async def _measure_empty(runs: int, workdir: Path) -> MemoryReport:
    """Only the empty phase, `runs` times against one collector."""
    report = MemoryReport(0)
    f = report.figures
    collector = await asyncio.to_thread(start_collector, workdir / "collector.db", None, MONTH)
    log = (workdir / "agents.log").open("ab")
    f["empty_runs"] = []
    try:
        f["imported_rss"] = [await asyncio.to_thread(imported_rss) for _ in range(runs)]
        target = require_loopback("127.0.0.1") + f":{collector.info['grpc_port']}"
        for run in range(runs):
            port = free_port()
            argv = _agent_argv(target, f"empty-{run}", port, workdir / f"empty-{run}")
            agent = AgentProcess(argv, log, port)
            try:
                await _holding(agent, 0, 60)
                rss, peak = await _steady_rss(agent.pid)
                anon, file = _rss_split(agent.pid)
                f["empty_runs"].append((rss, peak, anon, file))
                if not (workdir / f"empty-{run}" / "agent.key").is_file():
                    raise RuntimeError("the agent made no key in its state directory")
            finally:
                agent.stop(30)
    finally:
        log.close()
        await asyncio.to_thread(collector.stop, 60.0)
    return report


def _render_empty(r: MemoryReport) -> str:
    f = r.figures
    rows: list[list[object]] = []
    for i, imported in enumerate(f["imported_rss"]):
        rows.append([f"interpreter, agent.cli imported ({i + 1})", size(imported), ""])
    for i, (rss, peak, anon, file) in enumerate(f["empty_runs"]):
        rows.append([f"agent RSS, empty (connected) ({i + 1})", size(rss),
                     f"<= 70 MB: {'ok' if rss <= TARGET_EMPTY else 'MISSED'}; peak {mib(peak)};"
                     f" anon {mib(anon)}, file {mib(file)}"])  # fmt: skip
    return table("agent memory, empty: the takedown-agent process", ["figure", "value", "note"],
                 rows)  # fmt: skip


def benchmark_empty(runs: int = 3) -> MemoryReport:
    with tempfile.TemporaryDirectory(prefix="bench-agentmem-") as tmp:
        report = asyncio.run(_measure_empty(runs, Path(tmp)))
    report.text = _render_empty(report)
    return report


def benchmark(urls: int = 1_000_000, seconds: float = 600.0) -> MemoryReport:
    with tempfile.TemporaryDirectory(prefix="bench-agentmem-") as tmp:
        report = asyncio.run(_measure(urls, seconds, Path(tmp)))
    report.text = _render(report)
    return report


def size(n: float) -> str:
    return f"{mib(n)} ({n / 1e6:,.0f} MB)"


def per_url(rss: int, empty: int, n: int) -> float:
    return (rss - empty) / max(1, n)


def _render(r: MemoryReport) -> str:
    f = r.figures
    n = r.urls

    def verdict(value: float, limit: float) -> str:
        return "ok" if value <= limit else "MISSED"

    rows: list[list[object]] = [
        ["agent RSS, empty (connected)", size(f["empty_rss"]),
         f"<= 70 MB: {verdict(f['empty_rss'], TARGET_EMPTY)}; peak {mib(f['empty_peak'])}"],
        [f"import {n:,} reports (s)", f["import_s"], "collector child, Intake.Submit"],
        [f"--state-dir: holding {n:,} URLs", size(f["spooled_rss"]),
         f"<= 150 MB: {verdict(f['spooled_rss'], TARGET_RSS)}; "
         f"{per_url(f['spooled_rss'], f['empty_rss'], n):.0f} B/URL;"
         f" peak {mib(f['spooled_peak'])}"],
        ["  assignment received (s)", f["assign_s"],
         f"agent CPU {f['assign_cpu_s']:.1f} s; spool file {mib(f['spool_bytes'])};"
         f" {f['probes']:.0f} probes made"],
        ["--state-dir: restarted, resumed", size(f["resumed_rss"]),
         f"{per_url(f['resumed_rss'], f['empty_rss'], n):.0f} B/URL; peak {mib(f['resumed_peak'])}"
         f"; in sync after {f['resume_s']:.1f} s, agent CPU {f['resume_cpu_s']:.1f} s"],
        [f"no --state-dir: holding {n:,} URLs", size(f["memory_rss"]),
         f"<= 150 MB: {verdict(f['memory_rss'], TARGET_RSS)}; "
         f"{per_url(f['memory_rss'], f['empty_rss'], n):.0f} B/URL (texts in a temp file); "
         f"peak {mib(f['memory_peak'])}; received in {f['memory_assign_s']:.1f} s,"
         f" agent CPU {f['memory_assign_cpu_s']:.1f} s"],
        ["  its file of URL texts (no name)", mib(f["texts_bytes"]),
         f"in TMPDIR; names seen there while running and after exit: {f['tmp_names']}"],
    ]  # fmt: skip
    return table(f"agent memory: the takedown-agent process, {n:,} URLs", ["figure", "value",
                 "note"], rows)  # fmt: skip


def main(argv: Sequence[str] | None = None) -> MemoryReport:
    parser = argparse.ArgumentParser(
        prog="python -m bench memory", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--urls", type=int, default=1_000_000)
    parser.add_argument("--seconds", type=float, default=600.0, help="time cap of each phase")
    parser.add_argument("--quick", action="store_true", help="20,000 URLs")
    parser.add_argument(
        "--empty-only", action="store_true", help="only the empty agent (connected, no URLs)"
    )
    parser.add_argument("--runs", type=int, default=3, help="agents measured with --empty-only")
    args = parser.parse_args(argv)
    if args.empty_only:
        report = benchmark_empty(args.runs)
        print(report.text)
        sys.stdout.flush()
        return report
    if args.quick:
        args.urls = min(args.urls, 20_000)
    report = benchmark(args.urls, args.seconds)
    print(report.text)
    sys.stdout.flush()
    return report


if __name__ == "__main__":
    main()
