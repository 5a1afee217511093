"""A small private certificate authority for the collector and its agents.

`takedown-collector ca init DIR` makes `DIR/ca.pem` (give it to every agent and
hotline as --ca-file, and to the collector as --client-ca-file for mutual TLS)
and `DIR/ca.key`. `ca issue DIR --name N` makes `DIR/N.pem` and `DIR/N.key`:
with `--server` a collector certificate for the names in --dns and --ip,
otherwise a client certificate whose common name is the agent's --name. Keys
are ECDSA P-256 and written 0600; existing files are never overwritten.

Keep ca.key off the collector host if you can: whoever holds it can mint agent
certificates. There is no revocation list: a lost client certificate is
stopped by revoking the agent's token (tokens are required alongside mutual
TLS), or by a new CA.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_DNS_NAME = re.compile(
    r"(?=.{1,253}\Z)([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)"
    r"(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?"
)


class PKIError(ValueError):
    """A CA operation that cannot be done as asked (nothing was written)."""


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create `path` with `mode`; refuse to replace an existing file."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError as exc:
        raise PKIError(f"{path} exists; not overwriting it") from exc
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def _write_private(path: Path, data: bytes) -> None:
    _write_new(path, data, 0o600)


def _write_public(path: Path, data: bytes) -> None:
    _write_new(path, data, 0o644)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    """Signatures only; a CA also signs certificates and revocation lists."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def init_ca(directory: Path, common_name: str = "Takedown Monitor CA", days: int = 3650) -> Issued:
    """Create DIR (0700) with a self-signed CA certificate and its key."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    cert_path, key_path = directory / CA_CERT, directory / CA_KEY
    for path in (cert_path, key_path):
        if path.exists():
            raise PKIError(f"{path} exists; not overwriting it")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_private(key_path, _key_pem(key))
    _write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return Issued(cert_path, key_path)


def issue(
    directory: Path,
    name: str,
    *,
    server: bool = False,
    dns: Sequence[str] = (),
    ips: Sequence[str] = (),
    days: int = 825,
) -> Issued:
    """Issue DIR/NAME.pem and DIR/NAME.key, signed by the CA in DIR."""
    if not _FILE_NAME.fullmatch(name):
        raise PKIError(
            f"{name!r}: a certificate name is 1-64 letters, digits, '.', '_' or '-'"
            " (and names the agent: use its --name)"
        )
    if name in ("ca",):
        raise PKIError("'ca' is the CA's own name")
    try:
        addresses = [ipaddress.ip_address(a) for a in ips]
    except ValueError as exc:
        raise PKIError(str(exc)) from exc
    for host in dns:
        if not _DNS_NAME.fullmatch(host):
            raise PKIError(f"{host!r} is not a DNS name")
    if server and not (dns or addresses):
        raise PKIError("a server certificate needs the names clients connect to: --dns or --ip")
    if not server and (dns or addresses):
        raise PKIError("--dns and --ip are for --server certificates")
    try:
        ca_cert = x509.load_pem_x509_certificate((directory / CA_CERT).read_bytes())
        ca_key = serialization.load_pem_private_key((directory / CA_KEY).read_bytes(), None)
    except FileNotFoundError as exc:
        raise PKIError(f"{exc.filename}: no CA here (run 'ca init {directory}' first)") from exc
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise PKIError(f"{directory / CA_KEY} is not an EC key made by 'ca init'")
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    for path in (cert_path, key_path):
        if path.exists():
            raise PKIError(f"{path} exists; not overwriting it")
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.DNSName(h) for h in dns]
    sans += [x509.IPAddress(a) for a in addresses]
    if not server and _DNS_NAME.fullmatch(name):
        sans.append(x509.DNSName(name))
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    _write_private(key_path, _key_pem(key))
    _write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return Issued(cert_path, key_path)
