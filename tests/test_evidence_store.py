"""The evidence log in SQLite: same tree as in memory, rollbacks, checkpoints, export."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from collector.evidence.bundle import read_bundle
from collector.evidence.checkpoint import Checkpoint, sign_checkpoint
from collector.evidence.leaves import (
    AgentKeyLeaf,
    BatchLeaf,
    NoticeLeaf,
    ReferenceForm,
    url_sha256,
)
from collector.evidence.verify import verify_bundle
from collector.store.evidence import BATCHES, SCHEMA, EvidenceLog
from tests.test_evidence_bundle import LOG, OTHER_URL, URL, scenario

URL_IDS = {url_sha256(URL): 1, url_sha256(OTHER_URL): 2}


def filled() -> tuple[sqlite3.Connection, EvidenceLog, bytes]:
    """A database holding the bundle tests' scenario, leaf by leaf; and its in-memory root."""
    s, _, _ = scenario()
    conn = sqlite3.connect(":memory:", isolation_level=None)
    conn.executescript(SCHEMA + BATCHES)
    log = EvidenceLog(conn, LOG)
    conn.execute("BEGIN")
    for index in sorted(s.leaves):
        leaf = s.leaves[index]
        if isinstance(leaf, BatchLeaf):
            assert log.batch(leaf, b"".join(s.batches[index])) == index
            continue
        url_id = None if isinstance(leaf, AgentKeyLeaf) else URL_IDS[leaf.url_sha256]
        assert url_id is None or log.head(url_id) == getattr(leaf, "url_prev", None)
        assert log.append(leaf, url_id) == index
    log.write()
    conn.execute("COMMIT")
    return conn, log, s.log.root()


def replace_prev(log: EvidenceLog, url_id: int) -> NoticeLeaf:
    """A notice about URL, chained after the URL's latest leaf."""
    return NoticeLeaf(url_sha256(URL), 1, 2, 0, 0, "", ReferenceForm.NONE, b"", 3,
                      log.head(url_id))  # fmt: skip


class TestEvidenceLog:
    def test_same_tree_as_in_memory(self) -> None:
        """Leaves appended through the database give the root of the same leaves in memory."""
        conn, log, root = filled()
        assert log.tree.root() == root
        assert EvidenceLog(conn, LOG).tree.root() == root  # reopened from stored nodes

    def test_rollback_then_reload(self) -> None:
        """Appends of a rolled-back transaction vanish from the tree after reload()."""
        conn, log, root = filled()
        size = log.tree.size
        conn.execute("BEGIN")
        log.append(AgentKeyLeaf("agent-c", "net-c", bytes(32), 1))
        log.append(AgentKeyLeaf("agent-d", "net-d", bytes(32), 1))
        log.write()  # some inserted, some still held when the rollback comes
        log.append(AgentKeyLeaf("agent-e", "net-e", bytes(32), 1))
        conn.execute("ROLLBACK")
        log.reload()
        assert (log.tree.size, log.tree.root()) == (size, root)
        log.append(AgentKeyLeaf("agent-c", "net-c", bytes(32), 1))
        assert log.tree.size == size + 1

    def test_held_appends_are_seen_and_written(self) -> None:
        """Leaves held for one insert at the transaction's end still chain: a URL's latest
        leaf is found with the in-memory heads gone, and a reopened log has them all."""
        conn, log, _ = filled()
        url_id = 1
        conn.execute("BEGIN")
        first = log.append(replace_prev(log, url_id), url_id)
        log._heads.clear()  # as when the kept heads overflow
        assert log.head(url_id) == first
        log.append(replace_prev(log, url_id), url_id)
        log.write()
        conn.execute("COMMIT")
        assert EvidenceLog(conn, LOG).tree.root() == log.tree.root()
        (count,) = conn.execute("SELECT COUNT(*) FROM log_leaves").fetchone()
        assert count == log.tree.size

    def test_checkpoint_kept_once_per_size(self) -> None:
        """A checkpoint is signed once per tree size and kept."""
        conn, log, _ = filled()
        first = log.checkpoint(now=1.0)
        assert log.checkpoint(now=2.0) == first
        assert conn.execute("SELECT COUNT(*) FROM log_checkpoints").fetchone() == (1,)

    def test_export_verifies(self, tmp_path: Path) -> None:
        """A bundle exported from the database verifies, with an earlier checkpoint."""
        conn, log, _ = filled()
        earlier = sign_checkpoint(Checkpoint(LOG.name, 7, log.tree.root(7)), LOG)
        conn.execute(
            "INSERT INTO log_checkpoints (size, note, signed_at) VALUES (7, ?, 0)", (earlier,)
        )
        log.checkpoint(now=1.0)
        log.export([1], [url_sha256(URL)], tmp_path / "b", older_sizes=[7])
        report = verify_bundle(read_bundle(tmp_path / "b"), LOG.verifier())
        assert report.problems == []
        assert (report.entries, report.urls, report.older_checkpoints) == (16, 1, 1)

    def test_export_needs_a_checkpoint(self, tmp_path: Path) -> None:
        """Exporting before any checkpoint was signed is refused."""
        _, log, _ = filled()
        with pytest.raises(LookupError, match="no checkpoint"):
            log.export([1], [url_sha256(URL)], tmp_path / "b")
