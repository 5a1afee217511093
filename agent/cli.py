"""`takedown-agent`: options from flags, environment (TAKEDOWN_AGENT_*) or TOML ([agent])."""

from __future__ import annotations

import asyncio
import importlib
import ipaddress
import logging
import signal
import socket
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

import configargparse

from agent import __version__
from agent.keys import AgentKeyError
from agent.link import CollectorRefused
from agent.main import Agent, AgentConfig
from agent.probe import ProbeConfig
from agent.spool import SpoolError
from agent.texts import TextsError
from client.credentials import CredentialError, add_client_options, client_security
from client.options import ArgParser, host_port, ip_address, number, optional_host_port

log = logging.getLogger("agent")

AGENTS_ADD_COMMAND = "'takedown-collector agents add NAME'"  # where an agent's token comes from


def _network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError as exc:
        raise configargparse.ArgumentTypeError(f"{text!r} is not a CIDR range") from exc


def _positive(kind: type[int] | type[float], unit: str = "") -> Callable[[str], int | float]:
    return number(kind, 0, unit=unit)


def build_parser() -> configargparse.ArgParser:
    p = ArgParser(
        prog="takedown-agent",
        description="Probe the URLs a Takedown Monitor collector assigns (status and body hash"
        " only; bodies are never kept) and stream the results to it.",
        config_file_parser_class=configargparse.TomlConfigParser(["agent"]),
        auto_env_var_prefix="TAKEDOWN_AGENT_",
    )
    p.add_argument("-c", "--config", is_config_file=True, help="TOML file with an [agent] table")
    p.add_argument(
        "--collector", required=True, type=host_port, help="collector gRPC address, HOST:PORT"
    )
    p.add_argument(
        "--name", default=socket.gethostname(), help="unique agent name (default: the host name)"
    )
    p.add_argument(
        "--network", required=True, help="vantage point label, e.g. nl-ams-isp1 (metrics label)"
    )
    p.add_argument(
        "--source-address",
        type=ip_address,
        help="local address outgoing probes are sent from (choose the egress on multi-homed hosts)",
    )
    p.add_argument(
        "--allow-private",
        nargs="*",
        type=_network,
        default=[],
        metavar="CIDR",
        help="non-public ranges the agent may probe (by default only public addresses)",
    )
    p.add_argument("--concurrency", type=_positive(int), default=256, help="probes at once")
    p.add_argument("--per-host", type=_positive(int), default=4, help="connections per host")
    p.add_argument(
        "--host-backlog",
        type=_positive(int),
        default="256",
        help="due probes one host holds waiting for its connections; more are skipped until"
        " their next due time and counted (takedown_agent_probe_backlog_refused_total)",
    )
    p.add_argument(
        "--verify-tls",
        action="store_true",
        help="fail a probe whose certificate does not verify (tls_error, inconclusive); by"
        " default such a site is probed anyway and the result says the certificate did not"
        " verify",
    )
    p.add_argument(
        "--timeout", type=_positive(float, "seconds"), default="30", help="seconds per probe"
    )
    p.add_argument(
        "--connect-timeout", type=_positive(float, "seconds"), default="10", help="seconds"
    )
    p.add_argument(
        "--read-timeout", type=_positive(float, "seconds"), default="20", help="seconds idle"
    )
    p.add_argument(
        "--max-body-bytes",
        type=_positive(int),
        default=16 * 1024 * 1024,
        help="bytes hashed per probe; longer bodies are marked truncated",
    )
    p.add_argument(
        "--max-redirects",
        type=number(int, 0, 100, open_low=False),
        default=10,
        help="redirect hops followed",
    )
    p.add_argument(
        "--state-dir",
        type=Path,
        help="directory for spool.db: results are kept there until the collector acknowledges"
        " them, with the assignment, so a restart resumes both (default: results in memory,"
        " URL texts in an unnamed temporary file in TMPDIR, gone when the agent exits)",
    )
    p.add_argument(
        "--agent-key-file",
        type=Path,
        metavar="PATH",
        help="the agent's Ed25519 key, which signs its results (PEM, mode 0600); default"
        " STATE_DIR/agent.key, made at first start with agent.pub beside it; without either,"
        " results are unsigned. Not the TLS key (that is --key-file)",
    )
    p.add_argument(
        "--spool-limit",
        type=_positive(int),
        default=1_000_000,
        help="results the spool holds; when full, repeats are dropped first, changes never",
    )
    p.add_argument(
        "--spool-max-bytes",
        type=_positive(int),
        help="bytes the spool holds at most (estimated), on top of --spool-limit",
    )
    p.add_argument(
        "--journal",
        action="store_true",
        help="also keep every spooled result's sequence number in spool.db (for audits; grows)",
    )
    p.add_argument("--batch-size", type=_positive(int), default=500, help="results per message")
    p.add_argument(
        "--flush-interval",
        type=_positive(float, "seconds"),
        default="1",
        help="max seconds a result waits",
    )
    p.add_argument(
        "--max-inflight", type=_positive(int), default=8, help="unacknowledged batches at most"
    )
    p.add_argument(
        "--jitter",
        type=number(float, 0, 1, open_low=False),
        default=0.1,
        help="± fraction of a probe interval, in [0, 1)",
    )
    p.add_argument(
        "--first-spread",
        type=number(float, 0, open_low=False, unit="seconds"),
        default="60",
        help="seconds over which the first probes of new URLs are spread",
    )
    add_client_options(p, "this agent's", AGENTS_ADD_COMMAND)
    p.add_argument(
        "--metrics-listen",
        type=optional_host_port,
        default="127.0.0.1:9465",
        help="HOST:PORT for the agent's /metrics and /healthz; empty to disable",
    )
    p.add_argument(
        "--event-loop",
        default="auto",
        choices=["auto", "asyncio", "uvloop"],
        help="auto: uvloop when it is installed (HTTPS probes cost about a fifth less CPU),"
        " else asyncio's own",
    )
    p.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log level",
    )
    p.add_argument("--version", action="version", version=f"takedown-agent {__version__}")
    return p


def config_from(args: configargparse.Namespace) -> AgentConfig:
    tls, token = client_security(args, AGENTS_ADD_COMMAND)
    probe = ProbeConfig(
        total_timeout=args.timeout,
        connect_timeout=args.connect_timeout,
        read_timeout=args.read_timeout,
        max_body_bytes=args.max_body_bytes,
        max_redirects=args.max_redirects,
        concurrency=args.concurrency,
        per_host=args.per_host,
        source_address=args.source_address,
        verify_tls=args.verify_tls,
        user_agent=f"takedown-monitor-agent/{__version__}",
    )
    return AgentConfig(
        collector=args.collector,
        name=args.name,
        network=args.network,
        probe=probe,
        allow_private=tuple(args.allow_private),
        batch_size=args.batch_size,
        flush_interval=args.flush_interval,
        max_inflight=args.max_inflight,
        jitter=args.jitter,
        host_backlog=args.host_backlog,
        first_spread=args.first_spread,
        metrics_listen=args.metrics_listen or None,
        state_dir=args.state_dir,
        key_file=args.agent_key_file,
        outbox_limit=args.spool_limit,
        spool_max_bytes=args.spool_max_bytes,
        journal=args.journal,
        tls=tls,
        token=token,
    )


async def _run(config: AgentConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await Agent(config).run(stop)


def _event_loop(choice: str) -> Callable[[Coroutine[Any, Any, None]], None]:
    """The function that runs the agent: ``uvloop.run`` or ``asyncio.run``."""
    if choice != "asyncio":
        try:
            uvloop = importlib.import_module("uvloop")  # optional: not a dependency
        except ImportError:
            if choice == "uvloop":
                sys.exit("takedown-agent: --event-loop uvloop, but uvloop is not installed")
        else:
            log.info("event_loop loop=uvloop")
            run: Callable[[Coroutine[Any, Any, None]], None] = uvloop.run
            return run
    log.info("event_loop loop=asyncio")
    return asyncio.run


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    try:
        config = config_from(args)
    except CredentialError as exc:
        print(f"takedown-agent: {exc}", file=sys.stderr)
        return 2
    log.info(
        "agent_starting name=%s network=%s collector=%s",
        config.name,
        config.network,
        config.collector,
    )
    try:
        _event_loop(args.event_loop)(_run(config))
    except (CollectorRefused, CredentialError, AgentKeyError) as exc:
        print(f"takedown-agent: {exc}", file=sys.stderr)
        return 2
    except (SpoolError, TextsError) as exc:
        print(f"takedown-agent: {exc}", file=sys.stderr)
        return 1
    log.info("agent_stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
