"""Tests for the prober against real aiohttp servers on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import errno
import gzip
import hashlib
import logging
import socket
import ssl
import tempfile
from collections.abc import AsyncIterator, Sequence
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

import aiohttp
import pytest
import trustme
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.client_reqrep import ConnectionKey
from aiohttp.typedefs import Handler

from agent.guard import AddressPolicy, ForbiddenAddress
from agent.probe import Phase, ProbeConfig, Prober, classify
from agent.result import ErrorClass, ProbeResult, TlsCheck
from tests.certs import self_signed

MARKER = b"MARKER-7d1f-not-to-be-kept"
BODY = b"reported content " + MARKER + b" " + bytes(range(256)) * 8
LOOPBACK = AddressPolicy.build(["127.0.0.0/8"])
ONLY_127_0_0_1 = AddressPolicy.build(["127.0.0.1/32"])
SMALL_CAP = 1000
NEVER = asyncio.Event  # a handler awaiting a fresh Event waits until cancelled


def _has_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


class StubResolver(AbstractResolver):
    """Maps names to successive answers; unknown names are NXDOMAIN."""

    def __init__(self, answers: dict[str, Sequence[Sequence[str]]]) -> None:
        self.answers = answers
        self.lookups: dict[str, int] = {}

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if host == "servfail.test":
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        if host not in self.answers:
            try:  # like getaddrinfo, accept legacy numeric IPv4 forms
                return [self._result(host, socket.inet_ntoa(socket.inet_aton(host)), port)]
            except OSError:
                raise socket.gaierror(socket.EAI_NONAME, "Name or service not known") from None
        n = self.lookups[host] = self.lookups.get(host, 0) + 1
        answers = self.answers[host]
        addrs = answers[min(n, len(answers)) - 1]
        return [self._result(host, a, port) for a in addrs]

    @staticmethod
    def _result(host: str, addr: str, port: int) -> ResolveResult:
        family = socket.AF_INET6 if ":" in addr else socket.AF_INET
        return ResolveResult(hostname=host, host=addr, port=port, family=family, proto=0, flags=0)

    async def close(self) -> None:
        pass


class HangingResolver(StubResolver):
    """A resolver that never answers."""

    def __init__(self) -> None:
        super().__init__({})

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        await NEVER().wait()
        raise AssertionError("unreachable")


class Origin:
    """An aiohttp test server that records who asked for what."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str | None]] = []
        self.port = 0
        app = web.Application(middlewares=[self._record])
        app.router.add_get("/ok", self._ok)
        app.router.add_get("/status/{code}", self._status)
        app.router.add_get("/gzip", self._gzip)
        app.router.add_get("/size/{n}", self._size)
        app.router.add_get("/chain/{n}", self._chain)
        app.router.add_get("/to", self._to)
        app.router.add_get("/stall-headers", self._stall_headers)
        app.router.add_get("/stall-body", self._stall_body)
        app.router.add_get("/cut", self._cut)
        app.router.add_get("/bad-gzip", self._bad_gzip)
        self.app = app

    def url(self, path: str, host: str = "127.0.0.1", scheme: str = "http") -> str:
        return f"{scheme}://{host}:{self.port}{path}"

    @web.middleware
    async def _record(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self.requests.append((request.path, request.remote))
        return await handler(request)

    async def _ok(self, request: web.Request) -> web.Response:
        return web.Response(body=BODY)

    async def _status(self, request: web.Request) -> web.Response:
        return web.Response(status=int(request.match_info["code"]), body=b"gone")

    async def _gzip(self, request: web.Request) -> web.Response:
        return web.Response(body=gzip.compress(BODY), headers={"Content-Encoding": "gzip"})

    async def _size(self, request: web.Request) -> web.Response:
        n = int(request.match_info["n"])
        return web.Response(body=(BODY * (n // len(BODY) + 1))[:n])

    async def _chain(self, request: web.Request) -> web.Response:
        n = int(request.match_info["n"])
        if n == 0:
            return web.Response(body=BODY)
        target = f"/chain/{n - 1}" if n % 2 else self.url(f"/chain/{n - 1}")
        raise web.HTTPFound(target)

    async def _to(self, request: web.Request) -> web.Response:
        raise web.HTTPFound(request.query["location"])

    async def _stall_headers(self, request: web.Request) -> web.Response:
        await NEVER().wait()
        raise AssertionError("unreachable")

    async def _stall_body(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Length": "100"})
        await resp.prepare(request)
        await resp.write(b"x" * 10)
        await NEVER().wait()
        return resp

    async def _cut(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Length": "100"})
        await resp.prepare(request)
        await resp.write(b"x" * 10)
        assert request.transport is not None
        request.transport.close()
        return resp

    async def _bad_gzip(self, request: web.Request) -> web.Response:
        return web.Response(body=b"not gzip at all", headers={"Content-Encoding": "gzip"})


@contextlib.asynccontextmanager
async def serving(origin: Origin, ssl_context: ssl.SSLContext | None = None) -> AsyncIterator[None]:
    runner = web.AppRunner(origin.app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
    await site.start()
    origin.port = runner.addresses[0][1]
    try:
        yield
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def raw_server(reply: bytes) -> AsyncIterator[int]:
    """A TCP server that writes ``reply`` to each client and hangs up."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(reply)
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    async with server:
        yield server.sockets[0].getsockname()[1]


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture
async def origin() -> AsyncIterator[Origin]:
    server = Origin()
    async with serving(server):
        yield server


async def probe(
    url: str,
    *,
    policy: AddressPolicy = LOOPBACK,
    resolver: AbstractResolver | None = None,
    ssl_context: ssl.SSLContext | None = None,
    trust_pem: str | None = None,
    **config: object,
) -> ProbeResult:
    async with Prober(
        ProbeConfig(**config),  # type: ignore[arg-type]
        policy,
        resolver=resolver or StubResolver({}),
        ssl_context=ssl_context,
        trust_pem=trust_pem,
    ) as prober:
        return await prober.probe(7, url)


class TestProber:
    async def test_ok_body_hashed(self, origin: Origin) -> None:
        """A 200 body is reported by status, SHA-256, size and peer address."""
        r = await probe(origin.url("/ok"))
        assert (r.error, r.status, r.url_id) == (ErrorClass.NONE, 200, 7)
        assert r.body_sha256 == hashlib.sha256(BODY).digest()
        assert (r.body_bytes, r.truncated) == (len(BODY), False)
        assert (r.peer_ip, r.final_url, r.redirects) == ("127.0.0.1", origin.url("/ok"), 0)

    @pytest.mark.parametrize("code", [404, 410, 451, 503])
    async def test_error_statuses_carried(self, origin: Origin, code: int) -> None:
        """Non-2xx statuses are results, not errors, and their body is hashed too."""
        r = await probe(origin.url(f"/status/{code}"))
        assert (r.status, r.error) == (code, ErrorClass.NONE)
        assert r.body_sha256 == hashlib.sha256(b"gone").digest()

    async def test_gzip_hashed_decoded(self, origin: Origin) -> None:
        """A gzip-encoded body is hashed as the decoded content."""
        r = await probe(origin.url("/gzip"))
        assert r.body_sha256 == hashlib.sha256(BODY).digest()
        assert r.body_bytes == len(BODY)

    async def test_cap_truncates(self, origin: Origin) -> None:
        """Past the byte cap reading stops and the hash covers the first cap bytes."""
        r = await probe(origin.url(f"/size/{SMALL_CAP * 70}"), max_body_bytes=SMALL_CAP)
        expected = (BODY * 100)[:SMALL_CAP]
        assert (r.truncated, r.body_bytes) == (True, SMALL_CAP)
        assert r.body_sha256 == hashlib.sha256(expected).digest()

    async def test_body_of_exactly_cap_not_truncated(self, origin: Origin) -> None:
        """A body exactly as long as the cap is complete, not truncated."""
        r = await probe(origin.url(f"/size/{SMALL_CAP}"), max_body_bytes=SMALL_CAP)
        assert (r.truncated, r.body_bytes) == (False, SMALL_CAP)

    async def test_redirect_chain_followed(self, origin: Origin) -> None:
        """Relative and absolute redirects are followed up to max_redirects hops."""
        r = await probe(origin.url("/chain/10"))
        assert (r.error, r.status, r.redirects) == (ErrorClass.NONE, 200, 10)
        assert r.final_url == origin.url("/chain/0")
        assert r.body_sha256 == hashlib.sha256(BODY).digest()

    async def test_too_many_redirects(self, origin: Origin) -> None:
        """An eleventh hop is not followed and the probe reports TOO_MANY_REDIRECTS."""
        r = await probe(origin.url("/chain/11"))
        assert (r.error, r.status, r.redirects) == (ErrorClass.TOO_MANY_REDIRECTS, 302, 10)
        assert r.final_url == origin.url("/chain/1")
        assert len(origin.requests) == 11

    async def test_redirect_to_non_http_is_invalid(self, origin: Origin) -> None:
        """A redirect to a non-http(s) scheme is INVALID_URL and is not followed."""
        r = await probe(origin.url("/to?location=ftp://127.0.0.1/x"))
        assert (r.error, r.status, r.redirects) == (ErrorClass.INVALID_URL, 302, 0)

    @pytest.mark.parametrize(
        "url", ["ftp://127.0.0.1/", "not a url", "http:///path", "javascript:alert(1)"]
    )
    async def test_invalid_url(self, url: str) -> None:
        """Anything but an absolute http(s) URL with a host is INVALID_URL."""
        r = await probe(url)
        assert (r.error, r.status, r.final_url) == (ErrorClass.INVALID_URL, 0, url)

    async def test_connect_refused(self) -> None:
        """A closed port gives CONNECT_REFUSED."""
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        r = await probe(f"http://127.0.0.1:{port}/")
        assert (r.error, r.status) == (ErrorClass.CONNECT_REFUSED, 0)

    async def test_read_timeout_on_headers(self, origin: Origin) -> None:
        """A server that never answers gives READ_TIMEOUT after read_timeout."""
        r = await probe(origin.url("/stall-headers"), read_timeout=0.2)
        assert (r.error, r.status, r.peer_ip) == (ErrorClass.READ_TIMEOUT, 0, "127.0.0.1")

    async def test_total_timeout_in_body(self, origin: Origin) -> None:
        """The probe-wide timeout firing inside the body gives READ_TIMEOUT, no hash."""
        r = await probe(origin.url("/stall-body"), total_timeout=0.3)
        assert (r.error, r.status, r.body_bytes) == (ErrorClass.READ_TIMEOUT, 200, 10)
        assert r.body_sha256 == b""

    async def test_total_timeout_waiting_for_headers(self, origin: Origin) -> None:
        """The probe-wide timeout firing after connecting, before headers, is READ_TIMEOUT."""
        r = await probe(origin.url("/stall-headers"), total_timeout=0.3)
        assert (r.error, r.status, r.peer_ip) == (ErrorClass.READ_TIMEOUT, 0, "127.0.0.1")

    async def test_connection_cut_in_body(self, origin: Origin) -> None:
        """A server hanging up inside the body gives CONNECTION_RESET."""
        r = await probe(origin.url("/cut"))
        assert (r.error, r.status) == (ErrorClass.CONNECTION_RESET, 200)

    async def test_bad_encoding_is_protocol_error(self, origin: Origin) -> None:
        """A body that fails to decode gives PROTOCOL_ERROR."""
        r = await probe(origin.url("/bad-gzip"))
        assert r.error == ErrorClass.PROTOCOL_ERROR

    async def test_malformed_status_line(self) -> None:
        """A response that is not HTTP gives PROTOCOL_ERROR."""
        async with raw_server(b"SSH-2.0-OpenSSH\r\n\r\n") as port:
            r = await probe(f"http://127.0.0.1:{port}/")
        assert r.error == ErrorClass.PROTOCOL_ERROR

    async def test_disconnect_before_response(self) -> None:
        """A server closing without a response gives CONNECTION_RESET."""
        async with raw_server(b"") as port:
            r = await probe(f"http://127.0.0.1:{port}/")
        assert r.error == ErrorClass.CONNECTION_RESET

    async def test_clock_gives_start_and_elapsed(self, origin: Origin) -> None:
        """started_at is when the request went out, elapsed runs from there to the end."""
        ticks = iter([1000.0, 1000.5, 1002.5])  # probe called, request sent, probe ended
        async with Prober(ProbeConfig(), LOOPBACK, clock=lambda: next(ticks)) as prober:
            r = await prober.probe(1, origin.url("/ok"))
        assert (r.started_at, r.elapsed, r.tls) == (1000.5, 2.0, TlsCheck.PLAINTEXT)

    async def test_no_request_sent_keeps_the_start(self) -> None:
        """A probe that never sent a request is dated when it began connecting."""
        ticks = iter([1000.0, 1001.0])
        async with Prober(ProbeConfig(), LOOPBACK, clock=lambda: next(ticks)) as prober:
            r = await prober.probe(1, f"http://127.0.0.1:{_closed_port()}/")
        assert (r.error, r.started_at, r.elapsed, r.tls) == (
            ErrorClass.CONNECT_REFUSED, 1000.0, 1.0, TlsCheck.UNKNOWN
        )  # fmt: skip

    async def test_wait_for_a_connection_slot_is_not_in_the_time(self) -> None:
        """A probe that waits for the prober's only connection is dated after the wait."""
        now = [1000.0]
        entered, release = asyncio.Event(), asyncio.Event()

        async def slow(request: web.Request) -> web.Response:
            entered.set()
            await release.wait()
            return web.Response(body=b"slow")

        app = web.Application()
        app.router.add_get("/slow", slow)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}/slow"
        config = ProbeConfig(concurrency=1, per_host=1)
        try:
            async with Prober(config, LOOPBACK, clock=lambda: now[0]) as prober:
                first = asyncio.create_task(prober.probe(1, url))
                second = asyncio.create_task(prober.probe(2, url))
                await asyncio.wait_for(entered.wait(), 10)
                now[0] = 1005.0  # the second probe waits for the slot meanwhile
                release.set()
                a, b = await asyncio.wait_for(asyncio.gather(first, second), 10)
        finally:
            await runner.cleanup()
        assert (a.status, b.status) == (200, 200)
        assert (a.started_at, b.started_at) == (1000.0, 1005.0)

    async def test_source_address(self, origin: Origin) -> None:
        """With source_address set, connections come from that address."""
        r = await probe(origin.url("/ok"), source_address="127.0.0.2")
        assert r.status == 200
        assert origin.requests == [("/ok", "127.0.0.2")]

    async def test_user_agent_sent(self) -> None:
        """The configured User-Agent is sent."""
        seen: list[str] = []

        async def handler(request: web.Request) -> web.Response:
            seen.append(request.headers["User-Agent"])
            return web.Response()

        server = Origin()
        server.app.router.add_get("/ua", handler)
        async with serving(server):
            await probe(server.url("/ua"), user_agent="probe-test/1")
        assert seen == ["probe-test/1"]

    async def test_body_never_in_result_or_logs(
        self, origin: Origin, caplog: pytest.LogCaptureFixture
    ) -> None:
        """No part of the body appears in the result or in debug logs."""
        with caplog.at_level(logging.DEBUG):
            results = [await probe(origin.url(p)) for p in ("/ok", "/gzip", "/cut")]
        assert all(r.body_bytes > 0 for r in results)
        for r in results:
            assert MARKER.decode() not in repr(r)
            assert MARKER not in r.body_sha256
        assert MARKER.decode() not in caplog.text


class TestProberDns:
    async def test_name_resolved_through_inner_resolver(self, origin: Origin) -> None:
        """A name is resolved by the injected resolver and its address checked."""
        stub = StubResolver({"site.test": [["127.0.0.1"]]})
        r = await probe(origin.url("/ok", host="site.test"), resolver=stub)
        assert (r.status, r.peer_ip, stub.lookups) == (200, "127.0.0.1", {"site.test": 1})

    async def test_nxdomain(self) -> None:
        """An unknown name gives DNS_NXDOMAIN."""
        r = await probe("http://nosuch.test/", resolver=StubResolver({}))
        assert (r.error, r.status) == (ErrorClass.DNS_NXDOMAIN, 0)

    async def test_total_timeout_while_resolving(self) -> None:
        """The probe-wide timeout firing inside name resolution is DNS_ERROR."""
        r = await probe("http://hang.test/", resolver=HangingResolver(), total_timeout=0.3)
        assert (r.error, r.status) == (ErrorClass.DNS_ERROR, 0)

    async def test_other_dns_error(self) -> None:
        """A resolver failure other than NXDOMAIN gives DNS_ERROR."""
        r = await probe("http://servfail.test/", resolver=StubResolver({}))
        assert r.error == ErrorClass.DNS_ERROR


class TestProberTls:
    @pytest.fixture
    def ca(self) -> trustme.CA:
        return trustme.CA()

    @staticmethod
    def _server_context(ca: trustme.CA, kind: str, names: list[str]) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        if kind == "good":
            ca.issue_cert("tls.test").configure_cert(ctx)
        elif kind == "expired":
            past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=10)
            ca.issue_cert(
                "tls.test", not_before=past - datetime.timedelta(days=30), not_after=past
            ).configure_cert(ctx)
        elif kind == "wrong-name":
            ca.issue_cert("other.test").configure_cert(ctx)
        else:
            cert_pem, key_pem = self_signed("tls.test")
            with tempfile.TemporaryDirectory() as tmp:
                cert, key = Path(tmp) / "cert.pem", Path(tmp) / "key.pem"
                cert.write_bytes(cert_pem)
                key.write_bytes(key_pem)
                ctx.load_cert_chain(cert, key)

        def sni(_: ssl.SSLObject, name: str | None, __: ssl.SSLContext) -> None:
            names.append(name or "")

        ctx.sni_callback = sni
        return ctx

    @pytest.fixture(params=["good", "self-signed", "expired", "wrong-name"])
    async def tls_origin(
        self, request: pytest.FixtureRequest, ca: trustme.CA
    ) -> AsyncIterator[tuple[str, Origin, list[str]]]:
        names: list[str] = []
        server = Origin()
        async with serving(server, ssl_context=self._server_context(ca, request.param, names)):
            yield request.param, server, names

    async def test_present_and_removed_measured_whatever_the_certificate(
        self, tls_origin: tuple[str, Origin, list[str]], ca: trustme.CA
    ) -> None:
        """Content and a 404 are measured; the result says whether the certificate verified."""
        kind, origin, names = tls_origin
        stub = StubResolver({"tls.test": [["127.0.0.1"]]})
        trust = ca.cert_pem.bytes().decode()
        expected = TlsCheck.VERIFIED if kind == "good" else TlsCheck.UNVERIFIED
        ok = await probe(origin.url("/ok", "tls.test", "https"), resolver=stub, trust_pem=trust)
        assert (ok.error, ok.status, ok.tls) == (ErrorClass.NONE, 200, expected)
        assert ok.body_sha256 == hashlib.sha256(BODY).digest()
        gone = await probe(
            origin.url("/status/404", "tls.test", "https"), resolver=stub, trust_pem=trust
        )
        assert (gone.error, gone.status, gone.tls) == (ErrorClass.NONE, 404, expected)
        assert names == ["tls.test", "tls.test"]  # SNI sent, also without verification

    async def test_verify_tls_makes_a_bad_certificate_an_error(
        self, tls_origin: tuple[str, Origin, list[str]], ca: trustme.CA
    ) -> None:
        """With verify_tls a certificate that does not verify is tls_error, as before."""
        kind, origin, _ = tls_origin
        stub = StubResolver({"tls.test": [["127.0.0.1"]]})
        r = await probe(
            origin.url("/ok", "tls.test", "https"),
            resolver=stub,
            trust_pem=ca.cert_pem.bytes().decode(),
            verify_tls=True,
        )
        if kind == "good":
            assert (r.error, r.status, r.tls) == (ErrorClass.NONE, 200, TlsCheck.VERIFIED)
        else:
            assert (r.error, r.status, r.tls) == (ErrorClass.TLS_ERROR, 0, TlsCheck.UNKNOWN)
            assert origin.requests == []

    async def test_system_store_does_not_trust_a_private_ca(
        self, tls_origin: tuple[str, Origin, list[str]]
    ) -> None:
        """Without given roots the system trust store decides: a test CA is not in it."""
        _, origin, _ = tls_origin
        stub = StubResolver({"tls.test": [["127.0.0.1"]]})
        r = await probe(origin.url("/ok", "tls.test", "https"), resolver=stub)
        assert (r.status, r.tls) == (200, TlsCheck.UNVERIFIED)

    async def test_resumed_session_keeps_the_verdict(self, ca: trustme.CA) -> None:
        """Later probes of a host resume its TLS session and carry the first verdict."""
        for kind, expected in (("good", TlsCheck.VERIFIED), ("expired", TlsCheck.UNVERIFIED)):
            server = Origin()
            async with serving(server, ssl_context=self._server_context(ca, kind, [])):
                stub = StubResolver({"tls.test": [["127.0.0.1"]]})
                async with Prober(
                    ProbeConfig(), LOOPBACK, resolver=stub, trust_pem=ca.cert_pem.bytes().decode()
                ) as prober:
                    url = server.url("/ok", "tls.test", "https")
                    results = [await prober.probe(i, url) for i in range(3)]
            assert [(r.status, r.tls) for r in results] == [(200, expected)] * 3
            assert prober._checker.verifications == 1

    async def test_redirect_to_plain_http_is_plaintext(
        self, ca: trustme.CA, origin: Origin
    ) -> None:
        """The TLS check describes the final hop."""
        tls_server = Origin()
        async with serving(tls_server, ssl_context=self._server_context(ca, "good", [])):
            stub = StubResolver({"tls.test": [["127.0.0.1"]]})
            target = origin.url("/ok")
            r = await probe(
                tls_server.url(f"/to?location={target}", "tls.test", "https"),
                resolver=stub,
                trust_pem=ca.cert_pem.bytes().decode(),
            )
        assert (r.status, r.redirects, r.tls) == (200, 1, TlsCheck.PLAINTEXT)


class RefuseAfterFirstCheck(AddressPolicy):
    """Allows the first address check and refuses later ones, as for a peer that differs."""

    checks: int

    def __init__(self) -> None:
        super().__init__(allow=LOOPBACK.allow)
        object.__setattr__(self, "checks", 0)

    def check(self, ip: str | IPv4Address | IPv6Address) -> None:
        object.__setattr__(self, "checks", self.checks + 1)
        if self.checks > 1:
            raise ForbiddenAddress(str(ip), "refused by the test")


class TestProberGuard:
    async def test_literal_loopback_refused_before_connecting(self, origin: Origin) -> None:
        """A literal 127.0.0.1 URL without an allow range is refused and sends nothing."""
        r = await probe(origin.url("/ok"), policy=AddressPolicy())
        assert (r.error, r.status, r.peer_ip) == (ErrorClass.FORBIDDEN_ADDRESS, 0, "")
        assert origin.requests == []

    @pytest.mark.parametrize("host", ["2130706433", "127.1", "0x7f000001"])
    async def test_non_canonical_ipv4_never_connects(self, origin: Origin, host: str) -> None:
        """Legacy numeric IPv4 hosts are refused one way or another and send nothing."""
        r = await probe(origin.url("/ok", host=host), policy=AddressPolicy())
        assert r.error in {ErrorClass.INVALID_URL, ErrorClass.FORBIDDEN_ADDRESS}
        assert origin.requests == []

    async def test_name_to_forbidden_address_refused(self, origin: Origin) -> None:
        """A name resolving only to a forbidden address is refused."""
        stub = StubResolver({"site.test": [["127.0.0.1"]]})
        r = await probe(origin.url("/ok", "site.test"), policy=AddressPolicy(), resolver=stub)
        assert r.error == ErrorClass.FORBIDDEN_ADDRESS
        assert origin.requests == []

    async def test_redirect_to_metadata_refused(self, origin: Origin) -> None:
        """A redirect from an allowed server to 169.254.169.254 is refused."""
        target = "http://169.254.169.254/latest/meta-data/"
        r = await probe(origin.url(f"/to?location={target}"))
        assert (r.error, r.redirects, r.final_url) == (ErrorClass.FORBIDDEN_ADDRESS, 1, target)
        assert (r.status, r.peer_ip) == (0, "")

    @pytest.mark.parametrize("mapped", ["::ffff:127.0.0.2", "::ffff:169.254.169.254"])
    async def test_redirect_to_forbidden_mapped_refused(self, origin: Origin, mapped: str) -> None:
        """A redirect to an IPv4-mapped form of a forbidden address is refused."""
        target = f"http://[{mapped}]:{origin.port}/ok"
        r = await probe(origin.url(f"/to?location={target}"), policy=ONLY_127_0_0_1)
        assert (r.error, r.redirects) == (ErrorClass.FORBIDDEN_ADDRESS, 1)
        assert [path for path, _ in origin.requests] == ["/to"]

    @pytest.mark.skipif(not _has_ipv6(), reason="needs an IPv6 stack for IPv4-mapped sockets")
    async def test_redirect_to_mapped_allowed_address_followed(self, origin: Origin) -> None:
        """::ffff:127.0.0.1 is 127.0.0.1, so with 127.0.0.1/32 allowed it is followed."""
        target = f"http://[::ffff:127.0.0.1]:{origin.port}/ok"
        r = await probe(origin.url(f"/to?location={target}"), policy=ONLY_127_0_0_1)
        assert (r.error, r.status, r.redirects) == (ErrorClass.NONE, 200, 1)
        assert r.peer_ip == "127.0.0.1"

    async def test_rebinding_refused_on_second_probe(self, origin: Origin) -> None:
        """A name rebound to a forbidden address is refused on the next probe."""
        stub = StubResolver({"rebind.test": [["127.0.0.1"], ["127.0.0.2"]]})
        url = origin.url("/ok", "rebind.test")
        async with Prober(ProbeConfig(), ONLY_127_0_0_1, resolver=stub) as prober:
            first = await prober.probe(1, url)
            second = await prober.probe(2, url)
        assert (first.error, first.status) == (ErrorClass.NONE, 200)
        assert (second.error, second.status) == (ErrorClass.FORBIDDEN_ADDRESS, 0)
        assert stub.lookups == {"rebind.test": 2}
        assert len(origin.requests) == 1

    async def test_forbidden_peer_aborts_before_body(self, origin: Origin) -> None:
        """A peer refused after connecting ends the probe without status or body."""
        policy = RefuseAfterFirstCheck()
        r = await probe(origin.url("/ok"), policy=policy)
        assert (r.error, r.status, r.peer_ip) == (ErrorClass.FORBIDDEN_ADDRESS, 0, "127.0.0.1")
        assert (r.body_bytes, r.body_sha256) == (0, b"")
        assert policy.checks == 2


KEY = ConnectionKey("h", 80, False, True, None, None, None)


class TestClassify:
    def test_forbidden_wrapped_in_dns_error(self) -> None:
        """ForbiddenAddress raised in the resolver and wrapped by aiohttp stays FORBIDDEN."""
        exc = aiohttp.ClientConnectorDNSError(KEY, ForbiddenAddress("10.0.0.1", "x"))
        assert classify(exc) == ErrorClass.FORBIDDEN_ADDRESS

    @pytest.mark.skipif(not hasattr(socket, "EAI_NODATA"), reason="no EAI_NODATA here")
    def test_nodata_is_nxdomain(self) -> None:
        """A name without addresses (EAI_NODATA) counts as NXDOMAIN."""
        gai = socket.gaierror(socket.EAI_NODATA, "No address associated with hostname")
        assert classify(aiohttp.ClientConnectorDNSError(KEY, gai)) == ErrorClass.DNS_NXDOMAIN

    def test_unreachable_is_other(self) -> None:
        """A connect failure other than refused or timed out is OTHER, never CONNECT_REFUSED."""
        exc = aiohttp.ClientConnectorError(KEY, OSError(errno.EHOSTUNREACH, "No route to host"))
        assert classify(exc) == ErrorClass.OTHER

    @pytest.mark.parametrize(
        ("phase", "expected"),
        [
            (Phase.RESOLVING, ErrorClass.DNS_ERROR),
            (Phase.CONNECTING, ErrorClass.CONNECT_TIMEOUT),
            (Phase.CONNECTED, ErrorClass.READ_TIMEOUT),
        ],
    )
    def test_bare_timeout_by_phase(self, phase: Phase, expected: ErrorClass) -> None:
        """The probe-wide timeout is classified by how far the hop got."""
        assert classify(TimeoutError(), phase) == expected

    def test_connection_timeout(self) -> None:
        """aiohttp's connect timeout is CONNECT_TIMEOUT, or DNS_ERROR while resolving."""
        exc = aiohttp.ConnectionTimeoutError("slow")
        assert classify(exc, Phase.CONNECTING) == ErrorClass.CONNECT_TIMEOUT
        assert classify(exc, Phase.RESOLVING) == ErrorClass.DNS_ERROR

    def test_unknown_error_is_other(self) -> None:
        """An exception outside the table is OTHER."""
        assert classify(RuntimeError("?")) == ErrorClass.OTHER


class TestChallenge:
    def test_challenge_headers_are_recognised(self) -> None:
        """Known WAF/challenge headers mark a response as a challenge; ordinary ones do not."""
        from multidict import CIMultiDict

        from agent.probe import is_challenge

        assert is_challenge(CIMultiDict({"CF-Mitigated": "challenge"}))
        assert is_challenge(CIMultiDict({"x-amzn-waf-action": "captcha"}))
        assert not is_challenge(CIMultiDict({"Server": "cloudflare", "cf-ray": "abc"}))
        assert not is_challenge(CIMultiDict({"cf-mitigated": "none"}))
