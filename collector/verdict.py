"""The measurement rules: from probe observations to a per-URL verdict.

Theory of operation
-------------------
Every probe is first *classified* (`classify`): present, removed,
inconclusive or dns_nxdomain. A 2xx body is judged against the URL's content
memory (content.py: baseline hash, replaced and dynamic pages). Inconclusive
results (timeouts, 5xx, 429, bot challenges, TLS and network errors, refused
by the agent's address policy, a changed body not yet understood) carry no
evidence and are ignored: they neither extend nor break a run of removed
results.

Per URL, a `UrlVerdict` keeps one `AgentTrack` per vantage point: its last
conclusive class, the length of its current run of removed results and when
that run began. The URL's state is then decided across vantage points:

* any agent that reached the host recently last saw the content present →
  the URL is *available*; if at the same time another agent has a confirmed
  run of removed results, it is *geoblocked* (blocked or cloaked for some
  networks, not removed);
* every agent that reached the host recently has at least `k` consecutive
  removed results → *removed*;
* anything in between keeps the previous state (a removal not yet confirmed).

"Reached the host recently" means a conclusive result within
`Policy.reach_window` of the newest observation, so an agent that stops
probing a URL cannot block its removal for ever.

Removal time is interval-censored: the content went between the last time any
agent saw it present and the first removed observation after that. Both ends
are kept; latency is measured to the first removed observation (the upper
end), from the notice.

A present observation after a confirmed removal is a reappearance: it opens a
new episode, whose latency runs from the reappearance. The first episode's
removal is the one the per-provider latency statistics use.

Nothing here does I/O or reads a clock: time arrives with each observation.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field

from collector.content import ContentMemory, Verdict

REMOVED_ERRORS = frozenset({"connect_refused"})
NXDOMAIN_ERROR = "dns_nxdomain"


class ProbeClass(enum.StrEnum):
    """What one probe says about the content, on its own."""

    PRESENT = "present"
    REMOVED = "removed"
    INCONCLUSIVE = "inconclusive"
    NXDOMAIN = "dns_nxdomain"


class UrlState(enum.StrEnum):
    """What all vantage points together say about a URL."""

    PENDING = "pending"
    AVAILABLE = "available"
    GEOBLOCKED = "geoblocked"
    REMOVED = "removed"


ONLINE_STATES = frozenset({UrlState.AVAILABLE, UrlState.GEOBLOCKED})


@dataclass(frozen=True)
class Policy:
    """The configurable measurement policy; defaults are documented in docs/METHOD.md."""

    confirmations: int = 2
    removed_statuses: frozenset[int] = frozenset({404, 410, 451})
    forbidden_is_removal: bool = False
    nxdomain_is_removal: bool = True
    reach_window: float = 6 * 3600.0
    dynamic_after: int = 3
    max_clock_offset: float = 10.0

    def __post_init__(self) -> None:
        if self.confirmations < 1:
            raise ValueError(f"confirmations must be at least 1, got {self.confirmations}")
        if self.dynamic_after < 2:
            raise ValueError(f"dynamic_after must be at least 2, got {self.dynamic_after}")
        if self.reach_window <= 0:
            raise ValueError(f"reach_window must be positive, got {self.reach_window}")


@dataclass(frozen=True, slots=True)
class Observation:
    """The part of a stored probe result the verdict needs."""

    agent_id: int
    at: float
    status: int
    error: str
    sha256: bytes
    final_url: str = ""
    challenge: bool = False


_CONTENT_CLASS = {
    Verdict.PRESENT: ProbeClass.PRESENT,
    Verdict.REMOVED: ProbeClass.REMOVED,
    Verdict.UNDECIDED: ProbeClass.INCONCLUSIVE,
}


def classify(
    obs: Observation, memory: ContentMemory | None, policy: Policy
) -> tuple[ProbeClass, float]:
    """Classify one probe; return its class and the time its evidence dates from.

    A 2xx body is judged by (and recorded in) `memory`; without one, any 2xx
    body counts as present.
    """
    if obs.challenge:
        return ProbeClass.INCONCLUSIVE, obs.at
    if obs.error and obs.error != "none":
        if obs.error == NXDOMAIN_ERROR:
            return ProbeClass.NXDOMAIN, obs.at
        if obs.error in REMOVED_ERRORS:
            return ProbeClass.REMOVED, obs.at
        return ProbeClass.INCONCLUSIVE, obs.at
    if obs.status in policy.removed_statuses or (obs.status == 403 and policy.forbidden_is_removal):
        return ProbeClass.REMOVED, obs.at
    if 200 <= obs.status < 300:
        if not obs.sha256:
            return ProbeClass.INCONCLUSIVE, obs.at
        if memory is None:
            return ProbeClass.PRESENT, obs.at
        verdict, since = memory.judge(obs.sha256, obs.final_url, obs.at, policy.dynamic_after)
        return _CONTENT_CLASS[verdict], since
    return ProbeClass.INCONCLUSIVE, obs.at


@dataclass(slots=True)
class AgentTrack:
    """One vantage point's view of one URL."""

    last_class: ProbeClass | None = None
    last_conclusive_at: float | None = None
    removed_run: int = 0
    run_started_at: float | None = None
    last_present_at: float | None = None
    removed_by_nxdomain: bool = False


@dataclass(frozen=True)
class Removal:
    """A confirmed removal of one episode.

    The content went between last_present_at and first_removed_at (interval-censored).
    """

    episode: int
    last_present_at: float | None
    first_removed_at: float
    confirmed_at: float
    latency: float
    nxdomain: bool = False


@dataclass(frozen=True)
class Reappearance:
    """Content seen present again after a confirmed removal; opens episode `episode`."""

    episode: int
    at: float


@dataclass(frozen=True)
class StateChange:
    old: UrlState
    new: UrlState
    at: float


Event = Removal | Reappearance | StateChange


@dataclass(slots=True)
class UrlVerdict:
    """The evolving verdict for one URL; feed it observations in arrival order."""

    notified_at: float
    state: UrlState = UrlState.PENDING
    episode_opened_at: float | None = None
    content: ContentMemory = field(default_factory=ContentMemory)
    last_class: ProbeClass | None = None
    episode: int = 1
    last_present_at: float | None = None
    first_removed_at: float | None = None
    removal: Removal | None = None
    first_removal: Removal | None = None
    reappearances: int = 0
    agents: dict[int, AgentTrack] = field(default_factory=dict)
    _nxdomain: bool = field(default=False, repr=False)

    @property
    def opened_at(self) -> float:
        """When the current episode's clock started: the notice, or the reappearance."""
        return self.notified_at if self.episode_opened_at is None else self.episode_opened_at

    @property
    def baseline(self) -> bytes | None:
        return self.content.baseline

    def observe(self, obs: Observation, policy: Policy) -> list[Event]:
        """Fold one observation in; return what changed. `last_class` is its class."""
        cls, since = classify(obs, self.content, policy)
        self.last_class = cls
        nxdomain = cls is ProbeClass.NXDOMAIN
        if nxdomain:
            cls = ProbeClass.REMOVED if policy.nxdomain_is_removal else ProbeClass.INCONCLUSIVE
        if cls is ProbeClass.INCONCLUSIVE:
            return []
        track = self.agents.setdefault(obs.agent_id, AgentTrack())
        track.last_class = cls
        track.last_conclusive_at = max(obs.at, track.last_conclusive_at or obs.at)
        if cls is ProbeClass.PRESENT:
            self._saw_present(track, obs.at)
        else:
            track.removed_by_nxdomain = nxdomain
            self._saw_removed(track, obs.at, min(since, obs.at))
        return self._decide(obs.at, policy)

    def _saw_present(self, track: AgentTrack, at: float) -> None:
        track.removed_run = 0
        track.run_started_at = None
        track.last_present_at = max(at, track.last_present_at or at)
        if self.last_present_at is None or at > self.last_present_at:
            self.last_present_at = at
        if self.first_removed_at is not None and self.first_removed_at <= at:
            self.first_removed_at = None

    def _saw_removed(self, track: AgentTrack, at: float, since: float) -> None:
        """A removed observation at `at` whose evidence dates from `since` (<= at)."""
        track.removed_run += 1
        if track.run_started_at is None:
            track.run_started_at = at
        if self.last_present_at is not None and track.run_started_at <= self.last_present_at:
            # This agent has seen it removed since before another last saw it present (it is
            # blocked for this network): its removed results say nothing about when it went.
            return
        if self.last_present_at is None or since > self.last_present_at:
            at = since
        after_present = self.last_present_at is None or at > self.last_present_at
        if after_present and (self.first_removed_at is None or at < self.first_removed_at):
            self.first_removed_at = at

    def _reaching(self, now: float, policy: Policy) -> Iterable[AgentTrack]:
        horizon = now - policy.reach_window
        return [
            t
            for t in self.agents.values()
            if t.last_conclusive_at is not None and t.last_conclusive_at >= horizon
        ]

    def _decide(self, now: float, policy: Policy) -> list[Event]:
        reaching = list(self._reaching(now, policy))
        self._nxdomain = any(t.removed_by_nxdomain for t in reaching)
        present = any(t.last_class is ProbeClass.PRESENT for t in reaching)
        confirmed = [t.removed_run >= policy.confirmations for t in reaching]
        if present:
            new = UrlState.GEOBLOCKED if any(confirmed) else UrlState.AVAILABLE
        elif reaching and all(confirmed):
            new = UrlState.REMOVED
        else:
            new = self.state
        events: list[Event] = []
        if new is self.state:
            return events
        if self.state is UrlState.REMOVED:
            self.episode += 1
            self.reappearances += 1
            self.removal = None
            self.episode_opened_at = now
            events.append(Reappearance(self.episode, now))
        if new is UrlState.REMOVED:
            events.append(self._confirm(now))
        events.append(StateChange(self.state, new, now))
        self.state = new
        return events

    def _confirm(self, now: float) -> Removal:
        first_removed = self.first_removed_at if self.first_removed_at is not None else now
        removal = Removal(
            episode=self.episode,
            last_present_at=self.last_present_at,
            first_removed_at=first_removed,
            confirmed_at=now,
            latency=max(0.0, first_removed - self.opened_at),
            nxdomain=self._nxdomain,
        )
        self.removal = removal
        if self.first_removal is None:
            self.first_removal = removal
        return removal
