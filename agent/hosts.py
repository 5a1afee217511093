"""Per-host queues: which due probe may start now, so that one slow host never stalls the others.

A hoster that accepts connections and never answers (a tarpit), or one that is merely
overloaded, holds each probe sent to it for the whole probe timeout. If such probes waited for
their host's connections while holding a global slot, a host with thousands of reported URLs
would take every global slot and stop the measurement of all other hosts.

Theory of operation. ``HostQueues`` is pure (time is a parameter) and owns two limits: at most
``per_host`` probes of one host run at once, and each host holds at most ``backlog`` probes
waiting. A due probe is *offered* to its host's backlog; ``take`` hands out probes to start,
oldest offer first across all hosts, but only from hosts with a free connection slot, so a probe
takes a global slot only when it can connect at once. ``done`` returns the host's slot.

An offer is refused, and counted by reason, when the host's backlog is full (``full``) or when
the same URL is already waiting or running there (``busy``: it came due again before its last
probe finished, so the host is behind by a whole interval). A refused URL stays in the
schedule and is offered again at its next due time; nothing else is delayed by it.

``startable`` is the number of waiting probes that could start now if global slots allowed
(``sum over hosts of min(waiting, free host slots)``), kept up to date on every change, so the
caller can stop moving due URLs into backlogs once there is enough to fill its free slots.

Hosts that have nothing waiting or running are forgotten, so memory follows the hosts in
flight, not the assignment.
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

__all__ = ["Histogram", "HostQueues", "Start", "host_of"]

# Queue-wait buckets in seconds: from "started at once" to "waited a whole probe timeout".
WAIT_BUCKETS: tuple[float, ...] = (0.001, 0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

FULL = "full"
BUSY = "busy"


def host_of(url: str) -> str:
    """The host a URL's connections go to, lowercased; "" for a URL without one.

    Scheme and port are ignored: http:// and https:// of one name reach the same machine.
    """
    try:
        return urlsplit(url).hostname or ""
    except ValueError:
        return ""


class Histogram:
    """Cumulative-bucket counts of observed values, as Prometheus histograms expose them."""

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: Sequence[float] = WAIT_BUCKETS) -> None:
        if list(bounds) != sorted(set(bounds)) or not all(math.isfinite(b) for b in bounds):
            raise ValueError("bucket bounds must be finite, distinct and increasing")
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last bucket is +Inf
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.count += 1
        self.sum += value

    def buckets(self) -> list[tuple[str, int]]:
        """(upper bound, cumulative count) pairs, ending with "+Inf"."""
        out: list[tuple[str, int]] = []
        total = 0
        for bound, n in zip((*map(str, self.bounds), "+Inf"), self.counts, strict=True):
            total += n
            out.append((bound, total))
        return out


@dataclass(frozen=True, slots=True)
class Start:
    """A probe to start now: its URL, its host (to pass to ``done``) and how long it waited."""

    url_id: int
    host: str
    waited: float


class _Host:
    __slots__ = ("ids", "pushed", "running", "waiting")

    def __init__(self) -> None:
        self.waiting: deque[tuple[int, int, float]] = deque()  # (seq, url_id, offered_at)
        self.ids: set[int] = set()  # waiting or running here
        self.running = 0
        self.pushed = -1  # seq of the head last pushed on the ready heap


class HostQueues:
    """Bounded per-host backlogs with a per-host connection limit (see module docstring)."""

    __slots__ = (
        "_backlog", "_hosts", "_per_host", "_ready", "_seq",
        "dropped", "running", "startable", "wait", "waiting",
    )  # fmt: skip

    def __init__(self, per_host: int, backlog: int) -> None:
        if per_host < 1 or backlog < 1:
            raise ValueError(f"per_host and backlog must be >= 1, got {per_host}, {backlog}")
        self._per_host = per_host
        self._backlog = backlog
        self._hosts: dict[str, _Host] = {}
        self._ready: list[tuple[int, str]] = []  # (seq of the host's head, host); may be stale
        self._seq = 0
        self.startable = 0  # see the module docstring
        self.running = 0  # handed out by ``take`` and not yet ``done``
        self.waiting = 0  # in all backlogs
        self.dropped: dict[str, int] = {FULL: 0, BUSY: 0}
        self.wait = Histogram()

    def __len__(self) -> int:
        """Hosts with a probe waiting or running."""
        return len(self._hosts)

    def hosts(self) -> Iterator[tuple[str, int, int]]:
        """(host, running, waiting) of every host in flight."""
        for name, h in self._hosts.items():
            yield name, h.running, len(h.waiting)

    def offer(self, host: str, url_id: int, now: float) -> bool:
        """Queue a due probe at its host; False (and counted) if the backlog refuses it."""
        h = self._hosts.get(host)
        if h is None:
            h = self._hosts[host] = _Host()
        if url_id in h.ids:
            self.dropped[BUSY] += 1
            return False
        if len(h.waiting) >= self._backlog:
            self.dropped[FULL] += 1
            return False
        before = self._startable(h)
        h.waiting.append((self._seq, url_id, now))
        h.ids.add(url_id)
        self._seq += 1
        self.waiting += 1
        self.startable += self._startable(h) - before
        self._push(host, h)
        return True

    def take(self, now: float, limit: int) -> list[Start]:
        """Up to ``limit`` probes to start now, oldest offer first, each with a free host slot."""
        starts: list[Start] = []
        ready = self._ready
        while ready and len(starts) < limit:
            seq, host = heapq.heappop(ready)
            h = self._hosts.get(host)
            if h is None or not h.waiting or h.waiting[0][0] != seq:
                continue  # stale: that head was taken or the host forgotten
            h.pushed = -1
            if h.running >= self._per_host:
                continue  # pushed again by ``done`` when a slot frees
            _, url_id, offered_at = h.waiting.popleft()
            h.running += 1
            self.running += 1
            self.waiting -= 1
            self.startable -= 1
            waited = max(0.0, now - offered_at)
            self.wait.observe(waited)
            starts.append(Start(url_id, host, waited))
            self._push(host, h)
        return starts

    def done(self, host: str, url_id: int) -> bool:
        """A probe handed out by ``take`` ended; True if that made another probe startable."""
        h = self._hosts.get(host)
        if h is None or h.running < 1:
            raise KeyError(f"no probe running at {host!r}")
        before = self._startable(h)
        h.running -= 1
        self.running -= 1
        h.ids.discard(url_id)
        gained = self._startable(h) - before
        self.startable += gained
        if not h.running and not h.waiting:
            del self._hosts[host]
        else:
            self._push(host, h)
        return gained > 0

    def _startable(self, h: _Host) -> int:
        return min(len(h.waiting), self._per_host - h.running)

    def _push(self, host: str, h: _Host) -> None:
        """Put the host's head on the ready heap if it can start and is not there already."""
        if h.waiting and h.running < self._per_host and h.pushed != h.waiting[0][0]:
            h.pushed = h.waiting[0][0]
            heapq.heappush(self._ready, (h.pushed, host))
