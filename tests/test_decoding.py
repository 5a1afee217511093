"""The Decoding interceptor on every call shape, over a real grpc.aio server on loopback."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2

from collector.decoding import Decoding, Throttle

pytestmark = pytest.mark.integration

Request = health_pb2.HealthCheckRequest
Reply = health_pb2.HealthCheckResponse
SERVING = Reply(status=Reply.SERVING)
BAD = b"\xff\xff\xff"  # a truncated varint: no message parses from it


async def unary_unary(request: Request, context: Any) -> Reply:
    return SERVING


async def unary_stream_generator(request: Request, context: Any) -> AsyncIterator[Reply]:
    yield SERVING
    yield SERVING


async def unary_stream_writer(request: Request, context: Any) -> None:
    await context.write(SERVING)  # the health service's Watch style


async def stream_unary(requests: AsyncIterator[Request], context: Any) -> Reply:
    n = sum([1 async for _ in requests])
    return Reply(status=Reply.SERVING if n else Reply.UNKNOWN)


async def stream_stream(requests: AsyncIterator[Request], context: Any) -> AsyncIterator[Reply]:
    async for _ in requests:
        yield SERVING


def handlers() -> grpc.GenericRpcHandler:
    serdes: dict[str, Any] = {
        "request_deserializer": Request.FromString,
        "response_serializer": Reply.SerializeToString,
    }
    return grpc.method_handlers_generic_handler(
        "test.Shapes",
        {
            "UU": grpc.unary_unary_rpc_method_handler(unary_unary, **serdes),
            "USG": grpc.unary_stream_rpc_method_handler(unary_stream_generator, **serdes),
            "USW": grpc.unary_stream_rpc_method_handler(unary_stream_writer, **serdes),
            "SU": grpc.stream_unary_rpc_method_handler(stream_unary, **serdes),
            "SS": grpc.stream_stream_rpc_method_handler(stream_stream, **serdes),
        },
    )


@pytest.fixture
async def channel() -> AsyncIterator[grpc.aio.Channel]:
    server = grpc.aio.server(interceptors=[Decoding(Throttle(every=3600.0))])
    server.add_generic_rpc_handlers((handlers(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        yield ch
    await server.stop(None)


def calls(ch: grpc.aio.Channel, payloads: list[bytes]) -> dict[str, Callable[[], Awaitable[Any]]]:
    """One call per method with `payloads` (the last one for single-request shapes)."""

    async def unary_stream(method: str) -> list[Any]:
        return [r async for r in ch.unary_stream(method, None, None)(payloads[-1])]

    async def streaming_request(method: str, multi: bool) -> Any:
        factory = ch.stream_stream if multi else ch.stream_unary
        call = factory(method, None, None)()
        for p in payloads:
            await call.write(p)
        await call.done_writing()
        if multi:
            return [r async for r in call]  # type: ignore[attr-defined]
        return await call

    return {
        "UU": lambda: ch.unary_unary("/test.Shapes/UU", None, None)(payloads[-1]),
        "USG": lambda: unary_stream("/test.Shapes/USG"),
        "USW": lambda: unary_stream("/test.Shapes/USW"),
        "SU": lambda: streaming_request("/test.Shapes/SU", False),
        "SS": lambda: streaming_request("/test.Shapes/SS", True),
    }


class TestShapes:
    async def test_valid_requests_reach_the_handler(self, channel: grpc.aio.Channel) -> None:
        """Valid bytes pass through on all four shapes, both streaming styles included."""
        good = Request(service="x").SerializeToString()
        for name, make in calls(channel, [good, good]).items():
            result = await make()
            replies = result if isinstance(result, list) else [result]
            assert replies and all(Reply.FromString(r).status == Reply.SERVING for r in replies), (
                name
            )

    async def test_undecodable_bytes_are_invalid_argument(
        self, channel: grpc.aio.Channel, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Bytes that are not the request type end every shape with INVALID_ARGUMENT naming the
        type (and in a request stream, the position); the log has one warning per method and
        no ERROR."""
        caplog.set_level(logging.WARNING)
        good = Request(service="x").SerializeToString()
        for name, make in calls(channel, [good, BAD]).items():
            for _ in range(3):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await make()
                details = info.value.details() or ""
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, info.value)
                assert "is not a valid grpc.health.v1.HealthCheckRequest" in details, details
                if name in ("SU", "SS"):
                    assert "message 2 " in details, details
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
        warned = [r.getMessage() for r in caplog.records if "malformed_request" in r.getMessage()]
        assert len(warned) == 5, warned


class TestThrottle:
    def test_one_line_per_window_counting_the_rest(self) -> None:
        """Within `every` seconds a key is allowed once; the next allowed call says how many
        were held back; keys are independent."""
        now = [100.0]
        throttle = Throttle(every=10.0, clock=lambda: now[0])
        assert throttle.allow("a") == 0
        assert [throttle.allow("a") for _ in range(5)] == [None] * 5
        assert throttle.allow("b") == 0
        now[0] += 9.9
        assert throttle.allow("a") is None
        now[0] += 0.1
        assert throttle.allow("a") == 6
        assert throttle.allow("a") is None
