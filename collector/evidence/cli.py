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
from collector.evidence.note import NoteVerifier
from collector.evidence.verify import Report, verify_bundle
from collector.store.sql import DB_HELP, database

EVIDENCE_HELP = (
    "Evidence bundles: 'export (URL | --provider P) [--since T] -o DIR --log-key KEY' writes"
    " one from the collector database; 'verify DIR [--log-key KEY]' checks one offline."
)
LOG_KEY_HELP = "The key that signs the log's checkpoints: 'init DIR --origin NAME'."
COMMANDS = ("evidence", "log-key")


def evidence_options(p: Any) -> Any:
    p.add_argument("action", choices=["verify", "export"], help="what to do")
    p.add_argument(
        "target", nargs="?", help="verify: the bundle directory; export: the reported URL"
    )
    p.add_argument(
        "--log-key",
        help="the log's published verifier key (name+id+key, the log.vkey 'log-key init'"
        " wrote), or a file holding it. export: required; verify: without it the bundle's own"
        " log.vkey is used and printed for you to compare",
    )
    p.add_argument("--db", type=database, default=Path("takedown.db"), help=f"export: {DB_HELP}")
    p.add_argument("-o", "--out", type=Path, help="export: the bundle directory to create")
    p.add_argument("--provider", help="export: every URL first attributed to this provider")
    p.add_argument(
        "--since",
        help="export --provider: only URLs whose notice was given at or after this time"
        " (ISO 8601); each URL's leaves are all exported, from its first",
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
        if args.action == "export":
            return export(args, pinned, err)
        if not args.target:
            print("takedown-collector evidence verify: name the bundle directory", file=err)
            return 2
        report = verify_bundle(read_bundle(Path(args.target)), pinned)
    except EvidenceError as exc:
        print(f"takedown-collector {command}: {exc}", file=err)
        return 1
    out.write(render(report, pinned is not None))
    return 0 if report.ok else 1


def export(args: Any, verifier: NoteVerifier | None, err: TextIO) -> int:
    """`evidence export`: resolve the URLs, write their bundle, say what it holds."""
    # Imported here: verify must run with no database code at all.
    from collector.store.evidence import ExportError, export_urls

    if verifier is None:
        print("takedown-collector evidence export: --log-key is required (the log's log.vkey)",
              file=err)  # fmt: skip
        return 2
    if args.out is None or bool(args.target) == bool(args.provider):
        print("takedown-collector evidence export: give a URL or --provider, and -o DIR",
              file=err)  # fmt: skip
        return 2
    try:
        done = export_urls(
            args.db, verifier, args.out, url=args.target, provider=args.provider,
            since=args.since,
        )  # fmt: skip
    except ExportError as exc:
        print(f"takedown-collector evidence export: {exc}", file=err)
        return 1
    print(f"bundle written to {args.out}: {done.urls} URLs, {done.leaves} leaves, checkpoint of"
          f" size {done.size}; check it with 'takedown-collector evidence verify {args.out}"
          " --log-key KEY'", file=err)  # fmt: skip
    return 0
