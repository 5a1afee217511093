"""Hosts with a self-signed and an expired certificate, probed by a real agent and collector.

Anyone who clicks through a certificate warning still gets the content, so by default such a
host is measured (present, then removed) and the result says the certificate did not verify;
with --verify-tls its probes are tls_error (inconclusive) as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import io
import random
import socket
import ssl
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from pathlib import Path

import pytest
import trustme
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult

from agent.main import Agent
from collector.importer import import_file
from collector.server import Collector
from tests.certs import self_signed
from tests.conftest import agent_config, eventually
from tests.procs import readonly, states

pytestmark = [pytest.mark.integration, pytest.mark.slow]

HOSTS = {"self-signed.test": "127.0.0.13", "expired.test": "127.0.0.14"}
BODY = b"reported content behind a broken certificate"


class Names(AbstractResolver):
    """Resolves the test names to their loopback addresses."""

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if host not in HOSTS:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [
            ResolveResult(
                hostname=host, host=HOSTS[host], port=port, family=socket.AF_INET, proto=0, flags=0
            )
        ]

    async def close(self) -> None:
        pass


def _context(name: str, tmp: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    if name == "expired.test":
        past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=3)
        leaf = trustme.CA().issue_cert(
            name, not_before=past - datetime.timedelta(days=90), not_after=past
        )
        leaf.configure_cert(ctx)
    else:
        cert_pem, key_pem = self_signed(name)
        (tmp / "cert.pem").write_bytes(cert_pem)
        (tmp / "key.pem").write_bytes(key_pem)
        ctx.load_cert_chain(tmp / "cert.pem", tmp / "key.pem")
    return ctx


@contextlib.asynccontextmanager
async def broken_hosts(tmp: Path) -> AsyncIterator[tuple[int, set[str]]]:
    """Both hosts on one port; a path in the returned set answers 404 (removed)."""
    gone: set[str] = set()

    async def page(request: web.Request) -> web.Response:
        if request.path in gone:
            raise web.HTTPNotFound()
        return web.Response(body=BODY)

    app = web.Application()
    app.router.add_get("/{tail:.*}", page)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = 0
    for name, address in HOSTS.items():
        site = web.TCPSite(runner, address, port, ssl_context=_context(name, tmp))
        await site.start()
        port = port or runner.addresses[0][1]
    try:
        yield port, gone
    finally:
        await runner.cleanup()


async def _report(collector: Collector, tmp: Path, urls: Sequence[str]) -> None:
    notified = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())
    csv_file = tmp / "reports.csv"
    csv_file.write_text(
        "url,notified_at,reference\n"
        + "".join(f"{url},{notified},case-{i}\n" for i, url in enumerate(urls))
    )
    target = f"127.0.0.1:{collector.grpc_port}"
    assert await import_file(csv_file, target, out=io.StringIO()) == 0


@contextlib.asynccontextmanager
async def running(collector: Collector, verify_tls: bool) -> AsyncIterator[Agent]:
    base = agent_config(collector, "agent-1", "net-one", "127.0.0.2")
    config = replace(base, probe=replace(base.probe, verify_tls=verify_tls))
    agent = Agent(config, resolver=Names(), rng=random.Random(1))
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        yield agent
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=20)


def _errors(db: Path) -> set[str]:
    with readonly(db) as conn:
        return {e for (e,) in conn.execute("SELECT DISTINCT error FROM results")}


async def test_broken_certificates_are_measured(tmp_path: Path, collector: Collector) -> None:
    """Present and removed are measured behind bad certificates; results say unverified."""
    async with broken_hosts(tmp_path) as (port, gone):
        paths = {name: f"/{name.split('.')[0]}" for name in HOSTS}
        urls = [f"https://{name}:{port}{path}" for name, path in paths.items()]
        await _report(collector, tmp_path, urls)
        db = collector.config.db
        async with running(collector, verify_tls=False) as agent:
            await eventually(
                lambda: set(states(db).values()) == {"available"}, within=30, what="present"
            )
            gone.update(paths.values())
            await eventually(
                lambda: set(states(db).values()) == {"removed"}, within=30, what="removed"
            )
        assert _errors(db) == {"none"}
        assert set(agent.probes_by_tls) == {"unverified"}
        assert agent.probes_by_tls["unverified"] == agent.probed >= 4


async def test_verify_tls_keeps_them_inconclusive(tmp_path: Path, collector: Collector) -> None:
    """With --verify-tls a bad certificate is tls_error, which never counts as removal."""
    async with broken_hosts(tmp_path) as (port, _):
        urls = [f"https://{name}:{port}/page" for name in HOSTS]
        await _report(collector, tmp_path, urls)
        db = collector.config.db
        async with running(collector, verify_tls=True) as agent:
            await eventually(lambda: agent.probed >= 4, within=30, what="probes made")
        await eventually(lambda: bool(_errors(db)), within=10, what="results stored")
        assert _errors(db) == {"tls_error"}
        assert set(states(db).values()) == {"pending"}
