"""The plain value an agent produces for one check of one URL.

A result holds only what may leave the agent: status, final URL, a hash and
size of the body (never the body itself), timings, the peer address and an
error class. It knows nothing of aiohttp or gRPC.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class ErrorClass(enum.StrEnum):
    """Why a probe got no usable HTTP response; NONE when it did."""

    NONE = "none"
    DNS_NXDOMAIN = "dns_nxdomain"
    DNS_ERROR = "dns_error"
    CONNECT_REFUSED = "connect_refused"
    CONNECT_TIMEOUT = "connect_timeout"
    READ_TIMEOUT = "read_timeout"
    TLS_ERROR = "tls_error"
    TOO_MANY_REDIRECTS = "too_many_redirects"
    CONNECTION_RESET = "connection_reset"
    PROTOCOL_ERROR = "protocol_error"
    FORBIDDEN_ADDRESS = "forbidden_address"
    INVALID_URL = "invalid_url"
    OTHER = "other"


class TlsCheck(enum.StrEnum):
    """Whether the final hop's server certificate verified; the probe is made either way."""

    UNKNOWN = "unknown"  # no TLS handshake completed (an error before it)
    PLAINTEXT = "plaintext"  # http:// on the final hop
    VERIFIED = "verified"  # chain and name verified against the trust store
    UNVERIFIED = "unverified"  # served over TLS whose certificate did not verify


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """One agent's observation of one URL at one moment."""

    url_id: int
    # Unix seconds, agent clock: when the first request went out on its connection (after
    # resolving and connecting, never before a wait for a slot); when no request went out,
    # when the probe began resolving and connecting.
    started_at: float
    elapsed: float  # seconds from started_at to the end of the probe
    status: int = 0  # final HTTP status; 0 when there was no response
    final_url: str = ""
    body_sha256: bytes = b""  # empty when no body was read
    body_bytes: int = 0
    truncated: bool = False
    peer_ip: str = ""  # address actually connected to, final hop
    error: ErrorClass = ErrorClass.NONE
    redirects: int = 0
    challenge: bool = False  # response headers show a bot challenge page
    tls: TlsCheck = TlsCheck.UNKNOWN
    seq: int = 0  # assigned by the outbox, unique and increasing per agent
