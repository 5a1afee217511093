"""The demo: a real collector, two real agents and a sample hoster, all on loopback.

It runs exactly the production programs (`takedown-collector serve`,
`takedown-agent`, `takedown-collector import` and `report`) as separate
processes; only the hoster is a stand-in, serving eight pages on two
addresses that the prefix table maps to two providers. Four pages are removed
a few seconds after the notice, one is blocked for one agent's network, one
answers 503 for a while. The demo waits until the removals are measured, then
prints the metrics and the provider table, and writes the table as an html page (--html).

It is secured as in production: a private CA (`takedown-collector ca`) signs
the collector's certificate and one client certificate per agent (mutual
TLS), each agent has its own token (`agents add`) and the import uses an
intake token (`intake-tokens add`) and a certificate of its own; tokens are
passed in 0600 files.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from demo.hoster import Fate, Hoster

HOSTS = {"127.0.0.10": "Example Hosting A", "127.0.0.11": "Example Hosting B"}
AGENTS = [("agent-ams", "nl-ams-demo", "127.0.0.2"), ("agent-fra", "de-fra-demo", "127.0.0.3")]
PAGES = {
    "127.0.0.10": [("/gallery/1", Fate.GONE_404, 4), ("/gallery/2", Fate.REPLACED, 8),
                   ("/gallery/3", None, 0), ("/blocked", None, 0)],
    "127.0.0.11": [("/files/a", Fate.GONE_410, 6), ("/files/b", Fate.REDIRECT, 10),
                   ("/files/c", Fate.UNAVAILABLE_503, 5), ("/files/d", None, 0)],
}  # fmt: skip
AGENT_NAMES = [name for name, _, _ in AGENTS]
HOTLINE = "demo-hotline"
REMOVALS_MEASURED = "takedown_removal_latency_seconds_count"
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def collector_command(*args: str) -> list[str]:
    return [str(BIN / "takedown-collector"), *args]


def write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)


async def secure(state: Path, db: Path) -> Path:
    """Make the CA, certificates and tokens the demo's processes use; return the CA directory."""

    async def run(*args: str) -> str:
        done = await asyncio.to_thread(
            subprocess.run, collector_command(*args), check=True, capture_output=True, text=True
        )
        return done.stdout

    ca = state / "ca"
    tokens: dict[str, str] = {}

    async def token(kind: str, name: str, *extra: str) -> None:
        tokens[name] = await run(kind, "add", name, "--db", str(db), *extra)

    # The first step creates the CA and the database; the rest run side by side.
    await asyncio.gather(
        run("ca", "init", str(ca)), token("agents", AGENTS[0][0], "--network", AGENTS[0][1])
    )
    await asyncio.gather(
        run("ca", "issue", str(ca), "--name", "collector", "--server", "--ip", "127.0.0.1"),
        *(run("ca", "issue", str(ca), "--name", name) for name in [*AGENT_NAMES, HOTLINE]),
        *(token("agents", name, "--network", network) for name, network, _ in AGENTS[1:]),
        token("intake-tokens", HOTLINE),
    )
    for name, text in tokens.items():
        write_private(state / f"{name}.token", text)
    return ca


def spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    handle = log.open("wb")
    return subprocess.Popen(args, stdout=handle, stderr=subprocess.STDOUT)


async def metrics(port: int) -> str:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/metrics") as response,
    ):
        return await response.text()


def sample_sum(text: str, name: str) -> float:
    """The sum of the samples called `name` in a /metrics text."""
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    )


async def run(state: Path, give_up_after: float, html_page: Path) -> int:
    hoster = Hoster()
    port = free_port()
    for pages in PAGES.values():
        for path, _, _ in pages:
            hoster.add(path, blocked_for=["127.0.0.3"] if path == "/blocked" else [])
    await hoster.start(HOSTS, port)
    prefixes = state / "prefixes.csv"
    prefixes.write_text(
        "prefix,asn,provider\n"
        + "".join(f"{ip}/32,{64500 + i},{name}\n" for i, (ip, name) in enumerate(HOSTS.items()))
    )
    grpc_port, metrics_port = free_port(), free_port()
    db = state / "collector.db"
    print("== a private CA, certificates for the collector and each agent, one token each")
    ca = await secure(state, db)
    procs = [
        spawn(
            [str(BIN / "takedown-collector"), "serve", "--db", str(db),
             "--listen", f"127.0.0.1:{grpc_port}", "--metrics-listen", f"127.0.0.1:{metrics_port}",
             "--prefixes", str(prefixes), "--probe-interval", "1s", "--confirmations", "2",
             "--deadline", "10s", "--deadline", "24h",
             "--cert-file", str(ca / "collector.pem"), "--key-file", str(ca / "collector.key"),
             "--client-ca-file", str(ca / "ca.pem")],
            state / "collector.log",
        )
    ]  # fmt: skip
    try:
        await wait_for_port(grpc_port, 20)
        for name, network, source in AGENTS:
            procs.append(
                spawn(
                    [str(BIN / "takedown-agent"), "--collector", f"127.0.0.1:{grpc_port}",
                     "--name", name, "--network", network, "--source-address", source,
                     "--allow-private", "127.0.0.0/8", "--first-spread", "1",
                     "--flush-interval", "0.5", "--metrics-listen", f"127.0.0.1:{free_port()}",
                     "--ca-file", str(ca / "ca.pem"),
                     "--cert-file", str(ca / f"{name}.pem"), "--key-file", str(ca / f"{name}.key"),
                     "--token-file", str(state / f"{name}.token")],
                    state / f"{name}.log",
                )
            )  # fmt: skip
        # Every vantage point first, as in a deployment: a URL reported while only the blocked
        # network's agent had reached it could be confirmed removed on that agent alone.
        await wait_for_agents(metrics_port, len(AGENTS), 60)
        notified = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        reports = state / "reports.csv"
        reports.write_text(
            "url,notified_at,reference\n"
            + "".join(
                f"http://{address}:{port}{path},{notified},DEMO-{address[-2:]}-{i}\n"
                for address, pages in PAGES.items()
                for i, (path, _, _) in enumerate(pages)
            )
        )
        print(f"== importing {reports}")
        await asyncio.to_thread(
            subprocess.run,
            [str(BIN / "takedown-collector"), "import", str(reports),
             "--collector", f"127.0.0.1:{grpc_port}", "--ca-file", str(ca / "ca.pem"),
             "--cert-file", str(ca / f"{HOTLINE}.pem"), "--key-file", str(ca / f"{HOTLINE}.key"),
             "--token-file", str(state / f"{HOTLINE}.token")],
            check=True,
        )  # fmt: skip
        start = time.monotonic()
        changes = sorted(
            (delay, path, fate)
            for pages in PAGES.values()
            for path, fate, delay in pages
            if fate is not None
        )
        print("== the hoster will remove 4 pages and answer 503 for one, over ~10 s")
        expected = sum(1 for _, _, fate in changes if fate is not Fate.UNAVAILABLE_503)
        deadline = start + give_up_after
        while time.monotonic() < deadline:
            elapsed = time.monotonic() - start
            while changes and changes[0][0] <= elapsed:
                _, path, fate = changes.pop(0)
                hoster.set_fate(path, fate)
                print(f"   t={elapsed:4.1f}s hoster: {path} -> {fate.value}")
            measured = sample_sum(await metrics(metrics_port), REMOVALS_MEASURED)
            if not changes and measured >= expected:
                break
            await asyncio.sleep(0.5)
        else:
            print("!! the removals were not all measured in time; see the logs in", state)
            return 1
        print("\n== /metrics (excerpt)")
        shown = ("takedown_removal_latency_seconds_count", "takedown_removal_latency_seconds_sum",
                 "takedown_urls{", "takedown_overdue_urls", "takedown_agent_connected")  # fmt: skip
        for line in (await metrics(metrics_port)).splitlines():
            if line.startswith(shown):
                print("  ", line)
        print("\n== takedown-collector report (overdue: the demo's 10 s deadline, as in /metrics)")
        report = [str(BIN / "takedown-collector"), "report", "--db", str(db), "--deadline", "10s"]
        await asyncio.to_thread(subprocess.run, report, check=True)
        page = [*report, "--format", "html", "-o", str(html_page)]
        await asyncio.to_thread(subprocess.run, page, check=True, capture_output=True)
        print(f"\n== the report as a page (open it in a browser): {html_page}")
        return 0
    finally:
        for proc in reversed(procs):
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        await hoster.stop()


async def wait_for_agents(metrics_port: int, count: int, within: float) -> None:
    """Poll the collector's /metrics until `count` agents hold a stream."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        with contextlib.suppress(aiohttp.ClientError):
            text = await metrics(metrics_port)
            if sample_sum(text, "takedown_agent_connected") >= count:
                return
        await asyncio.sleep(0.2)
    raise SystemExit(f"the {count} agents did not connect within {within:.0f} s")


async def wait_for_port(port: int, within: float) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        await asyncio.sleep(0.1)
    raise SystemExit(f"the collector did not start listening on port {port}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--state", type=Path, help="keep database and logs here (default: temp)")
    parser.add_argument("--timeout", type=float, default=90.0, help="give up after this many s")
    parser.add_argument(
        "--html",
        type=Path,
        default=Path(tempfile.gettempdir()) / "takedown-demo-report.html",
        help="write the html report here (kept after the demo)",
    )
    args = parser.parse_args()
    state = args.state or Path(tempfile.mkdtemp(prefix="takedown-demo-"))
    state.mkdir(parents=True, exist_ok=True)
    print(f"== state (database, logs) in {state}")
    code = asyncio.run(run(state, args.timeout, args.html.resolve()))
    if args.state is None and code == 0 and not os.environ.get("KEEP_DEMO_STATE"):
        shutil.rmtree(state)
    return code


if __name__ == "__main__":
    sys.exit(main())
