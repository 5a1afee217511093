"""The agent's Ed25519 key: what makes its observations its own.

Made at first start as `agent.key` in --state-dir (or read from --agent-key-file),
PEM PKCS#8, mode 0600, created exclusively: written to a temporary file and
linked into place, so two agents starting on one directory cannot both win
and a crash never leaves half a key. `agent.pub` beside it holds the public
key (PEM) for `takedown-collector agents add NAME --public-key FILE`.
The key signs each result's `observation_signing_bytes`; it never leaves the
agent, and no log line shows it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from client.credentials import exposed
from collector.evidence.leaves import observation_signing_bytes, url_sha256
from collector.evidence.wire import observation_of
from protos.takedown.v1 import takedown_pb2 as pb

KEY_FILE = "agent.key"
PUBLIC_FILE = "agent.pub"


class AgentKeyError(OSError):
    """The key file cannot be read as an Ed25519 key, is open to others, or cannot be made."""


class AgentKey:
    """An Ed25519 private key with the two things the agent does with it."""

    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._private = private
        self.public_key: bytes = private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    def __repr__(self) -> str:
        return f"AgentKey(public_key={self.public_key.hex()})"

    def sign(self, data: bytes) -> bytes:
        """The 64-byte Ed25519 signature over `data`."""
        return self._private.sign(data)

    def public_pem(self) -> bytes:
        return self._private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    @classmethod
    def load(cls, path: Path) -> AgentKey:
        """The key in `path`; refused if others may read it or it is not Ed25519.

        A file made with `openssl genpkey -algorithm ed25519` will do.
        """
        try:
            info = path.stat()
            data = path.read_bytes()
        except OSError as exc:
            raise AgentKeyError(f"cannot read the agent key {path}: {exc.strerror}") from exc
        if exposed(info.st_mode, info.st_gid):  # a group of its own (a mounted Secret) is fine
            raise AgentKeyError(f"the agent key {path} is readable by others; chmod 600 it")
        try:
            private = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise AgentKeyError(f"{path} is not an unencrypted PEM private key") from exc
        if not isinstance(private, Ed25519PrivateKey):
            raise AgentKeyError(f"{path} holds a key that is not Ed25519")
        return cls(private)

    @classmethod
    def load_or_create(cls, state_dir: Path) -> AgentKey:
        """`state_dir/agent.key`, made (with `agent.pub`) if there is none yet."""
        path = state_dir / KEY_FILE
        if not path.exists():
            key = cls(Ed25519PrivateKey.generate())
            pem = key._private.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            if _create_exclusive(path, pem, 0o600):
                _create_exclusive(state_dir / PUBLIC_FILE, key.public_pem(), 0o644, replace=True)
                return key
        return cls.load(path)


@dataclass(frozen=True)
class ResultSigner:
    """Signs wire results as this agent: its key, its name and network, and its URLs.

    `url_of` maps a URL id to the URL the collector assigned (the agent's
    assignment); a result whose URL is no longer assigned gets an empty
    signature, since its URL hash is unknown; the collector drops such a
    result as unassigned anyway.
    """

    key: AgentKey
    agent: str
    network: str
    url_of: Callable[[int], str | None]

    def signature(self, result: pb.ProbeResult) -> bytes:
        url = self.url_of(result.url_id)
        if url is None:
            return b""
        obs = observation_of(self.agent, self.network, url_sha256(url), result)
        return self.key.sign(observation_signing_bytes(obs))


def _create_exclusive(path: Path, data: bytes, mode: int, *, replace: bool = False) -> bool:
    """Write `path` whole or not at all; False if it already existed (and not `replace`)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if replace:
            tmp.replace(path)
            return True
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        return True
    except OSError as exc:
        raise AgentKeyError(f"cannot create {path}: {exc.strerror}") from exc
    finally:
        tmp.unlink(missing_ok=True)
