"""A ground-truth simulator for the verdict fold: hosting landscapes whose truth is known.

Theory of operation
-------------------
A `Landscape` is one reported URL seen from several networks. Its truth is an *origin timeline*
(`Segment`s: the content is present, or gone by one removal mode) shared by every network, plus
per network a *block from the start* (451, 403, or a 200 "blocked" page with its own hash, served
at the URL or at the ISP's own host) and *glitch windows* (5xx, 429, bot challenge, timeouts,
resets, TLS errors). Agents (one per network, sometimes two sharing one) start late, go down and
come back, die, probe at a fixed interval with up to 10% jitter, and deliver their results in
chunks, some of them from a spool hours late.

`probe` says what one agent gets at one moment, derived from the truth alone; every probe is
labelled with what it really was (`Label`), so a test can hold the fold's verdicts against what
each network really saw rather than against a restatement of the fold. Nothing here does I/O.

Constraints, each because without it the truth could not be known from the probes
------------------------------------------------------------------------------------
1. *An anchor.* Agent 1 on network "net0" sees the content (net0 is never blocked), probes from
   the notice to the end without going down, and has no glitch near a change of the origin
   (from 2 intervals before to k+2 intervals after). Without a vantage point that sees the
   content and reports across the removal, a block cannot be told from a removal, and the
   removal could not be dated within one interval.
2. *Blocks only from the start.* A network blocked from the start never sees the content; a block
   that begins later looks exactly like a removal to that network, and a block that begins while
   every witness is silent looks exactly like a removal to everyone.
3. *Agreement on the baseline.* Without a reference hash from the hotline, content is recognised
   only when two networks see the same hash (a filtering ISP's 200 page from one network must
   never become the content). So a fixed-hash URL without a reference has a second visible
   network ("net1") whose agent sees it before the first removal. A dynamic page (a fresh body on
   every load) never has a reference hash; its first present segment lasts long enough for the
   anchor alone to load it several times.
4. *Each blocked network has its own block page hash*, and the stable replacement page is a hash
   nobody else serves: two networks agreeing on a block page would make it the content.
5. *Long segments.* Every present or gone segment lasts many probe intervals (longer than the
   liveness horizon plus k probes plus the longest glitch), so each change of the truth is
   observable before the next one; a flip faster than the probes cannot be known.
6. *A settled end.* No agent starts, goes down or comes back in the last `SETTLE` intervals, so
   which agents are live at the end is not a matter of a fraction of an interval.
Times are whole seconds so that two agents sometimes probe at the same instant (ties must not
make the incremental fold differ from a refold).

Parked configurations
---------------------
These constraints are all the truth needs. `random_landscape(rng, parked)` can further leave out
configurations in which the fold is known to be wrong (tests/SIM_FINDINGS.md), so that the random
test keeps looking for new faults; each one left out is kept as a strict xfail repro, and is
dropped from the test's `PARKED` once fixed.
"""

from __future__ import annotations

import enum
import hashlib
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from collector.fold import Notice, Observation

INTERVAL = 60.0
JITTER = 0.1
K = 2
SETTLE = 8
URL = "https://files.example/f/42"
PROVIDER = "Hoster A"
ASN = 64500

PRESENT = "present"
REMOVAL_MODES = ("404", "410", "451", "replaced", "redirect", "refused", "nxdomain")
BLOCK_KINDS = ("451", "403", "page_same", "page_elsewhere")
GLITCH_KINDS = ("500", "503", "429", "challenge", "timeout", "reset", "tls", "truncated")
"""Inconclusive answers; "truncated" is the content cut at the agent's byte cap (only while the
content is served to that network; otherwise that network gets what it would have got)."""
CONCLUSIVE_BLOCKS = frozenset({"451", "page_same", "page_elsewhere"})
"""Blocks that read as "not present" to a network; a 403 is inconclusive by the rules (rule 2)."""


class Label(enum.StrEnum):
    """What a probe really was, by the truth."""

    CONTENT = "content"  # the reported content was served
    GONE = "gone"  # the origin had removed it
    BLOCKED = "blocked"  # this network is blocked or cloaked
    GLITCH = "glitch"  # an inconclusive answer (5xx, 429, challenge, network error)


def digest(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


CONTENT_HASH = digest("the reported content")
REPLACEMENT_HASH = digest("this file has been removed")
PARKING_HASH = digest("parked domain")
CHALLENGE_HASH = digest("are you a robot")


_Obs = Callable[..., Observation]


@dataclass(frozen=True)
class Segment:
    """From `start` on, the origin serves the content (PRESENT) or has removed it by `kind`."""

    start: float
    kind: str


@dataclass(frozen=True)
class Window:
    start: float
    end: float
    kind: str = ""

    def covers(self, t: float) -> bool:
        return self.start <= t < self.end


@dataclass(frozen=True)
class Network:
    name: str
    block: str | None = None  # one of BLOCK_KINDS, from the start
    glitches: tuple[Window, ...] = ()


@dataclass(frozen=True)
class Agent:
    agent_id: int
    network: str
    start: float
    downs: tuple[Window, ...] = ()  # not running; a down to `end` of the landscape is a death
    spool: Window | None = None  # results made in it are delivered `spool_delay` after its end
    spool_delay: float = 0.0
    phase: int = 0  # seeds the jitter


@dataclass(frozen=True)
class Landscape:
    """One URL, its truth per network over time, and the agents that probe it."""

    segments: tuple[Segment, ...]
    networks: tuple[Network, ...]
    agents: tuple[Agent, ...]
    end: float
    dynamic: bool = False
    reference: bool = False
    chunk: int = 5
    seed: int = 0
    notice_at: float = 0.0
    _net: dict[str, Network] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        self._net.update({n.name: n for n in self.networks})

    def network(self, name: str) -> Network:
        return self._net[name]

    def notice(self) -> Notice:
        return Notice(self.notice_at, CONTENT_HASH if self.reference else None)

    def segment_at(self, t: float) -> Segment:
        """The origin's segment at time t."""
        current = self.segments[0]
        for s in self.segments:
            if s.start <= t:
                current = s
        return current

    def present_at(self, t: float) -> bool:
        return self.segment_at(t).kind == PRESENT

    def removals(self) -> list[tuple[float, float, str]]:
        """The true removals: (removed at, content back at or the end, mode)."""
        out = []
        for i, s in enumerate(self.segments):
            if s.kind != PRESENT:
                until = self.segments[i + 1].start if i + 1 < len(self.segments) else self.end
                out.append((s.start, until, s.kind))
        return out

    def blocked(self, conclusive_only: bool = False) -> list[Network]:
        kinds = CONCLUSIVE_BLOCKS if conclusive_only else frozenset(BLOCK_KINDS)
        return [n for n in self.networks if n.block in kinds]

    def running_at_end(self, agent: Agent) -> bool:
        return agent.start < self.end and not any(d.covers(self.end - 1) for d in agent.downs)


@dataclass(frozen=True)
class Probe:
    """One generated observation and what it really was."""

    obs: Observation
    label: Label


def probe_times(agent: Agent, end: float) -> Iterator[float]:
    """When the agent's probes go out: every INTERVAL +- JITTER, skipping downs, whole seconds."""
    rng = random.Random(agent.phase * 7919 + agent.agent_id)
    t = agent.start
    while t < end:
        if not any(d.covers(t) for d in agent.downs):
            yield float(round(t))
        t += INTERVAL * (1.0 + rng.uniform(-JITTER, JITTER))


def probe(land: Landscape, agent: Agent, t: float, seq: int) -> Probe:
    """What `agent` gets when its probe goes out at `t`, from the truth alone."""
    net = land.network(agent.network)

    def obs(
        status: int, error: str = "none", sha: bytes = b"", final_url: str = URL,
        challenge: bool = False, truncated: bool = False,
    ) -> Observation:  # fmt: skip
        return Observation(
            agent.agent_id, agent.network, t, status, error, sha, final_url, challenge, truncated,
            seq=seq, provider=PROVIDER, asn=ASN,
        )  # fmt: skip

    glitch = next((g for g in net.glitches if g.covers(t)), None)
    kind = land.segment_at(t).kind
    cut = glitch is not None and glitch.kind == "truncated"
    if cut and net.block is None and kind == PRESENT:
        sha = digest(f"cut {agent.agent_id} {seq}") if land.dynamic else digest("cut content")
        return Probe(obs(200, sha=sha, truncated=True), Label.GLITCH)
    if glitch is not None and not cut:
        return Probe(_glitch(glitch.kind, obs), Label.GLITCH)
    if net.block is not None:
        return Probe(_blocked(net, obs), Label.BLOCKED)
    if kind == PRESENT:
        sha = digest(f"dynamic {agent.agent_id} {seq}") if land.dynamic else CONTENT_HASH
        return Probe(obs(200, sha=sha), Label.CONTENT)
    return Probe(_removed(kind, obs), Label.GONE)


def _glitch(kind: str, obs: _Obs) -> Observation:
    if kind in ("500", "503", "429"):
        return obs(int(kind))
    if kind == "challenge":
        return obs(200, sha=CHALLENGE_HASH, challenge=True)
    error = {"timeout": "read_timeout", "reset": "connection_reset", "tls": "tls_error"}[kind]
    return obs(0, error)


def _blocked(net: Network, obs: _Obs) -> Observation:
    if net.block in ("451", "403"):
        return obs(int(net.block or 0))
    page = digest(f"blocked by the ISP of {net.name}")
    if net.block == "page_same":
        return obs(200, sha=page)
    return obs(200, sha=page, final_url=f"http://block.{net.name}.example/notice")


def _removed(kind: str, obs: _Obs) -> Observation:
    if kind in ("404", "410", "451"):
        return obs(int(kind))
    if kind == "replaced":
        return obs(200, sha=REPLACEMENT_HASH)
    if kind == "redirect":
        return obs(200, sha=PARKING_HASH, final_url="https://parking.example/")
    if kind == "refused":
        return obs(0, "connect_refused")
    return obs(0, "dns_nxdomain")


def probes(land: Landscape) -> list[Probe]:
    """Every probe of every agent, in each agent's sequence order."""
    out = []
    for agent in land.agents:
        for seq, t in enumerate(probe_times(agent, land.end), start=1):
            out.append(probe(land, agent, t, seq))
    return out


def batches(land: Landscape, made: list[Probe]) -> list[list[Observation]]:
    """Chunks of each agent's results in the order the collector receives them, some twice.

    A chunk is sent a little after its newest result; a spooled chunk (made during the agent's
    spool window) hours late. The order is then shuffled locally and some chunks redelivered.
    """
    rng = random.Random(land.seed)
    sent: list[tuple[float, list[Observation]]] = []
    by_agent = {a.agent_id: a for a in land.agents}
    for agent in land.agents:
        mine = [p.obs for p in made if p.obs.agent_id == agent.agent_id]
        i = 0
        while i < len(mine):
            size = rng.randint(1, land.chunk)
            chunk = mine[i : i + size]
            i += size
            at = chunk[-1].at + rng.uniform(0, INTERVAL / 2)
            spool = by_agent[agent.agent_id].spool
            if spool is not None and any(spool.covers(o.at) for o in chunk):
                at = spool.end + agent.spool_delay
            sent.append((at, chunk))
    sent.sort(key=lambda s: s[0])
    order = [chunk for _, chunk in sent]
    for _ in range(len(order) // 10):
        j = rng.randrange(len(order))
        k = min(len(order) - 1, j + rng.randint(1, 3))
        order[j], order[k] = order[k], order[j]
    for _ in range(rng.randint(0, 3)):
        if order:
            j = rng.randrange(len(order))
            order.insert(rng.randrange(j, len(order) + 1), order[j])
    return order


def _windows_avoiding(
    rng: random.Random, end: float, count: int, longest: float, keep_out: list[Window]
) -> tuple[Window, ...]:
    out = []
    for _ in range(count):
        start = float(round(rng.uniform(0, end)))
        w = Window(
            start, start + float(round(rng.uniform(INTERVAL, longest))), rng.choice(GLITCH_KINDS)
        )
        if not any(w.start < k.end and k.start < w.end for k in keep_out):
            out.append(w)
    return tuple(out)


def random_landscape(rng: random.Random, parked: frozenset[str] = frozenset()) -> Landscape:
    """A landscape drawn from `rng` that satisfies the module's constraints.

    `parked` names configurations left out because they reproduce a known finding
    (tests/SIM_FINDINGS.md): "dynamic-replaced" (a dynamic page replaced by a stable page),
    "unrecognised-451" (two networks blocked by 451 before the content is recognised),
    "dynamic-blockpage" (a 200 block page at the URL of a dynamic page), "late-agreement" (the
    second network that must agree on the baseline starts after the first has sighted it often),
    "witness-lag" (a visible network's agent goes quiet or inconclusive near a change of the
    origin, comes back into a glitch, or is up for only a few probes between two downs),
    "replaced-first-sighting" (any stable replacement page), "cloaked-pages" (two networks served
    their own 200 block pages at the URL, without a reference hash), "truncated-baseline" (bodies
    cut at the byte cap in the first intervals, without a reference hash).
    """
    iv = INTERVAL
    dynamic = rng.random() < 0.3
    modes: tuple[str, ...] = REMOVAL_MODES
    if (dynamic and "dynamic-replaced" in parked) or "replaced-first-sighting" in parked:
        modes = tuple(m for m in modes if m != "replaced")
    reference = not dynamic and rng.random() < 0.4
    segments = [Segment(0.0, PRESENT)]
    t = float(round(rng.uniform(10, 20) * iv))
    for _ in range(rng.choice((0, 1, 1, 1, 2, 2))):
        segments.append(Segment(t, rng.choice(modes)))
        t += float(round(rng.uniform(16, 30) * iv))
        if rng.random() < 0.5:
            break
        segments.append(Segment(t, PRESENT))
        t += float(round(rng.uniform(12, 20) * iv))
    end = t + SETTLE * iv if len(segments) > 1 else t + 10 * iv
    first_removal = segments[1].start if len(segments) > 1 else end
    changes = [s.start for s in segments[1:]]
    lag = "witness-lag" in parked
    near_changes = [Window(c - 4 * iv, c + 4 * iv) for c in changes] if lag else []
    needs_second = not dynamic and not reference
    n = rng.randint(2, 5)
    blocks: list[str | None] = [None] * n
    for i in range(2 if needs_second else 1, n):
        if rng.random() < 0.4:
            block = rng.choice(BLOCK_KINDS)
            if block == "451" and not reference and "unrecognised-451" in parked:
                block = "403" if "451" in blocks else block
            if block == "page_same" and dynamic and "dynamic-blockpage" in parked:
                block = "page_elsewhere"
            cloaked = not reference and "page_same" in blocks and "cloaked-pages" in parked
            if block == "page_same" and cloaked:
                block = "page_elsewhere"
            blocks[i] = block
    agents = [Agent(1, "net0", 0.0, phase=rng.randrange(1000))]
    for i in range(1, n):
        second = i == 1 and needs_second
        if second and "late-agreement" in parked:
            start = 0.0
        elif second:
            start = float(round(rng.uniform(0, first_removal - 6 * iv)))
        else:
            start = float(round(rng.uniform(0, 0.6 * end))) if rng.random() < 0.6 else 0.0
        keep = near_changes if blocks[i] is None else []
        if second:
            keep = [*keep, Window(0, first_removal)]
        agents.append(_agent(rng, i + 1, f"net{i}", start, end, keep, lag))
    if rng.random() < 0.3:
        i = rng.randrange(n)
        keep = near_changes if blocks[i] is None else []
        start = float(round(rng.uniform(0, 0.5 * end)))
        agents.append(_agent(rng, n + 1, f"net{i}", start, end, keep, lag))
    if rng.random() < 0.3:
        a = rng.choice(agents)
        s = float(round(rng.uniform(0, end)))
        spooled = Window(s, s + float(round(rng.uniform(5, 30) * iv)))
        agents[agents.index(a)] = Agent(
            a.agent_id, a.network, a.start, a.downs, spooled,
            float(round(rng.uniform(1, 5) * 3600)), a.phase,
        )  # fmt: skip
    networks = []
    for i in range(n):
        name = f"net{i}"
        keep = [Window(c - 2 * iv, c + (K + 2) * iv * (1 + JITTER)) for c in changes]
        keep = [*keep, Window(0, 3 * iv)] if i == 0 else (near_changes if blocks[i] is None else [])
        if i == 1 and needs_second:
            keep = [*keep, Window(0, first_removal)]
        if lag and blocks[i] is None:
            returns = [d.end for a in agents if a.network == name for d in a.downs]
            keep = [*keep, *(Window(r - iv, r + 3 * iv) for r in returns)]
        glitches = _windows_avoiding(rng, end, rng.randint(0, 3), 3 * iv, keep)
        if not reference and "truncated-baseline" in parked:
            glitches = tuple(g for g in glitches if g.kind != "truncated" or g.start > 6 * iv)
        networks.append(Network(name, blocks[i], glitches))
    return Landscape(
        tuple(segments), tuple(networks), tuple(agents), end, dynamic, reference,
        chunk=rng.randint(1, 12), seed=rng.randrange(1 << 30),
    )  # fmt: skip


def _agent(
    rng: random.Random, agent_id: int, network: str, start: float, end: float,
    keep_out: list[Window], lag: bool,
) -> Agent:  # fmt: skip
    """An agent that may go down and come back, or die, but settles before the end.

    No down starts in `keep_out`; with `lag`, an agent is up for at least 4 intervals between
    two downs.
    """
    iv = INTERVAL
    settle = end - SETTLE * iv
    downs: list[Window] = []
    for _ in range(rng.choice((0, 0, 1, 1, 2))):
        a = float(round(rng.uniform(start, end)))
        b = a + float(round(rng.uniform(1, 30) * iv)) if rng.random() < 0.7 else end
        if a >= settle or any(k.covers(a) for k in keep_out):
            continue
        downs.append(Window(a, end if b > settle else b))
    downs.sort(key=lambda d: d.start)
    merged: list[Window] = []
    for d in downs:
        if merged and (d.start <= merged[-1].end or (lag and d.start - merged[-1].end < 4 * iv)):
            merged[-1] = Window(merged[-1].start, max(merged[-1].end, d.end))
        else:
            merged.append(d)
    start = min(start, settle - iv)
    return Agent(agent_id, network, max(0.0, start), tuple(merged), phase=rng.randrange(1000))
