"""What makes a result news to the spool's drop policy: its class, as the agent can tell it.

The agent does not hold the reference hashes (the collector compares), so it cannot know
whether a 2xx shows the reported content. What it can tell from status and error is the
class the collector will most likely give a result; two results of one URL in a row with the
same class are a *repeat* ("nothing new"), which a full spool may drop (agent/spool.py).
`UrlMemory` keeps, per URL, the last class and where its newest result sits, in arrays.
"""

from __future__ import annotations

import hashlib
from array import array

from agent.result import ErrorClass, ProbeResult
from agent.slots import Slots

_CONCLUSIVE_ERRORS = frozenset(
    {ErrorClass.NONE, ErrorClass.DNS_NXDOMAIN, ErrorClass.CONNECT_REFUSED}
)


def evidence(result: ProbeResult) -> str:
    """What the agent can tell a result says: the class the collector will give it, as far as
    status and error show it, without the reference hashes only the collector holds.

    `inconclusive`, `nxdomain`, `removed` (404/410/451, connection refused), `present URL`
    for a 2xx at its final URL (a redirect elsewhere is another final URL), `status N URL`
    for any other response. The body hash is left out on purpose: a page that changes on
    every load would otherwise make every result news, and the bound would never bite.
    """
    if is_inconclusive(result):
        return "inconclusive"
    if result.error is ErrorClass.DNS_NXDOMAIN:
        return "nxdomain"
    if result.error is ErrorClass.CONNECT_REFUSED or result.status in (404, 410, 451):
        return "removed"
    if 200 <= result.status < 300:
        return f"present {result.final_url}"
    return f"status {result.status} {result.final_url}"


def outcome(result: ProbeResult) -> int:
    """A stable 64-bit hash of `evidence`: two results of a URL are repeats when it is equal."""
    digest = hashlib.blake2b(evidence(result).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def is_inconclusive(result: ProbeResult) -> bool:
    """A result that carries no evidence of presence or removal (see collector.verdict)."""
    if result.challenge or result.error not in _CONCLUSIVE_ERRORS:
        return True
    return result.error is ErrorClass.NONE and (result.status == 429 or result.status >= 500)


class UrlMemory:
    """Per URL: its last outcome, the seq of the newest result kept (or sent) for it, and
    whether that result was a repeat; in arrays (about 21 bytes per URL, not ~200)."""

    __slots__ = ("_last_seq", "_outcome", "_repeat", "_slots")

    def __init__(self) -> None:
        self._slots = Slots()
        self._outcome = array("q")
        self._last_seq = array("q")
        self._repeat = bytearray()

    def __len__(self) -> int:
        return len(self._slots)

    def __getitem__(self, url_id: int) -> tuple[int, int, bool]:
        got = self.get(url_id)
        if got is None:
            raise KeyError(url_id)
        return got

    def get(self, url_id: int) -> tuple[int, int, bool] | None:
        slot = self._slots.get(url_id)
        if slot < 0:
            return None
        return self._outcome[slot], self._last_seq[slot], bool(self._repeat[slot])

    def set(self, url_id: int, outcome: int, last_seq: int, repeat: bool) -> None:
        slot, _ = self._slots.add(url_id)
        if slot == len(self._outcome):
            self._outcome.append(outcome)
            self._last_seq.append(last_seq)
            self._repeat.append(repeat)
        else:
            self._outcome[slot], self._last_seq[slot], self._repeat[slot] = (
                outcome, last_seq, repeat,
            )  # fmt: skip
