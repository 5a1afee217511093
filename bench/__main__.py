"""`python -m bench {probe,ingest,scale,scrape,memory,restart,tails,all} [options]`.

`all --quick`: each, small.

Options after the name go to that benchmark (`python -m bench probe --help`); `all` passes
only `--quick` and `--loop` on.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from bench import agentmem, ingest, probe, restart, scale, scrape, tails
from bench.common import machine, table

BENCHMARKS: dict[str, Callable[[Sequence[str]], object]] = {
    "probe": probe.main,
    "ingest": ingest.main,
    "scale": scale.main,
    "scrape": scrape.main,
    "memory": agentmem.main,
    "restart": restart.main,
    "tails": tails.main,
}


LOOPED = ("probe", "ingest", "scale")  # the benchmarks that take --loop


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help") or args[0] not in (*BENCHMARKS, "all"):
        print(__doc__.strip())
        return 0 if args and args[0] in ("-h", "--help") else 2
    name, rest = args[0], args[1:]
    print(table("machine", ["what", "value"], list(machine().items())), end="\n\n", flush=True)
    if name != "all":
        BENCHMARKS[name](rest)
        return 0
    unknown = [a for a in rest if a not in ("--quick", "--loop=asyncio", "--loop=uvloop")]
    if unknown:
        print(f"`all` takes only --quick and --loop=LOOP, not {unknown}", file=sys.stderr)
        return 2
    for bench_name, run in BENCHMARKS.items():
        extra = [a for a in rest if a.startswith("--loop")] if bench_name in LOOPED else []
        run([a for a in rest if a == "--quick"] + extra)
        print(flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
