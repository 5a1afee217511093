"""The evidence log in the collector's database: leaves, tree nodes and checkpoints.

`EvidenceLog` wraps one sqlite3 connection (the writer's) and appends leaves
in whatever transaction the caller has open, so a leaf exists exactly when
the fact it records was committed. The Merkle tree's frontier lives in
memory; after a rolled-back transaction the caller calls `reload()`, which
rebuilds it from what was committed. Checkpoints are signed here and kept,
so that an export can prove any earlier one consistent with the latest.

The tables (`SCHEMA`) are to be created by a migration in `schema.py`.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from collector.evidence.bundle import build_bundle, write_bundle
from collector.evidence.checkpoint import Checkpoint, sign_checkpoint
from collector.evidence.errors import EvidenceError
from collector.evidence.leaves import Leaf, decode_leaf, encode_leaf, url_sha256
from collector.evidence.log import MerkleLog
from collector.evidence.merkle import leaf_hash
from collector.evidence.note import NoteSigner, NoteVerifier

SCHEMA = """
CREATE TABLE log_leaves (
    idx INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    url_id INTEGER,
    leaf BLOB NOT NULL
);
CREATE INDEX log_leaves_url ON log_leaves(url_id, idx);
CREATE TABLE log_nodes (
    height INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    hash BLOB NOT NULL,
    PRIMARY KEY (height, idx)
) WITHOUT ROWID;
CREATE TABLE log_checkpoints (
    size INTEGER PRIMARY KEY,
    note TEXT NOT NULL,
    signed_at REAL NOT NULL
);
"""


class SqliteNodes:
    """The tree's complete subtree hashes in `log_nodes`."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def get(self, height: int, index: int) -> bytes:
        row = self.conn.execute(
            "SELECT hash FROM log_nodes WHERE height = ? AND idx = ?", (height, index)
        ).fetchone()
        if row is None:
            raise LookupError(f"the log has no node ({height}, {index})")
        return bytes(row[0])

    def put(self, height: int, index: int, digest: bytes) -> None:
        self.conn.execute(
            "INSERT INTO log_nodes (height, idx, hash) VALUES (?, ?, ?)", (height, index, digest)
        )


class EvidenceLog:
    """Appends leaves and signs checkpoints on the writer's connection; exports bundles."""

    def __init__(self, conn: sqlite3.Connection, signer: NoteSigner) -> None:
        self.conn = conn
        self.signer = signer
        self.tree = self._open()

    def _open(self) -> MerkleLog:
        (size,) = self.conn.execute("SELECT COUNT(*) FROM log_leaves").fetchone()
        return MerkleLog(SqliteNodes(self.conn), size=size)

    def reload(self) -> None:
        """Forget appends a rolled-back transaction made; call after a rollback."""
        self.tree = self._open()

    def head(self, url_id: int) -> int:
        """The index of the URL's latest leaf (its next leaf's `url_prev`), -1 if none."""
        (last,) = self.conn.execute(
            "SELECT MAX(idx) FROM log_leaves WHERE url_id = ?", (url_id,)
        ).fetchone()
        return -1 if last is None else int(last)

    def append(self, leaf: Leaf, url_id: int | None = None) -> int:
        """Log one leaf in the caller's transaction; return its index."""
        data = encode_leaf(leaf)
        index = self.tree.append(leaf_hash(data))
        self.conn.execute(
            "INSERT INTO log_leaves (idx, kind, url_id, leaf) VALUES (?, ?, ?, ?)",
            (index, leaf.to_json()["leaf"], url_id, data),
        )
        return index

    def checkpoint(self, now: float) -> str:
        """Sign and keep a checkpoint of the log as it is (the same one again if unchanged)."""
        size = self.tree.size
        row = self.conn.execute(
            "SELECT note FROM log_checkpoints WHERE size = ?", (size,)
        ).fetchone()
        if row is not None:
            return str(row[0])
        note = sign_checkpoint(Checkpoint(self.signer.name, size, self.tree.root()), self.signer)
        self.conn.execute(
            "INSERT INTO log_checkpoints (size, note, signed_at) VALUES (?, ?, ?)",
            (size, note, now),
        )
        return note

    def export(
        self,
        url_ids: Iterable[int],
        url_hashes: Sequence[bytes],
        directory: Path,
        *,
        older_sizes: Sequence[int] = (),
    ) -> None:
        """Write the bundle of these URLs against the latest checkpoint, into `directory`."""
        export_bundle(
            self.conn, self.signer.verifier(), url_ids, url_hashes, directory,
            older_sizes=older_sizes,
        )  # fmt: skip


def _leaves(conn: sqlite3.Connection, sql: str, args: Sequence[object]) -> list[tuple[int, Leaf]]:
    return [(int(i), decode_leaf(bytes(b))) for i, b in conn.execute(sql, args)]


def verdict_checkpoints(conn: sqlite3.Connection, url_ids: Iterable[int]) -> list[int]:
    """The sizes of the first checkpoints that covered each verdict leaf of these URLs."""
    ids = sorted(set(url_ids))
    marks = ",".join("?" * len(ids))
    return [
        int(n)
        for (n,) in conn.execute(
            "SELECT DISTINCT (SELECT MIN(c.size) FROM log_checkpoints c WHERE c.size > l.idx)"
            f" FROM log_leaves l WHERE l.kind = 'verdict' AND l.url_id IN ({marks})",
            ids,
        )
        if n is not None
    ]


def export_bundle(
    conn: sqlite3.Connection,
    verifier: NoteVerifier,
    url_ids: Iterable[int],
    url_hashes: Sequence[bytes],
    directory: Path,
    *,
    older_sizes: Sequence[int] = (),
) -> int:
    """Write the bundle of these URLs against the latest checkpoint into `directory`; return
    how many leaves it holds. Reads only: any connection to the database will do.

    `older_sizes` picks earlier kept checkpoints to include with consistency proofs.
    """
    row = conn.execute(
        "SELECT size, note FROM log_checkpoints ORDER BY size DESC LIMIT 1"
    ).fetchone()
    if row is None:
        raise LookupError("the log has no checkpoint yet")
    size, note = int(row[0]), str(row[1])
    ids = sorted(set(url_ids))
    marks = ",".join("?" * len(ids))
    entries = _leaves(
        conn,
        f"SELECT idx, leaf FROM log_leaves WHERE idx < ? AND (kind = 'agent_key'"
        f" OR url_id IN ({marks})) ORDER BY idx",
        [size, *ids],
    )
    wanted = ",".join("?" * len(older_sizes))
    older = [
        str(n)
        for (n,) in conn.execute(
            f"SELECT note FROM log_checkpoints WHERE size IN ({wanted}) AND size < ? ORDER BY size",
            [*older_sizes, size],
        )
    ]
    tree = MerkleLog(SqliteNodes(conn), size=size)
    bundle = build_bundle(tree, entries, note, verifier, urls=url_hashes, older=older)
    write_bundle(bundle, directory)
    return len(entries)


class ExportError(Exception):
    """An export that cannot be made as asked (no such URL, no checkpoint, no log)."""


@dataclass(frozen=True)
class Exported:
    urls: int
    leaves: int
    size: int


def export_urls(
    db: Path,
    verifier: NoteVerifier,
    directory: Path,
    *,
    url: str | None = None,
    provider: str | None = None,
    since: str | None = None,
) -> Exported:
    """`evidence export`: the bundle of one reported URL, or of a provider's URLs."""
    from collector.reports_file import parse_time
    from collector.store.reads import connect_readonly
    from collector.urls import InvalidURL, normalize_url

    conn = connect_readonly(db)
    try:
        if url is not None:
            try:
                text = normalize_url(url)
            except InvalidURL as exc:
                raise ExportError(f"not a URL: {exc}") from exc
            rows = conn.execute("SELECT id, url FROM urls WHERE url = ?", (text,)).fetchall()
            if not rows:
                raise ExportError(f"{db} has no report of that URL")
        else:
            sql = (
                "SELECT u.id, u.url FROM urls u JOIN url_state s ON s.url_id = u.id"
                " WHERE COALESCE(s.first_provider, s.provider) = ?"
            )
            args: list[object] = [provider]
            if since:
                try:
                    args.append(parse_time(since, "--since"))
                except ValueError as exc:
                    raise ExportError(str(exc)) from exc
                sql += " AND s.notified_at >= ?"
            rows = conn.execute(sql + " ORDER BY u.id", args).fetchall()
            if not rows:
                raise ExportError(f"{db} has no URL attributed to provider {provider!r}")
        ids = [int(i) for i, _ in rows]
        hashes = [url_sha256(str(u)) for _, u in rows]
        try:
            (logged,) = conn.execute(
                f"SELECT COUNT(*) FROM log_leaves WHERE url_id IN ({','.join('?' * len(ids))})",
                ids,
            ).fetchone()
        except sqlite3.OperationalError as exc:
            raise ExportError(f"{db} has no evidence log (an older schema): {exc}") from exc
        if not logged:
            raise ExportError(
                "the evidence log holds nothing about these URLs (was the collector run with"
                " --log-key-file when they were reported?)"
            )
        size = conn.execute("SELECT MAX(size) FROM log_checkpoints").fetchone()[0]
        if size is None:
            raise ExportError("the evidence log has no signed checkpoint yet")
        try:
            leaves = export_bundle(
                conn, verifier, ids, hashes, directory,
                older_sizes=verdict_checkpoints(conn, ids),
            )  # fmt: skip
        except (EvidenceError, LookupError) as exc:
            raise ExportError(str(exc)) from exc
        except FileExistsError as exc:
            raise ExportError(f"{directory} is not empty; choose a new directory") from exc
        return Exported(len(ids), leaves, int(size))
    finally:
        conn.close()
