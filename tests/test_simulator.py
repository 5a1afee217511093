"""The verdict fold held against the ground truth of simulated landscapes (tests/simulator.py).

Every expectation here comes from the truth (what the origin did, what each network was served)
and the domain rules, never from the fold's own bookkeeping.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass, field

import pytest
from hypothesis import given, note, settings
from hypothesis import strategies as st

from collector.fold import (
    Event,
    Method,
    Notice,
    Observation,
    OutOfOrder,
    Reappearance,
    Removal,
    Renotified,
    StateChange,
    UrlFold,
    refold,
)
from collector.method import Policy, UrlState
from collector.schedule import Planner
from tests.simulator import (
    INTERVAL,
    JITTER,
    PRESENT,
    URL,
    Agent,
    K,
    Label,
    Landscape,
    Network,
    Probe,
    Segment,
    Window,
    batches,
    probe,
    probes,
    random_landscape,
)

POLICY = Policy(confirmations=K, min_vantage_points=2, liveness_intervals=3.0, jitter=JITTER)
PLANNER = Planner.fixed(INTERVAL)
METHOD = Method(
    POLICY,
    lambda now, st, op, od, ra: PLANNER.interval(now, st, op, od, ra) or PLANNER.watch_interval,
)
STEP = INTERVAL * (1 + JITTER)
"""The longest gap between two probes of one running agent."""
HORIZON = POLICY.horizon(INTERVAL)


@dataclass
class Run:
    """The fold as the collector's store drives it, and the refold of everything."""

    land: Landscape
    made: list[Probe]
    fold: UrlFold
    events: list[Event]
    states_after_batch: list[UrlState] = field(default_factory=list)
    refolds: int = 0


def networks_at(land: Landscape) -> int:
    return len(land.networks)


def deliver(land: Landscape) -> Run:
    """Deliver the landscape's batches, in their arrival order, to the store's fold."""
    made = probes(land)
    run = Run(land, made, UrlFold.start(land.notice(), METHOD), [])
    store = store_fold(run, [land.notice()], batches(land, made), networks_at(land))
    assert len(store) == len(made)
    return run


def store_fold(
    run: Run, notices: list[Notice], arriving: Iterable[list[Observation]], n: int
) -> dict[tuple[int, int], Observation]:
    """Fold batches as the store does: dedupe by (agent, seq), refold on a late result."""
    store: dict[tuple[int, int], Observation] = {}
    for batch in arriving:
        late = False
        for obs in batch:
            key = (obs.agent_id, obs.seq)
            if key in store:
                continue
            store[key] = obs
            if late:
                continue
            try:
                run.events += run.fold.observe(obs, n)
            except OutOfOrder:
                late = True
        if late:
            run.fold, run.events = refold(notices, store.values(), METHOD, lambda t: n)
            run.refolds += 1
        run.states_after_batch.append(run.fold.state)
    return store


def refold_all(land: Landscape) -> Run:
    """Fold every result of the landscape from scratch, as `takedown-collector refold` would."""
    made = probes(land)
    n = networks_at(land)
    fold, events = refold([land.notice()], [p.obs for p in made], METHOD, lambda t: n)
    return Run(land, made, fold, events)


def removal_events(events: Iterable[Event]) -> list[Removal]:
    return [e for e in events if isinstance(e, Removal)]


PARKED = frozenset({"cloaked-pages"})
"""Configurations the random landscapes leave out while they reproduce an open finding
(tests/SIM_FINDINGS.md, each a strict xfail below), or whose truth is not knowable from hashes
(cloaked pages: F10, kept pending); drop one once fixed."""


def known_present_until(run: Run, removed_at: float) -> float:
    """The latest the rules can know the content present before a removal at `removed_at`.

    The truth, unless the content was first served cut at the byte cap: networks may then
    agree on the cut hash, and a full body cannot be compared with it (DOMAIN 2), so the
    content is known present only at the last cut body before the removal.
    """
    served = sorted((p.obs for p in run.made if p.label is Label.CONTENT or p.obs.truncated),
                    key=lambda o: o.at)  # fmt: skip
    cut = [o.at for o in served if o.truncated and o.at < removed_at]
    if served and served[0].truncated and cut:
        return min(removed_at - STEP, cut[-1])
    return removed_at - STEP


def mistakable_loads(run: Run) -> set[float]:
    """Block page loads the rules must take for the content, by when they were made.

    On a dynamic page, a network's 200 block page at the URL loaded once, its agent then silent
    (no answer but glitches) past the liveness horizon: a body never seen before is a present
    (DOMAIN 2), and only the repeat that never came would have told it from the content.
    """
    if not run.land.dynamic:
        return set()
    out = set()
    for p in run.made:
        if p.label is not Label.BLOCKED or p.obs.status != 200 or p.obs.final_url != URL:
            continue
        later = [q.obs.at for q in run.made if q.obs.agent_id == p.obs.agent_id
                 and q.obs.at > p.obs.at and q.label is not Label.GLITCH]  # fmt: skip
        if not later or min(later) > p.obs.at + HORIZON:
            out.add(p.obs.at)
    return out


def truth_violations(run: Run, blips: bool = True) -> list[str]:
    """Every way the fold's verdicts contradict the landscape's truth.

    `blips=False` leaves out the check of the state after each batch (only `deliver` records it).
    """
    land, events, bad = run.land, run.events, []
    removals = removal_events(events)
    mistakable = mistakable_loads(run)
    for r in removals:
        seg = land.segment_at(r.first_removed_at)
        if seg.kind == PRESENT:
            bad.append(f"false removal: {r} while the content was present (since {seg.start})")
            continue
        if r.last_present_at is None or (
            r.last_present_at > seg.start and r.last_present_at not in mistakable
        ):
            bad.append(f"removal {r}: last present after the true removal at {seg.start}")
        if not r.observed_present:
            bad.append(f"removal {r}: flagged not observed present, but a witness saw it")
        if r.nxdomain != (seg.kind == "nxdomain"):
            bad.append(f"removal {r}: nxdomain flag wrong for a {seg.kind} removal")
    last_removed_seg: float | None = None
    reopened = False
    for e in events:
        if isinstance(e, Reappearance | Renotified):
            reopened = True
        elif isinstance(e, StateChange):
            if e.old is UrlState.REMOVED and not reopened:
                bad.append(f"left removed at {e.at} without a reappearance: {e}")
            reopened = False
        if isinstance(e, Removal):
            last_removed_seg = land.segment_at(e.first_removed_at).start
        elif isinstance(e, Reappearance):
            seg = land.segment_at(e.at)
            if seg.kind != PRESENT or last_removed_seg is None or seg.start <= last_removed_seg:
                bad.append(f"invented reappearance {e}: truth there is {seg}")
        elif isinstance(e, StateChange) and e.new is UrlState.GEOBLOCKED:
            # A witness knows the content gone only from its first conclusive probe after the
            # removal: the next one, or for a replacement page the one that sees it repeat.
            lag = 2 * STEP if land.segment_at(e.at).kind == "replaced" else STEP
            visible_lately = land.present_at(e.at) or land.present_at(e.at - lag)
            if not land.blocked(conclusive_only=True) or not visible_lately:
                bad.append(f"geoblocked at {e.at} without a block while the content was served")
    for start, until, mode in land.removals():
        found = [r for r in removals if start <= r.first_removed_at < until]
        if len(found) != 1:
            bad.append(f"true removal at {start} ({mode}) confirmed {len(found)} times: {found}")
            continue
        r = found[0]
        taken_for_content = any(start <= m <= r.first_removed_at for m in mistakable)
        if r.first_removed_at > start + STEP and not taken_for_content:
            bad.append(f"removal at {start} ({mode}) dated late: {r}")
        if r.last_present_at is not None and r.last_present_at < known_present_until(run, start):
            bad.append(f"removal at {start} ({mode}): last present too early: {r}")
        if r.confirmed_at >= until:
            bad.append(
                f"removal at {start} ({mode}) confirmed only after the content came back: {r}"
            )
    last = max((p.obs.at for p in run.made), default=land.notice_at)
    watched = any(land.running_at_end(a) and not land.network(a.network).block for a in land.agents)
    if watched and run.fold.stale(last):
        bad.append(f"stale at {last} while an agent that sees the URL is still probing")
    expected = expected_final_state(land)
    if run.fold.state is not expected:
        bad.append(f"final state {run.fold.state}, truth {expected}")
    if (
        blips
        and not land.blocked(conclusive_only=True)
        and UrlState.GEOBLOCKED in run.states_after_batch
    ):
        bad.append("passed through geoblocked after a batch with no network blocked")
    return bad


def expected_final_state(land: Landscape) -> UrlState:
    """What the truth says at the end, as far as the live agents can know it."""
    if not land.present_at(land.end - 1):
        return UrlState.REMOVED
    blocked = {n.name for n in land.blocked(conclusive_only=True)}
    if any(a.network in blocked and land.running_at_end(a) for a in land.agents):
        return UrlState.GEOBLOCKED
    return UrlState.AVAILABLE


def replay_violations(run: Run) -> list[str]:
    """Differences between the incrementally driven fold and a refold of everything."""
    obs = [p.obs for p in run.made]
    fresh, events = refold([run.land.notice()], obs, METHOD, lambda t: networks_at(run.land))
    bad = []
    for name in (
        "state",
        "episode",
        "removal",
        "first_removal",
        "reappearances",
        "last_present_at",
    ):
        if getattr(run.fold, name) != getattr(fresh, name):
            bad.append(
                f"{name}: incremental {getattr(run.fold, name)}, refold {getattr(fresh, name)}"
            )
    if run.events != events:
        bad.append(f"events differ: incremental {run.events}, refold {events}")
    return bad


def describe(land: Landscape) -> str:
    return (
        f"segments={land.segments} dynamic={land.dynamic} reference={land.reference}\n"
        f"networks={land.networks}\nagents={land.agents}\nend={land.end}"
    )


class TestRandomLandscapes:
    # Derandomized: the same 150 landscapes at every run. About 1 in 2,500 random landscapes
    # shows the open "geoblocked while a witness is in a 429 window" blip (SIM_FINDINGS.md), a
    # rule question rather than a regression; sweeps over 50,000 seeds are how it was counted.
    @settings(max_examples=150, deadline=None, derandomize=True)
    @given(st.randoms(use_true_random=False))
    def test_every_verdict_holds_against_the_truth(self, rng: random.Random) -> None:
        """No false removal or reappearance, every removal dated and the end state right."""
        land = random_landscape(rng, PARKED)
        note(describe(land))
        assert truth_violations(refold_all(land)) == []

    @settings(max_examples=25, deadline=None)
    @given(st.randoms(use_true_random=False))
    def test_incremental_fold_equals_refold(self, rng: random.Random) -> None:
        """Batches in any order, some twice, fold to exactly what a refold of everything gives."""
        land = random_landscape(rng)
        note(describe(land))
        assert replay_violations(deliver(land)) == []


def agent(agent_id: int, network: str, start: float = 0.0, **kw: object) -> Agent:
    return Agent(agent_id, network, start, **kw)  # type: ignore[arg-type]


def minutes(m: float) -> float:
    return m * INTERVAL


class TestWhatWasSeen:
    def test_451_to_the_first_agent_is_a_geoblock_not_a_removal(self) -> None:
        """A URL answered 451 to the first agent to start is never credited with a removal."""
        land = Landscape(
            segments=(Segment(0.0, PRESENT),),
            networks=(Network("net0", block="451"), Network("net1"), Network("net2")),
            agents=(agent(1, "net0"), agent(2, "net1", minutes(3)), agent(3, "net2", minutes(5))),
            end=minutes(40),
        )
        run = deliver(land)
        assert removal_events(run.events) == []
        assert not any(isinstance(e, Reappearance) for e in run.events)
        assert truth_violations(run) == []

    @pytest.mark.parametrize(
        "block",
        [
            "451",
            "403",
            "page_same",
            "page_elsewhere",
        ],
    )
    def test_blocked_for_one_network_then_removed(self, block: str) -> None:
        """A removal after a block for one network is dated by the witnesses, not by the block."""
        land = Landscape(
            segments=(Segment(0.0, PRESENT), Segment(minutes(20), "404")),
            networks=(Network("net0"), Network("net1", block=block), Network("net2")),
            agents=(agent(1, "net0", minutes(2)), agent(2, "net1"), agent(3, "net2", minutes(1))),
            end=minutes(45),
        )
        run = deliver(land)
        assert truth_violations(run) == []
        assert [r.first_removed_at for r in removal_events(run.events)] != []

    @pytest.mark.parametrize("seed", range(3))
    def test_dynamic_page_replaced_by_a_stable_page(self, seed: int) -> None:
        """A page that changes on every load, replaced by a stable 200 page, is found removed."""
        land = Landscape(
            segments=(Segment(0.0, PRESENT), Segment(minutes(15), "replaced")),
            networks=(Network("net0"), Network("net1")),
            agents=(agent(1, "net0", phase=seed), agent(2, "net1", minutes(1), phase=seed)),
            end=minutes(40),
            dynamic=True,
            seed=seed,
        )
        assert truth_violations(deliver(land)) == []

    def test_an_agent_dying_before_the_removal(self) -> None:
        """A witness that dies before the removal delays confirmation by its liveness at most."""
        removed_at = minutes(20)
        land = Landscape(
            segments=(Segment(0.0, PRESENT), Segment(removed_at, "410")),
            networks=(Network("net0"), Network("net1")),
            agents=(
                agent(1, "net0"),
                agent(2, "net1", downs=(Window(removed_at - minutes(2), minutes(60)),)),
            ),
            end=minutes(60),
        )
        run = deliver(land)
        assert truth_violations(run) == []
        (r,) = removal_events(run.events)
        assert r.confirmed_at <= removed_at - minutes(2) + HORIZON + 2 * STEP

    def test_an_outage_with_a_spool_delivered_late(self) -> None:
        """A spool delivered hours late lands in event time: no geoblocked blip, the right date."""
        removed_at = minutes(25)
        spool = Window(minutes(15), minutes(45))
        land = Landscape(
            segments=(Segment(0.0, PRESENT), Segment(removed_at, "404")),
            networks=(Network("net0"), Network("net1"), Network("net2")),
            agents=(
                agent(1, "net0"),
                agent(2, "net1", spool=spool, spool_delay=3 * 3600.0),
                agent(3, "net2", spool=spool, spool_delay=2 * 3600.0),
            ),
            end=minutes(60),
        )
        run = deliver(land)
        assert run.refolds > 0
        assert truth_violations(run) == []
        assert replay_violations(run) == []


class TestFindings:
    """Minimal reproductions of the fold disagreeing with the truth (tests/SIM_FINDINGS.md)."""

    def test_removal_seen_by_one_witness_a_little_before_another(self) -> None:
        """With jitter, one witness's k removed results before another's next probe: no geoblock."""
        land = Landscape(
            segments=(Segment(0.0, PRESENT), Segment(841.0, "451")),
            networks=(Network("net0"), Network("net1")),
            agents=(agent(1, "net0", phase=241), agent(2, "net1", phase=297)),
            end=minutes(30),
            reference=True,
        )
        assert truth_violations(refold_all(land)) == []

    def test_removal_while_a_witness_is_inconclusive_is_no_geoblock(self) -> None:
        """A witness in a 503 window after the removal does not make the URL geoblocked."""
        land = Landscape(
            segments=(Segment(0.0, PRESENT), Segment(minutes(10), "404")),
            networks=(Network("net0"), Network("net1", glitches=(Window(570.0, 780.0, "503"),))),
            agents=(agent(1, "net0"), agent(2, "net1")),
            end=minutes(30),
            reference=True,
        )
        assert truth_violations(refold_all(land)) == []

    def test_dynamic_page_replaced_by_a_stable_page_one_network(self) -> None:
        """The removal of a dynamic page is dated to the stable page's first sighting."""
        land = Landscape(
            segments=(Segment(0.0, PRESENT), Segment(minutes(10), "replaced")),
            networks=(Network("net0"), Network("net1", block="451")),
            agents=(agent(1, "net0"), agent(2, "net1")),
            end=minutes(30),
            dynamic=True,
        )
        assert truth_violations(refold_all(land)) == []

    @pytest.mark.parametrize("dynamic", [True, False])
    def test_two_451_networks_before_the_content_is_recognised(self, dynamic: bool) -> None:
        """Two networks blocked by 451 are no removal while a third is served the content."""
        land = Landscape(
            segments=(Segment(0.0, PRESENT),),
            networks=(
                Network("net0"),
                Network("net1"),
                Network("net2", block="451"),
                Network("net3", block="451"),
            ),
            agents=(
                agent(1, "net0"),
                agent(2, "net1", minutes(4)),
                agent(3, "net2"),
                agent(4, "net3"),
            ),
            end=minutes(20),
            dynamic=dynamic,
        )
        assert truth_violations(refold_all(land)) == []

    def test_block_page_at_the_url_of_a_dynamic_page(self) -> None:
        """One network's 200 block page at the URL does not stop a dynamic page being recognised."""
        land = Landscape(
            segments=(Segment(0.0, PRESENT), Segment(minutes(10), "404")),
            networks=(Network("net0"), Network("net1", block="page_same")),
            agents=(agent(1, "net0", 30.0), agent(2, "net1")),
            end=minutes(34),
            dynamic=True,
        )
        assert truth_violations(refold_all(land)) == []

    def test_block_page_of_a_late_network_is_no_reappearance(self) -> None:
        """A network joining after the removal with a 200 block page invents no reappearance."""
        land = Landscape(
            segments=(Segment(0.0, PRESENT), Segment(minutes(10), "404")),
            networks=(Network("net0"), Network("net1", block="page_same")),
            agents=(agent(1, "net0"), agent(2, "net1", minutes(20))),
            end=minutes(40),
            dynamic=True,
        )
        assert truth_violations(refold_all(land)) == []

    def test_parking_page_is_not_the_content_after_a_late_second_network(self) -> None:
        """Without agreement on the content, a parking page two networks see is not the content."""
        land = Landscape(
            segments=(
                Segment(0.0, PRESENT),
                Segment(minutes(20), "redirect"),
                Segment(minutes(44), PRESENT),
            ),
            networks=(Network("net0"), Network("net1")),
            agents=(agent(1, "net0"), agent(2, "net1", minutes(9))),
            end=minutes(70),
        )
        assert truth_violations(refold_all(land)) == []

    def test_second_network_agrees_after_eight_sightings(self) -> None:
        """A second network seeing the same hash after eight sightings by the first still agrees."""
        land = Landscape(
            segments=(Segment(0.0, PRESENT), Segment(minutes(20), "404")),
            networks=(Network("net0"), Network("net1")),
            agents=(agent(1, "net0"), agent(2, "net1", minutes(9))),
            end=minutes(45),
        )
        assert truth_violations(refold_all(land)) == []

    def test_witness_up_briefly_after_an_outage_does_not_hold_the_content_online(self) -> None:
        """A witness back for one probe after an outage is not live for thirty intervals."""
        land = Landscape(
            segments=(Segment(0.0, PRESENT), Segment(minutes(20), "404")),
            networks=(Network("net0"), Network("net1")),
            agents=(
                agent(1, "net0"),
                agent(
                    2,
                    "net1",
                    downs=(Window(minutes(5), minutes(15)), Window(minutes(16), minutes(40))),
                ),
            ),
            end=minutes(40),
            reference=True,
        )
        assert truth_violations(refold_all(land)) == []

    def test_witness_back_into_a_glitch_after_the_removal(self) -> None:
        """A removed URL stays removed when a witness silent since before it comes back to 503s."""
        land = Landscape(
            segments=(Segment(0.0, PRESENT), Segment(minutes(10), "404")),
            networks=(
                Network("net0"),
                Network("net1", glitches=(Window(minutes(25), minutes(28), "503"),)),
            ),
            agents=(agent(1, "net0"), agent(2, "net1", downs=(Window(minutes(5), minutes(25)),))),
            end=minutes(40),
            reference=True,
        )
        assert truth_violations(refold_all(land)) == []

    @pytest.mark.parametrize("reference", [False, True])
    def test_stable_replacement_first_seen_by_one_witness(self, reference: bool) -> None:
        """The witness that first saw the replacement page is not left counting as present."""
        land = Landscape(
            segments=(Segment(0.0, PRESENT), Segment(1039.0, "replaced")),
            networks=(Network("net0"), Network("net1")),
            agents=(agent(1, "net0", phase=934), agent(2, "net1", phase=107)),
            end=minutes(30),
            reference=reference,
        )
        assert truth_violations(refold_all(land)) == []

    def test_results_of_one_instant_arriving_in_either_order(self) -> None:
        """Two agents' results made at the same second give one verdict whatever their arrival."""
        land = Landscape(
            segments=(Segment(0.0, PRESENT), Segment(590.0, "404")),
            networks=(Network("net0", glitches=(Window(595.0, 605.0, "503"),)), Network("net1")),
            agents=(),
            end=minutes(15),
            reference=True,
        )
        made = [
            probe(land, a, minutes(m), m + 1)
            for m in range(15)
            for a in (agent(2, "net1"), agent(1, "net0"))
        ]
        run = Run(land, made, UrlFold.start(land.notice(), METHOD), [])
        store_fold(run, [land.notice()], [[p.obs] for p in made], networks_at(land))
        assert replay_violations(run) == []

    def test_two_networks_with_their_own_block_page(self) -> None:
        """Two networks served their own 200 block page at the URL are no removal of the content."""
        land = Landscape(
            segments=(Segment(0.0, PRESENT),),
            networks=(
                Network("net0"),
                Network("net1", block="page_same"),
                Network("net2", block="page_same"),
            ),
            agents=(agent(1, "net0"), agent(2, "net1"), agent(3, "net2")),
            end=minutes(20),
        )
        run = refold_all(land)
        # Three bodies, each from one network: no hash is agreed, so the URL stays pending
        # (never credited, never blamed); a reference hash would make it geoblocked.
        assert removal_events(run.events) == []
        assert run.fold.state is UrlState.PENDING

    def test_first_loads_cut_at_the_byte_cap_in_two_networks(self) -> None:
        """Bodies cut at the byte cap never make the full content look replaced.

        The cut hash agreed by two networks is the baseline; a full body cannot be compared
        with it (DOMAIN 2), so the content is last known present at the last cut body.
        """
        cut = (Window(0.0, minutes(3), "truncated"),)
        land = Landscape(
            segments=(Segment(0.0, PRESENT), Segment(minutes(15), "404")),
            networks=(
                Network("net0", glitches=cut),
                Network("net1", glitches=cut),
                Network("net2"),
            ),
            agents=(agent(1, "net0"), agent(2, "net1"), agent(3, "net2", minutes(2))),
            end=minutes(35),
        )
        run = refold_all(land)
        assert truth_violations(run) == []
        (r,) = removal_events(run.events)
        last_cut = max(p.obs.at for p in run.made if p.obs.truncated)
        assert r.last_present_at == last_cut < minutes(3) and r.observed_present
