"""The evidence package's one exception tree (drawn in `collector.evidence`)."""

from __future__ import annotations


class EvidenceError(Exception):
    """Base of everything the evidence package refuses."""


class MalformedError(EvidenceError, ValueError):
    """Bytes that do not parse as what they claim to be."""


class MalformedNote(MalformedError):
    """A signed note or checkpoint that does not follow its C2SP format."""


class MalformedKey(MalformedError):
    """A verifier key, signer key or key file that cannot be parsed."""


class MalformedLeaf(MalformedError):
    """A leaf that lacks a field, has one of the wrong type, or is not canonical."""


class MalformedBundle(MalformedError):
    """A bundle directory that lacks a file or holds one that does not parse."""


class ProofError(EvidenceError):
    """An inclusion or consistency proof that does not verify."""


class SignatureError(EvidenceError):
    """A signed note with no verifying signature by a known key, or a failing one."""


class KeyFileError(EvidenceError, OSError):
    """A key file that cannot be created (it exists) or read (wrong mode, unreadable)."""
