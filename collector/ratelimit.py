"""Per-agent token buckets on results: pure, the caller passes the clock."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenBucket:
    """`rate` tokens a second up to `burst`; a batch costs one token per result.

    A batch is admitted while the bucket holds at least its cost, or is full: a batch
    larger than `burst` is admitted when the bucket is full and leaves it in debt, so
    no batch size is refused forever while the long-run rate stays at `rate`.
    """

    rate: float
    burst: float
    level: float = field(init=False)
    updated: float | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if self.rate <= 0 or self.burst <= 0:
            raise ValueError("rate and burst must be positive")
        self.level = self.burst

    def admit(self, cost: int, now: float) -> bool:
        if self.updated is not None:
            self.level = min(self.burst, self.level + (now - self.updated) * self.rate)
        self.updated = now
        if self.level < min(cost, self.burst):
            return False
        self.level -= cost
        return True


class RateLimiter:
    """One bucket per agent id, kept across reconnects (a new stream does not refill it)."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self._buckets: dict[int, TokenBucket] = {}

    def admit(self, agent_id: int, cost: int, now: float) -> bool:
        bucket = self._buckets.get(agent_id)
        if bucket is None:
            bucket = self._buckets[agent_id] = TokenBucket(self.rate, self.burst)
        return bucket.admit(cost, now)
