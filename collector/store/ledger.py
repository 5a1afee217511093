"""The verdict projection's reads and writes in SQL (collector.projection.Ledger).

A URL's fold lives in memory (collector.projection); what it decided is written here: its
url_state row (a checkpoint, with how many results it covers), its episodes, its timeline
(url_events), the reappearance log, and each verdict as a leaf of the evidence log. Every
method runs in the caller's transaction.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from collector.evidence import leaves as ev
from collector.fold import (
    Event,
    Notice,
    Observation,
    ProviderChange,
    Reappearance,
    Removal,
    Renotified,
    StateChange,
    UrlFold,
)
from collector.projection import Checkpoint, StoredState, UrlEntry
from collector.schedule import Planner
from collector.store.codec import UnreadableState, dump_fold, load_fold
from collector.store.evidence import EvidenceLog
from collector.store.model import StoreError
from collector.store.sql import Connection

_SAVE_STATE = (
    "UPDATE url_state SET state = ?, baseline = ?, provider = ?, asn = ?, cdn = ?,"
    " dynamic = ?, episode = ?, last_present_at = ?, removal_last_present_at = ?,"
    " removal_first_removed_at = ?, removal_confirmed_at = ?, removal_latency = ?,"
    " removal_nxdomain = ?, removal_observed_present = ?, removed_at = ?, reappearances = ?,"
    " memory = ?, method = ?, opened_at = ?, live_until = ?, last_conclusive_at = ?,"
    " first_provider = ?, truncated_vs_reference = ?, notified_at = ?, updated_at = ?,"
    " folded = ? WHERE url_id = ?"
)
OBSERVATION_COLUMNS = (
    "r.agent_id, a.network, r.started_at, r.status, r.error, r.sha256, r.final_url,"
    " r.challenge, r.truncated, r.seq, r.provider, r.asn, r.cdn"
    " FROM results r JOIN agents a ON a.id = r.agent_id"
)
_OBSERVATIONS = (
    f"SELECT {OBSERVATION_COLUMNS} WHERE r.url_id = ? ORDER BY r.started_at, r.agent_id, r.seq"
)
# Results stored after the last flush's marks (see Projection._after_checkpoint), of the URLs
# in {marks}.
_AFTER_MARKS = (
    f"SELECT r.url_id, {OBSERVATION_COLUMNS} WHERE r.url_id IN ({{marks}}) AND r.seq >"
    " COALESCE((SELECT m.seq FROM fold_marks m WHERE m.agent_id = r.agent_id), -1)"
    " ORDER BY r.url_id, r.started_at, r.agent_id, r.seq"
)
_HISTORY_KINDS = ("state", "removal", "reappearance", "provider", "renotified")
_KIND_MARKS = ",".join("?" * len(_HISTORY_KINDS))
_CHUNK = 500  # ids per IN (...) list


def observation_of_row(row: Sequence[Any]) -> Observation:
    """A result row of OBSERVATION_COLUMNS as the fold reads it."""
    (agent, network, at, status, error, sha, final, challenge, truncated, seq, provider, asn,
     cdn) = row  # fmt: skip
    return Observation(agent, network, at, status, error, sha or b"", final, bool(challenge),
                       bool(truncated), seq, provider, asn, bool(cdn))  # fmt: skip


def _chunks(url_ids: Sequence[int]) -> Iterator[tuple[Sequence[int], str]]:
    """`url_ids` in pieces for `IN (...)`, each with its placeholders."""
    for i in range(0, len(url_ids), _CHUNK):
        chunk = url_ids[i : i + _CHUNK]
        yield chunk, ",".join("?" * len(chunk))


def _state_row(url_id: int, entry: UrlEntry, now: float, checkpoint: bool) -> tuple[Any, ...]:
    """The parameters of _SAVE_STATE for one URL's fold. Only a `checkpoint` (a flush, or a
    state written with its batch) records how many results it folded: a restart resumes from
    it (see Projection._resume); other writes record -1, and a restart refolds such a URL."""
    f = entry.fold
    first = f.first_removal
    first_provider = first.provider if first and first.provider else entry.provider
    return (f.state.value, f.content.baseline, entry.provider, entry.asn, int(entry.cdn),
            int(f.content.dynamic), f.episode, f.last_present_at,
            first.last_present_at if first else None, first.first_removed_at if first else None,
            first.confirmed_at if first else None, first.latency if first else None,
            int(first.nxdomain) if first else 0, int(first.observed_present) if first else 1,
            f.removed_at, f.reappearances, dump_fold(f), f.method.version, f.opened_at,
            f.live_until, f.last_conclusive_at, first_provider, f.truncated_vs_reference,
            entry.first_notice, now, entry.folded if checkpoint else -1, url_id)  # fmt: skip


def us(seconds: float) -> int:
    """Seconds as the evidence log's integer microseconds."""
    return round(seconds * 1_000_000)


class SqlLedger:
    """collector.projection.Ledger on the collector's SQLite connection, and the verdict
    leaves of the evidence log (when there is one)."""

    def __init__(
        self,
        conn: Connection,
        method: Any,  # collector.fold.Method
        planner: Planner,
        evidence: EvidenceLog | None,
        cache_urls: int,
    ) -> None:
        self.conn = conn
        self.method = method
        self.planner = planner
        self.evidence = evidence
        self._cache_urls = cache_urls
        self.url_hashes: dict[int, bytes] = {}
        # With shard leases (PostgreSQL): whether this collector folds a URL.
        self.owns: Callable[[int], bool] | None = None
        # A verdict leaf was appended in this transaction: the store signs a checkpoint with it.
        self.verdict_logged = False

    # -- reads -------------------------------------------------------------------------------------

    def states(self, url_ids: Sequence[int], active_only: bool) -> list[StoredState]:
        active = " AND u.active = 1" if active_only else ""
        out = []
        for i in range(0, len(url_ids), _CHUNK):
            chunk = url_ids[i : i + _CHUNK]
            marks = ",".join("?" * len(chunk))
            for (url_id, memory, provider, asn, cdn, origin_ip, method, created, notified,
                 folded) in self.conn.execute(
                "SELECT s.url_id, s.memory, s.provider, s.asn, s.cdn, s.origin_ip, s.method,"
                " u.created_at, s.notified_at, s.folded"
                " FROM url_state s JOIN urls u ON u.id = s.url_id"
                f" WHERE s.url_id IN ({marks}){active}",
                chunk,
            ).fetchall():  # fmt: skip
                fold, unreadable = self._fold(memory, method)
                out.append(StoredState(url_id, fold, unreadable, provider, asn, bool(cdn),
                                       origin_ip, created, notified, folded))  # fmt: skip
        return out

    def _fold(self, memory: str, method: str) -> tuple[UrlFold | None, str | None]:
        """A stored fold state, None if another method made it, (None, why) if unreadable."""
        if method != self.method.version:
            return None, None
        try:
            return load_fold(memory, self.method), None
        except UnreadableState as exc:
            return None, str(exc)

    def checkpoint(self, url_id: int, with_fold: bool) -> Checkpoint | None:
        columns = "folded, method, memory" if with_fold else "folded, method, NULL"
        row = self.conn.execute(
            f"SELECT {columns} FROM url_state WHERE url_id = ?", (url_id,)
        ).fetchone()
        if row is None:
            return None
        fold = self._fold(row[2], row[1])[0] if with_fold else None
        return Checkpoint(int(row[0]), str(row[1]), fold)

    def notices(self, url_id: int) -> list[Notice]:
        return [
            Notice(at, sha256, self.planner.order_due(order_at, deadline))
            for at, sha256, order_at, deadline in self.conn.execute(
                "SELECT notified_at, sha256, order_issued_at, order_deadline FROM reports"
                " WHERE url_id = ? ORDER BY notified_at, id",
                (url_id,),
            )
        ]

    def observations(self, url_id: int) -> list[Observation]:
        """The URL's stored results in event order."""
        return [observation_of_row(row) for row in self.conn.execute(_OBSERVATIONS, (url_id,))]

    def checkpoints(self, url_ids: Sequence[int]) -> dict[int, Checkpoint]:
        out = {}
        for chunk, marks in _chunks(url_ids):
            for url_id, folded, method in self.conn.execute(
                f"SELECT url_id, folded, method FROM url_state WHERE url_id IN ({marks})", chunk
            ):
                out[url_id] = Checkpoint(int(folded), str(method))
        return out

    def result_counts(self, url_ids: Sequence[int]) -> dict[int, int]:
        out = {}
        for chunk, marks in _chunks(url_ids):
            for url_id, n in self.conn.execute(
                f"SELECT url_id, COUNT(*) FROM results WHERE url_id IN ({marks}) GROUP BY url_id",
                chunk,
            ):
                out[url_id] = int(n)
        return out

    def observations_after_marks(self, url_ids: Sequence[int]) -> dict[int, list[Observation]]:
        """Each URL's results stored after the last flush's marks, in event order."""
        out: dict[int, list[Observation]] = {}
        for chunk, marks in _chunks(url_ids):
            for url_id, *row in self.conn.execute(_AFTER_MARKS.format(marks=marks), chunk):
                out.setdefault(url_id, []).append(observation_of_row(row))
        return out

    def refolds_pending(self) -> list[int]:
        ids = self.conn.execute("SELECT url_id FROM url_state WHERE refold_pending = 1")
        return [u for (u,) in ids if self.owns is None or self.owns(u)]

    def unflushed(self) -> list[int]:
        ids = self.conn.execute("SELECT url_id FROM unflushed ORDER BY 1")
        return [u for (u,) in ids if self.owns is None or self.owns(u)]

    # -- writes ------------------------------------------------------------------------------------

    def save_states(
        self, entries: Sequence[tuple[int, UrlEntry]], now: float, checkpoint: bool
    ) -> None:
        self.conn.executemany(_SAVE_STATE, [_state_row(u, e, now, checkpoint) for u, e in entries])

    def checkpoint_all(
        self, entries: Sequence[tuple[int, UrlEntry]], behind: Iterable[int], now: float
    ) -> None:
        """A flush: these states as checkpoints, covering every result stored so far, i.e. up
        to each agent's highest seq (see Projection._resume); only the URLs `behind` (whose
        url_state a rollback left older than their results) stay unflushed."""
        self.save_states(entries, now, True)
        self.conn.execute(
            "INSERT INTO fold_marks (agent_id, seq) SELECT a.id,"
            " (SELECT MAX(r.seq) FROM results r WHERE r.agent_id = a.id) FROM agents a"
            " WHERE EXISTS (SELECT 1 FROM results r WHERE r.agent_id = a.id)"
            " ON CONFLICT (agent_id) DO UPDATE SET seq = excluded.seq"
        )
        self.conn.execute("DELETE FROM unflushed")
        self.conn.executemany("INSERT INTO unflushed (url_id) VALUES (?)", [(u,) for u in behind])

    def mark_unflushed(self, url_ids: Sequence[int]) -> None:
        self.conn.executemany(
            "INSERT INTO unflushed (url_id) VALUES (?) ON CONFLICT DO NOTHING",
            [(u,) for u in url_ids],
        )

    def unmark_unflushed(self, url_id: int) -> None:
        self.conn.execute("DELETE FROM unflushed WHERE url_id = ?", (url_id,))

    def mark_refold(self, url_ids: Sequence[int], pending: bool) -> None:
        self.conn.executemany(
            "UPDATE url_state SET refold_pending = ? WHERE url_id = ?",
            [(int(pending), u) for u in url_ids],
        )

    def append_history(self, url_id: int, entry: UrlEntry, events: Sequence[Event]) -> None:
        """Write what the fold reported: episodes, the timeline, the reappearance log, and the
        verdicts in the evidence log."""
        c = self.conn
        for event in events:
            if isinstance(event, Removal):
                c.execute(
                    "UPDATE episodes SET last_present_at = ?, first_removed_at = ?,"
                    " confirmed_at = ?, latency = ?, nxdomain = ?, observed_present = ?,"
                    " provider = ? WHERE url_id = ? AND episode = ?",
                    (event.last_present_at, event.first_removed_at, event.confirmed_at,
                     event.latency, int(event.nxdomain), int(event.observed_present),
                     event.provider or entry.provider, url_id, event.episode),
                )  # fmt: skip
                self.log_verdict(
                    url_id, ev.VerdictEvent.REMOVAL_CONFIRMED, entry.fold.method.version,
                    event.episode, event.confirmed_at, event.last_present_at or 0.0,
                    event.first_removed_at, basis=event.basis,
                )  # fmt: skip
                self._event(url_id, event.confirmed_at, "removal", {
                    "episode": event.episode, "last_present_at": event.last_present_at,
                    "first_removed_at": event.first_removed_at, "latency": event.latency,
                    "nxdomain": event.nxdomain, "observed_present": event.observed_present,
                    "method": entry.fold.method.version})  # fmt: skip
            elif isinstance(event, Reappearance | Renotified):
                kind = "reappearance" if isinstance(event, Reappearance) else "renotified"
                c.execute(
                    "INSERT INTO episodes (url_id, episode, opened_at, provider, opened_by)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (url_id, event.episode, event.at, event.provider or entry.provider, kind),
                )
                if isinstance(event, Reappearance):
                    self.log_verdict(
                        url_id, ev.VerdictEvent.REAPPEARANCE, entry.fold.method.version,
                        event.episode, event.at, event.at, 0.0, basis=event.basis,
                    )  # fmt: skip
                    c.execute(
                        "INSERT INTO reappearance_log (url_id, episode, provider, at)"
                        " VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
                        (url_id, event.episode, event.provider or entry.provider, event.at),
                    )
                self._event(url_id, event.at, kind, {"episode": event.episode})
            elif isinstance(event, StateChange):
                self._event(url_id, event.at, "state", {"from": event.old, "to": event.new})
            elif isinstance(event, ProviderChange):
                self._event(url_id, event.at, "provider", {"from": event.old, "to": event.new})

    def rewrite_history(
        self, url_id: int, entry: UrlEntry, base: UrlFold, events: Sequence[Event]
    ) -> None:
        """Replace the history written since `base` (the fold before them) with `events`."""
        self.conn.execute(
            f"DELETE FROM url_events WHERE url_id = ? AND at > ? AND kind IN ({_KIND_MARKS})",
            (url_id, base.newest_at, *_HISTORY_KINDS),
        )
        self.conn.execute(
            "DELETE FROM episodes WHERE url_id = ? AND episode > ?", (url_id, base.episode)
        )
        r = base.removal
        self.conn.execute(
            "UPDATE episodes SET last_present_at = ?, first_removed_at = ?, confirmed_at = ?,"
            " latency = ?, nxdomain = ?, observed_present = ? WHERE url_id = ? AND episode = ?",
            (r.last_present_at if r else None, r.first_removed_at if r else None,
             r.confirmed_at if r else None, r.latency if r else None,
             int(r.nxdomain) if r else 0, int(r.observed_present) if r else 1,
             url_id, base.episode),
        )  # fmt: skip
        self.append_history(url_id, entry, events)

    def replace_history(
        self, url_id: int, entry: UrlEntry, opened_at: float, events: Sequence[Event]
    ) -> None:
        """Replace the URL's whole history (a refold from scratch) with `events`."""
        self.conn.execute("DELETE FROM episodes WHERE url_id = ?", (url_id,))
        self.conn.execute(
            f"DELETE FROM url_events WHERE url_id = ? AND kind IN ({_KIND_MARKS})",
            (url_id, *_HISTORY_KINDS),
        )
        self.conn.execute(
            "INSERT INTO episodes (url_id, episode, opened_at) VALUES (?, 1, ?)",
            (url_id, opened_at),
        )
        self.append_history(url_id, entry, events)

    def _event(self, url_id: int, at: float, kind: str, detail: dict[str, Any]) -> None:
        self.conn.execute(
            "INSERT INTO url_events (url_id, at, kind, detail) VALUES (?, ?, ?, ?)",
            (url_id, at, kind, json.dumps(detail, separators=(",", ":"))),
        )

    # -- the evidence log's verdicts ---------------------------------------------------------------

    def _leaves(self, basis: Sequence[tuple[int, int]]) -> tuple[int, ...]:
        """The observation leaves of these stored results, in log order."""
        found = []
        for agent_id, seq in basis:
            row = self.conn.execute(
                "SELECT leaf FROM results WHERE agent_id = ? AND seq = ?", (agent_id, seq)
            ).fetchone()
            if row is not None and row[0] is not None:
                found.append(int(row[0]))
        return tuple(sorted(set(found)))

    def url_sha256(self, url_id: int) -> bytes:
        digest = self.url_hashes.get(url_id)
        if digest is None:
            row = self.conn.execute("SELECT url FROM urls WHERE id = ?", (url_id,)).fetchone()
            if row is None:
                raise StoreError(f"URL id {url_id} is not known")
            if len(self.url_hashes) >= self._cache_urls:
                self.url_hashes.clear()
            digest = self.url_hashes[url_id] = ev.url_sha256(str(row[0]))
        return digest

    def log_verdict(
        self, url_id: int, kind: ev.VerdictEvent, method: str, episode: int, decided: float,
        last_present: float, first_removed: float, deadline: float = 0.0,
        deadline_at: float = 0.0, basis: Sequence[tuple[int, int]] = (),
    ) -> None:  # fmt: skip
        """A verdict leaf, unless the log holds this very verdict already. `basis` names the
        stored results it rests on, as (agent id, seq); the leaf names their observation
        leaves (results stored before the log had a key have none).

        A refold writes a URL's history again; a verdict it decides again, with the same
        times and method, is already in the log. One that differs is logged: the log keeps
        what was decided when, and a bundle shows the latest verdict of each episode. A
        deadline verdict is logged once per episode and deadline.
        """
        if self.evidence is None:
            return
        if kind is ev.VerdictEvent.DEADLINE_PASSED:
            key = f"{kind.value}|{episode}|{us(deadline_at)}|{round(deadline)}"
        else:
            key = f"{kind.value}|{episode}|{us(last_present)}|{us(first_removed)}|{method}"
        inserted = self.conn.execute(
            "INSERT INTO log_verdicts (url_id, key) VALUES (?, ?) ON CONFLICT DO NOTHING",
            (url_id, key),
        ).rowcount
        if not inserted:
            return
        self.evidence.append(
            ev.VerdictLeaf(
                url_sha256=self.url_sha256(url_id), event=kind, method=method,
                decided_at_us=us(decided), episode=episode, last_present_us=us(last_present),
                first_removed_us=us(first_removed), deadline_seconds=round(deadline),
                deadline_at_us=us(deadline_at), basis=self._leaves(basis),
                url_prev=self.evidence.head(url_id),
            ),
            url_id,
        )  # fmt: skip
        self.verdict_logged = True
