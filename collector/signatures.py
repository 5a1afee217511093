"""The agents' batch signatures, checked at the stream before anything of a batch is stored.

An agent with a key signs each result batch once: the RFC 6962 root of a tree
over its results' observations (collector/evidence/wire.py builds the same tree
on both sides). `Signatures.check` rebuilds that tree from the wire and checks
the one signature; the tree's bytes and hashes then go to the evidence log.
For an agent without a key the collector builds the tree itself, with each
URL's SHA-256 read from the database once and kept (`url_hashes`).

Building the tree is about 10 µs of Python per result and a check about
165 µs per batch; with `workers` > 0 both run in worker processes beside the
writer (a batch is one task), otherwise inline on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import multiprocessing
import signal
from collections.abc import Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

from collector.evidence.leaves import batch_signing_bytes
from collector.evidence.note import ed25519_verifies
from collector.evidence.wire import BatchTree, batch_tree
from collector.store.reads import connect_readonly, url_hashes
from collector.store.sql import Connection
from protos.takedown.v1 import takedown_pb2 as pb

# URL hashes kept in memory (32 bytes and a dict slot each); beyond it the cache starts over.
HASH_CACHE = 500_000


def check_batch(public_key: bytes, agent: str, network: str, batch: bytes) -> BatchTree | None:
    """The tree of a serialized `ResultBatch` if its signature verifies over it, else None."""
    message = pb.ResultBatch.FromString(batch)
    tree = batch_tree(agent, network, message.results)
    signed = batch_signing_bytes(agent, network, tree.size, tree.root)
    return tree if ed25519_verifies(public_key, signed, message.batch_signature) else None


def _orphan_dies() -> None:
    """In a worker: die with the collector, even a SIGKILLed one (Linux PR_SET_PDEATHSIG)."""
    # Elsewhere the worker ends only when it finds its call queue closed.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)


class Signatures:
    """Checks batch signatures and finds URL hashes; `close()` when done."""

    def __init__(self, db_path: Path | str, workers: int = 0) -> None:
        self.db_path = db_path
        self._hashes: dict[int, bytes] = {}
        self._conn: Connection | None = None
        # The database is read on one thread (a connection serves one statement at a time).
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="url-hashes")
        self._pool: Executor | None = None
        if workers > 0:
            # spawn, not fork: the collector's gRPC threads must not be forked.
            self._pool = ProcessPoolExecutor(
                workers, mp_context=multiprocessing.get_context("spawn"), initializer=_orphan_dies
            )

    def _read(self, ids: list[int]) -> dict[int, bytes]:
        if self._conn is None:
            self._conn = connect_readonly(self.db_path)
        return url_hashes(self._conn, ids)

    async def url_hashes(self, ids: Sequence[int]) -> dict[int, bytes]:
        """The SHA-256 of each known URL among `ids` (an unknown id is left out)."""
        wanted = set(ids)
        known = {i: self._hashes[i] for i in wanted if i in self._hashes}
        missing = sorted(wanted - known.keys())
        if missing:
            loop = asyncio.get_running_loop()
            found = await loop.run_in_executor(self._reader, self._read, missing)
            if len(self._hashes) + len(found) > HASH_CACHE:
                self._hashes.clear()
            self._hashes.update(found)
            known.update(found)
        return known

    async def check(
        self, public_key: bytes, agent: str, network: str, batch: pb.ResultBatch
    ) -> BatchTree | None:
        """The batch's tree if its signature verifies under `public_key`, else None.

        Every result must carry its 32-byte `url_sha256`.
        """
        wire = batch.SerializeToString()  # one call, and what a worker process is sent
        if self._pool is None:
            return check_batch(public_key, agent, network, wire)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, check_batch, public_key, agent, network, wire)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
        self._reader.submit(self._close_conn).result()
        self._reader.shutdown()

    def _close_conn(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
