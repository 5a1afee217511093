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
from pathlib import Path

from collector.evidence.bundle import build_bundle, write_bundle
from collector.evidence.checkpoint import Checkpoint, sign_checkpoint
from collector.evidence.leaves import Leaf, decode_leaf, encode_leaf
from collector.evidence.log import MerkleLog
from collector.evidence.merkle import leaf_hash
from collector.evidence.note import NoteSigner

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

    def _leaves(self, sql: str, args: Sequence[object]) -> list[tuple[int, Leaf]]:
        return [(int(i), decode_leaf(bytes(b))) for i, b in self.conn.execute(sql, args)]

    def export(
        self,
        url_ids: Iterable[int],
        url_hashes: Sequence[bytes],
        directory: Path,
        *,
        older_sizes: Sequence[int] = (),
    ) -> None:
        """Write the bundle of these URLs against the latest checkpoint, into `directory`.

        `older_sizes` picks earlier kept checkpoints to include with consistency proofs.
        """
        row = self.conn.execute(
            "SELECT size, note FROM log_checkpoints ORDER BY size DESC LIMIT 1"
        ).fetchone()
        if row is None:
            raise LookupError("the log has no checkpoint yet")
        size, note = int(row[0]), str(row[1])
        ids = sorted(set(url_ids))
        marks = ",".join("?" * len(ids))
        entries = self._leaves(
            f"SELECT idx, leaf FROM log_leaves WHERE idx < ? AND (kind = 'agent_key'"
            f" OR url_id IN ({marks})) ORDER BY idx",
            [size, *ids],
        )
        wanted = ",".join("?" * len(older_sizes))
        older = [
            str(n)
            for (n,) in self.conn.execute(
                f"SELECT note FROM log_checkpoints WHERE size IN ({wanted}) AND size < ?"
                " ORDER BY size",
                [*older_sizes, size],
            )
        ]
        bundle = build_bundle(
            self.tree, entries, note, self.signer.verifier(), urls=url_hashes, older=older
        )
        write_bundle(bundle, directory)
