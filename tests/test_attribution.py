"""Tests for collector.attribution: longest-prefix match and the operator CSV format."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from collector.attribution import (
    UNATTRIBUTED,
    Attribution,
    AttributionFileError,
    Network,
    PrefixTable,
)


def _attr(provider: str, prefix: str, asn: int | None = 64500) -> Attribution:
    return Attribution(provider=provider, asn=asn, country=None, cdn=False, prefix=prefix)


def _table(*rows: tuple[str, str]) -> PrefixTable:
    return PrefixTable((ipaddress.ip_network(prefix), _attr(name, prefix)) for prefix, name in rows)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "prefixes.csv"
    path.write_text(text, encoding="utf-8")
    return path


class TestAttribution:
    def test_asn_label(self) -> None:
        """The AS label reads ASnnn, or AS? when the AS is unknown."""
        assert _attr("x", "10.0.0.0/8", asn=13335).asn_label == "AS13335"
        assert UNATTRIBUTED.asn_label == "AS?"
        assert UNATTRIBUTED.provider == "unattributed"


class TestLookup:
    def test_longest_prefix_wins(self) -> None:
        """A more specific prefix beats the shorter one containing it, whatever the order."""
        table = _table(("10.1.2.0/24", "customer"), ("10.0.0.0/8", "carrier"), ("0.0.0.0/0", "any"))
        assert table.lookup("10.1.2.3").provider == "customer"
        assert table.lookup("10.1.3.3").provider == "carrier"
        assert table.lookup("192.0.2.1").provider == "any"
        assert len(table) == 3

    def test_host_route(self) -> None:
        """A /32 matches exactly one address."""
        table = _table(("198.51.100.7/32", "one"), ("198.51.100.0/24", "net"))
        assert table.lookup("198.51.100.7").provider == "one"
        assert table.lookup("198.51.100.8").provider == "net"

    def test_ipv6(self) -> None:
        """IPv6 prefixes match IPv6 addresses, longest first, and not IPv4 ones."""
        table = _table(("2001:db8::/32", "big"), ("2001:db8:1::/48", "small"), ("0.0.0.0/0", "v4"))
        assert table.lookup("2001:db8:1::5").provider == "small"
        assert table.lookup("2001:db8:2::5").provider == "big"
        assert table.lookup("2001:db9::1") is UNATTRIBUTED
        assert table.lookup("fe80::1%eth0") is UNATTRIBUTED

    def test_ipv6_scope_id(self) -> None:
        """An IPv6 address with a scope id is looked up without it."""
        table = _table(("fe80::/10", "link"))
        assert table.lookup("fe80::1%eth0").provider == "link"

    def test_mapped_ipv4(self) -> None:
        """An IPv4-mapped IPv6 address is looked up as the IPv4 address it carries."""
        table = _table(("192.0.2.0/24", "v4"), ("::/0", "v6 default"))
        assert table.lookup("::ffff:192.0.2.10").provider == "v4"
        assert table.lookup("::ffff:c000:20a").provider == "v4"
        assert table.lookup("::ffff:198.51.100.1") is UNATTRIBUTED

    def test_mapped_network_stored_as_ipv4(self) -> None:
        """A table prefix written as ::ffff:a.b.c.d/n matches the IPv4 address."""
        table = _table(("::ffff:192.0.2.0/120", "mapped"))
        assert table.lookup("192.0.2.1").provider == "mapped"
        assert table.lookup("::ffff:192.0.2.1").provider == "mapped"

    def test_no_match(self) -> None:
        """An address outside every prefix is unattributed."""
        assert _table(("10.0.0.0/8", "x")).lookup("11.0.0.1") is UNATTRIBUTED
        assert PrefixTable([]).lookup("10.0.0.1") is UNATTRIBUTED

    @pytest.mark.parametrize(
        "ip", ["", "garbage", "10.0.0", "10.0.0.256", "010.0.0.1", " 10.0.0.1", "10.0.0.0/8", "::g"]
    )
    def test_garbage_is_unattributed(self, ip: str) -> None:
        """Unparsable input never raises, it is just unattributed."""
        assert _table(("0.0.0.0/0", "any"), ("::/0", "any6")).lookup(ip) is UNATTRIBUTED

    def test_conflicting_duplicate_rejected(self) -> None:
        """The constructor refuses one prefix with two different attributions."""
        with pytest.raises(ValueError, match=re.escape("10.0.0.0/8")):
            _table(("10.0.0.0/8", "a"), ("10.0.0.0/8", "b"))


_V4_NETS = st.builds(
    lambda addr, length: ipaddress.IPv4Network((addr, length), strict=False),
    st.integers(0, 2**32 - 1),
    st.integers(0, 32),
)
_V6_NETS = st.builds(
    lambda addr, length: ipaddress.IPv6Network((addr, length), strict=False),
    st.integers(0, 2**128 - 1) | st.integers(0, 2**40 - 1).map(lambda x: x << 88),
    st.integers(0, 128),
)
_MAPPED_NETS = st.builds(
    lambda addr, length: ipaddress.IPv6Network(((0xFFFF << 32) | addr, 96 + length), strict=False),
    st.integers(0, 2**32 - 1),
    st.integers(0, 32),
)
_MAPPED_RANGE = ipaddress.IPv6Network("::ffff:0:0/96")


def _as_v4_if_mapped(network: Network) -> Network:
    if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(_MAPPED_RANGE):
        return ipaddress.IPv4Network(
            (int(network.network_address) & 0xFFFFFFFF, network.prefixlen - 96)
        )
    return network


def _near(network: Network) -> st.SearchStrategy[str]:
    """Addresses inside or just outside a network, so random tables actually get hits."""
    first = int(network.network_address)
    last = int(network.broadcast_address)
    top = 2**network.max_prefixlen - 1
    return st.integers(max(first - 1, 0), min(last + 1, top)).map(
        lambda n: str(
            ipaddress.IPv6Address(n) if network.version == 6 else ipaddress.IPv4Address(n)
        )
    )


def _brute_force(table: dict[Network, Attribution], ip: str) -> Attribution:
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return UNATTRIBUTED
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    best: tuple[int, Attribution] | None = None
    for network, attribution in table.items():
        contains = network.version == address.version and address in network
        if contains and (best is None or network.prefixlen > best[0]):
            best = (network.prefixlen, attribution)
    return UNATTRIBUTED if best is None else best[1]


@st.composite
def _tables_and_ips(draw: st.DrawFn) -> tuple[dict[Network, Attribution], list[str]]:
    networks = draw(
        st.lists(_V4_NETS | _V6_NETS | _MAPPED_NETS, max_size=30, unique_by=_as_v4_if_mapped)
    )
    table = {net: _attr(f"p{i}", str(net)) for i, net in enumerate(networks)}
    nearby = [draw(_near(net)) for net in networks[:10]]
    random_ips = draw(
        st.lists(
            st.ip_addresses().map(str)
            | st.ip_addresses(v=4).map(lambda a: f"::ffff:{a}")
            | st.text(max_size=8),
            max_size=10,
        )
    )
    return table, nearby + random_ips


class TestLookupProperty:
    @given(_tables_and_ips())
    def test_lookup_equals_linear_scan(
        self, case: tuple[dict[Network, Attribution], list[str]]
    ) -> None:
        """Lookup agrees with a linear scan for the longest containing network."""
        entries, ips = case
        table = PrefixTable(entries.items())
        normalised = {_as_v4_if_mapped(net): attr for net, attr in entries.items()}
        assert len(table) == len(entries)
        for ip in ips:
            assert table.lookup(ip) == _brute_force(normalised, ip), ip


class TestFromCsv:
    def test_loads_rows(self, tmp_path: Path) -> None:
        """A valid file loads with asn in either form, country and cdn flags."""
        path = _write(
            tmp_path,
            "prefix,asn,provider,country,cdn\n"
            "# operator override for a reseller\n"
            "104.16.0.0/13,AS13335,Cloudflare,US,true\n"
            "\n"
            "192.0.2.0/24,64500,Example Hosting,nl,\n"
            "2001:db8::/32,,Unknown AS,,no\n",
        )
        table = PrefixTable.from_csv(path)
        assert len(table) == 3
        assert table.lookup("104.16.1.1") == Attribution(
            provider="Cloudflare", asn=13335, country="US", cdn=True, prefix="104.16.0.0/13"
        )
        assert table.lookup("192.0.2.1") == Attribution(
            provider="Example Hosting", asn=64500, country="NL", cdn=False, prefix="192.0.2.0/24"
        )
        assert table.lookup("2001:db8::1").asn_label == "AS?"

    @pytest.mark.parametrize(
        ("value", "expected"),
        [("true", True), ("1", True), ("YES", True), ("false", False), ("0", False), ("", False)],
    )
    def test_cdn_values(self, tmp_path: Path, value: str, expected: bool) -> None:
        """The cdn column accepts true/false/1/0/yes/no in any case, empty meaning false."""
        path = _write(tmp_path, f"prefix,asn,provider,cdn\n10.0.0.0/8,1,x,{value}\n")
        assert PrefixTable.from_csv(path).lookup("10.0.0.1").cdn is expected

    def test_optional_columns_absent(self, tmp_path: Path) -> None:
        """Without country and cdn columns those fields are None and False."""
        path = _write(tmp_path, "provider,asn,prefix\nx,1,10.0.0.0/8\n")
        found = PrefixTable.from_csv(path).lookup("10.0.0.1")
        assert (found.provider, found.country, found.cdn) == ("x", None, False)

    def test_host_bits_normalised(self, tmp_path: Path) -> None:
        """A prefix with host bits set is accepted as its network."""
        path = _write(tmp_path, "prefix,asn,provider\n10.1.2.3/8,1,x\n10.0.0.0/8,1,x\n")
        table = PrefixTable.from_csv(path)
        assert len(table) == 1
        assert table.lookup("10.9.9.9").prefix == "10.0.0.0/8"

    @pytest.mark.parametrize(
        ("rows", "line", "reason"),
        [
            ("10.0.0.0/33,1,x\n", 2, "bad prefix"),
            ("ok,1,x\n", 2, "bad prefix"),
            ("10.0.0.0/8,1,x\n11.0.0.0/8,ASX,y\n", 3, "not an AS number"),
            ("10.0.0.0/8,AS,y\n", 2, "not an AS number"),
            ("10.0.0.0/8,-1,y\n", 2, "not an AS number"),
            ("10.0.0.0/8,1,  \n", 2, "empty provider"),
            ("10.0.0.0/8,1,x\n\n10.0.0.0/8,2,y\n", 4, "also on line 2"),
            ("10.0.0.0/8,1,x,extra\n", 2, "expected 3 fields"),
        ],
    )
    def test_bad_rows(self, tmp_path: Path, rows: str, line: int, reason: str) -> None:
        """A bad row is reported with the file name, its line number and the reason."""
        path = _write(tmp_path, "prefix,asn,provider\n" + rows)
        with pytest.raises(AttributionFileError, match=reason) as caught:
            PrefixTable.from_csv(path)
        assert caught.value.line == line
        assert str(caught.value).startswith(f"prefixes.csv:{line}: ")

    @pytest.mark.parametrize(
        ("row", "reason"),
        [("10.0.0.0/8,1,x,Netherlands,no", "two-letter"), ("10.0.0.0/8,1,x,NL,maybe", "cdn")],
    )
    def test_bad_optional_values(self, tmp_path: Path, row: str, reason: str) -> None:
        """Country must be a two-letter code and cdn a recognised boolean."""
        path = _write(tmp_path, "prefix,asn,provider,country,cdn\n" + row + "\n")
        with pytest.raises(AttributionFileError, match=reason):
            PrefixTable.from_csv(path)

    @pytest.mark.parametrize(
        ("text", "reason"),
        [
            ("", "empty file"),
            ("prefix,provider\n", "lacks column"),
            ("prefix,asn,provider,colour\n", "unknown column"),
            ("prefix,asn,provider,asn\n", "duplicate column"),
        ],
    )
    def test_bad_header(self, tmp_path: Path, text: str, reason: str) -> None:
        """Header problems are reported against line 1."""
        with pytest.raises(AttributionFileError, match=reason) as caught:
            PrefixTable.from_csv(_write(tmp_path, text))
        assert caught.value.line == 1

    def test_identical_duplicate_allowed(self, tmp_path: Path) -> None:
        """Listing the same prefix twice with the same attribution is harmless."""
        path = _write(tmp_path, "prefix,asn,provider\n10.0.0.0/8,1,x\n10.0.0.0/8,AS1,x\n")
        assert len(PrefixTable.from_csv(path)) == 1

    def test_not_utf8(self, tmp_path: Path) -> None:
        """A file that is not UTF-8 is an attribution file error, not a crash."""
        path = tmp_path / "prefixes.csv"
        path.write_bytes(b"prefix,asn,provider\n10.0.0.0/8,1,\xff\xfe\n")
        with pytest.raises(AttributionFileError, match="not UTF-8"):
            PrefixTable.from_csv(path)
