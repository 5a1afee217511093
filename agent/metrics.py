"""The agent's own metrics and health endpoint: spool, delivery, stream, probes.

`families` reads the running agent's counters at scrape time; labels are the
agent's identity and error classes, never URLs.

Memory (docs/PERFORMANCE.md, agent RSS empty): the text is rendered here, in the
Prometheus text format exactly as prometheus_client's `generate_latest` renders
the same families (its content type too), because importing prometheus_client
(its registry, default process/platform/GC collectors, WSGI/ASGI servers) would
cost the agent about 1.5 MiB of RSS for about twenty families of a few samples. The two
endpoints are served by aiohttp's low-level server (``aiohttp.web_server``,
documented as ``aiohttp.web.Server``), the HTTP protocol handler a
``web.Application`` runs on; importing ``aiohttp.web`` (router, file responses,
websockets, runners) would cost about 1 MiB more for two fixed paths.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from aiohttp.web_request import BaseRequest
from aiohttp.web_response import Response
from aiohttp.web_server import Server

from agent import __version__
from client.exposition import label_value, sample_value

if TYPE_CHECKING:
    from agent.main import Agent

# prometheus_client.exposition.CONTENT_TYPE_LATEST, which the collector's /metrics sends
CONTENT_TYPE = "text/plain; version=1.0.0; charset=utf-8"

Labels = tuple[tuple[str, str], ...]


class Family:
    """One metric family: name, type (gauge, counter, histogram), help and samples.

    A sample is (suffix, labels, value); a counter's samples are named NAME_total.
    """

    __slots__ = ("help", "kind", "name", "samples")

    def __init__(self, name: str, kind: str, help_text: str) -> None:
        self.name = name
        self.kind = kind
        self.help = help_text
        self.samples: list[tuple[str, Labels, float]] = []

    def add(self, value: float, labels: Labels = ()) -> Family:
        self.samples.append(("_total" if self.kind == "counter" else "", labels, value))
        return self


def gauge(name: str, help_text: str, value: float | None = None) -> Family:
    family = Family(name, "gauge", help_text)
    return family if value is None else family.add(value)


def counter(name: str, help_text: str, value: float | None = None) -> Family:
    family = Family(name, "counter", help_text)
    return family if value is None else family.add(value)


def histogram(
    name: str, help_text: str, buckets: Sequence[tuple[str, float]], total: float
) -> Family:
    """Cumulative `buckets` (upper bound text, count), ending with "+Inf"; `total` the sum."""
    family = Family(name, "histogram", help_text)
    for bound, count in buckets:
        family.samples.append(("_bucket", (("le", bound),), count))
    family.samples.append(("_count", (), buckets[-1][1]))
    family.samples.append(("_sum", (), total))
    return family


def render(families: Iterable[Family]) -> bytes:
    """The Prometheus text format of `families` (names and label names are plain ASCII)."""
    out: list[str] = []
    for f in families:
        exposed = f"{f.name}_total" if f.kind == "counter" else f.name
        text = f.help.replace("\\", r"\\").replace("\n", r"\n")
        out.append(f"# HELP {exposed} {text}\n# TYPE {exposed} {f.kind}\n")
        for suffix, labels, value in f.samples:
            if labels:
                pairs = ",".join(f'{k}="{label_value(v)}"' for k, v in sorted(labels))
                out.append(f"{f.name}{suffix}{{{pairs}}} {sample_value(value)}\n")
            else:
                out.append(f"{f.name}{suffix} {sample_value(value)}\n")
    return "".join(out).encode()


def families(a: Agent) -> list[Family]:
    """The agent's metric families, read now."""
    out = [
        gauge("takedown_agent_info", "Agent identity").add(
            1,
            (("agent", a.config.name), ("network", a.config.network), ("version", __version__)),
        ),
        gauge(
            "takedown_agent_spool_results",
            "Results held until the collector acknowledges them",
            len(a.outbox),
        ),
        gauge("takedown_agent_spool_bytes", "Bytes the spool holds", a.outbox.bytes),
    ]
    for name, value, text in (
        ("sent", a.link.sent, "Results sent to the collector, resends included"),
        ("acked", a.outbox.acked, "Results the collector acknowledged"),
        ("redelivered", a.outbox.redelivered, "Results queued again after a lost stream"),
        ("dropped", a.outbox.dropped, "Results dropped because the spool was full"),
    ):
        out.append(counter(f"takedown_agent_results_{name}", text, value))
    drops = counter(
        "takedown_agent_spool_drops",
        "Results the full spool dropped, by policy step (repeats first, changes never)",
    )
    for reason, n in sorted(getattr(a.outbox, "drops_by_reason", {}).items()):
        drops.add(n, (("reason", reason),))
    out.append(drops)
    out.append(
        gauge(
            "takedown_agent_spool_over_limit",
            "Results kept beyond the spool's bound because dropping them would lose a change",
            getattr(a.outbox, "over_limit", 0),
        )
    )
    out.append(
        counter("takedown_agent_reconnects", "Reconnects to the collector", a.link.reconnects)
    )
    out.append(
        gauge(
            "takedown_agent_stream_up",
            "1 while the stream to the collector is open",
            1 if a.link.connected else 0,
        )
    )
    out.append(
        gauge("takedown_agent_assigned_urls", "URLs in the current assignment", len(a.assignment))
    )
    probes = counter("takedown_agent_probes", "Probes made, by error class")
    for error, n in sorted(a.probes_by_error.items()):
        probes.add(n, (("error", error),))
    out.append(probes)
    out.extend(_probing(a))
    return out


def _probing(a: Agent) -> list[Family]:
    """Per-host queues (agent/hosts.py) and the TLS check of the probes made."""
    hosts = a.hosts
    wait = hosts.wait
    refused = counter(
        "takedown_agent_probe_backlog_refused",
        "Due probes a host's backlog refused (full; or busy: the URL's last probe still"
        " waiting or running); each is tried again at its next due time",
    )
    for reason, n in sorted(hosts.dropped.items()):
        refused.add(n, (("reason", reason),))
    tls = counter(
        "takedown_agent_probes_tls",
        "Probes made, by whether the final hop's certificate verified (unverified: probed anyway)",
    )
    for check, n in sorted(a.probes_by_tls.items()):
        tls.add(n, (("check", check),))
    return [
        histogram(
            "takedown_agent_probe_queue_wait_seconds",
            "Time a due probe waited in its host's backlog for a connection slot",
            wait.buckets(),
            wait.sum,
        ),
        refused,
        gauge("takedown_agent_probe_backlog", "Due probes waiting in host backlogs", hosts.waiting),
        gauge("takedown_agent_probes_running", "Probes running now", hosts.running),
        gauge("takedown_agent_probe_hosts", "Hosts with a probe waiting or running", len(hosts)),
        tls,
    ]


METRICS_PATHS = ("/metrics", "/healthz")
_ALLOW = "GET,HEAD"
SHUTDOWN_TIMEOUT = 5.0  # seconds a scrape in progress may take to finish at exit


class MetricsServer:
    """/metrics and /healthz on one listening socket; `close` stops it."""

    def __init__(self, server: asyncio.Server, handler: Server) -> None:
        self._server = server
        self._handler = handler

    @property
    def port(self) -> int:
        return int(self._server.sockets[0].getsockname()[1])  # also on uvloop

    async def close(self) -> None:
        self._server.close()
        await asyncio.sleep(0)  # requests accepted just before the close start first
        self._handler.pre_shutdown()  # idle keep-alive connections close now, as in AppRunner
        await self._handler.shutdown(SHUTDOWN_TIMEOUT)
        await self._server.wait_closed()


async def serve_metrics(agent: Agent, host: str, port: int) -> MetricsServer:
    """Start /metrics and /healthz (GET and HEAD); the server, to close, knows its port."""

    async def handle(request: BaseRequest) -> Response:
        if request.path not in METRICS_PATHS:
            return Response(status=404, text="404: Not Found")
        if request.method not in ("GET", "HEAD"):
            return Response(status=405, text="405: Method Not Allowed", headers={"Allow": _ALLOW})
        if request.path == "/metrics":
            # a few dozen lines from counters in memory: rendered on the loop, in microseconds
            return Response(body=render(families(agent)), headers={"Content-Type": CONTENT_TYPE})
        stream = "up" if agent.link.connected else "down"
        return Response(text=f"ok stream={stream} spool={len(agent.outbox)}\n")

    handler = Server(handle, access_log=None)
    server = await asyncio.get_running_loop().create_server(handler, host, port, backlog=128)
    return MetricsServer(server, handler)
