"""The evidence log in the collector's database: leaves, tree nodes and checkpoints.

`EvidenceLog` wraps one connection (the writer's) and appends leaves
in whatever transaction the caller has open, so a leaf exists exactly when
the fact it records was committed. The Merkle tree's frontier lives in
memory; after a rolled-back transaction the caller calls `reload()`, which
rebuilds it from what was committed. Checkpoints are signed here and kept,
so that an export can prove any earlier one consistent with the latest.

The tables (`SCHEMA`, then `BATCHES`) are created by migrations in `schema.py`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from collector.evidence.bundle import build_bundle, write_bundle
from collector.evidence.checkpoint import Checkpoint, sign_checkpoint
from collector.evidence.errors import EvidenceError
from collector.evidence.leaves import (
    Attribution,
    BatchLeaf,
    Leaf,
    ObservationLeaf,
    decode_leaf,
    encode_leaf,
    encode_observation_leaf,
    url_sha256,
)
from collector.evidence.log import MerkleLog
from collector.evidence.merkle import leaf_hash
from collector.evidence.note import NoteSigner, NoteVerifier
from collector.evidence.wire import split_hashes
from collector.store.sql import DB_ERRORS, Connection, label

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

BATCHES = """
CREATE TABLE log_batches (
    idx INTEGER PRIMARY KEY,  -- the batch leaf
    hashes BLOB NOT NULL  -- its tree's leaf hashes, 32 bytes each, for proofs inside it
);
"""

# Distinct batches, and URLs' latest leaves, kept in memory between appends.
KEPT = 100_000


class SqliteNodes:
    """The tree's complete subtree hashes in `log_nodes`; new ones held until `write()`."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.pending: dict[tuple[int, int], bytes] = {}

    def get(self, height: int, index: int) -> bytes:
        held = self.pending.get((height, index))
        if held is not None:
            return held
        row = self.conn.execute(
            "SELECT hash FROM log_nodes WHERE height = ? AND idx = ?", (height, index)
        ).fetchone()
        if row is None:
            raise LookupError(f"the log has no node ({height}, {index})")
        return bytes(row[0])

    def put(self, height: int, index: int, digest: bytes) -> None:
        self.pending[(height, index)] = digest

    def write(self) -> None:
        """Insert the nodes put since the last write, in one statement."""
        if self.pending:
            self.conn.executemany(
                "INSERT INTO log_nodes (height, idx, hash) VALUES (?, ?, ?)",
                [(h, i, d) for (h, i), d in self.pending.items()],
            )
            self.pending.clear()


class EvidenceLog:
    """Appends leaves and signs checkpoints on the writer's connection; exports bundles.

    Appended leaves and tree nodes are held in memory and inserted by `write()`, which the
    caller runs before its transaction commits (Store does, at the end of each transaction):
    a few statements per batch instead of three per result.
    """

    def __init__(self, conn: Connection, signer: NoteSigner) -> None:
        self.conn = conn
        self.signer = signer
        self.nodes = SqliteNodes(conn)
        self.tree = self._open()
        self._heads: dict[int, int] = {}  # url_id: its latest leaf
        self._batches: dict[tuple[bytes, bytes], int] = {}  # (root, signature): batch leaf
        self._leaves: list[tuple[int, str, int | None, bytes]] = []
        self._trees: list[tuple[int, bytes]] = []  # batch leaf, its tree's hashes

    def _open(self) -> MerkleLog:
        (size,) = self.conn.execute("SELECT COUNT(*) FROM log_leaves").fetchone()
        return MerkleLog(self.nodes, size=size)

    def write(self) -> None:
        """Insert what was appended since the last write; in the caller's transaction."""
        if self._leaves:
            self.conn.executemany(
                "INSERT INTO log_leaves (idx, kind, url_id, leaf) VALUES (?, ?, ?, ?)",
                self._leaves,
            )
            self._leaves.clear()
        if self._trees:
            self.conn.executemany("INSERT INTO log_batches (idx, hashes) VALUES (?, ?)",
                                  self._trees)  # fmt: skip
            self._trees.clear()
        self.nodes.write()

    def reload(self) -> None:
        """Forget appends a rolled-back transaction made; call after a rollback."""
        self._leaves.clear()
        self._trees.clear()
        self.nodes.pending.clear()
        self.tree = self._open()
        self._heads.clear()
        self._batches.clear()

    def head(self, url_id: int) -> int:
        """The index of the URL's latest leaf (its next leaf's `url_prev`), -1 if none."""
        last = self._heads.get(url_id)
        if last is None:
            self.write()  # the query must see what is held
            (found,) = self.conn.execute(
                "SELECT MAX(idx) FROM log_leaves WHERE url_id = ?", (url_id,)
            ).fetchone()
            last = -1 if found is None else int(found)
            self._keep_head(url_id, last)
        return last

    def _keep_head(self, url_id: int, index: int) -> None:
        if len(self._heads) >= KEPT:
            self._heads.clear()
        self._heads[url_id] = index

    def append(self, leaf: Leaf, url_id: int | None = None) -> int:
        """Log one leaf in the caller's transaction; return its index."""
        return self._append(encode_leaf(leaf), str(leaf.to_json()["leaf"]), url_id)

    def _append(self, data: bytes, kind: str, url_id: int | None) -> int:
        index = self.tree.append(leaf_hash(data))
        self._leaves.append((index, kind, url_id, data))
        if url_id is not None:
            self._keep_head(url_id, index)
        return index

    def batch(self, batch: BatchLeaf, hashes: bytes) -> int:
        """The index of this batch's leaf, appended (with its tree's hashes) the first time."""
        key = (batch.root, batch.signature)
        index = self._batches.get(key)
        if index is None:
            if len(self._batches) >= KEPT:
                self._batches.clear()
            index = self._batches[key] = self.append(batch)
            self._trees.append((index, hashes))
        return index

    def observation(
        self,
        data: bytes,
        batch: int,
        batch_index: int,
        attribution: Attribution,
        received_at_us: int,
        url_id: int,
    ) -> int:
        """Log one observation, given its signing bytes and its place in a logged batch."""
        leaf = encode_observation_leaf(
            data, batch, batch_index, attribution, received_at_us, self.head(url_id)
        )
        return self._append(leaf, "observation", url_id)

    def checkpoint(self, now: float) -> str:
        """Sign and keep a checkpoint of the log as it is (the same one again if unchanged)."""
        self.write()
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
        self.write()
        export_bundle(
            self.conn, self.signer.verifier(), url_ids, url_hashes, directory,
            older_sizes=older_sizes,
        )  # fmt: skip


def _leaves(conn: Connection, sql: str, args: Sequence[object]) -> list[tuple[int, Leaf]]:
    return [(int(i), decode_leaf(bytes(b))) for i, b in conn.execute(sql, args)]


def verdict_checkpoints(conn: Connection, url_ids: Iterable[int]) -> list[int]:
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
    conn: Connection,
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
    wanted_batches = sorted(
        {leaf.batch for _, leaf in entries if isinstance(leaf, ObservationLeaf)}
    )
    batches: dict[int, list[bytes]] = {}
    for chunk in range(0, len(wanted_batches), 500):
        some = wanted_batches[chunk : chunk + 500]
        rows = conn.execute(
            "SELECT b.idx, l.leaf, b.hashes FROM log_batches b JOIN log_leaves l ON l.idx = b.idx"
            f" WHERE b.idx IN ({','.join('?' * len(some))})",
            some,
        ).fetchall()
        for index, leaf_bytes, hashes in rows:
            entries.append((int(index), decode_leaf(bytes(leaf_bytes))))
            batches[int(index)] = split_hashes(bytes(hashes))
    tree = MerkleLog(SqliteNodes(conn), size=size)
    bundle = build_bundle(
        tree, entries, note, verifier, urls=url_hashes, older=older, batches=batches
    )
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
    db: Path | str,
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
    name = label(db)
    try:
        if url is not None:
            try:
                text = normalize_url(url)
            except InvalidURL as exc:
                raise ExportError(f"not a URL: {exc}") from exc
            rows = conn.execute("SELECT id, url FROM urls WHERE url = ?", (text,)).fetchall()
            if not rows:
                raise ExportError(f"{name} has no report of that URL")
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
                raise ExportError(f"{name} has no URL attributed to provider {provider!r}")
        ids = [int(i) for i, _ in rows]
        hashes = [url_sha256(str(u)) for _, u in rows]
        try:
            (logged,) = conn.execute(
                f"SELECT COUNT(*) FROM log_leaves WHERE url_id IN ({','.join('?' * len(ids))})",
                ids,
            ).fetchone()
        except DB_ERRORS as exc:
            raise ExportError(f"{name} has no evidence log (an older schema): {exc}") from exc
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
