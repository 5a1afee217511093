"""Prometheus metrics computed from stored state at scrape time.

A custom collector reads the database on each scrape instead of mirroring
state into gauges, so every figure is right straight after a restart. Labels
are providers and agents, never URLs or report ids.

The per-provider figures scan every URL's state (about 200 ms for 100,000
URLs). With ``max_age`` > 0 a scrape is answered from the last scan while it is
younger than ``max_age``, and a scan older than half of that is replaced in the
background (stale-while-revalidate). The server also keeps the scan fresh
between scrapes (``refresh_forever``, from its start) and has the provider
families' text rendered with each scan (``provider_text``), so no scrape waits
for a scan once the first has landed, whatever the scrape interval, and a
scrape costs the agent families (read live) and a copy of that text.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from client.exposition import label_value, sample_value
from collector.durations import duration_label as deadline_label
from collector.method import METHOD_VERSION, UrlState
from collector.store import reads
from collector.store.shards import SHARDS
from collector.store.sql import READ_ERRORS, Connection

log = logging.getLogger(__name__)

DEFAULT_BUCKETS: tuple[float, ...] = (
    60, 300, 900, 1800, 3600, 2 * 3600, 4 * 3600, 6 * 3600, 12 * 3600, 86400,
    2 * 86400, 4 * 86400, 7 * 86400, 14 * 86400, 30 * 86400,
)  # fmt: skip
DEFAULT_DEADLINES: tuple[float, ...] = (3600.0, 12 * 3600.0, 86400.0)


def _le(bound: float) -> str:
    return "+Inf" if math.isinf(bound) else repr(float(bound))


# The provider families, in the order `_urls` and `_latency` yield them: name, type, help.
_PROVIDER_FAMILIES = (
    ("takedown_urls", "gauge", "Reported URLs by attributed provider and state"),
    ("takedown_overdue_urls", "gauge",
     "URLs still online after notice + deadline; deadline=order: past a binding order"),
    ("takedown_reappearances", "counter", "Times removed content was seen present again"),
    ("takedown_stale_urls", "gauge",
     "Watched URLs on which no vantage point that could change the verdict is live"
     " (the state is held, not guessed)"),
    ("takedown_method_info", "gauge", "The measurement method the verdicts follow"),
    ("takedown_removal_latency_seconds", "histogram",
     "Time from notice to the first removed observation of a confirmed removal"),
)  # fmt: skip
_HELP = {name: text for name, _, text in _PROVIDER_FAMILIES}


class StateCollector(Collector):
    """Exports per-provider removal latency, URL states, overdue counts and agent health."""

    def __init__(
        self,
        db_path: Path | str,
        connected: Callable[[], dict[int, tuple[str, str]]],
        buckets: Sequence[float] = DEFAULT_BUCKETS,
        deadlines: Sequence[float] = DEFAULT_DEADLINES,
        clock: Callable[[], float] = time.time,
        order_deadline: float = 12 * 3600.0,
        max_age: float = 0.0,
        monotonic: Callable[[], float] = time.monotonic,
        prerendered: bool = False,
        shards: Callable[[], frozenset[int] | None] = lambda: None,
    ) -> None:
        self.order_deadline = order_deadline
        # The URL shards whose figures this collector exports (None: all): with several
        # collectors on PostgreSQL each exports those it folds, so sum() gives the totals.
        self.shards = shards
        self.db_path = db_path
        self.connected = connected
        self.buckets = sorted(buckets)
        self.deadlines = sorted(deadlines)
        self.clock = clock
        self.max_age = max_age
        self.monotonic = monotonic
        self._kept: tuple[float, list[reads.ProviderFigures]] | None = None
        self._scanning = threading.Lock()  # one scan at a time
        # With `prerendered`, collect() leaves the provider families out: the caller appends
        # provider_text(), rendered once per scan rather than at every scrape.
        self.prerendered = prerendered
        self._text: tuple[list[reads.ProviderFigures], bytes] | None = None
        self.scan_seconds = 0.0  # how long the last scan took (with its rendering)
        self._refreshing = False  # refresh_forever keeps the scan fresh: no scrape waits
        # Set once the first scan landed (or failed): the server opens /metrics after it, so
        # no scrape waits for a scan, not even the first after a start.
        self.first_scan = threading.Event()

    def describe(self) -> list[Metric]:
        return []

    def scan(self) -> list[reads.ProviderFigures]:
        """Read the per-provider figures now, and keep them for later scrapes. (A scrape
        racing the refresher's first scan waits for it, and is served that one.)"""
        waited = self._kept
        with self._scanning:
            kept = self._kept
            if self._refreshing and kept is not None and kept is not waited:
                return kept[1]
            return self._scan_holding_lock()

    def _scan_holding_lock(self) -> list[reads.ProviderFigures]:
        started = self.monotonic()
        conn = reads.connect_readonly(self.db_path)
        try:
            figures = reads.provider_figures(
                conn, self.deadlines, self.order_deadline, self.buckets, self.clock(),
                self.shards(),
            )  # fmt: skip
        finally:
            conn.close()
        if self.prerendered:
            self._text = (figures, self._render(figures))
        self._kept = (started, figures)
        self.scan_seconds = max(0.0, self.monotonic() - started)
        self.first_scan.set()
        return figures

    def _render(self, figures: Sequence[reads.ProviderFigures]) -> bytes:
        """The text exposition of the provider families, byte for byte what generate_latest
        writes for `_urls` and `_latency` (tests hold it to that), written directly: about
        28,000 samples at 1,000 providers, where prometheus_client's generic path takes a
        hundred milliseconds and holds the GIL meanwhile, delaying scrapes."""
        out: list[str] = []
        states = [st.value for st in UrlState]
        labels = [(f, label_value(f.provider)) for f in figures]
        deadlines = [(d, label_value(deadline_label(d))) for d in self.deadlines]
        go = sample_value
        for name, kind, help_text in _PROVIDER_FAMILIES:
            family = f"{name}_total" if kind == "counter" else name  # as the exposition names it
            out.append(f"# HELP {family} {help_text}\n# TYPE {family} {kind}\n")
            if family == "takedown_urls":
                out += [f'takedown_urls{{provider="{p}",state="{st}"}} {go(f.states[st])}\n'
                        for f, p in labels for st in states]  # fmt: skip
            elif family == "takedown_overdue_urls":
                for f, p in labels:
                    out += [f'takedown_overdue_urls{{deadline="{label}",provider="{p}"}}'
                            f" {go(f.overdue[d])}\n" for d, label in deadlines]  # fmt: skip
                    out.append(
                        f'takedown_overdue_urls{{deadline="order",provider="{p}"}}'
                        f" {go(f.order_overdue)}\n"
                    )
            elif family == "takedown_reappearances_total":
                out += [f'{family}{{provider="{p}"}} {go(f.reappearances)}\n' for f, p in labels]
            elif family == "takedown_stale_urls":
                out += [f'{family}{{provider="{p}"}} {go(f.stale)}\n' for f, p in labels]
            elif family == "takedown_method_info":
                out.append(f'{family}{{method="{label_value(METHOD_VERSION)}"}} 1.0\n')
            else:
                bounds = [_le(b) for b in self.buckets]
                for f, p in labels:
                    if f.latency is None:
                        continue
                    cumulative, count, total = f.latency
                    out += [f'{family}_bucket{{le="{le}",provider="{p}"}} {go(c)}\n'
                            for le, c in zip(bounds, cumulative, strict=True)]  # fmt: skip
                    out.append(f'{family}_bucket{{le="+Inf",provider="{p}"}} {go(count)}\n')
                    out.append(f'{family}_count{{provider="{p}"}} {go(count)}\n')
                    out.append(f'{family}_sum{{provider="{p}"}} {go(total)}\n')
        return "".join(out).encode()

    def provider_text(self) -> bytes:
        """The provider families' text for a scrape (see `figures` for how fresh)."""
        figures = self.figures()
        text = self._text
        if text is None or text[0] is not figures:
            text = (figures, self._render(figures))
            self._text = text
        return text[1]

    def refresh_forever(self, stop: threading.Event) -> None:
        """Keep the kept scan fresh between scrapes, for a thread of its own until `stop`:
        a scan when the kept one is past half of `max_age`, at most one in five seconds of
        scanning (a scan of a million URLs takes seconds: the figures then age more)."""
        self._refreshing = True
        while not stop.is_set():
            kept = self._kept
            due = kept is None or self.monotonic() - kept[0] > self.max_age / 2
            if due and self._scanning.acquire(blocking=False):
                self._rescan()  # releases the lock
            pause = max(self.max_age / 4, 4 * self.scan_seconds)
            stop.wait(pause)

    def _rescan(self) -> None:
        """A background scan; the scrape that started it took the lock for it."""
        try:
            self._scan_holding_lock()
        except READ_ERRORS as exc:
            log.error("metrics_scan_failed error=%s", exc)
        finally:
            self._scanning.release()
            self.first_scan.set()

    def figures(self) -> list[reads.ProviderFigures]:
        """The figures a scrape shows: a new scan without max_age, before the first has
        landed, or (unless `refresh_forever` runs) past max_age; else the kept ones, replaced
        in the background past half of max_age (by the refresher, if one runs)."""
        kept = self._kept
        if self.max_age <= 0 or kept is None:
            return self.scan()
        age = self.monotonic() - kept[0]
        if age > self.max_age and not self._refreshing:
            return self.scan()
        # Taken here, released by the scan: scrapes racing in before it starts start no other.
        # With a refresher, scans are its own (scrapes would scan at their own pace).
        stale = age > self.max_age / 2 and not self._refreshing
        if stale and self._scanning.acquire(blocking=False):
            threading.Thread(target=self._rescan, name="metrics-scan", daemon=True).start()
        return kept[1]

    def collect(self) -> Iterator[Metric]:
        if not self.prerendered:
            figures = self.figures()
            yield from self._urls(figures)
            yield from self._latency(figures)
        held = self.shards()
        if held is not None:  # several collectors on PostgreSQL (collector/store/shards.py)
            yield GaugeMetricFamily(
                "takedown_collector_shards_held",
                f"URL shards (of {SHARDS}) whose verdicts this collector folds and exports",
                value=len(held),
            )
        conn = reads.connect_readonly(self.db_path)
        try:
            yield from self._agents(conn)
        finally:
            conn.close()

    def _urls(self, figures: Sequence[reads.ProviderFigures]) -> Iterator[Metric]:
        urls = GaugeMetricFamily(
            "takedown_urls", _HELP["takedown_urls"], labels=["provider", "state"]
        )
        for f in figures:
            for state in UrlState:
                urls.add_metric([f.provider, state.value], f.states[state.value])
        yield urls
        overdue = GaugeMetricFamily(
            "takedown_overdue_urls", _HELP["takedown_overdue_urls"], labels=["provider", "deadline"]
        )
        for f in figures:
            for d in self.deadlines:
                overdue.add_metric([f.provider, deadline_label(d)], f.overdue[d])
            overdue.add_metric([f.provider, "order"], f.order_overdue)
        yield overdue
        reappeared = CounterMetricFamily(
            "takedown_reappearances", _HELP["takedown_reappearances"], labels=["provider"]
        )
        for f in figures:
            reappeared.add_metric([f.provider], f.reappearances)
        yield reappeared
        stale = GaugeMetricFamily(
            "takedown_stale_urls", _HELP["takedown_stale_urls"], labels=["provider"]
        )
        for f in figures:
            stale.add_metric([f.provider], f.stale)
        yield stale
        info = GaugeMetricFamily(
            "takedown_method_info", _HELP["takedown_method_info"], labels=["method"]
        )
        info.add_metric([METHOD_VERSION], 1)
        yield info

    def _latency(self, figures: Sequence[reads.ProviderFigures]) -> Iterator[Metric]:
        family = HistogramMetricFamily(
            "takedown_removal_latency_seconds",
            _HELP["takedown_removal_latency_seconds"],
            labels=["provider"],
        )
        for f in figures:
            if f.latency is None:
                continue
            cumulative, count, total = f.latency
            points = [(_le(b), c) for b, c in zip(self.buckets, cumulative, strict=True)]
            points.append(("+Inf", count))
            family.add_metric([f.provider], points, total)
        yield family

    def _agents(self, conn: Connection) -> Iterator[Metric]:
        live = self.connected()
        agents = reads.agents(conn)
        up = GaugeMetricFamily(
            "takedown_agent_connected",
            "1 while the agent holds a stream to this collector",
            labels=["agent", "network"],
        )
        last = GaugeMetricFamily(
            "takedown_agent_last_result_timestamp_seconds",
            "Agent clock time of the newest stored result from the agent",
            labels=["agent"],
        )
        for a in agents:
            up.add_metric([a.name, a.network], 1 if a.id in live else 0)
            if a.last_result_at is not None:
                last.add_metric([a.name], a.last_result_at)
        offset = GaugeMetricFamily(
            "takedown_agent_clock_offset_seconds",
            "Estimated agent clock minus collector clock (from message times)",
            labels=["agent"],
        )
        for a in agents:
            if a.clock_offset is not None:
                offset.add_metric([a.name], a.clock_offset)
        yield up
        yield last
        yield offset
        results = CounterMetricFamily(
            "takedown_probe_results",
            "Probe results stored, by agent and class",
            labels=["agent", "class"],
        )
        for name, cls, n in reads.result_counts(conn):
            results.add_metric([name, cls], n)
        yield results
