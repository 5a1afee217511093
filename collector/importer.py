"""`takedown-collector import`: validate a report file whole, then submit it over gRPC.

Nothing is sent until the whole file has been read and checked, so a file
with a bad row is not half-imported (unless --skip-invalid). Requests are
idempotent on the collector's side (reference, or URL + notice time), so a
request that failed in transit is simply sent again.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TextIO

import grpc
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)

from client.credentials import ClientTLS, call_metadata, open_channel
from client.failures import TRANSIENT_CODES, classify
from collector.reports_file import ReportFileError, ReportIn, RowError, read_reports, validate_file
from protos.takedown.v1 import takedown_pb2 as pb
from protos.takedown.v1 import takedown_pb2_grpc as pb_grpc


def _transient(exc: BaseException) -> bool:
    """Worth another try: the collector is unavailable or slow, and not for a TLS mistake."""
    if not isinstance(exc, grpc.aio.AioRpcError) or exc.code() not in TRANSIENT_CODES:
        return False
    return not classify(exc).fatal


def _retrying(out: TextIO, target: str, attempts: int) -> Callable[[RetryCallState], None]:
    """tenacity's before_sleep: one line naming the cause of each retry."""

    def say(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome is not None else None
        cause = classify(exc) if isinstance(exc, grpc.aio.AioRpcError) else exc
        wait = state.next_action.sleep if state.next_action is not None else 0.0
        print(
            f"import: collector {target} failed ({cause}); attempt {state.attempt_number}"
            f" of {attempts}, retrying in {wait:.1f} s",
            file=out,
        )

    return say


def _chunks(path: Path, fmt: str | None, size: int) -> Iterator[list[ReportIn]]:
    chunk: list[ReportIn] = []
    for item in read_reports(path, fmt):
        if isinstance(item, RowError):
            continue
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _message(r: ReportIn) -> pb.Report:
    return pb.Report(
        url=r.url,
        reference=r.reference or "",
        notified_at_unix_us=round(r.notified_at * 1_000_000),
        received_at_unix_us=round(r.received_at * 1_000_000) if r.received_at else 0,
        sha256=r.sha256 or b"",
        order_issued_at_unix_us=round(r.order_issued_at * 1_000_000) if r.order_issued_at else 0,
        order_deadline_seconds=round(r.order_deadline) if r.order_deadline else 0,
        origin_ip=r.origin_ip or "",
    )


async def import_file(
    path: Path,
    target: str,
    *,
    fmt: str | None = None,
    skip_invalid: bool = False,
    batch_size: int = 1000,
    out: TextIO = sys.stderr,
    attempts: int = 5,
    tls: ClientTLS | None = None,
    token: str | None = None,
) -> int:
    """Import a file; print progress and a summary to `out`; return the exit status.

    `tls` None is plaintext (the CLI uses it only with --insecure); `token` is the
    hotline's intake token, sent as `authorization: Bearer` metadata.
    """
    try:
        check = validate_file(path, fmt)
    except ReportFileError as exc:
        print(f"import: {exc}", file=out)
        return 1
    for e in check.errors:
        print(f"{path}:{e.line}: {e.message}", file=out)
    if check.error_count > len(check.errors):
        print(f"... and {check.error_count - len(check.errors)} more invalid rows", file=out)
    if check.error_count and not skip_invalid:
        print(
            f"import: {check.error_count} invalid rows; nothing imported"
            " (fix them, or pass --skip-invalid to import the valid rows)",
            file=out,
        )
        _summary(out, 0, 0, check.error_count)
        return 1
    accepted = known = rejected = 0
    sent = 0
    last_progress = time.monotonic()
    try:
        async with open_channel(target, tls) as channel:
            stub = pb_grpc.IntakeStub(channel)
            for chunk in _chunks(path, fmt, batch_size):
                request = pb.SubmitRequest(reports=[_message(r) for r in chunk])
                response: pb.SubmitResponse | None = None
                async for attempt in AsyncRetrying(
                    retry=retry_if_exception(_transient),
                    stop=stop_after_attempt(attempts),
                    wait=wait_exponential_jitter(multiplier=0.5, max=10),
                    reraise=True,
                    before_sleep=_retrying(out, target, attempts),
                ):
                    with attempt:
                        response = await stub.Submit(
                            request, timeout=60, metadata=call_metadata(token)
                        )
                assert response is not None
                for report, outcome in zip(chunk, response.outcomes, strict=True):
                    if outcome.status == pb.SUBMIT_STATUS_ACCEPTED:
                        accepted += 1
                    elif outcome.status == pb.SUBMIT_STATUS_ALREADY_KNOWN:
                        known += 1
                    else:
                        rejected += 1
                        label = report.reference or "(no reference)"
                        print(f"{path}: report {label} rejected: {outcome.error}", file=out)
                sent += len(chunk)
                if time.monotonic() - last_progress >= 2 or sent == check.valid:
                    print(f"import: {sent}/{check.valid} reports sent", file=out)
                    last_progress = time.monotonic()
    except grpc.aio.AioRpcError as exc:
        print(
            f"import: collector {target} failed: {classify(exc)}"
            f" ({sent} of {check.valid} reports were sent before; importing again is safe)",
            file=out,
        )
        _summary(out, accepted, known, rejected + check.error_count)
        return 1
    _summary(out, accepted, known, rejected + check.error_count)
    return 1 if rejected or (check.error_count and not skip_invalid) else 0


def _summary(out: TextIO, accepted: int, known: int, rejected: int) -> None:
    print(f"import: accepted {accepted}, already known {known}, rejected {rejected}", file=out)
