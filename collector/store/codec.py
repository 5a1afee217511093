"""A URL's fold state to and from the `url_state.memory` JSON column.

The whole `UrlFold` round-trips, so a verdict read back (after a restart, or after it left the
writer's cache) continues exactly as if it had never left memory. Queried values (state,
provider, latencies) are also columns of their own; this is the fold's private state.
"""

from __future__ import annotations

import json
from typing import Any

from collector.content import ContentMemory, Sighting, Variant
from collector.fold import Method, Removal, Track, UrlFold
from collector.method import ProbeClass, UrlState

CODEC_VERSION = 8
"""8: the load a removal's interval's upper end dates from (`UrlFold.removed_obs`,
`Variant.first_by`), in its basis. 7: the observations a verdict rests on (`Removal.basis`
and what the fold keeps to name them). A state of another version is unreadable: the URL is
refolded from its results."""


def _removal(r: Removal | None) -> list[Any] | None:
    if r is None:
        return None
    return [r.episode, r.last_present_at, r.first_removed_at, r.confirmed_at, r.latency,
            r.nxdomain, r.observed_present, r.provider, [list(b) for b in r.basis]]  # fmt: skip


def _load_removal(v: list[Any] | None) -> Removal | None:
    if v is None:
        return None
    episode, last_present, first_removed, confirmed, latency, nx, observed, provider, basis = v
    return Removal(
        episode, last_present, first_removed, confirmed, latency, nx, observed, provider,
        tuple((agent, seq) for agent, seq in basis),
    )  # fmt: skip


def _obs(v: list[int] | None) -> tuple[int, int] | None:
    return None if v is None else (v[0], v[1])


def dump_fold(f: UrlFold) -> str:
    c = f.content
    data = {
        "v": CODEC_VERSION,
        "notified_at": f.notified_at,
        "order_due": f.order_due,
        "state": f.state.value,
        "episode": f.episode,
        "opened_at": f.opened_at,
        "content": {
            "baseline": c.baseline.hex() if c.baseline else None,
            "place": c.baseline_place,
            "reference": c.from_reference,
            "dynamic": c.dynamic,
            "candidates": {
                h.hex(): [[s.agent_id, s.network, s.at] for s in seen]
                for h, seen in c.candidates.items()
            },
            "places": {h.hex(): p for h, p in c.candidate_places.items()},
            "cut": c.baseline_truncated,
            "cut_candidates": {h.hex(): t for h, t in c.candidate_truncated.items()},
            "variants": {
                h.hex(): [x.first_seen, x.count, x.first_by] for h, x in c.variants.items()
            },
        },
        "tracks": {
            str(agent): [
                t.network,
                t.last_at,
                t.gap,
                t.last_gap,
                t.witness,
                t.last_class.value if t.last_class else None,
                t.last_present_at,
                t.run,
                t.run_first_at,
                t.run_nxdomain,
                t.fresh_at,
                t.present_seq,
                t.run_seqs,
                t.fresh_seq,
            ]
            for agent, t in f.tracks.items()
        },
        "last_present_at": f.last_present_at,
        "prev_present_at": f.prev_present_at,
        "first_removed_at": f.first_removed_at,
        "first_removed_any": f.first_removed_any,
        "removal": _removal(f.removal),
        "first_removal": _removal(f.first_removal),
        "reappearances": f.reappearances,
        "provider": [f.provider, f.asn, f.cdn, f.provider_from_present],
        "newest": None if f.newest_at == float("-inf") else list(f.newest_key),
        "last_conclusive_at": f.last_conclusive_at,
        "live_until": f.live_until,
        "truncated_vs_reference": f.truncated_vs_reference,
        "last_class": f.last_class.value if f.last_class else None,
        "present_obs": [f.last_present_obs, f.prev_present_obs],
        "removed_obs": [f.removed_obs, f.removed_any_obs],
        "sighted": [[agent, at, seq] for (agent, at), seq in (f.sighted or {}).items()],
    }
    # Built afresh above, so it holds no cycle: the check would only cost time (every URL a
    # batch touches is dumped).
    return json.dumps(data, separators=(",", ":"), check_circular=False)


class UnreadableState(ValueError):
    """A stored fold state this version cannot read (older codec, or damaged): refold the URL."""


def load_fold(text: str, method: Method) -> UrlFold:
    """The fold a state was dumped from; UnreadableState if it is of another codec version
    or damaged (not JSON, or JSON that is not a state of this version: a field missing or of
    the wrong kind)."""
    try:
        d: dict[str, Any] = json.loads(text)
    except (ValueError, TypeError) as exc:
        raise UnreadableState(f"fold state is not JSON: {exc}") from exc
    if not isinstance(d, dict) or d.get("v") != CODEC_VERSION:
        raise UnreadableState("fold state from another codec version")
    try:
        return _decode(d, method)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        raise UnreadableState(f"fold state damaged: {exc!r}") from exc


def _decode(d: dict[str, Any], method: Method) -> UrlFold:
    c = d["content"]
    content = ContentMemory(
        baseline=bytes.fromhex(c["baseline"]) if c["baseline"] else None,
        baseline_place=c["place"],
        from_reference=c["reference"],
        dynamic=c["dynamic"],
        candidates={
            bytes.fromhex(h): [Sighting(a, n, at) for a, n, at in seen]
            for h, seen in c["candidates"].items()
        },
        candidate_places={bytes.fromhex(h): p for h, p in c["places"].items()},
        baseline_truncated=c["cut"],
        candidate_truncated={bytes.fromhex(h): t for h, t in c["cut_candidates"].items()},
        variants={
            bytes.fromhex(h): Variant(first, n, _obs(by))
            for h, (first, n, by) in c["variants"].items()
        },
    )
    tracks = {
        int(agent): Track(
            net,
            last_at,
            gap,
            last_gap,
            witness,
            ProbeClass(cls) if cls else None,
            present,
            run,
            run_first,
            nx,
            fresh,
            present_seq,
            tuple(run_seqs) if run_seqs else (),
            fresh_seq,
        )
        for agent, (
            net,
            last_at,
            gap,
            last_gap,
            witness,
            cls,
            present,
            run,
            run_first,
            nx,
            fresh,
            present_seq,
            run_seqs,
            fresh_seq,
        ) in d["tracks"].items()
    }
    provider, asn, cdn, from_present = d["provider"]
    last_present_obs, prev_present_obs = d["present_obs"]
    removed_obs, removed_any_obs = d["removed_obs"]
    first_removal = _load_removal(d["first_removal"])
    # Usually the first episode's: one object, as in the fold that was dumped.
    removal = first_removal if d["removal"] == d["first_removal"] else _load_removal(d["removal"])
    newest = d["newest"]
    return UrlFold(
        method=method,
        notified_at=d["notified_at"],
        order_due=d["order_due"],
        state=UrlState(d["state"]),
        episode=d["episode"],
        opened_at=d["opened_at"],
        content=content,
        tracks=tracks,
        last_present_at=d["last_present_at"],
        prev_present_at=d["prev_present_at"],
        first_removed_at=d["first_removed_at"],
        first_removed_any=d["first_removed_any"],
        removal=removal,
        first_removal=first_removal,
        reappearances=d["reappearances"],
        provider=provider,
        asn=asn,
        cdn=cdn,
        provider_from_present=from_present,
        newest_key=(float("-inf"), 0, 0, 0) if newest is None else tuple(newest),
        last_conclusive_at=d["last_conclusive_at"],
        live_until=d["live_until"],
        truncated_vs_reference=d["truncated_vs_reference"],
        last_class=ProbeClass(d["last_class"]) if d["last_class"] else None,
        last_present_obs=_obs(last_present_obs),
        prev_present_obs=_obs(prev_present_obs),
        removed_obs=_obs(removed_obs),
        removed_any_obs=_obs(removed_any_obs),
        sighted={(agent, at): seq for agent, at, seq in d["sighted"]} or None,
    )
