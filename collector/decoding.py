"""Bytes that do not parse as a method's request are INVALID_ARGUMENT, named and logged.

Left to itself grpc.aio deserializes a request before any servicer code runs
and answers a DecodeError with UNKNOWN "Unexpected <DecodeError>" plus a
traceback in the log: neither the caller nor the operator learns what was
wrong. `Decoding` is the outermost server interceptor: it swaps each
method's deserializer for one that returns `Malformed` instead of raising,
and ends the call with INVALID_ARGUMENT naming the message type and, in a
stream, the message's position. All four call shapes are covered, the open
health service's Check and Watch included, and the warning is throttled per
method (`Throttle`): that service needs no token, so anyone could otherwise
fill the log. Everything accepted before a malformed
message in a stream has been handled as usual (batches stored and
acknowledged), so nothing accepted is lost.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NoReturn, TypeAlias

import grpc
from google.protobuf.message import DecodeError

log = logging.getLogger(__name__)

Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"


@dataclass(frozen=True)
class Malformed:
    """What the tolerant deserializer hands on for bytes that are not the request type."""

    type_name: str
    error: str


def _type_name(deserializer: Callable[[bytes], Any]) -> str:
    message_class = getattr(deserializer, "__self__", None)
    descriptor = getattr(message_class, "DESCRIPTOR", None)
    return str(getattr(descriptor, "full_name", "request message"))


def tolerant(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    """`deserializer`, returning Malformed where it would raise DecodeError."""
    type_name = _type_name(deserializer)

    def decode(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError as exc:
            return Malformed(type_name, str(exc) or "cannot parse")

    return decode


class Throttle:
    """At most one log line per `every` seconds per key; the calls in between are counted.

    The health service answers anyone who reaches the port, without a token: a warning per
    undecodable request would let anyone flood the log.
    """

    def __init__(self, every: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.every = every
        self.clock = clock
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def allow(self, key: str) -> int | None:
        """The number of calls held back since the last allowed one, or None to stay quiet."""
        now = self.clock()
        last = self._last.get(key)
        if last is not None and now - last < self.every:
            self._held[key] = self._held.get(key, 0) + 1
            return None
        self._last[key] = now
        return self._held.pop(key, 0)


async def _refuse(
    context: Context, method: str, bad: Malformed, throttle: Throttle, position: str = ""
) -> NoReturn:
    name = method.rsplit("/", 1)[-1]
    held = throttle.allow(method)
    if held is not None:
        log.warning(
            "malformed_request method=%s message=%s type=%s error=%s peer=%s suppressed=%d",
            name, position or "1", bad.type_name, bad.error, context.peer(), held,
        )  # fmt: skip
    where = f"message {position} " if position else "the request "
    await context.abort(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"{name}: {where}is not a valid {bad.type_name} ({bad.error})",
    )
    raise AssertionError("abort returned")  # pragma: no cover - abort always raises


async def _checked(
    requests: AsyncIterator[Any], context: Context, method: str, throttle: Throttle
) -> AsyncIterator[Any]:
    position = 0
    async for message in requests:
        position += 1
        if isinstance(message, Malformed):
            await _refuse(context, method, message, throttle, str(position))
        yield message


def _streaming(inner: Callable[..., Any], first: Callable[[Any, Context], Awaitable[Any]]) -> Any:
    """A response-streaming behaviour that runs `first(request, context)`, then `inner` in its
    own style: an async generator stays one; a coroutine that writes with `context.write`
    (the health service's Watch) stays a coroutine."""
    if inspect.isasyncgenfunction(inner):

        async def generator(request: Any, context: Context) -> AsyncIterator[Any]:
            async for response in inner(await first(request, context), context):
                yield response

        return generator

    async def coroutine(request: Any, context: Context) -> Any:
        return await inner(await first(request, context), context)

    return coroutine


class Decoding(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Maps undecodable requests to INVALID_ARGUMENT, for every call shape (see the module
    docstring); the warning it logs is throttled per method."""

    def __init__(self, throttle: Throttle | None = None) -> None:
        self.throttle = throttle if throttle is not None else Throttle()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        method = handler_call_details.method
        throttle = self.throttle
        serdes = {
            "request_deserializer": tolerant(handler.request_deserializer),
            "response_serializer": handler.response_serializer,
        }

        async def whole(request: Any, context: Context) -> Any:
            if isinstance(request, Malformed):
                await _refuse(context, method, request, throttle)
            return request

        async def each(requests: AsyncIterator[Any], context: Context) -> AsyncIterator[Any]:
            return _checked(requests, context, method, throttle)

        if handler.unary_unary is not None:
            unary = handler.unary_unary

            async def unary_unary(request: Any, context: Context) -> Any:
                return await unary(await whole(request, context), context)  # type: ignore[arg-type]

            return grpc.unary_unary_rpc_method_handler(unary_unary, **serdes)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _streaming(handler.unary_stream, whole), **serdes
            )
        if handler.stream_unary is not None:
            client_stream = handler.stream_unary

            async def stream_unary(requests: AsyncIterator[Any], context: Context) -> Any:
                return await client_stream(await each(requests, context), context)  # type: ignore[arg-type]

            return grpc.stream_unary_rpc_method_handler(stream_unary, **serdes)
        assert handler.stream_stream is not None
        return grpc.stream_stream_rpc_method_handler(
            _streaming(handler.stream_stream, each), **serdes
        )
