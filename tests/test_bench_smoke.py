"""Smoke runs of every benchmark in bench/ with tiny parameters (loopback only, bounded)."""

from __future__ import annotations

import functools
import shutil

import pytest

import agent.main
from bench import __main__ as runner
from bench import agentmem, ingest, probe, scale, scrape, tails
from bench.common import percentile, require_loopback, table

pytestmark = [pytest.mark.slow, pytest.mark.integration]


@pytest.fixture
def loop_without_drain(monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe benchmark's whole-agent contender ("agent loop") has no collector (its address
    is closed), so when it is stopped, after its measurement, its drain of the spool can only
    time out: 10 s (`drain_timeout`) in each of the http and https modes. Its AgentConfig is
    built with no drain wait; probing and what is measured are unchanged."""
    monkeypatch.setattr(
        agent.main, "AgentConfig", functools.partial(agent.main.AgentConfig, drain_timeout=0.0)
    )


@pytest.mark.usefixtures("loop_without_drain")
def test_probe_agent_and_bare_loop() -> None:
    """The agent's Prober and the bare aiohttp loop fetch every page, in every mode."""
    report = probe.benchmark(probes=150, concurrency=8, seconds=20, blackbox=False)
    for mode in probe.MODES:
        for who in ("agent", "bare"):
            run = report.find(who, mode)
            assert run is not None
            assert run.probes == 150 and run.ok == 150, (who, mode)
            assert run.cpu > 0 and run.rate > 0
        assert "agent/bare probes/CPU-s" in report.ratios()[mode]
    assert "probe ratios" in report.text


@pytest.mark.skipif(
    shutil.which(probe.BLACKBOX) is None,
    reason="prometheus-blackbox-exporter is not installed (apt-get install -y"
    " prometheus-blackbox-exporter)",
)
def test_probe_blackbox_exporter() -> None:
    """blackbox_exporter probes the same pages successfully and its CPU is measured."""
    report = probe.benchmark(
        probes=100, concurrency=8, seconds=20, modes=("http", "https"), who=("agent", "blackbox")
    )
    for mode in ("http", "https"):
        run = report.find("blackbox", mode)
        assert run is not None and run.probes == 100 and run.ok == 100, mode
        assert run.cpu > 0
        assert "agent/blackbox probes/CPU-s" in report.ratios()[mode]


def test_ingest() -> None:
    """Every result sent is stored once, acknowledged and counted by /metrics."""
    report = ingest.benchmark(
        agents=2, results=4000, urls=500, batch_size=200, window=4, seconds=30
    )
    assert report.stored == 4000
    assert report.duplicates == 0 and report.rejected == 0
    assert report.metrics_results == 4000
    assert 0 < report.ack_p50 <= report.ack_p99
    assert report.collector_cpu > 0 and report.db_bytes > 0
    assert "results/s" in report.text


def test_ingest_on_postgresql_with_two_collectors() -> None:
    """Two collectors on one PostgreSQL database (a server of the bench's own, fsync on):
    every result stored once and folded (fold_queue empty), CPU counted for each collector
    and for the PostgreSQL server."""
    report = ingest.main(
        ["--db", "postgresql", "--collectors", "2", "--agents", "4", "--results", "4000",
         "--urls", "500", "--batch-size", "200", "--window", "4", "--seconds", "60"]
    )  # fmt: skip
    assert report.db == "postgresql"
    assert report.stored == report.result_rows == 4000
    assert report.duplicates == 0 and report.rejected == 0
    assert report.metrics_results == 4000
    assert report.queue_left == 0  # every result folded, half of them from fold_queue
    assert sorted(report.shards.values()) == [32, 32]
    assert 0 < report.ack_p50 <= report.ack_p99
    assert report.rate > 0 and report.wall >= report.wall_acked > 0
    assert [c.received for c in report.collectors] == [2000, 2000]
    assert all(c.cpu > 0 and c.rss > 0 for c in report.collectors)
    assert report.postgres_cpu > 0 and report.db_bytes > 0
    assert not [line for line in report.log_lines if "Traceback" in line], report.log_lines
    for figure in ("results/s (end to end)", "collector 1: CPU per 100k", "PostgreSQL CPU per"):
        assert figure in report.text


def test_scale() -> None:
    """Assignment, holding, reconciling and filling the verdict cache, small."""
    report = scale.benchmark(reports=3000, agents=3, changes=10, fill_urls=300, seconds=60)
    f = report.figures
    assert f["assign_upserts_each"] == 3000
    assert f["agent_urls"] == 3000
    assert f["reconcile_same_upserts"] == 0 and f["reconcile_same_buckets"] == 0
    assert f["reconcile_changed_buckets"] == 10  # ten consecutive new ids: ten buckets
    assert f["agent_urls_after"] == 3010
    assert f["fill_results"] == 3 * 300
    assert f["verdict_cache_urls"] == 300 and f["verdict_cache_per_url"] > 0
    assert f["tail_per_url"] > 1_000
    assert f["agent_rss"] > f["agent_rss_empty"] > 0
    assert "reconcile" in report.text


def test_scrape() -> None:
    """/metrics over HTTP names every provider; the in-process split is measured."""
    report = scrape.benchmark(providers=40, urls=800, scrapes=3, seconds=30, max_age=0.5)
    assert len(report.scrapes) == 3 and len(report.kept) == len(report.slow) == 3
    assert len(report.first) == 2
    assert report.samples > 40 * 20
    assert report.collect_s > 0
    assert "/metrics worst" in report.text


def test_helpers_and_runner(capsys: pytest.CaptureFixture[str]) -> None:
    assert require_loopback("127.0.0.5") == "127.0.0.5"
    with pytest.raises(ValueError, match="loopback"):
        require_loopback("192.0.2.1")
    assert percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.0
    assert percentile([], 99) == 0.0
    assert "n/a" in table("t", ["a", "b"], [["x", float("nan")]])
    assert runner.main(["--help"]) == 0
    assert runner.main(["nonsense"]) == 2
    assert "python -m bench" in capsys.readouterr().out


def test_agent_memory() -> None:
    """The real agent process is measured empty, holding, resumed and without a state dir."""
    report = agentmem.benchmark(urls=2000, seconds=60)
    f = report.figures
    assert f["spooled_rss"] > f["empty_rss"] > 0
    assert f["resumed_rss"] > 0 and f["memory_rss"] > 0
    assert f["spool_bytes"] > 0
    assert f["texts_bytes"] > 0 and f["tmp_names"] == 0  # the texts' file never has a name
    assert "B/URL" in report.text


def test_tails() -> None:
    report = tails.main(["--urls", "60", "--agents", "3", "--rounds", "10"])
    assert report.tail_bytes > 1_000  # a second fold and kept observations per URL, freed
    assert report.traced_per_url > 0
    assert "a tail, per URL" in report.text
