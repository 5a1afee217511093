"""How often each URL is probed: dense after the notice and around deadlines, slow while watching.

Pure: the collector's planner calls `Planner.interval` for every active URL
with the current time, pushes changed intervals to the agents, and stops
probing a removed URL once its watch period is over. `within_budget` keeps
the total probe load of one agent under `max_rate` probes per second however
many URLs there are, by stretching every interval by the same factor.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from collector.durations import duration_label, parse_duration
from collector.method import UrlState

HOUR = 3600.0
DAY = 86400.0


@dataclass(frozen=True)
class Phase:
    """Probe every `interval` seconds while the notice is younger than `until` seconds."""

    interval: float
    until: float = math.inf

    def __str__(self) -> str:
        if math.isinf(self.until):
            return duration_label(self.interval)
        return f"{duration_label(self.interval)}<{duration_label(self.until)}"


DEFAULT_PHASES = (Phase(300, 2 * HOUR), Phase(900, 48 * HOUR), Phase(HOUR))


def parse_phases(text: str) -> tuple[Phase, ...]:
    """'5m<2h,15m<48h,1h' → phases; the last has no bound. ValueError naming the problem."""
    phases: list[Phase] = []
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise ValueError("a schedule needs at least one interval, e.g. '5m<2h,15m<48h,1h'")
    for i, part in enumerate(parts):
        interval, sep, until = part.partition("<")
        last = i == len(parts) - 1
        if last == bool(sep):
            raise ValueError(
                f"{part!r}: every phase but the last needs '<AGE' and the last must not have one"
            )
        bound = parse_duration(until) if sep else math.inf
        if phases and bound <= phases[-1].until:
            raise ValueError(f"{part!r}: phase bounds must increase")
        phases.append(Phase(parse_duration(interval), bound))
    return tuple(phases)


@dataclass(frozen=True)
class Planner:
    """The probe schedule policy; every decision takes `now` as an argument."""

    phases: tuple[Phase, ...] = DEFAULT_PHASES
    deadlines: tuple[float, ...] = (HOUR, 12 * HOUR, DAY)
    order_deadline: float = 12 * HOUR
    deadline_window: float = 1800.0
    deadline_interval: float = 300.0
    watch_interval: float = 6 * HOUR
    watch_period: float = 30 * DAY
    max_rate: float | None = None
    min_interval: float = 1.0

    @classmethod
    def fixed(cls, interval: float, watch_period: float = 30 * DAY) -> Planner:
        """One interval for everything, watching included (demo, tests, small deployments)."""
        return cls(
            phases=(Phase(interval),),
            deadline_window=0.0,
            deadline_interval=interval,
            watch_interval=interval,
            watch_period=watch_period,
            min_interval=min(interval, 1.0),  # a sub-second interval asked for is kept
        )

    def order_due(self, issued_at: float | None, deadline: float | None) -> float | None:
        """When a binding order falls due, if there is one."""
        if issued_at is None:
            return None
        return issued_at + (deadline if deadline else self.order_deadline)

    def interval(
        self,
        now: float,
        state: UrlState,
        notified_at: float,
        order_due: float | None = None,
        removed_at: float | None = None,
    ) -> float | None:
        """Seconds between probes of one URL now; None when it should no longer be probed."""
        if state is UrlState.REMOVED and removed_at is not None:
            if now - removed_at > self.watch_period:
                return None
            return max(self.min_interval, self.watch_interval)
        age = max(0.0, now - notified_at)
        base = next(p.interval for p in self.phases if age < p.until)
        due = [notified_at + d for d in self.deadlines]
        if order_due is not None:
            due.append(order_due)
        if any(abs(now - d) <= self.deadline_window for d in due):
            base = min(base, self.deadline_interval)
        return max(self.min_interval, base)

    def within_budget(self, wanted: dict[int, float]) -> dict[int, float]:
        """Stretch all intervals by one factor so the total rate stays under max_rate."""
        if self.max_rate is None or not wanted:
            return {k: _whole(v, round) for k, v in wanted.items()}
        rate = sum(1 / v for v in wanted.values())
        factor = max(1.0, rate / self.max_rate)
        return {k: _whole(v * factor, math.ceil) for k, v in wanted.items()}


def _whole(seconds: float, to_int: Callable[[float], int]) -> float:
    """Whole seconds from 1 s up (fewer distinct intervals); below that, as given."""
    return float(to_int(seconds)) if seconds >= 1 else seconds
