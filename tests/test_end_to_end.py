"""The whole flow on real components: hoster → agents → gRPC → SQLite → verdict → metrics/report."""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest

from collector.importer import import_file
from collector.report import provider_table
from collector.server import Collector
from collector.store.reads import (
    UrlStatus,
    connect_readonly,
    results_count,
    url_outcomes,
    url_statuses,
)
from demo.hoster import Fate, Hoster
from tests.conftest import HOST_A, HOST_B, AgentFactory, eventually, scrape
from tests.pg import postgres_dump
from tests.test_postgres import refolded_on_sqlite, verdicts

pytestmark = [pytest.mark.integration, pytest.mark.slow]

AGENT_2_SOURCE = "127.0.0.3"
PATHS_A = ["/a-404", "/a-replaced", "/a-online", "/a-geoblock", "/a-flaky"]
PATHS_B = ["/b-410", "/b-redirect", "/b-online"]
REMOVALS = {
    "/a-404": Fate.GONE_404,
    "/a-replaced": Fate.REPLACED,
    "/b-410": Fate.GONE_410,
    "/b-redirect": Fate.REDIRECT,
}
INTERVAL = 1.0
JITTER = 0.1
CONFIRMATIONS = 2


def url_of(hoster: Hoster, path: str) -> str:
    host = HOST_A if path.startswith("/a") else HOST_B
    return f"http://{host}:{hoster.port}{path}"


def statuses(db: Path) -> dict[str, UrlStatus]:
    conn = connect_readonly(db)
    try:
        return {s.url.rsplit("/", 1)[1]: s for s in url_statuses(conn)}
    finally:
        conn.close()


@pytest.mark.parametrize("collector", ["sqlite", "postgresql"], indirect=True)
async def test_removals_are_measured_per_provider(
    tmp_path: Path,
    collector: Collector,
    hoster: Hoster,
    agents: AgentFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Removals are measured within an interval + confirmation; geoblock and 503 are not removal."""
    caplog.set_level("DEBUG")
    for path in PATHS_A + PATHS_B:
        hoster.add(path, blocked_for=[AGENT_2_SOURCE] if path == "/a-geoblock" else [])
    notified = time.time()
    notified_iso = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(notified))
    csv_file = tmp_path / "reports.csv"
    csv_file.write_text(
        "url,notified_at,reference\n"
        + "".join(
            f"{url_of(hoster, p)},{notified_iso},case-{i}\n"
            for i, p in enumerate(PATHS_A + PATHS_B)
        )
    )
    notified = float(int(notified))
    out = io.StringIO()
    target = f"127.0.0.1:{collector.grpc_port}"
    assert await import_file(csv_file, target, out=out) == 0
    assert "accepted 8, already known 0, rejected 0" in out.getvalue()

    first = agents("agent-1", "net-one", "127.0.0.2")
    agents("agent-2", "net-two", AGENT_2_SOURCE)
    db = collector.config.db

    def all_seen() -> bool:
        s = statuses(db)
        expected = {k: "geoblocked" if k == "a-geoblock" else "available" for k in s}
        return len(s) == 8 and {k: v.state for k, v in s.items()} == expected

    await eventually(all_seen, 20, "every URL available, and the geoblocked one geoblocked")

    truth = {path: hoster.set_fate(path, fate) for path, fate in REMOVALS.items()}
    flaky_from = hoster.set_fate("/a-flaky", Fate.UNAVAILABLE_503)

    def removed() -> bool:
        s = statuses(db)
        return all(s[p.strip("/")].state == "removed" for p in REMOVALS)

    await eventually(removed, 30, "the four removals confirmed")

    def flaky_probed_enough() -> bool:
        conn = connect_readonly(db)
        try:
            flaky_id = statuses(db)["a-flaky"].url_id
            return all(
                results_count(conn, agent, flaky_id, since=flaky_from) >= CONFIRMATIONS + 1
                for agent in ("agent-1", "agent-2")
            )
        finally:
            conn.close()

    await eventually(flaky_probed_enough, 20, "several 503 results from both agents")

    final = statuses(db)
    tolerance = INTERVAL * (1 + JITTER) * CONFIRMATIONS + 1.0
    for path, changed_at in truth.items():
        status = final[path.strip("/")]
        first_removed = status.removal_first_removed_at
        assert changed_at <= first_removed <= changed_at + tolerance, path
        latency = status.removal_latency
        assert abs(latency - (changed_at - notified)) <= tolerance, path
    assert final["a-online"].state == "available"
    assert final["b-online"].state == "available"
    assert final["a-geoblock"].state == "geoblocked"
    assert final["a-flaky"].state == "available"
    assert {final[p.strip("/")].provider for p in PATHS_A} == {"Hoster A"}
    assert {final[p.strip("/")].provider for p in PATHS_B} == {"Hoster B"}

    metrics = await scrape(collector.metrics_port)
    counts = {
        s.labels["provider"]: s.value for s in metrics["takedown_removal_latency_seconds_count"]
    }
    assert counts == {"Hoster A": 2, "Hoster B": 2}
    sums = {s.labels["provider"]: s.value for s in metrics["takedown_removal_latency_seconds_sum"]}
    for provider, paths in (
        ("Hoster A", ["/a-404", "/a-replaced"]),
        ("Hoster B", ["/b-410", "/b-redirect"]),
    ):
        true_sum = sum(truth[p] - notified for p in paths)
        assert abs(sums[provider] - true_sum) <= 2 * tolerance
    urls = {(s.labels["provider"], s.labels["state"]): s.value for s in metrics["takedown_urls"]}
    assert urls[("Hoster A", "removed")] == 2
    assert urls[("Hoster A", "available")] == 2
    assert urls[("Hoster A", "geoblocked")] == 1
    assert urls[("Hoster B", "removed")] == 2
    assert urls[("Hoster B", "available")] == 1
    connected = {s.labels["agent"]: s.value for s in metrics["takedown_agent_connected"]}
    assert connected == {"agent-1": 1, "agent-2": 1}
    assert all(s.value > notified for s in metrics["takedown_agent_last_result_timestamp_seconds"])
    classes = {
        (s.labels["agent"], s.labels["class"]) for s in metrics["takedown_probe_results_total"]
    }
    assert ("agent-1", "present") in classes and ("agent-2", "removed") in classes
    overdue = {
        (s.labels["provider"], s.labels["deadline"]): s.value
        for s in metrics["takedown_overdue_urls"]
    }
    assert overdue[("Hoster A", "1h")] == 0
    own_results = {
        s.labels["outcome"]: s.value for s in metrics["takedown_collector_results_total"]
    }
    # Agents still run: the counters are read before the database in the same scrape.
    stored_in_db = sum(s.value for s in metrics["takedown_probe_results_total"])
    assert 0 < own_results["stored"] <= stored_in_db
    assert own_results["invalid"] == 0
    batches = {s.labels["outcome"]: s.value for s in metrics["takedown_collector_batches_total"]}
    assert batches["acked"] > 0 and batches["not_stored"] == 0
    assert metrics["takedown_collector_ack_seconds_count"][0].value >= batches["acked"]
    assert metrics["takedown_collector_agent_streams_open"][0].value == 2
    assert metrics["takedown_collector_reports_total"][0].labels["outcome"] == "accepted"
    assert metrics["takedown_collector_reports_total"][0].value == 8
    for family in metrics.values():
        for sample in family:
            assert not any("127.0.0" in v or "/a-" in v for v in sample.labels.values())

    own = await scrape(first.metrics_port)
    assert own["takedown_agent_stream_up"][0].value == 1
    assert own["takedown_agent_results_acked_total"][0].value > 0
    assert own["takedown_agent_assigned_urls"][0].value == 8
    assert own["takedown_agent_info"][0].labels["network"] == "net-one"
    assert {s.labels["error"] for s in own["takedown_agent_probes_total"]} >= {"none"}
    for family in own.values():
        for sample in family:
            assert not any("127.0.0.1" in v or "/a-" in v for v in sample.labels.values())

    conn = connect_readonly(db)
    try:
        rows = {r.provider: r for r in provider_table(url_outcomes(conn), time.time())}
    finally:
        conn.close()
    assert rows["Hoster A"].removed == 2 and rows["Hoster A"].online == 3
    assert rows["Hoster A"].asn == "AS64500" and rows["Hoster B"].asn == "AS64501"
    assert rows["Hoster B"].removed == 2 and rows["Hoster B"].online == 1
    assert rows["Hoster B"].median_latency_seconds is not None

    written = [p for p in tmp_path.rglob("*") if p.is_file() and p.name != "reports.csv"]
    marker = hoster.marker.encode()
    if isinstance(db, str):  # PostgreSQL: the whole database, as pg_dump writes it out
        written.append(tmp_path / "dump.sql")
        written[-1].write_bytes(postgres_dump(db))
    assert any(p.name in ("collector.db", "dump.sql") for p in written)
    contents = {path: path.read_bytes() for path in written}
    for path, data in contents.items():
        assert marker not in data, path
    assert hoster.marker not in caplog.text

    # The same stored results, fed to a SQLite store on their own and refolded, decide the
    # same: on PostgreSQL, the verdicts made live as the results came are those SQLite makes.
    await collector.stop(grace=1)
    again = refolded_on_sqlite(db, tmp_path / "refolded.db", collector.config.prefixes,
                               collector.config.policy)  # fmt: skip
    assert again == verdicts(db)
