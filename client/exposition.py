"""The Prometheus text format's value and label spelling, for the two hand-written renderings
(the agent's whole /metrics, the collector's provider families): both are held byte for byte
to prometheus_client's `generate_latest` by tests, and the agent cannot import it (its RSS)."""

from __future__ import annotations

import math


def sample_value(value: float) -> str:
    """A sample value as the text exposition writes it (Go's float formatting: 1.0,
    1.234567e+06, +Inf)."""
    d = float(value)
    if math.isinf(d):
        return "+Inf" if d > 0 else "-Inf"
    if math.isnan(d):
        return "NaN"
    s = repr(d)
    dot = s.find(".")
    if d > 0 and dot > 6:  # Go switches to an exponent sooner than Python
        mantissa = f"{s[0]}.{s[1:dot]}{s[dot + 1 :]}".rstrip("0.")
        return f"{mantissa}e+{dot - 1:02d}"
    return s


def label_value(text: str) -> str:
    """A label value as the text exposition writes it."""
    return text.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")
