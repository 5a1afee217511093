"""Wiring of a running collector: the writer, the gRPC server and the metrics endpoint."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from aiohttp import web
from grpc_health.v1 import _async as health_aio  # public as health.aio; the stubs lack it
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from collector.attribution_sources import build_attributor
from collector.auth import Gate, ServerTLS, server_credentials
from collector.decoding import Decoding
from collector.evidence.logkey import load_log_key
from collector.method import METHOD_VERSION, Policy
from collector.metrics import DEFAULT_BUCKETS, DEFAULT_DEADLINES, StateCollector
from collector.ratelimit import RateLimiter
from collector.schedule import Planner
from collector.selfmetrics import SelfMetrics
from collector.service import AgentHub, AgentLinkService, IntakeService
from collector.signatures import Signatures
from collector.store import Store, StoreError, Writer
from collector.store.model import DEFAULT_FLUSH_EVERY
from collector.store.reads import integrity_problem
from collector.store.shards import LEASE_SECONDS, TICK_SECONDS
from collector.store.sql import is_postgres, label
from protos.takedown.v1 import takedown_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 16 * 1024 * 1024
# How long a start waits for the first /metrics scan before it opens /metrics anyway.
FIRST_SCAN_WAIT = 120.0


@dataclass(frozen=True)
class CollectorConfig:
    db: Path | str  # a SQLite file, or a PostgreSQL URI
    listen: str = "127.0.0.1:7443"
    metrics_listen: str = "127.0.0.1:9464"
    prefixes: Path | None = None
    asn_mmdb: Path | None = None
    ipasn: Path | None = None
    as_names: Path | None = None
    cdn_asns: frozenset[int] = frozenset()
    country_mmdb: Path | None = None  # where an address is, when --prefixes gives no country
    planner: Planner = field(default_factory=Planner)
    replan_every: float = 60.0
    policy: Policy = field(default_factory=Policy)
    buckets: Sequence[float] = DEFAULT_BUCKETS
    deadlines: Sequence[float] = DEFAULT_DEADLINES
    # /metrics answers from a per-provider scan at most this old (0: scan at every scrape).
    metrics_max_age: float = 0.0
    # Security. The defaults (plaintext, no tokens, no rate limit) suit in-process tests; the
    # `serve` command defaults to TLS and tokens and allows plaintext only with --insecure.
    tls: ServerTLS | None = None
    require_tokens: bool = False
    max_results_per_second: float | None = None
    results_burst: float | None = None  # default: one second's worth, at least 1,000
    rate_limit_max_wait: float = 30.0  # a batch that would wait longer is refused
    revalidate_every: float = 30.0  # how often open streams' tokens are checked for revocation
    # Evidence: with a log key, every notice, result and verdict is a leaf of a signed log.
    # Verdict states are written behind, at most this often (results, episodes and events are
    # committed with every batch; a crash refolds the URLs not yet written at start).
    flush_every: float = DEFAULT_FLUSH_EVERY
    # PostgreSQL: how long a collector's shard leases last unrenewed (shards.py): a dead
    # collector's URLs are folded by the others after at most this (plus a second).
    lease_seconds: float = LEASE_SECONDS
    log_key_file: Path | None = None
    checkpoint_every: float = 300.0
    verify_workers: int = 1  # processes checking agents' signatures (0: on the event loop)


def mutual_tls(config: CollectorConfig) -> bool:
    return config.tls is not None and config.tls.client_ca_file is not None


def split_hostport(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"{value!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


class Collector:
    """A started collector; `await start()`, then `await stop()`."""

    def __init__(self, config: CollectorConfig, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.clock = clock
        self.attribution = build_attributor(
            config.prefixes,
            config.asn_mmdb,
            config.ipasn,
            config.as_names,
            config.cdn_asns,
            config.country_mmdb,
        )
        signer = load_log_key(config.log_key_file) if config.log_key_file else None
        self.log_origin = signer.name if signer else ""
        self.writer = Writer(
            lambda: Store(
                config.db, self.attribution, config.policy, planner=config.planner,
                log_signer=signer, flush_every=config.flush_every,
                lease_seconds=config.lease_seconds,
            )
        )  # fmt: skip
        self.signatures: Signatures | None = None
        self._checkpointing: asyncio.Task[None] | None = None
        self.hub = AgentHub()
        self.registry = CollectorRegistry()
        self.self_metrics = SelfMetrics(self.registry)
        self.grpc_port = 0
        self.metrics_port = 0
        self._server: grpc.aio.Server | None = None
        self._runner: web.AppRunner | None = None
        self.state: StateCollector | None = None
        self._refresher: threading.Thread | None = None
        self._refresher_stop = threading.Event()
        self._planning: asyncio.Task[None] | None = None
        self._assigning: asyncio.Task[None] | None = None
        self._revalidating: asyncio.Task[None] | None = None
        self.health: health_aio.HealthServicer | None = None
        self.decoding = Decoding()
        mutual = mutual_tls(config)
        self.gate: Gate | None = None
        if config.require_tokens or mutual:
            self.gate = Gate(
                config.db,
                tokens=config.require_tokens,
                mutual_tls=mutual,
                metrics=self.self_metrics,
            )
        self.limiter: RateLimiter | None = None
        if config.max_results_per_second:
            rate = config.max_results_per_second
            self.limiter = RateLimiter(
                rate, config.results_burst or max(rate, 1000.0), config.rate_limit_max_wait
            )

    async def start(self) -> None:
        tls = self.config.tls
        credentials = server_credentials(tls) if tls is not None else None  # files read first
        await self.writer.start()
        outdated = await self.writer.run(lambda s: s.outdated())
        if outdated:
            log.warning("refold_at_start urls=%d method=%s", outdated, METHOD_VERSION)
            await self.writer.run(lambda s: s.refold(now=self.clock(), held_only=True))
        server = grpc.aio.server(
            # Outermost first: undecodable bytes are refused before the gate reads a hello.
            interceptors=[self.decoding, *([self.gate] if self.gate is not None else [])],
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.keepalive_time_ms", 30_000),
                ("grpc.keepalive_timeout_ms", 10_000),
                ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
                ("grpc.keepalive_permit_without_calls", 1),
            ],
        )
        self.signatures = Signatures(self.config.db, self.config.verify_workers)
        pb_grpc.add_AgentLinkServicer_to_server(
            AgentLinkService(
                self.writer,
                self.hub,
                self.config.db,
                self.clock,
                self.self_metrics,
                limiter=self.limiter,
                signatures=self.signatures,
                evidence=self.config.log_key_file is not None,
            ),
            server,
        )
        pb_grpc.add_IntakeServicer_to_server(
            IntakeService(
                self.writer, self.hub, self.config.planner, self.clock, self.self_metrics
            ),
            server,
        )
        self.health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        if credentials is not None:
            self.grpc_port = server.add_secure_port(self.config.listen, credentials)
        else:
            self.grpc_port = server.add_insecure_port(self.config.listen)
        if self.grpc_port == 0:
            raise OSError(f"cannot listen for gRPC on {self.config.listen}")
        await server.start()
        self._server = server
        self.state = StateCollector(
            self.config.db,
            self.hub.connected,
            self.config.buckets,
            self.config.deadlines,
            self.clock,
            self.config.planner.order_deadline,
            max_age=self.config.metrics_max_age,
            prerendered=True,
            shards=self.writer.held_shards,
        )
        self.registry.register(self.state)
        if self.config.metrics_max_age > 0:  # the first scan starts now, then stays fresh
            self._refresher = threading.Thread(
                target=self.state.refresh_forever,
                args=(self._refresher_stop,),
                name="metrics-refresh",
                daemon=True,
            )
            self._refresher.start()
        if self.gate is not None and self.config.require_tokens:
            self._revalidating = asyncio.create_task(
                self.gate.revalidate_forever(self.config.revalidate_every), name="revalidate"
            )
        if self.config.log_key_file is not None:
            await self.checkpoint()
            self._checkpointing = asyncio.create_task(self._checkpoint_forever(), name="checkpoint")
            log.info("evidence_log_on origin=%s every=%.0fs", self.log_origin,
                     self.config.checkpoint_every)  # fmt: skip
        else:
            log.info("evidence_log_off (no --log-key-file: nothing is logged for evidence)")
        for service in ("", "takedown.v1.AgentLink", "takedown.v1.Intake"):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        # The first replan runs once serving (it reads and updates every watched URL: 10 s at
        # a million); meanwhile agents get the stored intervals, then its changes.
        self._planning = asyncio.create_task(self._replan_forever(), name="replan")
        if is_postgres(self.config.db):
            self._assigning = asyncio.create_task(self._assignments_forever(), name="assign")
        if self._refresher is not None:
            # /metrics opens once the refresher's first scan landed, so that no scrape waits
            # for a scan (258 ms at 100,000 URLs; seconds at a million).
            await asyncio.to_thread(self.state.first_scan.wait, FIRST_SCAN_WAIT)
        await self._start_http()
        if await self.writer.run(lambda s: s.unchecked):
            self._check_integrity()
        log.info(
            "collector_started grpc_port=%d metrics_port=%d db=%s tls=%s tokens=%s",
            self.grpc_port,
            self.metrics_port,
            label(self.config.db),
            "mutual" if mutual_tls(self.config) else "on" if self.config.tls else "off",
            "required" if self.config.require_tokens else "off",
        )

    async def _start_http(self) -> None:
        async def metrics(_: web.Request) -> web.Response:
            def render() -> bytes:
                assert self.state is not None
                return generate_latest(self.registry) + self.state.provider_text()

            body = await asyncio.to_thread(render)
            return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

        async def healthz(_: web.Request) -> web.Response:
            return web.Response(text="ok\n")

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        app.router.add_get("/healthz", healthz)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        host, port = split_hostport(self.config.metrics_listen)
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        server = site._server
        assert server is not None and isinstance(server, asyncio.Server)
        self.metrics_port = server.sockets[0].getsockname()[1]

    def _check_integrity(self) -> None:
        """After an unclean stop (or on a new database): `PRAGMA quick_check` on a thread of
        its own once serving, rather than before (5 s at 2.3 GB). A damaged database stops
        the collector taking results (health NOT_SERVING: agents keep them spooled) and says
        so; an intact one is recorded, so that the next clean stop skips the check."""
        loop = asyncio.get_running_loop()
        began = time.monotonic()
        db = self.config.db

        def check() -> None:
            try:
                problem = integrity_problem(db)
            except StoreError as exc:
                problem = str(exc)
            # RuntimeError: the loop is gone (stopped meanwhile); the next start checks again.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(lambda: asyncio.ensure_future(checked(problem)))

        async def checked(problem: str | None) -> None:
            if self._server is None or self.health is None:
                return  # stopped meanwhile: the next start checks again
            if problem is not None:
                log.error("database_integrity_failed db=%s problem=%s: no report or result is"
                          " accepted from now on (agents keep theirs spooled); stop the"
                          " collector and restore the database from a backup (README,"
                          " Upgrading)", label(db), problem)  # fmt: skip
                try:
                    await self.writer.run(lambda s: s.refuse_writes(problem))
                except StoreError:
                    return
                for service in ("", "takedown.v1.AgentLink", "takedown.v1.Intake"):
                    await self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
                return
            try:
                await self.writer.run(lambda s: setattr(s, "unchecked", False))
            except StoreError:
                return
            log.info("database_integrity_ok seconds=%.1f", time.monotonic() - began)

        threading.Thread(target=check, name="integrity-check", daemon=True).start()

    async def replan(self) -> None:
        """Recompute probe intervals from stored state and push the changes to the agents."""
        now = self.clock()
        await self.writer.run(lambda s: s.refold_due(now))
        changed, retired = await self.writer.run(lambda s: s.plan(now, self.config.planner))
        self.hub.publish(changed, retired)
        if changed or retired:
            log.info("assignment_replanned changed=%d retired=%d", len(changed), len(retired))

    async def _assignments_forever(self) -> None:
        """Several collectors on PostgreSQL: push the assignment changes the others made
        (new reports, replans) to this collector's agents, every second."""
        while True:
            await asyncio.sleep(TICK_SECONDS)
            try:
                targets, retired = await self.writer.run(lambda s: s.assignment_changes())
            except StoreError as exc:
                log.error("assignment_changes_failed error=%s", exc)
                continue
            self.hub.publish(targets, retired)

    async def _replan_forever(self) -> None:
        while True:
            try:
                await self.replan()
            except StoreError as exc:
                log.error("replan_failed error=%s", exc)
            await asyncio.sleep(self.config.replan_every)

    async def checkpoint(self) -> None:
        """Sign a checkpoint of the evidence log now (nothing without a log key)."""
        now = self.clock()
        await self.writer.run(lambda s: s.checkpoint(now))

    async def _checkpoint_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.checkpoint_every)
            try:
                await self.checkpoint()
            except StoreError as exc:
                log.error("checkpoint_failed error=%s", exc)

    async def stop(self, grace: float = 5.0) -> None:
        """Stop taking work, let in-flight batches commit and ack, then close the database."""
        for task in (self._planning, self._checkpointing, self._assigning):
            if task is not None:
                task.cancel()
        self._planning = self._checkpointing = self._assigning = None
        if self._revalidating is not None:
            self._revalidating.cancel()
            self._revalidating = None
        if self.health is not None:
            await self.health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self._refresher_stop.set()
        if self._refresher is not None:
            await asyncio.to_thread(self._refresher.join, 30)
            self._refresher = None
        if self.config.log_key_file is not None and self.writer.running:
            try:
                await self.checkpoint()  # the last results and verdicts under a signed head
            except StoreError as exc:
                log.error("checkpoint_failed error=%s", exc)
        await self.writer.close()
        if self.signatures is not None:
            await asyncio.to_thread(self.signatures.close)
            self.signatures = None
        self.attribution.close()
        log.info("collector_stopped")


async def serve(config: CollectorConfig) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully."""
    # Handlers first: a SIGTERM during start-up (opening the database, binding ports) then
    # stops the collector cleanly once start-up is done, instead of killing it half-way.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    collector = Collector(config)
    try:
        await collector.start()
        await stop.wait()
    finally:
        await collector.stop()  # also after a failed start: whatever did start is closed
