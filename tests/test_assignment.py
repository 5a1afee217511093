"""Assignment reconcile: the agent's holder and the collector's bucket diff agree."""

from __future__ import annotations

import errno
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.assignment import Assignment, AssignmentChange
from agent.main import Agent, AgentConfig
from agent.spool import Spool
from agent.texts import Arena, TempTexts, TextsError
from client.digests import BUCKETS
from collector.service import (
    ASSIGNMENT_CHUNK,
    assignment_updates,
    bucket_updates,
    differing_buckets,
    reconcile,
)
from collector.store import Target
from collector.store.reads import active_intervals, targets_by_bucket

entries = st.dictionaries(
    st.integers(min_value=1, max_value=5 * BUCKETS),
    st.sampled_from([1.0, 5.0, 300.0, 900.0]),
    max_size=300,
)


def change_of(update: object) -> AssignmentChange:
    return AssignmentChange(
        upsert=tuple((t.url_id, t.url, t.interval_ms / 1000) for t in update.upsert),  # type: ignore[attr-defined]
        remove=tuple(update.remove),  # type: ignore[attr-defined]
        replace_buckets=tuple(update.replace_buckets),  # type: ignore[attr-defined]
        in_sync=update.in_sync,  # type: ignore[attr-defined]
    )


def holding(items: dict[int, float]) -> Assignment:
    a = Assignment()
    a.apply(AssignmentChange(upsert=tuple((u, f"http://x/{u}", i) for u, i in items.items())))
    return a


class TestAssignment:
    def test_upsert_remove_and_stop(self) -> None:
        """Upserts schedule, an unchanged upsert does nothing, removes stop."""
        a = holding({1: 5.0, 2: 5.0})
        applied = a.apply(
            AssignmentChange(upsert=((1, "http://x/1", 5.0), (2, "http://x/2", 9.0)), remove=(3,))
        )
        assert applied.schedule == ((2, 9.0),)
        assert applied.stop == ()
        assert a.apply(AssignmentChange(remove=(1,))).stop == (1,)
        assert a.url(1) is None and a.url(2) == "http://x/2"

    def test_replace_bucket_drops_what_is_not_listed(self) -> None:
        """A replaced bucket keeps exactly the URLs listed for it; other buckets are untouched."""
        a = holding({1: 5.0, 1 + BUCKETS: 5.0, 2: 5.0})
        applied = a.apply(AssignmentChange(upsert=((1, "http://x/1", 5.0),), replace_buckets=(1,)))
        assert applied.stop == (1 + BUCKETS,)
        assert set(a.ids()) == {1, 2}

    def test_empty_assignment_sends_no_digests(self) -> None:
        """An agent holding nothing sends an empty digest list."""
        assert Assignment().digest_list() == []
        assert len(holding({7: 1.0}).digest_list()) == BUCKETS


class TestTexts:
    def test_arena_keeps_replaces_and_forgets(self) -> None:
        """The arena returns each URL's latest text and forgets removed ones."""
        arena = Arena()
        arena.record_assignment(
            [(1, "http://a.example/1", 5.0), (2, "http://b.example/ü", 5.0)], []
        )
        arena.record_assignment([(1, "http://a.example/one", 5.0)], [2])
        assert (arena.url(1), arena.url(2), arena.url(3)) == ("http://a.example/one", None, None)
        assert len(arena) == 1

    def test_arena_compacts_its_garbage(self) -> None:
        """Churn does not grow the arena: replaced and removed texts are reclaimed."""
        arena = Arena()
        for round_ in range(30):
            arena.record_assignment(
                [(u, f"http://h.example/{round_}/{u:06d}", 5.0) for u in range(20_000)], []
            )
        live = 20_000 * len("http://h.example/29/000000")
        assert arena.nbytes <= 2 * live + (1 << 20), "garbage over the live text and 1 MiB"
        assert arena.url(17) == "http://h.example/29/000017"

    def test_texts_live_in_the_spool_and_resume_from_it(self, tmp_path: Path) -> None:
        """With a spool as the store, texts are read from it (before and after the commit);
        a restart resumes the same ids, intervals and digests without rewriting them."""
        with Spool(tmp_path / "spool.db") as spool:
            a = Assignment(texts=spool)
            a.apply(AssignmentChange(upsert=tuple((u, f"http://x/{u}", 5.0) for u in range(50))))
            assert a.url(7) == "http://x/7"
            spool.flush()
            digests = a.digest_list()
        with Spool(tmp_path / "spool.db") as spool:
            b = Assignment(texts=spool)
            scheduled = list(b.resume(spool.held()))
            assert sorted(scheduled) == [(u, 5.0) for u in range(50)]
            assert b.digest_list() == digests and b.url(49) == "http://x/49"
            assert b.apply(AssignmentChange(upsert=((3, "http://x/3", 5.0),))).schedule == ()

    def test_a_new_text_for_a_held_id_is_recorded(self) -> None:
        """Same id and interval, another text: the store gets it (the CRC tells them apart)."""
        a = holding({1: 5.0})
        applied = a.apply(AssignmentChange(upsert=((1, "http://elsewhere/1", 5.0),)))
        assert applied.schedule == ((1, 5.0),) and a.url(1) == "http://elsewhere/1"
        assert a.digest_list() == holding({1: 5.0}).digest_list()

    def test_memory_per_url_without_the_text(self) -> None:
        """Holding URLs costs their text plus under 64 bytes each, not a Python object each."""
        urls = [(u, f"http://h.example/{u:09d}", 300.0) for u in range(1, 100_001)]
        text = sum(len(url) for _, url, _ in urls)
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            a = Assignment()
            for start in range(0, len(urls), 1000):
                a.apply(AssignmentChange(upsert=tuple(urls[start : start + 1000])))
            used = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        assert len(a) == 100_000
        assert (used - text) / 100_000 < 64, f"{(used - text) / 100_000:.0f} bytes per URL"


def fd_targets(pid: int) -> list[str]:
    """Where the open file descriptors of a process point (Linux /proc)."""
    fds = Path(f"/proc/{pid}/fd")
    targets = []
    for fd in fds.iterdir():
        try:
            targets.append(str(fd.readlink()))
        except OSError:  # closed meanwhile
            continue
    return targets


def disk_full(*_: object) -> int:
    """os.pwrite on a full file system."""
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


_HOLDER = """
import sys
from agent.texts import TempTexts
texts = TempTexts(sys.argv[1])
texts.record_assignment([(u, f"http://h.example/{u}", 5.0) for u in range(50_000)], [])
assert texts.url(49_999) == "http://h.example/49999"
print(texts.nbytes, flush=True)
sys.stdin.read()
"""


class TestTempTexts:
    """The store of an agent without --state-dir: texts on disk in an unnamed temporary file."""

    def test_texts_read_back_equal_a_model_after_churn(self, tmp_path: Path) -> None:
        """After many rounds of upserts (new ids, new texts for held ids, non-ASCII) and
        removals, compactions included, every id reads back its latest text, through the
        store and through an Assignment over it; and the directory never shows a file."""
        rng = random.Random(12)
        model: dict[int, str] = {}
        with TempTexts(tmp_path) as texts:
            a = Assignment(texts=texts)
            for round_ in range(40):
                upsert = []
                for u in rng.sample(range(1, 30_000), 4_000):
                    url = f"http://h{u % 97}.example/{round_}/{u}/" + "ü" * rng.randrange(3)
                    upsert.append((u, url, rng.choice((5.0, 300.0))))
                    model[u] = url
                remove = tuple(rng.sample(sorted(model), min(len(model), 1_500)))
                for u in remove:
                    model.pop(u, None)
                live = {u for u, _, _ in upsert} - set(remove)
                a.apply(AssignmentChange(remove=remove))
                a.apply(AssignmentChange(upsert=tuple(e for e in upsert if e[0] in live)))
                assert list(tmp_path.iterdir()) == []
            assert len(texts) == len(a) == len(model)
            assert {u: texts.url(u) for u in model} == model
            assert {u: url for u, url, _ in a.items()} == model
            assert texts.url(30_001) is None and a.url(30_001) is None
            live_bytes = sum(len(url.encode()) for url in model.values())
            assert texts.nbytes <= 2 * live_bytes + (1 << 20), "garbage is compacted"
        assert list(tmp_path.iterdir()) == []
        with pytest.raises(TextsError, match="closed"):
            texts.url(1)

    def test_the_text_stays_out_of_memory(self, tmp_path: Path) -> None:
        """Holding 100,000 URLs of 87 bytes costs under 12 bytes of heap each (8 of them
        an offset and a length): the text is on disk."""
        urls = [(u, f"http://h.example/{u:09d}/{'x' * 60}", 300.0) for u in range(1, 100_001)]
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            with TempTexts(tmp_path) as texts:
                for start in range(0, len(urls), 1000):
                    texts.record_assignment(urls[start : start + 1000], [])
                used = tracemalloc.get_traced_memory()[0] - before
                assert texts.nbytes == 87 * 100_000 and texts.url(99) == urls[98][1]
        finally:
            tracemalloc.stop()
        assert used / 100_000 < 12, f"{used / 100_000:.1f} bytes per URL"

    def test_nothing_is_left_on_disk_even_after_sigkill(self, tmp_path: Path) -> None:
        """A process holding texts has a file in the directory that has no name there (it
        shows as deleted), and once the process is SIGKILLed nothing remains."""
        with subprocess.Popen(
            [sys.executable, "-c", _HOLDER, str(tmp_path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        ) as holder:
            try:
                assert holder.stdout is not None
                written = int(holder.stdout.readline())
                assert written == sum(len(f"http://h.example/{u}") for u in range(50_000))
                assert list(tmp_path.iterdir()) == []
                ours = [t for t in fd_targets(holder.pid) if t.startswith(str(tmp_path))]
                assert len(ours) == 1 and ours[0].endswith("(deleted)"), ours
            finally:
                holder.send_signal(signal.SIGKILL)
                holder.wait(30)
        assert holder.returncode == -signal.SIGKILL
        assert list(tmp_path.iterdir()) == []

    def test_an_unusable_directory_is_a_clear_error(self, tmp_path: Path) -> None:
        """A directory that does not exist (or is a file) fails at once, naming it."""
        for where in (tmp_path / "missing", tmp_path / "file"):
            (tmp_path / "file").write_text("")
            with pytest.raises(TextsError, match=f"cannot create a temporary file in {where}"):
                TempTexts(where)

    def test_a_full_disk_is_a_clear_error_and_the_store_stops(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A write that fails (ENOSPC) raises TextsError naming the directory, not the URL;
        the store then refuses reads and writes (its offsets no longer match the file)."""
        texts = TempTexts(tmp_path)
        texts.record_assignment([(1, "http://secret.example/1", 5.0)], [])
        monkeypatch.setattr(os, "pwrite", disk_full)
        with pytest.raises(TextsError, match=f"cannot write in {tmp_path}.*No space") as info:
            texts.record_assignment([(2, "http://secret.example/2", 5.0)], [])
        assert "secret" not in str(info.value)
        monkeypatch.undo()
        with pytest.raises(TextsError, match="unusable after an earlier error"):
            texts.url(1)
        with pytest.raises(TextsError, match="unusable"):
            texts.record_assignment([], [1])
        texts.close()
        assert list(tmp_path.iterdir()) == []

    def test_an_agent_without_state_dir_keeps_its_texts_in_a_temporary_file(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """No --state-dir: the agent's assignment reads its texts from a TempTexts in the
        system's temporary directory (TMPDIR), which shows no file; a full disk stops the
        agent with the store's error instead of losing texts silently."""
        monkeypatch.setenv("TMPDIR", str(tmp_path))
        monkeypatch.setattr("tempfile.tempdir", None)  # gettempdir() reads TMPDIR again
        agent = Agent(AgentConfig(collector="127.0.0.1:1", name="a", network="n"))
        assert agent.spool is None and isinstance(agent.texts, TempTexts)
        assert agent.assignment.texts is agent.texts and agent.texts.directory == str(tmp_path)
        agent._assign(AssignmentChange(upsert=((7, "http://a.example/7", 5.0),)))
        assert agent.assignment.url(7) == "http://a.example/7" and agent._fatal is None
        assert list(tmp_path.iterdir()) == []
        monkeypatch.setattr(os, "pwrite", disk_full)
        agent._assign(AssignmentChange(upsert=((8, "http://a.example/8", 5.0),)))
        assert isinstance(agent._fatal, TextsError)
        agent.texts.close()


class TestReconcile:
    @given(entries, entries)
    @settings(max_examples=150)
    def test_reconcile_brings_any_agent_to_the_target_set(
        self, agent_has: dict[int, float], collector_has: dict[int, float]
    ) -> None:
        """Whatever the agent held, after the reconcile updates it holds exactly our set."""
        agent = holding(agent_has)
        targets = [Target(u, f"http://x/{u}", i) for u, i in sorted(collector_has.items())]
        updates = list(reconcile(targets, agent.digest_list()))
        assert updates[-1].in_sync
        for update in updates:
            agent.apply(change_of(update))
        held = {u: (url, i) for u, url, i in agent.items()}
        assert held == {u: (f"http://x/{u}", i) for u, i in collector_has.items()}

    @given(entries)
    @settings(max_examples=50)
    def test_in_sync_agent_gets_nothing(self, items: dict[int, float]) -> None:
        """Identical sets produce a single empty in_sync update."""
        targets = [Target(u, f"http://x/{u}", i) for u, i in items.items()]
        (update,) = reconcile(targets, holding(items).digest_list())
        assert update.in_sync and not update.upsert and not update.replace_buckets


def url_table(
    items: dict[int, float], inactive: frozenset[int] = frozenset()
) -> sqlite3.Connection:
    """The columns of `urls` the assignment reads, in an in-memory database."""
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE urls (id INTEGER PRIMARY KEY, url TEXT, interval REAL, active INT)")
    conn.executemany(
        "INSERT INTO urls VALUES (?, ?, ?, ?)",
        [(u, f"http://x/{u}", i, int(u not in inactive)) for u, i in items.items()],
    )
    conn.commit()
    return conn


class TestStreamedReconcile:
    @given(entries, entries, st.frozensets(st.integers(min_value=1, max_value=5 * BUCKETS)))
    @settings(max_examples=100)
    def test_database_path_equals_reconcile(
        self, agent_has: dict[int, float], rows: dict[int, float], inactive: frozenset[int]
    ) -> None:
        """Digests over (id, interval) rows, then only the differing buckets' rows in bucket
        order (or every row, for an agent holding nothing), give exactly the updates of the
        in-memory reconcile of the active URLs."""
        conn = url_table(rows, inactive)
        theirs = holding(agent_has).digest_list()
        streamed = list(assignment_updates(conn, theirs))
        active = [Target(u, f"http://x/{u}", i) for u, i in rows.items() if u not in inactive]
        assert streamed == list(reconcile(active, theirs))

    def test_updates_are_cut_at_bucket_boundaries(self) -> None:
        """A fresh agent gets every bucket; no bucket is split between updates, and an update
        grows past ASSIGNMENT_CHUNK by at most one bucket."""
        rows = {u: 60.0 for u in range(1, 6 * ASSIGNMENT_CHUNK)}
        conn = url_table(rows)
        differ = differing_buckets(active_intervals(conn), [])
        assert differ == list(range(BUCKETS))
        updates = list(bucket_updates(targets_by_bucket(conn, differ, BUCKETS), differ))
        seen: dict[int, int] = {}
        for n, update in enumerate(updates):
            assert len(update.upsert) < ASSIGNMENT_CHUNK + len(rows) // BUCKETS + 1
            for t in update.upsert:
                assert seen.setdefault(t.url_id % BUCKETS, n) == n  # one update per bucket
        assert len(seen) == BUCKETS and sum(len(u.upsert) for u in updates) == len(rows)
        assert updates[-1].in_sync and not any(u.in_sync for u in updates[:-1])

    def test_targets_out_of_bucket_order_are_an_error(self) -> None:
        """bucket_updates refuses input that is not grouped as promised instead of losing it."""
        targets = [Target(2, "http://x/2", 1.0), Target(1, "http://x/1", 1.0)]
        with pytest.raises(ValueError, match="not in a differing bucket"):
            list(bucket_updates(targets, [1, 2]))
