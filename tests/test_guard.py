"""Tests for the SSRF address policy and the resolver that applies it."""

from __future__ import annotations

import socket
from ipaddress import IPv4Address, IPv4Network, IPv6Address

import pytest
from aiohttp.abc import AbstractResolver, ResolveResult
from hypothesis import given
from hypothesis import strategies as st

from agent.guard import AddressPolicy, ForbiddenAddress, GuardedResolver

DEFAULT = AddressPolicy()

# (address, allowed by the default policy, words in the refusal)
CASES: list[tuple[str, bool, str]] = [
    ("8.8.8.8", True, ""),
    ("1.1.1.1", True, ""),
    ("100.128.0.0", True, ""),
    ("172.32.0.1", True, ""),
    ("0.0.0.0", False, "unspecified"),
    ("0.1.2.3", False, "unspecified"),
    ("10.1.2.3", False, "private"),
    ("100.64.0.1", False, "carrier-grade NAT"),
    ("100.127.255.255", False, "carrier-grade NAT"),
    ("127.0.0.1", False, "loopback"),
    ("127.255.255.254", False, "loopback"),
    ("169.254.169.254", False, "link-local"),
    ("172.16.0.1", False, "private"),
    ("172.31.255.255", False, "private"),
    ("192.0.0.9", False, "IETF protocol"),
    ("192.0.2.1", False, "documentation"),
    ("192.88.99.1", False, "reserved"),
    ("192.168.1.1", False, "private"),
    ("198.18.0.1", False, "benchmarking"),
    ("198.51.100.7", False, "documentation"),
    ("203.0.113.200", False, "documentation"),
    ("224.0.0.1", False, "multicast"),
    ("233.252.0.1", False, "multicast"),
    ("239.255.255.250", False, "multicast"),
    ("240.0.0.1", False, "reserved"),
    ("255.255.255.255", False, "reserved"),
    ("2606:4700:4700::1111", True, ""),
    ("2001:4860:4860::8888", True, ""),
    ("::", False, "unspecified"),
    ("::1", False, "loopback"),
    ("fe80::1", False, "link-local"),
    ("fe80::1%eth0", False, "link-local"),
    ("fc00::1", False, "unique local"),
    ("fd12:3456::1", False, "unique local"),
    ("fec0::1", False, "site-local"),
    ("ff02::1", False, "multicast"),
    ("2001:db8::1", False, "documentation"),
    ("3fff::1", False, "documentation"),
    ("100::1", False, "discard-only"),
    ("2001:2::1", False, "IETF protocol"),
    ("64:ff9b:1::1", False, "local-use NAT64"),
    ("::1.2.3.4", False, "global unicast"),
    ("5f00::1", False, "global unicast"),
    ("::ffff:8.8.8.8", True, ""),
    ("::ffff:127.0.0.1", False, "IPv4-mapped 127.0.0.1, which is loopback"),
    ("::ffff:10.0.0.1", False, "IPv4-mapped 10.0.0.1, which is private"),
    ("::ffff:169.254.169.254", False, "link-local"),
    ("64:ff9b::808:808", True, ""),
    ("64:ff9b::a00:1", False, "NAT64 10.0.0.1, which is private"),
    ("64:ff9b::7f00:1", False, "NAT64 127.0.0.1, which is loopback"),
    ("2002:808:808::1", True, ""),
    ("2002:7f00:1::1", False, "6to4 127.0.0.1, which is loopback"),
    ("2002:c000:201::1", False, "6to4 192.0.2.1, which is documentation"),
    ("2002:6440:1::1", False, "6to4 100.64.0.1, which is carrier-grade NAT"),
    ("2001:0:4136:e378:8000:63bf:f7f7:f7f7", True, ""),
    ("2001:0:4136:e378:8000:63bf:3fff:fdd2", False, "Teredo 192.0.2.45"),
    ("2001:0:a00:1:8000:63bf:f7f7:f7f7", False, "Teredo 10.0.0.1"),
    ("example.com", False, "not an IP address"),
    ("", False, "not an IP address"),
]


def _embedded_forms(a: IPv4Address) -> dict[str, str]:
    """IPv6 transition forms that carry ``a``."""
    n = int(a)
    return {
        "mapped": f"::ffff:{a}",
        "nat64": str(IPv6Address((0x64FF9B << 96) | n)),
        "6to4": str(IPv6Address((0x2002 << 112) | (n << 80) | 1)),
    }


networks_v4 = st.builds(
    lambda addr, prefix: IPv4Network(f"{addr}/{prefix}", strict=False),
    st.ip_addresses(v=4),
    st.integers(min_value=0, max_value=32),
)
policies = st.builds(
    AddressPolicy,
    allow=st.lists(networks_v4, max_size=3),
    own=st.frozensets(st.ip_addresses(v=4), max_size=2),
)


class TestAddressPolicy:
    @pytest.mark.parametrize(("address", "allowed", "words"), CASES)
    def test_default_policy_table(self, address: str, allowed: bool, words: str) -> None:
        """The default policy allows exactly the globally routable addresses."""
        assert DEFAULT.is_allowed(address) is allowed
        if not allowed:
            with pytest.raises(ForbiddenAddress, match=words.replace(".", r"\.")):
                DEFAULT.check(address)

    def test_refusal_names_address_reason_and_flag(self) -> None:
        """The refusal message says what the address is and how to allow it."""
        with pytest.raises(ForbiddenAddress) as info:
            DEFAULT.check("127.0.0.1")
        assert str(info.value) == (
            "127.0.0.1 is loopback; allow it with --allow-private 127.0.0.0/8"
        )
        assert (info.value.address, info.value.reason) == ("127.0.0.1", "loopback")
        assert isinstance(info.value, OSError) and info.value.errno is None

    def test_allowed_range_opens_only_that_range(self) -> None:
        """An allowed range admits its addresses and nothing next to it."""
        policy = AddressPolicy(allow=[IPv4Network("127.0.0.1/32")])
        assert policy.is_allowed("127.0.0.1")
        assert not policy.is_allowed("127.0.0.2")
        assert not policy.is_allowed("10.0.0.1")

    def test_mapped_form_follows_embedded_allow(self) -> None:
        """::ffff:a is the same endpoint as a, so an allow range for a covers it."""
        policy = AddressPolicy.build(["127.0.0.1/32"])
        assert policy.is_allowed("::ffff:127.0.0.1")
        assert not policy.is_allowed("::ffff:127.0.0.2")

    def test_ipv6_allow_does_not_open_embedded_ipv4(self) -> None:
        """An IPv6 range covering a transition form does not override its IPv4 verdict."""
        policy = AddressPolicy.build(["::ffff:0:0/96", "2002::/16"])
        assert not policy.is_allowed("::ffff:10.0.0.1")
        assert not policy.is_allowed("2002:a00:1::1")

    def test_ipv6_allow_range(self) -> None:
        """An allowed IPv6 range admits link-local or unique-local addresses in it."""
        policy = AddressPolicy.build(["fe80::/10", "fd00::/8"])
        assert policy.is_allowed("fe80::1%eth0")
        assert policy.is_allowed("fd00::2")
        assert not policy.is_allowed("fc00::1")

    def test_own_address_refused_even_when_allowed(self) -> None:
        """The agent's own addresses are refused, also in allowed ranges and mapped forms."""
        policy = AddressPolicy.build(["127.0.0.0/8"], own=["127.0.0.5", "8.8.4.4"])
        assert policy.is_allowed("127.0.0.1")
        assert not policy.is_allowed("127.0.0.5")
        assert not policy.is_allowed("::ffff:8.8.4.4")
        with pytest.raises(ForbiddenAddress, match="own address"):
            policy.check("8.8.4.4")

    def test_non_canonical_ipv4_is_not_an_address(self) -> None:
        """Legacy numeric forms are not parsed as addresses, hence refused."""
        for text in ("2130706433", "127.1", "0x7f.0.0.1"):
            assert not AddressPolicy.build(["0.0.0.0/0"]).is_allowed(text)

    @given(a=st.ip_addresses(v=4), policy=policies)
    def test_embedded_forms_judged_by_ipv4(self, a: IPv4Address, policy: AddressPolicy) -> None:
        """For any IPv4 a and policy, ::ffff:a, NAT64 and 6to4 forms are allowed iff a is."""
        expected = policy.is_allowed(a)
        for form in _embedded_forms(a).values():
            assert policy.is_allowed(form) is expected, form

    @given(a=st.ip_addresses(v=4))
    def test_mapped_matches_plain_under_loopback_allow(self, a: IPv4Address) -> None:
        """With the test policy (127.0.0.0/8 allowed), ::ffff:a is allowed iff a is."""
        policy = AddressPolicy.build(["127.0.0.0/8"])
        assert policy.is_allowed(f"::ffff:{a}") is policy.is_allowed(a)


def _result(host: str) -> ResolveResult:
    return ResolveResult(
        hostname="name.test", host=host, port=80, family=socket.AF_INET, proto=0, flags=0
    )


class StubResolver(AbstractResolver):
    """Answers from a fixed list, or raises a fixed error."""

    def __init__(self, hosts: list[str], error: OSError | None = None) -> None:
        self.hosts = hosts
        self.error = error
        self.closed = False

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if self.error is not None:
            raise self.error
        return [_result(h) for h in self.hosts]

    async def close(self) -> None:
        self.closed = True


class TestGuardedResolver:
    async def test_drops_forbidden_keeps_allowed(self) -> None:
        """Forbidden addresses are dropped from an answer that also has allowed ones."""
        inner = StubResolver(["10.0.0.1", "8.8.8.8", "169.254.169.254", "2606:4700::1"])
        results = await GuardedResolver(DEFAULT, inner).resolve("name.test", 80)
        assert [r["host"] for r in results] == ["8.8.8.8", "2606:4700::1"]

    async def test_all_forbidden_raises(self) -> None:
        """An answer of only forbidden addresses raises ForbiddenAddress for the first."""
        inner = StubResolver(["169.254.169.254", "10.0.0.1"])
        with pytest.raises(ForbiddenAddress, match=r"169\.254\.169\.254 is link-local"):
            await GuardedResolver(DEFAULT, inner).resolve("name.test", 80)

    async def test_empty_answer_is_nxdomain(self) -> None:
        """An empty answer raises gaierror EAI_NONAME rather than returning nothing."""
        with pytest.raises(socket.gaierror) as info:
            await GuardedResolver(DEFAULT, StubResolver([])).resolve("name.test", 80)
        assert info.value.errno == socket.EAI_NONAME

    async def test_gaierror_passes_through(self) -> None:
        """Resolution failures keep their gaierror and errno."""
        error = socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        with pytest.raises(socket.gaierror) as info:
            await GuardedResolver(DEFAULT, StubResolver([], error)).resolve("name.test")
        assert info.value is error

    async def test_close_closes_inner(self) -> None:
        """Closing the guard closes the wrapped resolver."""
        inner = StubResolver([])
        await GuardedResolver(DEFAULT, inner).close()
        assert inner.closed
