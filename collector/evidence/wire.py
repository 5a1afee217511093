"""The one translation from a wire `ProbeResult` to the `Observation` an agent signs.

The agent (before sending) and the collector (on receipt) both call
`observation_of`, so they sign and check the same integers the wire carried,
never a float one side rounded differently.
"""

from __future__ import annotations

import hashlib

from collector.evidence.leaves import Observation
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
