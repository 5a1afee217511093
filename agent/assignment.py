"""The URLs an agent holds, and the per-bucket digests it reports on reconnect.

The link hands it plain changes; it answers what to (re)schedule and what to
stop, and keeps its digests current so a reconnect only resends the buckets
that differ. The decisions are pure; the URL texts go to a `UrlTexts` store
(`agent.texts`): the spool's file, an unnamed temporary file (an agent without a
state directory), or a compact in-memory arena (the default, for tests and tools).

Memory: per URL a slot (`agent.slots.Slots`) and, in arrays, its interval in
milliseconds and a CRC-32 of its text, about 20 bytes; no Python object per
URL. The CRC tells an unchanged upsert (a reconnect resends whole buckets)
without reading the text back from the store.
"""

from __future__ import annotations

import zlib
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from agent.slots import Slots
from agent.texts import Arena, UrlTexts
from client.digests import Digests, bucket_of


@dataclass(frozen=True)
class AssignmentChange:
    """Plain form of an AssignmentUpdate: (url_id, url, interval seconds) to add or change."""

    upsert: tuple[tuple[int, str, float], ...] = ()
    remove: tuple[int, ...] = ()
    replace_buckets: tuple[int, ...] = ()
    in_sync: bool = False


@dataclass(frozen=True)
class Applied:
    """What a change means for the schedule."""

    schedule: tuple[tuple[int, float], ...]
    stop: tuple[int, ...]


class Assignment:
    """url_id → (url, interval) with incremental bucket digests; texts kept in `texts`."""

    def __init__(self, texts: UrlTexts | None = None) -> None:
        self.texts: UrlTexts = texts if texts is not None else Arena()
        self.digests = Digests()
        self._slots = Slots()
        self._interval_ms = array("q")
        self._crc = array("I")

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, url_id: object) -> bool:
        return url_id in self._slots

    def url(self, url_id: int) -> str | None:
        """The URL's text (read from the store), or None if it is not held."""
        if url_id not in self._slots:
            return None
        return self.texts.url(url_id)

    def interval(self, url_id: int) -> float | None:
        """The URL's probe interval in seconds, or None if it is not held."""
        slot = self._slots.get(url_id)
        return None if slot < 0 else self._interval_ms[slot] / 1000

    def _drop(self, url_id: int) -> bool:
        slot = self._slots.release(url_id)
        if slot < 0:
            return False
        self.digests.toggle(url_id, self._interval_ms[slot])
        return True

    def _hold(self, url_id: int, interval_ms: int, crc: int) -> bool:
        """Hold url_id with this interval and text CRC; False if it was held so already."""
        slot, new = self._slots.add(url_id)
        if new:
            if slot == len(self._interval_ms):
                self._interval_ms.append(interval_ms)
                self._crc.append(crc)
            else:
                self._interval_ms[slot], self._crc[slot] = interval_ms, crc
        else:
            old_ms = self._interval_ms[slot]
            if old_ms == interval_ms and self._crc[slot] == crc:
                return False
            self.digests.toggle(url_id, old_ms)
            self._interval_ms[slot], self._crc[slot] = interval_ms, crc
        self.digests.toggle(url_id, interval_ms)
        return True

    def apply(self, change: AssignmentChange) -> Applied:
        """Fold a change in and record it in the text store; return the URLs to (re)schedule
        and those to stop probing. The store's errors (SpoolError) propagate, after the
        change is applied in memory."""
        stop: list[int] = []
        if change.replace_buckets:
            buckets = set(change.replace_buckets)
            listed = {url_id for url_id, _, _ in change.upsert}
            stale = [u for u in self._slots if bucket_of(u) in buckets and u not in listed]
            stop.extend(u for u in stale if self._drop(u))
        stop.extend(u for u in change.remove if self._drop(u))
        schedule: list[tuple[int, float]] = []
        record: list[tuple[int, str, float]] = []
        for entry in change.upsert:
            url_id, url, interval = entry
            if self._hold(url_id, _ms(interval), zlib.crc32(url.encode())):
                schedule.append((url_id, interval))
                record.append(entry)
        if record or stop:
            self.texts.record_assignment(record, stop)
        return Applied(tuple(schedule), tuple(stop))

    def resume(self, held: Iterable[tuple[int, int, int]]) -> Iterator[tuple[int, float]]:
        """Hold what the store already has, (url_id, interval_ms, text CRC), recording
        nothing; yield (url_id, interval seconds) of each, to schedule."""
        for url_id, interval_ms, crc in held:
            if self._hold(url_id, interval_ms, crc):
                yield url_id, interval_ms / 1000

    def digest_list(self) -> list[int]:
        """The digests to send in Hello; empty when nothing is held."""
        return list(self.digests.values) if len(self._slots) else []

    def ids(self) -> Iterator[int]:
        """The ids held (a snapshot)."""
        return iter(self._slots)

    def items(self) -> Iterator[tuple[int, str | None, float]]:
        """(url_id, url, interval seconds) of every URL held; reads every text (tests, audits)."""
        for url_id in self._slots:
            yield url_id, self.texts.url(url_id), self._interval_ms[self._slots.get(url_id)] / 1000


def _ms(interval: float) -> int:
    return round(interval * 1000)
