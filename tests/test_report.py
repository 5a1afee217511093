"""The provider table, its renderers, window comparison, the survival plot, and KM vs lifelines."""

from __future__ import annotations

import csv
import io
import json
import math
import random
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from collector.compare import compare_windows, render_comparison, windows
from collector.plot import PlotUnavailable, plot_survival
from collector.report import DAY, HOUR, ProviderRow, latency, provider_table, render
from collector.store.reads import UrlOutcome
from collector.survival import kaplan_meier

NOW = 1_800_000_000.0
OLD = NOW - 10 * DAY


def removed(provider: str, seconds: float, notified: float = OLD, **kw: object) -> UrlOutcome:
    """A URL whose first episode was removed `seconds` after its notice (probed just before)."""
    base = UrlOutcome(provider, 64500, "removed", notified, seconds, 1,
                      removal_first_removed_at=notified + seconds,
                      removal_last_present_at=notified + seconds)  # fmt: skip
    return replace(base, **kw)  # type: ignore[arg-type]


def online(provider: str, notified: float = OLD, **kw: object) -> UrlOutcome:
    """A URL still available, seen present at NOW."""
    base = UrlOutcome(provider, 64500, "available", notified, None, 1, last_conclusive_at=NOW)
    return replace(base, **kw)  # type: ignore[arg-type]


def rows_by_provider(rows: list[ProviderRow]) -> dict[str, ProviderRow]:
    return {r.provider: r for r in rows}


class TestProviderTable:
    def test_bands_are_disjoint_and_add_up_to_removed(self) -> None:
        """Latencies fall in ≤1h (inclusive), 1–12h, 12–24h, 24–48h, >48h; online URLs in none."""
        items = [removed("A", s) for s in (1800, HOUR, 5 * HOUR, 20 * HOUR, 30 * HOUR, 3 * DAY)]
        (row,) = provider_table([*items, online("A")], NOW)
        bands = (row.removed_1h, row.removed_1h_12h, row.removed_12h_24h, row.removed_24h_48h,
                 row.removed_over_48h)  # fmt: skip
        assert bands == (2, 1, 1, 1, 1)
        assert row.removed == 6 == sum(bands)
        assert row.online == 1 and row.urls == 7 and row.reports == 7

    def test_overdue_by_deadline_and_by_order(self) -> None:
        """Online past notice + deadline, or past order issue + its (or the default) deadline."""
        items = [
            online("A", NOW - 2 * DAY),  # past 24h
            online("A", NOW - HOUR, order_issued_at=NOW - 50 * 60, order_deadline=1800.0),
            online("A", NOW - HOUR, order_issued_at=NOW - 13 * HOUR),  # default 12h passed
            online("A", NOW - HOUR, order_issued_at=NOW - 11 * HOUR),  # default not yet
            online("A", NOW - HOUR),  # fresh
            removed("A", 3 * DAY, NOW - 5 * DAY),
            replace(online("A", NOW - 5 * DAY), state="pending"),
        ]
        (row,) = provider_table(items, NOW)
        assert row.overdue == 3
        (row,) = provider_table(items, NOW, order_deadline=14 * HOUR)
        assert row.overdue == 2
        (row,) = provider_table(items, NOW, deadline=30 * 60)
        assert row.overdue == 5

    def test_censoring_ranks_a_provider_that_keeps_content_online_last(self) -> None:
        """One fast removal and eleven URLs online for days rank below a provider that takes 3d."""
        hides = [removed("Hides", 600), *(online("Hides") for _ in range(11))]
        slow = [removed("Slow", 3 * DAY) for _ in range(12)]
        fast = [removed("Fast", HOUR) for _ in range(12)]
        rows = provider_table([*hides, *slow, *fast], NOW)
        assert [r.provider for r in rows] == ["Fast", "Slow", "Hides"]
        assert [r.rank for r in rows] == [1, 2, 3]
        by = rows_by_provider(rows)
        assert by["Hides"].median_latency_seconds is None
        assert by["Hides"].removed_within_24h == pytest.approx(1 / 12)
        assert by["Slow"].removed_within_24h == 0.0
        assert by["Fast"].median_latency_seconds == HOUR
        assert by["Fast"].p90_latency_seconds == HOUR

    def test_ties_in_median_are_broken_by_share_within_24h(self) -> None:
        """Equal medians: the provider removing more within 24h ranks first."""
        p = [removed("P", HOUR) for _ in range(6)] + [removed("P", 30 * HOUR) for _ in range(4)]
        q = [removed("Q", HOUR) for _ in range(6)] + [removed("Q", 10 * HOUR) for _ in range(4)]
        rows = provider_table([*p, *q], NOW)
        assert [(r.provider, r.rank) for r in rows] == [("Q", 1), ("P", 2)]
        assert rows[0].median_latency_seconds == rows[1].median_latency_seconds == HOUR

    def test_providers_under_min_reports_are_listed_unranked(self) -> None:
        """Ranking needs min_reports distinct URLs: many reports of one URL do not count."""
        big = [removed("Big", 3 * DAY) for _ in range(10)]
        small = [removed("Small", 60, reports=3) for _ in range(3)]
        one_url_many_reports = [removed("Busy", 2 * DAY, reports=10)]
        rows = provider_table([*small, *big, *one_url_many_reports], NOW)
        assert [(r.provider, r.rank) for r in rows] == [
            ("Big", 1), ("Busy", None), ("Small", None)
        ]  # fmt: skip
        rows = provider_table([*small, *big], NOW, min_reports=3)
        assert [(r.provider, r.rank) for r in rows] == [("Small", 1), ("Big", 2)]

    def test_cdn_and_unattributed_are_listed_never_ranked(self) -> None:
        """A CDN row and the unattributed row are listed but get no rank, however many URLs."""
        cdn = [removed("SomeCDN", HOUR, cdn=True) for _ in range(12)]
        nobody = [removed("unattributed", HOUR) for _ in range(12)]
        company = [removed("Company", DAY) for _ in range(12)]
        ranks = {r.provider: r.rank for r in provider_table([*cdn, *nobody, *company], NOW)}
        assert ranks == {"Company": 1, "SomeCDN": None, "unattributed": None}

    def test_pending_and_unseen_are_listed_not_estimated(self) -> None:
        """Pending URLs and removals nobody saw present count in columns, not in the KM."""
        items = [removed("A", DAY) for _ in range(4)]
        items += [replace(online("A"), state="pending", last_conclusive_at=None)] * 3
        items += [removed("A", 60, observed_present=False)] * 2
        (row,) = provider_table(items, NOW)
        assert (row.pending, row.not_observed_present, row.removed) == (3, 2, 6)
        assert row.median_latency_seconds == DAY  # the unseen fast ones do not pull it down

    def test_share_within_24h_needs_follow_up_to_24h(self) -> None:
        """Online URLs followed for 2 h and none removed: no 24 h share, not 0 %."""
        young = [online("A", NOW - 2 * HOUR) for _ in range(5)]
        (row,) = provider_table(young, NOW)
        assert row.removed_within_24h is None and row.removed_within_24h_interval is None
        (row,) = provider_table([*young, online("A")], NOW)
        assert row.removed_within_24h == 0.0

    def test_online_is_censored_at_its_last_conclusive_probe(self) -> None:
        """A URL last seen 3 d after notice (agents gone since) is censored at 3 d, not now."""
        items = [removed("A", 5 * DAY), online("A", last_conclusive_at=OLD + 3 * DAY)]
        (row,) = provider_table(items, NOW)
        # Censored at 3 d it is not at risk at 5 d, so the removal takes S to 0 (at its
        # current age of 10 d it would hold S at 0.5 and p90 would never be reached).
        assert row.p90_latency_seconds == 5 * DAY

    def test_latency_end_chooses_the_end_of_the_removal_interval(self) -> None:
        """last_present uses last present − notice, 0 when never seen present."""
        seen = removed("A", 2 * HOUR, removal_last_present_at=OLD + 1800)
        unseen = removed("A", 5 * HOUR, removal_last_present_at=None)
        assert latency(seen) == 2 * HOUR
        assert latency(seen, "last_present") == 1800
        assert latency(unseen, "last_present") == 0.0
        (upper,) = provider_table([seen, unseen], NOW)
        (lower,) = provider_table([seen, unseen], NOW, latency_end="last_present")
        # Bands use the whole interval whichever end the KM figures use.
        assert (upper.removed_1h, upper.removed_1h_12h) == (lower.removed_1h, lower.removed_1h_12h)
        assert upper.removed_1h + upper.removed_1h_12h == pytest.approx(2)
        assert upper.median_latency_seconds == 2 * HOUR
        assert lower.median_latency_seconds == 0.0
        with pytest.raises(ValueError, match="latency end"):
            provider_table([seen], NOW, latency_end="middle")

    def test_shares_asns_and_flags(self) -> None:
        """Share of all reports, every ASN seen, reappeared, nxdomain, geoblocked and pending."""
        items = [
            removed("A", HOUR, reports=2, reappearances=1, state="available"),
            removed("A", HOUR, asn=64510, removal_nxdomain=True),
            online("A", state="geoblocked"),
            replace(online("B", NOW - 60, asn=None), state="pending"),
        ]
        by = rows_by_provider(provider_table(items, NOW))
        a, b = by["A"], by["B"]
        assert a.report_share == pytest.approx(0.8) and b.report_share == pytest.approx(0.2)
        assert a.asn == "AS64500" and a.asns == ("AS64500", "AS64510")
        assert b.asn == "AS?" and b.asns == ("AS?",)
        assert (a.reappeared, a.nxdomain, a.geoblocked, a.online, a.removed) == (1, 1, 1, 2, 2)
        assert (b.pending, b.online, b.overdue) == (1, 0, 0)
        assert b.removed_within_24h is None and b.median_latency_seconds is None

    def test_empty_input_gives_no_rows(self) -> None:
        """No outcomes, no rows, and every renderer still works."""
        assert provider_table([], NOW) == []
        assert "no reports" in render([], "table")
        assert json.loads(render([], "json")) == []


def sample_rows() -> list[ProviderRow]:
    items = [removed("Fast, Inc.", HOUR) for _ in range(10)]
    items += [removed("Slow|Co", 3 * DAY, removal_nxdomain=True), online("Slow|Co")]
    return provider_table(items, NOW)


class TestRender:
    def test_csv_parses_back_with_every_field(self) -> None:
        """CSV has one column per field; None is empty, numbers parse back."""
        rows = sample_rows()
        records = list(csv.DictReader(io.StringIO(render(rows, "csv"))))
        assert [r["provider"] for r in records] == ["Fast, Inc.", "Slow|Co"]
        assert set(records[0]) == set(ProviderRow.__dataclass_fields__)
        assert float(records[0]["median_latency_seconds"]) == HOUR
        assert records[1]["p90_latency_seconds"] == "" and records[1]["rank"] == ""
        assert records[1]["asns"] == "AS64500"

    def test_json_is_seconds_and_fractions(self) -> None:
        """JSON keeps raw seconds and 0..1 shares, and the ASN list as a list."""
        data = json.loads(render(sample_rows(), "json"))
        assert data[0]["median_latency_seconds"] == HOUR
        assert data[0]["removed_within_24h"] == 1.0
        assert data[0]["report_share"] == pytest.approx(10 / 12)
        assert data[1]["asns"] == ["AS64500"] and data[1]["rank"] is None

    def test_markdown_has_a_header_separator_and_escapes_pipes(self) -> None:
        """A GitHub table: header, separator row, one row per provider, `|` escaped."""
        lines = render(sample_rows(), "markdown", min_reports=10).splitlines()
        assert lines[0].startswith("| provider | asn | from | reports |")
        assert lines[1].startswith("| --- | --- | --- | ---: |")
        assert lines[0].count("|") == lines[1].count("|") == lines[2].count("|")
        assert "Slow\\|Co" in lines[3]
        assert any("fewer than 10 distinct URLs" in line for line in lines)

    def test_table_is_aligned_with_human_durations_and_notes(self) -> None:
        """Text: the CLI's header words, human durations, percent, flags and a rank note."""
        text = render(sample_rows(), "table", min_reports=10)
        lines = text.splitlines()
        assert lines[0].split()[:7] == ["provider", "asn", "from", "reports", "urls", "removed",
                                        "online"]  # fmt: skip
        assert "median" in lines[0].split()
        assert len(lines[0]) == len(lines[1])
        assert "60m" in lines[2] and "100%" in lines[2]
        assert "3.0d" in lines[3] and "1!" in lines[3]
        assert "fewer than 10 distinct URLs" in text and "NXDOMAIN" in text

    def test_unknown_format_is_refused(self) -> None:
        """A format other than the four is a ValueError naming them."""
        with pytest.raises(ValueError, match="markdown"):
            render(sample_rows(), "xml")


class TestCompare:
    def test_previous_window_has_equal_length(self) -> None:
        """[since, until) and the window of equal length just before it; until defaults to now."""
        assert windows(100.0, 300.0, 1000.0) == ((100.0, 300.0), (-100.0, 100.0))
        assert windows(500.0, None, 1000.0) == ((500.0, 1000.0), (0.0, 500.0))
        with pytest.raises(ValueError, match="since"):
            windows(None, None, 1000.0)
        with pytest.raises(ValueError, match="empty"):
            windows(300.0, 100.0, 1000.0)

    def test_changes_per_provider(self) -> None:
        """Reports, median and ≤24h share now, before, and the change; one-sided providers too."""
        now_items = [removed("A", HOUR) for _ in range(4)] + [removed("C", 2 * HOUR)]
        then_items = [removed("A", 3 * DAY) for _ in range(2)] + [removed("B", HOUR)]
        rows = {r.provider: r for r in compare_windows(now_items, then_items, NOW)}
        a = rows["A"]
        assert (a.reports, a.reports_previous, a.reports_change) == (4, 2, 2)
        assert a.median_latency_seconds_change == HOUR - 3 * DAY
        assert a.removed_within_24h_change == pytest.approx(1.0)
        assert (rows["B"].reports, rows["B"].reports_previous) == (0, 1)
        assert rows["B"].median_latency_seconds_change is None
        assert rows["C"].removed_within_24h_previous is None

    def test_renders_in_all_formats(self) -> None:
        """table, csv, json and markdown show current, previous and change."""
        rows = compare_windows([removed("A", HOUR)], [removed("A", 2 * DAY)], NOW)
        cur, prev = windows(NOW - 7 * DAY, NOW, NOW)
        doc = json.loads(render_comparison(rows, "json", cur, prev))
        assert doc["providers"][0]["median_latency_seconds_previous"] == 2 * DAY
        assert doc["window"]["until"].endswith("Z")
        (record,) = csv.DictReader(io.StringIO(render_comparison(rows, "csv", cur, prev)))
        assert float(record["removed_within_24h_change"]) == 1.0
        text = render_comparison(rows, "table", cur, prev)
        assert "+100pp" in text and "-" in text.splitlines()[-1]
        md = render_comparison(rows, "markdown", cur, prev).splitlines()
        assert md[2].startswith("| provider |") and md[3].startswith("| --- | ---: |")


class TestPlot:
    def test_writes_a_png(self, tmp_path: Path) -> None:
        """A PNG with the top providers' curves is written; its size is plausible."""
        pytest.importorskip("matplotlib", reason="matplotlib (the plot extra) is not installed")
        rng = random.Random(7)
        data = {
            f"P{i}": [removed(f"P{i}", rng.uniform(0, 4 * DAY)) for _ in range(20)]
            + [online(f"P{i}", NOW - 60)]
            for i in range(10)
        }
        path = tmp_path / "km.png"
        drawn = plot_survival(data, path, NOW, top=8)
        assert len(drawn) == 8
        blob = path.read_bytes()
        assert blob[:8] == b"\x89PNG\r\n\x1a\n"
        assert 10_000 < len(blob) < 2_000_000

    def test_missing_matplotlib_is_a_clear_error(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Without matplotlib the error names the extra to install."""
        monkeypatch.setitem(sys.modules, "matplotlib", None)
        with pytest.raises(PlotUnavailable, match=r"takedown-monitor\[plot\]"):
            plot_survival({"A": [removed("A", HOUR)]}, tmp_path / "x.png", NOW)


class TestKaplanMeierAgainstLifelines:
    def test_random_censored_samples_agree(self) -> None:
        """Survival at every removal time within 1e-9, and the same median, on 400 samples."""
        lifelines = pytest.importorskip("lifelines", reason="lifelines is not installed")
        rng = random.Random(20240705)
        for case in range(400):
            n = rng.randint(1, 300)
            spread = rng.choice((5, 50, 10_000))
            durations = [float(rng.randint(0, spread)) for _ in range(n)]
            if case % 4 == 0:
                durations = [d + rng.random() for d in durations]
            p_removed = rng.choice((0.0, 0.2, 0.6, 1.0))
            events = [rng.random() < p_removed for _ in range(n)]
            curve = kaplan_meier(durations, events)
            kmf = lifelines.KaplanMeierFitter().fit(durations, events)
            if curve.times:
                theirs = kmf.survival_function_at_times(list(curve.times)).to_numpy()
                assert max(abs(a - b) for a, b in zip(curve.survival, theirs, strict=True)) < 1e-9
            expected = kmf.median_survival_time_
            mine = curve.median()
            if math.isinf(expected):
                assert mine is None, case
            elif mine != expected:
                # lifelines takes the first t with S(t) <= 0.5 exactly; ours tolerates rounding.
                assert mine is not None and abs(curve.survival_at(mine) - 0.5) < 1e-9, case
            else:
                assert mine == expected
