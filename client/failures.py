"""Why a call to the collector failed, and whether trying again can help.

Transient (retried with backoff): the collector is down, restarting, unreachable or slow
(UNAVAILABLE, DEADLINE_EXCEEDED, and for the agent's stream anything else not fatal).
Fatal (the program ends with the cause): the collector refused the caller
(UNAUTHENTICATED: token missing, unknown or revoked; PERMISSION_DENIED: a token or
certificate not allowed this name or role), refused what it sent (INVALID_ARGUMENT,
FAILED_PRECONDITION, UNIMPLEMENTED), or the TLS handshake failed in a way only a change of
configuration mends: the collector's certificate is not signed by a CA this client trusts,
does not name the address dialled, or the collector does not speak TLS at all. gRPC reports
those handshake failures as UNAVAILABLE, so they are recognised by their details.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

FATAL_CODES = frozenset(
    {
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.FAILED_PRECONDITION,
    }
)
TRANSIENT_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})

# Substrings of grpc-core's handshake errors, and what to check for each.
_TLS_CAUSES: tuple[tuple[str, str], ...] = (
    (
        "CERTIFICATE_VERIFY_FAILED",
        "the collector's certificate is not signed by a CA this client trusts: check --ca-file",
    ),
    (
        "Hostname Verification Check failed",
        "the collector's certificate does not name the address dialled: connect by a name or"
        " address in it ('takedown-collector ca issue --server --dns/--ip')",
    ),
    (
        "WRONG_VERSION_NUMBER",
        "the collector does not speak TLS on this port: if it runs with --insecure, so must"
        " this client",
    ),
    ("Tls handshake failed", "the TLS handshake with the collector failed: check --ca-file"),
    ("Ssl handshake failed", "the TLS handshake with the collector failed: check --ca-file"),
)
_CODE_HINTS = {
    grpc.StatusCode.UNAUTHENTICATED: "the collector did not accept the token: check"
    " --token-file (a token can be missing, mistyped or revoked)",
    grpc.StatusCode.PERMISSION_DENIED: "the token or certificate is not allowed this: check"
    " --name, --network and which command made the token",
}


@dataclass(frozen=True)
class Failure:
    """One failed call, as a log line or an exit message can say it."""

    code: str  # the gRPC status name, e.g. UNAVAILABLE
    details: str
    fatal: bool
    hint: str = ""  # what to check, for a failure only configuration can mend

    def __str__(self) -> str:
        text = f"{self.code}: {self.details or '(no details)'}"
        return f"{text} -- {self.hint}" if self.hint else text


def classify(exc: grpc.aio.AioRpcError) -> Failure:
    """The failure's code, details, whether it is fatal, and what to check if it is."""
    code = exc.code()
    details = exc.details() or ""
    if code == grpc.StatusCode.UNAVAILABLE:
        for marker, hint in _TLS_CAUSES:
            if marker in details:
                return Failure(code.name, details, True, hint)
    return Failure(code.name, details, code in FATAL_CODES, _CODE_HINTS.get(code, ""))
