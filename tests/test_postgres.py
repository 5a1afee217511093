"""The collector on PostgreSQL (a real server, tests/pg.py) decides exactly what it decides on
SQLite: the same deliveries give the same verdicts, timelines, figures and evidence log."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import random
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.main import Agent
from collector.attribution import PrefixTable
from collector.evidence.leaves import url_sha256
from collector.evidence.merkle import leaf_hash, root_of
from collector.evidence.note import NoteSigner
from collector.importer import import_file
from collector.method import Policy
from collector.reports_file import ReportIn
from collector.server import Collector
from collector.store import ResultIn, Store, StoreError
from collector.store.history import url_history
from collector.store.model import Evidence, SignedBatch
from collector.store.reads import (
    connect_readonly,
    provider_figures,
    url_outcomes,
    url_statuses,
)
from collector.store.schema import RESULT_PARTITIONS
from collector.store.shards import SHARDS
from collector.store.sql import pg_ddl, pg_placeholders
from demo.hoster import Fate, Hoster
from tests.conftest import HOST_A, HOST_B, agent_config, collector_config, eventually, scrape
from tests.test_cli import COLLECTOR
from tests.test_cli import run as run_cli
from tests.test_store_replay import CONTENT, PEERS, PLANNER, T0, deliveries, table

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


LEASE = 1.0  # seconds: a crashed store's leases lapse quickly here


def hold_every_shard(store: Store, within: float = 10.0) -> None:
    """On PostgreSQL, wait until this store holds every shard (a crashed one's leases lapse
    after LEASE): alone on its database, it then folds everything, as SQLite's does."""
    if store.leases is None:
        return
    deadline = time.monotonic() + within
    while len(store.leases.owned) < SHARDS:
        assert time.monotonic() < deadline, f"holds {len(store.leases.owned)} of {SHARDS} shards"
        time.sleep(0.05)  # polling the lease table, bounded by the deadline
        store.tick(T0)


def run(target: Path | str, tmp: Path, case: Delivery, signer: Any, crash_at: int | None) -> None:
    """Feed one delivery to a store; at `crash_at` the store is dropped as by SIGKILL (its
    connection closed, nothing flushed) and opened again."""
    batches, cache = case

    def open_store() -> Store:
        store = Store(target, table(tmp), Policy(), cache_urls=cache, planner=PLANNER,
                      log_signer=signer, flush_every=0.0, lease_seconds=LEASE)  # fmt: skip
        hold_every_shard(store)
        return store

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
        max_examples=6, deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )  # fmt: skip
    @given(case=deliveries(), crash=st.booleans())
    def test_deliveries_decide_the_same(self, postgres: Any, case: Delivery, crash: bool) -> None:
        """Batches in any order, some twice, a small cache, the evidence log on, states
        flushed now and then, and perhaps a crash halfway: every verdict, episode, event,
        figure, stored result and log leaf (byte for byte, signatures included) on
        PostgreSQL is what SQLite decided from the same deliveries and the same crash.

        (The same crash on both. A result's stored class is how it was classified on
        arrival, so it depends on what the fold knew then, which a crash changes, and
        PostgreSQL's restart differs: it waits for its shard leases to lapse. So after a
        crash the classes are not compared; the verdicts do not depend on them.)"""
        signer = NoteSigner.generate("takedown.test/log")
        crash_at = len(case[0]) // 2 if crash else None
        with tempfile.TemporaryDirectory() as tmp:
            sqlite = Path(tmp) / "c.db"
            run(sqlite, Path(tmp), case, signer, crash_at)
            dsn = postgres.new_database()
            run(dsn, Path(tmp), case, signer, crash_at)
            on_postgres, on_sqlite = snapshot(dsn), snapshot(sqlite)
            if crash:  # see above: the classes stored after the restart may differ
                for taken in (on_postgres, on_sqlite):
                    taken["results"] = [r[:5] + r[6:] for r in taken["results"]]
                    taken["history"] = [dataclasses.replace(h, runs=()) for h in taken["history"]]
            assert on_postgres == on_sqlite


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


def test_results_are_hash_partitioned_and_a_resent_batch_is_known(
    pg_dsn: str, tmp_path: Path
) -> None:
    store = Store(pg_dsn, table(tmp_path), Policy(), planner=PLANNER)
    try:
        (parts,) = store.conn.execute(
            "SELECT COUNT(*) FROM pg_inherits WHERE inhparent = 'results'::regclass"
        ).fetchone()
        assert parts == RESULT_PARTITIONS
        agent = store.register_agent("a1", "n1", "t", T0)
        store.submit_reports([ReportIn("http://x/a", T0, None, "r1")], T0, PLANNER)
        batch = [dataclasses.replace(r, started_at=T0 + r.started_at)
                 for r in fixed_case()[0][0][1]]  # fmt: skip
        first = store.ingest(agent, batch, T0 + 100)
        again = store.ingest(agent, batch, T0 + 101)
        # URL 2 was never reported: its result is refused each time; the others are stored once.
        assert (first.stored, first.rejected) == (len(batch) - 1, 1)
        assert (again.stored, again.duplicates, again.rejected) == (0, first.stored, 1)
    finally:
        store.close()


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


VERDICT = (
    "SELECT u.url, s.state, s.episode, s.first_provider, s.removal_last_present_at,"
    " s.removal_first_removed_at, s.removal_confirmed_at, s.removal_latency, s.reappearances"
    " FROM url_state s JOIN urls u ON u.id = s.url_id ORDER BY u.url"
)


def refolded_on_sqlite(source: Path | str, path: Path, prefixes: Path, policy: Policy) -> list[Any]:
    """Every report and stored result of `source` given to a new SQLite store at `path` (each
    agent's results in the batches they were stored in), then refolded: its verdicts."""
    conn = connect_readonly(source)
    try:
        reports = conn.execute(
            "SELECT u.url, r.notified_at, r.received_at, r.reference, r.sha256, r.submitted_at"
            " FROM reports r JOIN urls u ON u.id = r.url_id ORDER BY r.id"
        ).fetchall()
        agents = conn.execute("SELECT id, name, network FROM agents ORDER BY id").fetchall()
        results = conn.execute(
            "SELECT r.agent_id, r.stored_at, u.url, r.seq, r.started_at, r.elapsed, r.status,"
            " r.final_url, r.sha256, r.body_bytes, r.truncated, r.peer_ip, r.error, r.redirects,"
            " r.challenge, r.tls FROM results r JOIN urls u ON u.id = r.url_id"
            " ORDER BY r.stored_at, r.agent_id, r.seq"
        ).fetchall()
    finally:
        conn.close()
    store = Store(path, PrefixTable.from_csv(prefixes), policy)
    try:
        now = min(r[5] for r in reports)
        ids = {name: store.register_agent(name, network, "t", now) for _, name, network in agents}
        names = {agent_id: name for agent_id, name, _ in agents}
        for url, notified, received, reference, sha, submitted in reports:
            store.submit_reports(
                [ReportIn(url, notified, received, reference, bytes(sha) if sha else None)],
                submitted, PLANNER,
            )  # fmt: skip
        url_ids = dict(store.conn.execute("SELECT url, id FROM urls").fetchall())
        batches: dict[tuple[int, float], list[ResultIn]] = {}
        for agent_id, stored_at, url, *fields in results:
            seq, started, elapsed, status, final, sha, size, truncated, peer, error, *rest = fields
            batches.setdefault((agent_id, stored_at), []).append(
                ResultIn(url_ids[url], seq, started, elapsed, status, final,
                         bytes(sha) if sha else b"", size, bool(truncated), peer, error,
                         rest[0], bool(rest[1]), rest[2])
            )  # fmt: skip
        for (agent_id, stored_at), batch in batches.items():
            store.ingest(ids[names[agent_id]], batch, stored_at)
        store.refold(now=max(stored for _, stored in batches) if batches else now)
        return list(store.conn.execute(VERDICT).fetchall())
    finally:
        store.close()


def verdicts(target: Path | str) -> list[Any]:
    conn = connect_readonly(target)
    try:
        return list(conn.execute(VERDICT).fetchall())
    finally:
        conn.close()


def fixed_case() -> Delivery:
    """Three agents see URL 1 present, then 404 from t = 200 s (URL 2 stays): batches of 3."""
    batches: list[tuple[int, list[ResultIn]]] = []
    for agent in (1, 2, 3):
        results = [
            ResultIn(url_id, 2 * step + url_id, agent + 10.0 * step, 0.01,
                     404 if url_id == 1 and step >= 20 else 200, "http://x/a",
                     b"" if url_id == 1 and step >= 20 else CONTENT, 7, False,
                     PEERS[url_id - 1], "none", 0)
            for step in range(40) for url_id in (1, 2)
        ]  # fmt: skip
        batches += [(agent, results[i : i + 3]) for i in range(0, len(results), 3)]
    return batches, 2


class TestCommandsOnPostgres:
    def test_every_command_works_against_a_postgresql_uri(
        self, pg_dsn: str, tmp_path: Path
    ) -> None:
        """agents, intake-tokens, report, url and refold, given --db postgresql://..., say and
        do on PostgreSQL what they do on a file (the same verdicts as a SQLite store)."""
        case = fixed_case()
        run(pg_dsn, tmp_path, case, None, None)
        sqlite = tmp_path / "c.db"
        run(sqlite, tmp_path, case, None, None)

        def cli(*args: str, db: Path | str = pg_dsn) -> str:
            done = run_cli(COLLECTOR, *args, "--db", str(db))
            assert done.returncode == 0, done.stderr
            return done.stdout + done.stderr

        def credentials() -> None:
            made = cli("agents", "add", "agent-x", "--network", "net-x")
            assert "token id" in made and "agent-x" in made
            assert "agent-x" in cli("agents", "list")
            assert "hotline-1" in cli("intake-tokens", "add", "hotline-1")
            assert "hotline-1" in cli("intake-tokens", "list")
            assert "1 token(s) revoked" in cli("intake-tokens", "revoke", "hotline-1")

        prefixes = str(tmp_path / "prefixes.csv")
        with ThreadPoolExecutor(3) as pool:  # independent commands side by side (wall time)
            done = [pool.submit(credentials)] + [
                pool.submit(cli, "refold", "--prefixes", prefixes, db=db) for db in (pg_dsn, sqlite)
            ]
            for future in done:
                future.result()
        assert verdicts(pg_dsn) == verdicts(sqlite)
        assert [v[1] for v in verdicts(pg_dsn)] == ["removed", "available"]
        with ThreadPoolExecutor(3) as pool:
            reports = list(pool.map(lambda db: json.loads(cli("report", "--format", "json", db=db)),
                                    (pg_dsn, sqlite)))  # fmt: skip
            urls = list(pool.map(
                lambda db: json.loads(cli("url", "http://x/a", "--format", "json", db=db)),
                (pg_dsn, sqlite),
            ))  # fmt: skip
        assert reports[0] == reports[1] and reports[0]
        assert urls[0] == urls[1] and urls[0]["url"] == "http://x/a"
        missing = run_cli(COLLECTOR, "url", "http://x/none", "--db", pg_dsn)
        assert missing.returncode != 0 and "no URL" in missing.stderr
        assert "secret" not in missing.stderr


def ticked_until(stores: list[Store], done: Any, within: float = 15.0) -> None:
    """Tick every store (renew, rebalance, fold the queue) until `done()` holds."""
    deadline = time.monotonic() + within
    while True:
        for store in stores:
            store.tick(T0 + 5000)
        if done():
            return
        assert time.monotonic() < deadline, "the shards did not settle in time"
        time.sleep(0.05)  # polling the lease table, bounded by the deadline


def queued(store: Store) -> int:
    return int(store.conn.execute("SELECT COUNT(*) FROM fold_queue").fetchone()[0])


VERDICTS_AND_HISTORY = (
    VERDICT,
    "SELECT url_id, episode, opened_at, last_present_at, first_removed_at, confirmed_at,"
    " provider, opened_by FROM episodes ORDER BY url_id, episode",
    "SELECT url_id, at, kind, detail FROM url_events ORDER BY url_id, at, kind, detail",
)


def decided(target: Path | str) -> list[list[Any]]:
    conn = connect_readonly(target)
    try:
        return [list(conn.execute(sql).fetchall()) for sql in VERDICTS_AND_HISTORY]
    finally:
        conn.close()


def run_sqlite_refolds(path: Path) -> None:
    """What the PostgreSQL side does at its end (every refold owed), on the SQLite file."""
    store = Store(path, table(path.parent), Policy(), planner=PLANNER)
    store.refold_due(T0 + 10_000, limited=False)
    store.close()


class TestSeveralCollectors:
    def open(self, dsn: str, tmp: Path, cache: int = 2) -> Store:
        return Store(dsn, table(tmp), Policy(), cache_urls=cache, planner=PLANNER,
                     lease_seconds=LEASE)  # fmt: skip

    @settings(
        max_examples=5, deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )  # fmt: skip
    @given(case=deliveries())
    def test_two_collectors_share_the_urls_and_one_dies(
        self, postgres: Any, case: Delivery
    ) -> None:
        """Two stores on one database split the shards; agents' batches go to either, some
        twice; halfway one dies (its connection gone, its leases left to lapse). The other
        takes its shards within the lease time and folds what it had queued: verdicts,
        episodes and events equal one SQLite store's fed the same batches."""
        batches, cache = case
        with tempfile.TemporaryDirectory() as tmp:
            sqlite = Path(tmp) / "c.db"
            run(sqlite, Path(tmp), case, None, None)
            dsn = postgres.new_database()
            one = self.open(dsn, Path(tmp), cache)
            two = self.open(dsn, Path(tmp), cache)
            stores = [one, two]
            ticked_until(stores, lambda: len(one.leases.owned) == len(two.leases.owned) == 32)
            assert set(one.leases.owned).isdisjoint(two.leases.owned)
            ids = {a: one.register_agent(f"a{a}", f"n{a}", "t", T0) for a in (1, 2, 3)}
            assert ids == {a: two.register_agent(f"a{a}", f"n{a}", "t", T0) for a in ids}
            one.submit_reports(
                [ReportIn("http://x/a", T0, None, "r1"), ReportIn("http://x/b", T0, None, "r2")],
                T0, PLANNER,
            )  # fmt: skip
            half = len(batches) // 2
            for n, (agent, batch) in enumerate(batches):
                if n == half:
                    one.conn.close()  # SIGKILL, as the database sees it
                    stores = [two]
                store = stores[(agent + n) % len(stores)]
                store.ingest(ids[agent], with_evidence(agent, batch), T0 + 1000 + 3 * n)
                if n % 5 == 0:
                    for s in stores:
                        s.tick(T0 + 1000 + 3 * n)
            ticked_until([two], lambda: len(two.leases.owned) == SHARDS and not queued(two))
            two.refold_due(T0 + 10_000, limited=False)
            two.close()
            run_sqlite_refolds(sqlite)
            assert decided(dsn) == decided(sqlite)

    def test_a_start_under_a_new_method_refolds_only_its_shards(
        self, pg_dsn: str, tmp_path: Path
    ) -> None:
        """Beside another collector, a collector starting under a new method version refolds
        the URLs of the shards it holds (the server does at start); a full refold, which
        would write the others' URLs, is refused by name."""
        one = self.open(pg_dsn, tmp_path)
        one.submit_reports(
            [ReportIn(f"http://x/{n}", T0, None, f"r{n}") for n in range(SHARDS + 6)],
            T0,
            PLANNER,
        )
        two = self.open(pg_dsn, tmp_path)
        try:
            ticked_until([one, two], lambda: len(one.leases.owned) == len(two.leases.owned))
            one.conn.execute("UPDATE url_state SET method = 'tm-older'")
            changed = two.refold(now=T0 + 10, held_only=True)
            assert changed and all(two.leases.owns(u) for u, _, _ in changed)
            held = {u for u in range(1, SHARDS + 7) if two.leases.owns(u)}
            assert {u for u, _, _ in changed} == held and 0 < len(held) < SHARDS + 6
            with pytest.raises(StoreError, match="other collectors are running"):
                two.refold(now=T0 + 10)
        finally:
            one.close()
            two.close()

    def test_a_new_notice_taken_by_another_collector_reaches_the_holder(
        self, pg_dsn: str, tmp_path: Path
    ) -> None:
        """A removed URL notified again through the collector that does not hold it: its
        holder refolds it at its next tick, and a new episode opens."""
        one = self.open(pg_dsn, tmp_path)
        agents = {a: one.register_agent(f"a{a}", f"n{a}", "t", T0) for a in (1, 2, 3)}
        one.submit_reports([ReportIn("http://x/a", T0, None, "r1")], T0, PLANNER)
        for agent, batch in fixed_case()[0]:
            one.ingest(agents[agent], [dataclasses.replace(r, started_at=T0 + r.started_at)
                                       for r in batch], T0 + 500)  # fmt: skip
        two = self.open(pg_dsn, tmp_path)
        try:
            ticked_until([one, two], lambda: len(one.leases.owned) == len(two.leases.owned))
            assert one.leases.owns(1) and not two.leases.owns(1)

            def episodes() -> list[Any]:
                return list(one.conn.execute(
                    "SELECT episode, opened_by FROM episodes WHERE url_id = 1 ORDER BY episode"
                ).fetchall())  # fmt: skip

            assert episodes() == [(1, "notice")]
            assert verdicts(pg_dsn)[0][1] == "removed"
            two.submit_reports([ReportIn("http://x/a", T0 + 900, None, "r2")], T0 + 900, PLANNER)
            assert episodes() == [(1, "notice")]  # the holder has not looked yet
            one.tick(T0 + 901)
            assert episodes() == [(1, "notice"), (2, "renotified")]
        finally:
            one.close()
            two.close()

    def test_a_collector_gone_for_a_day_is_forgotten(self, pg_dsn: str, tmp_path: Path) -> None:
        one = self.open(pg_dsn, tmp_path)
        try:
            one.conn.execute(
                "INSERT INTO collectors (name, seen_at) VALUES ('gone', 0), ('recent',"
                " EXTRACT(EPOCH FROM clock_timestamp()) - 60)"
            )
            one.tick(T0)
            names = {n for (n,) in one.conn.execute("SELECT name FROM collectors").fetchall()}
            assert names == {one.leases.name, "recent"}
        finally:
            one.close()

    def test_a_stale_holder_cannot_write_and_learns_it(self, pg_dsn: str, tmp_path: Path) -> None:
        """A collector paused past its lease (no renewal) finds at its next transaction that
        another took its shards over: its result goes to the queue, it writes no fold."""
        one = self.open(pg_dsn, tmp_path)
        one.register_agent("a1", "n1", "t", T0)
        one.submit_reports([ReportIn("http://x/a", T0, None, "r1")], T0, PLANNER)
        assert one.leases.owns(1)
        two = self.open(pg_dsn, tmp_path)  # holds nothing yet: one holds every shard
        assert not two.leases.owned
        ticked_until([two], lambda: two.leases.owns(1))  # one never renews: its leases lapse
        before = one.conn.execute("SELECT updated_at, folded FROM url_state").fetchone()
        result = fixed_case()[0][0][1][0]
        done = one.ingest(1, [dataclasses.replace(result, started_at=T0 + 10)], T0 + 20)
        assert done.stored == 1
        assert not one.leases.owns(1)  # fenced: it learnt it lost the shard
        assert one.conn.execute("SELECT updated_at, folded FROM url_state").fetchone() == before
        assert queued(one) == 1
        assert two.fold_queued(T0 + 30) == 1
        assert two.conn.execute("SELECT folded FROM url_state").fetchone()[0] == 1
        one.close()
        two.close()


@pytest.mark.integration
@pytest.mark.slow
async def test_two_collectors_with_real_agents_decide_as_one(
    tmp_path: Path, prefixes: Path, hoster: Hoster, pg_dsn: str
) -> None:
    """Two real collectors on one PostgreSQL database, a real agent on each, reports sent to
    the first only once both agents are connected: both are assigned every URL, the removals
    are confirmed, the collectors' /metrics add up to every URL once, and the stored results,
    refolded by one SQLite store, decide the same verdicts."""
    paths = ["/a-404", "/a-online", "/b-410", "/b-online"]
    for path in paths:
        hoster.add(path)
    config = replace(collector_config(tmp_path, prefixes), db=pg_dsn, lease_seconds=3.0)
    collectors = [Collector(config), Collector(config)]
    stops: list[asyncio.Event] = []
    tasks: list[asyncio.Task[None]] = []
    try:
        for c in collectors:
            await c.start()
        url = {p: f"http://{HOST_A if p.startswith('/a') else HOST_B}:{hoster.port}{p}"
               for p in paths}  # fmt: skip
        notified = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 5))
        reports = tmp_path / "reports.csv"
        reports.write_text("url,notified_at,reference\n" + "".join(
            f"{url[p]},{notified},case-{i}\n" for i, p in enumerate(paths)))  # fmt: skip
        for n, (c, source) in enumerate(zip(collectors, ("127.0.0.2", "127.0.0.3"), strict=True)):
            agent = Agent(agent_config(c, f"agent-{n}", f"net-{n}", source),
                          rng=random.Random(n))  # fmt: skip
            stops.append(asyncio.Event())
            tasks.append(asyncio.create_task(agent.run(stops[-1])))
        # Both streams open before the reports arrive: the second collector's agent learns of
        # them from the assignment log, not at its hello.
        await eventually(lambda: all(c.hub.connected() for c in collectors), 15, "both agents")
        out = io.StringIO()
        assert await import_file(reports, f"127.0.0.1:{collectors[0].grpc_port}", out=out) == 0

        def states() -> dict[str, str]:
            conn = connect_readonly(pg_dsn)
            try:
                return {s.url.rsplit("/", 1)[1]: s.state for s in url_statuses(conn)}
            finally:
                conn.close()

        def probed_by_both() -> bool:
            conn = connect_readonly(pg_dsn)
            try:
                pairs = conn.execute("SELECT DISTINCT agent_id, url_id FROM results").fetchall()
            finally:
                conn.close()
            return len(pairs) == 2 * len(paths)

        available = dict.fromkeys([p.strip("/") for p in paths], "available")
        await eventually(probed_by_both, 30, "every URL probed by both agents")
        await eventually(lambda: states() == available, 30, "every URL seen available")
        hoster.set_fate("/a-404", Fate.GONE_404)
        hoster.set_fate("/b-410", Fate.GONE_410)
        removed = {**available, "a-404": "removed", "b-410": "removed"}
        await eventually(lambda: states() == removed, 30, "both removals confirmed")

        async def counted() -> bool:
            total = 0.0
            for c in collectors:
                metrics = await scrape(c.metrics_port)
                total += sum(s.value for s in metrics.get("takedown_urls", []))
            return total == len(paths)

        await eventually(counted, 20, "each URL counted by exactly one collector")
        shards = [(await scrape(c.metrics_port))["takedown_collector_shards_held"][0].value
                  for c in collectors]  # fmt: skip
        assert sum(shards) == SHARDS and min(shards) > 0
        held = [c.writer.held_shards() for c in collectors]
        assert held[0] is not None and held[1] is not None
        assert held[0].isdisjoint(held[1]) and len(held[0]) + len(held[1]) == SHARDS
    finally:
        for stop in stops:
            stop.set()
        for task in tasks:
            await asyncio.wait_for(task, timeout=15)
        for c in collectors:
            await c.stop(grace=1)
    again = refolded_on_sqlite(pg_dsn, tmp_path / "refolded.db", prefixes, config.policy)
    assert again == verdicts(pg_dsn)


def test_the_evidence_log_has_one_writer(pg_dsn: str, tmp_path: Path) -> None:
    """A collector keeping the evidence log runs alone on its database: another, with the
    log or without it, is refused by name; once the first stops, another may start."""
    keeper = Store(pg_dsn, table(tmp_path), Policy(), log_signer=NoteSigner.generate("t/log"))
    try:
        for signer in (NoteSigner.generate("t/log"), None):
            with pytest.raises(StoreError, match="evidence log runs on this database"):
                Store(pg_dsn, table(tmp_path), Policy(), log_signer=signer)
    finally:
        keeper.close()
    Store(pg_dsn, table(tmp_path), Policy()).close()
