"""Who may call the collector: TLS server credentials and the authentication gate.

`Gate` is a grpc.aio server interceptor, so the services behind it stay
unaware of credentials. Per call it checks, in this order:

1. the bearer token (`authorization: Bearer tdm_...` metadata), when tokens are
   required: missing, malformed, unknown or revoked is UNAUTHENTICATED; a token
   of the wrong role (an agent token on Intake.Submit, an intake token on
   AgentLink.Connect) is PERMISSION_DENIED;
2. for AgentLink.Connect, the hello (the stream's first message, handed on to
   the service unchanged): its agent name must be the token's, and its network
   the token's if the token names one; with mutual TLS the client certificate's
   common name or one of its subject alternative names must equal the agent
   name. A mismatch is PERMISSION_DENIED.

Every refusal is logged at warning with the reason, the method, the token's
public id (never the secret) and the peer address, and counted in
`takedown_collector_auth_refusals_total{reason}`. A stream whose token is
revoked while it is open is ended with UNAUTHENTICATED at the next
`revalidate()` (the server calls it periodically). The health service is open.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeAlias

import grpc
from prometheus_client import CollectorRegistry

from collector.selfmetrics import SelfMetrics
from collector.store.credentials import Credential, find_token, revoked_among
from collector.store.reads import connect_readonly
from collector.store.sql import READ_ERRORS
from collector.tokens import Role, matches, token_id_of

log = logging.getLogger(__name__)

CONNECT = "/takedown.v1.AgentLink/Connect"
SUBMIT = "/takedown.v1.Intake/Submit"
OPEN_SERVICES = ("/grpc.health.v1.Health/",)

Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"


@dataclass(frozen=True)
class ServerTLS:
    """The collector's certificate and key; with `client_ca_file`, clients need a certificate."""

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None


def server_credentials(tls: ServerTLS) -> grpc.ServerCredentials:
    """gRPC server credentials from PEM files (OSError naming the file if one is unreadable)."""
    key = tls.key_file.read_bytes()
    chain = tls.cert_file.read_bytes()
    client_ca = tls.client_ca_file.read_bytes() if tls.client_ca_file else None
    return grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The token of the first `authorization: Bearer ...` entry, or None."""
    for key, value in metadata or ():
        if key.lower() == "authorization" and isinstance(value, str):
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


def certificate_names(context: grpc.aio.ServicerContext[Any, Any]) -> set[str] | None:
    """Common name and subject alternative names of the client certificate, None without one."""
    auth = context.auth_context()
    raw = [
        *auth.get("x509_common_name", ()),
        *auth.get("x509_subject_alternative_name", ()),
    ]
    if not raw:
        return None
    return {n.decode("utf-8", "replace") for n in raw}


class _Revoked(Exception):
    """The credential of an open stream was revoked."""


_END = object()


async def _replay(first: Any, rest: AsyncIterator[Any]) -> AsyncIterator[Any]:
    if first is not None:
        yield first
    async for message in rest:
        yield message


async def _step(responses: Any) -> Any:
    try:
        return await responses.__anext__()
    except StopAsyncIteration:
        return _END


async def _cancel(task: asyncio.Future[Any]) -> None:
    task.cancel()
    await asyncio.wait({task})


async def _until(responses: Any, revoked: asyncio.Event) -> AsyncIterator[Any]:
    """The service's responses, until the stream's credential is revoked (then _Revoked).

    Each step of the service's generator runs as its own task so that a revocation can
    interrupt it wherever it waits; cancelling it runs the service's own cleanup.
    """
    stop = asyncio.ensure_future(revoked.wait())
    try:
        while True:
            step = asyncio.ensure_future(_step(responses))
            try:
                await asyncio.wait({step, stop}, return_when=asyncio.FIRST_COMPLETED)
            except BaseException:
                await _cancel(step)
                raise
            if not step.done():
                await _cancel(step)
                raise _Revoked
            item = step.result()
            if item is _END:
                return
            yield item
    finally:
        stop.cancel()
        await responses.aclose()


INTAKE_SOURCE: contextvars.ContextVar[str] = contextvars.ContextVar("intake_source", default="")
"""The intake credential's name during a Submit call ('' without tokens): whose references."""


class Gate(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Authenticates and authorises every call (see the module docstring)."""

    def __init__(
        self,
        db_path: Path | str,
        *,
        tokens: bool = True,
        mutual_tls: bool = False,
        metrics: SelfMetrics | None = None,
    ) -> None:
        self.db_path = db_path
        self.tokens = tokens
        self.mutual_tls = mutual_tls
        self.metrics = metrics or SelfMetrics(CollectorRegistry())
        self._open: dict[int, set[asyncio.Event]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(OPEN_SERVICES):
            return handler
        if method == CONNECT and handler.stream_stream is not None:
            return self._connect(handler)
        if method == SUBMIT and handler.unary_unary is not None:
            return self._submit(handler)
        return self._deny(handler, method)

    # -- the checks ---------------------------------------------------------------------------

    async def _refuse(
        self,
        context: grpc.aio.ServicerContext[Any, Any],
        code: grpc.StatusCode,
        reason: str,
        details: str,
        method: str,
        who: str = "",
    ) -> NoReturn:
        log.warning(
            "auth_refused method=%s reason=%s %speer=%s",
            method.rsplit("/", 1)[-1],
            reason,
            f"{who} " if who else "",
            context.peer(),
        )
        self.metrics.auth_refusals.labels(reason).inc()
        await context.abort(code, details)

    def _find(self, token_id: str) -> tuple[Credential, bytes] | None:
        conn = connect_readonly(self.db_path)
        try:
            return find_token(conn, token_id)
        finally:
            conn.close()

    async def _authenticate(
        self, context: grpc.aio.ServicerContext[Any, Any], role: Role, method: str
    ) -> Credential | None:
        """The caller's live credential of `role`; None when tokens are not required."""
        if not self.tokens:
            return None
        unauthenticated = grpc.StatusCode.UNAUTHENTICATED
        token = bearer_token(context.invocation_metadata())
        if token is None:
            await self._refuse(
                context, unauthenticated, "missing", "a bearer token is required", method
            )
        token_id = token_id_of(token)
        if token_id is None:
            await self._refuse(context, unauthenticated, "malformed", "invalid token", method)
        try:
            found = await asyncio.to_thread(self._find, token_id)
        except READ_ERRORS as exc:
            log.error("auth_unavailable error=%s", exc)
            await context.abort(grpc.StatusCode.UNAVAILABLE, "credentials cannot be checked")
        who = f"token_id={token_id}"
        if found is None or not matches(token, found[1]):
            await self._refuse(context, unauthenticated, "unknown", "invalid token", method, who)
        credential = found[0]
        who = f"token_id={token_id} {credential.role}={credential.name}"
        if credential.revoked_at is not None:
            await self._refuse(context, unauthenticated, "revoked", "token revoked", method, who)
        if credential.role != role.value:
            await self._refuse(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                "wrong_role",
                f"this token (role {credential.role}) may not call {method.rsplit('/', 1)[-1]}",
                method,
                who,
            )
        return credential

    async def _check_hello(
        self,
        context: grpc.aio.ServicerContext[Any, Any],
        credential: Credential | None,
        agent: str,
        network: str,
    ) -> None:
        denied = grpc.StatusCode.PERMISSION_DENIED
        who = f"agent={agent[:128]!r}"
        if credential is not None:
            who = f"token_id={credential.token_id} {who}"
            if agent != credential.name:
                await self._refuse(
                    context, denied, "name_mismatch", "the token belongs to another agent name",
                    CONNECT, who,
                )  # fmt: skip
            if credential.network and network != credential.network:
                await self._refuse(
                    context, denied, "network_mismatch",
                    f"the token is for network {credential.network!r}", CONNECT, who,
                )  # fmt: skip
        names = certificate_names(context)
        if (names is not None or self.mutual_tls) and agent not in (names or ()):
            await self._refuse(
                context, denied, "cert_mismatch",
                "the client certificate does not name this agent", CONNECT, who,
            )  # fmt: skip

    # -- the wrapped handlers -----------------------------------------------------------------

    def _connect(self, handler: Handler) -> Handler:
        inner = handler.stream_stream
        assert inner is not None

        async def connect(
            requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            credential = await self._authenticate(context, Role.AGENT, CONNECT)
            first = await anext(aiter(requests), None)
            if first is not None and first.WhichOneof("kind") == "hello":
                await self._check_hello(context, credential, first.hello.agent, first.hello.network)
            revoked = asyncio.Event()
            if credential is not None:
                self._open.setdefault(credential.id, set()).add(revoked)
            try:
                responses: Any = inner(_replay(first, requests), context)  # type: ignore[arg-type]
                async for message in _until(responses, revoked):
                    yield message
            except _Revoked:
                assert credential is not None
                await self._refuse(
                    context, grpc.StatusCode.UNAUTHENTICATED, "revoked", "token revoked",
                    CONNECT, f"token_id={credential.token_id} agent={credential.name}",
                )  # fmt: skip
            finally:
                if credential is not None:
                    streams = self._open.get(credential.id, set())
                    streams.discard(revoked)
                    if not streams:
                        self._open.pop(credential.id, None)

        return grpc.stream_stream_rpc_method_handler(
            connect,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _submit(self, handler: Handler) -> Handler:
        inner = handler.unary_unary
        assert inner is not None

        async def submit(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            credential = await self._authenticate(context, Role.INTAKE, SUBMIT)
            token = INTAKE_SOURCE.set(credential.name if credential is not None else "")
            try:
                return await inner(request, context)  # type: ignore[arg-type]
            finally:
                INTAKE_SOURCE.reset(token)

        return grpc.unary_unary_rpc_method_handler(
            submit,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _deny(self, handler: Handler, method: str) -> Handler:
        """A method this gate has no rule for is refused (default deny)."""

        async def deny(_: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            await self._refuse(
                context, grpc.StatusCode.PERMISSION_DENIED, "no_rule", "not allowed", method
            )

        serdes = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(deny, **serdes)
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(deny, **serdes)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(deny, **serdes)
        return grpc.unary_unary_rpc_method_handler(deny, **serdes)

    # -- revocation of open streams -----------------------------------------------------------

    def _revoked(self, ids: list[int]) -> set[int]:
        conn = connect_readonly(self.db_path)
        try:
            return revoked_among(conn, ids)
        finally:
            conn.close()

    async def revalidate(self) -> int:
        """End the open streams whose credential was revoked since; return how many."""
        ids = list(self._open)
        if not ids:
            return 0
        revoked = await asyncio.to_thread(self._revoked, ids)
        ended = 0
        for credential_id in revoked:
            for event in self._open.get(credential_id, ()):
                event.set()
                ended += 1
        return ended

    async def revalidate_forever(self, every: float) -> None:
        while True:
            await asyncio.sleep(every)
            try:
                await self.revalidate()
            except READ_ERRORS as exc:
                log.error("auth_revalidate_failed error=%s", exc)
