"""Real processes for the fault tests: the installed console scripts, started, signalled, reaped.

A `Proc` is one program (`takedown-collector serve` or `takedown-agent`) that
can be started again after it died, with the same command line and one log
file that every start appends to. Signals go to that process id only. Every
wait is a poll with a deadline (never a bare sleep), and a test that ends by
failing still reaps what it started (`Procs.close`).

The other helpers read what the programs leave behind: the agent's spool
(journal and unacknowledged results) and the collector's database (stored
results and verdicts), through read-only connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from functools import cache
from pathlib import Path
from typing import IO, Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

BIN = Path(sys.executable).parent
Samples = dict[str, list[Any]]


class Timeout(AssertionError):
    """A polled condition did not hold in time."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def until(
    condition: Callable[[], Awaitable[bool] | bool],
    within: float,
    what: str,
    every: float = 0.1,
) -> None:
    """Poll `condition` until it holds; raise Timeout naming `what` after `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        value = condition()
        if not isinstance(value, bool):
            value = await value
        if value:
            return
        if time.monotonic() > deadline:
            raise Timeout(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(every)


@cache
def _agent_options() -> frozenset[str]:
    from agent.cli import build_parser

    return frozenset(build_parser()._option_string_actions)


@cache
def _serve_options() -> frozenset[str]:
    from collector.cli import serve_parser

    return frozenset(serve_parser()._option_string_actions)


def collector_argv(
    db: Path,
    listen: str,
    metrics_listen: str,
    *,
    prefixes: Path | None = None,
    probe_interval: str = "0.5s",
    extra: Sequence[str] = (),
) -> list[str]:
    """`takedown-collector serve` in plaintext without tokens (loopback only)."""
    argv = [str(BIN / "takedown-collector"), "serve", "--db", str(db), "--listen", listen,
            "--metrics-listen", metrics_listen, "--probe-interval", probe_interval,
            "--confirmations", "2", "--log-level", "INFO"]  # fmt: skip
    if prefixes is not None:
        argv += ["--prefixes", str(prefixes)]
    options = _serve_options()
    if "--insecure" in options:  # plaintext gRPC (TLS is the default otherwise)
        argv.append("--insecure")
    if "--auth" in options:  # no tokens (required by default otherwise)
        argv += ["--auth", "none"]
    return argv + list(extra)


def agent_argv(
    collector: str,
    name: str,
    source: str,
    state_dir: Path,
    metrics_port: int,
    *,
    network: str | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    """`takedown-agent` on one loopback source address, with a journaled spool."""
    argv = [str(BIN / "takedown-agent"), "--collector", collector, "--name", name,
            "--network", network or f"net-{name}", "--source-address", source,
            "--allow-private", "127.0.0.0/8", "--state-dir", str(state_dir), "--journal",
            "--metrics-listen", f"127.0.0.1:{metrics_port}", "--first-spread", "0.5",
            "--flush-interval", "0.2", "--timeout", "5", "--connect-timeout", "2",
            "--read-timeout", "3", "--log-level", "INFO"]  # fmt: skip
    if "--insecure" in _agent_options():
        argv.append("--insecure")
    return argv + list(extra)


class Proc:
    """One program, restartable; its output goes to `log` (appended across starts)."""

    def __init__(self, name: str, argv: list[str], log: Path) -> None:
        self.name = name
        self.argv = argv
        self.log = log
        self.popen: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self._handle: IO[bytes] | None = None
        self.exit_codes: list[int] = []

    def start(self) -> None:
        assert not self.running, f"{self.name} is already running"
        self._close_log()
        self._handle = self.log.open("ab")
        self._handle.write(f"--- start {self.starts + 1}: {' '.join(self.argv)}\n".encode())
        self._handle.flush()
        env = {k: v for k, v in os.environ.items() if not k.startswith("TAKEDOWN_")}
        env["PYTHONUNBUFFERED"] = "1"
        self.popen = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=self._handle,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # a terminal's ^C reaches pytest, not the children
        )
        self.starts += 1

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def kill(self) -> int:
        """SIGKILL and reap (immediate); return the exit status (-9)."""
        assert self.popen is not None and self.running, f"{self.name} died:\n{self.tail()}"
        self.popen.send_signal(signal.SIGKILL)
        code = self.popen.wait(timeout=10)
        self.exit_codes.append(code)
        return code

    async def terminate(self, within: float) -> tuple[int, float]:
        """SIGTERM; wait (polling) up to `within` s; return (exit status, seconds taken).

        A program still running at the deadline is killed and the test fails with
        the end of its log.
        """
        assert self.popen is not None and self.running, f"{self.name} died:\n{self.tail()}"
        started = time.monotonic()
        self.popen.send_signal(signal.SIGTERM)
        try:
            await until(lambda: not self.running, within, f"{self.name} to exit on SIGTERM", 0.05)
        except Timeout:
            self.kill()
            raise Timeout(
                f"{self.name} did not exit within {within}s of SIGTERM; log:\n{self.tail()}"
            ) from None
        code = self.popen.wait()
        self.exit_codes.append(code)
        return code, time.monotonic() - started

    def text(self) -> str:
        if self._handle is not None:
            self._handle.flush()
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.text().splitlines()[-lines:])

    def close(self) -> None:
        """Kill if still running (a failed test), reap, close the log."""
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
        if self.popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=10)
        self._close_log()

    def _close_log(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


class Procs:
    """The programs a test started; `close()` reaps all of them, whatever happened."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.all: list[Proc] = []

    def add(self, name: str, argv: list[str]) -> Proc:
        proc = Proc(name, argv, self.logs / f"{name}.log")
        self.all.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.all:
            proc.close()


async def metrics(port: int) -> Samples | None:
    """Samples of /metrics grouped by sample name; None while nothing answers there."""
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3)) as session,
            session.get(f"http://127.0.0.1:{port}/metrics") as response,
        ):
            if response.status != 200:
                return None
            text = await response.text()
    except (aiohttp.ClientError, TimeoutError):
        return None
    return samples_of(text)


def samples_of(text: str) -> Samples:
    """The samples of a /metrics text, grouped by sample name."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


def value(samples: Samples | None, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels` (0 if none)."""
    if samples is None:
        return 0.0
    return float(
        sum(
            s.value
            for s in samples.get(name, [])
            if all(s.labels.get(k) == v for k, v in labels.items())
        )
    )


@contextlib.contextmanager
def readonly(path: Path) -> Iterator[sqlite3.Connection]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        conn.execute("PRAGMA busy_timeout=5000")
        yield conn
    finally:
        conn.close()


def journal(spool: Path) -> dict[int, int]:
    """seq → url_id of every result the agent kept (its spool's journal)."""
    with readonly(spool) as conn:
        return dict(conn.execute("SELECT seq, url_id FROM journal"))


def unacked(spool: Path) -> int:
    """Results still in the spool: not yet acknowledged by the collector."""
    with readonly(spool) as conn:
        return int(conn.execute("SELECT count(*) FROM results").fetchone()[0])


def stored(db: Path, agent: str) -> dict[int, int]:
    """seq → url_id of every result the collector stored for `agent`."""
    with readonly(db) as conn:
        return dict(
            conn.execute(
                "SELECT r.seq, r.url_id FROM results r JOIN agents a ON a.id = r.agent_id"
                " WHERE a.name = ?",
                (agent,),
            )
        )


def counted(db: Path, agent: str) -> tuple[int, int]:
    """(rows in results, sum of result_counts) for `agent`: counted once means equal."""
    with readonly(db) as conn:
        rows = conn.execute(
            "SELECT count(*) FROM results r JOIN agents a ON a.id = r.agent_id WHERE a.name = ?",
            (agent,),
        ).fetchone()[0]
        total = conn.execute(
            "SELECT coalesce(sum(n), 0) FROM result_counts c JOIN agents a ON a.id = c.agent_id"
            " WHERE a.name = ?",
            (agent,),
        ).fetchone()[0]
    return int(rows), int(total)


def states(db: Path) -> dict[str, str]:
    """URL (path and query) → verdict state."""
    with readonly(db) as conn:
        rows = conn.execute("SELECT u.url, s.state FROM urls u JOIN url_state s ON s.url_id = u.id")
        return {url.split("/", 3)[3]: state for url, state in rows}


def total_stored(db: Path) -> int:
    if not db.exists():
        return 0
    with readonly(db) as conn:
        try:
            return int(conn.execute("SELECT count(*) FROM results").fetchone()[0])
        except sqlite3.OperationalError:  # not migrated yet
            return 0


async def refold_unchanged(db: Path, probe_interval: str) -> None:
    """`takedown-collector refold` with the test collectors' method changes no verdict."""
    done = await asyncio.to_thread(
        subprocess.run,
        [str(BIN / "takedown-collector"), "refold", "--db", str(db), "--probe-interval",
         probe_interval, "--confirmations", "2"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "no state changed" in done.stdout, done.stdout
