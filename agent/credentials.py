"""The client side of the collector's security: TLS channel credentials and the bearer token.

Shared by the agent's link and `takedown-collector import`. `ClientTLS` None
means plaintext (only when the operator asked for --insecure); without a CA
file the system's trust store verifies the collector's certificate.
"""

from __future__ import annotations

import logging
import os
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


def exposed(mode: int, gid: int, own_groups: frozenset[int] | None = None) -> bool:
    """Whether a secret file with `mode` and group `gid` is open to others than this process.

    Anyone-bits always are. Group bits are not when the group is one this process is in: a
    Kubernetes Secret mounted with fsGroup, or a systemd credential, is group-readable by
    the program's own group and nobody else.
    """
    if mode & stat.S_IRWXO:
        return True
    if not mode & stat.S_IRWXG:
        return False
    groups = own_groups if own_groups is not None else frozenset({os.getegid(), *os.getgroups()})
    return gid not in groups


def read_token(token: str | None, token_file: Path | None) -> str | None:
    """The token from --token-file (preferred) or --token; warns if others may read the file."""
    if token_file is not None:
        try:
            info = token_file.stat()
            text = token_file.read_text().strip()
        except OSError as exc:
            raise CredentialError(f"{token_file}: {exc.strerror or exc}") from exc
        if exposed(info.st_mode, info.st_gid):
            log.warning(
                "token_file_permissive path=%s mode=%o (chmod 600)",
                token_file,
                info.st_mode & 0o777,
            )
        if not text:
            raise CredentialError(f"{token_file} is empty")
        return text
    return token.strip() if token else None
