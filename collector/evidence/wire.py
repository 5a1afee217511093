"""The one translation from wire results to the batch tree an agent signs.

The agent (before sending) and the collector (on receipt) both call
`observation_of` and `batch_tree`, so they hash and check the same integers
the wire carried, never a float one side rounded differently.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from collector.evidence.leaves import Observation, observation_signing_bytes
from collector.evidence.merkle import HASH_SIZE, leaf_hash, root_of
from protos.takedown.v1 import takedown_pb2 as pb


def _enum_name(kind: str, enum_type: object, number: int) -> str:
    prefix = f"{kind}_"
    try:
        name = str(enum_type.Name(number))  # type: ignore[attr-defined]
    except ValueError:
        return f"{kind.lower()}_{number}"  # from a newer agent: still signed as it came
    return name.removeprefix(prefix).lower()


def observation_of(
    agent: str, network: str, url_sha256: bytes, result: pb.ProbeResult
) -> Observation:
    """The signed part of an observation leaf for one wire result of `agent`."""
    return Observation(
        agent=agent,
        network=network,
        url_sha256=url_sha256,
        seq=result.seq,
        started_at_us=result.started_at_unix_us,
        elapsed_ms=result.elapsed_ms,
        status=result.status,
        final_url_sha256=(
            hashlib.sha256(result.final_url.encode()).digest() if result.final_url else b""
        ),
        body_sha256=result.body_sha256,
        body_bytes=result.body_bytes,
        truncated=result.truncated,
        peer_ip=result.peer_ip,
        error=_enum_name("ERROR_CLASS", pb.ErrorClass, result.error),
        redirects=result.redirects,
        challenge=result.challenge,
        tls=_enum_name("TLS_CHECK", pb.TlsCheck, result.tls),
    )


@dataclass(frozen=True)
class BatchTree:
    """A batch's observations as bytes, their RFC 6962 leaf hashes, and the tree's root."""

    data: list[bytes]  # each result's `observation_signing_bytes`, in the batch's order
    hashes: bytes  # their leaf hashes, 32 bytes each, concatenated
    root: bytes

    @property
    def size(self) -> int:
        return len(self.data)

    def leaf_hashes(self) -> list[bytes]:
        return split_hashes(self.hashes)


def split_hashes(hashes: bytes) -> list[bytes]:
    """32-byte hashes out of their concatenation."""
    return [hashes[i : i + HASH_SIZE] for i in range(0, len(hashes), HASH_SIZE)]


def batch_tree(agent: str, network: str, results: Sequence[pb.ProbeResult]) -> BatchTree:
    """The tree over a batch's results, each as `agent` observed it: what the agent signs.

    Every result needs its `url_sha256` (MalformedLeaf otherwise).
    """
    data = [
        observation_signing_bytes(observation_of(agent, network, r.url_sha256, r)) for r in results
    ]
    hashes = [leaf_hash(d) for d in data]
    return BatchTree(data, b"".join(hashes), root_of(hashes))
