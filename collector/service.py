"""The collector's gRPC services: the agents' stream and the hotlines' intake.

This module and agent/link.py are the only ones that touch generated
protobuf types: messages are range-checked and translated to plain values
here, and handed to the single writer. A batch is acknowledged only after the
writer has committed it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from prometheus_client import CollectorRegistry

from client.digests import BUCKETS, Digests, bucket_of
from collector.auth import INTAKE_SOURCE
from collector.evidence.errors import EvidenceError
from collector.evidence.wire import batch_tree
from collector.ratelimit import RateLimiter
from collector.reports_file import ReportIn
from collector.schedule import Planner
from collector.selfmetrics import SelfMetrics
from collector.signatures import Signatures
from collector.store import ResultIn, StoreError, Submitted, Target, Writer
from collector.store.model import AgentKeyRefused, Evidence, SignedBatch
from collector.store.reads import (
    active_intervals,
    active_targets,
    connect_readonly,
    targets_by_bucket,
)
from collector.store.sql import Connection
from collector.urls import InvalidURL, normalize_url
from protos.takedown.v1 import takedown_pb2 as pb
from protos.takedown.v1 import takedown_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

MAX_REPORTS_PER_SUBMIT = 10_000
ASSIGNMENT_CHUNK = 1_000
MAX_NAME = 128
MAX_URL = 8192
EARLIEST = 946_684_800.0  # 2000-01-01: older times are an agent's broken clock
# A probe time further ahead of the collector's clock is a broken agent clock: folded in event
# time it would hold liveness and order for hours.
MAX_FUTURE = 900.0
_TLS_CHECKS = frozenset(pb.TlsCheck.values())
SQLITE_MAX_INT = 2**63 - 1  # uint64 fields above it cannot be stored

_ERROR_NAMES = {
    v.number: v.name.removeprefix("ERROR_CLASS_").lower()
    for v in pb.DESCRIPTOR.enum_types_by_name["ErrorClass"].values
}


def us_to_s(us: int) -> float:
    return us / 1_000_000


def s_to_us(s: float) -> int:
    return round(s * 1_000_000)


class Refused(Exception):
    """Ends a stream with a gRPC status the agent can act on."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


@dataclass
class AgentSession:
    """One connected agent's stream: its outgoing queue and whether its assignment was sent."""

    agent_id: int
    name: str
    network: str
    public_key: bytes = b""  # pinned: every result it sends must carry a valid signature
    outbox: asyncio.Queue[pb.CollectorMessage] = field(default_factory=asyncio.Queue)
    ready: bool = False
    held: list[pb.CollectorMessage] = field(default_factory=list)
    skews: deque[float] = field(default_factory=lambda: deque(maxlen=32))

    def clock_offset(self, sent_at: float, received_at: float) -> float:
        """Agent clock minus collector clock, estimated from one-way message times.

        sent - received = offset - network delay, and the delay is never negative,
        so the largest of the recent samples is the best estimate.
        """
        self.skews.append(sent_at - received_at)
        return max(self.skews)

    def push(self, message: pb.CollectorMessage) -> None:
        if self.ready:
            self.outbox.put_nowait(message)
        else:
            self.held.append(message)

    def release(self) -> None:
        self.ready = True
        for message in self.held:
            self.outbox.put_nowait(message)
        self.held.clear()


class AgentHub:
    """Connected agent sessions; assignment changes are pushed to all of them."""

    def __init__(self) -> None:
        self._sessions: dict[int, AgentSession] = {}

    def join(self, session: AgentSession) -> AgentSession | None:
        """Register a session; return the one it replaces (same agent reconnecting)."""
        old = self._sessions.get(session.agent_id)
        self._sessions[session.agent_id] = session
        return old

    def leave(self, session: AgentSession) -> None:
        if self._sessions.get(session.agent_id) is session:
            del self._sessions[session.agent_id]

    def connected(self) -> dict[int, tuple[str, str]]:
        """agent id → (name, network) of every live stream."""
        return {s.agent_id: (s.name, s.network) for s in self._sessions.values()}

    def publish(self, targets: Iterable[Target], retired: Iterable[int] = ()) -> None:
        """Push new or changed targets, and URLs no longer to be probed, to every agent, in
        messages of at most ASSIGNMENT_CHUNK of each: a replan may change every URL's interval
        at once (a million URLs imported together change phase together), and one message of
        them all would pass the agents' 16 MiB message limit and end their streams."""
        upsert = [_target(t) for t in targets]
        remove = list(retired)
        if not self._sessions:
            return  # an agent that connects later is reconciled from the database
        for i in range(0, max(len(upsert), len(remove)), ASSIGNMENT_CHUNK):
            chunk = pb.AssignmentUpdate(
                upsert=upsert[i : i + ASSIGNMENT_CHUNK], remove=remove[i : i + ASSIGNMENT_CHUNK]
            )
            message = pb.CollectorMessage(assignment=chunk)
            for session in self._sessions.values():
                session.push(message)


def _interval_ms(t: Target) -> int:
    return max(1, round(t.interval * 1000))


def _target(t: Target) -> pb.Target:
    return pb.Target(url_id=t.url_id, url=t.url, interval_ms=_interval_ms(t))


def differing_buckets(entries: Iterable[tuple[int, float]], theirs: Sequence[int]) -> list[int]:
    """The buckets whose digest over `entries` (url id, interval s) differs from `theirs`.

    An agent that sent no digests (it holds nothing) differs in every bucket.
    """
    ours = Digests()
    for url_id, interval in entries:
        ours.toggle(url_id, max(1, round(interval * 1000)))
    known = list(theirs) if len(theirs) == BUCKETS else [0] * BUCKETS
    return [b for b in range(BUCKETS) if ours.values[b] != known[b]]


def bucket_updates(
    targets: Iterable[Target], differ: Sequence[int]
) -> Iterator[pb.AssignmentUpdate]:
    """Updates replacing each bucket in `differ` (ascending) with its targets, then in_sync.

    `targets` are those of the differing buckets, grouped by bucket in the same order. A bucket
    is never split between updates (the agent replaces it whole); an update is cut at the first
    bucket boundary after ASSIGNMENT_CHUNK targets, so memory is one chunk, whatever the total.
    """
    pending = iter(targets)
    ahead = next(pending, None)
    update = pb.AssignmentUpdate()
    for b in differ:
        update.replace_buckets.append(b)
        while ahead is not None and bucket_of(ahead.url_id) == b:
            update.upsert.append(_target(ahead))
            ahead = next(pending, None)
        if len(update.upsert) >= ASSIGNMENT_CHUNK:
            yield update
            update = pb.AssignmentUpdate()
    if ahead is not None:
        raise ValueError(f"target {ahead.url_id} is not in a differing bucket, in order")
    update.in_sync = True
    yield update


def fresh_updates(targets: Iterable[Target]) -> Iterator[pb.AssignmentUpdate]:
    """Updates for an agent that holds nothing: upserts only, in any order, then in_sync.

    Nothing has to be replaced, so `targets` can come straight off the table (no sort).
    """
    update = pb.AssignmentUpdate()
    for t in targets:
        update.upsert.append(_target(t))
        if len(update.upsert) >= ASSIGNMENT_CHUNK:
            yield update
            update = pb.AssignmentUpdate()
    update.in_sync = True
    yield update


def reconcile(targets: Iterable[Target], theirs: Sequence[int]) -> Iterator[pb.AssignmentUpdate]:
    """The updates that bring an agent holding digests `theirs` to `targets`, bucket by bucket."""
    targets = list(targets)
    if not theirs:  # the agent holds nothing (Hello carries no digests then)
        return fresh_updates(sorted(targets, key=lambda t: t.url_id))
    differ = differing_buckets(((t.url_id, t.interval) for t in targets), theirs)
    wanted = set(differ)
    grouped = sorted(
        (t for t in targets if bucket_of(t.url_id) in wanted),
        key=lambda t: (bucket_of(t.url_id), t.url_id),
    )
    return bucket_updates(grouped, differ)


def assignment_updates(conn: Connection, theirs: Sequence[int]) -> Iterator[pb.AssignmentUpdate]:
    """The reconcile updates read lazily from the database, one snapshot for all of them.

    Run it, and step it, in a worker thread: the first step may sort the differing buckets.
    """
    if not theirs:
        return fresh_updates(active_targets(conn))
    conn.execute("BEGIN")  # both passes see the same URLs
    differ = differing_buckets(active_intervals(conn), theirs)
    return bucket_updates(targets_by_bucket(conn, differ, BUCKETS), differ)


def translate_result(
    r: pb.ProbeResult, now: float, evidence: Evidence | None = None
) -> ResultIn | str:
    """A range-checked plain result, or the reason it is refused."""
    started = us_to_s(r.started_at_unix_us)
    if r.url_id <= 0:
        return f"url_id {r.url_id} is not a valid id"
    if started < EARLIEST:
        return f"started_at {r.started_at_unix_us} is before 2000-01-01"
    if started > now + MAX_FUTURE:
        return (
            f"started_at is {started - now:.0f} s ahead of the collector's clock"
            f" (at most {MAX_FUTURE:.0f} s; check the agent's NTP)"
        )
    if r.tls not in _TLS_CHECKS:
        return f"unknown tls check {r.tls}"
    if r.status > 999:
        return f"status {r.status} is not an HTTP status"
    if r.seq > SQLITE_MAX_INT or r.body_bytes > SQLITE_MAX_INT:
        return "seq and body_bytes must fit a signed 64-bit integer"
    if len(r.body_sha256) not in (0, 32):
        return f"body_sha256 has {len(r.body_sha256)} bytes, expected 32"
    if len(r.final_url) > MAX_URL:
        return "final_url is too long"
    if r.error not in _ERROR_NAMES:
        return f"unknown error class {r.error}"
    if r.peer_ip:
        try:
            ipaddress.ip_address(r.peer_ip)
        except ValueError:
            return "peer_ip is not an IP address"
    return ResultIn(
        url_id=r.url_id,
        seq=r.seq,
        started_at=started,
        elapsed=r.elapsed_ms / 1000,
        status=r.status,
        final_url=r.final_url,
        sha256=r.body_sha256,
        body_bytes=r.body_bytes,
        truncated=r.truncated,
        peer_ip=r.peer_ip,
        error=_ERROR_NAMES[r.error],
        redirects=r.redirects,
        challenge=r.challenge,
        tls=int(r.tls),
        evidence=evidence,
    )


class AgentLinkService(pb_grpc.AgentLinkServicer):
    """One bidirectional stream per agent: hello, assignment out, batches in, acks out."""

    def __init__(
        self,
        writer: Writer,
        hub: AgentHub,
        db_path: Path | str,
        clock: Callable[[], float] = time.time,
        metrics: SelfMetrics | None = None,
        *,
        limiter: RateLimiter | None = None,
        signatures: Signatures | None = None,
        evidence: bool = False,
    ) -> None:
        self.writer = writer
        self.hub = hub
        self.db_path = db_path
        self.clock = clock
        self.metrics = metrics or SelfMetrics(CollectorRegistry())
        self.limiter = limiter  # results per second per agent; over it: no ack, stream ended
        self.signatures = signatures or Signatures(db_path)
        # The store keeps an evidence log: results carry their signed observations, and the
        # signatures of agents with a pinned key are checked before a batch is stored.
        self.evidence = evidence

    async def Connect(
        self,
        request_iterator: AsyncIterator[pb.AgentMessage],
        context: grpc.aio.ServicerContext[pb.AgentMessage, pb.CollectorMessage],
    ) -> AsyncIterator[pb.CollectorMessage]:
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("kind") != "hello":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the stream must open with hello")
        hello = first.hello
        for name, value in (("agent", hello.agent), ("network", hello.network)):
            if not value or len(value) > MAX_NAME or not value.isprintable():
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"hello.{name} must be 1-{MAX_NAME} printable characters",
                )
        key = bytes(hello.public_key)
        if len(key) not in (0, 32):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"hello.public_key has {len(key)} bytes; an Ed25519 public key has 32",
            )
        now = self.clock()
        try:
            agent_id = await self.writer.run(
                lambda s: s.register_agent(
                    hello.agent, hello.network, hello.version[:MAX_NAME], now, key
                )
            )
        except AgentKeyRefused as exc:
            log.warning("agent_key_refused agent=%s", hello.agent)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
        session = AgentSession(agent_id, hello.agent, hello.network, public_key=key)
        if hello.sent_at_unix_us:
            session.clock_offset(us_to_s(hello.sent_at_unix_us), now)
        if self.hub.join(session) is not None:
            log.info("agent_replaced_stream agent=%s", hello.agent)
        log.info("agent_connected agent=%s network=%s", hello.agent, hello.network)
        self.metrics.streams_opened.inc()
        self.metrics.streams.inc()
        yield pb.CollectorMessage(
            welcome=pb.Welcome(agent_id=agent_id, received_hello_at_unix_us=s_to_us(now))
        )
        receiver = asyncio.create_task(self._receive(session, request_iterator))
        get: asyncio.Task[pb.CollectorMessage] | None = None
        try:
            async for message in self._assignment(session, hello.assignment_digests, receiver):
                yield message
            while True:
                get = asyncio.create_task(session.outbox.get())
                await asyncio.wait({get, receiver}, return_when=asyncio.FIRST_COMPLETED)
                if get.done():
                    yield get.result()
                    continue
                get.cancel()
                while not session.outbox.empty():
                    yield session.outbox.get_nowait()
                refusal = receiver.exception()
                if isinstance(refusal, Refused):
                    self.metrics.streams_refused.inc()
                    await context.abort(refusal.code, refusal.details)
                if refusal is not None:
                    raise refusal
                return
        finally:
            self.hub.leave(session)
            receiver.cancel()
            if get is not None:
                get.cancel()
            self.metrics.streams_closed.inc()
            self.metrics.streams.dec()
            log.info("agent_disconnected agent=%s", hello.agent)

    async def _receive(
        self, session: AgentSession, request_iterator: AsyncIterator[pb.AgentMessage]
    ) -> None:
        async for message in request_iterator:
            if message.WhichOneof("kind") != "batch":
                raise Refused(
                    grpc.StatusCode.INVALID_ARGUMENT, "only result batches may follow hello"
                )
            await self._ingest(session, message.batch)

    async def _assignment(
        self, session: AgentSession, theirs: Sequence[int], receiver: asyncio.Task[None]
    ) -> AsyncIterator[pb.CollectorMessage]:
        """The reconcile updates for `session`, a chunk at a time, acks interleaved.

        Each chunk is read when the previous one has been handed to gRPC, which awaits the
        stream's flow control: ten agents receiving a million URLs each hold a chunk apiece,
        not the whole assignment. Stops early if the receiving side ended (its status wins).

        Every read runs in a worker thread as a shielded step: when the stream ends while a step
        runs, the step finishes in its thread and only then is the connection closed (closing
        it under a running statement crashes the process).
        """
        loop = asyncio.get_running_loop()
        conn = await asyncio.to_thread(connect_readonly, self.db_path)
        step: asyncio.Future[Any] = loop.run_in_executor(None, assignment_updates, conn, theirs)
        sent = 0
        try:
            updates = await asyncio.shield(step)
            while not receiver.done():
                step = loop.run_in_executor(None, next, updates, None)
                update = await asyncio.shield(step)
                if update is None:
                    break
                while not session.outbox.empty():  # acks of batches stored meanwhile
                    yield session.outbox.get_nowait()
                sent += len(update.upsert)
                self.metrics.assignment_sent.inc(len(update.upsert))
                yield pb.CollectorMessage(assignment=update)
                if update.in_sync:
                    log.info("assignment_reconciled agent=%s sent=%d", session.name, sent)
                    session.release()
        finally:

            def close(done: asyncio.Future[Any]) -> None:
                if not done.cancelled():
                    done.exception()  # a failed step after the stream ended: nobody waits for it
                conn.close()

            step.add_done_callback(close)

    async def _ingest(self, session: AgentSession, batch: pb.ResultBatch) -> None:
        arrived = time.monotonic()
        if self.limiter is not None:
            wait = self.limiter.reserve(session.agent_id, len(batch.results), arrived)
            if wait is None:
                self.metrics.batches_limited.inc()
                log.warning("rate_limited agent=%s results=%d", session.name, len(batch.results))
                raise Refused(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    "results arrive far faster than this agent's limit; resend later",
                )
            if wait > 0:
                # Over the rate: the ack comes late, and the agent's bounded window of
                # unacknowledged batches makes it wait (backpressure, no reconnect).
                self.metrics.batches_delayed.inc()
                self.metrics.rate_limit_wait.inc(wait)
                await asyncio.sleep(wait)
        now = self.clock()
        offset = None
        if batch.sent_at_unix_us:
            offset = session.clock_offset(us_to_s(batch.sent_at_unix_us), now)
        results: list[ResultIn] = []
        invalid = 0
        evidence: Sequence[Evidence | None] = ()
        if self.evidence and batch.results:
            # Signatures are checked where they are kept: in the evidence log. Without one the
            # collector stores no signature, so it checks none.
            evidence = await self._evidence(session, batch)
        for i, r in enumerate(batch.results):
            value = translate_result(r, now, evidence[i] if evidence else None)
            if isinstance(value, str):
                invalid += 1
                log.warning("result_refused agent=%s reason=%r", session.name, value)
            else:
                results.append(value)
        try:
            done = await self.writer.ingest(session.agent_id, results, now, offset)
        except StoreError as exc:
            self.metrics.batches_failed.inc()
            self.metrics.store_errors.inc()
            log.error("batch_not_stored agent=%s error=%s", session.name, exc)
            raise Refused(grpc.StatusCode.UNAVAILABLE, f"results not stored: {exc}") from exc
        if done.rejected:
            log.warning(
                "results_refused agent=%s count=%d first=%r",
                session.name, done.rejected, done.refused[0] if done.refused else "",
            )  # fmt: skip
        session.outbox.put_nowait(
            pb.CollectorMessage(
                ack=pb.BatchAck(
                    batch_id=batch.batch_id,
                    stored=done.stored,
                    duplicates=done.duplicates,
                    rejected=done.rejected + invalid,
                    stored_at_unix_us=s_to_us(self.clock()),
                )
            )
        )
        m = self.metrics
        m.batches_acked.inc()
        m.stored.inc(done.stored)
        m.duplicates.inc(done.duplicates)
        m.rejected.inc(done.rejected)
        m.invalid.inc(invalid)
        m.ack_seconds.observe(time.monotonic() - arrived)

    async def _evidence(
        self, session: AgentSession, batch: pb.ResultBatch
    ) -> list[Evidence | None]:
        """Each result's observation and the batch tree it sits in, by position in the batch.

        A signed batch's tree covers every result as sent; its one signature must verify
        over it, or the stream ends before anything of the batch is stored. For an agent
        without a key the collector builds the tree itself (unsigned) over the results of
        the URLs it knows; a result of an unknown URL id gets None, and the store refuses it
        by its id.
        """
        wire = list(batch.results)
        if session.public_key:
            if not batch.batch_signature:
                raise Refused(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"batch {batch.batch_id} has no signature; this agent's pinned key requires"
                    " one over each batch (an agent older than evidence v2 signs each result"
                    " instead: upgrade it)",
                )
            for r in wire:
                if len(r.url_sha256) != 32:
                    raise Refused(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"result seq {r.seq} has no url_sha256; an agent that signs gives each"
                        " result the SHA-256 of its URL; nothing of this batch was stored",
                    )
            try:
                tree = await self.signatures.check(
                    session.public_key, session.name, session.network, batch
                )
            except EvidenceError as exc:  # a value no observation can hold (seq beyond 2^53)
                raise _unobservable(batch, exc) from exc
            if tree is None:
                self.metrics.signatures_failed.inc()
                log.warning("signature_refused agent=%s batch=%d", session.name, batch.batch_id)
                raise Refused(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"batch {batch.batch_id}: its signature does not verify against agent"
                    f" {session.name!r}'s pinned key over its {len(wire)} results; nothing of"
                    " this batch was stored",
                )
            signed = SignedBatch(session.name, session.network, tree.size, tree.root,
                                 batch.batch_signature, tree.hashes)  # fmt: skip
            return [
                Evidence(r.url_sha256, data, signed, k)
                for k, (r, data) in enumerate(zip(wire, tree.data, strict=True))
            ]
        hashes = await self.signatures.url_hashes([r.url_id for r in wire])
        known = [r for r in wire if r.url_id in hashes]
        if not known:
            return [None] * len(wire)
        for r in known:
            r.url_sha256 = hashes[r.url_id]
        try:
            tree = batch_tree(session.name, session.network, known)
        except EvidenceError as exc:
            raise _unobservable(batch, exc) from exc
        unsigned = SignedBatch(session.name, session.network, tree.size, tree.root, b"",
                               tree.hashes)  # fmt: skip
        out: list[Evidence | None] = []
        k = 0
        for r in wire:
            if r.url_id in hashes:
                out.append(Evidence(r.url_sha256, tree.data[k], unsigned, k))
                k += 1
            else:
                out.append(None)
        return out


def _unobservable(batch: pb.ResultBatch, exc: EvidenceError) -> Refused:
    """A batch refused because one of its results cannot be an evidence observation."""
    return Refused(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"batch {batch.batch_id}: a result cannot be an observation ({exc});"
        " nothing of this batch was stored",
    )


_SUBMITTED = {
    Submitted.ACCEPTED: pb.SUBMIT_STATUS_ACCEPTED,
    Submitted.ALREADY_KNOWN: pb.SUBMIT_STATUS_ALREADY_KNOWN,
    Submitted.REJECTED: pb.SUBMIT_STATUS_REJECTED,
}


class IntakeService(pb_grpc.IntakeServicer):
    """Hotlines submit reports; idempotent on reference."""

    def __init__(
        self,
        writer: Writer,
        hub: AgentHub,
        planner: Planner,
        clock: Callable[[], float] = time.time,
        metrics: SelfMetrics | None = None,
    ) -> None:
        self.writer = writer
        self.hub = hub
        self.planner = planner
        self.clock = clock
        self.metrics = metrics or SelfMetrics(CollectorRegistry())

    async def Submit(
        self,
        request: pb.SubmitRequest,
        context: grpc.aio.ServicerContext[pb.SubmitRequest, pb.SubmitResponse],
    ) -> pb.SubmitResponse:
        if len(request.reports) > MAX_REPORTS_PER_SUBMIT:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"at most {MAX_REPORTS_PER_SUBMIT} reports per request, got {len(request.reports)}",
            )
        now = self.clock()
        outcomes: list[pb.SubmitOutcome | None] = []
        valid: list[ReportIn] = []
        for report in request.reports:
            checked = check_report(report, now)
            if isinstance(checked, str):
                outcomes.append(pb.SubmitOutcome(status=pb.SUBMIT_STATUS_REJECTED, error=checked))
            else:
                outcomes.append(None)
                valid.append(checked)
        try:
            source = INTAKE_SOURCE.get()
            stored = await self.writer.run(
                lambda s: s.submit_reports(valid, now, self.planner, source)
            )
        except StoreError as exc:
            self.metrics.store_errors.inc()
            log.error("reports_not_stored error=%s", exc)
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"reports not stored: {exc}")
        self.hub.publish(
            Target(o.url_id, r.url, o.interval)
            for o, r in zip(stored, valid, strict=True)
            if o.new_url
        )
        it = iter(stored)
        response = pb.SubmitResponse()
        for slot in outcomes:
            if slot is None:
                o = next(it)
                status = _SUBMITTED[o.status]
                slot = pb.SubmitOutcome(
                    status=status, report_id=o.report_id, url_id=o.url_id, error=o.error
                )
            {
                pb.SUBMIT_STATUS_ACCEPTED: self.metrics.reports_accepted,
                pb.SUBMIT_STATUS_ALREADY_KNOWN: self.metrics.reports_known,
            }.get(slot.status, self.metrics.reports_rejected).inc()
            response.outcomes.append(slot)
        return response


def check_report(report: pb.Report, now: float) -> ReportIn | str:
    """A validated plain report, or why it is refused."""
    try:
        url = normalize_url(report.url)
    except InvalidURL as exc:
        return f"url: {exc}"
    if report.notified_at_unix_us <= 0:
        return "notified_at is required"
    notified = us_to_s(report.notified_at_unix_us)
    if not EARLIEST <= notified <= now + 86_400:
        return "notified_at is outside the plausible range (2000-01-01 to tomorrow)"
    received = us_to_s(report.received_at_unix_us) if report.received_at_unix_us else None
    if received is not None and not EARLIEST <= received <= now + 86_400:
        return "received_at is outside the plausible range (2000-01-01 to tomorrow)"
    order = us_to_s(report.order_issued_at_unix_us) if report.order_issued_at_unix_us else None
    if order is not None and not EARLIEST <= order <= now + 86_400:
        return "order_issued_at is outside the plausible range (2000-01-01 to tomorrow)"
    if len(report.sha256) not in (0, 32):
        return f"sha256 has {len(report.sha256)} bytes, expected 32"
    origin = None
    if report.origin_ip:
        try:
            origin = str(ipaddress.ip_address(report.origin_ip))
        except ValueError:
            return f"origin_ip {report.origin_ip[:64]!r} is not an IP address"
    if len(report.reference) > 200 or not report.reference.isprintable():
        return "reference must be at most 200 printable characters"
    return ReportIn(
        url=url,
        notified_at=notified,
        received_at=received,
        reference=report.reference or None,
        sha256=report.sha256 or None,
        order_issued_at=order,
        order_deadline=float(report.order_deadline_seconds) or None,
        origin_ip=origin,
    )
