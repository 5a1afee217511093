"""The collector on PostgreSQL (a real server, tests/pg.py) decides exactly what it decides on
SQLite: the same deliveries give the same verdicts, timelines, figures and evidence log."""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collector.evidence.leaves import url_sha256
from collector.evidence.merkle import leaf_hash, root_of
from collector.evidence.note import NoteSigner
from collector.method import Policy
from collector.reports_file import ReportIn
from collector.store import ResultIn, Store, StoreError
from collector.store.history import url_history
from collector.store.model import Evidence, SignedBatch
from collector.store.reads import connect_readonly, provider_figures, url_outcomes
from collector.store.sql import pg_ddl, pg_placeholders
from tests.test_store_replay import PLANNER, T0, deliveries, table

Delivery = tuple[list[tuple[int, list[ResultIn]]], int]


def snapshot(target: Path | str) -> dict[str, Any]:
    """Everything a run decided, read back through the store's own read path."""
    conn = connect_readonly(target)
    try:
        return {
            "state": conn.execute(
                "SELECT url_id, state, episode, last_present_at, removal_last_present_at,"
                " removal_first_removed_at, removal_confirmed_at, reappearances, first_provider,"
                " live_until, last_conclusive_at, memory, folded FROM url_state ORDER BY url_id"
            ).fetchall(),
            "episodes": conn.execute("SELECT * FROM episodes ORDER BY url_id, episode").fetchall(),
            "events": conn.execute(
                "SELECT url_id, at, kind, detail FROM url_events ORDER BY url_id, at, rowid"
            ).fetchall(),
            "results": conn.execute(
                "SELECT agent_id, seq, url_id, started_at, status, class, provider, leaf"
                " FROM results ORDER BY agent_id, seq"
            ).fetchall(),
            "outcomes": url_outcomes(conn, now=T0 + 10_000),
            "figures": provider_figures(conn, [3600.0], 86_400.0, [60.0, 600.0], T0 + 10_000),
            "history": [url_history(conn, u) for u in (1, 2)],
            "leaves": [
                (i, k, u, bytes(b))
                for i, k, u, b in conn.execute(
                    "SELECT idx, kind, url_id, leaf FROM log_leaves ORDER BY idx"
                )
            ],
            "checkpoints": conn.execute(
                "SELECT size, note FROM log_checkpoints ORDER BY size"
            ).fetchall(),
        }
    finally:
        conn.close()


def with_evidence(agent: int, batch: list[ResultIn]) -> list[ResultIn]:
    """The batch's results with an (unsigned) batch tree over stand-in observation bytes:
    what the store logs, without the service that would build them."""
    data = [b'{"agent":%d,"seq":%d}' % (agent, r.seq) for r in batch]
    hashes = [leaf_hash(d) for d in data]
    signed = SignedBatch(f"a{agent}", f"n{agent}", len(batch), root_of(hashes), b"",
                         b"".join(hashes))  # fmt: skip
    urls = {1: url_sha256("http://x/a"), 2: url_sha256("http://x/b")}
    return [
        dataclasses.replace(r, started_at=T0 + r.started_at,
                            evidence=Evidence(urls[r.url_id], d, signed, k))
        for k, (r, d) in enumerate(zip(batch, data, strict=True))
    ]  # fmt: skip


def run(target: Path | str, tmp: Path, case: Delivery, signer: Any, crash_at: int | None) -> None:
    """Feed one delivery to a store; at `crash_at` the store is dropped as by SIGKILL (its
    connection closed, nothing flushed) and opened again."""
    batches, cache = case

    def open_store() -> Store:
        return Store(target, table(tmp), Policy(), cache_urls=cache, planner=PLANNER,
                     log_signer=signer, flush_every=1e9)  # fmt: skip

    store = open_store()
    ids = {a: store.register_agent(f"a{a}", f"n{a}", "t", T0) for a in (1, 2, 3)}
    store.submit_reports(
        [ReportIn("http://x/a", T0, None, "r1"), ReportIn("http://x/b", T0, None, "r2")],
        T0, PLANNER,
    )  # fmt: skip
    for n, (agent, batch) in enumerate(batches):
        if n == crash_at:
            store.conn.close()
            store = open_store()
        store.ingest(ids[agent], with_evidence(agent, batch), T0 + 1000 + 3 * n)
        if n % 7 == 3:
            store.flush(T0 + 1000 + 3 * n)
    store.checkpoint(T0 + 5000)
    store.close()


class TestSameVerdictsOnBothEngines:
    @settings(
        max_examples=8, deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )  # fmt: skip
    @given(case=deliveries(), crash=st.booleans())
    def test_deliveries_decide_the_same(self, postgres: Any, case: Delivery, crash: bool) -> None:
        """Batches in any order, some twice, a small cache, the evidence log on, states
        flushed now and then, and perhaps a crash halfway: every verdict, episode, event,
        figure, stored result and log leaf (byte for byte, signatures included) on
        PostgreSQL is what SQLite decided from the same deliveries and the same crash.

        (The same crash on both: a result's stored class is how it was classified on
        arrival, so it depends on what the fold knew then, which a crash changes; the
        verdicts do not depend on it, test_store_replay holds that.)"""
        signer = NoteSigner.generate("takedown.test/log")
        crash_at = len(case[0]) // 2 if crash else None
        with tempfile.TemporaryDirectory() as tmp:
            sqlite = Path(tmp) / "c.db"
            run(sqlite, Path(tmp), case, signer, crash_at)
            dsn = postgres.new_database()
            run(dsn, Path(tmp), case, signer, crash_at)
            assert snapshot(dsn) == snapshot(sqlite)


class TestPostgresStore:
    def test_an_unreachable_server_is_named_without_its_password(self, postgres: Any) -> None:
        dsn = f"postgresql://takedown:secret@127.0.0.1:{postgres.port + 1}/nothing"
        with pytest.raises(StoreError) as raised:
            Store(dsn, table(Path(tempfile.mkdtemp())), Policy())
        message = str(raised.value)
        assert "database unavailable" in message
        assert "secret" not in message and "takedown:***@" in message

    def test_two_stores_migrate_one_database_once(self, pg_dsn: str, tmp_path: Path) -> None:
        first = Store(pg_dsn, table(tmp_path), Policy())
        second = Store(pg_dsn, table(tmp_path), Policy())
        try:
            rows = first.conn.execute(
                "SELECT name, COUNT(*) FROM schema_migrations GROUP BY name"
            ).fetchall()
            assert rows and all(n == 1 for _, n in rows)
            assert len(rows) == len(
                first.conn.execute("SELECT * FROM schema_migrations").fetchall()
            )
        finally:
            first.close()
            second.close()


class TestDialect:
    def test_placeholders_outside_quotes_only(self) -> None:
        assert pg_placeholders("SELECT '?', x FROM t WHERE a = ? AND b LIKE '%'") == (
            "SELECT '?', x FROM t WHERE a = %s AND b LIKE '%%'"
        )

    def test_ddl_types(self) -> None:
        ddl = pg_ddl(
            "CREATE TABLE t (id INTEGER PRIMARY KEY, x REAL, b BLOB, n INTEGER) WITHOUT ROWID"
        )
        assert ddl == (
            "CREATE TABLE t (id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,"
            " x DOUBLE PRECISION, b BYTEA, n BIGINT)"
        )
