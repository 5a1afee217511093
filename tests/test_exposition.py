"""The hand-written text exposition (client/exposition.py, agent/metrics.py) against
prometheus_client's own `generate_latest`, byte for byte, on random families."""

from __future__ import annotations

from collections.abc import Iterator

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from agent.metrics import Family, counter, gauge, histogram, render
from client.exposition import label_value, sample_value

values = st.one_of(
    st.integers(0, 10**12).map(float),
    st.floats(allow_nan=True, allow_infinity=True),
)
texts = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)
names = st.from_regex(r"[a-z][a-z_]{0,12}", fullmatch=True)


@settings(max_examples=300)
@given(values)
def test_sample_values_are_spelled_as_prometheus_client_does(value: float) -> None:
    assert sample_value(value) == floatToGoString(value)  # type: ignore[no-untyped-call]


# The strategies `families` draws from, built once. Built inside the draw, those Hypothesis
# cannot cache (a filter or a uniqueness by a new lambda, a sampled_from of a new list) were
# built and validated again at every example: most of the test's time.
kinds = st.sampled_from(["gauge", "counter", "histogram"])
label_names = st.sampled_from([None, "reason"])
bucket_counts = st.lists(st.integers(0, 1000), min_size=1, max_size=4)
labelled_values = st.lists(st.tuples(values, texts), max_size=3, unique_by=lambda p: p[1])


@st.composite
def families(draw: st.DrawFn) -> list[tuple[Family, Metric]]:
    """Agent families and the prometheus_client families they stand for."""
    out: list[tuple[Family, Metric]] = []
    n = draw(st.integers(1, 5))
    for name in draw(st.lists(names, min_size=n, max_size=n, unique=True)):
        help_text = draw(texts)
        kind = draw(kinds)
        if kind == "histogram":
            counts = sorted(draw(bucket_counts))
            bounds = sorted(set(draw(st.lists(st.floats(0.001, 1e6), min_size=len(counts),
                                              max_size=len(counts)))))  # fmt: skip
            buckets = [(sample_value(b), float(c)) for b, c in zip(bounds, counts, strict=False)]
            buckets.append(("+Inf", float(counts[-1])))
            total = draw(st.floats(0, 1e9))
            mine = histogram(name, help_text, buckets, total)
            theirs: Metric = HistogramMetricFamily(
                name, help_text, buckets=[(b, c) for b, c in buckets], sum_value=total
            )
        else:
            mine = (gauge if kind == "gauge" else counter)(name, help_text)
            make = GaugeMetricFamily if kind == "gauge" else CounterMetricFamily
            label = draw(label_names)
            theirs = make(name, help_text, labels=[label] if label else None)
            for value, text in draw(labelled_values):
                if kind == "counter" and not value >= 0:
                    continue
                if label:
                    mine.add(value, ((label, text),))
                    theirs.add_metric([text], value)  # type: ignore[attr-defined]
                elif not mine.samples:
                    mine.add(value)
                    theirs.add_metric([], value)  # type: ignore[attr-defined]
        out.append((mine, theirs))
    return out


class _Fixed(Collector):
    def __init__(self, metrics: list[Metric]) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        yield from self.metrics


@settings(max_examples=300, deadline=None)
@given(families())
def test_agent_rendering_is_what_prometheus_client_writes(
    pairs: list[tuple[Family, Metric]],
) -> None:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed([theirs for _, theirs in pairs]))
    assert render(mine for mine, _ in pairs) == generate_latest(registry)


def test_label_values_are_escaped() -> None:
    assert label_value('a"b\\c\nd') == 'a\\"b\\\\c\\nd'
