"""The measurement rules, fed with synthetic observations and explicit times."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from collector.content import ContentMemory
from collector.verdict import (
    Observation,
    Policy,
    ProbeClass,
    Reappearance,
    Removal,
    UrlState,
    UrlVerdict,
    classify,
)


def cls_of(obs: Observation, baseline: bytes | None) -> ProbeClass:
    memory = ContentMemory.with_reference(baseline) if baseline else None
    return classify(obs, memory, POLICY)[0]


CONTENT = hashlib.sha256(b"reported content").digest()
OTHER = hashlib.sha256(b"a parked page").digest()
POLICY = Policy(confirmations=2)


def present(agent: int, at: float) -> Observation:
    return Observation(agent, at, 200, "none", CONTENT)


def gone(agent: int, at: float, status: int = 404) -> Observation:
    return Observation(agent, at, status, "none", b"")


def failed(agent: int, at: float, error: str = "read_timeout") -> Observation:
    return Observation(agent, at, 0, error, b"")


def feed(v: UrlVerdict, *observations: Observation, policy: Policy = POLICY) -> list[object]:
    events: list[object] = []
    for obs in observations:
        events.extend(v.observe(obs, policy))
    return events


class TestClassify:
    @pytest.mark.parametrize("status", [404, 410, 451])
    def test_gone_statuses_are_removed(self, status: int) -> None:
        """404, 410 and 451 say the content was removed."""
        assert cls_of(gone(1, 0, status), CONTENT) is ProbeClass.REMOVED

    @pytest.mark.parametrize("status", [500, 502, 503, 429, 403, 401, 301, 0])
    def test_errors_and_throttling_are_inconclusive(self, status: int) -> None:
        """Server errors, throttling and unexpected statuses say nothing about removal."""
        assert cls_of(gone(1, 0, status), CONTENT) is ProbeClass.INCONCLUSIVE

    def test_same_hash_is_present(self) -> None:
        """A 2xx with the baseline hash is the reported content."""
        assert cls_of(present(1, 0), CONTENT) is ProbeClass.PRESENT

    def test_first_2xx_is_present_without_baseline(self) -> None:
        """With no baseline yet, a 2xx body is taken as the reported content."""
        assert cls_of(present(1, 0), None) is ProbeClass.PRESENT

    def test_replaced_content_is_removed_once_stable(self) -> None:
        """A different body is undecided the first time and removed when it repeats."""
        memory = ContentMemory.with_reference(CONTENT)
        first = classify(Observation(1, 5, 200, "none", OTHER), memory, POLICY)
        again = classify(Observation(1, 9, 200, "none", OTHER), memory, POLICY)
        assert first == (ProbeClass.INCONCLUSIVE, 5)
        assert again == (ProbeClass.REMOVED, 5)

    def test_challenge_is_inconclusive(self) -> None:
        """A bot challenge says nothing about the content, whatever its status."""
        obs = Observation(1, 0, 200, "none", CONTENT, challenge=True)
        assert cls_of(obs, CONTENT) is ProbeClass.INCONCLUSIVE

    def test_forbidden_is_configurable(self) -> None:
        """403 is inconclusive by default and removal when the policy says so."""
        strict = Policy(forbidden_is_removal=True)
        assert cls_of(gone(1, 0, 403), CONTENT) is ProbeClass.INCONCLUSIVE
        assert classify(gone(1, 0, 403), None, strict)[0] is ProbeClass.REMOVED

    def test_connection_refused_is_removed(self) -> None:
        """A refused connection means nothing serves the content any more."""
        assert cls_of(failed(1, 0, "connect_refused"), CONTENT) is ProbeClass.REMOVED

    @pytest.mark.parametrize(
        "error", ["read_timeout", "connect_timeout", "tls_error", "dns_error", "connection_reset"]
    )
    def test_network_errors_are_inconclusive(self, error: str) -> None:
        """Timeouts, TLS and transient network errors never count as removal."""
        assert cls_of(failed(1, 0, error), CONTENT) is ProbeClass.INCONCLUSIVE

    def test_nxdomain_is_its_own_class(self) -> None:
        """NXDOMAIN is kept apart: the content may still be on the server."""
        assert cls_of(failed(1, 0, "dns_nxdomain"), CONTENT) is ProbeClass.NXDOMAIN


class TestUrlVerdict:
    def test_removal_needs_k_confirmations_from_every_agent(self) -> None:
        """One removed result per agent is not enough with k=2; two from each agent is."""
        v = UrlVerdict(notified_at=0)
        feed(v, present(1, 10), present(2, 11), gone(1, 20), gone(2, 21))
        assert v.state is UrlState.AVAILABLE
        feed(v, gone(1, 30))
        assert v.state is UrlState.AVAILABLE
        events = feed(v, gone(2, 31))
        assert v.state is UrlState.REMOVED
        removal = next(e for e in events if isinstance(e, Removal))
        assert removal.last_present_at == 11
        assert removal.first_removed_at == 20
        assert removal.latency == 20

    def test_inconclusive_never_removes(self) -> None:
        """A burst of 503s and timeouts leaves an available URL available."""
        v = UrlVerdict(notified_at=0)
        feed(v, present(1, 1))
        feed(v, *(gone(1, t, 503) for t in range(2, 50)), *(failed(1, t) for t in range(50, 99)))
        assert v.state is UrlState.AVAILABLE

    def test_geoblock_is_not_removal(self) -> None:
        """Content present for one network and gone for another is geoblocked, not removed."""
        v = UrlVerdict(notified_at=0)
        feed(v, *(o for t in range(10) for o in (present(1, 2 * t), gone(2, 2 * t + 1))))
        assert v.state is UrlState.GEOBLOCKED
        assert v.first_removal is None

    def test_agent_that_never_reaches_host_does_not_block_removal(self) -> None:
        """An agent with only inconclusive results is not part of the quorum."""
        v = UrlVerdict(notified_at=0)
        feed(v, present(1, 1), failed(2, 2), gone(1, 5), failed(2, 6), gone(1, 7))
        assert v.state is UrlState.REMOVED

    def test_stale_agent_leaves_the_quorum(self) -> None:
        """An agent silent for longer than the reach window no longer holds a URL available."""
        policy = Policy(confirmations=2, reach_window=100)
        v = UrlVerdict(notified_at=0)
        feed(v, present(1, 0), present(2, 0), gone(1, 50), gone(1, 60), policy=policy)
        assert v.state is UrlState.GEOBLOCKED
        feed(v, gone(1, 150), policy=policy)
        assert v.state is UrlState.REMOVED

    def test_blocked_network_does_not_date_a_later_removal(self) -> None:
        """Removed-for-one-network results before the real removal do not make it look early."""
        v = UrlVerdict(notified_at=0)
        feed(v, present(1, 0), gone(2, 5), gone(2, 6), present(1, 10), present(1, 20))
        assert v.state is UrlState.GEOBLOCKED
        feed(v, gone(2, 25), gone(1, 30), gone(2, 35), gone(1, 40))
        assert v.state is UrlState.REMOVED
        assert v.removal is not None
        assert (v.removal.last_present_at, v.removal.first_removed_at) == (20, 30)

    def test_reappearance_opens_new_episode(self) -> None:
        """The content coming back after a confirmed removal opens episode 2."""
        v = UrlVerdict(notified_at=0)
        feed(v, present(1, 1), gone(1, 10), gone(1, 20))
        events = feed(v, present(1, 30))
        assert v.state is UrlState.AVAILABLE
        assert Reappearance(episode=2, at=30) in events
        feed(v, gone(1, 40), gone(1, 50))
        assert v.removal is not None and v.removal.episode == 2
        assert v.removal.latency == 10
        assert v.first_removal is not None and v.first_removal.latency == 10

    def test_replaced_page_is_removal_dated_to_first_sight(self) -> None:
        """A stable replacement page confirms removal, dated when it was first seen."""
        v = UrlVerdict(notified_at=0)
        feed(v, present(1, 1), *(Observation(1, t, 200, "none", OTHER) for t in (5, 6, 7)))
        assert v.state is UrlState.REMOVED
        assert v.baseline == CONTENT
        assert v.first_removal is not None and v.first_removal.first_removed_at == 5

    def test_nxdomain_policy_switch(self) -> None:
        """NXDOMAIN counts as removal by default and can be turned off."""
        off = Policy(confirmations=2, nxdomain_is_removal=False)
        on_v, off_v = UrlVerdict(notified_at=0), UrlVerdict(notified_at=0)
        nx = [present(1, 1), failed(1, 2, "dns_nxdomain"), failed(1, 3, "dns_nxdomain")]
        feed(on_v, *nx)
        feed(off_v, *nx, policy=off)
        assert on_v.state is UrlState.REMOVED
        assert off_v.state is UrlState.AVAILABLE

    def test_policy_rejects_nonsense(self) -> None:
        """A confirmation count below one is refused with a clear message."""
        with pytest.raises(ValueError, match="confirmations"):
            Policy(confirmations=0)


# Property tests: random per-agent sequences with a known truth.

AGENTS = st.integers(min_value=1, max_value=3)
KIND = st.sampled_from(["present", "gone", "503", "timeout", "refused", "nx", "replaced"])


def make(kind: str, agent: int, at: float) -> Observation:
    return {
        "present": present(agent, at),
        "gone": gone(agent, at),
        "503": gone(agent, at, 503),
        "timeout": failed(agent, at),
        "refused": failed(agent, at, "connect_refused"),
        "nx": failed(agent, at, "dns_nxdomain"),
        "replaced": Observation(agent, at, 200, "none", OTHER),
    }[kind]


sequences = st.lists(st.tuples(AGENTS, KIND), min_size=1, max_size=60)
SIMPLE_KIND = st.sampled_from(["present", "gone", "503", "timeout", "refused", "nx"])


def relative(seq: list[tuple[int, str]]) -> list[str]:
    """Each step as the verdict must see it: the first 2xx body is the baseline."""
    baseline = next((k for _, k in seq if k in ("present", "replaced")), None)
    out = []
    for _, kind in seq:
        if kind in ("present", "replaced"):
            out.append("present" if kind == baseline else "changed")
        else:
            out.append(kind)
    return out


class TestVerdictProperties:
    @given(sequences)
    @settings(max_examples=300)
    def test_inconclusive_results_never_change_state(self, seq: list[tuple[int, str]]) -> None:
        """Whatever came before, an inconclusive result changes nothing."""
        v = UrlVerdict(notified_at=0)
        for i, (agent, kind) in enumerate(seq):
            before = (v.state, v.first_removal, v.episode)
            v.observe(make(kind, agent, float(i)), POLICY)
            if kind in ("503", "timeout"):
                assert (v.state, v.first_removal, v.episode) == before
            if v.last_class is ProbeClass.INCONCLUSIVE:
                assert (v.state, v.first_removal, v.episode) == before

    @given(sequences)
    @settings(max_examples=300)
    def test_no_removal_while_any_agent_last_saw_present(self, seq: list[tuple[int, str]]) -> None:
        """The URL is never removed while some agent's latest conclusive result is present."""
        v = UrlVerdict(notified_at=0)
        for i, (agent, kind) in enumerate(seq):
            v.observe(make(kind, agent, float(i)), POLICY)
            if any(t.last_class is ProbeClass.PRESENT for t in v.agents.values()):
                assert v.state is not UrlState.REMOVED

    @given(sequences)
    @settings(max_examples=300)
    def test_removal_time_lies_between_last_present_and_first_removed(
        self, seq: list[tuple[int, str]]
    ) -> None:
        """Every confirmed removal lies after the last present and at a removed observation."""
        v = UrlVerdict(notified_at=0)
        removed_times: list[float] = []
        present_times: list[float] = []
        for i, ((agent, kind), seen) in enumerate(zip(seq, relative(seq), strict=True)):
            at = float(i)
            for event in v.observe(make(kind, agent, at), POLICY):
                if isinstance(event, Removal):
                    assert event.first_removed_at in removed_times
                    earlier_present = [t for t in present_times if t <= event.confirmed_at]
                    if earlier_present:
                        assert event.last_present_at == max(earlier_present)
                        assert event.last_present_at < event.first_removed_at
                    assert event.first_removed_at <= event.confirmed_at
            if seen == "present":
                present_times.append(at)
            elif seen in ("gone", "refused", "nx", "changed"):
                removed_times.append(at)

    @given(sequences)
    @settings(max_examples=300)
    def test_every_reappearance_opens_a_new_episode(self, seq: list[tuple[int, str]]) -> None:
        """Present after removed always increments the episode, and only then."""
        v = UrlVerdict(notified_at=0)
        for i, ((agent, kind), seen) in enumerate(zip(seq, relative(seq), strict=True)):
            was_removed = v.state is UrlState.REMOVED
            episode = v.episode
            events = v.observe(make(kind, agent, float(i)), POLICY)
            if was_removed and seen == "present":
                assert v.episode == episode + 1
                assert any(isinstance(e, Reappearance) for e in events)
            else:
                assert v.episode == episode

    @given(st.lists(SIMPLE_KIND, min_size=1, max_size=40))
    def test_single_agent_confirms_after_k_consecutive(self, kinds: list[str]) -> None:
        """With one agent, removal happens once k removed results follow the last present."""
        v = UrlVerdict(notified_at=0)
        run = 0
        for i, kind in enumerate(kinds):
            v.observe(make(kind, 1, float(i)), POLICY)
            if kind == "present":
                run = 0
            elif kind in ("gone", "refused", "nx"):
                run += 1
            if run >= POLICY.confirmations:
                assert v.state is UrlState.REMOVED
            elif kind == "present":
                assert v.state is UrlState.AVAILABLE
