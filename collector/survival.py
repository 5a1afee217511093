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
