"""The agent's signatures, checked at the stream before anything of a batch is stored.

An agent with a key signs each result's `Observation` (collector/evidence/wire.py
builds the same one on both sides). The service asks `Signatures` for the
observations of a batch (which needs each URL's SHA-256, read from the database
once and kept) and for the first result whose signature does not verify.

One Ed25519 verification costs about 165 µs through `cryptography` and holds the
GIL, so a second thread gains nothing; with `workers` > 0 the checks run in
worker processes beside the writer (a batch is one task), otherwise inline.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import multiprocessing
import signal
import sqlite3
from collections.abc import Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

from collector.evidence.leaves import Observation, observation_signing_bytes
from collector.evidence.note import ed25519_verifies
from collector.evidence.wire import observation_of
from collector.store.reads import connect_readonly, url_hashes
from protos.takedown.v1 import takedown_pb2 as pb

# URL hashes kept in memory (32 bytes and a dict slot each); beyond it the cache starts over.
HASH_CACHE = 500_000


def first_bad(public_key: bytes, signed: Sequence[tuple[bytes, bytes]]) -> int:
    """The index of the first (message, signature) that does not verify, -1 if all do."""
    for i, (message, signature) in enumerate(signed):
        if not ed25519_verifies(public_key, message, signature):
            return i
    return -1


def _orphan_dies() -> None:
    """In a worker: die with the collector, even a SIGKILLed one (Linux PR_SET_PDEATHSIG)."""
    # Elsewhere the worker ends only when it finds its call queue closed.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)


class Signatures:
    """Builds a batch's observations and checks its signatures; `close()` when done."""

    def __init__(self, db_path: Path, workers: int = 0) -> None:
        self.db_path = db_path
        self._hashes: dict[int, bytes] = {}
        self._conn: sqlite3.Connection | None = None
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

    async def observations(
        self, agent: str, network: str, results: Sequence[pb.ProbeResult]
    ) -> list[Observation | None]:
        """Each result's observation as its agent signed it; None for an unknown URL id."""
        missing = sorted({r.url_id for r in results} - self._hashes.keys())
        if missing:
            loop = asyncio.get_running_loop()
            found = await loop.run_in_executor(self._reader, self._read, missing)
            if len(self._hashes) + len(found) > HASH_CACHE:
                self._hashes.clear()
            self._hashes.update(found)
        out: list[Observation | None] = []
        for r in results:
            digest = self._hashes.get(r.url_id)
            out.append(observation_of(agent, network, digest, r) if digest else None)
        return out

    async def first_bad(self, public_key: bytes, observations: Sequence[Observation],
                        signatures: Sequence[bytes]) -> int:  # fmt: skip
        """The index of the first observation whose signature does not verify, -1 if none."""
        signed = [
            (observation_signing_bytes(o), s) for o, s in zip(observations, signatures, strict=True)
        ]
        if self._pool is None:
            return first_bad(public_key, signed)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, first_bad, public_key, signed)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
        self._reader.submit(self._close_conn).result()
        self._reader.shutdown()

    def _close_conn(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
