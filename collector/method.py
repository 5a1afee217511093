"""The measurement vocabulary, in one place: classes, states, "online", "overdue", the policy.

The fold (fold.py), the store's figures, the report, the timeline and the metrics all take their
words and their defaults from here, so "overdue" means one thing everywhere. A verdict records
`METHOD_VERSION`: change it whenever a rule here or in fold.py/content.py changes what a verdict
would be, and `takedown-collector refold` recomputes the stored verdicts under the new method.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

METHOD_VERSION = "tm-2026.12-witness.2"
"""Names the rules that made a verdict: shown in the table, the JSON, the page and the timeline."""

HOUR = 3600.0
DAY = 86400.0
DEFAULT_DEADLINES: tuple[float, ...] = (HOUR, 12 * HOUR, DAY)
DEFAULT_ORDER_DEADLINE = 12 * HOUR
DEFAULT_REPORT_DEADLINE = DAY

REMOVED_ERRORS = frozenset({"connect_refused"})
NXDOMAIN_ERROR = "dns_nxdomain"


class ProbeClass(enum.StrEnum):
    """What one probe says about the content, on its own."""

    PRESENT = "present"
    REMOVED = "removed"
    INCONCLUSIVE = "inconclusive"
    NXDOMAIN = "dns_nxdomain"


class UrlState(enum.StrEnum):
    """What all vantage points together say about a URL (its current episode)."""

    PENDING = "pending"
    AVAILABLE = "available"
    GEOBLOCKED = "geoblocked"
    REMOVED = "removed"


ONLINE_STATES = frozenset({UrlState.AVAILABLE, UrlState.GEOBLOCKED})
"""Counted as online for latency and deadlines: seen present by a live witness."""


def is_online(state: str) -> bool:
    return state in ONLINE_STATES


def is_overdue(state: str, opened_at: float, now: float, deadline: float) -> bool:
    """Online after the current episode's opening (the notice, or the reappearance) + deadline."""
    return is_online(state) and now > opened_at + deadline


def is_order_overdue(
    state: str, order_issued_at: float | None, order_deadline: float | None, now: float,
    default_deadline: float = DEFAULT_ORDER_DEADLINE,
) -> bool:  # fmt: skip
    """Online after a binding order's due time (the order binds every episode of the content)."""
    if order_issued_at is None or not is_online(state):
        return False
    return now > order_issued_at + (order_deadline or default_deadline)


def overdue_sql(state: str, opened_at: str, now: str, deadline: str) -> str:
    """`is_overdue` as an SQL expression over the given column or parameter names."""
    online = ",".join(f"'{s.value}'" for s in sorted(ONLINE_STATES))
    return f"({state} IN ({online}) AND {opened_at} + {deadline} < {now})"


def order_overdue_sql(state: str, issued: str, deadline: str, default: str, now: str) -> str:
    """`is_order_overdue` as an SQL expression over the given column or parameter names."""
    online = ",".join(f"'{s.value}'" for s in sorted(ONLINE_STATES))
    return (
        f"({state} IN ({online}) AND {issued} IS NOT NULL"
        f" AND {issued} + COALESCE({deadline}, {default}) < {now})"
    )


@dataclass(frozen=True)
class Policy:
    """The configurable measurement policy; defaults and reasons are in docs/METHOD.md."""

    confirmations: int = 2
    removed_statuses: frozenset[int] = frozenset({404, 410, 451})
    forbidden_is_removal: bool = False
    nxdomain_is_removal: bool = True
    dynamic_after: int = 3
    max_clock_offset: float = 10.0
    min_vantage_points: int = 2
    liveness_intervals: float = 3.0
    """A vantage point is live while its newest result on a URL is younger than this many of
    the URL's probe intervals (planned, or as observed when stretched)."""
    jitter: float = 0.1
    """The agents' relative probe jitter, added to the liveness horizon."""

    def __post_init__(self) -> None:
        if self.confirmations < 1:
            raise ValueError(f"confirmations must be at least 1, got {self.confirmations}")
        if self.dynamic_after < 2:
            raise ValueError(f"dynamic_after must be at least 2, got {self.dynamic_after}")
        if self.min_vantage_points < 1:
            raise ValueError(
                f"min_vantage_points must be at least 1, got {self.min_vantage_points}"
            )
        if not (self.liveness_intervals > 1.0 and math.isfinite(self.liveness_intervals)):
            raise ValueError(
                "the liveness horizon must be longer than the planned interval:"
                f" liveness_intervals must be above 1, got {self.liveness_intervals}"
            )
        if not 0.0 <= self.jitter < 1.0:
            raise ValueError(f"jitter must be in [0, 1), got {self.jitter}")

    def horizon(self, interval: float) -> float:
        """How long a vantage point stays live after its newest result, at this interval."""
        return self.liveness_intervals * interval * (1.0 + self.jitter)
