"""C2SP tlog-checkpoint: a log's tree head as the text of a signed note.

The text is three lines and any extension lines: the origin (the log's name),
the tree size in decimal, and the base64 root hash. This log signs it with one
Ed25519 key whose signed-note key name equals the origin, so a verifier that
holds the log's verifier key knows both whose checkpoint it is and that the
log signed it.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass

from collector.evidence.errors import MalformedNote, SignatureError
from collector.evidence.merkle import HASH_SIZE
from collector.evidence.note import NoteSigner, NoteVerifier, open_note, sign_note

_SIZE = re.compile(r"0|[1-9][0-9]*")


@dataclass(frozen=True)
class Checkpoint:
    """A tree head: which log, how many leaves, and their RFC 6962 root."""

    origin: str
    size: int
    root: bytes
    extensions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.origin or "\n" in self.origin:
            raise MalformedNote("a checkpoint's origin must be one non-empty line")
        if self.size < 0:
            raise MalformedNote("a checkpoint's size cannot be negative")
        if len(self.root) != HASH_SIZE:
            raise MalformedNote(f"a checkpoint's root is {HASH_SIZE} bytes")
        if any(not line or "\n" in line for line in self.extensions):
            raise MalformedNote("a checkpoint's extension lines must be non-empty lines")

    def text(self) -> str:
        """The note text: origin, size, base64 root, extensions, each ending in a newline."""
        lines = [self.origin, str(self.size), base64.b64encode(self.root).decode()]
        return "".join(f"{line}\n" for line in (*lines, *self.extensions))

    @classmethod
    def parse(cls, text: str) -> Checkpoint:
        """The checkpoint a note text holds (the signatures already removed)."""
        if not text.endswith("\n"):
            raise MalformedNote("a checkpoint's text ends with a newline")
        lines = text[:-1].split("\n")
        if len(lines) < 3:
            raise MalformedNote("a checkpoint has an origin, a size and a root hash")
        origin, size, root, *extensions = lines
        if not _SIZE.fullmatch(size):
            raise MalformedNote(f"tree size {size!r} is not a decimal without leading zeros")
        try:
            digest = base64.b64decode(root, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise MalformedNote("the root hash is not base64") from exc
        return cls(origin, int(size), digest, tuple(extensions))


def sign_checkpoint(checkpoint: Checkpoint, signer: NoteSigner) -> str:
    """The checkpoint as a signed note, signed by the log's key (its name is the origin)."""
    if signer.name != checkpoint.origin:
        raise ValueError(f"key {signer.name!r} does not sign for log {checkpoint.origin!r}")
    return sign_note(checkpoint.text(), signer)


def open_checkpoint(note: str, log_key: NoteVerifier) -> Checkpoint:
    """The checkpoint in `note` if the log's key signed it and it names that log."""
    text, _ = open_note(note, log_key)
    checkpoint = Checkpoint.parse(text)
    if checkpoint.origin != log_key.name:
        raise SignatureError(
            f"the checkpoint names log {checkpoint.origin!r}, the key is {log_key.name!r}"
        )
    return checkpoint
