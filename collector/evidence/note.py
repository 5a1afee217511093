"""C2SP signed notes with Ed25519 signatures, and their key strings.

A signed note is a UTF-8 text ending in a newline, a blank line, then one or
more lines `— <key name> base64(key ID || signature)`. The key ID is the first
four bytes of SHA-256(key name || 0x0A || 0x01 || 32-byte public key), 0x01
being the signed-note type byte for Ed25519. A verifier key is written
`<name>+<key ID as 8 hex digits>+base64(0x01 || public key)`, a signer key
`PRIVATE+KEY+<name>+<key ID>+base64(0x01 || 32-byte seed)`: the formats of
golang.org/x/mod/sumdb/note, so the Go tools and any C2SP verifier accept
what this module signs (a test holds it to that package's published example).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from collector.evidence.errors import MalformedKey, MalformedNote, SignatureError

ED25519 = 0x01
MAX_SIGNATURES = 100
_DASH = "\u2014 "
_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f]")
_NAME_FORBIDDEN = re.compile(r"[\s+]")
_HEX8 = re.compile(r"[0-9a-f]{8}")


def key_id(name: str, public_key: bytes) -> bytes:
    """The 4-byte signed-note key ID of an Ed25519 key under `name`."""
    return hashlib.sha256(name.encode() + b"\n" + bytes([ED25519]) + public_key).digest()[:4]


def ed25519_verifies(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """True if `signature` is the Ed25519 signature of the 32-byte `public_key` over `message`."""
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


def check_name(name: str) -> str:
    """`name` if it may name a signed-note key: non-empty, no spaces, no '+'."""
    if not name or _NAME_FORBIDDEN.search(name) or _CONTROL.search(name):
        raise MalformedKey(f"key name {name!r} must be non-empty, without spaces or '+'")
    return name


def _b64(data: str, what: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MalformedKey(f"{what} is not base64") from exc


@dataclass(frozen=True)
class NoteVerifier:
    """A known Ed25519 key: its name, key ID and raw 32-byte public key."""

    name: str
    public_key: bytes

    def __post_init__(self) -> None:
        check_name(self.name)
        if len(self.public_key) != 32:
            raise MalformedKey(f"an Ed25519 public key is 32 bytes, not {len(self.public_key)}")

    @property
    def key_id(self) -> bytes:
        return key_id(self.name, self.public_key)

    @classmethod
    def parse(cls, vkey: str) -> NoteVerifier:
        """The key of a verifier key string `name+keyid+base64(0x01||pubkey)`."""
        parts = vkey.strip().split("+", 2)
        if len(parts) != 3:
            raise MalformedKey("a verifier key has the form name+keyid+base64key")
        name, hash_hex, data = parts
        if not _HEX8.fullmatch(hash_hex):
            raise MalformedKey(f"key ID {hash_hex!r} is not 8 lower-case hex digits")
        raw = _b64(data, "the key")
        if len(raw) != 33 or raw[0] != ED25519:
            raise MalformedKey("the key is not an Ed25519 (type 0x01) public key")
        verifier = cls(check_name(name), raw[1:])
        if verifier.key_id.hex() != hash_hex:
            raise MalformedKey(f"key ID {hash_hex} does not match the key and name {name!r}")
        return verifier

    def __str__(self) -> str:
        data = base64.b64encode(bytes([ED25519]) + self.public_key).decode()
        return f"{self.name}+{self.key_id.hex()}+{data}"

    def verifies(self, message: bytes, signature: bytes) -> bool:
        """True if `signature` is this key's Ed25519 signature over `message`."""
        return ed25519_verifies(self.public_key, message, signature)


@dataclass(frozen=True)
class NoteSigner:
    """An Ed25519 signing key under a name (the private half of a NoteVerifier)."""

    name: str
    seed: bytes  # the 32-byte RFC 8032 private key

    def __post_init__(self) -> None:
        check_name(self.name)
        if len(self.seed) != 32:
            raise MalformedKey(f"an Ed25519 private key is 32 bytes, not {len(self.seed)}")

    @classmethod
    def generate(cls, name: str) -> NoteSigner:
        key = Ed25519PrivateKey.generate()
        seed = key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        return cls(name, seed)

    @classmethod
    def parse(cls, skey: str) -> NoteSigner:
        """The key of a signer key string `PRIVATE+KEY+name+keyid+base64(0x01||seed)`."""
        parts = skey.strip().split("+", 4)
        if len(parts) != 5 or parts[:2] != ["PRIVATE", "KEY"]:
            raise MalformedKey("a signer key has the form PRIVATE+KEY+name+keyid+base64key")
        _, _, name, hash_hex, data = parts
        raw = _b64(data, "the private key")
        if len(raw) != 33 or raw[0] != ED25519:
            raise MalformedKey("the private key is not an Ed25519 (type 0x01) key")
        signer = cls(check_name(name), raw[1:])
        if signer.verifier().key_id.hex() != hash_hex:
            raise MalformedKey(f"key ID {hash_hex} does not match the key and name {name!r}")
        return signer

    def __str__(self) -> str:
        data = base64.b64encode(bytes([ED25519]) + self.seed).decode()
        return f"PRIVATE+KEY+{self.name}+{self.verifier().key_id.hex()}+{data}"

    def __repr__(self) -> str:
        return f"NoteSigner(name={self.name!r}, seed=<secret>)"

    def _key(self) -> Ed25519PrivateKey:
        return Ed25519PrivateKey.from_private_bytes(self.seed)

    def verifier(self) -> NoteVerifier:
        public = (
            self._key()
            .public_key()
            .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        )
        return NoteVerifier(self.name, public)

    def sign(self, message: bytes) -> bytes:
        """The raw 64-byte Ed25519 signature over `message`."""
        return self._key().sign(message)


def _check_text(text: str) -> None:
    if not text.endswith("\n"):
        raise MalformedNote("a note's text must end with a newline")
    if _CONTROL.search(text):
        raise MalformedNote("a note must not contain control characters other than newline")


def sign_note(text: str, *signers: NoteSigner) -> str:
    """The signed note: `text`, a blank line, and one signature line per signer."""
    _check_text(text)
    if not signers:
        raise ValueError("a signed note needs at least one signer")
    lines = []
    for signer in signers:
        blob = signer.verifier().key_id + signer.sign(text.encode())
        lines.append(f"{_DASH}{signer.name} {base64.b64encode(blob).decode()}\n")
    return text + "\n" + "".join(lines)


@dataclass(frozen=True)
class Signature:
    """One signature line of a note: who claims to have signed, and the bytes."""

    name: str
    key_id: bytes
    signature: bytes


def parse_note(note: str) -> tuple[str, list[Signature]]:
    """The text and the signature lines of a signed note, unverified."""
    _check_text(note)
    cut = note.rfind("\n\n")
    if cut < 0:
        raise MalformedNote("a signed note needs a blank line before its signatures")
    text, block = note[: cut + 1], note[cut + 2 :]
    lines = block.split("\n")
    if lines[-1] != "" or len(lines) < 2:
        raise MalformedNote("a signed note needs at least one signature line")
    if len(lines) - 1 > MAX_SIGNATURES:
        raise MalformedNote(f"more than {MAX_SIGNATURES} signatures")
    signatures = []
    for line in lines[:-1]:
        if not line.startswith(_DASH):
            raise MalformedNote(f"signature line {line[:40]!r} does not start with an em dash")
        name, space, data = line[len(_DASH) :].partition(" ")
        try:
            check_name(name)
            raw = _b64(data, "the signature")
        except MalformedKey as exc:
            raise MalformedNote(f"signature line of {name!r}: {exc}") from exc
        if not space or len(raw) < 5:
            raise MalformedNote(f"signature line of {name!r} is too short")
        signatures.append(Signature(name, raw[:4], raw[4:]))
    return text, signatures


def open_note(note: str, *known: NoteVerifier) -> tuple[str, list[NoteVerifier]]:
    """The text of a signed note and the known keys whose signatures verify.

    Signatures by unknown keys (name or ID differ) are ignored, as the spec
    says; a signature by a known key that does not verify, or no verifying
    signature by a known key at all, raises SignatureError.
    """
    text, signatures = parse_note(note)
    by_id = {(v.name, v.key_id): v for v in known}
    good: list[NoteVerifier] = []
    for sig in signatures:
        verifier = by_id.get((sig.name, sig.key_id))
        if verifier is None:
            continue
        if not verifier.verifies(text.encode(), sig.signature):
            raise SignatureError(f"the signature by {verifier.name} does not verify")
        good.append(verifier)
    if not good:
        names = ", ".join(sorted({s.name for s in signatures}))
        raise SignatureError(f"no signature by a known key (signed by: {names})")
    return text, good
