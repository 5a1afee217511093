"""`takedown-collector evidence verify DIR` and `takedown-collector log-key init DIR`.

`collector/cli.py` builds the base parsers (config file, environment, log
level) and hands them to `evidence_options` and `log_key_options`; `run`
does the work. Output goes to `out` (verification results) and `err`
(notes for the operator); the exit code is 0 when all is well, 1 when a
bundle fails verification or cannot be read.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, TextIO

from collector.evidence.bundle import read_bundle
from collector.evidence.errors import EvidenceError
from collector.evidence.logkey import init_log_key, read_verifier
from collector.evidence.verify import Report, verify_bundle

EVIDENCE_HELP = "Check an evidence bundle offline: 'verify DIR [--log-key KEY]'."
LOG_KEY_HELP = "The key that signs the log's checkpoints: 'init DIR --origin NAME'."
COMMANDS = ("evidence", "log-key")


def evidence_options(p: Any) -> Any:
    p.add_argument("action", choices=["verify"], help="what to do")
    p.add_argument("dir", type=Path, help="the bundle directory")
    p.add_argument(
        "--log-key",
        help="the log's published verifier key (name+id+key), or a file holding it;"
        " without it the bundle's own log.vkey is used and printed for you to compare",
    )
    return p


def log_key_options(p: Any) -> Any:
    p.add_argument("action", choices=["init"], help="what to do")
    p.add_argument("dir", type=Path, help="directory for log.key (0600) and log.vkey")
    p.add_argument(
        "--origin",
        required=True,
        help="the log's name, the first line of every checkpoint (e.g. monitor.example/log)",
    )
    return p


def render(report: Report, pinned: bool) -> str:
    lines = []
    if report.ok:
        lines.append(
            f"OK: {report.entries} leaves ({report.observations} signed observations by"
            f" {len(report.agents)} agents, {report.urls} URLs) are in the log under its"
            f" checkpoint of size {report.checkpoint_size}"
            + (f", consistent with {report.older_checkpoints} earlier" if report.older_checkpoints
               else "")
        )  # fmt: skip
    else:
        lines.append(f"FAILED: {len(report.problems)} problems")
        lines.extend(f"  {p}" for p in report.problems)
    if not pinned and report.log_key:
        lines.append(
            f"log key (from the bundle itself; compare it with the published one): {report.log_key}"
        )
    return "\n".join(lines) + "\n"


def run(command: str, args: Any, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out, err = out or sys.stdout, err or sys.stderr
    try:
        if command == "log-key":
            private, verifier = init_log_key(args.dir, args.origin)
            print(f"log key created: {private} (0600); publish its verifier key:", file=err)
            print(verifier, file=out)
            return 0
        pinned = read_verifier(args.log_key) if args.log_key else None
        report = verify_bundle(read_bundle(args.dir), pinned)
    except EvidenceError as exc:
        print(f"takedown-collector {command}: {exc}", file=err)
        return 1
    out.write(render(report, pinned is not None))
    return 0 if report.ok else 1
