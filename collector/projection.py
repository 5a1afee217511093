"""The verdict projection: each watched URL's fold, kept in memory, written behind.

A verdict is a pure function of a URL's notices and its stored results in event order
(collector.fold). This module keeps those folds for the URLs agents probe and decides how each
new result reaches its URL's fold: appended to the fold's tail, inserted within it (a little
late), or, older than the tail, left for a refold from the stored results once REFOLD_DELAY has
passed, so that a spool delivered in many batches costs one refold rather than one per batch. A
refold starts from the URL's last checkpoint where that provably equals a refold from scratch.

It runs no SQL and reads no clock: everything it reads or writes goes through a `Ledger`
(collector.store.ledger implements it in SQL), and every time it uses is passed in. The caller
holds the transaction: a rollback must be followed by `forget` (and `reload_pending`), so the
folds in memory never run ahead of what is stored.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from collector.fold import (
    Event,
    Method,
    Notice,
    Observation,
    OutOfOrder,
    Tail,
    UrlFold,
    classify,
    event_order,
    refold,
)
from collector.method import Policy, ProbeClass, UrlState
from collector.schedule import Planner

log = logging.getLogger(__name__)

# URLs whose verdicts stay in memory: about 6 KB each with ten agents (bench scale).
CACHE_URLS = 100_000
# URLs that also keep a `Tail` (a second fold, a snapshot and up to TAIL_LENGTH observations:
# about 6.5 KB more with ten agents), the most recently folded: a result a little older than
# one already folded is inserted without a reread. Beyond them a URL keeps its fold only, and
# such a result is refolded from its stored results (see fold). Cache and tails together stay
# under 1 GB with a million URLs and ten agents.
TAIL_URLS = 30_000
# How long a URL that got a result older than its tail waits for its refold (see fold).
REFOLD_DELAY = 2.0
# Seconds of late refolds one writer transaction does at most (always at least one URL): a
# refold reads a URL's whole history, and after an outage every URL of a network may be due,
# seconds of work that would hold back every ack. The rest waits for the next transaction.
REFOLD_BUDGET = 0.1
# A result probed this long before its URL was reported cannot be one of ours.
ANCIENT_SLACK = 86400.0


@dataclass(slots=True)
class UrlEntry:
    """A URL's fold and what the projection keeps beside it."""

    fold: UrlFold
    provider: str
    asn: int | None
    cdn: bool
    origin_ip: str | None
    created_at: float
    first_notice: float
    tail: Tail | None = None  # recent observations, in memory only (see fold.Tail)
    folded: int = -1  # stored results folded into `fold` (-1: not known)


@dataclass(slots=True)
class StoredState:
    """A URL's url_state row as the ledger read it. `fold` is None where the row's method is
    not this one, or its state could not be read (`unreadable` says why)."""

    url_id: int
    fold: UrlFold | None
    unreadable: str | None
    provider: str
    asn: int | None
    cdn: bool
    origin_ip: str | None
    created_at: float
    notified_at: float
    folded: int


@dataclass(slots=True)
class Checkpoint:
    """What a URL's url_state row covers: `folded` results (-1: unknown) by `method`; its fold
    when asked for and readable."""

    folded: int
    method: str
    fold: UrlFold | None = None


class Ledger(Protocol):
    """What the projection reads and writes: the store's side, in one transaction held by the
    caller."""

    def states(self, url_ids: Sequence[int], active_only: bool) -> list[StoredState]: ...
    def checkpoint(self, url_id: int, with_fold: bool) -> Checkpoint | None: ...
    def notices(self, url_id: int) -> list[Notice]: ...
    def observations(self, url_id: int) -> list[Observation]: ...
    def checkpoints(self, url_ids: Sequence[int]) -> dict[int, Checkpoint]: ...
    def result_counts(self, url_ids: Sequence[int]) -> dict[int, int]: ...
    def observations_after_marks(self, url_ids: Sequence[int]) -> dict[int, list[Observation]]: ...
    def refolds_pending(self) -> list[int]: ...
    def unflushed(self) -> list[int]: ...

    def append_history(self, url_id: int, entry: UrlEntry, events: Sequence[Event]) -> None: ...
    def rewrite_history(
        self, url_id: int, entry: UrlEntry, base: UrlFold, events: Sequence[Event]
    ) -> None: ...
    def replace_history(
        self, url_id: int, entry: UrlEntry, opened_at: float, events: Sequence[Event]
    ) -> None: ...
    def save_states(
        self, entries: Sequence[tuple[int, UrlEntry]], now: float, checkpoint: bool
    ) -> None: ...
    def checkpoint_all(
        self, entries: Sequence[tuple[int, UrlEntry]], behind: Iterable[int], now: float
    ) -> None: ...
    def mark_unflushed(self, url_ids: Sequence[int]) -> None: ...
    def unmark_unflushed(self, url_id: int) -> None: ...
    def mark_refold(self, url_ids: Sequence[int], pending: bool) -> None: ...


@dataclass(slots=True)
class Folded:
    """One batch folded in memory, to be recorded (see Projection.record) after its results
    are stored. `classes[i]` is the class of the batch's i-th observation as stored."""

    entries: dict[int, UrlEntry]
    classes: list[ProbeClass] = field(default_factory=list)
    history: dict[int, list[Event]] = field(default_factory=dict)  # events to append, per URL
    rewrite: set[int] = field(default_factory=set)  # URLs whose events since the base changed
    late: set[int] = field(default_factory=set)  # URLs to refold from the stored results


def refusal(url_id: int, created_at: float | None, started_at: float) -> str | None:
    """Why a result for `url_id` (watched since `created_at`, None: not watched) probed at
    `started_at` is refused, or None: the rule for a fold and for a result queued for
    another collector's fold alike."""
    if created_at is None:
        return f"URL id {url_id} is unknown or no longer watched"
    if started_at < created_at - ANCIENT_SLACK:
        return f"started_at {started_at:.0f} is before URL id {url_id} was reported"
    return None


class Projection:
    """Each active URL's fold, in an LRU cache, with write-behind of its url_state row.

    `flush_every` > 0: a batch's folds are marked unflushed and written (a checkpoint) by
    `flush`; 0: written with their batch. `_dirty` holds the unflushed folds (the cache may
    drop them, these stay); `_stale` the URLs whose fold in memory a rollback lost while their
    url_state row is behind, refolded on next use; `_pending` the late URLs waiting for a
    refold, with the time they became late.
    """

    def __init__(
        self,
        ledger: Ledger,
        method: Method,
        min_vantage_points: int,
        cache_urls: int = CACHE_URLS,
        flush_every: float = 0.0,
        timer: Callable[[], float] = time.monotonic,
        tail_urls: int = TAIL_URLS,
    ) -> None:
        self.ledger = ledger
        self.method = method
        self.min_vantage_points = min_vantage_points
        self.entries: OrderedDict[int, UrlEntry] = OrderedDict()
        self.cache_urls = cache_urls
        self.tail_urls = tail_urls
        self._tails: OrderedDict[int, None] = OrderedDict()  # URLs with a tail, oldest first
        self.flush_every = flush_every
        self.refold_budget = REFOLD_BUDGET
        self.timer = timer
        self.last_now = 0.0
        self._pending: dict[int, float] = {}
        self._dirty: dict[int, UrlEntry] = {}
        self._stale: set[int] = set()
        self.flushed_at = 0.0

    # -- what the store asks about ---------------------------------------------------------------

    def networks_at(self, _at: float) -> int:
        """Networks the fold counts as deployed: `min_vantage_points`, whoever said hello.

        A collector cannot know which agents are still to come: counting only those that said
        hello would let the first agent to start decide alone (its 451s would be a removal).
        A single-network deployment says so with `--min-vantage-points 1`.
        """
        return self.min_vantage_points

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def dirty(self) -> int:
        return len(self._dirty)

    @property
    def stale(self) -> bool:
        return bool(self._stale)

    # -- a batch ----------------------------------------------------------------------------------

    def admit(self, url_id: int, started_at: float, entries: dict[int, UrlEntry]) -> str | None:
        """Why a result for `url_id` probed at `started_at` is refused, or None."""
        entry = entries.get(url_id)
        return refusal(url_id, None if entry is None else entry.created_at, started_at)

    def fold(
        self, entries: dict[int, UrlEntry], batch: Sequence[tuple[int, Observation]]
    ) -> Folded:
        """Fold a batch's observations (in the order given) into their URLs' folds."""
        out = Folded(entries)
        for url_id, obs in batch:
            entry = entries[url_id]
            cls = classify(obs, self.method.policy) or ProbeClass.INCONCLUSIVE
            if url_id not in out.late:
                if entry.tail is None:
                    entry.tail = Tail.of(entry.fold)
                self._tails[url_id] = None
                self._tails.move_to_end(url_id)
                try:
                    events, changed = entry.tail.add(obs, self.networks_at(obs.at))
                except OutOfOrder:
                    out.late.add(url_id)
                else:
                    entry.fold = entry.tail.head
                    if entry.folded >= 0:
                        entry.folded += 1
                    out.history.setdefault(url_id, []).extend(events)
                    if changed:
                        out.rewrite.add(url_id)
                    else:
                        cls = entry.fold.last_class or cls
            out.classes.append(cls)
        return out

    def record(self, folded: Folded, now: float) -> None:
        """Write what a batch's fold reported, once its results are stored."""
        entries, history, late = folded.entries, folded.history, folded.late
        for url_id in late:
            history.pop(url_id, None)
            self._pending.setdefault(url_id, now)
        for url_id, events in history.items():
            entry = entries[url_id]
            if url_id in folded.rewrite:
                self._rewrite_tail(url_id, entry)
            else:
                self.ledger.append_history(url_id, entry, events)
                _adopt_provider(entry)
        if late:
            self.ledger.mark_refold(sorted(late), True)
        for url_id in history:
            tail = entries[url_id].tail
            if tail is not None:
                tail.trim(self.networks_at(now))
        self._drop_tails()
        if self.flush_every <= 0:
            self.ledger.save_states([(u, entries[u]) for u in sorted(history)], now, True)
        else:
            self.ledger.mark_unflushed([u for u in history if u not in self._dirty])
            for u in history:
                self._dirty[u] = entries[u]

    def _drop_tails(self) -> None:
        """Beyond `tail_urls`, the least recently folded URLs keep their fold only (a batch's
        events are written by now, so a tail holds nothing that is not stored)."""
        while len(self._tails) > self.tail_urls:
            url_id, _ = self._tails.popitem(last=False)
            entry = self.entries.get(url_id) or self._dirty.get(url_id)
            if entry is not None:
                entry.tail = None

    def _rewrite_tail(self, url_id: int, entry: UrlEntry) -> None:
        tail = entry.tail
        assert tail is not None
        self.ledger.rewrite_history(url_id, entry, tail.base, tail.events)
        _adopt_provider(entry)

    # -- the folds in memory -----------------------------------------------------------------------

    def load(
        self, url_ids: Iterable[int], active_only: bool = True, refolded: set[int] | None = None
    ) -> dict[int, UrlEntry]:
        """The folds of those of `url_ids` that agents are assigned; others get no entry.

        Every agent is assigned every active URL (the quorum needs all vantage points), so an
        unknown id, or a URL retired since (after its watch period), is not assigned and its
        results are refused, never stored. The cache holds active URLs only (`retire` drops
        the ones the plan retires), so only the ids missing from it are read. A fold state
        this method cannot read is refolded from the stored results (its id added to
        `refolded`).
        """
        cached = self.entries
        out: dict[int, UrlEntry] = {}
        missing: list[int] = []
        for u in url_ids:
            entry = cached.get(u) or self._dirty.get(u)
            if u in self._stale:
                # Its url_state is behind what was committed (see flush): refold it.
                self.refold([u], self.last_now)
                entry = self._dirty.get(u) or cached.get(u)
            if entry is None:
                missing.append(u)
            else:
                out[u] = entry
                cached[u] = entry
                cached.move_to_end(u)
        for s in self.ledger.states(missing, active_only) if missing else ():
            stale = s.fold is None  # another method (an upgrade: refolded quietly), or damaged
            if s.unreadable is not None:
                log.warning("fold_state_unreadable url_id=%d reason=%s: refolded from"
                            " its stored results", s.url_id, s.unreadable)  # fmt: skip
            fold = s.fold or UrlFold.start(Notice(s.notified_at), self.method)
            entry = UrlEntry(fold, s.provider, s.asn, s.cdn, s.origin_ip, s.created_at,
                             s.notified_at, folded=s.folded)  # fmt: skip
            if stale:
                self.refold([s.url_id], 0.0, {s.url_id: entry})
                if refolded is not None:
                    refolded.add(s.url_id)
            out[s.url_id] = entry
            if active_only:
                cached[s.url_id] = entry
        while len(cached) > self.cache_urls:
            cached.popitem(last=False)
        return out

    def retire(self, url_ids: Iterable[int]) -> None:
        """URLs no longer watched: out of the cache (see load)."""
        for url_id in url_ids:
            self.entries.pop(url_id, None)

    def forget(self, url_ids: Iterable[int] | None = None) -> None:
        """After a rollback: drop the folds it touched (all, without `url_ids`). Their next use
        reads them back as committed, or refolds them if url_state is behind."""
        touched = set(url_ids) if url_ids is not None else {*self.entries, *self._dirty}
        for url_id in touched:
            self.entries.pop(url_id, None)
            if self._dirty.pop(url_id, None) is not None:
                self._stale.add(url_id)

    def dirty_ids(self) -> list[int]:
        return list(self._dirty)

    def drop_pending(self, which: Callable[[int], bool]) -> None:
        """Forget the due refolds of URLs another collector now folds."""
        for url_id in [u for u in self._pending if which(u)]:
            del self._pending[url_id]

    def adopt_pending(self, url_ids: Iterable[int], now: float) -> None:
        """Refolds the ledger lists (another collector asked for them): due from `now`."""
        for url_id in url_ids:
            self._pending.setdefault(url_id, now)

    def reload_pending(self) -> None:
        """At start, and after a rollback: the late URLs are those the ledger lists."""
        self._pending = dict.fromkeys(self.ledger.refolds_pending(), 0.0)

    # -- refolds -----------------------------------------------------------------------------------

    def refold(
        self, url_ids: Sequence[int], now: float, entries: dict[int, UrlEntry] | None = None
    ) -> list[tuple[int, UrlState, UrlState]]:
        """Recompute URLs from their stored notices and results; rewrite their history.

        Returns (url id, state before, state after) of each URL refolded.
        """
        changed = []
        for url_id in url_ids:
            self._stale.discard(url_id)  # refolded from what was committed, whatever memory held
            entry = (entries or {}).get(url_id) or self.load([url_id], active_only=False).get(
                url_id
            )
            if entry is None:
                continue
            before = entry.fold.state
            notices = self.ledger.notices(url_id)
            if not notices:
                continue
            observations = self.ledger.observations(url_id)
            fold, events = refold(notices, observations, self.method, self.networks_at)
            entry.fold, entry.tail, entry.folded = fold, None, len(observations)
            if self._pending.pop(url_id, None) is not None:
                self.ledger.mark_refold([url_id], False)
            self.ledger.replace_history(url_id, entry, notices[0].at, events)
            _adopt_provider(entry)
            # Not a checkpoint (see Ledger.save_states): the next flush writes it as one.
            self.ledger.save_states([(url_id, entry)], now, False)
            if self.flush_every > 0:
                # Dirty until that flush, so listed as unflushed meanwhile: a URL in `_dirty`
                # is one the ledger lists (record marks only those not in it). A crash before
                # the flush then refolds it at start (its row is no checkpoint).
                self.ledger.mark_unflushed([url_id])
                self._dirty[url_id] = entry
            else:
                self.ledger.unmark_unflushed(url_id)
            changed.append((url_id, before, fold.state))
        return changed

    def refold_all(
        self, url_ids: Sequence[int], now: float
    ) -> list[tuple[int, UrlState, UrlState]]:
        """`takedown-collector refold`: every one of `url_ids` from scratch, nothing cached."""
        self.entries.clear()
        return self.refold(url_ids, now)

    def renotified(self, url_id: int, now: float) -> None:
        """A new report for a known URL: refold it with the new notice."""
        self.entries.pop(url_id, None)
        self.refold([url_id], now)

    def refold_stale(self) -> None:
        """Refold what a rollback left behind (see forget)."""
        if self._stale:
            self.refold(sorted(self._stale), self.last_now)

    def refold_pending(self, now: float, budget: float | None, everything: bool = False) -> None:
        """Refold the late URLs once they waited REFOLD_DELAY (`everything`: all of them), the
        longest waiting first, for at most `budget` seconds (None: no limit); what is left
        stays due for the next call.

        A spool delivered late arrives in many batches; refolding its URLs from the stored
        results after each would cost a read of their whole history per batch. Meanwhile the
        late results are stored, the URL's newer ones keep folding, and the ledger lists the
        URL as due for a refold (done at start after a crash).
        """
        self.last_now = max(self.last_now, now)
        due = sorted(
            (since, u)
            for u, since in self._pending.items()
            if everything or now - since >= REFOLD_DELAY
        )
        if not due:
            return
        began = self.timer()
        done = 0
        for _, url_id in due:
            if not self._refold_from_checkpoint(url_id):
                self.refold([url_id], now, None)
            done += 1
            if budget is not None and self.timer() - began >= budget:
                break
        log.debug(
            "refolded_late urls=%d left=%d seconds=%.3f",
            done, len(self._pending), self.timer() - began,
        )  # fmt: skip

    def _after_checkpoint(
        self, folded: int, newest_at: float, stored: int, after_marks: Sequence[Observation]
    ) -> list[Observation] | None:
        """The results a URL's checkpoint does not cover, in event order, or None if it may
        not cover exactly the others. `folded` and `newest_at` are the checkpoint's, `stored`
        the URL's stored results, `after_marks` those stored after the last flush's marks (in
        event order).

        A checkpoint written by a flush covers every result stored before it: each agent's
        results up to its highest seq then (the flush's marks). If as many of the stored
        results are within the marks as it folded, the covered set is exactly the folded one
        (any result stored after the flush with a seq within the marks would make one too
        many). Only those probed at or after `newest_at` count as uncovered: one outside the
        marks but older is left out, and the count then refuses.
        """
        after = [o for o in after_marks if o.at >= newest_at]
        return after if stored - len(after) == folded else None

    def _refold_from_checkpoint(self, url_id: int) -> bool:
        """Refold a late URL from its checkpoint and the results stored after it, where that
        equals a refold from scratch; False (nothing done) where it may not.

        If every result the checkpoint does not cover (see _after_checkpoint: a late one
        stored since the flush is among them) was probed after the checkpoint's newest input,
        the fold is the checkpoint's with those folded on top in event order, and only the
        history after it is rewritten, so a network's spool delivered late costs the results
        since the last flush (seconds) rather than the URL's whole history.
        """
        if self.flush_every <= 0:
            return False  # no flushes, no checkpoints
        entry = self.entries.get(url_id) or self._dirty.get(url_id)
        if entry is None:
            return False
        mark = self.ledger.checkpoint(url_id, with_fold=True)
        if mark is None or mark.folded < 0 or mark.fold is None:
            return False
        base = mark.fold
        after = self._after_checkpoint(
            mark.folded,
            base.newest_at,
            self.ledger.result_counts([url_id]).get(url_id, 0),
            self.ledger.observations_after_marks([url_id]).get(url_id, ()),
        )
        if not after or after[0].at <= base.newest_at:
            return False
        head = base.clone()
        events: list[Event] = []
        for obs in after:  # in event order
            events += head.observe(obs, self.networks_at(obs.at))
        entry.fold, entry.folded = head, mark.folded + len(after)
        entry.tail = Tail(base, head, [], events)
        self._rewrite_tail(url_id, entry)
        entry.tail = None
        self._stale.discard(url_id)
        if self._pending.pop(url_id, None) is not None:
            self.ledger.mark_refold([url_id], False)
        # Its url_state row stays the checkpoint, older than its results (see resume).
        self.ledger.mark_unflushed([url_id])
        self._dirty[url_id] = entry
        return True

    # -- checkpoints -------------------------------------------------------------------------------

    def flush(self, now: float) -> int:
        """Write every fold changed since the last flush as a checkpoint; return how many. If
        the caller's transaction fails, `flushed(now)` is not called and they stay dirty."""
        dirty = self._dirty
        if dirty:
            self.ledger.checkpoint_all([(u, dirty[u]) for u in sorted(dirty)], self._stale, now)
        return len(dirty)

    def flushed(self, now: float) -> None:
        """The flush's transaction committed."""
        self._dirty = {}
        self.flushed_at = now

    def flush_due(self, now: float) -> bool:
        return bool(self._dirty) and now - self.flushed_at >= self.flush_every

    def resume_unflushed(self, chunk: int = 500) -> dict[str, int]:
        """At start, after a crash: each URL folded since its url_state row was written
        resumes from that row (the results after it folded on top), or is marked for a refold
        from its whole history where that cannot be proven equal. Returns how many of each.
        Read `chunk` URLs at a time: a crash can leave a flush interval's worth of URLs."""
        outcomes = {"resumed": 0, "refolded": 0, "due": 0}
        ids = self.ledger.unflushed()
        for i in range(0, len(ids), chunk):
            for outcome in self._resume(ids[i : i + chunk]):
                outcomes[outcome] += 1
        return outcomes

    def _resume(self, url_ids: Sequence[int]) -> list[str]:
        """Fold the results stored after each URL's checkpoint onto it ("resumed"); "due"
        (marked for a refold) if that would not equal a refold (the row is no checkpoint, or
        a result it does not cover is older than its newest input); "refolded" if its state
        was unreadable (see load).

        The uncovered results (see _after_checkpoint) come after the checkpoint in event
        time, or it is refused.
        """
        marks = self.ledger.checkpoints(url_ids)
        usable = [
            u for u in url_ids
            if u not in self._pending and (m := marks.get(u)) is not None and m.folded >= 0
            and m.method == self.method.version
        ]  # fmt: skip
        refolded: set[int] = set()
        entries = self.load(usable, active_only=False, refolded=refolded)
        counts = self.ledger.result_counts(usable)
        stored_after = self.ledger.observations_after_marks(usable)
        outcomes = []
        for url_id in url_ids:
            entry = entries.get(url_id)
            if url_id in refolded:
                outcomes.append("refolded")  # in full: nothing to resume
                continue
            if entry is None:
                self._pending.setdefault(url_id, 0.0)
                outcomes.append("due")
                continue
            fold, folded = entry.fold, marks[url_id].folded
            after = self._after_checkpoint(
                folded, fold.newest_at, counts.get(url_id, 0), stored_after.get(url_id, ())
            )
            if after is None or (after and event_order(after[0]) < fold.newest_key):
                self._pending.setdefault(url_id, 0.0)
                outcomes.append("due")
                continue
            for obs in after:
                fold.observe(obs, self.networks_at(obs.at))
            entry.tail, entry.folded = None, folded + len(after)
            self._dirty[url_id] = entry
            outcomes.append("resumed")
        return outcomes


def _adopt_provider(entry: UrlEntry) -> None:
    """Once its history is written: the URL's provider is the one its fold last saw."""
    f = entry.fold
    if f.provider:
        entry.provider, entry.asn, entry.cdn = f.provider, f.asn, f.cdn


def method_of(policy: Policy, planner: Planner) -> Method:
    """The method the collector folds with: its policy and its planned probe intervals."""

    last: list[object] = [None, 0.0]  # the fold asks twice per observation with the same values

    def planned(
        now: float, state: UrlState, opened_at: float, due: float | None, removed: float | None
    ) -> float:
        key = (now, state, opened_at, due, removed)
        if last[0] == key:
            return float(last[1])  # type: ignore[arg-type]
        interval = planner.interval(now, state, opened_at, due, removed)
        value = planner.watch_interval if interval is None else interval
        last[0], last[1] = key, value
        return value

    return Method(policy, planned)
