"""A real PostgreSQL server for the tests: initdb in a temporary directory, a free port on
127.0.0.1, stopped at the end. Debian's `postgresql` package provides the binaries
(scripts/ci-system-deps.sh installs it); as root, the server runs as the `postgres` user,
since PostgreSQL refuses to run as root."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

START_WITHIN = 30.0  # seconds for initdb + start
# Tests need no durability against power loss: commits are not flushed to disk.
TEST_SETTINGS = ("fsync=off", "full_page_writes=off", "max_connections=200", "shared_buffers=64MB")


def bin_dir() -> Path:
    """The newest installed PostgreSQL's binaries (Debian keeps them off PATH)."""
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/postgres"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    if found:
        return found[-1].parent
    on_path = shutil.which("postgres")
    if on_path:
        return Path(on_path).parent
    raise RuntimeError(
        "PostgreSQL is not installed: `apt-get install postgresql` (scripts/ci-system-deps.sh"
        " does it)"
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresServer:
    """One server for the whole test session; each test gets a database of its own."""

    def __init__(self, settings: Sequence[str] = TEST_SETTINGS) -> None:
        self.settings = tuple(settings)  # the server's `-c` options
        # Its own directory under /tmp: pytest's are root's alone (0700), closed to `postgres`.
        self.root = Path(tempfile.mkdtemp(prefix="takedown-pg-"))
        self.data = self.root / "data"
        self.sockets = self.root / "sockets"
        self.port = _free_port()
        self.bin = bin_dir()
        self.process: subprocess.Popen[bytes] | None = None
        self.log = self.root / "postgres.log"

    def _as_owner(self) -> list[str]:
        """Run as `postgres` when we are root (the server will not run as root)."""
        if os.geteuid() != 0:
            return []
        # setpriv execs (runuser would fork and stand between us and the server's signals).
        return ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups"]

    def start(self) -> None:
        self.sockets.mkdir(parents=True)
        if os.geteuid() == 0:
            owner = pwd.getpwnam("postgres")
            for path in (self.root, self.sockets):
                os.chown(path, owner.pw_uid, owner.pw_gid)
        made = subprocess.run(
            [*self._as_owner(), str(self.bin / "initdb"), "-D", str(self.data), "-U", "takedown",
             "--auth=trust", "-E", "UTF8", "--no-sync", "--locale=C"],
            check=False, capture_output=True, timeout=START_WITHIN,
        )  # fmt: skip
        if made.returncode != 0:
            raise RuntimeError(f"initdb failed: {made.stderr.decode(errors='replace')[-2000:]}")
        self.resume()

    def resume(self) -> None:
        """Start the server on its data directory and port (again, after `pause`)."""
        log = self.log.open("ab")
        self.process = subprocess.Popen(
            [*self._as_owner(), str(self.bin / "postgres"), "-D", str(self.data),
             "-p", str(self.port), "-k", str(self.sockets), "-c", "listen_addresses=127.0.0.1",
             *(arg for setting in self.settings for arg in ("-c", setting))],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        log.close()
        deadline = time.monotonic() + START_WITHIN
        while True:
            ready = subprocess.run(
                [str(self.bin / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port), "-q"],
                check=False,
            )
            if ready.returncode == 0:
                return
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL did not start:\n{self.log.read_text()[-2000:]}")
            time.sleep(0.05)  # polling the server's readiness, bounded by the deadline

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://takedown@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A fresh, empty database; its DSN."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.dsn(name)

    def stop(self) -> None:
        try:
            self._stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def pause(self) -> None:
        """Stop the server, keeping its data: the database is away until `resume`."""
        self._stop()

    def _stop(self) -> None:
        if self.process is None:
            return
        self.process.send_signal(signal.SIGINT)  # "fast" shutdown: ends open sessions
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None


def postgres_dump(dsn: str) -> bytes:
    """The whole database as pg_dump writes it (schema and every row)."""
    dumped = subprocess.run(
        [str(bin_dir() / "pg_dump"), "--no-owner", dsn], check=True, capture_output=True,
        timeout=60,
    )  # fmt: skip
    return dumped.stdout
