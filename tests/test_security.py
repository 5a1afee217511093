"""Issue 5: only trusted agents and hotlines get in.

Real grpc.aio collectors on 127.0.0.1 with TLS (certificates made in the test by
the project's own CA helper, and by trustme for a foreign CA), tokens in the real
SQLite file, real agents probing the sample hoster, and the real command line.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import ipaddress
import logging
import os
import random
import socket
import sqlite3
import stat
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import pytest
import trustme
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agent.link import CollectorRefused
from agent.main import Agent, AgentConfig
from agent.probe import ProbeConfig
from agent.result import ProbeResult
from client.credentials import ClientTLS, CredentialError, exposed, read_token
from collector.auth import ServerTLS
from collector.cli import main as collector_main
from collector.importer import import_file
from collector.method import Policy
from collector.pki import init_ca, issue
from collector.ratelimit import RateLimiter, TokenBucket
from collector.schedule import Planner
from collector.server import Collector, CollectorConfig
from collector.store.credentials import add_credential, connect_credentials, revoke_credentials
from collector.store.reads import connect_readonly, results_count
from collector.tokens import new_token
from demo.hoster import Hoster
from protos.takedown.v1 import takedown_pb2 as pb
from protos.takedown.v1 import takedown_pb2_grpc as pb_grpc
from tests.conftest import HOST_A, eventually, scrape

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
COLLECTOR_BIN = str(BIN / "takedown-collector")
AGENT_BIN = str(BIN / "takedown-agent")
NOW_US = int(time.time() * 1_000_000)


# -- certificates and tokens ------------------------------------------------------------------


@dataclass(frozen=True)
class PKI:
    dir: Path

    @property
    def ca(self) -> Path:
        return self.dir / "ca.pem"

    def cert(self, name: str) -> tuple[Path, Path]:
        if not (self.dir / f"{name}.pem").exists():
            issue(self.dir, name)
        return self.dir / f"{name}.pem", self.dir / f"{name}.key"

    def client(self, name: str | None = None) -> ClientTLS:
        """Trust this CA; with a name, also present that name's client certificate."""
        if name is None:
            return ClientTLS(ca_file=self.ca)
        cert, key = self.cert(name)
        return ClientTLS(ca_file=self.ca, cert_file=cert, key_file=key)

    def server(self, mutual: bool = False) -> ServerTLS:
        return ServerTLS(
            self.dir / "collector.pem",
            self.dir / "collector.key",
            self.ca if mutual else None,
        )


@pytest.fixture
def pki(tmp_path: Path) -> PKI:
    ca_dir = tmp_path / "ca"
    init_ca(ca_dir)
    issue(ca_dir, "collector", server=True, ips=["127.0.0.1"], dns=["localhost"])
    return PKI(ca_dir)


def add_token(db: Path, role: str, name: str, network: str | None = None) -> str:
    made = new_token()
    conn = connect_credentials(db)
    try:
        add_credential(conn, role, name, network, made.token_id, made.digest, time.time())
    finally:
        conn.close()
    return made.token


def revoke(db: Path, role: str, name: str) -> None:
    conn = connect_credentials(db)
    try:
        assert revoke_credentials(conn, role, name, time.time()) == 1
    finally:
        conn.close()


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


# -- collectors, channels, agents -------------------------------------------------------------

MakeCollector = Callable[..., Awaitable[Collector]]


@pytest.fixture
async def make_collector(tmp_path: Path, prefixes: Path) -> AsyncIterator[MakeCollector]:
    """Start collectors with TLS and tokens required; keyword arguments override the config."""
    started: list[Collector] = []

    async def make(**overrides: Any) -> Collector:
        config = CollectorConfig(
            db=tmp_path / "collector.db",
            listen="127.0.0.1:0",
            metrics_listen="127.0.0.1:0",
            prefixes=prefixes,
            planner=replace(Planner.fixed(1.0), deadlines=(3600.0,)),
            policy=Policy(confirmations=2),
            deadlines=(3600.0,),
            require_tokens=True,
        )
        collector = Collector(replace(config, **overrides))
        await collector.start()
        started.append(collector)
        return collector

    yield make
    for collector in started:
        await collector.stop(grace=1)


@contextlib.asynccontextmanager
async def channel(collector: Collector, tls: ClientTLS) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.secure_channel(f"127.0.0.1:{collector.grpc_port}", tls.credentials()) as ch:
        yield ch


Stream = grpc.aio.StreamStreamCall[pb.AgentMessage, pb.CollectorMessage]


async def hello(ch: grpc.aio.Channel, name: str, token: str | None, network: str = "net") -> Stream:
    """Open a stream, say hello and wait for the welcome (or the refusal, raised)."""
    call = pb_grpc.AgentLinkStub(ch).Connect(  # type: ignore[call-arg]
        metadata=bearer(token) if token else None
    )
    await call.write(pb.AgentMessage(hello=pb.Hello(agent=name, network=network, version="t")))
    first = await call.read()
    assert first is not grpc.aio.EOF and first.HasField("welcome")
    return call


async def refusal(call: Stream) -> grpc.StatusCode:
    """Read until the stream ends with an error; its status code."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        while True:
            message = await call.read()
            assert message is not grpc.aio.EOF, "the stream ended without an error"
    return info.value.code()


async def submit(ch: grpc.aio.Channel, token: str | None, *urls: str) -> pb.SubmitResponse:
    reports = [pb.Report(url=u, reference=u, notified_at_unix_us=NOW_US) for u in urls]
    return await pb_grpc.IntakeStub(ch).Submit(
        pb.SubmitRequest(reports=reports), metadata=bearer(token) if token else None
    )


def probe_result(url_id: int, seq: int) -> pb.ProbeResult:
    return pb.ProbeResult(
        url_id=url_id,
        seq=seq,
        started_at_unix_us=NOW_US + seq,
        status=200,
        body_sha256=hashlib.sha256(b"x").digest(),
        peer_ip=HOST_A,
    )


async def next_ack(call: Stream) -> pb.BatchAck:
    while True:
        message = await call.read()
        assert message is not grpc.aio.EOF
        if message.HasField("ack"):
            return message.ack


def stored(collector: Collector, agent: str | None = None) -> int:
    conn = connect_readonly(collector.config.db)
    try:
        return results_count(conn, agent)
    finally:
        conn.close()


@dataclass
class Running:
    agent: Agent
    stop: asyncio.Event
    task: asyncio.Task[None]


@pytest.fixture
async def run_agent() -> AsyncIterator[Callable[..., Running]]:
    """Start real agents on 127.0.0.2; stopped at the end (a refused one has already ended)."""
    running: list[Running] = []

    def start(collector: Collector, name: str, **config: Any) -> Running:
        agent = Agent(
            AgentConfig(
                collector=f"127.0.0.1:{collector.grpc_port}",
                name=name,
                network=config.pop("network", "net"),
                probe=ProbeConfig(
                    total_timeout=5, connect_timeout=2, read_timeout=3, source_address="127.0.0.2"
                ),
                allow_private=(ipaddress.ip_network("127.0.0.0/8"),),
                flush_interval=0.1,
                first_spread=0.2,
                **config,
            ),
            rng=random.Random(name),
        )
        stop = asyncio.Event()
        one = Running(agent, stop, asyncio.create_task(agent.run(stop)))
        running.append(one)
        return one

    yield start
    for one in running:
        one.stop.set()
    for one in running:
        with contextlib.suppress(CollectorRefused):
            await asyncio.wait_for(one.task, timeout=15)


async def import_urls(collector: Collector, pki: PKI, token: str, *urls: str) -> list[int]:
    async with channel(collector, pki.client()) as ch:
        response = await submit(ch, token, *urls)
    assert all(o.status == pb.SUBMIT_STATUS_ACCEPTED for o in response.outcomes)
    return [o.url_id for o in response.outcomes]


# -- the tests --------------------------------------------------------------------------------


class TestTransport:
    async def test_tls_and_tokens_deliver_results_and_reports(
        self,
        make_collector: MakeCollector,
        pki: PKI,
        hoster: Hoster,
        run_agent: Callable[..., Running],
        tmp_path: Path,
    ) -> None:
        """Over TLS with a token each, the import is accepted and the agent's results stored."""
        collector = await make_collector(tls=pki.server())
        db = collector.config.db
        agent_token = add_token(db, "agent", "tls-agent", network="net")
        intake_token = add_token(db, "intake", "hotline")
        hoster.add("/page")
        reports = tmp_path / "r.csv"
        reports.write_text(
            f"url,notified_at\nhttp://{HOST_A}:{hoster.port}/page,2026-01-05T10:00:00Z\n"
        )
        out = io.StringIO()
        target = f"127.0.0.1:{collector.grpc_port}"
        status = await import_file(reports, target, out=out, tls=pki.client(), token=intake_token)
        assert status == 0, out.getvalue()
        assert "accepted 1," in out.getvalue()
        run_agent(collector, "tls-agent", tls=pki.client(), token=agent_token)
        await eventually(lambda: stored(collector, "tls-agent") >= 2, 30, "results over TLS")

    async def test_mutual_tls_with_matching_certificate(
        self,
        make_collector: MakeCollector,
        pki: PKI,
        hoster: Hoster,
        run_agent: Callable[..., Running],
    ) -> None:
        """With a client CA, an agent whose certificate names it (and its token) is let in."""
        collector = await make_collector(tls=pki.server(mutual=True))
        db = collector.config.db
        token = add_token(db, "agent", "m-agent")
        hoster.add("/m")
        async with channel(collector, pki.client("hotline-1")) as ch:
            await submit(
                ch, add_token(db, "intake", "hotline-1"), f"http://{HOST_A}:{hoster.port}/m"
            )
        run_agent(collector, "m-agent", tls=pki.client("m-agent"), token=token)
        await eventually(lambda: stored(collector, "m-agent") >= 2, 30, "results over mTLS")

    async def test_wrong_ca_cannot_connect(self, make_collector: MakeCollector, pki: PKI) -> None:
        """A client that trusts another CA fails the handshake: UNAVAILABLE, nothing sent."""
        collector = await make_collector(tls=pki.server())
        token = add_token(collector.config.db, "intake", "hotline")
        foreign = trustme.CA()
        ca_file = pki.dir.parent / "foreign-ca.pem"
        foreign.cert_pem.write_to_path(str(ca_file))
        async with channel(collector, ClientTLS(ca_file=ca_file)) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await submit(ch, token, "http://a.example/1")
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE

    async def test_mutual_tls_refuses_client_without_or_with_foreign_certificate(
        self, make_collector: MakeCollector, pki: PKI
    ) -> None:
        """With a client CA, no client certificate, or one from another CA, fails the handshake."""
        collector = await make_collector(tls=pki.server(mutual=True))
        token = add_token(collector.config.db, "intake", "hotline")
        foreign = trustme.CA()
        leaf = foreign.issue_cert("hotline")
        cert, key = pki.dir.parent / "f.pem", pki.dir.parent / "f.key"
        leaf.cert_chain_pems[0].write_to_path(str(cert))
        leaf.private_key_pem.write_to_path(str(key))
        for tls in (pki.client(), ClientTLS(ca_file=pki.ca, cert_file=cert, key_file=key)):
            async with channel(collector, tls) as ch:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await submit(ch, token, "http://a.example/1")
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE

    async def test_agent_certificate_for_another_name_is_permission_denied(
        self,
        make_collector: MakeCollector,
        pki: PKI,
        run_agent: Callable[..., Running],
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """An agent presenting another agent's certificate is refused: the agent exits refused."""
        collector = await make_collector(tls=pki.server(mutual=True))
        token = add_token(collector.config.db, "agent", "agent-a")
        one = run_agent(collector, "agent-a", tls=pki.client("agent-b"), token=token)
        with pytest.raises(CollectorRefused, match="PERMISSION_DENIED"):
            await asyncio.wait_for(one.task, 15)
        assert stored(collector) == 0
        assert "reason=cert_mismatch" in caplog.text
        assert collector.hub.connected() == {}

    async def test_health_is_open_over_tls(self, make_collector: MakeCollector, pki: PKI) -> None:
        """Health checks need no token (probes of orchestrators), still over TLS."""
        collector = await make_collector(tls=pki.server())
        async with channel(collector, pki.client()) as ch:
            reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


class TestTokens:
    @pytest.fixture
    async def collector(self, make_collector: MakeCollector, pki: PKI) -> Collector:
        return await make_collector(tls=pki.server())

    async def test_missing_malformed_and_unknown_tokens_are_unauthenticated(
        self, collector: Collector, pki: PKI
    ) -> None:
        """No token, a malformed one, or a well-formed one the collector never issued."""
        never_issued = new_token().token
        async with channel(collector, pki.client()) as ch:
            for token in (None, "not-a-token", never_issued):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await submit(ch, token, "http://a.example/1")
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, token
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await hello(ch, "someone", token)
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, token
        metrics = await scrape(collector.metrics_port)
        refusals = {
            s.labels["reason"]: s.value for s in metrics["takedown_collector_auth_refusals_total"]
        }
        assert refusals == {"missing": 2, "malformed": 2, "unknown": 2}

    async def test_revoked_token_is_unauthenticated(self, collector: Collector, pki: PKI) -> None:
        """A revoked token is refused at the next call, and its open stream is ended."""
        db = collector.config.db
        agent_token = add_token(db, "agent", "rev-agent")
        intake_token = add_token(db, "intake", "rev-hotline")
        async with channel(collector, pki.client()) as ch:
            await submit(ch, intake_token, "http://a.example/1")
            live = await hello(ch, "rev-agent", agent_token)
            revoke(db, "agent", "rev-agent")
            revoke(db, "intake", "rev-hotline")
            assert collector.gate is not None
            assert await collector.gate.revalidate() == 1
            assert await refusal(live) == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await hello(ch, "rev-agent", agent_token)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert info.value.details() == "token revoked"
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await submit(ch, intake_token, "http://a.example/2")
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        await eventually(lambda: not collector.hub.connected(), 5, "the session to leave")

    async def test_wrong_role_is_permission_denied(self, collector: Collector, pki: PKI) -> None:
        """An agent token cannot submit reports; an intake token cannot open an agent stream."""
        db = collector.config.db
        agent_token = add_token(db, "agent", "role-agent")
        intake_token = add_token(db, "intake", "role-agent")
        async with channel(collector, pki.client()) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await submit(ch, agent_token, "http://a.example/1")
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await hello(ch, "role-agent", intake_token)
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        conn = connect_readonly(db)
        assert conn.execute("SELECT COUNT(*) FROM urls").fetchone()[0] == 0
        conn.close()

    async def test_token_of_another_agent_or_network_is_permission_denied(
        self, collector: Collector, pki: PKI
    ) -> None:
        """The hello must name the token's agent, and its network if the token names one."""
        token = add_token(collector.config.db, "agent", "ams-1", network="nl-ams")
        async with channel(collector, pki.client()) as ch:
            for name, network in (("fra-1", "nl-ams"), ("ams-1", "de-fra")):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await hello(ch, name, token, network=network)
                assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
            (await hello(ch, "ams-1", token, network="nl-ams")).cancel()
        assert "fra-1" not in {n for n, _ in collector.hub.connected().values()}

    async def test_tokens_never_in_logs_or_in_the_database_in_clear(
        self, collector: Collector, pki: PKI, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Accepted, refused and revoked tokens appear nowhere in logs or the database files."""
        caplog.set_level(logging.DEBUG)
        db = collector.config.db
        agent_token = add_token(db, "agent", "quiet-agent")
        intake_token = add_token(db, "intake", "quiet-hotline")
        revoked_token = add_token(db, "agent", "gone-agent")
        revoke(db, "agent", "gone-agent")
        async with channel(collector, pki.client()) as ch:
            await submit(ch, intake_token, "http://a.example/1")
            (await hello(ch, "quiet-agent", agent_token)).cancel()
            for name, token in (("other", agent_token), ("gone-agent", revoked_token)):
                with pytest.raises(grpc.aio.AioRpcError):
                    await hello(ch, name, token)
            with pytest.raises(grpc.aio.AioRpcError):
                await submit(ch, agent_token, "http://a.example/2")
        await collector.writer.run(lambda s: s.conn.execute("PRAGMA wal_checkpoint(FULL)"))
        tokens = (agent_token, intake_token, revoked_token)
        # tdm_<8 hex>_<secret>: the secret's alphabet includes "_", so split at the fixed prefix.
        secrets = [t[len("tdm_12345678_") :] for t in tokens]
        assert all(len(secret) == 43 for secret in secrets)
        logged = caplog.text + "".join(str(r.args) for r in caplog.records)
        assert "auth_refused" in logged
        files = b"".join(p.read_bytes() for p in db.parent.glob(f"{db.name}*"))
        for token, secret in zip(tokens, secrets, strict=True):
            assert token not in logged and secret not in logged
            assert token.encode() not in files and secret.encode() not in files
        conn = sqlite3.connect(db)
        digests = {bytes(d) for (d,) in conn.execute("SELECT token_sha256 FROM credentials")}
        conn.close()
        assert digests == {hashlib.sha256(t.encode()).digest() for t in tokens}


class TestAssignment:
    async def test_results_for_unassigned_urls_are_rejected_and_counted(
        self, make_collector: MakeCollector, pki: PKI, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Unknown or retired URL ids are refused, counted, and logged with the count only."""
        caplog.set_level(logging.INFO)
        collector = await make_collector(tls=pki.server())
        db = collector.config.db
        agent_token = add_token(db, "agent", "a1")
        intake_token = add_token(db, "intake", "h")
        urls = ("http://kept.example/1", "http://retired.example/2")
        async with channel(collector, pki.client()) as ch:
            response = await submit(ch, intake_token, *urls)
            kept, retired = (o.url_id for o in response.outcomes)
            conn = sqlite3.connect(db)
            with conn:
                conn.execute("UPDATE urls SET active = 0 WHERE id = ?", (retired,))
            conn.close()
            call = await hello(ch, "a1", agent_token)
            batch = pb.ResultBatch(
                batch_id=1,
                results=[probe_result(kept, 1), probe_result(retired, 2), probe_result(9999, 3)],
            )
            await call.write(pb.AgentMessage(batch=batch))
            ack = await next_ack(call)
            call.cancel()
        assert (ack.stored, ack.rejected) == (1, 2)
        assert stored(collector, "a1") == 1
        metrics = await scrape(collector.metrics_port)
        outcomes = {
            s.labels["outcome"]: s.value for s in metrics["takedown_collector_results_total"]
        }
        assert outcomes["rejected"] == 2 and outcomes["stored"] == 1
        warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert any(w.startswith("results_refused agent=a1 count=2 ") for w in warnings)
        above_debug = " ".join(r.getMessage() for r in caplog.records if r.levelno > logging.DEBUG)
        assert not any(u in above_debug for u in urls)


class TestTokenBucket:
    def test_over_the_rate_waits_and_far_over_is_refused_taking_nothing(self) -> None:
        """Within the burst no wait; beyond it the wait is the debt over the rate; a batch whose
        wait would pass max_wait is refused and leaves the bucket as it was; time refills."""
        bucket = TokenBucket(rate=10.0, burst=10.0)
        assert bucket.reserve(10, now=100.0, max_wait=2.0) == 0.0
        assert bucket.reserve(5, now=100.0, max_wait=2.0) == pytest.approx(0.5)
        assert bucket.reserve(20, now=100.0, max_wait=2.0) is None  # would wait 2.5 s
        assert bucket.level == pytest.approx(-5.0)  # the refusal took nothing
        assert bucket.reserve(10, now=101.0, max_wait=2.0) == pytest.approx(0.5)
        assert bucket.reserve(1, now=200.0, max_wait=2.0) == 0.0  # refilled, capped at burst
        assert bucket.level == pytest.approx(9.0)

    def test_limiter_keeps_one_bucket_per_agent(self) -> None:
        limiter = RateLimiter(rate=1.0, burst=2.0, max_wait=5.0)
        assert limiter.reserve(1, 2, now=0.0) == 0.0
        assert limiter.reserve(1, 2, now=0.0) == pytest.approx(2.0)
        assert limiter.reserve(2, 2, now=0.0) == 0.0  # another agent, its own bucket


class TestRateLimit:
    async def test_over_the_limit_is_acked_late_and_far_over_is_refused(
        self, make_collector: MakeCollector, pki: PKI
    ) -> None:
        """A batch over the agent's bucket is stored and acked after the debt is paid (no
        reconnect); one that would wait past the limit ends the stream unacknowledged, and the
        same batch is stored once the agent resends it within the rate."""
        collector = await make_collector(
            tls=pki.server(),
            max_results_per_second=4.0,
            results_burst=4.0,
            rate_limit_max_wait=2.0,
        )
        db = collector.config.db
        agent_token = add_token(db, "agent", "fast")
        async with channel(collector, pki.client()) as ch:
            response = await submit(ch, add_token(db, "intake", "h"), "http://a.example/1")
            url_id = response.outcomes[0].url_id

            def batch(batch_id: int, seqs: range) -> pb.AgentMessage:
                results = [probe_result(url_id, seq) for seq in seqs]
                return pb.AgentMessage(batch=pb.ResultBatch(batch_id=batch_id, results=results))

            call = await hello(ch, "fast", agent_token)
            await call.write(batch(1, range(1, 5)))  # the burst
            first = await next_ack(call)
            await call.write(batch(2, range(5, 9)))  # 4 over: about 1 s late
            second = await next_ack(call)
            assert (first.stored, second.stored) == (4, 4)
            late = (second.stored_at_unix_us - first.stored_at_unix_us) / 1e6
            assert 0.9 <= late < 2.0, late
            await call.write(batch(3, range(9, 21)))  # 12 over: 3 s, past the 2 s allowed
            assert await refusal(call) == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert stored(collector, "fast") == 8
            again = await hello(ch, "fast", agent_token)
            await again.write(batch(4, range(9, 13)))  # within the rate again: acked late
            assert (await next_ack(again)).stored == 4
            again.cancel()
        assert stored(collector, "fast") == 12
        metrics = await scrape(collector.metrics_port)
        batches = {
            s.labels["outcome"]: s.value for s in metrics["takedown_collector_batches_total"]
        }
        assert batches["rate_limited"] == 1 and batches["acked"] == 3
        (delayed,) = metrics["takedown_collector_batches_delayed_total"]
        assert delayed.value == 2
        (waited,) = metrics["takedown_collector_rate_limit_wait_seconds_total"]
        assert waited.value == pytest.approx(2.0, abs=0.1)

    async def test_real_agent_is_slowed_but_loses_nothing(
        self,
        make_collector: MakeCollector,
        pki: PKI,
        hoster: Hoster,
        run_agent: Callable[..., Running],
    ) -> None:
        """An agent with a backlog over its limit is slowed by late acks on the same stream, and
        delivers every result without a reconnect."""
        collector = await make_collector(
            tls=pki.server(),
            planner=Planner.fixed(3600.0),
            max_results_per_second=8.0,
            results_burst=8.0,
        )
        db = collector.config.db
        paths = [f"/r{i}" for i in range(3)]
        for path in paths:
            hoster.add(path)
        url_ids = await import_urls(
            collector, pki, add_token(db, "intake", "h"),
            *(f"http://{HOST_A}:{hoster.port}{p}" for p in paths),
        )  # fmt: skip
        one = run_agent(
            collector, "eager", tls=pki.client(), token=add_token(db, "agent", "eager"),
            batch_size=4,
        )  # fmt: skip
        # A backlog (as after an outage) queued before the link connects: three batches sent
        # at once, so the third is over the bucket whatever the machine's speed.
        backlog = url_ids * 4
        for url_id in backlog:
            one.agent.outbox.add(
                ProbeResult(
                    url_id=url_id, started_at=time.time(), elapsed=0.01, status=200,
                    body_sha256=hashlib.sha256(b"x").digest(), peer_ip=HOST_A,
                )
            )  # fmt: skip
        await eventually(lambda: one.agent.probed >= len(paths), 20, "every URL probed once")
        await eventually(
            lambda: (
                len(one.agent.outbox) == 0
                and stored(collector, "eager") == len(backlog) + one.agent.probed
            ),
            40,
            "every result, backlog and probes",
        )
        assert one.agent.link.reconnects == 0
        metrics = await scrape(collector.metrics_port)
        (delayed,) = metrics["takedown_collector_batches_delayed_total"]
        assert delayed.value >= 1


# -- the command line -------------------------------------------------------------------------


async def cli(*args: str, within: float = 30) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), within)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.fixture
def no_takedown_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in list(os.environ):
        if name.startswith("TAKEDOWN_"):
            monkeypatch.delenv(name)
    yield


@pytest.mark.usefixtures("no_takedown_env")
class TestCommandLine:
    def test_ca_and_tokens_commands(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """ca init/issue write 0600 keys; agents add prints the token once; list; revoke."""
        ca = tmp_path / "ca"
        db = str(tmp_path / "c.db")

        def run(*args: str) -> tuple[int, str, str]:
            rc = collector_main(list(args))
            out, err = capsys.readouterr()
            return rc, out, err

        assert run("ca", "init", str(ca))[0] == 0
        rc, _, err = run("ca", "issue", str(ca), "--name", "collector", "--server", "--ip", "::1")
        assert rc == 0, err
        assert run("ca", "issue", str(ca), "--name", "ams-1")[0] == 0
        assert stat.S_IMODE(ca.stat().st_mode) == 0o700
        for key in ("ca.key", "collector.key", "ams-1.key"):
            assert stat.S_IMODE((ca / key).stat().st_mode) == 0o600
        rc, _, err = run("ca", "issue", str(ca), "--name", "ams-1")
        assert rc == 2 and "exists" in err
        rc, _, err = run("ca", "issue", str(ca), "--name", "x", "--server")
        assert rc == 2 and "--dns or --ip" in err

        rc, token, err = run("agents", "add", "ams-1", "--network", "nl-ams", "--db", db)
        assert rc == 0, err
        token = token.strip()
        assert token.startswith("tdm_") and "\n" not in token and token not in err
        rc, _, err = run("agents", "add", "ams-1", "--db", db)
        assert rc == 1 and "already has a live token" in err
        rc, out, _ = run("agents", "list", "--db", db)
        assert rc == 0 and "ams-1\tnl-ams\t" in out and token not in out
        rc, replaced, _ = run("agents", "add", "ams-1", "--replace", "--db", db)
        assert rc == 0 and replaced.strip() != token
        rc, hotline, _ = run("intake-tokens", "add", "hl", "--db", db)
        assert rc == 0 and hotline.startswith("tdm_")
        rc, _, err = run("agents", "revoke", "ams-1", "--db", db)
        assert rc == 0, err
        rc, _, err = run("agents", "revoke", "ams-1", "--db", db)
        assert rc == 1 and "no live token" in err
        rc, out, _ = run("agents", "list", "--db", db)
        header, *rows = out.splitlines()
        revoked = header.split("\t").index("revoked")
        assert [row.split("\t")[revoked] != "-" for row in rows] == [True, True]
        rc, out, _ = run("intake-tokens", "list", "--db", db)
        assert rc == 0 and out.splitlines()[1].startswith("hl\t")

    async def test_serve_needs_tls_unless_insecure(self, tmp_path: Path) -> None:
        """serve without certificates, or --auth none without --insecure, is a usage error."""
        db = str(tmp_path / "c.db")
        common = ("--db", db, "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0")
        no_tls, auth_none, insecure = await asyncio.gather(  # three processes side by side
            cli(COLLECTOR_BIN, "serve", *common),
            cli(COLLECTOR_BIN, "serve", *common, "--auth", "none", "--cert-file", db,
                "--key-file", db),
            cli(COLLECTOR_BIN, "serve", *common, "--insecure", "--cert-file", db),
        )  # fmt: skip
        rc, _, err = no_tls
        assert rc == 2 and "--cert-file" in err
        rc, _, err = auth_none
        assert rc == 2 and "--auth none" in err
        rc, _, err = insecure
        assert rc == 2 and "--insecure excludes" in err

    async def test_agent_and_import_need_a_token_unless_insecure(self, tmp_path: Path) -> None:
        """Without --insecure a token is required; a missing token file is named."""
        reports = tmp_path / "r.csv"
        reports.write_text("url,notified_at\nhttp://a.example/1,2026-01-05T10:00:00Z\n")
        missing = tmp_path / "nope.token"
        importer, agent, agent_file = await asyncio.gather(  # three processes side by side
            cli(COLLECTOR_BIN, "import", str(reports), "--collector", "x:1"),
            cli(AGENT_BIN, "--collector", "127.0.0.1:1", "--network", "n"),
            cli(AGENT_BIN, "--collector", "127.0.0.1:1", "--network", "n", "--token-file",
                str(missing)),
        )  # fmt: skip
        rc, _, err = importer
        assert rc == 2 and "token is required" in err
        rc, _, err = agent
        assert rc == 2 and "token is required" in err
        rc, _, err = agent_file
        assert rc == 2 and str(missing) in err and "Traceback" not in err


@pytest.mark.usefixtures("no_takedown_env")
class TestConfigurationErrors:
    """A mistake only the operator can mend ends the program with its cause; the rest retry,
    each retry logged with its cause."""

    @pytest.fixture
    def reports(self, tmp_path: Path) -> Path:
        path = tmp_path / "r.csv"
        path.write_text("url,notified_at\nhttp://a.example/1,2026-01-05T10:00:00Z\n")
        return path

    @staticmethod
    def token_file(tmp_path: Path, token: str) -> str:
        path = tmp_path / "t.token"
        path.write_text(token)
        path.chmod(0o600)
        return str(path)

    async def test_untrusted_certificate_ends_the_agent(
        self, make_collector: MakeCollector, pki: PKI, tmp_path: Path
    ) -> None:
        """An agent whose --ca-file did not sign the collector's certificate exits 2 at once,
        naming the handshake failure and --ca-file, without a traceback."""
        collector = await make_collector(tls=pki.server())
        other = tmp_path / "other-ca"
        init_ca(other)
        token = add_token(collector.config.db, "agent", "a1")
        rc, _, err = await cli(
            AGENT_BIN, "--collector", f"127.0.0.1:{collector.grpc_port}", "--network", "net",
            "--name", "a1", "--ca-file", str(other / "ca.pem"),
            "--token-file", self.token_file(tmp_path, token), "--metrics-listen", "",
        )  # fmt: skip
        assert rc == 2, err
        assert "CERTIFICATE_VERIFY_FAILED" in err and "check --ca-file" in err, err
        assert "Traceback" not in err and "collector_unreachable" not in err

    async def test_refused_token_ends_the_agent(
        self, make_collector: MakeCollector, pki: PKI, tmp_path: Path
    ) -> None:
        """An agent whose token the collector does not know exits 2 naming UNAUTHENTICATED."""
        collector = await make_collector(tls=pki.server())
        rc, _, err = await cli(
            AGENT_BIN, "--collector", f"127.0.0.1:{collector.grpc_port}", "--network", "net",
            "--name", "a1", "--ca-file", str(pki.ca),
            "--token-file", self.token_file(tmp_path, "tdm_00000000_unknown"),
            "--metrics-listen", "",
        )  # fmt: skip
        assert rc == 2, err
        assert "UNAUTHENTICATED" in err and "--token-file" in err, err
        assert "Traceback" not in err

    async def test_untrusted_certificate_ends_import_without_retrying(
        self, make_collector: MakeCollector, pki: PKI, tmp_path: Path, reports: Path
    ) -> None:
        """import against a collector its --ca-file does not trust fails once, naming why."""
        collector = await make_collector(tls=pki.server())
        other = tmp_path / "other-ca"
        init_ca(other)
        token = add_token(collector.config.db, "intake", "hl")
        rc, _, err = await cli(
            COLLECTOR_BIN, "import", str(reports), "--collector",
            f"127.0.0.1:{collector.grpc_port}", "--ca-file", str(other / "ca.pem"),
            "--token-file", self.token_file(tmp_path, token), "--attempts", "5",
        )  # fmt: skip
        assert rc == 1, err
        assert "CERTIFICATE_VERIFY_FAILED" in err and "check --ca-file" in err, err
        assert "retrying" not in err and "Traceback" not in err

    async def test_import_retries_name_the_cause(self, tmp_path: Path, reports: Path) -> None:
        """import to a port nobody listens on says UNAVAILABLE and why at each retry."""
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
            port = sock.getsockname()[1]
            rc, _, err = await cli(
                COLLECTOR_BIN, "import", str(reports), "--collector", f"127.0.0.1:{port}",
                "--insecure", "--attempts", "2",
            )  # fmt: skip
        assert rc == 1, err
        retries = [line for line in err.splitlines() if "retrying in" in line]
        assert len(retries) == 1, err
        assert "UNAVAILABLE" in retries[0] and "attempt 1 of 2" in retries[0], retries
        assert "Connection refused" in retries[0] or "connect" in retries[0], retries

    async def test_agent_retries_name_the_cause(self) -> None:
        """An agent whose collector is not there keeps retrying, each log line naming the
        gRPC status and its details; it stops cleanly on SIGTERM."""
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
            proc = await asyncio.create_subprocess_exec(
                AGENT_BIN, "--collector", f"127.0.0.1:{port}", "--network", "net", "--insecure",
                "--metrics-listen", "",
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            assert proc.stderr is not None
            seen: list[str] = []
            try:
                async with asyncio.timeout(30):
                    while len(seen) < 2:
                        line = (await proc.stderr.readline()).decode()
                        assert line, "the agent ended while its collector was unreachable"
                        if "collector_unreachable" in line:
                            seen.append(line)
            finally:
                proc.terminate()
                await proc.wait()
        for line in seen:
            assert "cause='UNAVAILABLE: " in line and "retry_in=" in line, line
        assert "attempt=1 " in seen[0] and "attempt=2 " in seen[1], seen


class TestTokenFile:
    @pytest.mark.parametrize(
        ("mode", "gid", "warned"),
        [
            (0o600, 1000, False),  # owner only
            (0o400, 5000, False),
            (0o640, 1000, False),  # group bit, a group the process is in (fsGroup, systemd)
            (0o440, 2000, False),
            (0o640, 5000, True),  # group bit, a group the process is not in
            (0o604, 1000, True),  # anyone may read
            (0o644, 1000, True),
        ],
    )
    def test_exposed(self, mode: int, gid: int, warned: bool) -> None:
        assert exposed(mode, gid, frozenset({1000, 2000})) is warned

    def test_read_token_warns_only_for_a_file_others_may_read(
        self, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A 0600 file is read silently; 0644 is read with a warning naming the path, never
        the token; an empty file is an error."""
        path = tmp_path / "token"
        path.write_text("tdm_abc_secret\n")
        path.chmod(0o600)
        with caplog.at_level(logging.WARNING):
            assert read_token(None, path) == "tdm_abc_secret"
        assert "token_file_permissive" not in caplog.text
        path.chmod(0o644)
        with caplog.at_level(logging.WARNING):
            assert read_token(None, path) == "tdm_abc_secret"
        assert "token_file_permissive" in caplog.text and str(path) in caplog.text
        assert "secret" not in caplog.text.replace(str(path), "")
        path.write_text("")
        with pytest.raises(CredentialError, match="empty"):
            read_token(None, path)
