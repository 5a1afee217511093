"""`takedown-collector serve | import | report | url | agents | intake-tokens | ca`.

Every option can also come from the environment (TAKEDOWN_COLLECTOR_<OPTION>)
or a TOML file given with --config (a [collector] table).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import configargparse

from client.credentials import CredentialError, add_client_options, client_security
from client.options import ArgParser, host_port, number
from collector import __version__
from collector.admin import ca_command, credentials_command
from collector.attribution import AttributionFileError
from collector.attribution_sources import build_attributor, parse_asn_list
from collector.auth import ServerTLS
from collector.compare import compare_windows, render_comparison, windows
from collector.durations import duration_label, parse_duration
from collector.evidence import cli as evidence_cli
from collector.evidence.errors import EvidenceError
from collector.evidence.logkey import load_log_key
from collector.importer import import_file
from collector.method import Policy
from collector.metrics import DEFAULT_BUCKETS, DEFAULT_DEADLINES
from collector.pki import PKIError
from collector.plot import PlotUnavailable, plot_survival
from collector.report import (
    FORMATS,
    LATENCY_ENDS,
    provider_table,
    record,
    render,
    survival_curve,
    survival_data,
)
from collector.report_html import Window, method_label, render_html
from collector.reports_file import parse_time
from collector.schedule import Phase, Planner, parse_phases
from collector.server import CollectorConfig, serve
from collector.store import Store, StoreError
from collector.store.history import url_history
from collector.store.reads import UrlOutcome, connect_readonly, url_outcomes
from collector.store.sql import DB_HELP, database, is_postgres, label
from collector.timeline import DEFAULT_ORDER_DEADLINE, render_timeline
from collector.tokens import Role

log = logging.getLogger("collector")

INTAKE_ADD_COMMAND = "'takedown-collector intake-tokens add NAME'"
DEFAULT_SCHEDULE = "5m<2h,15m<48h,1h"  # collector.schedule.DEFAULT_PHASES as written


def duration(text: str) -> float:
    """Seconds from '90', '90s', '15m', '24h', '30d' or '2w'."""
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise configargparse.ArgumentTypeError(str(exc)) from exc


def _phases(text: str) -> tuple[Phase, ...]:
    try:
        return parse_phases(text)
    except ValueError as exc:
        raise configargparse.ArgumentTypeError(str(exc)) from exc


def asns(text: str) -> frozenset[int]:
    try:
        return parse_asn_list(text)
    except ValueError as exc:
        raise configargparse.ArgumentTypeError(str(exc)) from exc


def instant(text: str) -> float:
    """Unix time from ISO 8601 with an offset, or a duration meaning that long ago ('30d')."""
    try:
        return time.time() - parse_duration(text)
    except ValueError:
        pass
    try:
        return parse_time(text, "time")
    except ValueError as exc:
        raise configargparse.ArgumentTypeError(
            f"{exc} (give ISO 8601 with an offset, or a duration such as 30d)"
        ) from exc


positive_int = number(int, 0)
rate = number(float, 0, open_low=False, unit="results per second", hint="0: no limit")
probe_rate = number(float, 0, unit="probes per second")


def duration_or_zero(text: str) -> float:
    """A duration, or 0 ('0', '0s')."""
    return 0.0 if text.strip() in ("0", "0s") else duration(text)


def durations_list(text: str) -> list[float]:
    """Comma-separated durations, sorted, each once ('1m,5m,1h')."""
    return sorted({duration(part) for part in text.split(",")})


def _parser(command: str, description: str) -> configargparse.ArgParser:
    p = ArgParser(
        prog=f"takedown-collector {command}",
        description=description,
        config_file_parser_class=configargparse.TomlConfigParser(["collector"]),
        auto_env_var_prefix="TAKEDOWN_COLLECTOR_",
    )
    p.add_argument("-c", "--config", is_config_file=True, help="TOML file with a [collector] table")
    p.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log level",
    )
    return p


def serve_parser() -> configargparse.ArgParser:
    p = _parser(
        "serve", "Run the collector: agent streams and intake over gRPC, /metrics over HTTP."
    )
    p.add_argument("--db", type=database, default=Path("takedown.db"), help=DB_HELP)
    p.add_argument(
        "--listen", type=host_port, default="127.0.0.1:7443", help="gRPC address, HOST:PORT"
    )
    p.add_argument(
        "--metrics-listen",
        type=host_port,
        default="127.0.0.1:9464",
        help="HTTP address for /metrics and /healthz",
    )
    p.add_argument(
        "--prefixes",
        type=Path,
        help="CSV prefix,asn,provider[,country,cdn] mapping peer addresses to providers;"
        " overrides every other source",
    )
    p.add_argument(
        "--asn-mmdb",
        type=Path,
        help="MaxMind-format ASN database (GeoLite2-ASN.mmdb or compatible), after --prefixes",
    )
    p.add_argument(
        "--ipasn",
        type=Path,
        help="pyasn ipasn data file (prefix<TAB>asn, optionally .gz), after --asn-mmdb",
    )
    p.add_argument(
        "--as-names",
        type=Path,
        help="AS names for --ipasn: pyasn JSON {asn: name} or CSV asn,name",
    )
    p.add_argument(
        "--country-mmdb",
        type=Path,
        help="MaxMind-format country database (GeoLite2-Country.mmdb or compatible): the"
        " country of each peer address, where --prefixes gives none",
    )
    p.add_argument(
        "--cdn-asns",
        type=asns,
        default=frozenset(),
        help="AS numbers that are CDNs, e.g. '13335,20940'; their addresses are flagged and a"
        " report's origin_ip is used instead",
    )
    p.add_argument(
        "--schedule",
        type=_phases,
        default=DEFAULT_SCHEDULE,
        help="probe intervals by age of the notice: INTERVAL<AGE,...,INTERVAL",
    )
    p.add_argument(
        "--probe-interval",
        type=duration,
        help="one fixed interval for every URL, watching included (replaces --schedule and"
        " the dense probing around deadlines)",
    )
    p.add_argument(
        "--deadline-window",
        type=duration,
        default="30m",
        help="probe densely this long before and after each deadline",
    )
    p.add_argument(
        "--deadline-interval", type=duration, default="5m", help="interval near a deadline"
    )
    p.add_argument("--watch-interval", type=duration, default="6h", help="interval after removal")
    p.add_argument(
        "--watch-period",
        type=duration,
        default="30d",
        help="keep watching removed URLs for reappearance this long",
    )
    p.add_argument(
        "--max-probe-rate",
        type=probe_rate,
        help="upper bound on probes per second per agent; intervals stretch to stay under it",
    )
    p.add_argument(
        "--replan-every",
        type=duration,
        default="1m",
        help="how often probe intervals are recomputed and pushed to agents",
    )
    p.add_argument(
        "--confirmations",
        type=positive_int,
        default=2,
        help="consecutive removed results each agent must see before a removal counts",
    )
    p.add_argument(
        "--min-vantage-points",
        type=positive_int,
        default=2,
        help="networks that must each see content removed that nobody saw present"
        " (and agree on a content hash without a reference); 1 for a single-network deployment",
    )
    p.add_argument(
        "--liveness-intervals",
        type=float,
        default="3",
        help="an agent stays live on a URL for this many of its probe intervals after its"
        " newest result (must be above 1); a silent agent neither holds content online"
        " nor confirms a removal",
    )
    p.add_argument(
        "--nxdomain-is-removal",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="count DNS NXDOMAIN as removal (flagged in the table either way)",
    )
    p.add_argument(
        "--forbidden-is-removal",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="count HTTP 403 as removal (by default it is inconclusive)",
    )
    p.add_argument(
        "--dynamic-after",
        type=positive_int,
        default=3,
        help="different never-repeating bodies after which a page counts as dynamic",
    )
    p.add_argument(
        "--max-clock-offset",
        type=duration,
        default="10s",
        help="results from an agent whose clock is estimated further off are flagged clock_suspect",
    )
    p.add_argument(
        "--deadline",
        type=duration,
        action="append",
        help="deadline regime(s) from the notice, repeatable (default: 1h, 12h, 24h)",
    )
    p.add_argument(
        "--order-deadline",
        type=duration,
        default="12h",
        help="deadline of a binding removal order when the report gives none",
    )
    p.add_argument(
        "--metrics-max-age",
        type=duration_or_zero,
        default="10s",
        help="per-provider figures on /metrics may be about this old: a background thread"
        " rescans every URL's state past half of it (less often if a scan takes long: at most"
        " a fifth of the time scanning) and renders the text once, so a scrape never waits for"
        " a scan once the first has landed; 0 scans at every scrape",
    )
    p.add_argument(
        "--buckets",
        type=durations_list,
        help="latency histogram bucket bounds, comma separated"
        f" (default: {','.join(duration_label(b) for b in DEFAULT_BUCKETS)})",
    )
    p.add_argument("--cert-file", type=Path, help="the collector's TLS certificate chain, PEM")
    p.add_argument("--key-file", type=Path, help="the key of --cert-file, PEM (keep it 0600)")
    p.add_argument(
        "--client-ca-file",
        type=Path,
        help="mutual TLS: clients need a certificate from this CA, and an agent's certificate"
        " must name it (common name or subject alternative name)",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="plaintext gRPC without TLS: only on a trusted network or for a loopback demo",
    )
    p.add_argument(
        "--auth",
        choices=["tokens", "none"],
        default="tokens",
        help="tokens: every agent and hotline presents its token ('agents add',"
        " 'intake-tokens add'); none: anyone may connect (only with --insecure, for demos)",
    )
    p.add_argument(
        "--max-results-per-second",
        type=rate,
        default="20000",
        help="results each agent may send per second (token bucket); a batch over it is"
        " stored and acknowledged late, which slows the agent; one that would wait over 30 s"
        " ends the stream with RESOURCE_EXHAUSTED (unacknowledged); 0 for no limit",
    )
    p.add_argument(
        "--results-burst",
        type=rate,
        help="results an agent may send at once above the rate (default: one second's worth,"
        " at least 1000)",
    )
    p.add_argument(
        "--flush-every",
        type=duration_or_zero,
        default="5s",
        help="how often verdict states are written behind (results, episodes and events are"
        " committed with every batch; after a crash the URLs not yet written are refolded at"
        " start); /metrics and the table lag by at most this much; 0 writes with every batch",
    )
    p.add_argument(
        "--lease-time",
        type=duration,
        default="15s",
        help="with --db postgresql://: how long this collector's hold on its share of the URLs"
        " lasts unrenewed (it renews every second); when a collector dies, the others fold its"
        " URLs after this. Several collectors on one database share the URLs between them",
    )
    add_log_key_option(p)
    p.add_argument(
        "--checkpoint-every",
        type=duration,
        default="5m",
        help="how often the evidence log's head is signed (also after every verdict)",
    )
    p.add_argument(
        "--verify-workers",
        type=int,
        default=1,
        help="processes that check agents' result signatures beside the writer (0: in the"
        " collector process; one Ed25519 check costs about 0.2 ms)",
    )
    return p


def add_log_key_option(p: configargparse.ArgParser) -> None:
    p.add_argument(
        "--log-key-file",
        type=Path,
        help="the evidence log's signing key ('takedown-collector log-key init DIR' makes"
        " DIR/log.key): every notice, stored result and verdict becomes a leaf of a signed,"
        " append-only log that 'evidence export' bundles for offline verification. Without"
        " it nothing is logged for evidence",
    )


def import_parser() -> configargparse.ArgParser:
    p = _parser("import", "Submit reported URLs from a CSV or JSONL file to a running collector.")
    p.add_argument(
        "file", type=Path, help="CSV (header: url,notified_at[,received_at,reference]) or JSONL"
    )
    p.add_argument(
        "--collector", type=host_port, default="127.0.0.1:7443", help="collector gRPC address"
    )
    p.add_argument(
        "--format",
        choices=["csv", "jsonl"],
        help="file format (default: from the file name's ending)",
    )
    p.add_argument(
        "--skip-invalid",
        action="store_true",
        help="import the valid rows even if some are invalid (default: import nothing then)",
    )
    p.add_argument("--batch-size", type=positive_int, default=1000, help="reports per request")
    p.add_argument(
        "--attempts",
        type=positive_int,
        default=5,
        help="tries per request while the collector is unavailable (backoff up to 10 s)",
    )
    add_client_options(p, "the hotline's", INTAKE_ADD_COMMAND)
    return p


def _tokens_parser(command: str, description: str, whose_name: str) -> configargparse.ArgParser:
    """`agents` and `intake-tokens`: add, list or revoke the tokens of one role."""
    p = _parser(command, description)
    p.add_argument("action", choices=["add", "list", "revoke"], help="what to do")
    p.add_argument("name", nargs="?", help=f"{whose_name} (add, revoke)")
    p.add_argument("--db", type=database, default=Path("takedown.db"), help=DB_HELP)
    p.add_argument(
        "--replace",
        action="store_true",
        help="add: revoke the name's live token in the same step (rotation)",
    )
    return p


def agents_parser() -> configargparse.ArgParser:
    p = _tokens_parser(
        "agents",
        "Create, list or revoke agent tokens (one per agent name) in the collector database.",
        "the agent's --name",
    )
    p.add_argument("--network", help="add: the agent must also say this --network (default: any)")
    p.add_argument(
        "--public-key",
        type=Path,
        help="add: the agent's Ed25519 public key (its STATE_DIR/agent.pub, PEM); without it"
        " the key is pinned at the agent's first hello. With --replace, a new key replaces"
        " the pinned one (after a key rotation)",
    )
    return p


def intake_tokens_parser() -> configargparse.ArgParser:
    return _tokens_parser(
        "intake-tokens",
        "Create, list or revoke hotline tokens for `import` (Intake) in the collector database.",
        "the hotline's name",
    )


def ca_parser() -> configargparse.ArgParser:
    p = _parser(
        "ca",
        "A small private CA: 'init DIR' makes DIR/ca.pem and ca.key; 'issue DIR --name N'"
        " makes DIR/N.pem and N.key for an agent (or with --server, the collector).",
    )
    p.add_argument("action", choices=["init", "issue"], help="what to do")
    p.add_argument("dir", type=Path, help="directory holding ca.pem and ca.key (made 0700)")
    p.add_argument(
        "--name", help="issue: the agent's --name (its certificate's common name), or a file"
        " name for --server"
    )  # fmt: skip
    p.add_argument("--server", action="store_true", help="issue: a collector certificate")
    p.add_argument(
        "--dns", action="append", default=[], help="issue --server: a DNS name clients use"
    )
    p.add_argument(
        "--ip", action="append", default=[], help="issue --server: an IP address clients use"
    )
    p.add_argument(
        "--common-name", default="Takedown Monitor CA", help="init: the CA's common name"
    )
    p.add_argument(
        "--days", type=positive_int, help="validity (default: CA 3650, certificates 825)"
    )
    return p


def _table_options(p: configargparse.ArgParser, deadline_help: str) -> None:
    p.add_argument("--db", type=database, default=Path("takedown.db"), help=DB_HELP)
    p.add_argument("--deadline", type=duration, action="append", help=deadline_help)
    p.add_argument(
        "--order-deadline",
        type=duration,
        default=duration_label(DEFAULT_ORDER_DEADLINE),
        help="deadline of a binding removal order when the report gives none",
    )


def report_parser() -> configargparse.ArgParser:
    p = _parser("report", "Print the per-provider removal table from the collector database.")
    _table_options(p, "deadline from the notice that the overdue column counts (default: 24h)")
    p.add_argument(
        "--format",
        choices=[*FORMATS, "html"],
        default="table",
        help="output; html is one self-contained page with survival curves (give -o FILE)",
    )
    p.add_argument("-o", "--output", type=Path, help="write to this file (default: stdout)")
    p.add_argument(
        "--since",
        type=instant,
        help="only URLs first notified at or after this time: ISO 8601 with offset, or '30d'",
    )
    p.add_argument("--until", type=instant, help="only URLs first notified before this time")
    p.add_argument(
        "--compare",
        action="store_true",
        help="compare the --since/--until window with the previous window of equal length",
    )
    p.add_argument(
        "--min-reports",
        type=positive_int,
        default=10,
        help="providers with fewer reports are listed but not ranked",
    )
    p.add_argument(
        "--latency-end",
        choices=LATENCY_ENDS,
        default="first_removed",
        help="which end of the removal interval is the latency: the first probe that saw it"
        " removed (an upper bound) or the last that saw it present (a lower bound)",
    )
    p.add_argument(
        "--plot", type=Path, help="also draw survival curves per provider into this PNG file"
    )
    p.add_argument(
        "--plot-top",
        type=positive_int,
        default=8,
        help="providers drawn by --plot and on the html page, most reports first",
    )
    return p


def url_parser() -> configargparse.ArgParser:
    p = _parser(
        "url", "Print one URL's timeline: reports, probes per agent, episodes, deadline clock."
    )
    p.add_argument("key", help="URL id (a number) or the exact reported URL")
    _table_options(p, "deadline regime(s) from the notice the timeline shows, repeatable"
                   " (default: 1h, 12h, 24h)")  # fmt: skip
    p.add_argument("--format", choices=["text", "json"], default="text", help="output")
    return p


def refold_parser() -> configargparse.ArgParser:
    """The serve options (the method: policy and schedule) plus --since; same config file."""
    p = serve_parser()
    p.prog = "takedown-collector refold"
    p.description = (
        "Recompute every verdict, episode and event from the stored results under this"
        " method; print what changed. Run it with the collector stopped."
    )
    p.add_argument(
        "--since",
        type=instant,
        help="only URLs with results probed at or after this time (ISO 8601)",
    )
    return p


def evidence_parser() -> configargparse.ArgParser:
    return evidence_cli.evidence_options(_parser("evidence", evidence_cli.EVIDENCE_HELP))


def log_key_parser() -> configargparse.ArgParser:
    return evidence_cli.log_key_options(_parser("log-key", evidence_cli.LOG_KEY_HELP))


COMMANDS = {
    "serve": serve_parser,
    "refold": refold_parser,
    "import": import_parser,
    "report": report_parser,
    "url": url_parser,
    "agents": agents_parser,
    "intake-tokens": intake_tokens_parser,
    "ca": ca_parser,
    "evidence": evidence_parser,
    "log-key": log_key_parser,
}


def _usage() -> str:
    lines = [
        f"usage: takedown-collector {{{','.join(COMMANDS)}}} [options]",
        "",
        "Takedown Monitor collector. Commands:",
    ]
    for name, build in COMMANDS.items():
        lines.append(f"  {name:13} {build().description}")
    lines.append("\nRun 'takedown-collector COMMAND --help' for a command's options.")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args_in = list(sys.argv[1:] if argv is None else argv)
    if not args_in:
        print(_usage(), file=sys.stderr)
        return 2
    if args_in[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if args_in[0] == "--version":
        print(f"takedown-collector {__version__}")
        return 0
    command, rest = args_in[0], args_in[1:]
    if command not in COMMANDS:
        print(f"takedown-collector: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    parser = COMMANDS[command]()
    args = parser.parse_args(rest)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    try:
        if command == "serve":
            return _serve(parser, args)
        if command == "refold":
            return _refold(parser, args)
        if command == "import":
            return _import(args)
        if command == "url":
            return _url(args)
        if command == "agents":
            return credentials_command(args, Role.AGENT)
        if command == "intake-tokens":
            return credentials_command(args, Role.INTAKE)
        if command == "ca":
            return ca_command(args)
        if command in evidence_cli.COMMANDS:
            return evidence_cli.run(command, args)
        return _report(args)
    except (CredentialError, PKIError, EvidenceError) as exc:
        print(f"takedown-collector {command}: {exc}", file=sys.stderr)
        return 2
    except (StoreError, AttributionFileError, PlotUnavailable, OSError, ValueError) as exc:
        print(f"takedown-collector {command}: {exc}", file=sys.stderr)
        return 1


def planner_from(args: configargparse.Namespace) -> Planner:
    deadlines = tuple(args.deadline or DEFAULT_DEADLINES)
    if args.probe_interval:
        planner = Planner.fixed(args.probe_interval, args.watch_period)
    else:
        planner = Planner(
            phases=args.schedule,
            deadline_window=args.deadline_window,
            deadline_interval=args.deadline_interval,
            watch_interval=args.watch_interval,
            watch_period=args.watch_period,
        )
    return replace(
        planner,
        deadlines=deadlines,
        order_deadline=args.order_deadline,
        max_rate=args.max_probe_rate,
    )


def server_security(
    parser: configargparse.ArgParser, args: configargparse.Namespace
) -> tuple[ServerTLS | None, bool]:
    """TLS settings and whether tokens are required; a usage error if they do not fit."""
    tls_files = (args.cert_file, args.key_file, args.client_ca_file)
    if args.insecure:
        if any(tls_files):
            parser.error("--insecure excludes --cert-file, --key-file and --client-ca-file")
        log.warning(
            "insecure_transport plaintext gRPC on %s: anyone on the path can read URLs, results"
            " and tokens (--insecure)",
            args.listen,
        )
        if args.auth == "none":
            log.warning("auth_disabled anyone who reaches %s may act as an agent or submit"
                        " reports (--auth none)", args.listen)  # fmt: skip
        return None, args.auth == "tokens"
    if args.auth == "none":
        parser.error("--auth none is allowed only together with --insecure (local demos)")
    if not (args.cert_file and args.key_file):
        parser.error(
            "TLS needs --cert-file and --key-file ('takedown-collector ca' can make them),"
            " or --insecure for plaintext on a trusted network"
        )
    return ServerTLS(args.cert_file, args.key_file, args.client_ca_file), True


def _import(args: configargparse.Namespace) -> int:
    tls, token = client_security(args, INTAKE_ADD_COMMAND)
    return asyncio.run(
        import_file(
            args.file,
            args.collector,
            fmt=args.format,
            skip_invalid=args.skip_invalid,
            batch_size=args.batch_size,
            attempts=args.attempts,
            tls=tls,
            token=token,
        )
    )


def policy_from(parser: configargparse.ArgParser, args: configargparse.Namespace) -> Policy:
    """The measurement policy the options give; a bad combination ends with one line."""
    try:
        return Policy(
            confirmations=args.confirmations,
            nxdomain_is_removal=args.nxdomain_is_removal,
            forbidden_is_removal=args.forbidden_is_removal,
            dynamic_after=args.dynamic_after,
            min_vantage_points=args.min_vantage_points,
            liveness_intervals=args.liveness_intervals,
            max_clock_offset=args.max_clock_offset,
        )
    except ValueError as exc:
        parser.error(str(exc))
        raise  # parser.error exits


def _refold(parser: configargparse.ArgParser, args: configargparse.Namespace) -> int:
    policy, planner = policy_from(parser, args), planner_from(args)
    attribution = build_attributor(
        args.prefixes, args.asn_mmdb, args.ipasn, args.as_names, args.cdn_asns
    )
    if not is_postgres(args.db) and not args.db.exists():
        raise StoreError(f"{args.db}: no such database")
    signer = load_log_key(args.log_key_file) if args.log_key_file else None
    store = Store(args.db, attribution, policy, planner=planner, log_signer=signer)
    try:
        changes = store.refold(args.since, time.time())
    finally:
        store.close()
    moved = Counter(f"{a.value} -> {b.value}" for _, a, b in changes if a is not b)
    print(f"refolded {len(changes)} URLs with method {store.method.version}")
    for what, n in sorted(moved.items()):
        print(f"  {n:8d}  {what}")
    if not moved:
        print("  no state changed")
    return 0


def _serve(parser: configargparse.ArgParser, args: configargparse.Namespace) -> int:
    tls, require_tokens = server_security(parser, args)
    planner = planner_from(args)
    policy = policy_from(parser, args)
    config = CollectorConfig(
        db=args.db,
        listen=args.listen,
        metrics_listen=args.metrics_listen,
        prefixes=args.prefixes,
        asn_mmdb=args.asn_mmdb,
        ipasn=args.ipasn,
        as_names=args.as_names,
        cdn_asns=args.cdn_asns,
        country_mmdb=args.country_mmdb,
        planner=planner,
        replan_every=args.replan_every,
        policy=policy,
        buckets=args.buckets or DEFAULT_BUCKETS,
        deadlines=planner.deadlines,
        metrics_max_age=args.metrics_max_age,
        tls=tls,
        require_tokens=require_tokens,
        max_results_per_second=args.max_results_per_second or None,
        results_burst=args.results_burst or None,
        flush_every=args.flush_every,
        lease_seconds=args.lease_time,
        log_key_file=args.log_key_file,
        checkpoint_every=args.checkpoint_every,
        verify_workers=max(0, args.verify_workers),
    )
    asyncio.run(serve(config))
    return 0


def _report(args: configargparse.Namespace) -> int:
    now = time.time()
    options = {
        "min_reports": args.min_reports,
        "deadline": (args.deadline or [DEFAULT_DEADLINES[-1]])[0],
        "order_deadline": args.order_deadline,
        "latency_end": args.latency_end,
    }
    if args.compare and args.format == "html":
        print("takedown-collector report: --compare has no html format", file=sys.stderr)
        return 2
    conn = connect_readonly(args.db)
    try:
        if args.compare:
            current, previous = windows(args.since, args.until, now)
            rows = compare_windows(
                url_outcomes(conn, *current), url_outcomes(conn, *previous), now, **options
            )
            text = render_comparison(rows, args.format, current, previous)
            outcomes = url_outcomes(conn, *current)
        else:
            outcomes = url_outcomes(conn, args.since, args.until)
            table = provider_table(outcomes, now, **options)
            if args.format == "html":
                text = _html_page(args, table, outcomes, now, options["deadline"])
            else:
                text = render(table, args.format, min_reports=args.min_reports)
    finally:
        conn.close()
    if args.output is None:
        sys.stdout.write(text)
    else:
        args.output.write_text(text, encoding="utf-8")
        print(f"report written to {args.output}", file=sys.stderr)
    if args.plot:
        by_provider = _by_provider(outcomes)
        drawn = plot_survival(
            by_provider,
            args.plot,
            now,
            top=args.plot_top,
            latency_end=args.latency_end,
            deadline=options["deadline"],
        )
        print(f"survival curves of {len(drawn)} providers written to {args.plot}", file=sys.stderr)
    return 0


def _by_provider(outcomes: Sequence[UrlOutcome]) -> dict[str, list[UrlOutcome]]:
    by_provider: dict[str, list[UrlOutcome]] = {}
    for o in outcomes:
        by_provider.setdefault(o.provider, []).append(o)
    return by_provider


def _html_page(
    args: configargparse.Namespace,
    table: Sequence[Any],
    outcomes: Sequence[UrlOutcome],
    now: float,
    deadline: float,
) -> str:
    """The html report from the same records --format json prints, with the top curves."""
    by_provider = _by_provider(outcomes)
    drawn = sorted(by_provider, key=lambda p: (-sum(o.reports for o in by_provider[p]), p))
    curves = {}
    for provider in drawn[: args.plot_top]:
        items = by_provider[provider]
        durations, _ = survival_data(items, now, args.latency_end)
        curves[provider] = (
            survival_curve(items, now, args.latency_end),
            max(durations, default=0.0),
        )
    return render_html(
        [record(r) for r in table],
        curves,
        Window(args.since, args.until, now),
        method=method_label(args.latency_end),
        deadline=deadline,
        min_reports=args.min_reports,
        latency_end=args.latency_end,
    )


def _url(args: configargparse.Namespace) -> int:
    key: int | str = int(args.key) if args.key.isdigit() else args.key
    conn = connect_readonly(args.db)
    try:
        history = url_history(conn, key)
    finally:
        conn.close()
    if history is None:
        print(f"takedown-collector url: no URL {args.key!r} in {label(args.db)}", file=sys.stderr)
        return 1
    regimes = tuple(args.deadline or DEFAULT_DEADLINES)
    sys.stdout.write(
        render_timeline(history, time.time(), args.format, regimes, args.order_deadline)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
