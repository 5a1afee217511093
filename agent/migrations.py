"""Schema migrations for the agent's SQLite file, with the standard library only.

The agent must not import sqlite_utils: it imports numpy and pandas when they
are installed (tens of MB of RSS in a process that should stay small). This
runner keeps the record sqlite_utils' `Migrations` keeps, in the same table
(`_sqlite_migrations`: id, migration_set, name, applied_at), so a spool file
written by either is read by the other: applied names are skipped, pending
ones run in order, each in one transaction with its record.
"""

from __future__ import annotations

import datetime
import sqlite3
from collections.abc import Callable

Migration = Callable[[sqlite3.Connection], None]

TABLE = "_sqlite_migrations"


class Migrations:
    """An ordered, named set of migrations; `apply` runs those not yet recorded."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._steps: list[tuple[str, Migration]] = []

    def __call__(self) -> Callable[[Migration], Migration]:
        """Register the decorated function as the next migration, named after it."""

        def register(step: Migration) -> Migration:
            if any(name == step.__name__ for name, _ in self._steps):
                raise ValueError(f"migration {step.__name__!r} registered twice in {self.name}")
            self._steps.append((step.__name__, step))
            return step

        return register

    def applied(self, conn: sqlite3.Connection) -> list[str]:
        """Names recorded as applied for this set, in order (empty for a fresh file)."""
        exists = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (TABLE,)
        ).fetchone()
        if exists is None:
            return []
        rows = conn.execute(
            f"SELECT name FROM {TABLE} WHERE migration_set = ? ORDER BY rowid",  # noqa: S608
            (self.name,),
        )
        return [name for (name,) in rows]

    def apply(self, conn: sqlite3.Connection) -> None:
        """Run the pending migrations, each with its record in one transaction.

        The connection must be in autocommit mode (`isolation_level=None`).
        """
        conn.execute(
            f"CREATE TABLE IF NOT EXISTS {TABLE} (id INTEGER PRIMARY KEY, migration_set TEXT,"
            " name TEXT, applied_at TEXT)"
        )
        conn.execute(
            f"CREATE UNIQUE INDEX IF NOT EXISTS idx_{TABLE}_migration_set_name"
            f" ON {TABLE} (migration_set, name)"
        )
        done = set(self.applied(conn))
        for name, step in self._steps:
            if name in done:
                continue
            conn.execute("BEGIN IMMEDIATE")
            try:
                step(conn)
                conn.execute(
                    f"INSERT INTO {TABLE} (migration_set, name, applied_at) VALUES (?, ?, ?)",  # noqa: S608
                    (self.name, name, str(datetime.datetime.now(datetime.UTC))),
                )
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
