"""Per-agent token buckets on results: pure, the caller passes the clock.

Over the rate, a batch is not refused but delayed: the bucket goes into debt and
the caller waits until the debt is paid before storing and acknowledging it. An
agent keeps a bounded number of batches unacknowledged, so a delayed ack slows
it down (backpressure) without a reconnect, which would cost the collector an
assignment reconcile. Only a batch that would wait longer than `max_wait` is
refused; that reservation is given back.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenBucket:
    """`rate` tokens a second up to `burst`; a batch costs one token per result."""

    rate: float
    burst: float
    level: float = field(init=False)
    updated: float | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if self.rate <= 0 or self.burst <= 0:
            raise ValueError("rate and burst must be positive")
        self.level = self.burst

    def reserve(self, cost: int, now: float, max_wait: float) -> float | None:
        """Take `cost` tokens; return the seconds to wait before using them (0: none), or
        None, taking nothing, if that would be longer than `max_wait`."""
        if self.updated is not None:
            self.level = min(self.burst, self.level + max(0.0, now - self.updated) * self.rate)
        self.updated = now
        wait = max(0.0, (cost - self.level) / self.rate)
        if wait > max_wait:
            return None
        self.level -= cost
        return wait


class RateLimiter:
    """One bucket per agent id, kept across reconnects (a new stream does not refill it)."""

    def __init__(self, rate: float, burst: float, max_wait: float = 30.0) -> None:
        self.rate = rate
        self.burst = burst
        self.max_wait = max_wait
        self._buckets: dict[int, TokenBucket] = {}

    def reserve(self, agent_id: int, cost: int, now: float) -> float | None:
        """Seconds the agent's batch of `cost` results must wait, or None: refuse it."""
        bucket = self._buckets.get(agent_id)
        if bucket is None:
            bucket = self._buckets[agent_id] = TokenBucket(self.rate, self.burst)
        return bucket.reserve(cost, now, self.max_wait)
