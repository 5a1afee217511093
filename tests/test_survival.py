"""Tests for the Kaplan-Meier estimator of time-to-removal."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from collector.survival import SurvivalCurve, kaplan_meier, turnbull

durations_st = st.integers(min_value=0, max_value=50).map(float)
samples = st.lists(st.tuples(durations_st, st.booleans()), max_size=40)
times_st = st.floats(min_value=-1.0, max_value=60.0, allow_nan=False)


def curve_of(sample: list[tuple[float, bool]]) -> SurvivalCurve:
    return kaplan_meier([d for d, _ in sample], [r for _, r in sample])


class TestKaplanMeier:
    def test_hand_computed_example(self) -> None:
        """Durations 1,2,2+,3,4+,5 (+ = censored) give S = 5/6, 2/3, 4/9, 0.

        t=1: 6 at risk, 1 removed -> 5/6. t=2: 5 at risk (the URL censored at 2 still counts),
        1 removed -> 5/6 * 4/5 = 2/3. t=3: 3 at risk, 1 removed -> 2/3 * 2/3 = 4/9.
        t=4: censored, no drop. t=5: 1 at risk, 1 removed -> 0.
        """
        curve = kaplan_meier([1, 2, 2, 3, 4, 5], [True, True, False, True, False, True])
        assert curve.times == (1.0, 2.0, 3.0, 5.0)
        assert curve.survival == pytest.approx((5 / 6, 2 / 3, 4 / 9, 0.0))
        assert curve.n == 6
        assert curve.events == 4
        assert curve.survival_at(0.5) == 1.0
        assert curve.survival_at(1.0) == pytest.approx(5 / 6)
        assert curve.survival_at(4.5) == pytest.approx(4 / 9)
        assert curve.removed_share_by(2.5) == pytest.approx(1 / 3)
        assert curve.quantile(0.3) == 2.0
        assert curve.median() == 3.0
        assert curve.quantile(1.0) == 5.0

    def test_no_censoring_matches_empirical_cdf(self) -> None:
        """Without censoring S(t) is the share of durations greater than t."""
        data = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0]
        curve = kaplan_meier(data, [True] * len(data))
        for t in [0.0, 1.0, 1.5, 2.0, 4.0, 5.5, 9.0, 10.0]:
            assert curve.survival_at(t) == pytest.approx(sum(d > t for d in data) / len(data))

    def test_no_censoring_median_is_lower_median(self) -> None:
        """An even count gives the lower middle value: the smallest t with F(t) >= 0.5."""
        curve = kaplan_meier([10, 20, 30, 40], [True] * 4)
        assert curve.median() == 20.0

    def test_all_censored_never_drops(self) -> None:
        """A provider that removed nothing stays at S = 1 and has no median."""
        curve = kaplan_meier([5, 100, 86400], [False, False, False])
        assert curve.survival_at(1e9) == 1.0
        assert curve.median() is None
        assert curve.events == 0
        assert curve.n == 3

    def test_removal_before_censoring_at_same_time(self) -> None:
        """A URL censored at t is still at risk for a removal at t: S(2) = 1/2, not 0."""
        curve = kaplan_meier([2, 2], [True, False])
        assert curve.survival_at(2.0) == pytest.approx(0.5)

    def test_tied_removals_drop_together(self) -> None:
        """Two removals at the same time make one step of 2/n."""
        curve = kaplan_meier([3, 3, 7, 8], [True, True, False, True])
        assert curve.times == (3.0, 8.0)
        assert curve.survival == pytest.approx((0.5, 0.0))

    def test_censoring_keeps_slow_provider_slow(self) -> None:
        """One fast removal among many still-online URLs does not make the median fast."""
        curve = kaplan_meier([60] + [7 * 86400] * 9, [True] + [False] * 9)
        assert curve.median() is None
        assert curve.removed_share_by(86400) == pytest.approx(0.1)

    def test_empty_input(self) -> None:
        """No observations: n=0, S = 1 everywhere, no quantiles."""
        curve = kaplan_meier([], [])
        assert curve.n == 0
        assert curve.survival_at(0.0) == 1.0
        assert curve.quantile(0.1) is None
        assert curve.median() is None

    @pytest.mark.parametrize(
        ("durations", "removed", "needle"),
        [
            ([1.0, 2.0], [True], "length"),
            ([-1.0], [True], "index 0"),
            ([1.0, math.nan], [True, True], "index 1"),
            ([math.inf], [False], "finite"),
        ],
    )
    def test_rejects_bad_input(
        self, durations: list[float], removed: list[bool], needle: str
    ) -> None:
        """Mismatched lengths and negative, NaN or infinite durations raise ValueError naming it."""
        with pytest.raises(ValueError, match=needle):
            kaplan_meier(durations, removed)

    @pytest.mark.parametrize("q", [0.0, -0.1, 1.5, math.nan])
    def test_quantile_rejects_out_of_range(self, q: float) -> None:
        """A quantile outside (0, 1] is an error, not a silent None."""
        with pytest.raises(ValueError, match="quantile"):
            kaplan_meier([1.0], [True]).quantile(q)

    def test_late_censoring_changes_earlier_steps(self) -> None:
        """A URL censored after every removal is at risk at each: [1] + [2+] gives S(1) = 1/2."""
        assert kaplan_meier([1], [True]).survival_at(1.0) == 0.0
        assert kaplan_meier([1, 2], [True, False]).survival_at(1.0) == pytest.approx(0.5)


class TestKaplanMeierProperties:
    @given(samples, st.lists(times_st, min_size=2, max_size=10))
    def test_survival_non_increasing_and_bounded(
        self, sample: list[tuple[float, bool]], ts: list[float]
    ) -> None:
        """S(t) lies in [0, 1] and never rises as t grows."""
        curve = curve_of(sample)
        values = [curve.survival_at(t) for t in sorted(ts)]
        assert all(0.0 <= v <= 1.0 for v in values)
        assert all(a >= b for a, b in itertools.pairwise(values))

    @given(samples, times_st)
    def test_drops_only_at_event_times(self, sample: list[tuple[float, bool]], t: float) -> None:
        """S(t) equals S at the last removal time at or before t (1 if none)."""
        curve = curve_of(sample)
        event_times = [d for d, r in sample if r]
        assert set(curve.times) == set(event_times)
        earlier = [e for e in event_times if e <= t]
        expected = curve.survival_at(max(earlier)) if earlier else 1.0
        assert curve.survival_at(t) == expected

    @given(samples, st.floats(min_value=0.0, max_value=1.0, exclude_max=True))
    def test_early_censoring_changes_nothing(
        self, sample: list[tuple[float, bool]], fraction: float
    ) -> None:
        """A URL censored before every removal is never at risk at one, so S is unchanged."""
        first = min((d for d, r in sample if r), default=50.0)
        assume(first > 0)
        before = curve_of(sample)
        after = curve_of([*sample, (first * fraction, False)])
        assert after.times == before.times
        assert after.survival == pytest.approx(before.survival)

    @given(samples, st.floats(min_value=0.0, max_value=10.0))
    def test_late_censoring_keeps_steps_and_never_lowers_s(
        self, sample: list[tuple[float, bool]], beyond: float
    ) -> None:
        """A URL censored after every removal keeps the step times and can only raise S."""
        last = max((d for d, r in sample if r), default=0.0)
        before = curve_of(sample)
        after = curve_of([*sample, (last + beyond, False)])
        assert after.times == before.times
        assert all(a >= b for a, b in zip(after.survival, before.survival, strict=True))

    @given(st.lists(durations_st, min_size=1, max_size=60))
    def test_uncensored_median_is_lower_median(self, data: list[float]) -> None:
        """Without censoring the median is sorted(data)[(n - 1) // 2]."""
        curve = kaplan_meier(data, [True] * len(data))
        assert curve.median() == sorted(data)[(len(data) - 1) // 2]

    @given(st.lists(durations_st, min_size=1, max_size=60), st.floats(0.01, 1.0))
    def test_uncensored_quantile_matches_empirical(self, data: list[float], q: float) -> None:
        """Without censoring quantile(q) is the smallest observed t with F(t) >= q."""
        curve = kaplan_meier(data, [True] * len(data))
        n = len(data)
        expected = min(t for t in data if sum(d <= t for d in data) / n >= q - 1e-9)
        assert curve.quantile(q) == expected

    @given(samples)
    def test_all_censored_is_flat(self, sample: list[tuple[float, bool]]) -> None:
        """With every URL censored, S stays 1 and the median is None."""
        curve = curve_of([(d, False) for d, _ in sample])
        assert curve.survival_at(1e12) == 1.0
        assert curve.median() is None


class TestTurnbull:
    @settings(max_examples=100, deadline=None)
    @given(
        st.lists(
            st.tuples(st.floats(0, 1e5, allow_nan=False), st.booleans()), min_size=1, max_size=40
        )
    )
    def test_right_censored_data_gives_kaplan_meier(self, data: list[tuple[float, bool]]) -> None:
        """With exact and right-censored times only, the NPMLE is the KM estimate."""
        durations = [round(d) for d, _ in data]
        removed = [r for _, r in data]
        km = kaplan_meier(durations, removed)
        tb = turnbull(
            [(d, d) if r else (d, math.inf) for d, r in zip(durations, removed, strict=True)]
        )
        for t in sorted(set(durations)):
            assert tb.removed_share_by(t) == pytest.approx(km.removed_share_by(t), abs=1e-6)

    @settings(max_examples=100, deadline=None)
    @given(
        st.lists(
            st.tuples(st.integers(0, 1000), st.integers(1, 500), st.booleans()),
            min_size=1,
            max_size=30,
        )
    )
    def test_mass_and_allotment_add_up(self, data: list[tuple[int, int, bool]]) -> None:
        """Masses sum to 1, and each URL's band shares sum to 1 inside its own interval."""
        intervals = [(float(lo), float(lo + w) if done else math.inf) for lo, w, done in data]
        tb = turnbull(intervals)
        assert sum(tb.mass) == pytest.approx(1.0, abs=1e-6)
        bounds = [100.0, 500.0, 1000.0, math.inf]
        for lo, hi in intervals:
            if math.isfinite(hi):
                shares = tb.allot(lo, hi, bounds)
                assert sum(shares) == pytest.approx(1.0)
                assert all(s == 0 for s, b in zip(shares, [0.0, *bounds], strict=False) if b >= hi)

    def test_cadence_does_not_move_a_removal_across_a_band(self) -> None:
        """Removals at 50 min probed every 15 min: bands by interval keep them under 1 h."""
        # True removal at 50 min; probes at 45 and 60 min: interval (45 min, 60 min].
        tb = turnbull([(2700.0, 3600.0)] * 10)
        shares = tb.allot(2700.0, 3600.0, [3600.0, 43200.0, math.inf])
        assert shares[0] == pytest.approx(1.0)
        # Probes at 45 and 65 min: the interval straddles 1 h and splits by its length.
        tb = turnbull([(2700.0, 3900.0)])
        shares = tb.allot(2700.0, 3900.0, [3600.0, 43200.0, math.inf])
        assert shares[0] == pytest.approx(0.75) and shares[1] == pytest.approx(0.25)

    def test_bad_interval_is_refused(self) -> None:
        """An interval whose lower end is above its upper end names its index."""
        with pytest.raises(ValueError, match="index 1"):
            turnbull([(0.0, 1.0), (5.0, 2.0)])
