"""Results waiting to be delivered, and batches waiting to be acknowledged.

Every result gets a sequence number that is unique and increasing for this
agent; the collector stores each (agent, seq) once, so a batch sent again
after a reconnect is never counted twice. A batch leaves the outbox only when
the collector acknowledges it: unacknowledged batches are sent again, first,
after a reconnect (at-least-once delivery).

Sequence numbers start from the agent's clock in microseconds at start-up,
so they keep increasing across restarts without a file (as long as the agent
produces fewer than a million results a second on average).

This version holds results in memory; it is bounded by `limit`, and when full
it drops the oldest pending results, counting them.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, replace
from typing import Protocol

from agent.result import ProbeResult


@dataclass(frozen=True)
class Batch:
    batch_id: int
    results: tuple[ProbeResult, ...]


class ResultQueue(Protocol):
    """What the link and the agent need of an outbox: `Outbox` in memory, `Spool` on disk."""

    acked: int
    redelivered: int
    dropped: int

    def add(self, result: ProbeResult) -> ProbeResult: ...
    def take(self, max_results: int) -> Batch | None: ...
    def ack(self, batch_id: int) -> int: ...
    def requeue(self) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...
    def __len__(self) -> int: ...
    @property
    def pending(self) -> int: ...
    @property
    def inflight(self) -> int: ...
    @property
    def bytes(self) -> int: ...


class Outbox:
    """Pending results, in-flight batches and the sequence counter."""

    def __init__(self, *, limit: int = 1_000_000, first_seq: int | None = None) -> None:
        self.limit = limit
        self._next_seq = first_seq if first_seq is not None else time.time_ns() // 1000
        self._next_batch = 1
        self._pending: deque[ProbeResult] = deque()
        self._inflight: dict[int, Batch] = {}
        self._resend: deque[Batch] = deque()
        self.dropped = 0
        self.acked = 0
        self.redelivered = 0

    def add(self, result: ProbeResult) -> ProbeResult:
        """Number a new result and queue it; drop the oldest pending one if full."""
        numbered = replace(result, seq=self._next_seq)
        self._next_seq += 1
        if len(self) >= self.limit and self._pending:
            self._pending.popleft()
            self.dropped += 1
        self._pending.append(numbered)
        return numbered

    def flush(self) -> None:
        """Nothing to make durable: this outbox lives and dies with the process."""

    def close(self) -> None:
        """Nothing to release."""

    def take(self, max_results: int) -> Batch | None:
        """The next batch to send: a batch to resend first, else up to max_results new results."""
        if self._resend:
            batch = self._resend.popleft()
        elif self._pending:
            n = min(max_results, len(self._pending))
            batch = Batch(self._next_batch, tuple(self._pending.popleft() for _ in range(n)))
            self._next_batch += 1
        else:
            return None
        self._inflight[batch.batch_id] = batch
        return batch

    def ack(self, batch_id: int) -> int:
        """Forget an acknowledged batch; return how many results it held (0 if unknown)."""
        batch = self._inflight.pop(batch_id, None)
        if batch is None:
            return 0
        self.acked += len(batch.results)
        return len(batch.results)

    def requeue(self) -> None:
        """After a lost stream: every unacknowledged batch is sent again, oldest first."""
        for batch_id in sorted(self._inflight):
            self._resend.append(self._inflight[batch_id])
            self.redelivered += len(self._inflight[batch_id].results)
        self._inflight.clear()

    @property
    def pending(self) -> int:
        return len(self._pending) + sum(len(b.results) for b in self._resend)

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    @property
    def bytes(self) -> int:
        """Approximate memory held by queued results (no file: this outbox is in memory)."""
        return len(self) * 200

    def __len__(self) -> int:
        return self.pending + sum(len(b.results) for b in self._inflight.values())
