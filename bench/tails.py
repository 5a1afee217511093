"""What the collector's verdict cache holds per URL, with and without a `Tail`, in process.

A real `Store` on a SQLite file in a temporary directory; `--urls` reports; `--agents` agents
each send one result per URL per round, for `--rounds` rounds, so every URL's tail is full (a
second fold, a snapshot, up to TAIL_LENGTH observations). Memory is traced (tracemalloc) from
before the store opens; then every tail is dropped, as `Projection` does beyond TAIL_URLS, and
what that frees is a tail's size. The projection for a million URLs adds CACHE_URLS folds (from
`bench scale`, a fresh process) and TAIL_URLS tails to the collector's RSS after import.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import tempfile
import time
import tracemalloc
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.common import table
from collector.attribution import PrefixTable
from collector.method import Policy
from collector.projection import CACHE_URLS, TAIL_URLS
from collector.reports_file import ReportIn
from collector.schedule import Planner
from collector.store import ResultIn, Store


@dataclass(frozen=True)
class TailReport:
    urls: int
    agents: int
    rounds: int
    traced_per_url: float  # everything traced after the tails went, per URL
    tail_bytes: float  # freed per URL by dropping its tail
    text: str = ""


def measure(urls: int, agents: int, rounds: int, workdir: Path) -> TailReport:
    prefixes = workdir / "prefixes.csv"
    prefixes.write_text("prefix,asn,provider\n192.0.2.0/24,64500,Example\n")
    now = time.time()
    tracemalloc.start()
    try:
        store = Store(workdir / "c.db", PrefixTable.from_csv(prefixes), Policy(), flush_every=1e9)
        try:
            store.projection.tail_urls = urls  # every URL keeps its tail while it fills
            reports = [
                ReportIn(f"http://x.example/{i}", now - 3600, received_at=None, reference=None)
                for i in range(urls)
            ]
            ids = [o.url_id for o in store.submit_reports(reports, now, Planner())]
            body = hashlib.sha256(b"the page").digest()
            team = [store.register_agent(f"a{k}", f"n{k}", "1", now) for k in range(agents)]
            seq = 0
            for r in range(rounds):
                for k, agent in enumerate(team):
                    batch = []
                    for url_id in ids:
                        seq += 1
                        at = now - 3000 + r * 100 + k
                        batch.append(ResultIn(url_id, seq, at, 0.01, 200, "http://x.example/",
                                              body, 7, False, "192.0.2.1", "none", 0))  # fmt: skip
                    store.ingest(agent, batch, now)
            gc.collect()
            before = tracemalloc.take_snapshot()
            store.projection.tail_urls = 0
            store.projection._drop_tails()
            gc.collect()
            after = tracemalloc.take_snapshot()
            freed = -sum(s.size_diff for s in after.compare_to(before, "filename"))
            traced = tracemalloc.get_traced_memory()[0]
        finally:
            store.close()
    finally:
        tracemalloc.stop()
    return TailReport(urls, agents, rounds, traced / urls, freed / urls)


def _render(r: TailReport) -> str:
    tails = r.tail_bytes * TAIL_URLS
    rows: list[list[object]] = [
        ["URLs x agents x rounds", f"{r.urls:,} x {r.agents} x {r.rounds}"],
        ["a tail, per URL (B)", r.tail_bytes],
        ["all traced, per URL, tails dropped (B)", r.traced_per_url],
        [f"TAIL_URLS = {TAIL_URLS:,} tails (MiB)", tails / 2**20],
        [f"CACHE_URLS = {CACHE_URLS:,}: add bench scale's verdict cache per URL", ""],
    ]
    return table("verdict cache: a URL's tail", ["figure", "value"], rows)


def main(argv: Sequence[str] | None = None) -> TailReport:
    parser = argparse.ArgumentParser(prog="python -m bench tails", description=__doc__)
    parser.add_argument("--urls", type=int, default=2_000)
    parser.add_argument("--agents", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=12, help="results per URL and agent")
    parser.add_argument("--quick", action="store_true", help="200 URLs")
    args = parser.parse_args(argv)
    urls = 200 if args.quick else args.urls
    with tempfile.TemporaryDirectory(prefix="bench-tails-") as tmp:
        report = measure(urls, args.agents, args.rounds, Path(tmp))
    text = _render(report)
    print(text)
    return TailReport(**{**report.__dict__, "text": text})
