"""The URLs an agent holds, and the per-bucket digests it reports on reconnect.

Pure: the link hands it plain changes, it answers what to (re)schedule and
what to stop, and keeps its digests current so a reconnect only resends the
buckets that differ.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from agent.schedule import SharedFloats
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
    """url_id → (url, interval) with incremental bucket digests."""

    def __init__(self) -> None:
        self.urls: dict[int, tuple[str, float]] = {}
        self.digests = Digests()
        self._shared = SharedFloats()  # the link makes a new float per URL

    def __len__(self) -> int:
        return len(self.urls)

    def url(self, url_id: int) -> str | None:
        entry = self.urls.get(url_id)
        return entry[0] if entry else None

    def _drop(self, url_id: int) -> bool:
        entry = self.urls.pop(url_id, None)
        if entry is None:
            return False
        self.digests.toggle(url_id, _ms(entry[1]))
        return True

    def apply(self, change: AssignmentChange) -> Applied:
        """Fold a change in; return the URLs to (re)schedule and those to stop probing."""
        stop: list[int] = []
        if change.replace_buckets:
            buckets = set(change.replace_buckets)
            listed = {url_id for url_id, _, _ in change.upsert}
            stale = [u for u in self.urls if bucket_of(u) in buckets and u not in listed]
            stop.extend(u for u in stale if self._drop(u))
        stop.extend(u for u in change.remove if self._drop(u))
        schedule: list[tuple[int, float]] = []
        for url_id, url, interval in change.upsert:
            interval = self._shared(interval)
            old = self.urls.get(url_id)
            if old == (url, interval):
                continue
            if old is not None:
                self.digests.toggle(url_id, _ms(old[1]))
            self.urls[url_id] = (url, interval)
            self.digests.toggle(url_id, _ms(interval))
            schedule.append((url_id, interval))
        return Applied(tuple(schedule), tuple(stop))

    def digest_list(self) -> list[int]:
        """The digests to send in Hello; empty when nothing is held."""
        return list(self.digests.values) if self.urls else []

    def ids(self) -> Iterable[int]:
        return self.urls.keys()


def _ms(interval: float) -> int:
    return round(interval * 1000)
