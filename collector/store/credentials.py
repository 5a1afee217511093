"""Agent and hotline credentials in the collector database (the `credentials` table).

Only a token's public id and the SHA-256 digest of the whole token are stored.
The `agents` and `intake-tokens` commands write here through their own short
connection (safe beside a running collector: SQLite serialises writers, WAL
lets readers on); the running collector only reads, once per call it checks.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from collector.store.model import StoreError
from collector.store.schema import migrations
from collector.store.sql import DB_ERRORS, Connection, PgConnection, connect, translate


@dataclass(frozen=True)
class Credential:
    id: int
    role: str
    name: str
    network: str | None
    token_id: str
    created_at: float
    revoked_at: float | None
    last_seen: float | None = None  # agents: the agent's last hello or result


class CredentialConflict(StoreError):
    """The credential cannot be added as asked (a live one has this name and role)."""


_COLUMNS = "c.id, c.role, c.name, c.network, c.token_id, c.created_at, c.revoked_at"


def connect_credentials(path: Path | str) -> Connection:
    """A write connection for the credential commands; creates and migrates the database if
    needed. Unlike the collector's writer it skips the integrity check, so it is quick on a
    large file."""
    db = None
    try:
        db = connect(path)
        if not db.postgres:
            db.conn.execute("PRAGMA busy_timeout=10000")
            db.conn.execute("PRAGMA journal_mode=WAL")
        migrations.apply(db)
    except DB_ERRORS as exc:
        if db is not None:
            db.close()
        raise translate(exc, db.name if db else str(path)) from exc
    return db.conn  # type: ignore[no-any-return]


def add_credential(
    conn: Connection,
    role: str,
    name: str,
    network: str | None,
    token_id: str,
    token_digest: bytes,
    now: float,
    *,
    replace: bool = False,
) -> Credential:
    """Store a credential; with `replace`, revoke the name's live one in the same transaction."""
    try:
        # SQLite: take the write lock now; PostgreSQL: the unique index guards the race.
        conn.execute("BEGIN" if isinstance(conn, PgConnection) else "BEGIN IMMEDIATE")
        try:
            if replace:
                conn.execute(
                    "UPDATE credentials SET revoked_at = ?"
                    " WHERE role = ? AND name = ? AND revoked_at IS NULL",
                    (now, role, name),
                )
            elif conn.execute(
                "SELECT 1 FROM credentials WHERE role = ? AND name = ? AND revoked_at IS NULL",
                (role, name),
            ).fetchone():
                raise CredentialConflict(
                    f"{role} {name!r} already has a live token (revoke it, or add --replace)"
                )
            row_id = conn.execute(
                "INSERT INTO credentials (role, name, network, token_id, token_sha256, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?) RETURNING id",
                (role, name, network, token_id, token_digest, now),
            ).fetchone()[0]
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    except DB_ERRORS as exc:
        raise StoreError(f"credentials: {exc}") from exc
    return Credential(int(row_id), role, name, network, token_id, now, None)


def revoke_credentials(conn: Connection, role: str, name: str, now: float) -> int:
    """Revoke every live credential of `name` in `role`; return how many were revoked."""
    try:
        cursor = conn.execute(
            "UPDATE credentials SET revoked_at = ?"
            " WHERE role = ? AND name = ? AND revoked_at IS NULL",
            (now, role, name),
        )
    except DB_ERRORS as exc:
        raise StoreError(f"credentials: {exc}") from exc
    return int(cursor.rowcount)


def list_credentials(conn: Connection, role: str) -> list[Credential]:
    """Every credential of a role, live and revoked, with the agent's last sighting."""
    return [
        Credential(*row)
        for row in conn.execute(
            f"SELECT {_COLUMNS}, a.last_seen FROM credentials c"
            " LEFT JOIN agents a ON c.role = 'agent' AND a.name = c.name"
            " WHERE c.role = ? ORDER BY c.name, c.created_at",
            (role,),
        )
    ]


def find_token(conn: Connection, token_id: str) -> tuple[Credential, bytes] | None:
    """The credential with this public token id and its stored digest (revoked ones too)."""
    row = conn.execute(
        f"SELECT {_COLUMNS}, c.token_sha256 FROM credentials c WHERE c.token_id = ?",
        (token_id,),
    ).fetchone()
    if row is None:
        return None
    *fields, stored = row
    return Credential(*fields), bytes(stored)


def revoked_among(conn: Connection, ids: Iterable[int]) -> set[int]:
    """Those of the credential ids that are revoked or no longer exist."""
    wanted = sorted(set(ids))
    live: set[int] = set()
    for i in range(0, len(wanted), 500):
        chunk = wanted[i : i + 500]
        marks = ",".join("?" * len(chunk))
        live.update(
            r
            for (r,) in conn.execute(
                f"SELECT id FROM credentials WHERE revoked_at IS NULL AND id IN ({marks})", chunk
            )
        )
    return set(wanted) - live


def pin_agent_key(
    conn: Connection, name: str, public_key: bytes, now: float, *, replace: bool = False
) -> None:
    """Register agent `name`'s Ed25519 public key before its first hello (or, with
    `replace`, a new key after a rotation: the new key is logged at its next hello)."""
    row = conn.execute("SELECT public_key FROM agent_keys WHERE name = ?", (name,)).fetchone()
    if row is not None and bytes(row[0]) != public_key and not replace:
        raise CredentialConflict(
            f"agent {name!r} already has another public key pinned; --replace replaces it"
        )
    if row is not None and bytes(row[0]) == public_key:
        return
    conn.execute(
        "INSERT INTO agent_keys (name, public_key, source, accepted_at) VALUES (?, ?, ?, ?)"
        " ON CONFLICT(name) DO UPDATE SET public_key = excluded.public_key,"
        " source = excluded.source, accepted_at = excluded.accepted_at, leaf = NULL",
        (name, public_key, "agents add", now),
    )


def agent_keys(conn: Connection) -> dict[str, bytes]:
    """Every pinned agent key, by agent name."""
    return {str(n): bytes(k) for n, k in conn.execute("SELECT name, public_key FROM agent_keys")}
