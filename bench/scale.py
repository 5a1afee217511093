"""Scale: a million reports and ten agents.

Phases, against a collector in a child process (SQLite file on disk):

1. import ``--reports`` reports through Intake.Submit (chunks of 10,000): time, database size,
   collector RSS;
2. assign: ten simulated agents connect at once with no assignment and each receives every URL
   (AssignmentUpdate chunks until in_sync): time to assign, collector peak RSS;
3. hold: an agent child process keeps the whole assignment the way the agent does
   (``agent.link.Link`` feeding ``Assignment`` and ``Schedule``): its RSS;
4. reconcile: the agent reconnects with its bucket digests, first with nothing changed, then
   after ``--changes`` new reports arrived while it was away: time to in_sync, URLs resent;
5. fill (``--fill-urls M``): the ten agents each report one result for the first M URLs, so
   the collector's verdict cache holds M URLs x 10 agents: collector RSS, and per URL.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import (
    MIB,
    AgentStream,
    Child,
    Deadline,
    child_say,
    cpu_seconds,
    file_size,
    loops,
    memory,
    mib,
    reset_peak_rss,
    run,
    start_collector,
    stdin_lines,
    submit_urls,
    table,
)

TARGET_AGENT_RSS = 150 * MIB
TARGET_COLLECTOR_RSS = 1024 * MIB


def report_url(i: int) -> str:
    """A plausible reported URL (about 70 characters), unique per i."""
    return f"https://files-{i % 50_000}.example-hosting.net/share/{i:09d}/image.jpg?dl=1"


@dataclass
class ScaleReport:
    reports: int
    agents: int
    figures: dict[str, Any] = field(default_factory=dict)
    text: str = ""


# --- the agent that holds the assignment (child process) --------------------------------------


async def _hold(target: str, name: str) -> None:
    """Hold the assignment like agent.main.Agent does, and reconnect when told."""
    # What an agent process imports, as installed for production: sqlite_utils (agent/spool.py)
    # imports pandas and numpy when present, and the dev extras bring them (+55 MB).
    sys.modules["pandas"] = None  # type: ignore[assignment]
    sys.modules["numpy"] = None  # type: ignore[assignment]
    import agent.main  # noqa: F401
    from agent.assignment import Assignment, AssignmentChange
    from agent.link import Identity, Link
    from agent.outbox import Outbox
    from agent.schedule import Schedule

    gc.collect()
    assignment = Assignment()
    schedule = Schedule(random.Random(1), 0.1, 60.0)
    outbox = Outbox()
    synced = asyncio.Event()
    received = {"upserts": 0, "replaced": 0}

    def assign(change: AssignmentChange) -> None:  # as agent.main.Agent._assign
        now = time.time()
        applied = assignment.apply(change)
        for url_id in applied.stop:
            schedule.remove(url_id)
        for url_id, interval in applied.schedule:
            schedule.set(url_id, interval, now)
        received["upserts"] += len(change.upsert)
        received["replaced"] += len(change.replace_buckets)
        if change.in_sync:
            synced.set()

    commands: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
    stdin_lines(asyncio.get_running_loop(), commands)
    child_say({"rss": memory()[0]})
    link_task: asyncio.Task[None] | None = None
    links: list[Link] = []  # kept: a cancelled Link leaves a pending wait task behind
    try:
        while (command := await commands.get()) is not None:
            if command["cmd"] == "connect":
                synced.clear()
                received.update(upserts=0, replaced=0)
                link = Link(
                    target,
                    Identity(name, "bench-net-holder", "bench"),
                    outbox,
                    assign,
                    digests=assignment.digest_list,
                )
                links.append(link)
                started = time.perf_counter()
                link_task = asyncio.create_task(link.run())
                waiter = asyncio.create_task(synced.wait())
                await asyncio.wait(
                    {waiter, link_task},
                    timeout=command["within"],
                    return_when=asyncio.FIRST_COMPLETED,
                )
                waiter.cancel()
                if not synced.is_set():
                    raise TimeoutError("the assignment did not arrive in time")
                seconds = time.perf_counter() - started
                gc.collect()
                rss, peak = memory()
                child_say(
                    {"seconds": seconds, "urls": len(assignment), "scheduled": len(schedule),
                     "rss": rss, "peak": peak, "digests": assignment.digest_list(), **received}
                )  # fmt: skip
            elif command["cmd"] == "disconnect":
                if link_task is not None:
                    link_task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await link_task
                    link_task = None
                child_say({"disconnected": True})
    finally:
        if link_task is not None:
            link_task.cancel()


def _cache(db: Path, prefixes: Path, count: int) -> None:
    """Load the verdicts of URLs 1..count into a fresh Store's cache; say what it cost."""
    from collector.attribution import PrefixTable
    from collector.method import Policy
    from collector.store import Store

    store = Store(db, PrefixTable.from_csv(prefixes), Policy())
    try:
        gc.collect()
        before = memory()[0]
        for first in range(1, count + 1, 5000):
            store.projection.load(range(first, min(count + 1, first + 5000)))  # as ingest does
        gc.collect()
        child_say({"bytes": memory()[0] - before, "cached": len(store.projection.entries)})
        sys.stdin.read()
    finally:
        store.close()


# --- the benchmark -----------------------------------------------------------------------------


async def _scale(
    n: int, agents: int, changes: int, fill_urls: int, seconds: float, workdir: Path
) -> ScaleReport:
    from bench.ingest import PEER, PROVIDER, build_batches  # not in the agent child
    from bench.tails import measure as measure_tails  # nor this (it imports the store)

    report = ScaleReport(n, agents)
    f = report.figures
    db = workdir / "collector.db"
    prefixes = workdir / "prefixes.csv"
    prefixes.write_text(f"prefix,asn,provider\n{PEER}/32,64500,{PROVIDER}\n")
    collector = await asyncio.to_thread(start_collector, db, prefixes, 3600.0)
    holder: Child | None = None
    try:
        pid = collector.pid
        target = f"127.0.0.1:{collector.info['grpc_port']}"
        names = [report_url(i) for i in range(n)]
        started, cpu0 = time.perf_counter(), cpu_seconds(pid)
        ids = await submit_urls(target, names, time.time() - 600)
        f["import_s"] = time.perf_counter() - started
        f["import_cpu_s"] = cpu_seconds(pid) - cpu0
        f["db_bytes_after_import"] = file_size(db)
        f["collector_rss_after_import"] = memory(pid)[0]

        # 2. ten agents get everything at once
        reset_peak_rss(pid)
        streams = [AgentStream(target, f"bench-agent-{a}", f"bench-net-{a}") for a in range(agents)]
        started, cpu0 = time.perf_counter(), cpu_seconds(pid)
        await asyncio.gather(*(s.open(seconds) for s in streams))
        times = await asyncio.gather(*(s.in_sync(seconds) for s in streams))
        f["assign_all_s"] = time.perf_counter() - started
        f["assign_first_s"] = min(times)
        f["assign_cpu_s"] = cpu_seconds(pid) - cpu0
        f["assign_upserts_each"] = min(s.upserts for s in streams)
        f["collector_peak_rss_assign"] = memory(pid)[1]
        for s in streams:
            await s.close()

        # 3. one agent holds the assignment
        holder = await asyncio.to_thread(
            Child.start, "bench.scale", ["--hold", "--collector", target], 60.0
        )
        f["agent_rss_empty"] = holder.info["rss"]
        holder.send({"cmd": "connect", "within": seconds})
        held = await asyncio.to_thread(holder.read, seconds + 30)
        f["agent_assign_s"] = held["seconds"]
        f["agent_urls"] = held["urls"]
        f["agent_rss"] = held["rss"]
        f["agent_peak_rss"] = held["peak"]
        held_digests: list[int] = []

        # 4. reconnect with digests: nothing changed, then `changes` new reports
        for label, extra in (("same", 0), ("changed", changes)):
            holder.send({"cmd": "disconnect"})
            await asyncio.to_thread(holder.read, 60.0)
            if extra:
                more = [report_url(n + i) for i in range(extra)]
                await submit_urls(target, more, time.time() - 60)
            cpu0 = cpu_seconds(pid)
            holder.send({"cmd": "connect", "within": seconds})
            again = await asyncio.to_thread(holder.read, seconds + 30)
            f[f"reconcile_{label}_s"] = again["seconds"]
            f[f"reconcile_{label}_cpu_s"] = cpu_seconds(pid) - cpu0
            f[f"reconcile_{label}_upserts"] = again["upserts"]
            f[f"reconcile_{label}_buckets"] = again["replaced"]
            held_digests = again["digests"]
        f["agent_urls_after"] = again["urls"]
        await asyncio.to_thread(holder.stop, 30.0)
        holder = None

        # 5. the verdict cache: every agent reports on the first `fill_urls` URLs
        if fill_urls:
            m = min(fill_urls, len(ids))
            pairs = list(zip(ids[:m], names[:m], strict=True))
            plan = [
                build_batches(a, pairs, m, 500, time.time() - m * 0.001 - 60) for a in range(agents)
            ]
            # They hold the assignment already (the holder's digests): nothing is resent.
            streams = [
                AgentStream(target, f"bench-agent-{a}", f"bench-net-{a}", digests=held_digests)
                for a in range(agents)
            ]
            await asyncio.gather(*(s.open(seconds) for s in streams))
            await asyncio.gather(*(s.in_sync(seconds) for s in streams))
            started = time.perf_counter()
            deadline = Deadline(seconds * 10)
            await asyncio.gather(
                *(s.send_batches(b, 8, deadline) for s, b in zip(streams, plan, strict=True))
            )
            f["fill_s"] = time.perf_counter() - started
            f["fill_results"] = sum(a.stored for s in streams for _, a in s.acks.values())
            f["fill_urls"] = m
            for s in streams:
                await s.close()
            f["collector_rss_filled"] = memory(pid)[0]
            await asyncio.to_thread(collector.stop, 120.0)
            # The cache alone, in a fresh process: the collector's RSS also holds what the
            # assignment phases allocated and freed.
            cache = await asyncio.to_thread(
                Child.start,
                "bench.scale",
                ["--cache-child", "--db", str(db), "--prefixes", str(prefixes), "--ids", str(m)],
                seconds,
            )
            cache.stop(30.0)
            f["verdict_cache_urls"] = cache.info["cached"]
            f["verdict_cache_per_url"] = cache.info["bytes"] / max(1, cache.info["cached"])
            # A URL folded since it was loaded also keeps a tail (bench/tails.py, in process).
            (workdir / "tails").mkdir()
            sample = min(2_000, max(50, fill_urls // 10))
            tails = await asyncio.to_thread(measure_tails, sample, agents, 12, workdir / "tails")
            f["tail_per_url"] = tails.tail_bytes
        f["db_bytes_end"] = file_size(db)
    finally:
        if holder is not None:
            await asyncio.to_thread(holder.stop, 10.0)
        await asyncio.to_thread(collector.stop, 120.0)
    return report


def benchmark(
    reports: int = 1_000_000,
    agents: int = 10,
    changes: int = 100,
    fill_urls: int = 100_000,
    seconds: float = 600.0,
    loop: str = "asyncio",
) -> ScaleReport:
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        report = run(_scale(reports, agents, changes, fill_urls, seconds, Path(tmp)), loop)
    report.text = _render(report)
    return report


def _render(r: ScaleReport) -> str:
    f = r.figures
    n = r.reports
    ok = "ok"

    def verdict(value: float, limit: float) -> str:
        return ok if value <= limit else "MISSED"

    rows: list[list[object]] = [
        ["import reports (s)", f["import_s"], f"{n / f['import_s']:,.0f} reports/s"],
        ["database after import", mib(f["db_bytes_after_import"]), ""],
        ["collector RSS after import", mib(f["collector_rss_after_import"]), ""],
        [f"assign {n:,} URLs to {r.agents} agents (s)", f["assign_all_s"],
         f"first agent {f['assign_first_s']:.1f} s, collector CPU {f['assign_cpu_s']:.1f} s"],
        ["collector peak RSS while assigning", mib(f["collector_peak_rss_assign"]),
         f"<= 1 GiB: {verdict(f['collector_peak_rss_assign'], TARGET_COLLECTOR_RSS)}"],
        ["agent RSS, empty", mib(f["agent_rss_empty"]), ""],
        [f"agent RSS holding {f['agent_urls']:,} URLs", mib(f["agent_rss"]),
         f"<= 150 MiB: {verdict(f['agent_rss'], TARGET_AGENT_RSS)}; "
         f"{(f['agent_rss'] - f['agent_rss_empty']) / max(1, f['agent_urls']):.0f} B/URL"],
        ["agent peak RSS", mib(f["agent_peak_rss"]),
         f"assignment took {f['agent_assign_s']:.1f} s"],
        ["reconcile, nothing changed (s)", f["reconcile_same_s"],
         f"{f['reconcile_same_upserts']:,} URLs in {f['reconcile_same_buckets']} buckets resent,"
         f" collector CPU {f['reconcile_same_cpu_s']:.1f} s"],
        ["reconcile, after new reports (s)", f["reconcile_changed_s"],
         f"{f['reconcile_changed_upserts']:,} URLs in {f['reconcile_changed_buckets']} buckets"
         f" resent, collector CPU {f['reconcile_changed_cpu_s']:.1f} s"],
    ]  # fmt: skip
    if "fill_s" in f:
        from collector.projection import CACHE_URLS, TAIL_URLS  # not in the agent child

        cached = min(n, CACHE_URLS)  # the writer keeps at most this many verdicts
        tailed = min(cached, TAIL_URLS)  # and this many tails beside them
        projected = (
            f["collector_rss_after_import"]
            + f["verdict_cache_per_url"] * cached
            + f["tail_per_url"] * tailed
        )
        rows += [
            [f"fill: {f['fill_results']:,} results over {f['fill_urls']:,} URLs (s)",
             f["fill_s"], ""],
            ["collector RSS after the fill", mib(f["collector_rss_filled"]),
             "holds what the assignments allocated, too"],
            [f"verdict cache, {f['verdict_cache_urls']:,} URLs (fresh process)",
             mib(f["verdict_cache_per_url"] * f["verdict_cache_urls"]),
             f"{f['verdict_cache_per_url']:,.0f} B/URL with {r.agents} agents"],
            [f"a tail beside a verdict ({r.agents} agents)", mib(f["tail_per_url"] * tailed),
             f"{f['tail_per_url']:,.0f} B/URL x {tailed:,} tails"],
            [f"collector RSS projected for {n:,} URLs x {r.agents} agents", mib(projected),
             f"<= 1 GiB: {verdict(projected, TARGET_COLLECTOR_RSS)} ({cached:,} verdicts cached,"
             f" {tailed:,} with tails)"],
        ]  # fmt: skip
    rows.append(["database at the end", mib(f["db_bytes_end"]), ""])
    return table(f"scale: {n:,} reports, {r.agents} agents", ["figure", "value", "note"], rows)


def main(argv: Sequence[str] | None = None) -> ScaleReport | None:
    parser = argparse.ArgumentParser(
        prog="python -m bench scale", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--reports", type=int, default=1_000_000)
    parser.add_argument("--agents", type=int, default=10)
    parser.add_argument("--changes", type=int, default=100, help="reports added while away")
    parser.add_argument("--fill-urls", type=int, default=100_000, help="0 skips the fill phase")
    parser.add_argument("--seconds", type=float, default=600.0, help="time cap of each phase")
    parser.add_argument("--loop", default="asyncio", choices=loops(), help="uvloop when installed")
    parser.add_argument("--quick", action="store_true", help="20,000 reports, fill 2,000 URLs")
    parser.add_argument("--hold", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--collector", help=argparse.SUPPRESS)
    parser.add_argument("--cache-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--db", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--prefixes", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--ids", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.hold:
        run(_hold(args.collector, "bench-holder"), args.loop)
        return None
    if args.cache_child:
        _cache(args.db, args.prefixes, args.ids)
        return None
    if args.quick:
        args.reports, args.fill_urls = min(args.reports, 20_000), min(args.fill_urls, 2_000)
    report = benchmark(
        args.reports, args.agents, args.changes, args.fill_urls, args.seconds, args.loop
    )
    print(report.text)
    sys.stdout.flush()
    return report


if __name__ == "__main__":
    main()
