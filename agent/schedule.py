"""Decide which assigned URLs an agent should probe now.

The schedule is pure: every method that depends on time takes ``now``, and
randomness comes from an injected ``random.Random``, so tests run days of
simulated time instantly and reproducibly.

Theory of operation: an agent may hold a million URLs, so nothing here is a
Python object per URL. A URL has a slot (`agent.slots.Slots`), and per slot
its due time and interval sit in ``array('d')``: about 33 bytes per URL in all,
where a heap of ``(due, url_id, interval)`` tuples and a dict cost 140.

Due times are kept in a two-level timing wheel. Near due times (before a
horizon two far buckets past ``now``) sit in ``resolution``-second buckets
(``array('i')`` of slots, keyed by ``floor(due / resolution)``, with a heap of
the bucket keys); later ones in far buckets 1,024 times as wide, which
*cascade* into near buckets once they are the earliest. So a month of spread
due times takes a few thousand buckets, not one per URL. Only the earliest
near buckets are *loaded*: their entries move into a small heap of
``(due, url_id, slot)`` tuples (``_ready``), which gives exact earliest-first
order; a URL whose due time falls into a loaded bucket goes straight to that
heap. A bucket is loaded (or cascaded) when it begins no later than the
earliest entry known so far, so the ready heap holds about one bucket of URLs,
and the loaded set is forgotten whenever the ready heap runs empty.

Removing a URL or changing its due time does not search anything: the old
entry turns stale, because an entry is live only if its slot still holds that
url_id with that due time (a bucket entry: with a due time in that bucket).
Stale entries are skipped when they are met, and everything is rebuilt from
the slots once entries outnumber twice the live URLs, which keeps the memory
bounded and the rebuild cost amortised O(1).

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
from array import array
from collections.abc import Iterator

from agent.slots import Slots

_Ready = tuple[float, int, int]  # (due, url_id, slot)

_MIN_STALE_BEFORE_COMPACT = 64
_FAR_BUCKETS = 1024  # a far bucket spans this many near ones


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


class _Wheel:
    """One level of the timing wheel: buckets of slots keyed by floor(due / width)."""

    __slots__ = ("buckets", "entries", "keys", "width")

    def __init__(self, width: float) -> None:
        self.width = width
        self.buckets: dict[int, array[int]] = {}
        self.keys: list[int] = []  # heap of the keys of buckets
        self.entries = 0  # slots in all buckets, stale ones included

    def key(self, due: float) -> int:
        return math.floor(due / self.width)

    def add(self, key: int, slot: int) -> None:
        bucket = self.buckets.get(key)
        if bucket is None:
            bucket = self.buckets[key] = array("i")
            heapq.heappush(self.keys, key)
        bucket.append(slot)
        self.entries += 1

    def first_start(self) -> float:
        """Where the earliest bucket begins (a lower bound of every due time in it)."""
        return self.keys[0] * self.width if self.keys else math.inf

    def pop_first(self) -> tuple[int, array[int]]:
        key = heapq.heappop(self.keys)
        bucket = self.buckets.pop(key)
        self.entries -= len(bucket)
        return key, bucket


class Schedule:
    """Due times for a set of URL ids, each with its own probe interval in seconds."""

    __slots__ = ("_due", "_far", "_first_spread", "_horizon", "_interval", "_jitter",
                 "_loaded", "_near", "_now", "_ready", "_rng", "_slots")  # fmt: skip

    def __init__(
        self,
        rng: random.Random,
        jitter: float = 0.1,
        first_spread: float = 60.0,
        resolution: float = 1.0,
    ) -> None:
        """Jitter is the +/- fraction of an interval; first_spread caps a new URL's first delay;
        resolution is the width of a near bucket in seconds (order within one is exact)."""
        if not 0.0 <= jitter < 1.0:
            raise ValueError(f"jitter must be in [0, 1), got {jitter!r}")
        if not (math.isfinite(first_spread) and first_spread >= 0.0):
            raise ValueError(f"first_spread must be finite and >= 0, got {first_spread!r}")
        if not (math.isfinite(resolution) and resolution > 0.0):
            raise ValueError(f"resolution must be finite and > 0, got {resolution!r}")
        self._rng = rng
        self._jitter = jitter
        self._first_spread = first_spread
        self._slots = Slots()
        self._due = array("d")
        self._interval = array("d")
        self._near = _Wheel(resolution)
        self._far = _Wheel(resolution * _FAR_BUCKETS)
        self._now = -math.inf  # the latest `now` seen
        self._horizon = -math.inf  # due times from here on go to the far wheel
        self._loaded: set[int] = set()  # near keys whose URLs are in _ready
        self._ready: list[_Ready] = []

    def set(self, url_id: int, interval: float, now: float) -> None:
        """Add a URL, or change its interval; a shorter interval can make it due sooner.

        A new URL is first due uniformly in [now, now + min(interval, first_spread)].
        A known URL with a new interval is due at min(current due, now + jittered interval).
        Setting the same interval again changes nothing.
        """
        if not (math.isfinite(interval) and interval > 0.0):
            raise ValueError(f"interval must be finite and > 0, got {interval!r}")
        interval = float(interval)
        self._advance(now)
        slot, new = self._slots.add(url_id)
        if new:
            due = now + self._rng.uniform(0.0, min(interval, self._first_spread))
            if slot == len(self._due):
                self._due.append(due)
                self._interval.append(interval)
            else:
                self._due[slot], self._interval[slot] = due, interval
            self._place(due, url_id, slot)
        elif self._interval[slot] != interval:
            current = self._due[slot]
            due = min(current, now + interval * self._jittered())
            self._interval[slot] = interval
            if due != current:
                self._due[slot] = due
                self._place(due, url_id, slot)
        self._maybe_compact()

    def remove(self, url_id: int) -> None:
        """Forget a URL; unknown ids are ignored."""
        if self._slots.release(url_id) >= 0:
            self._maybe_compact()

    def clear(self) -> None:
        """Forget every URL."""
        self._slots = Slots()
        self._due = array("d")
        self._interval = array("d")
        self._near = _Wheel(self._near.width)
        self._far = _Wheel(self._far.width)
        self._loaded = set()
        self._ready = []

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, url_id: object) -> bool:
        return url_id in self._slots

    def interval(self, url_id: int) -> float | None:
        """The probe interval of a URL in seconds, or None if it is not scheduled."""
        slot = self._slots.get(url_id)
        return None if slot < 0 else self._interval[slot]

    def ids(self) -> Iterator[int]:
        """The scheduled ids, as a snapshot so callers may set or remove while iterating."""
        return iter(self._slots)

    @property
    def heap_size(self) -> int:
        """Entries held, stale ones included; at most 2 x len(self) plus a small constant."""
        return self._near.entries + self._far.entries + len(self._ready)

    def pop_due(self, now: float, limit: int | None = None) -> list[int]:
        """Return ids due at or before now, earliest first, at most limit, and reschedule them.

        The next due time is the old due time plus a jittered interval, but never
        before now + interval * (1 - jitter), so a late agent does not burst.
        """
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit!r}")
        self._advance(now)
        ready = self._ready
        due_of = self._due
        floor_factor = 1.0 - self._jitter
        due_ids: list[int] = []
        while limit is None or len(due_ids) < limit:
            self._settle()
            if not ready or ready[0][0] > now:
                break
            due, url_id, slot = heapq.heappop(ready)
            interval = self._interval[slot]
            next_due = max(due + interval * self._jittered(), now + interval * floor_factor)
            due_of[slot] = next_due
            self._place(next_due, url_id, slot)
            due_ids.append(url_id)
        return due_ids

    def next_due(self) -> float | None:
        """The earliest due time of any scheduled URL, or None when there is none."""
        self._settle()
        return self._ready[0][0] if self._ready else None

    def _advance(self, now: float) -> None:
        _check_now(now)
        if now > self._now:
            self._now = now
            self._horizon = (self._far.key(now) + 2) * self._far.width

    def _live(self, entry: _Ready) -> bool:
        due, url_id, slot = entry
        return self._slots.ids[slot] == url_id and self._due[slot] == due

    def _place(self, due: float, url_id: int, slot: int) -> None:
        """File a (new) due time of a slot: far ahead in the far wheel, else near."""
        if due >= self._horizon:
            self._far.add(self._far.key(due), slot)
        else:
            self._place_near(due, url_id, slot)

    def _place_near(self, due: float, url_id: int, slot: int) -> None:
        key = self._near.key(due)
        if key in self._loaded:
            heapq.heappush(self._ready, (due, url_id, slot))
        else:
            self._near.add(key, slot)

    def _settle(self) -> None:
        """Drop stale entries off the ready heap's top, and cascade far buckets and load near
        ones until its top is the earliest live due time (or nothing is scheduled)."""
        ready, near, far = self._ready, self._near, self._far
        while True:
            while ready and not self._live(ready[0]):
                heapq.heappop(ready)
            if not ready:
                self._loaded.clear()
            best = ready[0][0] if ready else math.inf
            near_start = near.first_start()
            if far.keys and far.first_start() <= min(best, near_start):
                self._cascade(*far.pop_first())
            elif near.keys and near_start <= best:
                self._load(*near.pop_first())
            else:
                return

    def _live_slots(self, wheel: _Wheel, key: int, bucket: array[int]) -> Iterator[int]:
        """The live slots of a bucket just taken off `wheel`, each once."""
        ids, due_of = self._slots.ids, self._due
        seen: set[int] = set()
        for slot in bucket:
            if ids[slot] >= 0 and slot not in seen and wheel.key(due_of[slot]) == key:
                seen.add(slot)
                yield slot

    def _cascade(self, key: int, bucket: array[int]) -> None:
        """Move a far bucket's live entries into the near wheel."""
        ids, due_of = self._slots.ids, self._due
        for slot in self._live_slots(self._far, key, bucket):
            self._place_near(due_of[slot], ids[slot], slot)

    def _load(self, key: int, bucket: array[int]) -> None:
        """Move a near bucket's live entries into the ready heap."""
        self._loaded.add(key)
        ids, due_of, ready = self._slots.ids, self._due, self._ready
        for slot in self._live_slots(self._near, key, bucket):
            heapq.heappush(ready, (due_of[slot], ids[slot], slot))

    def _jittered(self) -> float:
        return 1.0 + self._rng.uniform(-self._jitter, self._jitter)

    def _maybe_compact(self) -> None:
        """Rebuild the wheels and the ready heap from the slots once stale entries outnumber
        live ones."""
        live = len(self._slots)
        if self.heap_size - live <= max(live, _MIN_STALE_BEFORE_COMPACT):
            return
        self._near = _Wheel(self._near.width)
        self._far = _Wheel(self._far.width)
        self._ready = []
        ids, due_of = self._slots.ids, self._due
        for slot, url_id in enumerate(ids):
            if url_id >= 0:
                self._place(due_of[slot], url_id, slot)


def _check_now(now: float) -> None:
    if not math.isfinite(now):
        raise ValueError(f"now must be finite, got {now!r}")
