"""The agent's Ed25519 key: what makes its observations its own.

Made at first start as `agent.key` in --state-dir (or read from --agent-key-file),
PEM PKCS#8, mode 0600, created exclusively: written to a temporary file and
linked into place, so two agents starting on one directory cannot both win
and a crash never leaves half a key. `agent.pub` beside it holds the public
key (PEM) for `takedown-collector agents add NAME --public-key FILE`.
The key signs each result batch once, over the root of a Merkle tree of its
results' `observation_signing_bytes` (`batch_signing_bytes`); it never leaves the
agent, and no log line shows it.

The two files' encodings are the fixed ones of RFC 8410 (a 48-byte PKCS#8 and a
44-byte SubjectPublicKeyInfo, each one base64 line), byte for byte what
cryptography's serializer writes, and a key file in exactly that form (what this
module and `openssl genpkey -algorithm ed25519` write) is read without it; any
other file goes to cryptography's PEM loader, which takes whatever form it knows
and says why it refuses the rest. That loader (the `serialization` package) is
imported only then: it costs the agent about 1 MiB of RSS.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from client.credentials import exposed
from collector.evidence.leaves import batch_signing_bytes, url_sha256
from collector.evidence.wire import batch_tree
from protos.takedown.v1 import takedown_pb2 as pb

KEY_FILE = "agent.key"
PUBLIC_FILE = "agent.pub"

# RFC 8410: PrivateKeyInfo (version 0, id-Ed25519, the 32-byte seed as an OCTET STRING inside
# an OCTET STRING) and SubjectPublicKeyInfo (id-Ed25519, the 32-byte key as a BIT STRING).
_PKCS8_PREFIX = bytes.fromhex("302e020100300506032b657004220420")
_SPKI_PREFIX = bytes.fromhex("302a300506032b6570032100")
_PRIVATE_PEM = (b"-----BEGIN PRIVATE KEY-----", b"-----END PRIVATE KEY-----")
_PUBLIC_PEM = (b"-----BEGIN PUBLIC KEY-----", b"-----END PUBLIC KEY-----")


def _pem(der: bytes, armor: tuple[bytes, bytes]) -> bytes:
    """One PEM block, 64 base64 characters a line (as OpenSSL and cryptography write it)."""
    text = base64.b64encode(der)
    lines = [text[i : i + 64] for i in range(0, len(text), 64)]
    return b"\n".join([armor[0], *lines, armor[1]]) + b"\n"


def _rfc8410_seed(data: bytes) -> bytes | None:
    """The seed of a file that is exactly one PEM block of an RFC 8410 Ed25519 PKCS#8 key
    (the form `_pem` writes, line endings and surrounding space aside); else None."""
    lines = data.strip().splitlines()
    if len(lines) < 3 or (lines[0].strip(), lines[-1].strip()) != _PRIVATE_PEM:
        return None
    try:
        der = base64.b64decode(b"".join(line.strip() for line in lines[1:-1]), validate=True)
    except (binascii.Error, ValueError):
        return None
    if len(der) != len(_PKCS8_PREFIX) + 32 or not der.startswith(_PKCS8_PREFIX):
        return None
    return der[len(_PKCS8_PREFIX) :]


class AgentKeyError(OSError):
    """The key file cannot be read as an Ed25519 key, is open to others, or cannot be made."""


class AgentKey:
    """An Ed25519 private key with the two things the agent does with it."""

    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._private = private
        self.public_key: bytes = private.public_key().public_bytes_raw()

    def __repr__(self) -> str:
        return f"AgentKey(public_key={self.public_key.hex()})"

    def sign(self, data: bytes) -> bytes:
        """The 64-byte Ed25519 signature over `data`."""
        return self._private.sign(data)

    def public_pem(self) -> bytes:
        """The public key as PEM SubjectPublicKeyInfo (`agent.pub`)."""
        return _pem(_SPKI_PREFIX + self.public_key, _PUBLIC_PEM)

    def _private_pem(self) -> bytes:
        """The private key as unencrypted PEM PKCS#8 (`agent.key`)."""
        return _pem(_PKCS8_PREFIX + self._private.private_bytes_raw(), _PRIVATE_PEM)

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
        seed = _rfc8410_seed(data)
        if seed is not None:
            return cls(Ed25519PrivateKey.from_private_bytes(seed))
        from cryptography.hazmat.primitives import serialization  # any other form: see above

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
            if _create_exclusive(path, key._private_pem(), 0o600):
                _create_exclusive(state_dir / PUBLIC_FILE, key.public_pem(), 0o644, replace=True)
                return key
        return cls.load(path)


@dataclass(frozen=True)
class ResultSigner:
    """Signs wire result batches as this agent: its key, its name and network, and its URLs.

    `url_of` maps a URL id to the URL the collector assigned (the agent's
    assignment). A result whose URL is no longer assigned is left out of the signed
    batch, since its URL hash is unknown; the collector would drop it as unassigned.
    """

    key: AgentKey
    agent: str
    network: str
    url_of: Callable[[int], str | None]

    def sign(self, results: list[pb.ProbeResult]) -> tuple[list[pb.ProbeResult], bytes]:
        """The results it can sign, each given its URL hash, and the batch's signature."""
        kept = []
        for r in results:
            url = self.url_of(r.url_id)
            if url is not None:
                r.url_sha256 = url_sha256(url)
                kept.append(r)
        if not kept:
            return kept, b""
        tree = batch_tree(self.agent, self.network, kept)
        return kept, self.key.sign(
            batch_signing_bytes(self.agent, self.network, tree.size, tree.root)
        )


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
