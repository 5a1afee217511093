"""Plain values crossing the store's boundary (no SQL, no protobuf)."""

from __future__ import annotations

import enum
from dataclasses import dataclass

DEFAULT_FLUSH_EVERY = 5.0
"""Seconds between writes of the verdict states behind (`serve --flush-every`)."""


class StoreError(Exception):
    """The database could not do what was asked; nothing of that call was committed."""


class StorageFull(StoreError):
    """The disk or the database file is full."""


class CorruptDatabase(StoreError):
    """The database file is not a usable SQLite database."""


class AgentKeyRefused(StoreError):
    """An agent's hello carried a public key other than the one pinned for its name (or none)."""


@dataclass(frozen=True, slots=True)
class ResultIn:
    """One probe result as received from an agent, already range-checked."""

    url_id: int
    seq: int
    started_at: float
    elapsed: float
    status: int
    final_url: str
    sha256: bytes
    body_bytes: int
    truncated: bool
    peer_ip: str
    error: str
    redirects: int
    challenge: bool = False
    tls: int = 0  # TlsCheck: 0 unknown, 1 plaintext, 2 verified, 3 did not verify
    # For the evidence log: the observation as its agent hashed it into a batch it signed.
    # None when the collector keeps no log.
    evidence: Evidence | None = None


@dataclass(frozen=True, slots=True)
class SignedBatch:
    """A result batch's tree as its agent signed it (its `batch` leaf, docs/EVIDENCE.md)."""

    agent: str
    network: str
    size: int
    root: bytes
    signature: bytes  # empty: from an agent without a key (the collector built the tree)
    hashes: bytes  # the tree's leaf hashes, 32 bytes each: what proofs inside it need


@dataclass(frozen=True, slots=True)
class Evidence:
    """One result's observation: its signing bytes, and where it sits in its signed batch."""

    url_sha256: bytes
    data: bytes  # the observation's canonical bytes (`observation_signing_bytes`)
    batch: SignedBatch
    index: int


@dataclass(frozen=True)
class Ingested:
    """What a batch did: stored, recognised as already stored, or refused."""

    stored: int
    duplicates: int
    rejected: int
    refused: tuple[str, ...] = ()  # why each rejected result was refused


class Submitted(enum.Enum):
    ACCEPTED = "accepted"
    ALREADY_KNOWN = "already_known"
    REJECTED = "rejected"


@dataclass(frozen=True)
class SubmitOutcome:
    status: Submitted
    report_id: int
    url_id: int
    new_url: bool  # to be assigned to agents: new, or reactivated by this report
    interval: float = 0.0
    error: str = ""  # why it was rejected


@dataclass(frozen=True)
class Target:
    """A URL an agent should probe, and how often."""

    url_id: int
    url: str
    interval: float
