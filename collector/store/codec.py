"""The verdict's internal state to and from the `url_state.memory` JSON column.

Only what the database never needs to query lives in JSON: per-agent tracks
and the content memory. Queried values (state, provider, latencies) are
columns of their own.
"""

from __future__ import annotations

import json
from typing import Any

from collector.content import ContentMemory, Variant
from collector.verdict import AgentTrack, ProbeClass, UrlVerdict


def dump_memory(v: UrlVerdict) -> str:
    c = v.content
    return json.dumps(
        {
            "agents": {
                str(agent): [
                    t.last_class.value if t.last_class else None,
                    t.last_conclusive_at,
                    t.removed_run,
                    t.run_started_at,
                    t.last_present_at,
                    t.removed_by_nxdomain,
                ]
                for agent, t in v.agents.items()
            },
            "baseline_final_url": c.baseline_final_url,
            "baseline_count": c.baseline_count,
            "from_reference": c.from_reference,
            "variants": {h.hex(): [x.first_seen, x.count] for h, x in c.variants.items()},
            "episode_opened_at": v.episode_opened_at,
            "first_removed_at": v.first_removed_at,
        },
        separators=(",", ":"),
    )


def load_memory(v: UrlVerdict, text: str, baseline: bytes | None, dynamic: bool) -> None:
    """Fill `v` (built from the queried columns) with the state kept in JSON."""
    data: dict[str, Any] = json.loads(text) if text else {}
    v.agents = {
        int(agent): AgentTrack(
            last_class=ProbeClass(cls) if cls else None,
            last_conclusive_at=at,
            removed_run=run,
            run_started_at=started,
            last_present_at=present,
            removed_by_nxdomain=bool(nx),
        )
        for agent, (cls, at, run, started, present, nx) in data.get("agents", {}).items()
    }
    v.content = ContentMemory(
        baseline=baseline,
        baseline_final_url=data.get("baseline_final_url"),
        from_reference=bool(data.get("from_reference", False)),
        baseline_count=int(data.get("baseline_count", 0)),
        dynamic=dynamic,
        variants={
            bytes.fromhex(h): Variant(first, count)
            for h, (first, count) in data.get("variants", {}).items()
        },
    )
    v.episode_opened_at = data.get("episode_opened_at")
    v.first_removed_at = data.get("first_removed_at")
