"""No reported content at rest, no URL in metrics or ordinary logs.

A real collector (grpc.aio + SQLite in WAL mode + /metrics), two real agents with `--state-dir`
spools on their own loopback source addresses, and the demo hoster, every body of which carries a
unique marker (the content pages, the "account suspended" replacement and the parking page behind
a removal redirect). DEBUG logging of every logger goes to a file in the test's directory and to
pytest's capture. After URLs are seen online and removals are confirmed, every file under the
test's directory -- collector.db and its -wal/-shm, each agent's spool.db and its -wal/-shm, the
log file -- is read while everything runs and again after a graceful stop, and must not hold the
marker in any of the spellings a careless writer could leave (raw, UTF-16, hex, base64, or the
marker's random part alone). That the bodies were read at all is shown by their SHA-256 being
stored.

Also: no label of the collector's or the agents' /metrics carries a URL, a host:port or a path,
and no log record above DEBUG carries a URL or a path (DEBUG may, for debugging one probe).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
import logging
import random
import secrets
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.main import Agent
from collector.cli import main as collector_main
from collector.evidence.logkey import init_log_key
from collector.importer import import_file
from collector.server import Collector
from collector.store.reads import connect_readonly, url_statuses
from demo.hoster import Fate, Hoster
from tests.conftest import HOST_A, HOST_B, agent_config, eventually, logging_collector, scrape

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SOURCES = ("127.0.0.2", "127.0.0.3")
TOKEN = secrets.token_hex(4)
# unique paths, so a path found in a log line or label can only come from these URLs
PAGES = {
    f"/a-online-{TOKEN}": None,
    f"/a-404-{TOKEN}": Fate.GONE_404,
    f"/a-replaced-{TOKEN}": Fate.REPLACED,
    f"/a-challenge-{TOKEN}": Fate.CHALLENGE,
    f"/b-410-{TOKEN}": Fate.GONE_410,
    f"/b-redirect-{TOKEN}": Fate.REDIRECT,
    f"/b-dynamic-{TOKEN}": Fate.DYNAMIC,
}
REMOVED = [p for p, fate in PAGES.items() if fate in (Fate.GONE_404, Fate.GONE_410,
           Fate.REPLACED, Fate.REDIRECT)]  # fmt: skip


def url_of(hoster: Hoster, path: str) -> str:
    return f"http://{HOST_A if path.startswith('/a') else HOST_B}:{hoster.port}{path}"


def spellings(marker: str) -> dict[str, bytes]:
    """The marker as bytes in every form a writer might have left it in."""
    raw = marker.encode()
    random_part = marker.rsplit("-", 1)[1]
    return {
        "raw": raw,
        "utf-16-le": marker.encode("utf-16-le"),
        "utf-16-be": marker.encode("utf-16-be"),
        "hex": raw.hex().encode(),
        "HEX": raw.hex().upper().encode(),
        "base64": base64.b64encode(raw)[:-4],  # without the padded tail
        "base64url": base64.urlsafe_b64encode(raw)[:-4],
        "random part": random_part.encode(),
        "random part, UPPER": random_part.upper().encode(),
    }


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def assert_nowhere(marker: str, files: Iterable[Path], when: str) -> list[str]:
    """No file holds the marker in any spelling; returns the names of the files read."""
    forms = spellings(marker)
    read = []
    for path in files:
        data = path.read_bytes()
        read.append(path.name)
        for name, form in forms.items():
            assert form not in data, f"{when}: {path} holds the marker ({name})"
    return read


@pytest.fixture
def debug_log(tmp_path: Path) -> Iterator[Path]:
    """Every logger at DEBUG into tmp_path/logs/debug.log (pytest's capture keeps its own copy)."""
    path = tmp_path / "logs" / "debug.log"
    path.parent.mkdir()
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield path
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        handler.close()


def serving_collector(tmp_path: Path, prefixes: Path) -> Any:
    """The conftest collector with an evidence log, stopped gracefully when the block ends."""
    key_file, _ = init_log_key(tmp_path / "log-key", "test.takedown/log")
    return logging_collector(tmp_path, prefixes, key_file)


@contextlib.asynccontextmanager
async def spooled_agents(collector: Collector, tmp_path: Path) -> AsyncIterator[list[Agent]]:
    """Two agents with --state-dir spools on their own source addresses, stopped gracefully."""
    agents: list[Agent] = []
    stops: list[asyncio.Event] = []
    tasks: list[asyncio.Task[None]] = []
    for n, source in enumerate(SOURCES, 1):
        config = agent_config(
            collector, f"agent-{n}", f"net-{n}", source, state_dir=tmp_path / f"agent-{n}"
        )
        agent = Agent(config, rng=random.Random(n))
        stop = asyncio.Event()
        agents.append(agent)
        stops.append(stop)
        tasks.append(asyncio.create_task(agent.run(stop)))
    try:
        yield agents
    finally:
        for stop in stops:
            stop.set()
        for task in tasks:
            await asyncio.wait_for(task, timeout=15)


async def no_url_in_labels(port: int, hoster: Hoster) -> None:
    """No label value of the /metrics on `port` names a URL, the hoster's port or a path."""
    metrics = await scrape(port)
    assert metrics, port
    values = {v for samples in metrics.values() for s in samples for v in s.labels.values()}
    for value in values:
        assert "://" not in value and hoster.marker not in value, (port, value)
        assert f":{hoster.port}" not in value, (port, value)
        assert not any(p.strip("/") in value for p in PAGES), (port, value)


def states(db: Path) -> dict[str, str]:
    conn = connect_readonly(db)
    try:
        return {s.url.rsplit(":", 1)[1].split("/", 1)[1]: s.state for s in url_statuses(conn)}
    finally:
        conn.close()


def stored_hashes(db: Path) -> set[bytes]:
    conn = connect_readonly(db)
    try:
        return {h for (h,) in conn.execute("SELECT DISTINCT sha256 FROM results") if h}
    finally:
        conn.close()


async def test_no_body_url_free_metrics_and_logs(
    tmp_path: Path,
    prefixes: Path,
    hoster: Hoster,
    debug_log: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Bodies leave only their hash behind; URLs stay out of metric labels and non-DEBUG logs."""
    caplog.set_level(logging.DEBUG)
    for path in PAGES:
        hoster.add(path)
    urls = [url_of(hoster, p) for p in PAGES]
    notified = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 60))
    reports = tmp_path / "reports.csv"
    reports.write_text(
        "url,notified_at,reference\n"
        + "".join(f"{u},{notified},case-{i}\n" for i, u in enumerate(urls))
    )
    async with serving_collector(tmp_path, prefixes) as collector:
        out = io.StringIO()
        assert await import_file(reports, f"127.0.0.1:{collector.grpc_port}", out=out) == 0, out
        db = collector.config.db
        async with spooled_agents(collector, tmp_path) as agents:
            names = [p.strip("/") for p in PAGES]
            await eventually(
                lambda: states(db) == dict.fromkeys(names, "available"), 20, "every page online"
            )
            for path, fate in PAGES.items():
                if fate is not None:
                    hoster.set_fate(path, fate)
            await eventually(
                lambda: all(states(db)[p.strip("/")] == "removed" for p in REMOVED),
                30,
                "the removals confirmed",
            )
            online_body = hoster.body(f"/a-online-{TOKEN}")
            assert hoster.marker.encode() in online_body
            assert hashlib.sha256(online_body).digest() in stored_hashes(db)

            # While everything runs: the WAL files hold the latest writes.
            read = assert_nowhere(hoster.marker, files_under(tmp_path), "while running")
            assert {"collector.db", "collector.db-wal", "spool.db", "debug.log"} <= set(read)
            assert read.count("spool.db") == 2

            for port in (collector.metrics_port, *(a.metrics_port for a in agents)):
                await no_url_in_labels(port, hoster)
    bundle = tmp_path / "bundle"
    export = ["evidence", "export", "--provider", "Hoster A", "--db", str(db), "-o", str(bundle),
              "--log-key", str(tmp_path / "log-key" / "log.vkey")]  # fmt: skip
    assert collector_main(export) == 0
    conn = connect_readonly(db)
    try:
        logged = {k: n for k, n in conn.execute("SELECT kind, COUNT(*) FROM log_leaves GROUP BY 1")}
    finally:
        conn.close()
    assert logged["observation"] > 0 and logged["notice"] == len(PAGES), logged
    read = assert_nowhere(hoster.marker, files_under(tmp_path), "after a graceful stop")
    assert {"entries.jsonl", "checkpoint.txt"} <= set(read)
    for path in files_under(bundle):  # a bundle names no URL either
        data = path.read_bytes()
        assert not any(p.encode() in data for p in PAGES), path

    assert hoster.marker not in caplog.text
    assert hoster.marker not in debug_log.read_text(encoding="utf-8")
    paths = [p.strip("/") for p in PAGES]
    loud = [r for r in caplog.records if r.levelno > logging.DEBUG]
    assert loud, "no INFO or higher records at all: is logging captured?"
    for record in loud:
        message = record.getMessage()
        assert not any(u in message for u in urls), (record.name, message)
        assert not any(p in message for p in paths), (record.name, message)
    debug_only = [r for r in caplog.records if r.levelno == logging.DEBUG]
    assert debug_only, "no DEBUG records: is DEBUG logging on?"
