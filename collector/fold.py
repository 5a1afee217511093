"""One URL's verdict as a pure left fold over its notices and probe observations, in event time.

Theory of operation
-------------------
Input is a URL's notices and its stored probe results, ordered by when the probes were made
(`started_at`: the moment the request went out), never by arrival. `UrlFold` accepts them in that
order only (`OutOfOrder` otherwise); the shell refolds a URL from its stored results when a late
one arrives (`refold`), so a verdict is always the same pure function of the same inputs:
    fold(notices, observations in event time, method) -> state, episodes, events.

Each probe is classified on its own (`classify`; content.py judges 2xx bodies). Per vantage point
(agent) a `Track` keeps its newest result time (liveness), its last conclusive class, and its run
of consecutive removed results since its last present. Inconclusive results neither extend nor
break a run, but they do keep the agent live.

*Witnesses confirm.* The agents that saw the content present in the current episode are its
witnesses. Removed = every live witness has `k` consecutive removed results after its last
present. An agent that never saw the content present in the episode (blocked, cloaked or late)
neither confirms nor dates a removal; its confirmed run of removed results does make the URL
*geoblocked* while a live witness sees the content. Content nobody saw present in the episode is
removed only when `min_vantage_points` networks (every network, if fewer are deployed) have each
seen it removed `k` times; that removal is flagged `observed_present=False`, its latency an upper
bound. On a dynamic page the first body never seen before of an agent that is no witness yet is
a *provisional* present: it counts as present (the agent a witness) but makes no block, and the
removal evidence from before it is kept until the agent's next conclusive load. If the body
repeats first (for any agent), it was a page served to that network (a block page): the agent
never saw the content, is no witness, and the evidence stands; anything else confirms the
present, and so does the agent falling silent (the removal then dates from its confirmation).

*Liveness.* An agent is live on a URL while its newest result is younger than
`Policy.horizon(interval)`, the interval being the URL's planned one or the agent's own observed
gap when the rate cap stretched it. A silent agent neither holds content online nor confirms a
removal; when every witness is silent the state holds (`live_until` tells readers it is stale).

*Dating.* The content went between the last present observation of the episode and the first
removed evidence from a witness after it (a stable replacement dates from its first sighting).
Latency runs from the episode's opening (the notice, or the reappearance) to that upper end.

*Episodes.* A present after a confirmed removal is a reappearance: a new episode, whose witnesses
start afresh. A new notice for removed content opens a new episode from that notice.

*Basis.* A verdict names the observations it rests on, as (agent id, seq) pairs (`Removal.basis`,
`Reappearance.basis`), so that evidence can point at the stored results. For that a `Track` keeps
the seq of its last present and of the first `k` removed results of its run (no more than k+1
seqs), the fold the observation of the episode's last present (and of the one before it, see
`_removed`) and the one its first removal evidence dates from (`removed_obs`: on a replaced
page, perhaps another network's first load of the replacement, which the content memory names),
all dropped once the episode's removal is confirmed; and, until the content is
recognised, which probe made each candidate sighting (`sighted`): agreement later makes those
sightings presents.

No I/O, no clock: time arrives with each input.
"""

from __future__ import annotations

import dataclasses
from bisect import insort
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any

from collector.content import ContentMemory, Judgement, Sighting, Verdict
from collector.method import (
    METHOD_VERSION,
    NXDOMAIN_ERROR,
    REMOVED_ERRORS,
    Policy,
    ProbeClass,
    UrlState,
)

Basis = tuple[tuple[int, int], ...]
"""Observations as sorted, distinct (agent id, seq) pairs: what identifies a stored result."""

Planned = Callable[[float, UrlState, float, float | None, float | None], float]
"""(now, state, opened_at, order_due, removed_at) -> the URL's planned probe interval."""


class OutOfOrder(ValueError):
    """An input older than one already folded: the caller must refold the URL."""


@dataclass(frozen=True)
class Method:
    """Everything besides the inputs that a verdict depends on."""

    policy: Policy
    planned: Planned
    version: str = METHOD_VERSION


@dataclass(frozen=True, slots=True)
class Notice:
    """A report of the URL: the hoster was notified at `at`."""

    at: float
    sha256: bytes | None = None  # the hotline's reference hash, if any
    order_due: float | None = None  # a binding order's due time, if any


@dataclass(frozen=True, slots=True)
class Observation:
    """The part of a stored probe result the fold needs."""

    agent_id: int
    network: str
    at: float
    status: int
    error: str
    sha256: bytes
    final_url: str = ""
    challenge: bool = False
    truncated: bool = False
    seq: int = 0
    provider: str = ""
    asn: int | None = None
    cdn: bool = False


@dataclass(frozen=True)
class Removal:
    """A confirmed removal of one episode; the content went between the two ends."""

    episode: int
    last_present_at: float | None
    first_removed_at: float
    confirmed_at: float
    latency: float
    nxdomain: bool = False
    observed_present: bool = True
    provider: str = ""
    basis: Basis = ()
    """The observations it rests on, as sorted (agent id, seq) pairs: for each live witness that
    confirmed it, its last present in the episode and the first k removed results after it;
    the episode's last present (the interval's lower end), whoever saw it; for content nobody
    saw present, the first k removed results of each network's agents that agreed. Only the
    event carries it: `UrlFold.removal` and `first_removal` keep the verdict without it."""


@dataclass(frozen=True)
class Reappearance:
    """Content seen present again after a confirmed removal; opens episode `episode`."""

    episode: int
    at: float
    provider: str = ""
    basis: Basis = ()
    """The present that showed it again (on a dynamic page, with the fresh body before it)."""


@dataclass(frozen=True)
class Renotified:
    """A new notice for removed content; opens episode `episode` from the notice."""

    episode: int
    at: float
    provider: str = ""


@dataclass(frozen=True)
class StateChange:
    old: UrlState
    new: UrlState
    at: float


@dataclass(frozen=True)
class ProviderChange:
    old: str
    new: str
    at: float


Event = Removal | Reappearance | Renotified | StateChange | ProviderChange


def classify(obs: Observation, policy: Policy) -> ProbeClass | None:
    """The class of a probe that needs no content memory; None for a 2xx body to be judged."""
    if obs.challenge:
        return ProbeClass.INCONCLUSIVE
    if obs.error and obs.error != "none":
        if obs.error == NXDOMAIN_ERROR:
            return ProbeClass.NXDOMAIN
        if obs.error in REMOVED_ERRORS:
            return ProbeClass.REMOVED
        return ProbeClass.INCONCLUSIVE
    if obs.status in policy.removed_statuses or (obs.status == 403 and policy.forbidden_is_removal):
        return ProbeClass.REMOVED
    if 200 <= obs.status < 300:
        return None if obs.sha256 else ProbeClass.INCONCLUSIVE
    return ProbeClass.INCONCLUSIVE


_FROM_CONTENT = {
    Verdict.PRESENT: ProbeClass.PRESENT,
    Verdict.REMOVED: ProbeClass.REMOVED,
    Verdict.UNDECIDED: ProbeClass.INCONCLUSIVE,
}


@dataclass(slots=True)
class Track:
    """One vantage point's view of one URL in the current episode."""

    network: str
    last_at: float
    gap: float = 0.0  # the smaller of the agent's last two intervals on this URL (a stretch)
    last_gap: float = 0.0  # its newest interval (one long one is an outage, not a stretch)
    witness: bool = False
    last_class: ProbeClass | None = None  # last conclusive
    last_present_at: float | None = None
    run: int = 0  # consecutive removed results since the last present (or the episode start)
    run_first_at: float | None = None
    run_nxdomain: bool = False
    fresh_at: float | None = None  # its one fresh body on a dynamic page so far (see _fresh)
    # What a removal may come to rest on, until the episode's is confirmed (see _confirm):
    present_seq: int | None = None  # seq of the observation at last_present_at
    run_seqs: tuple[int, ...] = ()  # seqs of the run's first k removed results
    fresh_seq: int | None = None  # seq of the observation at fresh_at

    @property
    def provisional(self) -> bool:
        """Its newest present is its one fresh body on a dynamic page, not yet resolved."""
        return self.fresh_at is not None and self.fresh_at == self.last_present_at

    def reset(self) -> None:
        self.witness = False
        self.last_class = None
        self.last_present_at = self.present_seq = None
        self.run, self.run_first_at, self.run_nxdomain, self.run_seqs = 0, None, False, ()
        self.fresh_at = self.fresh_seq = None


@dataclass(slots=True)
class UrlFold:
    """The evolving verdict of one URL; feed it notices and observations in event time."""

    method: Method
    notified_at: float
    order_due: float | None = None
    state: UrlState = UrlState.PENDING
    episode: int = 1
    opened_at: float = 0.0
    content: ContentMemory = field(default_factory=ContentMemory)
    tracks: dict[int, Track] = field(default_factory=dict)
    last_present_at: float | None = None  # in the current episode
    prev_present_at: float | None = None  # the present before it (see _removed)
    first_removed_at: float | None = None  # first witness removal evidence after it
    first_removed_any: float | None = None  # first removed result of any agent in the episode
    removal: Removal | None = None  # the current episode's (without its basis: see _confirm)
    first_removal: Removal | None = None
    reappearances: int = 0
    provider: str = ""
    asn: int | None = None
    cdn: bool = False
    provider_from_present: bool = False
    newest_key: tuple[float, int, int, int] = (float("-inf"), 0, 0, 0)  # of the newest input
    last_conclusive_at: float | None = None  # newest conclusive result of the current episode
    live_until: float | None = None  # after this, no vantage point that matters is live
    truncated_vs_reference: int = 0
    last_class: ProbeClass | None = None  # class of the newest observation folded
    last_present_obs: tuple[int, int] | None = None  # (agent, seq) at last_present_at, and
    prev_present_obs: tuple[int, int] | None = None  # at prev_present_at, until the removal
    removed_obs: tuple[int, int] | None = None  # at first_removed_at, until the removal
    removed_any_obs: tuple[int, int] | None = None  # at first_removed_any, until the removal
    sighted: dict[tuple[int, float], int] | None = None
    """(agent, at) -> seq of the 2xx loads judged before the content was recognised, while the
    content memory may still count their sightings as presents (see _sight); None when empty."""

    @classmethod
    def start(cls, notice: Notice, method: Method) -> UrlFold:
        fold = cls(method, notice.at, notice.order_due, opened_at=notice.at)
        if notice.sha256:
            fold.content = ContentMemory.with_reference(notice.sha256)
        return fold

    @property
    def policy(self) -> Policy:
        return self.method.policy

    @property
    def removed_at(self) -> float | None:
        return self.removal.confirmed_at if self.removal else None

    def stale(self, now: float) -> bool:
        """No vantage point that could change the state is live any more."""
        return self.live_until is not None and now > self.live_until

    def clone(self) -> UrlFold:
        """An independent copy (its mutable parts copied, its frozen values shared).

        Built positionally (see _fields_of): a `Tail` copies a fold every few observations.
        """
        copy = UrlFold(*_FOLD_FIELDS(self))
        copy.content = self.content.clone()
        copy.tracks = {a: Track(*_TRACK_FIELDS(t)) for a, t in self.tracks.items()}
        copy.sighted = dict(self.sighted) if self.sighted else None
        return copy

    @property
    def newest_at(self) -> float:
        return self.newest_key[0]

    def _check_order(self, key: tuple[float, int, int, int]) -> None:
        if key < self.newest_key:
            raise OutOfOrder(f"input at {key[0]} comes before one already folded")
        self.newest_key = key

    def notice(self, notice: Notice) -> list[Event]:
        """Fold in a further report of this URL."""
        self._check_order(event_order(notice))
        if notice.order_due is not None:
            self.order_due = (
                notice.order_due
                if self.order_due is None
                else min(self.order_due, notice.order_due)
            )
        if self.state is not UrlState.REMOVED:
            return []
        self._open_episode(notice.at)
        self.notified_at = notice.at
        old, self.state = self.state, UrlState.PENDING
        return [
            Renotified(self.episode, notice.at, self.provider),
            StateChange(old, UrlState.PENDING, notice.at),
        ]

    def observe(self, obs: Observation, networks: int) -> list[Event]:
        """Fold in one observation; `networks` is how many distinct networks had agents then."""
        self._check_order(event_order(obs))
        policy = self.policy
        track = self.tracks.get(obs.agent_id)
        if track is None:
            track = self.tracks[obs.agent_id] = Track(obs.network, obs.at)
        else:
            if obs.at > track.last_at:
                gap = obs.at - track.last_at
                track.gap = min(gap, track.last_gap) if track.last_gap else gap
                track.last_gap = gap
            track.last_at = obs.at
            track.network = obs.network
        cls, judged = self._classify(obs, networks)
        cls, provisional = self._fresh(track, obs, cls, judged)
        self.last_class = cls
        events: list[Event] = []
        if judged is not None and judged.established:
            self._established(judged.established)
        if self.sighted is not None and self.content.known:
            self.sighted = None  # recognised: no sighting is counted as present later
        nxdomain = cls is ProbeClass.NXDOMAIN
        if nxdomain:
            cls = ProbeClass.REMOVED if policy.nxdomain_is_removal else ProbeClass.INCONCLUSIVE
        if cls is not ProbeClass.INCONCLUSIVE:
            if cls is ProbeClass.PRESENT:
                events += self._present(track, obs, provisional)
            else:
                since = judged.since if judged is not None else obs.at
                by = judged.since_by if judged is not None else None
                if since >= obs.at:
                    since, by = obs.at, (obs.agent_id, obs.seq)
                self._removed(track, obs, since, by, nxdomain)
            track.last_class = cls
            self.last_conclusive_at = obs.at
        self._attribute(obs, ProbeClass.INCONCLUSIVE if provisional else cls, events)
        events += self._decide(obs.at, networks)
        self._update_liveness(obs.at)
        return events

    def _fresh(
        self, track: Track, obs: Observation, cls: ProbeClass, judged: Judgement | None
    ) -> tuple[ProbeClass, bool]:
        """One body never seen before on a dynamic page may be anyone's (a network's block page).

        Returns the class and whether it is *provisional*: the first fresh body of an agent that
        is no witness yet. It counts as present, but makes no block, and removal evidence from
        before it is kept until the agent's next conclusive load: if the body repeats first (a
        page served to its network), the agent never saw the content and is no witness, and the
        evidence stands; anything else confirms the present, and the evidence is stale.
        """
        at = obs.at
        fresh = judged is not None and judged.fresh
        if fresh and self.state is UrlState.REMOVED:
            # After a removal the content is back only on two fresh bodies in a row.
            if track.fresh_at is None:
                track.fresh_at, track.fresh_seq = at, obs.seq
                return ProbeClass.INCONCLUSIVE, False
            return cls, False
        if fresh and not track.witness:
            track.fresh_at, track.fresh_seq = at, obs.seq
            return cls, True
        if cls is not ProbeClass.INCONCLUSIVE:
            since = judged.since if judged is not None else at
            for t in self.tracks.values():
                if t.provisional and cls is ProbeClass.REMOVED and t.fresh_at == since < at:
                    # That body has repeated: the provisional present was a page served to
                    # its network (to this agent or another), never the content.
                    t.witness, t.last_present_at, t.fresh_at = False, None, None
                    t.present_seq = t.fresh_seq = None
            if track.provisional and track.fresh_at is not None:
                # Anything else: it was the content.
                self._presented(track.fresh_at, obs.agent_id, track.fresh_seq)
            track.fresh_at = track.fresh_seq = None
        return cls, False

    def _classify(self, obs: Observation, networks: int) -> tuple[ProbeClass, Judgement | None]:
        cls = classify(obs, self.policy)
        if cls is not None:
            return cls, None
        need = max(1, min(self.policy.min_vantage_points, networks))
        if not self.content.known:
            self._sight(obs)
        judged = self.content.judge(
            obs.sha256, obs.final_url, obs.truncated, Sighting(obs.agent_id, obs.network, obs.at),
            need, self.policy.dynamic_after, obs.seq,
        )  # fmt: skip
        if judged.truncated_vs_reference:
            self.truncated_vs_reference += 1
        return _FROM_CONTENT[judged.verdict], judged

    def _sight(self, obs: Observation) -> None:
        """Remember which probe a candidate sighting is (called before it is judged), while
        the content is not recognised.

        Bounded by what the content memory keeps: once SIGHTED_KEPT entries more than the
        sightings it holds, those it no longer holds are dropped (never this one: it is about
        to be judged), so the scan comes at most once per SIGHTED_KEPT results.
        """
        key = (obs.agent_id, obs.at)
        sighted = self.sighted
        if sighted is None:
            sighted = self.sighted = {}
        sighted[key] = obs.seq
        if len(sighted) > SIGHTED_KEPT:
            candidates = self.content.candidates.values()
            if len(sighted) > SIGHTED_KEPT + sum(len(seen) for seen in candidates):
                held = {(s.agent_id, s.at) for seen in candidates for s in seen}
                held.add(key)
                self.sighted = {k: seq for k, seq in sighted.items() if k in held}

    def _established(self, sightings: Iterable[Sighting]) -> None:
        """Earlier sightings of what is now known to be the content were presents."""
        for s in sightings:
            track = self.tracks.get(s.agent_id)
            if track is None:
                continue
            track.witness = True
            seq = self.sighted.get((s.agent_id, s.at)) if self.sighted else None
            present = max(s.at, track.last_present_at or s.at)
            if present != track.last_present_at:
                track.last_present_at, track.present_seq = present, seq
            if track.run_first_at is not None and track.run_first_at < s.at:
                track.run, track.run_first_at, track.run_nxdomain = 0, None, False
                track.run_seqs = ()
            if track.run == 0:
                track.last_class = ProbeClass.PRESENT
            if self.last_present_at is None or s.at > self.last_present_at:
                self.last_present_at = s.at
                self.last_present_obs = _seen(s.agent_id, seq)

    def _present(self, track: Track, obs: Observation, provisional: bool) -> list[Event]:
        events: list[Event] = []
        if self.state is UrlState.REMOVED:
            seen = (obs.agent_id, obs.seq)
            basis: Basis = (seen,)
            if track.fresh_at is not None and track.fresh_seq is not None:
                basis = tuple(sorted({(obs.agent_id, track.fresh_seq), seen}))
            self._open_episode(obs.at)
            self.reappearances += 1
            events.append(Reappearance(self.episode, obs.at, obs.provider or self.provider, basis))
        track.witness = True
        track.last_present_at, track.present_seq = obs.at, obs.seq
        track.run, track.run_first_at, track.run_nxdomain = 0, None, False
        track.run_seqs = ()
        if not provisional:  # else the episode's dates wait for this agent's next load
            self._presented(obs.at, obs.agent_id, obs.seq)
        return events

    def _presented(self, at: float, agent: int, seq: int | None) -> None:
        """The content was present at `at` (the agent's result `seq`): removal evidence from
        before it is stale."""
        if self.last_present_at is not None and at < self.last_present_at:
            return
        if self.last_present_at != at:
            self.prev_present_at = self.last_present_at
            self.prev_present_obs = self.last_present_obs
            self.last_present_obs = _seen(agent, seq)
        self.last_present_at = at
        if self.first_removed_at is not None and self.first_removed_at <= at:
            self.first_removed_at = self.removed_obs = None

    def _removed(
        self,
        track: Track,
        obs: Observation,
        since: float,
        by: tuple[int, int] | None,
        nxdomain: bool,
    ) -> None:
        """A removed result `obs`, whose evidence dates from `since`: the load `by` (agent,
        seq), this one or an earlier first sighting of the same replacement body."""
        at = obs.at
        track.run += 1
        if track.run <= self.method.policy.confirmations:
            track.run_seqs += (obs.seq,)
        if track.run_first_at is None:
            track.run_first_at = since
        track.run_nxdomain = nxdomain
        if self.first_removed_any is None:
            self.first_removed_any, self.removed_any_obs = since, by
        if not track.witness:
            return
        if self.content.dynamic and since < at and since == self.last_present_at:
            # The newest present was this replacement's first load on a dynamic page (a body
            # never seen before, so it looked like the content): the content was last seen
            # at the present before it, and went by the replacement's first sighting.
            self.last_present_at = self.prev_present_at
            self.last_present_obs = self.prev_present_obs
        if self.last_present_at is not None and since <= self.last_present_at:
            since, by = at, (obs.agent_id, obs.seq)
        if self.first_removed_at is None:
            self.first_removed_at, self.removed_obs = since, by

    def _open_episode(self, at: float) -> None:
        self.episode += 1
        self.opened_at = at
        self.removal = None
        self.last_present_at = self.last_present_obs = None
        self.prev_present_at = self.prev_present_obs = None
        self.first_removed_at = self.removed_obs = None
        self.first_removed_any = self.removed_any_obs = None
        self.last_conclusive_at = None
        for t in self.tracks.values():
            t.reset()

    def _attribute(self, obs: Observation, cls: ProbeClass, events: list[Event]) -> None:
        """Attribute the URL to whoever serves the content (or anyone, until someone has)."""
        if not obs.provider:
            return
        if cls is ProbeClass.PRESENT:
            if self.provider and obs.provider != self.provider:
                events.append(ProviderChange(self.provider, obs.provider, obs.at))
            self.provider_from_present = True
        elif self.provider_from_present:
            return
        self.provider, self.asn, self.cdn = obs.provider, obs.asn, obs.cdn

    def _planned(self, now: float) -> float:
        return self.method.planned(now, self.state, self.opened_at, self.order_due, self.removed_at)

    def _live(self, now: float) -> list[Track]:
        """The tracks live at `now`: newest result younger than the horizon of the planned
        interval, or of the track's own gap where that is longer (Policy.horizon, inlined:
        this runs for every observation)."""
        planned, policy = self._planned(now), self.policy
        li, jitter = policy.liveness_intervals, 1.0 + policy.jitter
        floor = li * planned * jitter
        live = []
        for t in self.tracks.values():
            gap = t.gap
            if now - t.last_at <= (floor if gap <= planned else li * gap * jitter):
                live.append(t)
        return live

    def _update_liveness(self, now: float) -> None:
        """live_until: when the last witness (or, with none, the last track) stops being live."""
        planned, policy = self._planned(now), self.policy
        li, jitter = policy.liveness_intervals, 1.0 + policy.jitter
        witnesses: float | None = None
        anyone: float | None = None
        for t in self.tracks.values():
            gap = t.gap
            until = t.last_at + li * (planned if planned >= gap else gap) * jitter
            if anyone is None or until > anyone:
                anyone = until
            if t.witness and (witnesses is None or until > witnesses):
                witnesses = until
        self.live_until = witnesses if witnesses is not None else anyone

    def _decide(self, now: float, networks: int) -> list[Event]:
        if self.state is UrlState.REMOVED and self.removal is not None:
            # Confirmed in this episode: only content seen again (a new episode) reopens it,
            # never a witness's present from before the removal.
            return []
        k = self.policy.confirmations
        live = self._live(now)
        witnesses: list[Track] = []
        confirmed_run: list[Track] = []
        seeing: list[Track] = []
        for t in live:
            last = t.last_class
            if t.witness:
                witnesses.append(t)
                if last is ProbeClass.PRESENT:
                    seeing.append(t)
            if last is ProbeClass.REMOVED and t.run >= k:
                confirmed_run.append(t)
        if seeing:
            # Blocked somewhere: a run of removed results that began before a live witness
            # last saw the content. A witness whose run is newer than every present is seeing
            # a removal in progress, not a block; nor is a provisional present evidence of one.
            latest = max((t.last_present_at or 0.0 for t in seeing if not t.provisional),
                         default=0.0)  # fmt: skip
            blocked = any(t.run_first_at is not None and t.run_first_at < latest
                          for t in confirmed_run)  # fmt: skip
            new = UrlState.GEOBLOCKED if blocked else UrlState.AVAILABLE
        elif self.state is UrlState.REMOVED:
            new = UrlState.REMOVED
        elif any(t.witness for t in self.tracks.values()):
            done = witnesses and all(t.run >= k for t in witnesses)
            new = UrlState.REMOVED if done else self.state
        else:
            # Nobody has seen the content yet: gone only if enough networks agree, and no
            # live network is being served a body not yet understood (it may be the content).
            need = max(1, min(self.policy.min_vantage_points, networks))
            undecided = {s.agent_id for seen in self.content.candidates.values() for s in seen}
            served = any(
                agent in undecided and t.last_class is not ProbeClass.REMOVED
                for agent, t in self.tracks.items()
                if t in live
            )
            done = len({t.network for t in confirmed_run}) >= need and not served
            new = UrlState.REMOVED if done else self.state
        if new is self.state:
            return []
        events: list[Event] = []
        if new is UrlState.REMOVED:
            events.append(self._confirm(now, witnesses or confirmed_run))
        events.append(StateChange(self.state, new, now))
        self.state = new
        return events

    def _confirm(self, now: float, confirming: list[Track]) -> Removal:
        observed = any(t.witness for t in confirming)
        unresolved = [
            (t.fresh_at, agent, t.fresh_seq)
            for agent, t in self.tracks.items()
            if t.provisional and t.fresh_at is not None
        ]
        for t in self.tracks.values():
            t.fresh_at = t.fresh_seq = None
        if unresolved and max(unresolved)[0] > (self.last_present_at or float("-inf")):
            # A provisional present left unresolved by an agent gone silent stands; without
            # removal evidence kept from after it, the removal dates from its confirmation.
            at, agent, seq = max(unresolved)
            self._presented(at, agent, seq)
            if self.first_removed_at is None:
                self.first_removed_at, self.removed_obs = now, None
        first = self.first_removed_at if observed else self.first_removed_any
        dated_by = self.removed_obs if observed else self.removed_any_obs
        if first is None:
            first = min((t.run_first_at for t in confirming if t.run_first_at), default=now)
            dated_by = None
        basis = self._basis(confirming, dated_by)
        # Confirmed: nothing in this episode rests on anything any more (only a new episode,
        # which starts afresh, decides again), so the seqs kept to name a basis go.
        for t in self.tracks.values():
            t.present_seq, t.run_seqs = None, ()
        self.last_present_obs = self.prev_present_obs = None
        self.removed_obs = self.removed_any_obs = None
        removal = Removal(
            episode=self.episode,
            last_present_at=self.last_present_at,
            first_removed_at=first,
            confirmed_at=now,
            latency=max(0.0, first - self.opened_at),
            nxdomain=any(t.run_nxdomain for t in confirming),
            observed_present=observed,
            provider=self.provider,
            basis=basis,
        )
        # The event carries the basis; the fold keeps the verdict without it (per URL in
        # memory, for as long as the URL is watched: up to 3 pairs per witness otherwise).
        self.removal = dataclasses.replace(removal, basis=())
        if self.first_removal is None:
            self.first_removal = self.removal
        return removal

    def _basis(self, confirming: list[Track], dated_by: tuple[int, int] | None) -> Basis:
        """What a removal confirmed by `confirming` rests on (see Removal.basis); `dated_by`
        is the load its interval's upper end dates from."""
        chosen = {id(t) for t in confirming}
        basis: set[tuple[int, int]] = set()
        for agent, t in self.tracks.items():
            if id(t) not in chosen:
                continue
            if t.witness and t.present_seq is not None:
                basis.add((agent, t.present_seq))
            basis.update((agent, seq) for seq in t.run_seqs)
        if self.last_present_at is not None and self.last_present_obs is not None:
            basis.add(self.last_present_obs)
        if dated_by is not None:
            basis.add(dated_by)
        return tuple(sorted(basis))


def _seen(agent: int, seq: int | None) -> tuple[int, int] | None:
    return None if seq is None else (agent, seq)


def _fields_of(cls: type[Any]) -> Callable[[Any], tuple[Any, ...]]:
    """A getter of a dataclass's fields in the order its __init__ takes them, to copy one
    positionally: `dataclasses.replace` checks and names every field, about five times slower
    (a fold with ten agents: 64 µs to clone that way, more than folding two observations)."""
    fields = dataclasses.fields(cls)
    if not all(f.init for f in fields):
        raise TypeError(f"{cls.__name__} has a field its __init__ does not take")
    return attrgetter(*(f.name for f in fields))


_TRACK_FIELDS = _fields_of(Track)
_FOLD_FIELDS = _fields_of(UrlFold)


SIGHTED_KEPT = 32
"""Entries `UrlFold.sighted` may hold beyond the sightings the content memory has (see _sight)."""

Input = Notice | Observation


def event_order(item: Input) -> tuple[float, int, int, int]:
    """Event time; at one instant notices first, then by agent and sequence number."""
    if isinstance(item, Notice):
        return (item.at, 0, 0, 0)
    return (item.at, 1, item.agent_id, item.seq)


def refold(
    notices: Iterable[Notice],
    observations: Iterable[Observation],
    method: Method,
    networks_at: Callable[[float], int],
) -> tuple[UrlFold, list[Event]]:
    """Fold a URL from scratch: its notices and observations in event time, and every event."""
    ordered = sorted(notices, key=lambda n: n.at)
    if not ordered:
        raise ValueError("a URL needs at least one notice")
    fold = UrlFold.start(ordered[0], method)
    events: list[Event] = []
    inputs: list[Input] = [*ordered[1:], *observations]
    for item in sorted(inputs, key=event_order):
        if isinstance(item, Notice):
            events += fold.notice(item)
        else:
            events += fold.observe(item, networks_at(item.at))
    return fold, events


TAIL_LENGTH = 8
"""Observations a `Tail` keeps to refold from, without reading stored results."""

TAIL_CUT = TAIL_LENGTH // 2 + 1
"""Observations `Tail.mid` is taken after; a trim keeps TAIL_CUT - 1. With one result per batch
the trim comes at TAIL_LENGTH + 1 = 2 * TAIL_CUT - 1 observations, so exactly the TAIL_CUT
behind `mid` go and none is folded again."""


@dataclass(slots=True)
class Tail:
    """A URL's fold with its most recent observations, so a slightly late one costs no reread.

    Results from several agents interleave: one agent's batch often holds a probe a little older
    than another agent's already folded. `base` is the fold before the kept observations,
    `head` the fold after them; an observation between the two is inserted in event order and
    the tail is folded again from `base`. Only one older than `base` needs the stored results
    (`OutOfOrder`). `events` are what folding the kept observations onto `base` gave, in order:
    the events since `base`, which is what the caller rewrites.

    Each observation is folded once on the way in: as the tail reaches TAIL_CUT observations it
    copies `head` (`mid`, the fold after exactly those), and a trim makes that copy the new
    `base` rather than folding them into `base` a second time. An observation inserted after
    them is folded again from `mid`, not from `base`. The copy is a third fold in memory (about
    2.4 KB with ten agents) from then until the trim: 4 results of every 5 for a URL that gets
    one per batch.
    """

    base: UrlFold
    head: UrlFold
    observations: list[Observation] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    mid: UrlFold | None = None  # the fold after observations[:TAIL_CUT], while there are as many
    mid_events: int = 0  # how many of `events` those gave

    @classmethod
    def of(cls, fold: UrlFold) -> Tail:
        return cls(fold.clone(), fold)

    def add(self, obs: Observation, networks: int) -> tuple[list[Event], bool]:
        """Fold `obs` in; return the new events and whether earlier ones since `base` changed.

        When the second value is true, `self.events` replaces every event since `base`.
        """
        key = event_order(obs)
        if key >= self.head.newest_key:
            events = self.head.observe(obs, networks)
            self.observations.append(obs)
            self.events += events
            if len(self.observations) == TAIL_CUT:
                self._snapshot()
            return events, False
        if key < self.base.newest_key:
            raise OutOfOrder(f"input at {obs.at} comes before the kept tail")
        insort(self.observations, obs, key=event_order)
        if self.mid is not None and key >= self.mid.newest_key:
            # After the first TAIL_CUT observations: they, `mid` and their events stand.
            done, self.head = TAIL_CUT, self.mid.clone()
            self.events = self.events[: self.mid_events]
        else:
            done, self.head, self.events, self.mid = 0, self.base.clone(), [], None
        for i in range(done, len(self.observations)):
            self.events += self.head.observe(self.observations[i], networks)
            if i + 1 == TAIL_CUT:
                self._snapshot()
        return self.events, True

    def _snapshot(self) -> None:
        self.mid, self.mid_events = self.head.clone(), len(self.events)

    def trim(self, networks: int) -> None:
        """Once the caller wrote the events: past TAIL_LENGTH, move `base` on so that the newest
        TAIL_CUT - 1 observations are kept, and the events they gave (counted, not chosen by
        time: one kept at the new base's very instant keeps its events, as a refold from `base`
        would give them again).

        `base` becomes `mid`; only the observations between it and those kept (when the last
        batch brought more than one for the URL) are folded into it again. Without `mid` (a
        `Tail` made holding observations already) all of those before the kept ones are.
        """
        if len(self.observations) <= TAIL_LENGTH:
            return
        cut = len(self.observations) - (TAIL_CUT - 1)
        if self.mid is not None:
            self.base, done, dropped = self.mid, TAIL_CUT, self.mid_events
        else:
            done = dropped = 0
        for o in self.observations[done:cut]:
            dropped += len(self.base.observe(o, networks))
        del self.observations[:cut]
        self.events = self.events[dropped:]
        self.mid, self.mid_events = None, 0
