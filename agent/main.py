"""A running agent: the schedule decides what is due, the prober checks it, the link delivers.

Data flows one way: assignment changes from the link update the schedule;
due URLs wait in their host's backlog (``agent.hosts``) and are probed when
their host has a free connection slot (at most `per_host` per host, at most
`concurrency` in all); each result goes into the outbox and the link sends it on.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ipaddress
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp.abc import AbstractResolver

from agent import __version__
from agent.assignment import Assignment, AssignmentChange
from agent.guard import AddressPolicy
from agent.hosts import HostQueues, Start, host_of
from agent.keys import KEY_FILE, AgentKey, ResultSigner
from agent.link import Identity, Link
from agent.metrics import serve_metrics
from agent.outbox import Outbox, ResultQueue
from agent.probe import ProbeConfig, Prober
from agent.schedule import Schedule
from agent.spool import Spool, SpoolError
from agent.texts import TempTexts, TextsError
from client.credentials import ClientTLS

log = logging.getLogger(__name__)

_POP_BATCH = 1024  # due URLs taken from the schedule at once
_OFFER_PER_PASS = 8192  # then the loop yields to the rest of the agent

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class AgentConfig:
    collector: str
    name: str
    network: str
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    allow_private: Sequence[Network] = ()
    batch_size: int = 500
    flush_interval: float = 1.0
    max_inflight: int = 8
    jitter: float = 0.1
    host_backlog: int = 256  # due probes one host holds waiting for its connections
    first_spread: float = 60.0
    outbox_limit: int = 1_000_000
    drain_timeout: float = 10.0
    metrics_listen: str | None = None  # HOST:PORT for /metrics and /healthz
    state_dir: Path | None = None  # spool.db: results until acked, and the assignment
    # The agent's Ed25519 signing key (not the TLS key); None: state_dir/agent.key, made at
    # first start; with neither, results go unsigned.
    key_file: Path | None = None
    spool_max_bytes: int | None = None
    journal: bool = False  # keep every spooled seq in the spool's journal table (audits, tests)
    tls: ClientTLS | None = None  # None: plaintext gRPC (only with --insecure)
    token: str | None = field(default=None, repr=False)  # bearer token (never in a repr)


class Agent:
    """Probes its assignment until `stop` is set, then delivers what it has and returns."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        resolver: AbstractResolver | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
        trust_pem: str | None = None,
    ) -> None:
        """``trust_pem`` replaces the system trust store for the TLS check (tests, bench/)."""
        self.config = config
        self.trust_pem = trust_pem
        self.clock = clock
        self.resolver = resolver
        self.schedule = Schedule(rng or random.Random(), config.jitter, config.first_spread)
        self.outbox: ResultQueue
        self.spool: Spool | None = None
        self.texts: TempTexts | None = None
        if config.state_dir is not None:
            config.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = self._key()  # before the spool opens: a bad key ends the agent with nothing open
        if config.state_dir is not None:
            self.spool = Spool(
                config.state_dir / "spool.db",
                limit=config.outbox_limit,
                max_bytes=config.spool_max_bytes,
                clock=clock,
                journal=config.journal,
            )
            self.outbox = self.spool
            self.assignment = Assignment(texts=self.spool)  # URL texts stay in the file
        else:
            self.outbox = Outbox(limit=config.outbox_limit)
            # URL texts in an unnamed temporary file, gone with the process (agent.texts);
            # its compactions run in steps on the loop (_compact_texts), never all at once
            self.texts = TempTexts(compact_in_steps=True)
            self.assignment = Assignment(texts=self.texts)
        self.signer = (
            None
            if key is None
            else ResultSigner(key, config.name, config.network, self.assignment.url)
        )
        self.link = Link(
            config.collector,
            Identity(config.name, config.network, __version__),
            self.outbox,
            self._assign,
            digests=self.assignment.digest_list,
            batch_size=config.batch_size,
            flush_interval=config.flush_interval,
            max_inflight=config.max_inflight,
            tls=config.tls,
            token=config.token,
            signer=self.signer,
        )
        self._changed = asyncio.Event()
        self._probes: set[asyncio.Task[None]] = set()
        self._compaction: asyncio.Task[None] | None = None
        self.hosts = HostQueues(config.probe.per_host, config.host_backlog)
        self.probed = 0
        self.probes_by_error: dict[str, int] = {}
        self.probes_by_tls: dict[str, int] = {}
        self.metrics_port = 0
        self._fatal: SpoolError | TextsError | None = None
        if self.spool is not None:
            now = clock()
            for url_id, interval in self.assignment.resume(self.spool.held()):
                self.schedule.set(url_id, interval, now)
            if len(self.assignment):
                log.info("assignment_resumed urls=%d", len(self.assignment))

    def _key(self) -> AgentKey | None:
        """The key this agent signs its results with: from `key_file`, else the state dir's
        (made there at first start); None without either. AgentKeyError if it cannot be had."""
        config = self.config
        if config.key_file is not None:
            key, where = AgentKey.load(config.key_file), config.key_file
        elif config.state_dir is not None:
            key, where = AgentKey.load_or_create(config.state_dir), config.state_dir / KEY_FILE
        else:
            log.info("results_unsigned reason='no state dir and no key file'")
            return None
        log.info(
            "agent_key file=%s public_key=%s", where, base64.b64encode(key.public_key).decode()
        )
        return key

    def _assign(self, change: AssignmentChange) -> None:
        now = self.clock()
        try:
            applied = self.assignment.apply(change)  # records the texts in their store
        except (SpoolError, TextsError) as exc:
            self._fail(exc)
            return
        if self.texts is not None and self.texts.compacting:
            self._compact_texts_soon(self.texts)
        for url_id in applied.stop:
            self.schedule.remove(url_id)
        for url_id, interval in applied.schedule:
            self.schedule.set(url_id, interval, now)
        if applied.stop or applied.schedule or change.in_sync:
            log.info(
                "assignment_changed urls=%d scheduled=%d stopped=%d in_sync=%s",
                len(self.assignment), len(applied.schedule), len(applied.stop), change.in_sync,
            )  # fmt: skip
        self._changed.set()

    def _compact_texts_soon(self, texts: TempTexts) -> None:
        """Make sure the compaction the texts started is carried on (outside an event loop,
        as in some tests, it is finished here and now)."""
        if self._compaction is not None and not self._compaction.done():
            return
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            try:
                while texts.compact_step():
                    pass
            except TextsError as exc:
                self._fail(exc)
            return
        self._compaction = asyncio.create_task(self._compact_texts(texts), name="compact-texts")

    async def _compact_texts(self, texts: TempTexts) -> None:
        """Copy the live URL texts to a new file a few pages at a time, letting everything
        else on the loop run between two steps (each a few milliseconds)."""
        try:
            while texts.compact_step():  # noqa: ASYNC110 - sleep(0): a turn for the others
                await asyncio.sleep(0)
        except TextsError as exc:
            self._fail(exc)

    async def run(self, stop: asyncio.Event) -> None:
        policy = AddressPolicy(list(self.config.allow_private))
        server = None
        if self.config.metrics_listen:
            host, _, port = self.config.metrics_listen.rpartition(":")
            server = await serve_metrics(self, host.strip("[]"), int(port))
            self.metrics_port = server.port
        try:
            await self._run(policy, stop)
        finally:
            if server is not None:
                await server.close()

    async def _run(self, policy: AddressPolicy, stop: asyncio.Event) -> None:
        async with Prober(
            self.config.probe, policy, resolver=self.resolver, trust_pem=self.trust_pem
        ) as prober:
            link = asyncio.create_task(self.link.run(), name="link")
            stopping = asyncio.create_task(stop.wait())
            try:
                await self._loop(prober, link, stopping)
            finally:
                stopping.cancel()
                await self._finish(link)

    async def _loop(
        self, prober: Prober, link: asyncio.Task[None], stopping: asyncio.Task[bool]
    ) -> None:
        limit = self.config.probe.concurrency
        hosts = self.hosts
        flushed = self.clock()
        wake = self._changed.set
        link.add_done_callback(lambda _: wake())  # one event wakes the loop for everything
        stopping.add_done_callback(lambda _: wake())
        while not stopping.done():
            if link.done():
                link.result()
            if self._fatal is not None:
                raise self._fatal
            now = self.clock()
            if now - flushed >= self.config.flush_interval:
                flushed = now
                try:
                    self.outbox.flush()  # commits acks, and results while probing is quiet
                except SpoolError as exc:
                    self._fail(exc)
                    raise
            free = limit - hosts.running
            more = self._offer_due(now, free) if free > 0 else False
            for start in hosts.take(now, free):
                url = self.assignment.url(start.url_id)
                if url is None:  # unassigned while it waited
                    hosts.done(start.host, start.url_id)
                    continue
                task = asyncio.create_task(self._probe(prober, start, url))
                self._probes.add(task)
                task.add_done_callback(self._probes.discard)
            next_due = self.schedule.next_due()
            timeout = 1.0 if next_due is None else min(1.0, max(0.0, next_due - self.clock()))
            if more:
                timeout = 0.0
            elif hosts.running >= limit:
                timeout = 1.0  # the probe that frees a slot sets _changed
            self._changed.clear()
            if link.done() or stopping.done():
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._changed.wait()

    def _offer_due(self, now: float, free: int) -> bool:
        """Move due URLs into their hosts' backlogs until `free` of them could start.

        URLs whose host is at its limit do not count, so a host that holds many due URLs
        and answers none (a tarpit) only fills its own backlog. Returns True when it stopped
        at the per-pass bound with more due, so the loop comes back without waiting.
        """
        hosts = self.hosts
        url_of = self.assignment.url
        popped = 0
        while hosts.startable < free:
            if popped >= _OFFER_PER_PASS:
                return True
            due = self.schedule.pop_due(now, min(_POP_BATCH, free - hosts.startable))
            if not due:
                return False
            popped += len(due)
            for url_id in due:
                url = url_of(url_id)
                if url is not None:
                    hosts.offer(host_of(url), url_id, now)
        return False

    def _fail(self, exc: SpoolError | TextsError) -> None:
        """The spool (or the file of URL texts) cannot be written: stop probing (nothing
        unacknowledged in the spool is lost)."""
        if self._fatal is None:
            log.error("%s error=%s", "texts_failed" if isinstance(exc, TextsError) else
                      "spool_failed", exc)  # fmt: skip
            self._fatal = exc
        self._changed.set()

    async def _probe(self, prober: Prober, start: Start, url: str) -> None:
        try:
            result = await prober.probe(start.url_id, url)
        finally:
            if self.hosts.done(start.host, start.url_id) or (
                self.hosts.running == self.config.probe.concurrency - 1
            ):
                self._changed.set()  # a host slot or the last global slot freed
        try:
            self.outbox.add(result)
        except SpoolError as exc:
            self._fail(exc)
            return
        self.probed += 1
        error, tls = result.error.value, result.tls.value
        self.probes_by_error[error] = self.probes_by_error.get(error, 0) + 1
        self.probes_by_tls[tls] = self.probes_by_tls.get(tls, 0) + 1
        self.link.notify()

    async def _finish(self, link: asyncio.Task[None]) -> None:
        """Let running probes finish, deliver the outbox, then close the stream."""
        if self._probes:
            await asyncio.wait(self._probes, timeout=self.config.probe.total_timeout)
        if not link.done():
            delivered = await self.link.drain(self.config.drain_timeout)
            if not delivered:
                log.warning("shutdown_undelivered results=%d", len(self.outbox))
        link.cancel()
        try:
            with contextlib.suppress(asyncio.CancelledError):
                await link  # re-raises what ended the link (a refusal), after the close below
        finally:
            try:
                self.outbox.close()
            except SpoolError as exc:
                log.error("spool_close_failed error=%s", exc)
            finally:
                if self._compaction is not None:
                    self._compaction.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await self._compaction
                if self.texts is not None:
                    self.texts.close()
