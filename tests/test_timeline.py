"""The per-URL history read from a real store, and the timeline built and rendered from it."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from collector.attribution import PrefixTable
from collector.method import Policy
from collector.reports_file import ReportIn
from collector.schedule import Planner
from collector.store import ResultIn, Store
from collector.store.history import url_history
from collector.store.reads import connect_readonly
from collector.timeline import build_timeline, deadlines, iso, render_timeline

T0 = 1_767_607_200.0  # 2026-01-05T10:00:00Z
NOW = T0 + 50_000
CONTENT = hashlib.sha256(b"content").digest()
EXAMPLE = "192.0.2.1"
OTHER = "198.51.100.7"
URL = "http://x.example/a"
STILL_ONLINE = "http://y.example/b"


class Script:
    """Feeds one result at a time, in time order, as two agents would."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.agents = {n: store.register_agent(n, "net", "t", T0) for n in ("agent-1", "agent-2")}
        self.seq = 0

    def probe(
        self, agent: str, url_id: int, offset: float, status: int, peer: str = EXAMPLE
    ) -> None:
        self.seq += 1
        result = ResultIn(
            url_id=url_id, seq=self.seq, started_at=T0 + offset, elapsed=0.01, status=status,
            final_url="http://x.example/a", sha256=CONTENT if status == 200 else b"",
            body_bytes=7, truncated=False, peer_ip=peer, error="none", redirects=0,
        )  # fmt: skip
        self.store.ingest(self.agents[agent], [result], T0 + offset)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    """A database with a removed-then-reappeared URL under an order, and one still online."""
    prefixes = tmp_path / "prefixes.csv"
    prefixes.write_text(
        "prefix,asn,provider\n192.0.2.0/24,64500,Example\n198.51.100.0/24,64501,Other\n"
    )
    path = tmp_path / "c.db"
    store = Store(path, PrefixTable.from_csv(prefixes), Policy(min_vantage_points=1))  # one network
    reports = [
        ReportIn(URL, T0, None, "R-1", order_issued_at=T0 + 600, order_deadline=3600.0),
        ReportIn(STILL_ONLINE, T0, None, "R-2"),
    ]
    url_id, online_id = (o.url_id for o in store.submit_reports(reports, T0 + 10, Planner()))
    s = Script(store)
    script: list[tuple[str, float, int, str]] = [
        ("agent-1", 60, 200, EXAMPLE), ("agent-2", 90, 200, EXAMPLE),
        ("agent-1", 120, 200, EXAMPLE), ("agent-1", 4000, 200, EXAMPLE),
        ("agent-1", 5000, 404, EXAMPLE), ("agent-2", 5100, 404, EXAMPLE),
        ("agent-1", 5400, 404, EXAMPLE), ("agent-2", 5500, 404, EXAMPLE),
        ("agent-1", 40_000, 200, OTHER), ("agent-1", 40_300, 200, OTHER),
    ]  # fmt: skip
    for agent, offset, status, peer in script:
        s.probe(agent, url_id, offset, status, peer)
    s.probe("agent-1", online_id, 100, 200)
    store.close()
    return path


@pytest.fixture
def conn(db: Path) -> Iterator[sqlite3.Connection]:
    c = connect_readonly(db)
    yield c
    c.close()


class TestUrlHistory:
    def test_lookup_by_id_and_by_url(self, conn: sqlite3.Connection) -> None:
        """The same URL is found by its id and by its exact text."""
        by_url = url_history(conn, URL)
        assert by_url is not None
        assert url_history(conn, by_url.url_id) == by_url
        assert by_url.url == URL and by_url.provider == "Other" and by_url.asn == 64501

    def test_unknown_id_or_url_is_none(self, conn: sqlite3.Connection) -> None:
        """An id or URL the database does not know gives None."""
        assert url_history(conn, 999) is None
        assert url_history(conn, "http://nowhere.example/") is None

    def test_results_are_compressed_into_runs_per_agent(self, conn: sqlite3.Connection) -> None:
        """Consecutive results of one agent with the same class form one run."""
        h = url_history(conn, URL)
        assert h is not None
        runs = [(r.agent, r.probe_class, r.count, r.first_at - T0, r.last_at - T0) for r in h.runs]
        assert runs == [
            ("agent-1", "present", 3, 60, 4000),
            ("agent-2", "present", 1, 90, 90),
            ("agent-1", "removed", 2, 5000, 5400),
            ("agent-2", "removed", 2, 5100, 5500),
            ("agent-1", "present", 2, 40_000, 40_300),
        ]
        assert h.runs[2].statuses == (404,)
        assert h.runs[-1].providers == ("Other",)
        assert (h.results_total, h.results_read) == (10, 10)

    def test_reading_is_capped_at_the_newest_results(self, conn: sqlite3.Connection) -> None:
        """With a cap, only the newest results are read, and the count says so."""
        h = url_history(conn, URL, max_results=3)
        assert h is not None
        assert (h.results_total, h.results_read) == (10, 3)
        assert sum(r.count for r in h.runs) == 3
        assert min(r.first_at for r in h.runs) == T0 + 5500
        assert "only the newest 3 of 10" in render_timeline(h, NOW)

    def test_reports_baseline_and_events(self, conn: sqlite3.Connection) -> None:
        """Reports with their order, the baseline's source, and the stored url_events."""
        h = url_history(conn, URL)
        assert h is not None
        (r,) = h.reports
        assert (r.reference, r.order_issued_at, r.order_deadline) == ("R-1", T0 + 600, 3600.0)
        assert h.baseline_sha256 == CONTENT and not h.baseline_from_reference
        kinds = [e.kind for e in h.events]
        assert {"state", "removal", "reappearance", "provider"} <= set(kinds)
        (removal,) = (e for e in h.events if e.kind == "removal")
        assert removal.detail["last_present_at"] == T0 + 4000
        assert removal.detail["first_removed_at"] == T0 + 5000
        assert [ep.episode for ep in h.episodes] == [1, 2]


class TestTimeline:
    def test_deadline_verdicts(self, conn: sqlite3.Connection) -> None:
        """Removed after 1h and the order (straddling), before 12h and 24h; the other is overdue."""
        h = url_history(conn, URL)
        assert h is not None
        verdicts = {d.name: (d.verdict, d.margin_seconds, d.straddles) for d in deadlines(h, NOW)}
        assert verdicts == {
            "1h": ("removed_after", 1400.0, False),
            "12h": ("removed_before", 43_200 - 5000, False),
            "24h": ("removed_before", 86_400 - 5000, False),
            "order": ("removed_after", 800.0, True),
        }
        other = url_history(conn, STILL_ONLINE)
        assert other is not None
        judged = {d.name: (d.verdict, d.margin_seconds) for d in deadlines(other, NOW)}
        assert judged == {
            "1h": ("overdue", 50_000 - 3600),
            "12h": ("overdue", 50_000 - 43_200),
            "24h": ("not_yet_due", 86_400 - 50_000),
        }

    def test_events_are_chronological(self, conn: sqlite3.Connection) -> None:
        """Every kind appears, in time order, starting with the notice."""
        h = url_history(conn, URL)
        assert h is not None
        events = build_timeline(h, NOW)
        assert [e.at for e in events] == sorted(e.at for e in events)
        assert events[0].kind == "report"
        kinds = {e.kind for e in events}
        assert kinds >= {"report", "order", "probes", "state", "removal", "reappearance",
                         "provider", "deadline"}  # fmt: skip

    def test_text_shows_runs_interval_and_deadlines(self, conn: sqlite3.Connection) -> None:
        """The text view has compressed runs, the removal interval, the move and ISO times."""
        h = url_history(conn, URL)
        assert h is not None
        text = render_timeline(h, NOW)
        assert f"url {h.url_id}: {URL}" in text
        assert f"agent-1 present ×3 from {iso(T0 + 60)} to {iso(T0 + 4000)}" in text
        assert f"went between {iso(T0 + 4000)} and {iso(T0 + 5000)}, latency 83m" in text
        assert "provider Example → Other" in text
        assert "deadline order: removed after it (13m late); the removal interval straddles" in text
        assert "baseline: agreed by vantage points" in text
        assert "2026-01-05T10:00:00Z" in text

    def test_json_round_trips(self, conn: sqlite3.Connection) -> None:
        """The JSON view parses back with ISO times, seconds and the deadline verdicts."""
        h = url_history(conn, STILL_ONLINE)
        assert h is not None
        doc = json.loads(render_timeline(h, NOW, "json"))
        assert doc["url"] == STILL_ONLINE and doc["state"] == "available"
        assert doc["notified_at"] == "2026-01-05T10:00:00Z"
        assert doc["removal"] is None
        assert doc["last_probe_at"] == doc["last_present_at"] == iso(T0 + 100)
        assert [d["verdict"] for d in doc["deadlines"]] == ["overdue", "overdue", "not_yet_due"]
        assert doc["baseline"]["source"] == "agreed"
        assert doc["note"] is None
        assert doc["timeline"][0]["kind"] == "report"
        assert json.loads(json.dumps(doc)) == doc

    def test_unknown_format_is_refused(self, conn: sqlite3.Connection) -> None:
        """Only text and json are offered."""
        h = url_history(conn, URL)
        assert h is not None
        with pytest.raises(ValueError, match="text or json"):
            render_timeline(h, NOW, "csv")
