"""TLS for probes: connect without verifying, then say honestly whether the certificate verified.

Hosts of reported material often have expired or self-signed certificates, and anyone who clicks
through still gets the content, so a probe must measure such a host rather than stop at the
handshake. Theory of operation:

* ``probe_context`` is the client context probes connect with. By default it does not verify
  (``CERT_NONE``, no hostname check); SNI is still sent, because asyncio passes the URL's host as
  ``server_hostname`` whatever the context checks. With ``verify=True`` (``--verify-tls``) it is
  a verifying default context, and a bad certificate fails the handshake (``tls_error``).
* ``TlsChecker.check`` runs after a handshake made without verification: it takes the chain the
  server sent (leaf first) and verifies it with cryptography's X.509 path validation against
  the trust store -- the system bundle unless roots are given -- for the name the URL asked
  for, at the probe's time. The profile is the CA/Browser Forum web PKI one (signatures,
  validity, name, basic constraints, key usage; it refuses what browsers refuse, such as SHA-1
  signatures), except that, as in OpenSSL, the leaf's extensions may be marked critical or
  not (many private CAs mark subjectAltName critical). The verdict is cached per
  (name, chain) for at most an hour and never past the leaf's expiry, so a host probed a
  thousand times costs one verification.
* Both contexts resume TLS sessions per server name (``_ResumingContext``): a resumed handshake
  sends no certificate, so it carries the verdict of the full handshake that made the session.
  A session is offered for ``SESSION_MAX_AGE`` seconds after that handshake, so a verdict is
  never older than that (a certificate that expired meanwhile is seen at the next full
  handshake). A session is a few hundred bytes; at most ``SESSION_CACHE`` names are kept.
  Measured (docs/PERFORMANCE.md), resumption saves less than hoped: CPython copies a session
  through DER, certificate included, each time it is read or set.
* cryptography's X.509 modules are imported at the first chain verification, not with the
  agent: about 1 MiB of RSS an agent with no HTTPS URL never needs (Ed25519 signing loads
  cryptography's core, not these).

Nothing here touches addresses: the SSRF guard checks every address where the socket is made.
"""

from __future__ import annotations

import _ssl
import contextlib
import datetime
import hashlib
import ipaddress
import logging
import ssl
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.result import TlsCheck

if TYPE_CHECKING:  # imported where used: see the module docstring
    from cryptography import x509
    from cryptography.x509 import DNSName, IPAddress
    from cryptography.x509.verification import ExtensionPolicy, Store

__all__ = [
    "TlsChecker",
    "load_pem_roots",
    "load_system_roots",
    "peer_chain",
    "probe_context",
    "remember",
]

log = logging.getLogger(__name__)

SESSION_CACHE = 4096  # server names whose TLS session is kept for resumption
SESSION_MAX_AGE = 600.0  # seconds after its full handshake a session is offered
VERDICT_CACHE = 4096  # (name, chain) pairs whose verdict is kept
VERDICT_TTL = 3600.0  # seconds a verdict is reused at most


class _ResumingContext(ssl.SSLContext):
    """A client context that offers the last TLS session it saw for the same server name.

    asyncio (and uvloop) create each connection's ``SSLObject`` with ``wrap_bio``; this passes
    the cached session there. ``remember`` stores a connection's session after its response.
    """

    sessions: OrderedDict[str, tuple[ssl.SSLSession, TlsCheck, float]]  # ..., made at
    clock: Callable[[], float]

    def wrap_bio(
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:
        if session is None and isinstance(server_hostname, str):
            cached = self.sessions.get(server_hostname)
            if cached is not None and self.clock() - cached[2] < SESSION_MAX_AGE:
                session = cached[0]
        return super().wrap_bio(incoming, outgoing, server_side, server_hostname, session)

    def resumed_check(self, obj: ssl.SSLObject) -> TlsCheck | None:
        """The verdict of the session this connection resumed, if it resumed one."""
        if not obj.session_reused or obj.server_hostname is None:
            return None
        cached = self.sessions.get(obj.server_hostname)
        return cached[1] if cached is not None else None

    def _touch(self, name: str | None) -> None:
        if name is not None and name in self.sessions:
            self.sessions.move_to_end(name)

    def remember(self, obj: ssl.SSLObject, check: TlsCheck) -> None:
        """Keep this connection's session for the next connection to the same name."""
        name = obj.server_hostname
        if name is None or (obj.session_reused and name in self.sessions):
            self._touch(name)
            return
        session = obj.session  # costly: CPython copies it through DER, certificate included
        if session is None or not (session.has_ticket or session.id):
            return
        self.sessions[name] = (session, check, self.clock())
        self.sessions.move_to_end(name)
        while len(self.sessions) > SESSION_CACHE:
            self.sessions.popitem(last=False)


def probe_context(verify: bool, roots_pem: str | None = None) -> ssl.SSLContext:
    """The client context probes connect with (see the module docstring).

    ``roots_pem`` replaces the system trust store of a verifying context (tests, benchmarks).
    """
    ctx = _ResumingContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.sessions = OrderedDict()
    ctx.clock = time.monotonic
    if verify:
        if roots_pem is None:
            ctx.load_default_certs()
        else:
            ctx.load_verify_locations(cadata=roots_pem)
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _pem_certificates(data: bytes) -> list[x509.Certificate]:
    """Every certificate of a PEM bundle that parses; one bad entry does not drop the rest."""
    from cryptography import x509
    from cryptography.utils import CryptographyDeprecationWarning

    certs: list[x509.Certificate] = []
    end = b"-----END CERTIFICATE-----"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CryptographyDeprecationWarning)  # old roots' serials
        for block in data.split(end)[:-1]:
            try:
                certs.append(x509.load_pem_x509_certificate(block + end))
            except ValueError:
                continue
    return certs


def load_system_roots() -> list[x509.Certificate]:
    """The CA certificates of the system trust store OpenSSL uses by default."""
    paths = ssl.get_default_verify_paths()
    for cafile in (paths.cafile, paths.openssl_cafile):
        if cafile and Path(cafile).is_file():
            return _pem_certificates(Path(cafile).read_bytes())
    roots: list[x509.Certificate] = []
    capath = paths.capath or paths.openssl_capath
    if capath and Path(capath).is_dir():
        for path in sorted(Path(capath).iterdir()):
            with contextlib.suppress(OSError):
                roots.extend(_pem_certificates(path.read_bytes()))
    return roots


def _server_auth(_: object, __: x509.Certificate, eku: x509.ExtendedKeyUsage | None) -> None:
    """A leaf's extended key usage, when present, must allow TLS servers."""
    from cryptography.x509.oid import ExtendedKeyUsageOID

    allowed = (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE)
    if eku is not None and not any(oid in eku for oid in allowed):
        raise ValueError("extended key usage does not allow TLS servers")


def _leaf_policy() -> ExtensionPolicy:
    from cryptography import x509
    from cryptography.x509.verification import Criticality, ExtensionPolicy

    return (
        ExtensionPolicy.webpki_defaults_ee()
        .require_present(x509.SubjectAlternativeName, Criticality.AGNOSTIC, None)
        .may_be_present(x509.ExtendedKeyUsage, Criticality.AGNOSTIC, _server_auth)
        .may_be_present(x509.KeyUsage, Criticality.AGNOSTIC, None)
        .may_be_present(x509.BasicConstraints, Criticality.AGNOSTIC, None)
    )


def _subject(name: str) -> DNSName | IPAddress:
    from cryptography.x509 import DNSName, IPAddress

    try:
        return IPAddress(ipaddress.ip_address(name.strip("[]")))
    except ValueError:
        return DNSName(name)


def peer_chain(obj: ssl.SSLObject) -> list[bytes]:
    """The certificates the server sent, leaf first, as DER (empty for a resumed session)."""
    inner: Any = getattr(obj, "_sslobj", None)  # Python 3.13 makes this public
    getter = getattr(obj, "get_unverified_chain", None) or getattr(
        inner, "get_unverified_chain", None
    )
    if getter is not None:
        chain = getter() or []
        return [c if isinstance(c, bytes) else c.public_bytes(_ssl.ENCODING_DER) for c in chain]
    leaf = obj.getpeercert(binary_form=True)
    return [leaf] if leaf else []


class TlsChecker:
    """Verifies server chains against a trust store, with a bounded cache of verdicts."""

    def __init__(self, roots: Sequence[x509.Certificate] | None = None) -> None:
        self._roots = list(roots) if roots is not None else None
        self._store: Store | None = None
        self._leaf: ExtensionPolicy | None = None  # made with the store, at first use
        self._verdicts: OrderedDict[bytes, tuple[TlsCheck, float]] = OrderedDict()
        self.verifications = 0  # chains actually verified (cache misses)

    def _trust(self) -> Store | None:
        if self._store is None:
            from cryptography.x509.verification import Store

            roots = self._roots if self._roots is not None else load_system_roots()
            if not roots:
                log.warning("tls_no_trust_store: every certificate counts as unverified")
                self._roots = []
                return None
            self._store = Store(roots)
            self._leaf = _leaf_policy()
        return self._store

    def check(self, obj: ssl.SSLObject, now: float) -> TlsCheck:
        """Whether the chain this connection's server sent verifies for its server name now."""
        context = obj.context
        if isinstance(context, _ResumingContext):
            resumed = context.resumed_check(obj)
            if resumed is not None:
                return resumed
        name = obj.server_hostname
        chain = peer_chain(obj)
        if not name or not chain:
            return TlsCheck.UNVERIFIED
        key = hashlib.sha256(name.encode() + b"\0" + b"".join(chain)).digest()
        cached = self._verdicts.get(key)
        if cached is not None and now < cached[1]:
            self._verdicts.move_to_end(key)
            return cached[0]
        verdict, until = self._verify(name, chain, now)
        self._verdicts[key] = (verdict, until)
        self._verdicts.move_to_end(key)
        while len(self._verdicts) > VERDICT_CACHE:
            self._verdicts.popitem(last=False)
        return verdict

    def _verify(self, name: str, chain: list[bytes], now: float) -> tuple[TlsCheck, float]:
        self.verifications += 1
        until = now + VERDICT_TTL
        store = self._trust()
        if store is None or self._leaf is None:
            return TlsCheck.UNVERIFIED, until
        from cryptography import x509
        from cryptography.utils import CryptographyDeprecationWarning
        from cryptography.x509.verification import ExtensionPolicy, PolicyBuilder

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", CryptographyDeprecationWarning)
                certs = [x509.load_der_x509_certificate(der) for der in chain]
            verifier = (
                PolicyBuilder()
                .store(store)
                .time(datetime.datetime.fromtimestamp(now, datetime.UTC))
                .extension_policies(
                    ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=self._leaf
                )
                .build_server_verifier(_subject(name))
            )
            verifier.verify(certs[0], certs[1:])
        except Exception as exc:  # VerificationError, a malformed certificate or name
            log.debug("tls_unverified error=%s", exc)
            return TlsCheck.UNVERIFIED, until
        leaf_expiry = certs[0].not_valid_after_utc.timestamp()
        return TlsCheck.VERIFIED, min(until, leaf_expiry)


def load_pem_roots(pem: str) -> list[x509.Certificate]:
    """The certificates of a PEM bundle (ValueError if one does not parse): given roots."""
    from cryptography import x509

    return x509.load_pem_x509_certificates(pem.encode())


def remember(obj: ssl.SSLObject, check: TlsCheck) -> None:
    """Keep a finished connection's session for resumption, if its context resumes sessions."""
    if isinstance(obj.context, _ResumingContext):
        obj.context.remember(obj, check)
