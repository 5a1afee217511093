"""The collector's gRPC services over a real grpc.aio server and a real SQLite file."""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from agent.assignment import Assignment, AssignmentChange
from client.digests import BUCKETS
from collector.server import Collector
from collector.service import ASSIGNMENT_CHUNK, AgentHub, AgentSession
from collector.store.model import Target
from collector.store.reads import connect_readonly, results_count, url_statuses
from protos.takedown.v1 import takedown_pb2 as pb
from protos.takedown.v1 import takedown_pb2_grpc as pb_grpc

pytestmark = pytest.mark.integration

NOW_US = int(time.time() * 1_000_000)


@pytest.fixture
async def channel(collector: Collector) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{collector.grpc_port}") as ch:
        yield ch


def report(url: str, reference: str = "", notified_us: int = NOW_US) -> pb.Report:
    return pb.Report(url=url, reference=reference, notified_at_unix_us=notified_us)


def result(url_id: int, seq: int, status: int = 200) -> pb.ProbeResult:
    return pb.ProbeResult(
        url_id=url_id,
        seq=seq,
        started_at_unix_us=NOW_US + seq,
        status=status,
        body_sha256=hashlib.sha256(b"x").digest() if status == 200 else b"",
        peer_ip="127.0.0.10",
        final_url="http://example.test/x",
    )


class TestIntake:
    async def test_same_reference_twice_is_not_duplicated(self, channel: grpc.aio.Channel) -> None:
        """Submitting a known reference answers ALREADY_KNOWN with the same ids."""
        stub = pb_grpc.IntakeStub(channel)
        first = await stub.Submit(pb.SubmitRequest(reports=[report("http://a.example/1", "R1")]))
        again = await stub.Submit(pb.SubmitRequest(reports=[report("http://a.example/1", "R1")]))
        assert first.outcomes[0].status == pb.SUBMIT_STATUS_ACCEPTED
        assert again.outcomes[0].status == pb.SUBMIT_STATUS_ALREADY_KNOWN
        assert again.outcomes[0].report_id == first.outcomes[0].report_id

    async def test_without_reference_same_url_and_notice_is_known(
        self, channel: grpc.aio.Channel
    ) -> None:
        """Without a reference, the same URL with the same notice time is recognised."""
        stub = pb_grpc.IntakeStub(channel)
        await stub.Submit(pb.SubmitRequest(reports=[report("http://a.example/2")]))
        again = await stub.Submit(pb.SubmitRequest(reports=[report("http://a.example/2")]))
        assert again.outcomes[0].status == pb.SUBMIT_STATUS_ALREADY_KNOWN

    async def test_bad_reports_are_rejected_one_by_one(
        self, channel: grpc.aio.Channel, collector: Collector
    ) -> None:
        """Each bad report gets its own reason; the good ones in the same request are stored."""
        stub = pb_grpc.IntakeStub(channel)
        response = await stub.Submit(
            pb.SubmitRequest(
                reports=[
                    report("ftp://a.example/x", "B1"),
                    report("http://a.example/ok", "B2"),
                    report("http://a.example/y", "B3", notified_us=0),
                    report("http://a.example/z", "B4", notified_us=NOW_US * 3),
                ]
            )
        )
        statuses = [o.status for o in response.outcomes]
        assert statuses == [
            pb.SUBMIT_STATUS_REJECTED,
            pb.SUBMIT_STATUS_ACCEPTED,
            pb.SUBMIT_STATUS_REJECTED,
            pb.SUBMIT_STATUS_REJECTED,
        ]
        assert "url" in response.outcomes[0].error
        assert "notified_at" in response.outcomes[2].error
        assert "notified_at" in response.outcomes[3].error
        conn = connect_readonly(collector.config.db)
        assert [s.url for s in url_statuses(conn)] == ["http://a.example/ok"]
        conn.close()


async def open_stream(
    channel: grpc.aio.Channel, name: str = "test-agent"
) -> grpc.aio.StreamStreamCall[pb.AgentMessage, pb.CollectorMessage]:
    call = pb_grpc.AgentLinkStub(channel).Connect()  # type: ignore[call-arg]
    await call.write(pb.AgentMessage(hello=pb.Hello(agent=name, network="net", version="t")))
    welcome = await call.read()
    assert welcome.HasField("welcome")
    return call


async def next_of(
    call: grpc.aio.StreamStreamCall[pb.AgentMessage, pb.CollectorMessage], kind: str
) -> pb.CollectorMessage:
    while True:
        message = await call.read()
        assert message is not grpc.aio.EOF
        if message.WhichOneof("kind") == kind:
            return message


class TestAgentStream:
    async def test_stream_must_open_with_hello(self, channel: grpc.aio.Channel) -> None:
        """A batch before hello ends the stream with INVALID_ARGUMENT."""
        call = pb_grpc.AgentLinkStub(channel).Connect()  # type: ignore[call-arg]
        await call.write(pb.AgentMessage(batch=pb.ResultBatch(batch_id=1)))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call.read()
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    async def test_assignment_is_pushed_on_connect_and_on_import(
        self, channel: grpc.aio.Channel
    ) -> None:
        """A new agent (holding nothing) gets every target as an addition, then in_sync; later
        imports come as additions too."""
        stub = pb_grpc.IntakeStub(channel)
        await stub.Submit(pb.SubmitRequest(reports=[report("http://a.example/1", "A1")]))
        call = await open_stream(channel)
        full = await next_of(call, "assignment")
        assert full.assignment.in_sync
        assert not full.assignment.replace_buckets  # nothing held, nothing to replace
        assert [t.url for t in full.assignment.upsert] == ["http://a.example/1"]
        await stub.Submit(pb.SubmitRequest(reports=[report("http://a.example/2", "A2")]))
        delta = await next_of(call, "assignment")
        assert not delta.assignment.replace_buckets
        assert [t.url for t in delta.assignment.upsert] == ["http://a.example/2"]
        assert delta.assignment.upsert[0].interval_ms == 1000
        call.cancel()

    async def test_reconnect_with_same_assignment_sends_nothing(
        self, channel: grpc.aio.Channel
    ) -> None:
        """An agent whose digests match the collector's gets no targets again, only in_sync."""
        stub = pb_grpc.IntakeStub(channel)
        reports = [report(f"http://a.example/{i}", f"S{i}") for i in range(50)]
        await stub.Submit(pb.SubmitRequest(reports=reports))
        held = Assignment()
        first = await open_stream(channel)
        update = (await next_of(first, "assignment")).assignment
        held.apply(
            AssignmentChange(
                upsert=tuple((t.url_id, t.url, t.interval_ms / 1000) for t in update.upsert),
                replace_buckets=tuple(update.replace_buckets),
            )
        )
        first.cancel()
        again = pb_grpc.AgentLinkStub(channel).Connect()  # type: ignore[call-arg]
        hello = pb.Hello(agent="test-agent", network="net", version="t")
        hello.assignment_digests.extend(held.digest_list())
        await again.write(pb.AgentMessage(hello=hello))
        assert (await again.read()).HasField("welcome")
        sync = (await next_of(again, "assignment")).assignment
        assert len(held) == 50
        assert sync.in_sync and not sync.upsert and not sync.replace_buckets
        again.cancel()

    async def test_redelivered_batch_is_stored_once(
        self, channel: grpc.aio.Channel, collector: Collector
    ) -> None:
        """A batch sent twice is acknowledged twice but its results are stored once."""
        stub = pb_grpc.IntakeStub(channel)
        sub = await stub.Submit(pb.SubmitRequest(reports=[report("http://a.example/1", "D1")]))
        url_id = sub.outcomes[0].url_id
        call = await open_stream(channel)
        batch = pb.ResultBatch(batch_id=7, results=[result(url_id, s) for s in range(1, 301)])
        await call.write(pb.AgentMessage(batch=batch))
        first = await next_of(call, "ack")
        await call.write(pb.AgentMessage(batch=batch))
        second = await next_of(call, "ack")
        assert (first.ack.batch_id, first.ack.stored, first.ack.duplicates) == (7, 300, 0)
        assert (second.ack.stored, second.ack.duplicates) == (0, 300)
        conn = connect_readonly(collector.config.db)
        assert results_count(conn, "test-agent") == 300
        conn.close()
        call.cancel()

    async def test_ack_comes_after_commit(
        self, channel: grpc.aio.Channel, collector: Collector
    ) -> None:
        """When the ack arrives, a fresh read connection already sees the results."""
        stub = pb_grpc.IntakeStub(channel)
        sub = await stub.Submit(pb.SubmitRequest(reports=[report("http://a.example/1", "C1")]))
        call = await open_stream(channel)
        url_id = sub.outcomes[0].url_id
        batch = pb.ResultBatch(batch_id=1, results=[result(url_id, 1), result(url_id, 2, 404)])
        await call.write(pb.AgentMessage(batch=batch))
        await next_of(call, "ack")
        conn = connect_readonly(collector.config.db)
        assert results_count(conn, "test-agent", url_id) == 2
        conn.close()
        call.cancel()

    async def test_unknown_urls_and_bad_fields_are_rejected_not_stored(
        self, channel: grpc.aio.Channel, collector: Collector, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Results for unknown URLs, with impossible fields, from the future or from before the
        URL was reported are rejected, each reason logged, and nothing stored changes."""
        stub = pb_grpc.IntakeStub(channel)
        sub = await stub.Submit(pb.SubmitRequest(reports=[report("http://a.example/1", "U1")]))
        url_id = sub.outcomes[0].url_id
        bad_hash = result(url_id, 3)
        bad_hash.body_sha256 = b"short"
        bad_time = result(url_id, 4)
        bad_time.started_at_unix_us = 5
        future = result(url_id, 5)
        future.started_at_unix_us = NOW_US + 7200 * 1_000_000
        ancient = result(url_id, 6)
        ancient.started_at_unix_us = NOW_US - 3 * 86400 * 1_000_000
        call = await open_stream(channel)
        batch = pb.ResultBatch(batch_id=2, results=[result(url_id, 1), result(9999, 2)])
        await call.write(pb.AgentMessage(batch=batch))
        ack = await next_of(call, "ack")
        assert (ack.ack.stored, ack.ack.rejected) == (1, 1)
        conn = connect_readonly(collector.config.db)

        def history() -> list[tuple[object, ...]]:  # written with each batch (url_state is not)
            return conn.execute(
                "SELECT 'event', url_id, at, kind, detail FROM url_events UNION ALL"
                " SELECT 'episode', url_id, episode, opened_at, confirmed_at FROM episodes"
                " ORDER BY 1, 2, 3, 4"
            ).fetchall()

        try:
            before = history()
            assert results_count(conn) == 1
            for batch_id, bad in enumerate((bad_hash, bad_time, future, ancient), start=3):
                batch = pb.ResultBatch(batch_id=batch_id, results=[bad])
                await call.write(pb.AgentMessage(batch=batch))
                ack = await next_of(call, "ack")
                assert (ack.ack.stored, ack.ack.rejected) == (0, 1), bad
            assert results_count(conn) == 1
            assert history() == before
        finally:
            conn.close()
        logged = caplog.text
        assert "body_sha256 has 5 bytes" in logged
        assert "is before 2000-01-01" in logged
        assert "ahead of the collector's clock" in logged
        assert f"is before URL id {url_id} was reported" in logged
        assert "URL id 9999 is unknown or no longer watched" in logged
        call.cancel()

    async def test_oversized_message_is_refused(self, channel: grpc.aio.Channel) -> None:
        """A message over the size limit ends the stream with RESOURCE_EXHAUSTED."""
        call = await open_stream(channel)
        huge = pb.ResultBatch(
            batch_id=1, results=[pb.ProbeResult(url_id=1, final_url="x" * 8000)] * 2500
        )
        await call.write(pb.AgentMessage(batch=huge))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            while True:
                await call.read()
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    async def test_streams_ended_mid_assignment_leave_the_collector_serving(
        self, channel: grpc.aio.Channel
    ) -> None:
        """Agents that hang up while their assignment is being read (the read runs in a worker
        thread) do not take the collector down: the reader's connection is closed only after
        its step ends. Afterwards a new agent still receives the whole assignment."""
        stub = pb_grpc.IntakeStub(channel)
        for chunk in range(6):
            reports = [
                report(f"http://m.example/{chunk}/{i}", f"M{chunk}-{i}") for i in range(5000)
            ]
            await stub.Submit(pb.SubmitRequest(reports=reports))
        # Digests that match nothing: every bucket is re-read, sorted, in the first step.
        stale = pb.Hello(network="net", version="t", assignment_digests=[1] * BUCKETS)
        for n in range(30):
            call = pb_grpc.AgentLinkStub(channel).Connect()  # type: ignore[call-arg]
            stale.agent = f"hang-up-{n}"
            await call.write(pb.AgentMessage(hello=stale))
            assert (await call.read()).HasField("welcome")
            call.cancel()  # while the first step reads
        call = await open_stream(channel, "stays")
        received = 0
        while True:
            update = (await next_of(call, "assignment")).assignment
            received += len(update.upsert)
            if update.in_sync:
                break
        call.cancel()
        assert received == 30_000


class TestHealth:
    async def test_health_service_reports_serving(self, channel: grpc.aio.Channel) -> None:
        """The standard gRPC health service answers SERVING for the server and each service."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "takedown.v1.AgentLink", "takedown.v1.Intake"):
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


class TestClockOffset:
    async def test_skewed_agent_clock_is_estimated_and_flagged(
        self, channel: grpc.aio.Channel, collector: Collector
    ) -> None:
        """An agent two minutes ahead shows an offset near +120 s and its results are flagged."""
        import sqlite3

        from tests.conftest import scrape

        stub = pb_grpc.IntakeStub(channel)
        sub = await stub.Submit(pb.SubmitRequest(reports=[report("http://a.example/1", "K1")]))
        call = await open_stream(channel, name="skewed")
        ahead = int((time.time() + 120) * 1_000_000)
        batch = pb.ResultBatch(batch_id=1, results=[result(sub.outcomes[0].url_id, 1)])
        batch.sent_at_unix_us = ahead
        await call.write(pb.AgentMessage(batch=batch))
        await next_of(call, "ack")
        metrics = await scrape(collector.metrics_port)
        offsets = {
            s.labels["agent"]: s.value for s in metrics["takedown_agent_clock_offset_seconds"]
        }
        assert 115 < offsets["skewed"] <= 120.5
        conn = sqlite3.connect(collector.config.db)
        (flag,) = conn.execute("SELECT clock_suspect FROM results").fetchone()
        conn.close()
        assert flag == 1
        call.cancel()


async def test_a_replan_of_many_urls_reaches_agents_in_chunks() -> None:
    """A replan that changes every URL at once (URLs imported together change phase together)
    reaches each agent in messages of at most ASSIGNMENT_CHUNK targets, in order, far under
    the agents' 16 MiB message limit; a session still reconciling holds them until it is in
    sync."""
    hub = AgentHub()
    ready, reconciling = AgentSession(1, "a1", "n1"), AgentSession(2, "a2", "n2")
    ready.ready = True
    hub.join(ready)
    hub.join(reconciling)
    n = 2 * ASSIGNMENT_CHUNK + 500
    url = "https://files.example.org/" + "x" * 200
    hub.publish([Target(i, f"{url}/{i}", 900.0) for i in range(n)], retired=[n + 1, n + 2])
    sent = [ready.outbox.get_nowait() for _ in range(ready.outbox.qsize())]
    assert [len(m.assignment.upsert) for m in sent] == [ASSIGNMENT_CHUNK] * 2 + [500]
    assert [t.url_id for m in sent for t in m.assignment.upsert] == list(range(n))
    assert [u for m in sent for u in m.assignment.remove] == [n + 1, n + 2]
    assert max(m.ByteSize() for m in sent) < 1 << 20
    assert reconciling.outbox.empty() and len(reconciling.held) == 3
    reconciling.release()
    assert reconciling.outbox.qsize() == 3


@pytest.mark.parametrize("damaged", [False, True])
async def test_integrity_is_checked_once_serving_after_an_unclean_stop(
    tmp_path: Path, prefixes: Path, caplog: pytest.LogCaptureFixture, damaged: bool
) -> None:
    """After a crash the collector serves first and checks the database beside it: intact, it
    records so; damaged, it says what is wrong, turns NOT_SERVING and takes nothing more."""
    import asyncio
    import logging
    import sqlite3

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from collector.attribution import PrefixTable
    from collector.method import Policy
    from collector.reports_file import ReportIn
    from collector.schedule import Planner
    from collector.store import Store
    from tests.conftest import collector_config

    caplog.set_level(logging.INFO, logger="collector.server")
    config = collector_config(tmp_path, prefixes)
    store = Store(config.db, PrefixTable.from_csv(prefixes), Policy())
    store.submit_reports(
        [ReportIn(f"http://x.example/{i}", time.time() - 60, None, f"R{i}") for i in range(300)],
        time.time(), Planner(),
    )  # fmt: skip
    store.conn.close()  # SIGKILL: the next start must check
    if damaged:
        with sqlite3.connect(config.db) as conn:
            (pages,) = conn.execute("PRAGMA page_count").fetchone()
            (size,) = conn.execute("PRAGMA page_size").fetchone()
        with config.db.open("r+b") as f:
            f.seek(size * (pages // 2) + 16)
            f.write(b"\xff" * 512)
    collector = Collector(config)
    await collector.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{collector.grpc_port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + 30
            want = "database_integrity_failed" if damaged else "database_integrity_ok"
            while want not in caplog.text:
                assert time.monotonic() < deadline, f"no {want} in the log"
                await asyncio.sleep(0.05)
            unchecked = await collector.writer.run(lambda s: s.unchecked)
            reply = await health.Check(health_pb2.HealthCheckRequest(service="takedown.v1.Intake"))
            stub = pb_grpc.IntakeStub(channel)
            if not damaged:
                assert not unchecked  # the next clean stop may skip the check
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
                return
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Submit(pb.SubmitRequest(reports=[report("http://y.example/1", "N")]))
            assert "integrity check failed" in (refused.value.details() or "")
    finally:
        await collector.stop(grace=1)
