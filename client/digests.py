"""Assignment digests: how an agent and the collector tell which parts of an assignment differ.

Part of the wire contract, hand-written (protos/ holds generated code only). URLs fall into
BUCKETS buckets by id; a bucket's digest is the XOR of a 64-bit hash of each
(url_id, interval_ms) in it, so it can be kept up to date incrementally and
does not depend on order. On reconnect the agent sends its digests in Hello;
the collector resends only the buckets whose digests differ.
"""

from __future__ import annotations

import hashlib

BUCKETS = 1024


def bucket_of(url_id: int) -> int:
    return url_id % BUCKETS


def entry_hash(url_id: int, interval_ms: int) -> int:
    """A 64-bit hash of one assignment entry."""
    digest = hashlib.blake2b(f"{url_id}:{interval_ms}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


class Digests:
    """Per-bucket XOR digests of a set of (url_id, interval_ms) entries."""

    def __init__(self) -> None:
        self.values = [0] * BUCKETS

    def toggle(self, url_id: int, interval_ms: int) -> None:
        """Add an entry, or remove it if present (XOR is its own inverse)."""
        self.values[bucket_of(url_id)] ^= entry_hash(url_id, interval_ms)
