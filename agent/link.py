"""The agent's one stream to the collector, and the only place that reconnects.

A session: open the stream, say hello, wait for the welcome, then at the same
time read (assignment changes, acknowledgements) and write (result batches,
at most `max_inflight` unacknowledged). When the stream is lost, every
unacknowledged batch goes back to the outbox to be sent first next time.
With a `ResultSigner`, the hello carries the agent's public key and every
batch one signature over all its results, made each time the batch is encoded
(a resent batch is signed again).

Failures are classified once, here (with `client.failures`): a lost or
unavailable collector is transient and retried with jittered exponential
backoff (tenacity), each retry logged with its cause (status code and
details); a refusal (bad credentials, invalid argument) or a TLS handshake
that only a configuration change can mend (certificate not trusted) is fatal
and ends the agent with that cause. A session that stayed healthy for
`healthy_after` seconds resets the backoff.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, wait_exponential_jitter
from tenacity.wait import wait_base

from agent.assignment import AssignmentChange
from agent.keys import ResultSigner
from agent.outbox import Batch, ResultQueue
from agent.result import ErrorClass, ProbeResult, TlsCheck
from client.credentials import ClientTLS, call_metadata, open_channel
from client.failures import classify
from protos.takedown.v1 import takedown_pb2 as pb
from protos.takedown.v1 import takedown_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

_ERROR_NUMBERS = {e: pb.ErrorClass.Value(f"ERROR_CLASS_{e.name}") for e in ErrorClass}
_TLS_NUMBERS = {t: pb.TlsCheck.Value(f"TLS_CHECK_{t.name}") for t in TlsCheck}


class LinkError(Exception):
    """Base of the link's errors."""


class StreamLost(LinkError):
    """The stream ended or failed in a way worth retrying."""


class CollectorRefused(LinkError):
    """The collector refused this agent, or TLS cannot work as configured; retrying cannot help."""


def is_transient(exc: BaseException) -> bool:
    return isinstance(exc, StreamLost)


@dataclass(frozen=True)
class Identity:
    agent: str
    network: str
    version: str


def encode(
    batch: Batch, sent_at: float | None = None, signer: ResultSigner | None = None
) -> pb.AgentMessage:
    """The wire message of a batch; with `signer`, signed once over all its results."""
    sent = time.time() if sent_at is None else sent_at
    results = [_result(r) for r in batch.results]
    signature = b""
    if signer is not None:
        results, signature = signer.sign(results)
    return pb.AgentMessage(
        batch=pb.ResultBatch(
            batch_id=batch.batch_id,
            results=results,
            sent_at_unix_us=round(sent * 1_000_000),
            batch_signature=signature,
        )
    )


def _result(r: ProbeResult) -> pb.ProbeResult:
    return pb.ProbeResult(
        url_id=r.url_id,
        seq=r.seq,
        started_at_unix_us=round(r.started_at * 1_000_000),
        elapsed_ms=max(0, round(r.elapsed * 1000)),
        status=r.status,
        final_url=r.final_url,
        body_sha256=r.body_sha256,
        body_bytes=r.body_bytes,
        truncated=r.truncated,
        peer_ip=r.peer_ip,
        error=_ERROR_NUMBERS[r.error],
        redirects=r.redirects,
        challenge=r.challenge,
        tls=_TLS_NUMBERS[r.tls],
    )


class Link:
    """Delivers the outbox to the collector and applies assignment changes it pushes."""

    def __init__(
        self,
        target: str,
        identity: Identity,
        outbox: ResultQueue,
        on_assignment: Callable[[AssignmentChange], None],
        *,
        digests: Callable[[], list[int]] = list,
        batch_size: int = 500,
        flush_interval: float = 1.0,
        max_inflight: int = 8,
        wait: wait_base | None = None,
        healthy_after: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        tls: ClientTLS | None = None,
        token: str | None = None,
        signer: ResultSigner | None = None,
    ) -> None:
        self.target = target
        self.signer = signer  # None: results go unsigned and Hello carries no key
        self.tls = tls  # None: plaintext (--insecure)
        self._metadata = call_metadata(token)
        self.identity = identity
        self.outbox = outbox
        self.on_assignment = on_assignment
        self.digests = digests
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.max_inflight = max_inflight
        self.wait = wait if wait is not None else wait_exponential_jitter(multiplier=0.5, max=30)
        self.healthy_after = healthy_after
        self.clock = clock
        self.connected = False
        self.reconnects = 0
        self.sent = 0
        self._wake = asyncio.Event()
        self._acked = asyncio.Event()
        self._draining = False

    def notify(self) -> None:
        """Tell the link that the outbox has new results."""
        self._wake.set()

    async def run(self) -> None:
        """Keep a session open until cancelled; raise CollectorRefused if refused."""
        while True:
            async for attempt in AsyncRetrying(
                retry=retry_if_exception(is_transient),
                wait=self.wait,
                reraise=True,
                before_sleep=self._before_sleep,
            ):
                with attempt:
                    await self._session()

    def _before_sleep(self, state: RetryCallState) -> None:
        self.reconnects += 1
        cause = state.outcome.exception() if state.outcome is not None else None
        wait = state.next_action.sleep if state.next_action is not None else 0.0
        log.warning(
            "collector_unreachable target=%s cause=%r attempt=%d retry_in=%.1fs",
            self.target, str(cause), state.attempt_number, wait,
        )  # fmt: skip

    async def _session(self) -> None:
        options = [
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.max_receive_message_length", 16 * 1024 * 1024),
        ]
        started = self.clock()
        welcomed = False
        async with open_channel(self.target, self.tls, options) as channel:
            call = pb_grpc.AgentLinkStub(channel).Connect(metadata=self._metadata)  # type: ignore[call-arg]
            try:
                await call.write(
                    pb.AgentMessage(
                        hello=pb.Hello(
                            agent=self.identity.agent,
                            network=self.identity.network,
                            version=self.identity.version,
                            sent_at_unix_us=time.time_ns() // 1000,
                            assignment_digests=self.digests(),
                            public_key=self.signer.key.public_key if self.signer else b"",
                        )
                    )
                )
                first = await call.read()
                if not isinstance(first, pb.CollectorMessage) or not first.HasField("welcome"):
                    raise StreamLost("the collector did not welcome this agent")
                welcomed = True
                self.connected = True
                log.info("collector_connected target=%s", self.target)
                reader = asyncio.create_task(self._read(call))
                try:
                    await self._write(call, reader)
                finally:
                    reader.cancel()
            except (grpc.aio.AioRpcError, StreamLost) as exc:
                if isinstance(exc, grpc.aio.AioRpcError):
                    failure = classify(exc)
                    if failure.fatal:
                        raise CollectorRefused(
                            f"collector {self.target} cannot be used: {failure}"
                        ) from exc
                    lost = StreamLost(str(failure))
                else:
                    lost = exc
                if welcomed and self.clock() - started >= self.healthy_after:
                    log.warning("collector_stream_lost reason=%s reconnecting=now", lost)
                    return
                raise lost from exc
            finally:
                self.connected = False
                self.outbox.requeue()
                call.cancel()

    async def _read(
        self, call: grpc.aio.StreamStreamCall[pb.AgentMessage, pb.CollectorMessage]
    ) -> None:
        while True:
            message = await call.read()
            if not isinstance(message, pb.CollectorMessage):
                break
            kind = message.WhichOneof("kind")
            if kind == "ack":
                self.outbox.ack(message.ack.batch_id)
                self._wake.set()
                self._acked.set()
            elif kind == "assignment":
                a = message.assignment
                self.on_assignment(
                    AssignmentChange(
                        upsert=tuple((t.url_id, t.url, t.interval_ms / 1000) for t in a.upsert),
                        remove=tuple(a.remove),
                        replace_buckets=tuple(a.replace_buckets),
                        in_sync=a.in_sync,
                    )
                )
        raise StreamLost("the collector closed the stream")

    async def _write(
        self,
        call: grpc.aio.StreamStreamCall[pb.AgentMessage, pb.CollectorMessage],
        reader: asyncio.Task[None],
    ) -> None:
        last_send = self.clock()
        while True:
            if reader.done():
                reader.result()
            due = self.outbox.pending >= self.batch_size or (
                self.outbox.pending and self.clock() - last_send >= self.flush_interval
            )
            if self.outbox.inflight < self.max_inflight and (due or self._draining):
                batch = self.outbox.take(self.batch_size)
                if batch is not None:
                    try:
                        await call.write(encode(batch, signer=self.signer))
                    except asyncio.InvalidStateError:
                        # The RPC ended before the reader saw it; its status says why.
                        await reader
                        raise StreamLost("the stream ended while sending") from None
                    self.sent += len(batch.results)
                    last_send = self.clock()
                    continue
            self._wake.clear()
            waker = asyncio.create_task(self._wake.wait())
            try:
                await asyncio.wait(
                    {waker, reader},
                    timeout=self.flush_interval,
                    return_when=asyncio.FIRST_COMPLETED,
                )
            finally:
                waker.cancel()  # also when this task is cancelled: no pending task left behind

    async def drain(self, timeout: float) -> bool:  # noqa: ASYNC109 - a deadline, not a cancel scope
        """Send everything pending now and wait for the acks; True if all were acknowledged."""
        self._draining = True
        self._wake.set()
        deadline = self.clock() + timeout
        while len(self.outbox) and self.clock() < deadline:
            self._acked.clear()
            try:
                await asyncio.wait_for(
                    self._acked.wait(), timeout=max(0.0, deadline - self.clock())
                )
            except TimeoutError:
                break
        return len(self.outbox) == 0
