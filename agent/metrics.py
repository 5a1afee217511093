"""The agent's own metrics and health endpoint: spool, delivery, stream, probes.

A custom collector reads the running agent's counters at scrape time; labels
are the agent's identity and error classes, never URLs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from agent import __version__

if TYPE_CHECKING:
    from agent.main import Agent


class AgentCollector(Collector):
    """Exports one agent's state; registered on a registry of the agent's own."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        a = self.agent
        info = GaugeMetricFamily(
            "takedown_agent_info", "Agent identity", labels=["agent", "network", "version"]
        )
        info.add_metric([a.config.name, a.config.network, __version__], 1)
        yield info
        yield GaugeMetricFamily(
            "takedown_agent_spool_results",
            "Results held until the collector acknowledges them",
            value=len(a.outbox),
        )
        yield GaugeMetricFamily(
            "takedown_agent_spool_bytes", "Bytes the spool holds", value=a.outbox.bytes
        )
        for name, value, text in (
            ("sent", a.link.sent, "Results sent to the collector, resends included"),
            ("acked", a.outbox.acked, "Results the collector acknowledged"),
            ("redelivered", a.outbox.redelivered, "Results queued again after a lost stream"),
            ("dropped", a.outbox.dropped, "Results dropped because the spool was full"),
        ):
            yield CounterMetricFamily(f"takedown_agent_results_{name}", text, value=value)
        drops = CounterMetricFamily(
            "takedown_agent_spool_drops",
            "Results the full spool dropped, by policy step (repeats first, changes never)",
            labels=["reason"],
        )
        for reason, n in sorted(getattr(a.outbox, "drops_by_reason", {}).items()):
            drops.add_metric([reason], n)
        yield drops
        yield GaugeMetricFamily(
            "takedown_agent_spool_over_limit",
            "Results kept beyond the spool's bound because dropping them would lose a change",
            value=getattr(a.outbox, "over_limit", 0),
        )
        yield CounterMetricFamily(
            "takedown_agent_reconnects", "Reconnects to the collector", value=a.link.reconnects
        )
        yield GaugeMetricFamily(
            "takedown_agent_stream_up",
            "1 while the stream to the collector is open",
            value=1 if a.link.connected else 0,
        )
        yield GaugeMetricFamily(
            "takedown_agent_assigned_urls",
            "URLs in the current assignment",
            value=len(a.assignment),
        )
        probes = CounterMetricFamily(
            "takedown_agent_probes", "Probes made, by error class", labels=["error"]
        )
        for error, n in sorted(a.probes_by_error.items()):
            probes.add_metric([error], n)
        yield probes
        yield from _probing(a)


def _probing(a: Agent) -> Iterator[Metric]:
    """Per-host queues (agent/hosts.py) and the TLS check of the probes made."""
    hosts = a.hosts
    wait = hosts.wait
    yield HistogramMetricFamily(
        "takedown_agent_probe_queue_wait_seconds",
        "Time a due probe waited in its host's backlog for a connection slot",
        buckets=wait.buckets(),
        sum_value=wait.sum,
    )
    refused = CounterMetricFamily(
        "takedown_agent_probe_backlog_refused",
        "Due probes a host's backlog refused (full; or busy: the URL's last probe still"
        " waiting or running); each is tried again at its next due time",
        labels=["reason"],
    )
    for reason, n in sorted(hosts.dropped.items()):
        refused.add_metric([reason], n)
    yield refused
    yield GaugeMetricFamily(
        "takedown_agent_probe_backlog", "Due probes waiting in host backlogs", value=hosts.waiting
    )
    yield GaugeMetricFamily(
        "takedown_agent_probes_running", "Probes running now", value=hosts.running
    )
    yield GaugeMetricFamily(
        "takedown_agent_probe_hosts", "Hosts with a probe waiting or running", value=len(hosts)
    )
    tls = CounterMetricFamily(
        "takedown_agent_probes_tls",
        "Probes made, by whether the final hop's certificate verified (unverified: probed anyway)",
        labels=["check"],
    )
    for check, n in sorted(a.probes_by_tls.items()):
        tls.add_metric([check], n)
    yield tls


async def serve_metrics(agent: Agent, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Start /metrics and /healthz; return the runner (to clean up) and the bound port."""
    registry = CollectorRegistry()
    registry.register(AgentCollector(agent))

    async def metrics(_: web.Request) -> web.Response:
        body = await asyncio.to_thread(generate_latest, registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_: web.Request) -> web.Response:
        stream = "up" if agent.link.connected else "down"
        return web.Response(text=f"ok stream={stream} spool={len(agent.outbox)}\n")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return runner, int(runner.addresses[0][1])  # also on uvloop, whose Server is its own
