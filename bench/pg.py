"""PostgreSQL for the benchmarks: a durable server of their own, its CPU, and collectors on it.

The server is tests/pg.py's `PostgresServer` (initdb in /tmp, a free port on 127.0.0.1, run as
the `postgres` user when we are root), started with what a production server keeps on:
`fsync`, `full_page_writes` and `synchronous_commit` (the tests turn the first two off). A
collector on it runs in a child process, as bench.common's does on SQLite, with `--db DSN`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from bench import common
from bench.common import CLK_TCK, Child, Deadline
from tests.pg import PostgresServer

# What the server runs with here (the rest are PostgreSQL 15's defaults).
DURABLE_SETTINGS = (
    "fsync=on",
    "full_page_writes=on",
    "synchronous_commit=on",
    "max_connections=200",
    "shared_buffers=256MB",
)


class DurablePostgresServer(PostgresServer):
    """tests/pg.py's server, but every commit is flushed to disk (fsync and synchronous_commit
    on), as a production database would be; `settings` are `-c` options."""

    def __init__(self, settings: Sequence[str] = DURABLE_SETTINGS) -> None:
        super().__init__(settings)

    def postmaster_pid(self) -> int:
        """The postmaster's pid: the first line of postmaster.pid in the data directory."""
        return int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])

    def cpu_seconds(self) -> float:
        """CPU seconds the whole server has used so far: the postmaster's own and its reaped
        children's (utime, stime, cutime, cstime), plus each live child's (utime, stime), so
        a backend that ends between two readings is still counted once."""
        master = self.postmaster_pid()
        total = _stat_cpu(master, children=True)
        for pid in _children(master):
            with contextlib.suppress(OSError):
                total += _stat_cpu(pid)
        return total


def _stat_fields(pid: int) -> list[str]:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()  # fields[0] is field 3 (state) of proc(5)


def _stat_cpu(pid: int, children: bool = False) -> float:
    f = _stat_fields(pid)
    ticks = int(f[11]) + int(f[12])  # utime, stime
    if children:
        ticks += int(f[13]) + int(f[14])  # cutime, cstime: children waited for
    return ticks / CLK_TCK


def _children(parent: int) -> list[int]:
    """The live processes whose parent is `parent` (from /proc/*/stat)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int(_stat_fields(int(entry.name))[1]) == parent:
                found.append(int(entry.name))
    return found


# --- a collector on PostgreSQL in a child process --------------------------------------------


def start_collector(
    dsn: str,
    prefixes: Path | None = None,
    interval: float = 300.0,
    within: float = 120.0,
    metrics_max_age: float = 0.0,
    stderr: IO[str] | None = None,
) -> Child:
    """bench.common's collector child, on the PostgreSQL database `dsn`."""
    return common.start_collector(dsn, prefixes, interval, within, metrics_max_age, stderr=stderr)


# --- reading the shared database ----------------------------------------------------------------


class Watcher:
    """One connection of the benchmark's own, for counting rows (call from one thread at a
    time: the benchmark runs it in `asyncio.to_thread`)."""

    def __init__(self, dsn: str) -> None:
        import psycopg

        self.conn = psycopg.connect(dsn, autocommit=True)

    def count(self, sql: str) -> int:
        """The integer a query returns."""
        row = self.conn.execute(sql).fetchone()
        return int(row[0]) if row is not None and row[0] is not None else 0

    def waits(self) -> list[str]:
        """What each other client backend is doing now: `Lock:transactionid`, `IO:WALSync`,
        `Client:ClientRead` (waiting for its collector) or `CPU` (running, no wait)."""
        rows = self.conn.execute(
            "SELECT wait_event_type, wait_event FROM pg_stat_activity"
            " WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
            " AND state <> 'idle'"
        ).fetchall()
        return [f"{kind}:{event}" if kind else "CPU" for kind, event in rows]

    def close(self) -> None:
        self.conn.close()


def shard_holders(dsn: str) -> dict[str, int]:
    """Live lease holders and how many shards each holds."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT owner, COUNT(*) FROM shard_leases"
            " WHERE owner IS NOT NULL AND expires_at > EXTRACT(EPOCH FROM clock_timestamp())"
            " GROUP BY owner"
        ).fetchall()
    return {str(owner): int(n) for owner, n in rows}


def wait_shards_shared(dsn: str, collectors: int, shards: int, within: float) -> dict[str, int]:
    """Wait until `collectors` collectors hold every shard between them, a fair share each."""
    deadline = Deadline(within)
    fair = -(-shards // collectors)
    while True:
        held = shard_holders(dsn)
        if (
            len(held) == collectors
            and sum(held.values()) == shards
            and all(n <= fair for n in held.values())
        ):
            return held
        if deadline.expired:
            raise TimeoutError(f"shards not shared by {collectors} collectors in {within}s: {held}")
        time.sleep(0.1)  # polling the lease table, bounded by the deadline
