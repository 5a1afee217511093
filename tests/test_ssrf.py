"""SSRF: the address an agent actually connects to is checked on every hop, right before connecting.

The prober checks every address twice before a socket connects to it: when a name resolves
(`GuardedResolver`, DNS time) and in the socket factory aiohttp calls for each connection attempt,
literal IP hosts included (connect time). aiohttp connects to exactly the addresses the resolver
returned, with no second lookup, and every new connection resolves afresh, so a name rebound
between two hops is caught on the hop that uses it. The tests prove "no connection" with a
connection counter on each internal server and a recorder of every `sock_connect` the event loop
makes.

What can be exercised where:

- Everywhere (loopback): an "Internet" stand-in on 127.0.0.2 made public by allowing exactly
  127.0.0.2/32, and internal servers on 127.0.0.1. Addresses that are not reachable here
  (169.254.169.254, CGNAT, NAT64, 6to4, multicast) are checked by their error class and by the
  recorder seeing no connection attempt; allowing them is checked by the policy alone, so a test
  never sends a packet to a real metadata service or carrier network of the machine it runs on.
  TEST-NET (192.0.2.0/24) cannot stand in for a public first answer: it is refused itself.
- As root with iproute2 (CI): an agent network namespace whose own uplink address 100.128.0.1 is
  globally routable, a "world" namespace behind a veth pair serving a public hoster on
  100.129.0.10 (port 80), and in the agent's namespace internal servers on 127.0.0.1,
  169.254.169.254, 100.64.0.1, 64:ff9b::a9fe:a9fe, 2002:a9fe:a9fe::1 and 64:ff9b::7f00:1 (stand-ins
  for a metadata service, a CGNAT neighbour, a NAT64 and a 6to4 relay that would reach them). A
  name that first resolves to the truly public hoster and then to 127.0.0.1 is a real rebinding,
  every refused target is really reachable (the exact-CIDR allow shows it answering), and the
  agent's own global address is refused without being listed anywhere.

The connect-time check is also tested alone, with the DNS-time filter replaced by a pass-through.
Not covered by either: an address that connects somewhere other than it names (0.0.0.0 or ::
reach the host itself); they are refused by default, and only the peer check after the response
headers would notice if an operator allowed them.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ipaddress
import os
import secrets
import shutil
import socket
import sys
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field

import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.typedefs import Handler
from yarl import URL

import agent.probe
from agent.guard import AddressPolicy, ForbiddenAddress, is_host_address
from agent.probe import ProbeConfig, Prober
from agent.result import ErrorClass, ProbeResult

FAST = ProbeConfig(total_timeout=5, connect_timeout=1, read_timeout=2)


class Answers(AbstractResolver):
    """A resolver answering each name from a list of answers, one list per lookup (last repeats)."""

    def __init__(self, answers: dict[str, Sequence[Sequence[str]]]) -> None:
        self.answers = answers
        self.lookups: Counter[str] = Counter()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if host not in self.answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        self.lookups[host] += 1
        answers = self.answers[host]
        return [
            ResolveResult(
                hostname=host,
                host=address,
                port=port,
                family=socket.AF_INET6 if ":" in address else socket.AF_INET,
                proto=0,
                flags=0,
            )
            for address in answers[min(self.lookups[host], len(answers)) - 1]
        ]

    async def close(self) -> None:
        pass


class PassThrough(AbstractResolver):
    """Stands in for GuardedResolver to take the DNS-time check out: only connect time is left."""

    def __init__(self, policy: AddressPolicy, inner: AbstractResolver | None = None) -> None:
        assert inner is not None
        self._inner = inner

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        return await self._inner.resolve(host, port, family)

    async def close(self) -> None:
        await self._inner.close()


@dataclass
class Site:
    """An aiohttp app counting TCP connections per listening address and requests per path.

    GET /to?location=URL redirects there; anything else answers 200 with the site's name.
    """

    name: str
    connections: Counter[str] = field(default_factory=Counter)
    requests: list[str] = field(default_factory=list)
    port: int = 0
    _runner: web.AppRunner | None = None
    _servers: list[asyncio.AbstractServer] = field(default_factory=list)

    @web.middleware
    async def _record(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self.requests.append(request.path_qs)
        return await handler(request)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.path == "/to":
            raise web.HTTPFound(request.query["location"])
        return web.Response(text=f"{self.name} answered {request.path}")

    async def start(self, addresses: Sequence[str], port: int = 0) -> int:
        app = web.Application(middlewares=[self._record])
        app.router.add_get("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        loop = asyncio.get_running_loop()
        for address in addresses:
            server = await loop.create_server(
                self._counting(address), address, port or self.port or None
            )
            self._servers.append(server)
            self.port = self.port or server.sockets[0].getsockname()[1]
        return self.port

    def _counting(self, address: str) -> Callable[[], asyncio.Protocol]:
        """aiohttp's protocol factory, counting each accepted connection on `address`."""
        assert self._runner is not None and self._runner.server is not None
        handler_factory = self._runner.server

        def factory() -> asyncio.Protocol:
            self.connections[address] += 1
            return handler_factory()

        return factory

    async def stop(self) -> None:
        for server in self._servers:
            server.close()
            await server.wait_closed()
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def connects(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every address the loop's sock_connect is asked to connect to (how the prober connects)."""
    loop = asyncio.get_running_loop()
    seen: list[str] = []
    original = loop.sock_connect

    async def recording(sock: socket.socket, address: tuple[object, ...]) -> None:
        seen.append(str(address[0]))
        await original(sock, address)

    monkeypatch.setattr(loop, "sock_connect", recording)
    return seen


async def probe(
    url: str, policy: AddressPolicy, resolver: AbstractResolver | None = None
) -> ProbeResult:
    async with Prober(FAST, policy, resolver=resolver or Answers({})) as prober:
        return await prober.probe(1, url)


def refused(r: ProbeResult, target: str, redirects: int = 1) -> None:
    assert (r.error, r.status, r.redirects) == (ErrorClass.FORBIDDEN_ADDRESS, 0, redirects), r
    assert r.final_url == str(URL(target)) and r.peer_ip == "", r  # yarl's spelling of the host


def has_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


# --- everywhere: loopback stand-ins ----------------------------------------------------------

PUBLIC = "127.0.0.2"  # the Internet, as far as these tests go
STAND_IN = AddressPolicy.build([f"{PUBLIC}/32"])


@pytest.fixture
async def sites() -> AsyncIterator[tuple[Site, Site]]:
    """(public, internal): the public stand-in on 127.0.0.2, internal on 127.0.0.1, same port."""
    for _ in range(20):  # the port free on 127.0.0.1 may be taken on 127.0.0.2
        internal, public = Site("internal"), Site("public")
        port = await internal.start(["127.0.0.1"])
        try:
            await public.start([PUBLIC], port)
            break
        except OSError:
            await public.stop()
            await internal.stop()
    else:
        pytest.fail("no port free on both 127.0.0.1 and 127.0.0.2")
    yield public, internal
    await public.stop()
    await internal.stop()


@pytest.mark.integration
class TestLoopback:
    async def test_rebound_name_refused_on_the_redirect_hop(
        self, sites: tuple[Site, Site], connects: list[str]
    ) -> None:
        """rebind.test is the public stand-in for the first hop and 127.0.0.1 for the redirect:
        the second lookup is checked, the hop refused, and nothing connects to 127.0.0.1;
        allowing exactly 127.0.0.1/32 follows it (so the counter would have seen a miss)."""
        public, internal = sites
        url = f"http://rebind.test:{public.port}/to?location=/secret"
        target = f"http://rebind.test:{public.port}/secret"
        resolver = Answers({"rebind.test": [[PUBLIC], ["127.0.0.1"]]})
        r = await probe(url, STAND_IN, resolver)
        refused(r, target)
        assert resolver.lookups["rebind.test"] == 2
        assert (connects, internal.connections, internal.requests) == ([PUBLIC], Counter(), [])

        opened = AddressPolicy.build([f"{PUBLIC}/32", "127.0.0.1/32"])
        r = await probe(url, opened, Answers({"rebind.test": [[PUBLIC], ["127.0.0.1"]]}))
        assert (r.error, r.status, r.peer_ip) == (ErrorClass.NONE, 200, "127.0.0.1")
        assert internal.requests == ["/secret"]

    @pytest.mark.parametrize(
        "target",
        [
            "http://169.254.169.254/latest/meta-data/",
            "http://100.64.0.1/",
            "http://100.127.255.254/",
            "http://169.254.0.1/",
            "http://224.0.0.1/",
            "http://239.255.255.250/",
            "http://0.0.0.0/",
            "http://[::1]/",
            "http://[::]/",
            "http://[fe80::1]/",
            "http://[ff02::1]/",
            "http://[fd00::2]/",
            "http://[::ffff:169.254.169.254]/",
            "http://[64:ff9b::a9fe:a9fe]/",
            "http://[64:ff9b::7f00:1]/",
            "http://[64:ff9b::a00:1]/",
            "http://[2002:a9fe:a9fe::1]/",
            "http://[2002:7f00:1::1]/",
            "http://[2002:6440:1::1]/",
            "http://[2001:0:a00:1:8000:63bf:f7f7:f7f7]/",
        ],
    )
    async def test_redirect_to_internal_address_refused(
        self, sites: tuple[Site, Site], connects: list[str], target: str
    ) -> None:
        """A redirect from the public stand-in to an internal literal is refused before any
        connection attempt to it."""
        public, internal = sites
        r = await probe(f"http://{PUBLIC}:{public.port}/to?location={target}", STAND_IN)
        refused(r, target)
        assert connects == [PUBLIC] and internal.connections == Counter()

    @pytest.mark.parametrize(
        ("address", "exact"),
        [
            ("169.254.169.254", "169.254.169.254/32"),
            ("100.64.0.1", "100.64.0.1/32"),
            ("224.0.0.1", "224.0.0.1/32"),
            ("fe80::1", "fe80::1/128"),
            ("::ffff:169.254.169.254", "169.254.169.254/32"),
            ("64:ff9b::a9fe:a9fe", "169.254.169.254/32"),
            ("64:ff9b::7f00:1", "127.0.0.1/32"),
            ("2002:a9fe:a9fe::1", "169.254.169.254/32"),
            ("2002:7f00:1::1", "127.0.0.1/32"),
        ],
    )
    async def test_name_to_internal_address_refused(
        self, sites: tuple[Site, Site], connects: list[str], address: str, exact: str
    ) -> None:
        """A public-looking name resolving to an internal address is refused with no connection
        attempt; the policy allows it with exactly its CIDR (for IPv6 forms carrying an IPv4
        address: the carried one's), and not with the CIDR next to it."""
        _, internal = sites
        resolver = Answers({"www.example.com": [[address]]})
        r = await probe("http://www.example.com/", STAND_IN, resolver)
        refused(r, "http://www.example.com/", redirects=0)
        assert connects == [] and internal.connections == Counter()

        net = ipaddress.ip_network(exact)
        beside = ipaddress.ip_network(f"{net.network_address + 1}/{net.prefixlen}")
        assert AddressPolicy.build([exact]).is_allowed(address)
        assert not AddressPolicy.build([str(beside), f"{PUBLIC}/32"]).is_allowed(address)
        AddressPolicy.build([exact]).check_connect(address)

    @pytest.mark.skipif(not has_ipv6(), reason="needs IPv6 for IPv4-mapped sockets")
    async def test_mapped_loopback_refused_then_allowed_by_exact_cidr(
        self, sites: tuple[Site, Site], connects: list[str]
    ) -> None:
        """[::ffff:127.0.0.1] reaches 127.0.0.1 on a dual-stack socket: refused without
        allow-private, followed with 127.0.0.1/32 (the counter sees that one connection), still
        refused with 127.0.0.0/32 or 127.0.0.2/31."""
        public, internal = sites
        target = f"http://[::ffff:127.0.0.1]:{public.port}/secret"
        url = f"http://{PUBLIC}:{public.port}/to?location={target}"
        for near in ([], ["127.0.0.0/32"], ["127.0.0.2/31"]):
            r = await probe(url, AddressPolicy.build([f"{PUBLIC}/32", *near]))
            refused(r, target)
        assert internal.connections == Counter() and set(connects) == {PUBLIC}
        r = await probe(url, AddressPolicy.build([f"{PUBLIC}/32", "127.0.0.1/32"]))
        assert (r.error, r.status, r.peer_ip) == (ErrorClass.NONE, 200, "127.0.0.1")
        assert internal.connections == Counter({"127.0.0.1": 1})

    async def test_connect_time_check_alone(
        self, sites: tuple[Site, Site], connects: list[str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """With the DNS-time filter taken out, the socket factory still refuses 127.0.0.1 on the
        rebound hop before connecting, and of a name with a forbidden and an allowed address
        it connects only to the allowed one."""
        monkeypatch.setattr(agent.probe, "GuardedResolver", PassThrough)
        public, internal = sites
        resolver = Answers({"rebind.test": [[PUBLIC], ["127.0.0.1"]]})
        r = await probe(f"http://rebind.test:{public.port}/to?location=/x", STAND_IN, resolver)
        refused(r, f"http://rebind.test:{public.port}/x")
        assert connects == [PUBLIC] and internal.connections == Counter()

        both = Answers({"both.test": [["127.0.0.1", PUBLIC]]})
        r = await probe(f"http://both.test:{public.port}/ok", STAND_IN, both)
        assert (r.error, r.status, r.peer_ip) == (ErrorClass.NONE, 200, PUBLIC)
        assert connects == [PUBLIC, PUBLIC] and internal.connections == Counter()

    async def test_own_address_refused_even_in_allowed_range(
        self, sites: tuple[Site, Site], connects: list[str]
    ) -> None:
        """An address listed as the agent's own is refused even inside an allowed range."""
        public, _ = sites
        policy = AddressPolicy.build(["127.0.0.0/8"], own=[PUBLIC])
        r = await probe(f"http://{PUBLIC}:{public.port}/", policy)
        assert (r.error, r.status) == (ErrorClass.FORBIDDEN_ADDRESS, 0)
        assert connects == [] and public.connections == Counter()
        with pytest.raises(ForbiddenAddress, match="own address"):
            policy.check_connect(f"::ffff:{PUBLIC}")

    def test_host_addresses_are_recognised(self) -> None:
        """is_host_address asks the routing table: loopback is this host, TEST-NET-3 is not."""
        assert is_host_address(ipaddress.ip_address("127.0.0.1"))
        assert not is_host_address(ipaddress.ip_address("203.0.113.77"))
        if has_ipv6():
            assert is_host_address(ipaddress.ip_address("::1"))
            assert is_host_address(ipaddress.ip_address("::ffff:127.0.0.1"))


# --- as root: an agent namespace with a global address and a world behind a veth ------------

AGENT_ADDRESS = "100.128.0.1"  # the agent's own uplink address: globally routable
WORLD_GATEWAY = "100.128.0.2"
WORLD_HOSTER = "100.129.0.10"  # the public hoster
INTERNAL = {  # address on the agent's loopback -> what it stands for
    "127.0.0.1": "the agent's loopback",
    "169.254.169.254": "a cloud metadata service",
    "100.64.0.1": "a CGNAT neighbour",
    "64:ff9b::a9fe:a9fe": "a NAT64 reaching the metadata service",
    "64:ff9b::7f00:1": "a NAT64 reaching loopback",
    "2002:a9fe:a9fe::1": "a 6to4 relay reaching the metadata service",
}
CLONE_NEWNET = 0x40000000


def _ip(*args: str) -> None:
    from tests.netns import ip

    ip(*args)


@dataclass
class World:
    agent_ns: str
    world_ns: str

    @contextlib.contextmanager
    def inside(self, ns: str) -> Iterator[None]:
        """Run this thread (the event loop's) in namespace `ns`: its new sockets belong there."""
        libc = ctypes.CDLL(None, use_errno=True)
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(f"/run/netns/{ns}", os.O_RDONLY)
        try:
            if libc.setns(target, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns into {ns}")
            try:
                yield
            finally:
                if libc.setns(home, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns back home")
        finally:
            os.close(target)
            os.close(home)


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    if not sys.platform.startswith("linux") or os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs Linux, root and iproute2 for network namespaces (CI runs as root)")
    token = secrets.token_hex(3)
    w = World(f"tdm-ssrf-{token}-agent", f"tdm-ssrf-{token}-world")
    made: list[str] = []
    try:
        for ns in (w.agent_ns, w.world_ns):
            try:
                _ip("netns", "add", ns)
            except RuntimeError as exc:
                pytest.skip(f"cannot create network namespaces here: {exc}")
            made.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("link", "add", "up0", "netns", w.agent_ns, "type", "veth",
            "peer", "name", "up1", "netns", w.world_ns)  # fmt: skip
        _ip("-n", w.agent_ns, "addr", "add", f"{AGENT_ADDRESS}/30", "dev", "up0")
        _ip("-n", w.agent_ns, "link", "set", "up0", "up")
        _ip("-n", w.agent_ns, "route", "add", "default", "via", WORLD_GATEWAY)
        _ip("-n", w.world_ns, "addr", "add", f"{WORLD_GATEWAY}/30", "dev", "up1")
        _ip("-n", w.world_ns, "link", "set", "up1", "up")
        _ip("-n", w.world_ns, "addr", "add", f"{WORLD_HOSTER}/32", "dev", "lo")
        for address in INTERNAL:
            if address != "127.0.0.1":
                prefix = "/128" if ":" in address else "/32"
                _ip("-n", w.agent_ns, "addr", "add", address + prefix, "dev", "lo")
        yield w
    finally:
        for ns in made:
            with contextlib.suppress(RuntimeError):
                _ip("netns", "del", ns)


@pytest.fixture
async def stage(world: World) -> AsyncIterator[tuple[Site, Site]]:
    """(hoster, internal): the public hoster in the world, the internal servers (and one on the
    agent's own address, bound to all addresses) in the agent's namespace, all on port 80; the
    test itself then runs in the agent's namespace."""
    hoster, internal = Site("hoster"), Site("internal")
    with world.inside(world.world_ns):
        await hoster.start([WORLD_HOSTER], 80)
    with world.inside(world.agent_ns):
        await internal.start([*INTERNAL, AGENT_ADDRESS], 80)
        try:
            yield hoster, internal
        finally:
            await internal.stop()
            await hoster.stop()


@pytest.mark.integration
class TestAgentNamespace:
    async def test_public_name_rebinds_to_loopback(
        self, stage: tuple[Site, Site], connects: list[str]
    ) -> None:
        """rebind.test resolves to the truly public hoster (default policy, no allow-private),
        which redirects to rebind.test/secret; the second lookup answers 127.0.0.1 and the hop
        is refused with no connection to loopback. With 127.0.0.1/32 allowed the same probe
        reaches the internal server, which proves the counter would have seen it."""
        hoster, internal = stage
        url = "http://rebind.test/to?location=/secret"
        answers = {"rebind.test": [[WORLD_HOSTER], ["127.0.0.1"]]}
        r = await probe(url, AddressPolicy(), Answers(answers))
        refused(r, "http://rebind.test/secret")
        assert hoster.requests == ["/to?location=/secret"]
        assert (connects, internal.connections) == ([WORLD_HOSTER], Counter())

        r = await probe(url, AddressPolicy.build(["127.0.0.1/32"]), Answers(answers))
        assert (r.error, r.status, r.peer_ip) == (ErrorClass.NONE, 200, "127.0.0.1")
        assert internal.connections == Counter({"127.0.0.1": 1})

    @pytest.mark.parametrize(
        ("target", "bound", "exact"),
        [
            ("http://169.254.169.254/latest/meta-data/", "169.254.169.254", "169.254.169.254/32"),
            ("http://[::ffff:169.254.169.254]/", "169.254.169.254", "169.254.169.254/32"),
            ("http://[::ffff:127.0.0.1]/", "127.0.0.1", "127.0.0.1/32"),
            ("http://100.64.0.1/", "100.64.0.1", "100.64.0.1/32"),
            ("http://[64:ff9b::a9fe:a9fe]/", "64:ff9b::a9fe:a9fe", "169.254.169.254/32"),
            ("http://[64:ff9b::7f00:1]/", "64:ff9b::7f00:1", "127.0.0.1/32"),
            ("http://[2002:a9fe:a9fe::1]/", "2002:a9fe:a9fe::1", "169.254.169.254/32"),
            (f"http://{AGENT_ADDRESS}/", AGENT_ADDRESS, f"{AGENT_ADDRESS}/32"),
        ],
    )
    async def test_redirect_to_reachable_internal_target(
        self, stage: tuple[Site, Site], connects: list[str], target: str, bound: str, exact: str
    ) -> None:
        """The public hoster redirects to a target this namespace really reaches: refused with
        the default policy and with the CIDR next to the exact one, no connection to it; with
        exactly its CIDR allowed the probe reaches it once. The agent's own global address is
        refused without being configured anywhere."""
        hoster, internal = stage
        url = f"http://{WORLD_HOSTER}/to?location={target}"
        net = ipaddress.ip_network(exact)
        beside = f"{net.network_address + 1}/{net.prefixlen}"
        for policy in (AddressPolicy(), AddressPolicy.build([beside])):
            refused(await probe(url, policy), target)
        assert set(connects) == {WORLD_HOSTER} and internal.connections == Counter()

        r = await probe(url, AddressPolicy.build([exact]))
        assert (r.error, r.status, r.redirects) == (ErrorClass.NONE, 200, 1), r
        assert internal.connections == Counter({bound: 1})
        assert hoster.connections == Counter({WORLD_HOSTER: 3})

    async def test_names_to_internal_targets_refused(
        self, stage: tuple[Site, Site], connects: list[str]
    ) -> None:
        """Names resolving to each internal target, or to the agent's own address, are refused."""
        _, internal = stage
        for address in [*INTERNAL, AGENT_ADDRESS, "::ffff:169.254.169.254"]:
            r = await probe(
                "http://name.test/", AddressPolicy(), Answers({"name.test": [[address]]})
            )
            refused(r, "http://name.test/", redirects=0)
        assert connects == [] and internal.connections == Counter()

    async def test_connect_time_check_alone(
        self, stage: tuple[Site, Site], connects: list[str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """With the DNS-time filter taken out, the socket factory refuses the metadata address,
        its NAT64 form and the agent's own address before connecting."""
        monkeypatch.setattr(agent.probe, "GuardedResolver", PassThrough)
        hoster, internal = stage
        assert hoster.connections == Counter()
        for address in ("169.254.169.254", "64:ff9b::a9fe:a9fe", AGENT_ADDRESS):
            answers = Answers({"rebind.test": [[WORLD_HOSTER], [address]]})
            r = await probe("http://rebind.test/to?location=/x", AddressPolicy(), answers)
            refused(r, "http://rebind.test/x")
        assert set(connects) == {WORLD_HOSTER} and internal.connections == Counter()
        assert hoster.connections == Counter({WORLD_HOSTER: 3})
