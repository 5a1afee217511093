"""Decide which assigned URLs an agent should probe now.

The schedule is pure: every method that depends on time takes ``now``, and
randomness comes from an injected ``random.Random``, so tests run days of
simulated time instantly and reproducibly.

Theory of operation: an agent may hold a million URLs, so per URL there is
exactly one dict entry (url_id -> heap entry) and one live heap entry, a
``(due, url_id, interval)`` tuple. Removing a URL or changing its interval
does not search the heap; it replaces or drops the dict entry, which turns the
old heap entry stale. An entry is live only if it *is* (by identity) the one
the dict holds, so a stale entry with equal values is never mistaken for live.
Stale entries are skipped when they reach the top of the heap, and the heap
is rebuilt from the dict once stale entries outnumber live ones, which keeps
the heap at most twice the live size and the rebuild cost amortised O(1).

Jitter spreads probes: each next due time is the previous one plus the
interval times ``1 + U(-jitter, +jitter)``, and newly assigned URLs start at a
random point of the first ``min(interval, first_spread)`` seconds. An agent
that fell behind is never scheduled sooner than ``now + interval * (1 -
jitter)``, so catching up does not turn into a burst of repeat probes.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Iterator

_Entry = tuple[float, int, float]

_MIN_STALE_BEFORE_COMPACT = 64


class SharedFloats:
    """One float object per distinct value, up to `cap` values: a million URLs share a few
    probe intervals, so each URL holds a reference (8 bytes) instead of a float (24)."""

    __slots__ = ("_cap", "_seen")

    def __init__(self, cap: int = 1024) -> None:
        self._cap = cap
        self._seen: dict[float, float] = {}

    def __call__(self, value: float) -> float:
        shared = self._seen.get(value)
        if shared is None:
            shared = value
            if len(self._seen) < self._cap:
                self._seen[value] = value
        return shared


class Schedule:
    """Due times for a set of URL ids, each with its own probe interval in seconds."""

    __slots__ = ("_entries", "_first_spread", "_heap", "_jitter", "_rng", "_shared")

    def __init__(self, rng: random.Random, jitter: float = 0.1, first_spread: float = 60.0) -> None:
        """Jitter is the +/- fraction of an interval; first_spread caps a new URL's first delay."""
        if not 0.0 <= jitter < 1.0:
            raise ValueError(f"jitter must be in [0, 1), got {jitter!r}")
        if not (math.isfinite(first_spread) and first_spread >= 0.0):
            raise ValueError(f"first_spread must be finite and >= 0, got {first_spread!r}")
        self._rng = rng
        self._jitter = jitter
        self._first_spread = first_spread
        self._heap: list[_Entry] = []
        self._entries: dict[int, _Entry] = {}
        self._shared = SharedFloats()

    def set(self, url_id: int, interval: float, now: float) -> None:
        """Add a URL, or change its interval; a shorter interval can make it due sooner.

        A new URL is first due uniformly in [now, now + min(interval, first_spread)].
        A known URL with a new interval is due at min(current due, now + jittered interval).
        Setting the same interval again changes nothing.
        """
        if not (math.isfinite(interval) and interval > 0.0):
            raise ValueError(f"interval must be finite and > 0, got {interval!r}")
        interval = self._shared(float(interval))
        _check_now(now)
        current = self._entries.get(url_id)
        if current is None:
            due = now + self._rng.uniform(0.0, min(interval, self._first_spread))
        elif current[2] == interval:
            return
        else:
            due = min(current[0], now + interval * self._jittered())
        entry = (due, url_id, interval)
        self._entries[url_id] = entry
        heapq.heappush(self._heap, entry)
        self._maybe_compact()

    def remove(self, url_id: int) -> None:
        """Forget a URL; unknown ids are ignored."""
        if self._entries.pop(url_id, None) is not None:
            self._maybe_compact()

    def clear(self) -> None:
        """Forget every URL."""
        self._entries = {}
        self._heap = []

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, url_id: object) -> bool:
        return url_id in self._entries

    def interval(self, url_id: int) -> float | None:
        """The probe interval of a URL in seconds, or None if it is not scheduled."""
        entry = self._entries.get(url_id)
        return None if entry is None else entry[2]

    def ids(self) -> Iterator[int]:
        """The scheduled ids, as a snapshot so callers may set or remove while iterating."""
        return iter(list(self._entries))

    @property
    def heap_size(self) -> int:
        """Heap entries including stale ones; at most 2 x len(self) plus a small constant."""
        return len(self._heap)

    def pop_due(self, now: float, limit: int | None = None) -> list[int]:
        """Return ids due at or before now, earliest first, at most limit, and reschedule them.

        The next due time is the old due time plus a jittered interval, but never
        before now + interval * (1 - jitter), so a late agent does not burst.
        """
        _check_now(now)
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit!r}")
        heap = self._heap
        entries = self._entries
        floor_factor = 1.0 - self._jitter
        due_ids: list[int] = []
        while heap and heap[0][0] <= now and (limit is None or len(due_ids) < limit):
            entry = heap[0]
            due, url_id, interval = entry
            if entries.get(url_id) is not entry:
                heapq.heappop(heap)
                continue
            next_due = max(due + interval * self._jittered(), now + interval * floor_factor)
            replacement = (next_due, url_id, interval)
            entries[url_id] = replacement
            heapq.heapreplace(heap, replacement)
            due_ids.append(url_id)
        return due_ids

    def next_due(self) -> float | None:
        """The earliest due time of any scheduled URL, or None when there is none."""
        heap = self._heap
        while heap and self._entries.get(heap[0][1]) is not heap[0]:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def _jittered(self) -> float:
        return 1.0 + self._rng.uniform(-self._jitter, self._jitter)

    def _maybe_compact(self) -> None:
        """Rebuild the heap from live entries once stale ones outnumber them."""
        stale = len(self._heap) - len(self._entries)
        if stale > max(len(self._entries), _MIN_STALE_BEFORE_COMPACT):
            self._heap = list(self._entries.values())
            heapq.heapify(self._heap)


def _check_now(now: float) -> None:
    if not math.isfinite(now):
        raise ValueError(f"now must be finite, got {now!r}")
