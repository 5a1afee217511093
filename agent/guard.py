"""Which addresses an agent may connect to: the SSRF address policy.

Reported URLs are chosen by strangers, so an agent must not be steered into
its own network (cloud metadata at 169.254.169.254, an admin port on
loopback, the office LAN). Only globally routable addresses are allowed,
unless the operator allows a range with ``--allow-private`` (tests allow
loopback).

Theory of operation. ``AddressPolicy.check`` decides in this order:

1. The agent's own addresses (if given) are refused, even inside an allowed
   range: an explicit deny beats a range allow.
2. IPv6 forms that carry an IPv4 address -- IPv4-mapped ``::ffff:a.b.c.d``,
   NAT64 ``64:ff9b::/96``, 6to4 ``2002::/16`` and Teredo ``2001::/32`` (both
   its server and its client address) -- are judged by the embedded IPv4
   address alone, with the same allow ranges. ``::ffff:a`` *is* ``a`` on a
   dual-stack socket, so it is allowed exactly when ``a`` is; an IPv6 allow
   range covering the outer form has no effect.
3. An address inside an allowed range is allowed.
4. An address in a special-purpose range (IANA special-purpose registries,
   tables below) or, for IPv6, outside global unicast ``2000::/3`` is
   refused; everything else is allowed.

``check`` is pure. ``check_connect``, used right before connecting, adds one
question for the kernel: an address of this host itself (its public address on
a VPS, say) is refused unless an allowed range covers it, because a connection
to it stays on the machine and reaches services a firewall keeps from the
outside. The routing table answers it (see ``is_host_address``), so the
operator need not list the host's addresses and a changed address is seen.

The tables are explicit rather than ``ipaddress.is_global`` because that
property changed between Python patch releases; a policy that decides what
an agent may connect to should not change with the interpreter. Anycast
service ranges inside ``192.0.0.0/24`` and ``2001::/23`` are refused whole:
they host no content.

``GuardedResolver`` applies ``check_connect`` to name resolution. The prober
(``agent/probe.py``) applies it again to every address it is about to connect
to, literal IP hosts included, and checks the connected peer.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver

__all__ = ["AddressPolicy", "ForbiddenAddress", "GuardedResolver", "is_host_address", "parse_ip"]

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network

_V4_SPECIAL: tuple[tuple[IPv4Network, str], ...] = tuple(
    (IPv4Network(net), reason)
    for net, reason in (
        ("0.0.0.0/8", "unspecified ('this network')"),
        ("10.0.0.0/8", "private"),
        ("100.64.0.0/10", "carrier-grade NAT shared space"),
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local"),
        ("172.16.0.0/12", "private"),
        ("192.0.0.0/24", "reserved for IETF protocol assignments"),
        ("192.0.2.0/24", "documentation"),
        ("192.88.99.0/24", "reserved (deprecated 6to4 relay anycast)"),
        ("192.168.0.0/16", "private"),
        ("198.18.0.0/15", "reserved for benchmarking"),
        ("198.51.100.0/24", "documentation"),
        ("203.0.113.0/24", "documentation"),
        ("224.0.0.0/4", "multicast"),
        ("240.0.0.0/4", "reserved"),
    )
)

_V6_SPECIAL: tuple[tuple[IPv6Network, str], ...] = tuple(
    (IPv6Network(net), reason)
    for net, reason in (
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("64:ff9b:1::/48", "local-use NAT64"),
        ("100::/64", "discard-only"),
        ("2001::/23", "reserved for IETF protocol assignments"),
        ("2001:db8::/32", "documentation"),
        ("3fff::/20", "documentation"),
        ("fc00::/7", "unique local (private)"),
        ("fe80::/10", "link-local"),
        ("fec0::/10", "site-local (deprecated)"),
        ("ff00::/8", "multicast"),
    )
)

_GLOBAL_UNICAST = IPv6Network("2000::/3")
_NAT64 = IPv6Network("64:ff9b::/96")


class ForbiddenAddress(OSError):
    """A connection to ``address`` is refused by the address policy."""

    def __init__(self, address: str, reason: str, allow_with: str | None = None) -> None:
        self.address = address
        self.reason = reason
        self.allow_with = allow_with
        message = f"{address} is {reason}"
        if allow_with is not None:
            message += f"; allow it with --allow-private {allow_with}"
        super().__init__(message)


def parse_ip(ip: str | IPAddress) -> IPAddress:
    """Parse an address, dropping an IPv6 zone (``%eth0``), which the policy ignores."""
    addr = ip if isinstance(ip, IPv4Address | IPv6Address) else ipaddress.ip_address(ip)
    if isinstance(addr, IPv6Address) and addr.scope_id is not None:
        return IPv6Address(int(addr))
    return addr


def _embedded_v4(ip: IPv6Address) -> tuple[str, tuple[IPv4Address, ...]] | None:
    """The IPv4 addresses an IPv6 transition address carries, with the form's name."""
    if ip.ipv4_mapped is not None:
        return "IPv4-mapped", (ip.ipv4_mapped,)
    if ip in _NAT64:
        return "NAT64", (IPv4Address(int(ip) & 0xFFFFFFFF),)
    if ip.sixtofour is not None:
        return "6to4", (ip.sixtofour,)
    if ip.teredo is not None:
        return "Teredo", ip.teredo
    return None


def is_host_address(ip: IPAddress) -> bool:
    """Whether ``ip`` is an address of this host, so that a connection to it stays on the machine.

    Asks the routing table without sending anything: a UDP socket connected to one of the host's
    own addresses gets that address (or a loopback address) as its source. An address that is
    not routable at all is not the host's (a TCP connection to it fails anyway).
    """
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.connect((str(ip), 9))
            source = parse_ip(sock.getsockname()[0])
    except (OSError, ValueError):
        return False
    if isinstance(source, IPv6Address) and source.ipv4_mapped is not None:
        source = source.ipv4_mapped
    target = ip.ipv4_mapped if isinstance(ip, IPv6Address) and ip.ipv4_mapped else ip
    return source == target or source.is_loopback


def _special(ip: IPAddress) -> tuple[IPNetwork, str] | None:
    """The special-purpose range holding ``ip`` and its name, if any."""
    if isinstance(ip, IPv4Address):
        for net4, reason in _V4_SPECIAL:
            if ip in net4:
                return net4, reason
        return None
    for net6, reason in _V6_SPECIAL:
        if ip in net6:
            return net6, reason
    if ip not in _GLOBAL_UNICAST:
        return IPv6Network(f"{ip}/128"), "outside IPv6 global unicast 2000::/3"
    return None


@dataclass(frozen=True)
class AddressPolicy:
    """Globally routable addresses plus the operator's allowed ranges (``check`` does no I/O)."""

    allow: Sequence[IPNetwork] = ()
    own: frozenset[IPAddress] = frozenset()

    def __post_init__(self) -> None:
        object.__setattr__(self, "allow", tuple(self.allow))
        object.__setattr__(self, "own", frozenset(parse_ip(addr) for addr in self.own))

    @classmethod
    def build(
        cls, allow: Iterable[IPNetwork | str] = (), own: Iterable[IPAddress | str] = ()
    ) -> AddressPolicy:
        """Build a policy from networks and addresses given as objects or strings."""
        return cls(
            allow=tuple(ipaddress.ip_network(net) for net in allow),
            own=frozenset(parse_ip(addr) for addr in own),
        )

    def check(self, ip: str | IPAddress) -> None:
        """Raise ForbiddenAddress unless a connection to ``ip`` is allowed."""
        try:
            addr = parse_ip(ip)
        except ValueError:
            raise ForbiddenAddress(str(ip), "not an IP address") from None
        refusal = self._refusal(addr)
        if refusal is not None:
            raise refusal

    def check_connect(self, ip: str | IPAddress) -> None:
        """``check``, then refuse an address of this host that no allowed range covers.

        For IPv6 forms carrying IPv4 addresses, the carried addresses are asked about too, and
        as in ``check`` the ranges allowing the carried addresses decide for the outer form.
        Costs a routing-table lookup per address outside the allowed ranges.
        """
        self.check(ip)
        addr = parse_ip(ip)
        embedded = _embedded_v4(addr) if isinstance(addr, IPv6Address) else None
        carried = embedded[1] if embedded else ()
        for candidate in (addr, *carried):
            judged_by = carried if candidate is addr and carried else (candidate,)
            if all(self._in_allowed(a) for a in judged_by) or not is_host_address(candidate):
                continue
            raise ForbiddenAddress(
                str(addr),
                "an address of this host (a connection to it stays on the agent's machine)",
                f"{candidate}/{candidate.max_prefixlen}",
            )

    def _in_allowed(self, ip: IPAddress) -> bool:
        return any(ip.version == net.version and ip in net for net in self.allow)

    def is_allowed(self, ip: str | IPAddress) -> bool:
        """Whether a connection to ``ip`` is allowed."""
        try:
            self.check(ip)
        except ForbiddenAddress:
            return False
        return True

    def _refusal(self, ip: IPAddress) -> ForbiddenAddress | None:
        if ip in self.own:
            return ForbiddenAddress(str(ip), "this agent's own address")
        if isinstance(ip, IPv6Address):
            embedded = _embedded_v4(ip)
            if embedded is not None:
                form, v4s = embedded
                for v4 in v4s:
                    inner = self._refusal(v4)
                    if inner is not None:
                        return ForbiddenAddress(
                            str(ip),
                            f"{form} {inner.address}, which is {inner.reason}",
                            inner.allow_with,
                        )
                return None
        if self._in_allowed(ip):
            return None
        special = _special(ip)
        if special is None:
            return None
        net, reason = special
        return ForbiddenAddress(str(ip), reason, str(net))


class GuardedResolver(AbstractResolver):
    """Resolve through ``inner`` and drop the addresses the policy forbids.

    When every address is forbidden, ForbiddenAddress is raised; resolution
    failures keep their ``socket.gaierror`` so NXDOMAIN stays recognisable.
    The default inner resolver needs a running event loop. ``close`` closes
    ``inner``.
    """

    def __init__(self, policy: AddressPolicy, inner: AbstractResolver | None = None) -> None:
        self._policy = policy
        self._inner = inner if inner is not None else ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        """Resolved addresses of ``host`` that the policy allows."""
        results = await self._inner.resolve(host, port, family)
        allowed: list[ResolveResult] = []
        refusal: ForbiddenAddress | None = None
        for result in results:
            try:
                self._policy.check_connect(result["host"])
            except ForbiddenAddress as exc:
                refusal = refusal or exc
            else:
                allowed.append(result)
        if allowed:
            return allowed
        if refusal is not None:
            raise refusal
        raise socket.gaierror(socket.EAI_NONAME, "name resolved to no addresses")

    async def close(self) -> None:
        """Close the inner resolver."""
        await self._inner.close()
