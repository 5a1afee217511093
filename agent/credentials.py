"""The client side of the collector's security: TLS channel credentials and the bearer token.

Shared by the agent's link and `takedown-collector import`. `ClientTLS` None
means plaintext (only when the operator asked for --insecure); without a CA
file the system's trust store verifies the collector's certificate.
"""

from __future__ import annotations

import logging
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

log = logging.getLogger(__name__)

ChannelOptions = Sequence[tuple[str, int | str]]


class CredentialError(ValueError):
    """The TLS or token options are unusable (a missing file, a key without certificate)."""


@dataclass(frozen=True)
class ClientTLS:
    ca_file: Path | None = None  # None: the system's trusted roots
    cert_file: Path | None = None  # with key_file: a client certificate (mutual TLS)
    key_file: Path | None = None

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise CredentialError("--cert-file and --key-file go together")

    def credentials(self) -> grpc.ChannelCredentials:
        def read(path: Path | None) -> bytes | None:
            if path is None:
                return None
            try:
                return path.read_bytes()
            except OSError as exc:
                raise CredentialError(f"{path}: {exc.strerror or exc}") from exc

        return grpc.ssl_channel_credentials(
            root_certificates=read(self.ca_file),
            private_key=read(self.key_file),
            certificate_chain=read(self.cert_file),
        )


def open_channel(
    target: str, tls: ClientTLS | None, options: ChannelOptions = ()
) -> grpc.aio.Channel:
    if tls is None:
        return grpc.aio.insecure_channel(target, options=list(options))
    return grpc.aio.secure_channel(target, tls.credentials(), options=list(options))


def call_metadata(token: str | None) -> tuple[tuple[str, str], ...] | None:
    """gRPC call metadata carrying the token, or None without one."""
    return (("authorization", f"Bearer {token}"),) if token else None


def read_token(token: str | None, token_file: Path | None) -> str | None:
    """The token from --token-file (preferred) or --token; warns if others may read the file."""
    if token_file is not None:
        try:
            mode = token_file.stat().st_mode
            text = token_file.read_text().strip()
        except OSError as exc:
            raise CredentialError(f"{token_file}: {exc.strerror or exc}") from exc
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning(
                "token_file_permissive path=%s mode=%o (chmod 600)", token_file, mode & 0o777
            )
        if not text:
            raise CredentialError(f"{token_file} is empty")
        return text
    return token.strip() if token else None
