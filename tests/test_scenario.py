"""The measurement rules end to end: three vantage points, a scripted hoster, two deadlines.

Every page has a known truth; the provider table and the metrics must agree with it.
"""

from __future__ import annotations

import io
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from collector.importer import import_file
from collector.method import Policy
from collector.report import provider_table
from collector.schedule import Planner
from collector.server import Collector, CollectorConfig
from collector.store.reads import UrlStatus, connect_readonly, url_outcomes, url_statuses
from demo.hoster import Fate, Hoster
from tests.conftest import HOST_A, HOST_B, AgentFactory, eventually, scrape

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BLOCKED_NETWORK = "127.0.0.4"
SHORT_DEADLINE = 6.0
PAGES = {
    # path: (host, truth)
    "/geo": (HOST_A, "geoblocked"),
    "/flap": (HOST_A, "available"),
    "/dynamic": (HOST_A, "available"),
    "/challenge": (HOST_A, "available"),
    "/reappear": (HOST_B, "available"),
    "/replaced": (HOST_B, "removed"),
    "/gone": (HOST_B, "removed"),
}


@pytest.fixture
async def collector(tmp_path: Path, prefixes: Path) -> AsyncIterator[Collector]:
    config = CollectorConfig(
        db=tmp_path / "collector.db",
        listen="127.0.0.1:0",
        metrics_listen="127.0.0.1:0",
        prefixes=prefixes,
        planner=replace(Planner.fixed(1.0), deadlines=(SHORT_DEADLINE, 3600.0)),
        policy=Policy(confirmations=2),
        deadlines=(SHORT_DEADLINE, 3600.0),
    )
    c = Collector(config)
    await c.start()
    yield c
    await c.stop(grace=1)


def opened_at(db: Path, path: str) -> float:
    conn = connect_readonly(db)
    try:
        row = conn.execute(
            "SELECT s.opened_at FROM url_state s JOIN urls u ON u.id = s.url_id WHERE u.url LIKE ?",
            (f"%{path}",),
        ).fetchone()
        return float(row[0])
    finally:
        conn.close()


def statuses(db: Path) -> dict[str, UrlStatus]:
    conn = connect_readonly(db)
    try:
        return {"/" + s.url.rsplit("/", 1)[1]: s for s in url_statuses(conn)}
    finally:
        conn.close()


async def test_rules_hold_across_vantage_points(
    tmp_path: Path, collector: Collector, hoster: Hoster, agents: AgentFactory
) -> None:
    """Geoblock, 503 flaps, dynamic pages and challenges are not removals; the rest is measured."""
    for path in PAGES:
        hoster.add(path, blocked_for=[BLOCKED_NETWORK] if path == "/geo" else [])
    hoster.set_fate("/dynamic", Fate.DYNAMIC)
    notified = float(int(time.time()))
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(notified))
    rows = [
        f"http://{host}:{hoster.port}{path},{stamp},S-{path[1:]},"
        + (f"{stamp},3s" if path == "/flap" else ",")
        for path, (host, _) in PAGES.items()
    ]
    reports = tmp_path / "reports.csv"
    reports.write_text(
        "url,notified_at,reference,order_issued_at,order_deadline\n" + "\n".join(rows) + "\n"
    )
    assert await import_file(reports, f"127.0.0.1:{collector.grpc_port}", out=io.StringIO()) == 0
    for i, source in enumerate(["127.0.0.2", "127.0.0.3", BLOCKED_NETWORK], start=1):
        agents(f"agent-{i}", f"net-{i}", source)
    db = collector.config.db

    def settled() -> bool:
        s = statuses(db)
        want = {p: ("geoblocked" if p == "/geo" else "available") for p in PAGES}
        return {p: v.state for p, v in s.items()} == want

    await eventually(settled, 30, "all pages available (and /geo geoblocked)")

    truth: dict[str, float] = {}
    truth["/gone"] = hoster.set_fate("/gone", Fate.GONE_410)
    truth["/replaced"] = hoster.set_fate("/replaced", Fate.REPLACED)
    truth["/reappear"] = hoster.set_fate("/reappear", Fate.GONE_404)
    hoster.set_fate("/challenge", Fate.CHALLENGE)
    for _ in range(3):
        hoster.set_fate("/flap", Fate.UNAVAILABLE_503)
        await _probed(hoster, "/flap", 3)
        hoster.set_fate("/flap", Fate.ONLINE)
        await _probed(hoster, "/flap", 3)

    def measured() -> bool:
        s = statuses(db)
        return all(s[p].state == "removed" for p in ("/gone", "/replaced", "/reappear"))

    await eventually(measured, 30, "three removals confirmed")
    hoster.set_fate("/reappear", Fate.ONLINE)
    await eventually(lambda: statuses(db)["/reappear"].reappearances == 1, 20, "reappearance")
    # Overdue runs from the episode's opening: the notice, or for /reappear its reappearance.
    reopened = opened_at(db, "/reappear")
    await eventually(
        lambda: time.time() > max(notified, reopened) + SHORT_DEADLINE + 1,
        15,
        "the short deadline to pass for every episode",
    )
    await _probed(hoster, "/dynamic", 6)
    await _probed(hoster, "/challenge", 6)

    final = statuses(db)
    for path, (_, expected) in PAGES.items():
        assert final[path].state == expected, path
    tolerance = 1.1 * 2 + 1.5
    for path, changed_at in truth.items():
        first_removed = final[path].removal_first_removed_at
        assert first_removed is not None and changed_at <= first_removed <= changed_at + tolerance
    assert final["/reappear"].episode == 2

    metrics = await scrape(collector.metrics_port)
    counts = {
        s.labels["provider"]: s.value for s in metrics["takedown_removal_latency_seconds_count"]
    }
    assert counts == {"Hoster B": 3}
    urls = {(s.labels["provider"], s.labels["state"]): s.value for s in metrics["takedown_urls"]}
    assert urls[("Hoster A", "geoblocked")] == 1
    assert urls[("Hoster A", "available")] == 3
    assert urls[("Hoster A", "removed")] == 0
    assert urls[("Hoster B", "removed")] == 2
    assert urls[("Hoster B", "available")] == 1
    reappeared = {s.labels["provider"]: s.value for s in metrics["takedown_reappearances_total"]}
    assert reappeared["Hoster B"] == 1
    overdue = {
        (s.labels["provider"], s.labels["deadline"]): s.value
        for s in metrics["takedown_overdue_urls"]
    }
    assert overdue[("Hoster A", "6s")] == 4
    assert overdue[("Hoster B", "6s")] == 1
    assert overdue[("Hoster A", "1h")] == 0
    assert overdue[("Hoster A", "order")] == 1

    conn = connect_readonly(db)
    try:
        table = {r.provider: r for r in provider_table(url_outcomes(conn), time.time())}
    finally:
        conn.close()
    assert table["Hoster A"].removed == 0 and table["Hoster A"].online == 4
    assert table["Hoster A"].geoblocked == 1
    assert table["Hoster B"].removed == 3 and table["Hoster B"].online == 1


async def _probed(hoster: Hoster, path: str, times: int) -> None:
    """Wait until `path` has been requested `times` more times (by any agent)."""
    start = sum(1 for _, p in hoster.requests if p == path)
    await eventually(
        lambda: sum(1 for _, p in hoster.requests if p == path) >= start + times,
        15,
        f"{times} more probes of {path}",
    )
