"""The client side of the collector's security: TLS channel credentials and the bearer token.

Shared by the agent's link and `takedown-collector import`. `ClientTLS` None
means plaintext (only when the operator asked for --insecure); without a CA
file the system's trust store verifies the collector's certificate.
"""

from __future__ import annotations

import argparse
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


def add_client_options(parser: argparse.ArgumentParser, whose: str, made_by: str) -> None:
    """The options a client of the collector (an agent, `import`) gives its TLS and token with.

    `whose` names the certificate and token holder ("this agent's"), `made_by` the command
    that makes the token ('takedown-collector agents add NAME').
    """
    parser.add_argument(
        "--ca-file",
        type=Path,
        help="CA certificate(s) that sign the collector's certificate, PEM"
        " (default: the system's trusted roots)",
    )
    parser.add_argument(
        "--cert-file", type=Path, help=f"{whose} client certificate, PEM (mutual TLS)"
    )
    parser.add_argument("--key-file", type=Path, help="the key of --cert-file, PEM")
    parser.add_argument(
        "--token-file",
        type=Path,
        help=f"file holding {whose} token (from {made_by}); preferred over --token",
    )
    parser.add_argument(
        "--token",
        help=f"{whose} token; prefer --token-file or the environment, since a command line is"
        " visible to other users",
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="plaintext gRPC without TLS (only to a collector run with --insecure, on a trusted"
        " network such as a loopback demo)",
    )


def client_security(args: argparse.Namespace, made_by: str) -> tuple[ClientTLS | None, str | None]:
    """TLS settings and token from `add_client_options`' options, the files read now so that a
    missing one is reported at start; CredentialError if they do not fit together."""
    token = read_token(args.token, args.token_file)
    if args.insecure:
        if args.ca_file or args.cert_file or args.key_file:
            raise CredentialError("--insecure excludes --ca-file, --cert-file and --key-file")
        log.warning(
            "insecure_transport plaintext gRPC to %s: URLs, results and the token travel"
            " unencrypted (--insecure)",
            args.collector,
        )
        return None, token
    if token is None:
        raise CredentialError(
            f"a token is required: --token-file FILE (from {made_by}), or --insecure for a"
            " collector run with --auth none"
        )
    tls = ClientTLS(args.ca_file, args.cert_file, args.key_file)
    tls.credentials()
    return tls, token
