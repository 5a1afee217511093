"""Bytes that do not parse as a method's request are INVALID_ARGUMENT, named and logged.

Left to itself grpc.aio deserializes a request before any servicer code runs
and answers a DecodeError with UNKNOWN "Unexpected <DecodeError>" plus a
traceback in the log: neither the caller nor the operator learns what was
wrong. `Decoding` is the outermost server interceptor: it swaps each
method's deserializer for one that returns `Malformed` instead of raising,
and ends the call with INVALID_ARGUMENT naming the message type and, in a
stream, the message's position. Everything accepted before a malformed
message in a stream has been handled as usual (batches stored and
acknowledged), so nothing accepted is lost.
"""

from __future__ import annotations

import logging
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


async def _refuse(context: Context, method: str, bad: Malformed, position: str = "") -> NoReturn:
    name = method.rsplit("/", 1)[-1]
    log.warning(
        "malformed_request method=%s message=%s type=%s error=%s peer=%s",
        name, position or "1", bad.type_name, bad.error, context.peer(),
    )  # fmt: skip
    where = f"message {position} " if position else "the request "
    await context.abort(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"{name}: {where}is not a valid {bad.type_name} ({bad.error})",
    )
    raise AssertionError("abort returned")  # pragma: no cover - abort always raises


async def _checked(
    requests: AsyncIterator[Any], context: Context, method: str
) -> AsyncIterator[Any]:
    position = 0
    async for message in requests:
        position += 1
        if isinstance(message, Malformed):
            await _refuse(context, method, message, str(position))
        yield message


class Decoding(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Maps undecodable requests to INVALID_ARGUMENT (see the module docstring)."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        method = handler_call_details.method
        serdes = {
            "request_deserializer": tolerant(handler.request_deserializer),
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary is not None:
            unary = handler.unary_unary

            async def unary_unary(request: Any, context: Context) -> Any:
                if isinstance(request, Malformed):
                    await _refuse(context, method, request)
                return await unary(request, context)  # type: ignore[arg-type]

            return grpc.unary_unary_rpc_method_handler(unary_unary, **serdes)
        if handler.stream_stream is not None:
            stream = handler.stream_stream

            async def stream_stream(requests: AsyncIterator[Any], context: Context) -> Any:
                responses: Any = stream(_checked(requests, context, method), context)  # type: ignore[arg-type]
                async for response in responses:
                    yield response

            return grpc.stream_stream_rpc_method_handler(stream_stream, **serdes)
        return handler  # the health service's other shapes keep grpc's own decoding
