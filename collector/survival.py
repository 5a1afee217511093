"""Kaplan-Meier estimate of the time from notice to removal.

At each time t where removals happen, the estimator multiplies the survival S (the share still
online) by 1 - d/n, where d URLs were removed at t and n were still being watched just before t;
a URL still online (censored) counts in n up to its last observation and then leaves without a
drop. Censoring matters because the slowest cases are exactly the ones not yet finished: averaging
only removed URLs would make a provider that never removes anything look fast, whereas here its
curve stays at 1 and its median is None.

Ties follow the usual convention (lifelines, R survival): removals at t are counted before
censorings at t, so a URL censored at t is still at risk at t.
"""

from __future__ import annotations

import itertools
import math
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass

QUANTILE_TOLERANCE = 1e-9
"""Slack for float rounding in the running product, so that e.g. 2 of 4 removed is exactly half."""


@dataclass(frozen=True)
class SurvivalCurve:
    """Right-continuous step function S(t): `survival[i]` holds on [times[i], times[i + 1]).

    `times` are the distinct removal times in increasing order; S is 1.0 before the first one.
    `n` counts observations and `events` counts removals.
    """

    times: tuple[float, ...]
    survival: tuple[float, ...]
    n: int
    events: int

    def __post_init__(self) -> None:
        if len(self.times) != len(self.survival):
            raise ValueError("times and survival must have the same length")

    def survival_at(self, t: float) -> float:
        """S(t): the estimated share of URLs still online at t seconds after the notice."""
        index = bisect_right(self.times, t)
        return 1.0 if index == 0 else self.survival[index - 1]

    def removed_share_by(self, t: float) -> float:
        """1 - S(t): the estimated share removed within t seconds, e.g. within a 24h deadline."""
        return 1.0 - self.survival_at(t)

    def quantile(self, q: float) -> float | None:
        """The smallest t with 1 - S(t) >= q, or None if the estimate never reaches q."""
        if not 0.0 < q <= 1.0:
            raise ValueError(f"quantile q must be in (0, 1], got {q!r}")
        for t, s in zip(self.times, self.survival, strict=True):
            if 1.0 - s >= q - QUANTILE_TOLERANCE:
                return t
        return None

    def median(self) -> float | None:
        """The time by which half is estimated to be removed, or None if never reached."""
        return self.quantile(0.5)


def kaplan_meier(durations: Sequence[float], removed: Sequence[bool]) -> SurvivalCurve:
    """Estimate S(t) from durations in seconds; removed[i] False means still online at durations[i].

    Raises ValueError for sequences of different lengths or a negative, NaN or infinite duration.
    """
    if len(durations) != len(removed):
        raise ValueError(
            f"durations and removed differ in length ({len(durations)} != {len(removed)})"
        )
    for index, duration in enumerate(durations):
        if not math.isfinite(duration) or duration < 0:
            raise ValueError(f"duration at index {index} is {duration!r}; need a finite value >= 0")
    observations = sorted(
        zip((float(d) for d in durations), (bool(r) for r in removed), strict=True)
    )
    times: list[float] = []
    survival: list[float] = []
    at_risk = len(observations)
    surviving = 1.0
    index = 0
    while index < len(observations):
        t = observations[index][0]
        removals = leaving = 0
        while index < len(observations) and observations[index][0] == t:
            removals += observations[index][1]
            leaving += 1
            index += 1
        if removals:
            surviving *= (at_risk - removals) / at_risk
            times.append(t)
            survival.append(surviving)
        at_risk -= leaving
    return SurvivalCurve(
        times=tuple(times),
        survival=tuple(survival),
        n=len(observations),
        events=sum(1 for _, was_removed in observations if was_removed),
    )


@dataclass(frozen=True)
class Turnbull:
    """Interval-censored NPMLE of the removal time (Turnbull's self-consistency estimate).

    Each URL contributes an interval (lower, upper] in which its content went, seconds after the
    notice: (last present, first removed] for a removal, (0, first removed] for content nobody
    saw present, (last conclusive, inf) for content still online. `support[j]` is a Turnbull
    interval (l, r] carrying probability `mass[j]`; with exact or only right-censored data this
    is the Kaplan–Meier estimate. Probe cadence then moves no mass: a removal between two probes
    15 minutes apart is spread over that gap, not put at its upper end.
    """

    support: tuple[tuple[float, float], ...]
    mass: tuple[float, ...]
    n: int

    def removed_share_by(self, t: float) -> float:
        """Mass of the intervals that end by t, plus the share of the one straddling t."""
        share = 0.0
        for (lo, hi), p in zip(self.support, self.mass, strict=True):
            if hi <= t:
                share += p
            elif lo < t and math.isfinite(hi):
                share += p * (t - lo) / (hi - lo)
        return min(1.0, share)

    def quantile(self, q: float) -> float | None:
        """The smallest t with removed_share_by(t) >= q (linear within a Turnbull interval)."""
        done = 0.0
        for (lo, hi), p in zip(self.support, self.mass, strict=True):
            if not math.isfinite(hi):
                return None
            if done + p >= q - QUANTILE_TOLERANCE:
                return lo + (hi - lo) * max(0.0, min(1.0, (q - done) / p)) if p else hi
            done += p
        return None

    def median(self) -> float | None:
        return self.quantile(0.5)

    def allot(self, lower: float, upper: float, bounds: Sequence[float]) -> list[float]:
        """How one URL's removal in (lower, upper] splits over bands ending at `bounds`.

        The URL's weight goes to the Turnbull intervals inside its own, in proportion to their
        mass (uniform within each), so the shares sum to 1.
        """
        weights = [0.0] * len(bounds)
        inside = [
            (lo, hi, p)
            for (lo, hi), p in zip(self.support, self.mass, strict=True)
            if lo >= lower and hi <= upper and p > 0
        ]
        if not inside:
            inside = [(lower, upper, 1.0)]
        total = sum(p for _, _, p in inside)
        for lo, hi, p in inside:
            share = p / total
            if hi <= lo:
                weights[_band(hi, bounds)] += share
                continue
            start = lo
            for b, bound in enumerate(bounds):
                if start >= hi:
                    break
                if bound <= start:
                    continue
                end = min(hi, bound)
                weights[b] += share * (end - start) / (hi - lo)
                start = end
        return weights


def _band(t: float, bounds: Sequence[float]) -> int:
    return next((i for i, b in enumerate(bounds) if t <= b), len(bounds) - 1)


def turnbull(
    intervals: Sequence[tuple[float, float]], max_iterations: int = 2000, tolerance: float = 1e-10
) -> Turnbull:
    """The NPMLE from (lower, upper] intervals; upper = inf for a right-censored observation.

    An exact time is an interval with lower == upper. Raises ValueError for lower > upper or a
    negative or NaN bound.
    """
    for index, (lo, hi) in enumerate(intervals):
        if not (lo >= 0 and hi >= lo) or math.isnan(lo) or math.isnan(hi):
            raise ValueError(f"interval at index {index} is ({lo!r}, {hi!r}]; need 0 <= lo <= hi")
    if not intervals:
        return Turnbull((), (), 0)
    lefts = sorted({lo for lo, _ in intervals})
    rights = sorted({hi for _, hi in intervals})
    # Turnbull intervals: a left end followed by a right end with no other end between them.
    # At a tie a right end sorts first: (l, x] holds x, (x, r] does not.
    right, left = 0, 1
    ends = sorted([(lo, left) for lo in lefts] + [(hi, right) for hi in rights])
    support: list[tuple[float, float]] = []
    for (a, kind_a), (b, kind_b) in itertools.pairwise(ends):
        if kind_a == left and kind_b == right:
            support.append((a, b))
    for hi in rights:  # exact observations are their own support points
        if any(lo == hi for lo, h in intervals if h == hi) and (hi, hi) not in support:
            support.append((hi, hi))
    support.sort()

    def contains(lo: float, hi: float, s: tuple[float, float]) -> bool:
        if lo == hi:
            return s == (lo, lo)
        return s[0] >= lo and s[1] <= hi and s != (lo, lo)

    member = [[j for j, s in enumerate(support) if contains(lo, hi, s)] for lo, hi in intervals]
    mass = [1.0 / len(support)] * len(support)
    n = len(intervals)
    for _ in range(max_iterations):
        new = [0.0] * len(support)
        for js in member:
            total = sum(mass[j] for j in js)
            if total <= 0:
                continue
            for j in js:
                new[j] += mass[j] / total / n
        change = max(abs(a - b) for a, b in zip(new, mass, strict=True))
        mass = new
        if change < tolerance:
            break
    return Turnbull(tuple(support), tuple(mass), n)
