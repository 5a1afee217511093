"""One thread owns the write connection; the event loop hands it work through a queue.

SQLite allows one writer at a time and its calls block, so all writes run on
a dedicated thread, in the order they were submitted, and the asyncio side
awaits a future for each. The loop never blocks on the disk. On PostgreSQL the
same thread also renews the shard leases and folds the queue every second
(`Store.tick`).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from collector.store.model import Ingested, ResultIn, StoreError
from collector.store.shards import TICK_SECONDS, Leases
from collector.store.writes import QUEUE_CHUNK, IngestCall, Store

T = TypeVar("T")

_STOP = object()
# A group commits at most this many batches and results: one fsync for several acks, without
# holding the first batch's ack behind seconds of others' work.
MAX_GROUP = 32
MAX_GROUP_RESULTS = 4_000


@dataclass(frozen=True)
class _Ingest:
    call: IngestCall
    future: asyncio.Future[Ingested]


IDLE_SECONDS = 0.5  # with no work for this long, the store writes its dirty folds behind
log = logging.getLogger(__name__)


class Writer:
    """Runs `Store` methods on its own thread; `await writer.run(fn)` returns fn(store)."""

    def __init__(self, open_store: Callable[[], Store]) -> None:
        self._open_store = open_store
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._ready: asyncio.Future[None] | None = None
        self._closing = threading.Event()  # close() was called: long jobs may give up
        self._leases: Leases | None = None

    def held_shards(self) -> frozenset[int] | None:
        """The URL shards this collector folds (PostgreSQL), None for all (SQLite); safe from
        any thread."""
        return None if self._leases is None else self._leases.view

    async def start(self) -> None:
        """Open the store on the writer thread; raises StoreError if it cannot be opened."""
        loop = asyncio.get_running_loop()
        self._ready = loop.create_future()
        self._thread = threading.Thread(target=self._main, args=(loop,), name="sqlite-writer")
        self._thread.start()
        try:
            await self._ready
        except BaseException:
            self._thread.join()
            self._thread = None
            raise

    def _main(self, loop: asyncio.AbstractEventLoop) -> None:
        assert self._ready is not None
        ready = self._ready
        try:
            store = self._open_store()
        except BaseException as exc:
            loop.call_soon_threadsafe(_settle, ready, None, exc)
            return
        store.interrupted = self._closing.is_set
        self._leases = store.leases
        loop.call_soon_threadsafe(_settle, ready, None, None)
        next_tick = time.monotonic() + TICK_SECONDS
        try:
            while True:
                if store.leases is not None and time.monotonic() >= next_tick:
                    next_tick = time.monotonic() + TICK_SECONDS
                    try:
                        if store.tick(time.time()) >= QUEUE_CHUNK:
                            next_tick = 0.0  # more waiting: again after the next item
                    except Exception as exc:  # the leases lapse if this goes on; others take over
                        log.error("shard_tick_failed error=%s", exc)
                try:
                    item = self._queue.get(timeout=IDLE_SECONDS)
                except queue.Empty:
                    try:
                        store.idle()
                    except Exception as exc:  # the writer goes on; the folds stay dirty
                        log.error("flush_failed error=%s", exc)
                    continue
                while item is not None:
                    if item is _STOP:
                        return
                    if isinstance(item, _Ingest):
                        item = self._ingest_group(store, loop, item)
                        continue
                    fn, future = item
                    try:
                        value, error = fn(store), None
                    except BaseException as exc:
                        value, error = None, exc
                    loop.call_soon_threadsafe(_settle, future, value, error)
                    item = None
        finally:
            store.close()

    @property
    def running(self) -> bool:
        return self._thread is not None

    async def run(self, fn: Callable[[Store], T]) -> T:
        """Run fn(store) on the writer thread, after everything submitted before it."""
        if self._thread is None:
            raise StoreError("the store is closed")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.put((fn, future))
        return await future

    async def ingest(
        self, agent_id: int, results: Sequence[ResultIn], now: float, offset: float | None
    ) -> Ingested:
        """`Store.ingest`, grouped with the batches queued beside it into one commit."""
        if self._thread is None:
            raise StoreError("the store is closed")
        future: asyncio.Future[Ingested] = asyncio.get_running_loop().create_future()
        self._queue.put(_Ingest((agent_id, results, now, offset), future))
        return await future

    def _ingest_group(self, store: Store, loop: asyncio.AbstractEventLoop, first: _Ingest) -> Any:
        """Run `first` and the ingests queued right behind it as one group; return the next
        queued item that is not an ingest (run after them, in order), or None."""
        group = [first]
        following: Any = None
        results = len(first.call[1])
        while len(group) < MAX_GROUP and results < MAX_GROUP_RESULTS:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if not isinstance(item, _Ingest):
                following = item
                break
            group.append(item)
            results += len(item.call[1])
        try:
            outcomes = store.ingest_group([g.call for g in group])
        except BaseException as exc:
            outcomes = [exc] * len(group)
        for g, outcome in zip(group, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                loop.call_soon_threadsafe(_settle, g.future, None, outcome)
            else:
                loop.call_soon_threadsafe(_settle, g.future, outcome, None)
        return following

    async def close(self) -> None:
        """Finish queued work (a replan in progress gives up: Store.plan), then close the
        database."""
        if self._thread is None:
            return
        self._closing.set()
        self._queue.put(_STOP)
        thread, self._thread = self._thread, None
        await asyncio.to_thread(thread.join)


def _settle(future: asyncio.Future[Any], value: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)
