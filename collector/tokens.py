"""Bearer tokens for agents and hotlines: made here, stored only as a SHA-256 digest.

A token reads `tdm_<id>_<secret>`: `id` is 8 random hex digits that name the
token in logs and listings (it is not secret), `secret` is 32 random bytes in
URL-safe base64. A 256-bit random secret needs no slow password hash: SHA-256
of the whole token is stored, and the token presented is looked up by its id
and compared digest to digest in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from enum import StrEnum

PREFIX = "tdm"
_TOKEN = re.compile(r"tdm_([0-9a-f]{8})_([A-Za-z0-9_-]{43})")


class Role(StrEnum):
    """What a credential may do: stream results (agent) or submit reports (intake)."""

    AGENT = "agent"
    INTAKE = "intake"


@dataclass(frozen=True)
class NewToken:
    token: str  # shown once, never stored
    token_id: str
    digest: bytes


def new_token() -> NewToken:
    token_id = secrets.token_hex(4)
    token = f"{PREFIX}_{token_id}_{secrets.token_urlsafe(32)}"
    return NewToken(token, token_id, digest(token))


def digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def token_id_of(token: str) -> str | None:
    """The public id of a well-formed token, or None (nothing of a malformed one is logged)."""
    match = _TOKEN.fullmatch(token)
    return match[1] if match else None


def matches(token: str, stored_digest: bytes) -> bool:
    return hmac.compare_digest(digest(token), stored_digest)
