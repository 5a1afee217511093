"""The pure fold, rule by rule (docs/METHOD.md); tests/test_simulator.py holds it to truth."""

from __future__ import annotations

import hashlib
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from collector.content import place
from collector.fold import (
    Method,
    Notice,
    Observation,
    OutOfOrder,
    Reappearance,
    Removal,
    Renotified,
    UrlFold,
    refold,
)
from collector.method import Policy, UrlState
from collector.schedule import Planner
from collector.store.codec import dump_fold, load_fold

INTERVAL = 10.0
PLANNER = Planner.fixed(INTERVAL)
CONTENT = hashlib.sha256(b"content").digest()
OTHER = hashlib.sha256(b"this file has been removed").digest()
BLOCK_PAGE = hashlib.sha256(b"blocked by your ISP").digest()
URL = "http://host.example/file"


def planned(now: float, s: UrlState, o: float, d: float | None, r: float | None) -> float:
    return PLANNER.interval(now, s, o, d, r) or PLANNER.watch_interval


def method(**policy: object) -> Method:
    return Method(Policy(**policy), planned)  # type: ignore[arg-type]


def ob(agent: int, at: float, status: int = 200, sha: bytes = CONTENT, **kw: object) -> Observation:
    """Agent `agent` (network n<agent>) probed at `at`."""
    body = sha if 200 <= status < 300 else b""
    fields: dict[str, object] = {"final_url": URL, "error": "none", **kw}
    return Observation(agent, f"n{agent}", at, status, sha256=body, **fields)  # type: ignore[arg-type]


def fold(observations: list[Observation], networks: int = 2, **policy: object) -> UrlFold:
    return refold([Notice(0.0)], observations, method(**policy), lambda _: networks)[0]


def events(observations: list[Observation], networks: int = 2) -> list[object]:
    return refold([Notice(0.0)], observations, method(), lambda _: networks)[1]


def probes(agent: int, start: float, stop: float, status: int = 200, sha: bytes = CONTENT,
           offset: float = 0.0, **kw: object) -> list[Observation]:  # fmt: skip
    """An agent probing every INTERVAL from `start` (inclusive) to `stop` (exclusive)."""
    out, t = [], start + offset
    while t < stop:
        out.append(ob(agent, t, status, sha, **kw))
        t += INTERVAL
    return out


class TestWitnesses:
    def test_blocked_first_agent_alone_never_removes(self) -> None:
        """451 to the only agent running, with two networks deployed: pending, not removed."""
        f = fold(probes(1, 0, 100, 451))
        assert f.state is UrlState.PENDING
        assert f.removal is None

    def test_blocked_network_neither_confirms_nor_dates(self) -> None:
        """Blocked for n1 from the start, then removed for n2 at 200: dated by n2 only."""
        obs = (
            probes(1, 0, 400, 451)
            + probes(2, 0, 200, offset=5)
            + probes(2, 200, 400, 404, offset=5)
        )
        f = fold(obs)
        assert f.state is UrlState.REMOVED
        assert f.removal is not None
        assert f.removal.last_present_at == 195 and f.removal.first_removed_at == 205
        assert f.removal.observed_present
        assert not any(isinstance(e, Reappearance) for e in events(obs))

    def test_geoblocked_while_a_witness_sees_it(self) -> None:
        """A confirmed run of removed results beside a live witness's present: geoblocked."""
        f = fold(probes(1, 0, 100, 451) + probes(2, 0, 100, offset=5))
        assert f.state is UrlState.GEOBLOCKED

    def test_every_live_witness_must_confirm(self) -> None:
        """One witness sees 404, the other still sees the content: not removed."""
        obs = probes(1, 0, 100) + probes(2, 0, 100, offset=5)
        obs += probes(1, 100, 300, 404) + probes(2, 100, 300, offset=5)
        assert fold(obs).state is UrlState.GEOBLOCKED

    def test_not_observed_present_needs_two_networks(self) -> None:
        """Gone before anyone saw it: removed only once two networks saw it removed, flagged."""
        assert fold(probes(1, 0, 100, 404)).state is UrlState.PENDING
        f = fold(probes(1, 0, 100, 404) + probes(2, 50, 100, 410, offset=1))
        assert f.state is UrlState.REMOVED
        assert f.removal is not None and not f.removal.observed_present
        assert f.removal.first_removed_at == 0

    def test_single_network_deployment_needs_only_it(self) -> None:
        """With one network deployed, that network alone decides."""
        f = fold(probes(1, 0, 100, 200) + probes(1, 100, 200, 404), networks=1)
        assert f.state is UrlState.REMOVED


class TestLiveness:
    def test_dead_witness_does_not_hold_the_content_online(self) -> None:
        """n1 dies at 100; n2 sees 404 from 150: removed once n1 has been silent long enough."""
        obs = probes(1, 0, 100) + probes(2, 0, 150, offset=5) + probes(2, 150, 400, 404, offset=5)
        f = fold(obs)
        assert f.state is UrlState.REMOVED
        assert f.removal is not None and f.removal.first_removed_at == 155
        horizon = method().policy.horizon(INTERVAL)
        assert f.removal.confirmed_at > 90 + horizon

    def test_all_witnesses_silent_holds_the_state_and_is_stale(self) -> None:
        """Both witnesses stop while it is online: still available, and stale after the horizon."""
        f = fold(probes(1, 0, 100) + probes(2, 0, 100, offset=5))
        assert f.state is UrlState.AVAILABLE
        assert f.live_until is not None
        assert not f.stale(f.live_until) and f.stale(f.live_until + 1)

    def test_only_silent_blocked_network_left_does_not_remove(self) -> None:
        """The only witness goes quiet; the blocked network's 451s never make a removal."""
        f = fold(probes(1, 0, 2000, 451) + probes(2, 0, 100, offset=5))
        assert f.state is UrlState.GEOBLOCKED

    def test_stretched_interval_keeps_an_agent_live(self) -> None:
        """An agent probing every 60 s (rate cap) against a plan of 10 s stays a live witness."""
        obs = probes(1, 0, 100) + [ob(2, t) for t in range(0, 600, 60)]
        obs += probes(1, 100, 600, 404)
        assert fold(obs).state is UrlState.GEOBLOCKED

    def test_liveness_must_exceed_the_interval(self) -> None:
        """A liveness horizon of at most one interval is refused."""
        with pytest.raises(ValueError, match="longer than the planned interval"):
            Policy(liveness_intervals=1.0)


class TestContent:
    def test_dynamic_page_replaced_by_stable_page(self) -> None:
        """Fresh bodies on every load, then one repeating body from 300: removed, dated 300."""
        rng = random.Random(1)
        obs = []
        for t in range(0, 600, 10):
            for agent, off in ((1, 0), (2, 5)):
                body = OTHER if t >= 300 else rng.randbytes(32)
                obs.append(ob(agent, t + off, 200, body))
        f = fold(obs)
        assert f.content.dynamic
        assert f.state is UrlState.REMOVED
        # The first sighting of the stable page looked like one more fresh body; its repeat
        # takes that present back, so the removal is dated by the first sighting.
        assert f.removal is not None and f.removal.first_removed_at == 300
        assert f.removal.last_present_at == 295

    def test_cached_renders_of_a_dynamic_page_are_not_a_removal(self) -> None:
        """Two identical renders (a cache), then bodies that never repeat: dynamic, online."""
        rng = random.Random(2)
        obs = [ob(1, 0, 200, CONTENT), ob(2, 5, 200, CONTENT)]
        obs += [ob(a, t + a, 200, rng.randbytes(32)) for t in range(10, 300, 10) for a in (1, 2)]
        f = fold(obs)
        assert f.state is UrlState.AVAILABLE
        assert f.removal is None

    def test_block_page_of_another_network_does_not_hide_a_dynamic_page(self) -> None:
        """n1 gets its ISP's 200 block page again and again at the URL, n2 a fresh body on
        every load: the page is dynamic, n1 blocked, and n2's 404s are a removal (F4)."""
        rng = random.Random(4)
        obs = probes(1, 0, 400, 200, BLOCK_PAGE)
        obs += [ob(2, t + 5, 200, rng.randbytes(32)) for t in range(0, 200, 10)]
        assert fold(obs).state is UrlState.GEOBLOCKED
        f = fold(obs + probes(2, 200, 400, 404, offset=5))
        assert f.content.dynamic and not f.tracks[1].witness
        assert f.state is UrlState.REMOVED and f.removal is not None
        assert f.removal.last_present_at == 195 and f.removal.first_removed_at == 205

    def test_network_served_one_body_is_no_witness_of_a_dynamic_page(self) -> None:
        """A block page among the first bodies (before n2's loads differ) is left out when the
        page is found dynamic: n1 never witnesses through it, so it never confirms alone."""
        rng = random.Random(5)
        obs = [ob(1, 0, 200, BLOCK_PAGE), ob(2, 1, 200, rng.randbytes(32))]
        obs += [ob(2, 5, 200, rng.randbytes(32)), *probes(1, 10, 600, 200, BLOCK_PAGE)]
        obs += [ob(2, t + 1, 200, rng.randbytes(32)) for t in range(10, 200, 10)]
        f = fold(obs)  # n2, the only witness, is silent from 191 on
        assert f.content.dynamic and not f.tracks[1].witness
        assert f.state is UrlState.GEOBLOCKED and f.removal is None

    def test_late_network_block_page_on_a_dynamic_page_neither_dates_nor_confirms(self) -> None:
        """n2 joins a dynamic page with its block page: the first load holds the URL online,
        the repeat shows n2 never saw the content. The block page stays known past
        MAX_VARIANTS fresh loads, and the removal is dated by n1 alone."""
        rng = random.Random(6)
        n1 = [ob(1, t, 200, rng.randbytes(32)) for t in range(0, 300, 10)]
        n2 = probes(2, 105, 600, 200, BLOCK_PAGE)
        f = fold(n1 + n2)  # n1 silent from 290 on: the block page confirms nothing
        # Never forgotten among n1's one-off bodies: n2's run of block pages is unbroken.
        assert not f.tracks[2].witness and f.tracks[2].run_first_at == 105
        assert f.state is UrlState.GEOBLOCKED and f.removal is None
        f = fold(n1 + n2 + probes(1, 300, 600, 404))
        assert f.removal is not None
        assert f.removal.last_present_at == 290 and f.removal.first_removed_at == 300

    def test_block_page_first_seen_during_a_removal_dates_nothing(self) -> None:
        """n2's first load, a block page, comes between n1's 404s: it holds the URL online
        (available, no geoblock), and once it repeats the removal keeps n1's dates."""
        rng = random.Random(7)
        n1 = [ob(1, t, 200, rng.randbytes(32)) for t in range(0, 200, 10)]
        n1 += probes(1, 200, 300, 404)
        obs = [*n1, ob(2, 207, 200, BLOCK_PAGE)]
        assert fold([o for o in obs if o.at <= 210]).state is UrlState.AVAILABLE
        f = fold(obs + probes(2, 217, 300, 200, BLOCK_PAGE))
        assert f.state is UrlState.REMOVED and f.removal is not None
        assert f.removal.last_present_at == 190 and f.removal.first_removed_at == 200
        assert f.removal.confirmed_at == 217

    def test_first_fresh_body_after_removal_evidence_is_still_a_present(self) -> None:
        """n1 sees 404 from 200, but n2's first load at 205 is a fresh body (a CDN edge not yet
        purged) and its next a 404: the content was served at 205, so it went after that."""
        rng = random.Random(9)
        obs = [ob(1, t, 200, rng.randbytes(32)) for t in range(0, 200, 10)]
        obs += [*probes(1, 200, 300, 404), ob(2, 205, 200, rng.randbytes(32))]
        f = fold(obs + probes(2, 215, 300, 404))
        assert f.removal is not None and f.removal.last_present_at == 205
        assert 205 < f.removal.first_removed_at <= 215
        # Gone silent after that one load, its present still stands: dated no earlier than
        # the confirmation.
        f = fold(obs)
        assert f.removal is not None and f.removal.last_present_at == 205
        assert f.removal.first_removed_at == f.removal.confirmed_at

    def test_replacement_first_loaded_by_a_new_agent_is_no_present(self) -> None:
        """n2's first load (195) is the stable page that replaced a dynamic page; n1 loads it
        next: the repeat takes n2's provisional present back, and the removal is dated by the
        page's first sighting without waiting for n2."""
        rng = random.Random(10)
        obs = [ob(1, t, 200, rng.randbytes(32)) for t in range(0, 200, 10)]
        obs += [ob(2, 195, 200, OTHER), *probes(1, 200, 300, 200, OTHER)]
        f = fold(obs)
        assert not f.tracks[2].witness
        assert f.removal is not None and f.removal.last_present_at == 190
        assert f.removal.first_removed_at == 195 and f.removal.confirmed_at == 210

    def test_block_page_of_an_agent_silent_across_the_removal_is_no_reappearance(self) -> None:
        """n2 loads its block page once, falls silent, and is back after the removal with it
        (forgotten among n1's one-off bodies): its old provisional present and the new load
        are not two fresh bodies in a row."""
        rng = random.Random(8)
        obs = [ob(1, t, 200, rng.randbytes(32)) for t in range(0, 400, 10)]
        obs += [ob(2, 105, 200, BLOCK_PAGE), *probes(1, 400, 600, 404)]
        obs += probes(2, 505, 600, 200, BLOCK_PAGE)
        f, evs = refold([Notice(0.0)], obs, method(), lambda _: 2)
        assert f.state is UrlState.REMOVED and f.episode == 1
        assert not any(isinstance(e, Reappearance) for e in evs)

    def test_isp_block_page_never_becomes_the_content(self) -> None:
        """A 200 block page seen by n1 only, the content by n2 and n3: the content is baseline."""
        obs = probes(1, 0, 100, 200, BLOCK_PAGE) + probes(2, 0, 100, 200, CONTENT, offset=1)
        obs += probes(3, 0, 100, 200, CONTENT, offset=2)
        f = fold(obs, networks=3)
        assert f.content.baseline == CONTENT
        assert f.state is UrlState.GEOBLOCKED  # n1's stable block page: blocked there

    def test_agreement_counts_earlier_sightings_as_present(self) -> None:
        """The first sighting becomes a present once a second network agrees on the hash."""
        f = fold([ob(1, 0), ob(2, 7)])
        assert f.state is UrlState.AVAILABLE
        assert f.tracks[1].witness and f.tracks[1].last_present_at == 0

    def test_truncated_body_is_never_compared_with_a_reference(self) -> None:
        """A video cut at the byte cap differs from the hotline's hash: undecided, flagged."""
        notice = Notice(0.0, sha256=CONTENT)
        obs = [ob(a, t + a, 200, OTHER, truncated=True) for t in range(0, 300, 10) for a in (1, 2)]
        f, _ = refold([notice], obs, method(), lambda _: 2)
        assert f.state is UrlState.PENDING
        assert f.truncated_vs_reference == len(obs)

    def test_redirect_to_https_or_tracking_query_is_not_a_move(self) -> None:
        """Scheme and query are not part of where a URL points; host and path are."""
        assert place("http://Host.example/file") == place("https://host.example/file?utm=1")
        assert place("http://host.example/file") != place("http://host.example/removed")
        assert place("http://host.example:8080/f") != place("http://host.example/f")

    def test_redirect_away_is_removed(self) -> None:
        """A 200 that ends at another path after the content was seen: removed."""
        obs = probes(1, 0, 100) + probes(2, 0, 100, offset=5)
        moved = "http://host.example/gone"
        obs += probes(1, 100, 200, final_url=moved, sha=OTHER)
        obs += probes(2, 100, 200, final_url=moved, sha=OTHER, offset=5)
        assert fold(obs).state is UrlState.REMOVED


class TestEventTime:
    def test_order_of_delivery_does_not_matter(self) -> None:
        """A refold of shuffled inputs gives exactly the verdict of the sorted ones."""
        obs = probes(1, 0, 200) + probes(2, 0, 200, offset=5) + probes(1, 200, 400, 404)
        obs += probes(2, 200, 400, 404, offset=5)
        shuffled = obs[:]
        random.Random(3).shuffle(shuffled)
        assert fold(shuffled) == fold(obs)

    def test_late_old_present_narrows_the_interval_without_an_episode(self) -> None:
        """n2's spool, delivered after the removal, shows it present until 195: no reappearance."""
        n1 = probes(1, 0, 200) + probes(1, 200, 400, 404)
        n2 = probes(2, 0, 198, offset=7)
        f, evs = refold([Notice(0.0)], n1 + n2, method(), lambda _: 2)
        assert f.removal is not None and f.removal.last_present_at == 197
        assert f.episode == 1
        assert not any(isinstance(e, Reappearance) for e in evs)

    def test_out_of_order_input_is_refused(self) -> None:
        """An incremental fold refuses an input older than one it folded."""
        f = UrlFold.start(Notice(0.0), method())
        f.observe(ob(1, 50), 2)
        with pytest.raises(OutOfOrder):
            f.observe(ob(2, 40), 2)


class TestEpisodes:
    def test_reappearance_opens_an_episode_from_its_time(self) -> None:
        """Removed, then the content back at 500: episode 2 opened at 500."""
        obs = probes(1, 0, 100) + probes(2, 0, 100, offset=5)
        obs += probes(1, 100, 500, 404) + probes(2, 100, 500, 404, offset=5)
        obs += probes(1, 500, 600) + probes(2, 500, 600, offset=5)
        f, evs = refold([Notice(0.0)], obs, method(), lambda _: 2)
        assert f.episode == 2 and f.opened_at == 500 and f.reappearances == 1
        assert f.first_removal is not None and f.first_removal.episode == 1
        assert [e.at for e in evs if isinstance(e, Reappearance)] == [500]

    def test_new_notice_for_removed_content_opens_an_episode(self) -> None:
        """A report after the removal opens episode 2 from the notice, pending again."""
        obs = probes(1, 0, 100) + probes(2, 0, 100, offset=5)
        obs += probes(1, 100, 300, 404) + probes(2, 100, 300, 404, offset=5)
        f, evs = refold([Notice(0.0), Notice(1000.0)], obs, method(), lambda _: 2)
        assert f.episode == 2 and f.opened_at == 1000 and f.state is UrlState.PENDING
        assert any(isinstance(e, Renotified) for e in evs)
        assert f.first_removal is not None and f.first_removal.latency == 100


statuses = st.sampled_from([200, 200, 200, 404, 410, 451, 503, 429])


@st.composite
def histories(draw: st.DrawFn) -> list[Observation]:
    n = draw(st.integers(1, 60))
    out = []
    for i in range(n):
        agent = draw(st.integers(1, 3))
        status = draw(statuses)
        sha = draw(st.sampled_from([CONTENT, CONTENT, OTHER, BLOCK_PAGE]))
        out.append(ob(agent, i * 3.0 + agent, status, sha))
    return out


class TestReplay:
    @settings(max_examples=150, deadline=None)
    @given(histories(), st.integers(0, 60))
    def test_state_survives_the_codec_mid_fold(self, obs: list[Observation], cut: int) -> None:
        """Fold part, store and load the state, fold the rest: the same as folding all at once."""
        m = method()
        whole = fold(obs, networks=3)
        head, tail = obs[:cut], obs[cut:]
        f = UrlFold.start(Notice(0.0), m)
        for o in head:
            f.observe(o, 3)
        f = load_fold(dump_fold(f), m)
        for o in tail:
            f.observe(o, 3)
        assert f == whole

    @settings(max_examples=150, deadline=None)
    @given(histories())
    def test_removal_interval_brackets_and_latency_matches(self, obs: list[Observation]) -> None:
        """Every removal: last present < first removed <= confirmation, latency not negative."""
        _, evs = refold([Notice(0.0)], obs, method(), lambda _: 3)
        for e in evs:
            if isinstance(e, Removal):
                assert e.first_removed_at <= e.confirmed_at
                if e.last_present_at is not None:
                    assert e.last_present_at < e.first_removed_at
                assert e.latency >= 0
