"""What a 2xx body says: the reported content, a replacement, or a page that changes on every load.

Theory of operation
-------------------
Agents send only a body's SHA-256, so content is judged by hash, final URL and whether the body
was cut at the agent's byte cap.

*Baseline.* With the hotline's reference hash, that hash is the content. Without one, a hash
becomes the baseline only when vantage points agree: the same hash from `need` different
networks (two by default), or from one network at two different times while no other network
has seen a different 2xx body there (content served to one network only: the others are
blocked, with 451 or an error). Until then a 2xx body is a *candidate* and the probe is
undecided; so a filtering ISP's "blocked" page served with status 200 to one network, while
another network sees the content, never becomes the content.
When agreement comes, every earlier sighting of that hash is reported back so that the fold can
count those probes as present.

*Dynamic pages.* When a network's loads at the same place differ from each other and none of
them ever repeated, and such networks gave `dynamic_after` different bodies, the page changes on
every load (ads, tokens, timestamps): it is *dynamic*, and a 2xx there is present when its body
was never seen before. Bodies that repeat (another network's 200 block page) are not the page,
and a network served one is no evidence of it; they are remembered as stable bodies, kept before
any one-off body when memory is full. A body that repeats on a dynamic page is a stable
replacement ("this file has been removed") or a block page: removed, dated to its first sighting
(fold.py tells the two apart by who saw the content). A page whose baseline once looked stable
(two identical cached renders) and then gives way to bodies that never repeat is declared dynamic
too, not removed: a changing page is never taken for a removal. A hotline's reference hash is
never declared dynamic.

*Against a baseline.* The baseline hash is present. A 2xx that ended at another place (host,
port and path, ignoring scheme and query: http→https or a tracking parameter is not a move) was
redirected away: removed. Another hash is first remembered (undecided); seen again it is a
stable replacement, removed, dated to its first sighting.

*Truncated bodies* (cut at the agent's `--max-body-bytes`) are never compared with a reference
hash (undecided, flagged): a large video would otherwise look replaced. A truncated body equal to
an agreed (equally truncated) baseline is present; one that differs is undecided.

Nothing here does I/O or reads a clock.
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass, field
from urllib.parse import urlsplit

MAX_VARIANTS = 16
MAX_SIGHTINGS = 8
_DEFAULT_PORTS = {"http": 80, "https": 443}


class Verdict(enum.Enum):
    PRESENT = "present"
    REMOVED = "removed"
    UNDECIDED = "undecided"


@functools.lru_cache(maxsize=4096)
def place(url: str) -> str:
    """Where a URL points, for redirect-away checks: host, port and path (no scheme, no query)."""
    if not url:
        return ""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return url
    if port == _DEFAULT_PORTS.get(parts.scheme.lower()):
        port = None
    host = (parts.hostname or "").lower()
    path = parts.path.rstrip("/") or "/"
    return f"{host}:{port or ''}{path}"


@dataclass(frozen=True, slots=True)
class Sighting:
    """One probe that saw a candidate body."""

    agent_id: int
    network: str
    at: float


@dataclass(slots=True)
class Variant:
    first_seen: float
    count: int = 1
    first_by: tuple[int, int] | None = None  # (agent, seq) of the load that first showed it


@dataclass(frozen=True, slots=True)
class Judgement:
    verdict: Verdict
    since: float  # when the evidence dates from (<= the probe's time)
    since_by: tuple[int, int] | None = None  # (agent, seq) of the load at `since`, if another
    established: tuple[Sighting, ...] = ()  # earlier sightings that now count as present
    truncated_vs_reference: bool = False
    fresh: bool = False  # present only as a body never seen before on a dynamic page


@dataclass(slots=True)
class ContentMemory:
    """Per-URL memory of the baseline, the candidates before it, and the other bodies seen."""

    baseline: bytes | None = None
    baseline_place: str = ""
    from_reference: bool = False
    dynamic: bool = False
    candidates: dict[bytes, list[Sighting]] = field(default_factory=dict)
    candidate_places: dict[bytes, str] = field(default_factory=dict)
    baseline_truncated: bool = False  # agreed on bodies cut at the byte cap
    candidate_truncated: dict[bytes, bool] = field(default_factory=dict)
    variants: dict[bytes, Variant] = field(default_factory=dict)

    @classmethod
    def with_reference(cls, sha256: bytes) -> ContentMemory:
        """Memory whose baseline is the hotline's reference hash."""
        return cls(baseline=sha256, from_reference=True)

    def clone(self) -> ContentMemory:
        return ContentMemory(
            baseline=self.baseline,
            baseline_place=self.baseline_place,
            from_reference=self.from_reference,
            dynamic=self.dynamic,
            candidates={h: list(seen) for h, seen in self.candidates.items()},
            candidate_places=dict(self.candidate_places),
            baseline_truncated=self.baseline_truncated,
            candidate_truncated=dict(self.candidate_truncated),
            variants={
                h: Variant(v.first_seen, v.count, v.first_by) for h, v in self.variants.items()
            },
        )

    @property
    def known(self) -> bool:
        """Whether a present can be recognised: a baseline or a dynamic page."""
        return self.baseline is not None or self.dynamic

    def judge(
        self,
        sha256: bytes,
        final_url: str,
        truncated: bool,
        sighting: Sighting,
        need: int,
        dynamic_after: int,
        seq: int | None = None,
    ) -> Judgement:
        """Judge one 2xx body seen by `sighting` (its agent's result `seq`); `need` networks
        must agree on a baseline."""
        at = sighting.at
        where = place(final_url)
        if not self.known:
            return self._candidate(sha256, where, truncated, sighting, need, dynamic_after)
        if truncated and self.from_reference:
            return Judgement(Verdict.UNDECIDED, at, truncated_vs_reference=True)
        if sha256 == self.baseline:
            return Judgement(Verdict.PRESENT, at)
        if self.baseline_place and where and where != self.baseline_place:
            return Judgement(Verdict.REMOVED, at)
        if truncated or self.baseline_truncated:
            # A cut body against a full baseline, or a full body against a cut one: the hashes
            # cannot be compared.
            return Judgement(Verdict.UNDECIDED, at)
        known = self.variants.get(sha256)
        if known is not None:
            known.count += 1
            return Judgement(Verdict.REMOVED, known.first_seen, since_by=known.first_by)
        self._remember(sha256, at, by=None if seq is None else (sighting.agent_id, seq))
        if self.dynamic:
            return Judgement(Verdict.PRESENT, at, fresh=True)
        never_repeated = all(v.count == 1 for v in self.variants.values())
        if self.from_reference or len(self.variants) < dynamic_after or not never_repeated:
            return Judgement(Verdict.UNDECIDED, at)
        self.dynamic = True
        return Judgement(Verdict.PRESENT, at)

    def _candidate(
        self,
        sha256: bytes,
        where: str,
        truncated: bool,
        sighting: Sighting,
        need: int,
        dynamic_after: int,
    ) -> Judgement:
        seen = self.candidates.setdefault(sha256, [])
        self.candidate_places.setdefault(sha256, where)
        self.candidate_truncated.setdefault(sha256, truncated)
        if len(seen) < MAX_SIGHTINGS or sighting.network not in {s.network for s in seen}:
            seen.append(sighting)  # bounded by MAX_SIGHTINGS plus one per network
        networks = {s.network for s in seen}
        times = {s.at for s in seen}
        contested = any(
            o.network not in networks
            for h, others in self.candidates.items()
            if h != sha256
            for o in others
        )
        if len(networks) >= need or (len(times) >= 2 and not contested):
            self.baseline = sha256
            self.baseline_place = self.candidate_places[sha256]
            self.baseline_truncated = self.candidate_truncated.get(sha256, truncated)
            return self._establish([sha256], sighting)
        here = [h for h, p in self.candidate_places.items() if p == where]
        # Dynamic: a network's loads differ from each other and none of them repeated.
        # Different bodies to different networks, one each, are block pages or cloaking, not a
        # changing page; a body that repeats (another network's block page) is not the page,
        # and a network that was served one is no evidence of it.
        stable = {h for h in here if len(self.candidates[h]) > 1}
        bodies: dict[str, set[bytes]] = {}
        for h in here:
            for s in self.candidates[h]:
                bodies.setdefault(s.network, set()).add(h)
        changing = [hs for hs in bodies.values() if len(hs) >= 2 and not hs & stable]
        fresh = [h for h in here if any(h in hs for hs in changing)]
        if len(fresh) >= dynamic_after:
            self.dynamic = True
            self.baseline_place = where
            for h in here:  # a stable body's next load reads as what it is: not the page
                self._remember(h, self.candidates[h][0].at, len(self.candidates[h]))
            return self._establish(fresh, sighting)
        if len(self.candidates) > MAX_VARIANTS:
            oldest = min(self.candidates, key=lambda h: self.candidates[h][0].at)
            del self.candidates[oldest]
            del self.candidate_places[oldest]
            self.candidate_truncated.pop(oldest, None)
        return Judgement(Verdict.UNDECIDED, sighting.at)

    def _establish(self, hashes: list[bytes], now: Sighting) -> Judgement:
        earlier = tuple(s for h in hashes for s in self.candidates[h] if s != now)
        self.candidates.clear()
        self.candidate_places.clear()
        self.candidate_truncated.clear()
        return Judgement(Verdict.PRESENT, now.at, established=earlier)

    def _remember(
        self, sha256: bytes, at: float, count: int = 1, by: tuple[int, int] | None = None
    ) -> None:
        if len(self.variants) >= MAX_VARIANTS:
            # The oldest body seen once goes first: a stable page (a block page, a replacement)
            # must stay known on a dynamic page, whose every load is another one-off body.
            oldest = min(
                self.variants,
                key=lambda h: (self.variants[h].count > 1, self.variants[h].first_seen),
            )
            del self.variants[oldest]
        self.variants[sha256] = Variant(at, count, by)
