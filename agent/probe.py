"""One check of one URL: an HTTP GET whose body goes only into a hash.

``Prober.probe`` follows redirects itself, checks every hop against the
address policy (every address right before a socket connects to it, literal IP
hosts and resolved names alike; names also in ``GuardedResolver``; and the
connected peer before the status is used), streams
the decoded body into SHA-256 up to a byte cap and returns a ``ProbeResult``.
It never raises for network or HTTP trouble; it classifies it. Every new
connection resolves afresh (no DNS cache, no keep-alive), so each probe
observes the address the name points to now and a rebound name is re-checked.

Exceptions are translated here; the first matching row wins::

    raised                                                ErrorClass
    ----------------------------------------------------  ------------------
    not an absolute http(s) URL (request or Location),
      aiohttp InvalidURL / NonHttpUrlClientError          INVALID_URL
    ForbiddenAddress: peer, resolver or socket factory
      (arrives as ClientConnector[DNS]Error.os_error)     FORBIDDEN_ADDRESS
    ClientConnectorDNSError, gaierror EAI_NONAME/NODATA   DNS_NXDOMAIN
    ClientConnectorDNSError, anything else                DNS_ERROR
    ssl.SSLError anywhere in the chain (includes
      ClientConnectorCertificateError/SSLError)           TLS_ERROR
    ConnectionTimeoutError (sock_connect, incl. TLS)      CONNECT_TIMEOUT
    SocketTimeoutError (sock_read: headers or body)       READ_TIMEOUT
    probe-wide total timeout while resolving /
      connecting / connected                              DNS_ERROR /
                                                          CONNECT_TIMEOUT /
                                                          READ_TIMEOUT
    ClientConnectorError ECONNREFUSED / ETIMEDOUT / else  CONNECT_REFUSED /
                                                          CONNECT_TIMEOUT / OTHER
    ServerDisconnectedError, ConnectionResetError,
      ECONNRESET/EPIPE/ECONNABORTED, ClientPayloadError
      from a connection that ended inside the body        CONNECTION_RESET
    ClientPayloadError (chunking, content-encoding),
      ClientResponseError (malformed status or headers)   PROTOCOL_ERROR
    more than max_redirects hops (no exception)           TOO_MANY_REDIRECTS
    anything else                                         OTHER

A result with an error keeps what was seen before it: the final URL
requested, the hops followed, the last status received (0 if none), and the
peer actually connected to. ``body_sha256`` is set only for a body read to
its end or to the cap.
"""

from __future__ import annotations

import asyncio
import contextvars
import enum
import errno
import functools
import hashlib
import ipaddress
import logging
import socket
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.connector import Connection
from aiohttp.http_exceptions import ContentLengthError
from yarl import URL

from agent import tls
from agent.guard import AddressPolicy, ForbiddenAddress, GuardedResolver
from agent.result import ErrorClass, ProbeResult, TlsCheck

__all__ = ["Phase", "ProbeConfig", "Prober", "classify"]

logger = logging.getLogger(__name__)

_CHUNK_BYTES = 64 * 1024
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_NXDOMAIN_ERRNOS = frozenset(
    code for code in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", None)) if code is not None
)
_RESET_ERRNOS = frozenset({errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED})
# aiohttp's ClientPayloadError message when the connection ends inside a body.
_PAYLOAD_CUT_SHORT = "Response payload is not completed"


@dataclass(frozen=True)
class ProbeConfig:
    """Limits and identity of an agent's HTTP checks; timeouts in seconds."""

    total_timeout: float = 30.0  # whole probe, all redirect hops
    connect_timeout: float = 10.0  # each TCP connect plus TLS handshake
    read_timeout: float = 20.0  # longest wait for a header or body chunk
    max_body_bytes: int = 16 * 1024 * 1024
    max_redirects: int = 10
    concurrency: int = 256  # global connection limit
    per_host: int = 4
    source_address: str | None = None
    user_agent: str = "takedown-monitor-agent/0.1"
    # False: probe whatever the certificate, and record whether it verified (agent/tls.py).
    # True: a certificate that does not verify fails the probe as tls_error.
    verify_tls: bool = False
    # Reuse connections between probes. Off in agents: a new connection per probe resolves
    # afresh and observes where the name points now. On only to measure the HTTP cost (bench/).
    keep_alive: bool = False


class Phase(enum.Enum):
    """How far the current hop got; decides what a bare timeout means."""

    RESOLVING = enum.auto()
    CONNECTING = enum.auto()
    CONNECTED = enum.auto()


def is_challenge(headers: Mapping[str, str]) -> bool:
    """True when response headers show a bot challenge or WAF block page instead of the content.

    Only headers are used: the body is never inspected. Cloudflare marks
    challenges with `cf-mitigated: challenge`, AWS WAF with `x-amzn-waf-action`,
    Sucuri with `x-sucuri-block`, DataDome with `x-datadome`.
    """
    if headers.get("cf-mitigated", "").lower() == "challenge":
        return True
    return any(name in headers for name in ("x-amzn-waf-action", "x-sucuri-block", "x-datadome"))


class _Progress:
    """Mutable record of one probe in progress; holds no body bytes."""

    def __init__(self, url: str, prober: Prober) -> None:
        self.prober = prober
        self.sent_at: float | None = None  # when the first request went out
        self.tls = TlsCheck.UNKNOWN
        self.ssl_object: ssl.SSLObject | None = None
        self.final_url = url
        self.redirects = 0
        self.status = 0
        self.peer_ip = ""
        self.peer_addr: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
        self.phase = Phase.CONNECTING
        self.body_bytes = 0
        self.body_sha256 = b""
        self.truncated = False
        self.challenge = False


# The probe running in this task. aiohttp resolves, connects and starts the
# response in the caller's task, so trace handlers and the response class
# below reach the probe's progress through it.
_CURRENT_PROBE: contextvars.ContextVar[_Progress] = contextvars.ContextVar("probe_progress")


class _PeerResponse(aiohttp.ClientResponse):
    """A response that records its connection's peer address on the running probe.

    It is recorded before the headers are read, so a probe that times out
    waiting for them still says where it was connected.
    """

    async def start(self, connection: Connection) -> aiohttp.ClientResponse:
        progress = _CURRENT_PROBE.get(None)
        if progress is not None:
            # The request is written: the connection is made (what aiohttp's
            # on_connection_create_end trace marked, without tracing's per-request cost).
            progress.phase = Phase.CONNECTED
            transport = connection.transport
            peer = transport.get_extra_info("peername") if transport is not None else None
            if peer:
                progress.peer_ip, progress.peer_addr = _peer(str(peer[0]))
            progress.prober._request_sent(progress, transport)
        return await super().start(connection)


@functools.lru_cache(maxsize=4096)
def _peer(ip: str) -> tuple[str, ipaddress.IPv4Address | ipaddress.IPv6Address | None]:
    """The peer address as every peer_ip is shown (IPv4-mapped IPv6 as plain IPv4), parsed.

    Cached: parsing with ``ipaddress`` is a visible share of a probe's CPU, and agents
    connect to the same hosting addresses again and again.
    """
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return ip, None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped), addr.ipv4_mapped
    return str(addr), addr


def _http_url(raw: str | URL) -> URL | None:
    """The URL if it is an absolute http(s) URL with a host, else None."""
    try:
        url = raw if isinstance(raw, URL) else URL(raw)
    except (ValueError, TypeError):
        return None
    if url.scheme not in ("http", "https") or not url.raw_host:
        return None
    return url


def _causes(exc: BaseException) -> list[BaseException]:
    """``exc`` and what it wraps (``os_error`` and ``__cause__``), outermost first."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain:
        chain.append(current)
        if isinstance(current, aiohttp.ClientConnectorError):
            current = current.os_error
        else:
            current = current.__cause__
    return chain


def _timeout_class(phase: Phase) -> ErrorClass:
    return {
        Phase.RESOLVING: ErrorClass.DNS_ERROR,
        Phase.CONNECTING: ErrorClass.CONNECT_TIMEOUT,
        Phase.CONNECTED: ErrorClass.READ_TIMEOUT,
    }[phase]


def classify(exc: BaseException, phase: Phase = Phase.CONNECTING) -> ErrorClass:
    """The error class of an exception raised while probing (see module docstring)."""
    chain = _causes(exc)
    if any(isinstance(e, ForbiddenAddress) for e in chain):
        return ErrorClass.FORBIDDEN_ADDRESS
    if isinstance(exc, aiohttp.InvalidURL | aiohttp.NonHttpUrlClientError):
        return ErrorClass.INVALID_URL
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        inner = exc.os_error
        if isinstance(inner, socket.gaierror) and inner.errno in _NXDOMAIN_ERRNOS:
            return ErrorClass.DNS_NXDOMAIN
        return ErrorClass.DNS_ERROR
    if any(isinstance(e, ssl.SSLError | aiohttp.ServerFingerprintMismatch) for e in chain):
        return ErrorClass.TLS_ERROR
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return ErrorClass.DNS_ERROR if phase is Phase.RESOLVING else ErrorClass.CONNECT_TIMEOUT
    if isinstance(exc, aiohttp.ServerTimeoutError):
        return ErrorClass.READ_TIMEOUT
    if isinstance(exc, TimeoutError):
        return _timeout_class(phase)
    if isinstance(exc, aiohttp.ClientConnectorError):
        return {
            errno.ECONNREFUSED: ErrorClass.CONNECT_REFUSED,
            errno.ETIMEDOUT: ErrorClass.CONNECT_TIMEOUT,
        }.get(exc.os_error.errno or 0, ErrorClass.OTHER)
    if any(
        isinstance(e, aiohttp.ServerDisconnectedError | ConnectionResetError | ContentLengthError)
        or (isinstance(e, OSError) and e.errno in _RESET_ERRNOS)
        for e in chain
    ) or str(exc).startswith(_PAYLOAD_CUT_SHORT):
        return ErrorClass.CONNECTION_RESET
    if isinstance(exc, aiohttp.ClientPayloadError | aiohttp.ClientResponseError):
        return ErrorClass.PROTOCOL_ERROR
    return ErrorClass.OTHER


class _PhaseResolver(AbstractResolver):
    """Marks the running probe RESOLVING while ``inner`` resolves, CONNECTING once it has.

    aiohttp calls the resolver in the probe's task exactly where it would send the
    dns_resolvehost_start and _end traces (not for IP literals); request tracing would
    cost several awaits per request and per body chunk.
    """

    def __init__(self, inner: AbstractResolver) -> None:
        self._inner = inner

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        progress = _CURRENT_PROBE.get(None)
        if progress is not None:
            progress.phase = Phase.RESOLVING
        results = await self._inner.resolve(host, port, family)
        if progress is not None:
            progress.phase = Phase.CONNECTING
        return results

    async def close(self) -> None:
        await self._inner.close()


class Prober:
    """Checks URLs over one aiohttp session; use as an async context manager.

    ``resolver`` is the inner resolver wrapped by GuardedResolver (default
    ``aiohttp.ThreadedResolver``); it is closed with the prober.
    ``ssl_context``, if given, is the context HTTPS connects with instead of
    ``agent.tls.probe_context(config.verify_tls)``; when it verifies, every completed
    handshake counts as verified. ``trust_pem`` (PEM roots) replaces the system trust store,
    for the checker and a verifying context alike (tests, benchmarks).
    """

    def __init__(
        self,
        config: ProbeConfig,
        policy: AddressPolicy,
        *,
        resolver: AbstractResolver | None = None,
        clock: Callable[[], float] = time.time,
        ssl_context: ssl.SSLContext | None = None,
        trust_pem: str | None = None,
    ) -> None:
        self._config = config
        self._policy = policy
        self._inner_resolver = resolver
        self._clock = clock
        self._ssl = (
            ssl_context
            if ssl_context is not None
            else tls.probe_context(config.verify_tls, trust_pem)
        )
        self._verifying = self._ssl.verify_mode != ssl.CERT_NONE
        self._checker = tls.TlsChecker(None if trust_pem is None else tls.load_pem_roots(trust_pem))
        self._session: aiohttp.ClientSession | None = None
        self._resolver: GuardedResolver | None = None

    async def __aenter__(self) -> Self:
        cfg = self._config
        self._resolver = GuardedResolver(self._policy, self._inner_resolver)
        connector = aiohttp.TCPConnector(
            limit=cfg.concurrency,
            limit_per_host=cfg.per_host,
            local_addr=(cfg.source_address, 0) if cfg.source_address else None,
            use_dns_cache=False,
            force_close=not cfg.keep_alive,
            resolver=_PhaseResolver(self._resolver),
            ssl=self._ssl,
            socket_factory=self._open_socket,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=cfg.connect_timeout, sock_read=cfg.read_timeout
            ),
            headers={"User-Agent": cfg.user_agent},
            cookie_jar=aiohttp.DummyCookieJar(),
            response_class=_PeerResponse,
            auto_decompress=True,
            trust_env=False,
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the session, its connections and the resolver."""
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._resolver is not None:
            await self._resolver.close()
            self._resolver = None

    async def probe(self, url_id: int, url: str) -> ProbeResult:
        """Check ``url`` once; network and HTTP failures come back as an error class."""
        started = self._clock()
        progress = _Progress(url, self)
        token = _CURRENT_PROBE.set(progress)
        try:
            async with asyncio.timeout(self._config.total_timeout):
                error = await self._follow(progress)
        except Exception as exc:
            error = classify(exc, progress.phase)
            if not isinstance(exc, aiohttp.ClientError | OSError):
                logger.warning(
                    "probe_unexpected_error url_id=%d error_type=%s", url_id, type(exc).__name__
                )
            logger.debug("probe_error url_id=%d error=%s detail=%r", url_id, error, exc)
        finally:
            _CURRENT_PROBE.reset(token)
        if progress.sent_at is not None:
            started = progress.sent_at
        return ProbeResult(
            url_id=url_id,
            started_at=started,
            elapsed=max(0.0, self._clock() - started),
            status=progress.status,
            final_url=progress.final_url,
            body_sha256=progress.body_sha256,
            body_bytes=progress.body_bytes,
            truncated=progress.truncated,
            peer_ip=progress.peer_ip,
            error=error,
            redirects=progress.redirects,
            challenge=progress.challenge,
            tls=progress.tls,
        )

    def _request_sent(self, progress: _Progress, transport: asyncio.BaseTransport | None) -> None:
        """The request of a hop went out: stamp the probe's time, judge its certificate."""
        now = self._clock()
        if progress.sent_at is None:
            progress.sent_at = now
        obj = transport.get_extra_info("ssl_object") if transport is not None else None
        if not isinstance(obj, ssl.SSLObject):
            progress.tls, progress.ssl_object = TlsCheck.PLAINTEXT, None
            return
        progress.ssl_object = obj
        progress.tls = TlsCheck.VERIFIED if self._verifying else self._checker.check(obj, now)

    async def _follow(self, progress: _Progress) -> ErrorClass:
        """Request ``progress.final_url`` and its redirects, hashing the last body."""
        if self._session is None:
            raise RuntimeError("Prober used outside 'async with'")
        url = _http_url(progress.final_url)
        if url is None:
            return ErrorClass.INVALID_URL
        while True:
            progress.final_url = str(url)
            progress.status, progress.peer_ip, progress.phase = 0, "", Phase.CONNECTING
            progress.peer_addr, progress.tls, progress.ssl_object = None, TlsCheck.UNKNOWN, None
            async with self._session.get(url, allow_redirects=False) as resp:
                progress.phase = Phase.CONNECTED
                self._policy.check(progress.peer_addr or progress.peer_ip)
                progress.status = resp.status
                progress.challenge = is_challenge(resp.headers)
                location = resp.headers.get("Location")
                if resp.status not in _REDIRECT_STATUSES or location is None:
                    await self._hash_body(resp, progress)
                    if progress.ssl_object is not None:
                        tls.remember(progress.ssl_object, progress.tls)
                    return ErrorClass.NONE
                if progress.ssl_object is not None:
                    tls.remember(progress.ssl_object, progress.tls)
            if progress.redirects >= self._config.max_redirects:
                return ErrorClass.TOO_MANY_REDIRECTS
            try:
                next_url = _http_url(url.join(URL(location)))
            except (ValueError, TypeError):
                next_url = None
            if next_url is None:
                return ErrorClass.INVALID_URL
            url = next_url
            progress.redirects += 1

    def _open_socket(self, addr_info: tuple[int, int, int, str, tuple[Any, ...]]) -> socket.socket:
        """The socket for one connection attempt, made only if the policy allows its address.

        aiohttp calls this for every address it tries, right before connecting, also for IP
        literal hosts (for which it skips the resolver); a refusal reaches ``classify`` as
        ClientConnectorError.os_error. Nothing is sent to a refused address.
        """
        family, type_, proto, _, sockaddr = addr_info
        self._policy.check_connect(str(sockaddr[0]))
        return socket.socket(family, type_, proto)

    async def _hash_body(self, resp: aiohttp.ClientResponse, progress: _Progress) -> None:
        """Stream the decoded body into SHA-256, stopping at the byte cap."""
        cap = self._config.max_body_bytes
        digest = hashlib.sha256()
        async for chunk in resp.content.iter_chunked(_CHUNK_BYTES):
            room = cap - progress.body_bytes
            if len(chunk) > room:
                digest.update(memoryview(chunk)[:room])
                progress.body_bytes = cap
                progress.truncated = True
                break
            digest.update(chunk)
            progress.body_bytes += len(chunk)
        progress.body_sha256 = digest.digest()
