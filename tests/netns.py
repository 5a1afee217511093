"""Linux network namespaces for tests/test_netns.py, and the hoster process run inside one.

`Topology.create()` (root and iproute2 needed) builds three namespaces with unique names and
addresses in one random /24 of the benchmarking range 198.18.0.0/15 (b = that /24):

    root ns  b.1 ==veth== b.2   hub ns: collector on b.2; hoster on b.100 and b.101 (lo)
                          b.5 ==veth== b.6   vantage ns 1: agent, route b.0/24 via b.5
                          b.9 ==veth== b.10  vantage ns 2: agent, route b.0/24 via b.9

Nothing forwards packets: every connection ends in the hub, so the two vantage networks cannot
reach each other and the hoster sees each agent's own source address. The root namespace gets
only the /30 of its veth end, to run `takedown-collector import` and scrape /metrics; deleting
the namespaces removes every link and address again.

`python -m tests.netns hoster ...` runs `demo.hoster.Hoster` as a process (started in the hub
with `ip netns exec`) controlled by one-line commands on stdin, answered as JSON on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import secrets
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field

IP_TIMEOUT = 10.0
BENCHMARK = ipaddress.IPv4Network("198.18.0.0/15")


class NetnsUnavailable(Exception):
    """This host cannot build the topology (not root, no iproute2, no namespaces or veth)."""


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run `ip ARGS`; raise RuntimeError naming the command and its stderr when check fails."""
    done = subprocess.run(
        ["ip", *args], capture_output=True, text=True, timeout=IP_TIMEOUT, check=False
    )
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip() or done.returncode}")
    return done


def _routed_networks() -> list[ipaddress.IPv4Network]:
    """IPv4 destinations routed in the root namespace (all tables), default routes left out."""
    out = ip("-4", "-j", "route", "show", "table", "all").stdout
    nets = []
    for route in json.loads(out or "[]"):
        dst = route.get("dst", "default")
        if dst == "default":
            continue
        try:
            nets.append(ipaddress.IPv4Network(dst, strict=False))
        except ValueError:
            continue
    return nets


def _free_block(attempts: int = 32) -> ipaddress.IPv4Network:
    """A random /24 of 198.18.0.0/15 that no root-namespace route overlaps."""
    routed = _routed_networks()
    blocks = list(BENCHMARK.subnets(new_prefix=24))
    for _ in range(attempts):
        block = secrets.choice(blocks)
        if not any(block.overlaps(net) for net in routed):
            return block
    raise NetnsUnavailable("no free /24 in 198.18.0.0/15 (all overlap root-namespace routes)")


@dataclass
class Vantage:
    ns: str
    address: str  # the agent's source address, as the hoster sees it
    gateway: str  # the hub's end of the link


@dataclass
class Topology:
    token: str
    block: ipaddress.IPv4Network
    hub: str
    root_link: str
    root_address: str  # root's end of the root <-> hub link
    hub_address: str  # the collector listens here (gRPC and /metrics)
    hosts: tuple[str, str]  # the hoster's addresses, on the hub's loopback
    vantages: tuple[Vantage, Vantage]
    created: list[str] = field(default_factory=list)  # namespaces to delete

    @classmethod
    def create(cls) -> Topology:
        """Build the namespaces; NetnsUnavailable if this host cannot, RuntimeError on a bug."""
        if not sys.platform.startswith("linux"):
            raise NetnsUnavailable("network namespaces are Linux only")
        if os.geteuid() != 0:
            raise NetnsUnavailable("creating network namespaces needs root (CI runs as root)")
        if shutil.which("ip") is None:
            raise NetnsUnavailable("iproute2 `ip` is not installed (apt-get install iproute2)")
        token = secrets.token_hex(4)
        block = _free_block()
        b = [str(a) for a in block]  # b[n] is the address ending in .n
        topo = cls(
            token=token,
            block=block,
            hub=f"tdm-{token}-hub",
            root_link=f"tdm{token}r",
            root_address=b[1],
            hub_address=b[2],
            hosts=(b[100], b[101]),
            vantages=(
                Vantage(f"tdm-{token}-v1", b[6], b[5]),
                Vantage(f"tdm-{token}-v2", b[10], b[9]),
            ),
        )
        try:
            topo._build()
        except BaseException:
            topo.destroy()
            raise
        return topo

    def _build(self) -> None:
        plen = "/30"
        for ns in (self.hub, *(v.ns for v in self.vantages)):
            done = ip("netns", "add", ns, check=False)
            if done.returncode != 0:
                raise NetnsUnavailable(f"`ip netns add` failed: {done.stderr.strip()}")
            self.created.append(ns)
            ip("-n", ns, "link", "set", "lo", "up")
        peer = ("peer", "name", "root", "netns", self.hub)
        done = ip("link", "add", self.root_link, "type", "veth", *peer, check=False)
        if done.returncode != 0:
            raise NetnsUnavailable(f"cannot create a veth pair: {done.stderr.strip()}")
        ip("addr", "add", self.root_address + plen, "dev", self.root_link)
        ip("link", "set", self.root_link, "up")
        ip("-n", self.hub, "addr", "add", self.hub_address + plen, "dev", "root")
        ip("-n", self.hub, "link", "set", "root", "up")
        for host in self.hosts:
            ip("-n", self.hub, "addr", "add", f"{host}/32", "dev", "lo")
        for i, v in enumerate(self.vantages, start=1):
            hub_end = f"v{i}"
            ip("-n", self.hub, "link", "add", hub_end, "type", "veth",
               "peer", "name", "uplink", "netns", v.ns)  # fmt: skip
            ip("-n", self.hub, "addr", "add", v.gateway + plen, "dev", hub_end)
            ip("-n", self.hub, "link", "set", hub_end, "up")
            ip("-n", v.ns, "addr", "add", v.address + plen, "dev", "uplink")
            ip("-n", v.ns, "link", "set", "uplink", "up")
            ip("-n", v.ns, "route", "add", str(self.block), "via", v.gateway)

    def destroy(self) -> None:
        """Delete the namespaces (and with them every veth); stop their processes first."""
        for ns in reversed(self.created):
            ip("netns", "del", ns, check=False)
        self.created.clear()
        if ip("link", "show", "dev", self.root_link, check=False).returncode == 0:
            ip("link", "del", self.root_link, check=False)


# --- the hoster process --------------------------------------------------------------------


async def _serve_hoster(addresses: list[str], port: int, pages: dict[str, list[str]]) -> None:
    from demo.hoster import Fate, Hoster  # imported here: the helper needs no aiohttp otherwise

    hoster = Hoster()
    for path, blocked_for in pages.items():
        hoster.add(path, blocked_for=blocked_for)
    await hoster.start(addresses, port)
    print(json.dumps({"port": hoster.port}), flush=True)
    try:
        while line := await asyncio.to_thread(sys.stdin.readline):
            words = line.split()
            if words[:1] == ["fate"] and len(words) == 3:
                reply: object = {"at": hoster.set_fate(words[1], Fate(words[2]))}
            elif words == ["requests"]:
                counts = Counter(f"{remote} {path}" for remote, path in hoster.requests)
                reply = {"requests": dict(counts)}
            else:
                reply = {"error": f"unknown command {line.strip()!r}"}
            print(json.dumps(reply), flush=True)
    finally:
        await hoster.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.netns")
    sub = parser.add_subparsers(dest="command", required=True)
    h = sub.add_parser("hoster", help="serve demo.hoster pages; commands on stdin until EOF")
    h.add_argument("--address", action="append", required=True, help="listen address")
    h.add_argument("--port", type=int, required=True)
    h.add_argument("--pages", required=True, help='JSON {"/path": ["blocked client", ...]}')
    args = parser.parse_args(argv)
    asyncio.run(_serve_hoster(args.address, args.port, json.loads(args.pages)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
