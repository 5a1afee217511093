"""What a 2xx body says: the reported content, a replacement, or a page that changes on every load.

Theory of operation
-------------------
The *baseline* is the hash of the reported content: the hotline's reference
hash when the report carries one, else the first 2xx body seen. The final URL
of the first 2xx is remembered too.

A 2xx whose hash equals the baseline is the content, present. A 2xx that ends
on another final URL (redirected away) is removed. A 2xx at the same final URL
with another hash is ambiguous on its own: the page may have been replaced (a
parking or "suspended" page, whose hash is then stable) or it may be a page
that changes on every load (ads, timestamps, tokens). So a new hash is first
only *remembered* (undecided, so inconclusive); when the same hash is seen
again the page is a stable replacement and the probe is removed, with the
evidence dated to the first time that hash was seen, so removal times are not
pushed late by the wait. Once `dynamic_after` different hashes were seen and
none ever repeated, either
- the baseline itself was never seen twice: the page changes on every load,
  it is *dynamic*, and from then on a 2xx at the baseline's final URL is
  present, judged by status and final URL alone; or
- the baseline was stable (seen at least twice) and then gave way to bodies
  that never repeat: the content was replaced by a changing page, removed,
  dated to the first of those bodies.
A reference hash from the hotline is never declared dynamic.

Nothing here does I/O or reads a clock.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

MAX_VARIANTS = 16


class Verdict(enum.Enum):
    PRESENT = "present"
    REMOVED = "removed"
    UNDECIDED = "undecided"


@dataclass(slots=True)
class Variant:
    first_seen: float
    count: int = 1


@dataclass(slots=True)
class ContentMemory:
    """Per-URL memory of the baseline and of the other bodies seen at its final URL."""

    baseline: bytes | None = None
    baseline_final_url: str | None = None
    from_reference: bool = False
    baseline_count: int = 0
    dynamic: bool = False
    variants: dict[bytes, Variant] = field(default_factory=dict)

    @classmethod
    def with_reference(cls, sha256: bytes) -> ContentMemory:
        """Memory whose baseline is the hotline's reference hash."""
        return cls(baseline=sha256, from_reference=True)

    def judge(
        self, sha256: bytes, final_url: str, at: float, dynamic_after: int
    ) -> tuple[Verdict, float]:
        """Judge one 2xx body; return the verdict and the time its evidence dates from."""
        if self.baseline is None:
            self.baseline = sha256
        if sha256 == self.baseline:
            self.baseline_count += 1
            if self.baseline_final_url is None and final_url:
                self.baseline_final_url = final_url
            return Verdict.PRESENT, at
        if self.baseline_final_url and final_url and final_url != self.baseline_final_url:
            return Verdict.REMOVED, at
        if self.dynamic:
            return Verdict.PRESENT, at
        known = self.variants.get(sha256)
        if known is not None:
            known.count += 1
            return Verdict.REMOVED, known.first_seen
        self._remember(sha256, at)
        never_repeated = all(v.count == 1 for v in self.variants.values())
        if len(self.variants) < dynamic_after or not never_repeated or self.from_reference:
            return Verdict.UNDECIDED, at
        if self.baseline_count >= 2:
            return Verdict.REMOVED, min(v.first_seen for v in self.variants.values())
        self.dynamic = True
        return Verdict.PRESENT, at

    def _remember(self, sha256: bytes, at: float) -> None:
        if len(self.variants) >= MAX_VARIANTS:
            oldest = min(self.variants, key=lambda h: self.variants[h].first_seen)
            del self.variants[oldest]
        self.variants[sha256] = Variant(at)
