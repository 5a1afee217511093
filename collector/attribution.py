"""Attribute the IP address an agent connected to to a hosting provider.

The provider named in the public report comes from the address the agent
actually reached, so the lookup is a longest-prefix match over an
operator-supplied table of IPv4 and IPv6 prefixes. Lookups are pure and never
raise: an address that cannot be attributed is ``UNATTRIBUTED``.

Theory of operation: per address family, one dict per prefix length maps the
network's top ``length`` bits (the address shifted right) to its attribution.
A lookup probes only the lengths present, longest first, so it costs one
shift and one dict probe per distinct length, whatever the table size.

Exceptions::

    ValueError
     +-- AttributionFileError   a bad row or header in a prefix CSV file
"""

from __future__ import annotations

import csv
import ipaddress
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_REQUIRED_COLUMNS = ("prefix", "asn", "provider")
_OPTIONAL_COLUMNS = ("country", "cdn")
_TRUE = frozenset({"true", "1", "yes"})
_FALSE = frozenset({"false", "0", "no", ""})
_MAPPED_V4 = ipaddress.IPv6Network("::ffff:0:0/96")
_MAPPED_V4_PREFIX = _MAPPED_V4.network_address.packed[:12]


class AttributionFileError(ValueError):
    """A prefix table file has a bad header or row; the message names file and line."""

    def __init__(self, path: Path, line: int, reason: str) -> None:
        super().__init__(f"{path.name}:{line}: {reason}")
        self.path = path
        self.line = line
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Attribution:
    """Who hosts an address: provider, origin AS, country and whether it is a CDN edge."""

    provider: str
    asn: int | None
    country: str | None
    cdn: bool
    prefix: str | None

    @property
    def asn_label(self) -> str:
        """The AS number as shown to people, e.g. "AS13335", or "AS?" when unknown."""
        return "AS?" if self.asn is None else f"AS{self.asn}"


UNATTRIBUTED = Attribution(provider="unattributed", asn=None, country=None, cdn=False, prefix=None)


def _parse_slowly(ip: object) -> bytes | None:
    """Parse forms inet_pton rejects but ipaddress accepts (e.g. an IPv6 scope id)."""
    if not isinstance(ip, str):
        return None
    try:
        return ipaddress.ip_address(ip).packed
    except ValueError:
        return None


def _normalise(network: Network) -> Network:
    """Map an IPv4-mapped IPv6 network to IPv4, since mapped addresses are looked up as IPv4."""
    if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(_MAPPED_V4):
        mapped = network.network_address.ipv4_mapped
        assert mapped is not None
        return ipaddress.IPv4Network((mapped, network.prefixlen - 96))
    return network


class _Family:
    """Longest-prefix match for one address family of a given bit width."""

    __slots__ = ("_bits", "_by_length", "_probes")

    def __init__(self, bits: int) -> None:
        self._bits = bits
        self._by_length: dict[int, dict[int, Attribution]] = {}
        self._probes: tuple[tuple[int, dict[int, Attribution]], ...] = ()

    def get(self, network: Network) -> Attribution | None:
        table = self._by_length.get(network.prefixlen)
        if table is None:
            return None
        return table.get(int(network.network_address) >> (self._bits - network.prefixlen))

    def add(self, network: Network, attribution: Attribution) -> None:
        table = self._by_length.setdefault(network.prefixlen, {})
        table[int(network.network_address) >> (self._bits - network.prefixlen)] = attribution

    def seal(self) -> None:
        """Fix the probe order (longest length first) once all prefixes are added."""
        self._probes = tuple(
            (self._bits - length, self._by_length[length])
            for length in sorted(self._by_length, reverse=True)
        )

    def lookup(self, address: int) -> Attribution:
        for shift, table in self._probes:
            found = table.get(address >> shift)
            if found is not None:
                return found
        return UNATTRIBUTED

    def __len__(self) -> int:
        return sum(len(table) for table in self._by_length.values())


class PrefixTable:
    """An immutable IPv4 and IPv6 prefix table answering longest-prefix-match lookups."""

    __slots__ = ("_v4", "_v6")

    def __init__(self, entries: Iterable[tuple[Network, Attribution]]) -> None:
        """Build from (network, attribution) pairs; a prefix listed twice must agree with itself.

        IPv4-mapped IPv6 networks (inside ::ffff:0:0/96) are stored as IPv4.
        """
        self._v4 = _Family(32)
        self._v6 = _Family(128)
        for network, attribution in entries:
            network = _normalise(network)
            family = self._v4 if network.version == 4 else self._v6
            existing = family.get(network)
            if existing is not None and existing != attribution:
                raise ValueError(f"conflicting attributions for {network}")
            family.add(network, attribution)
        self._v4.seal()
        self._v6.seal()

    def lookup(self, ip: str) -> Attribution:
        """Attribute one address; garbage, empty or unmatched input gives UNATTRIBUTED."""
        try:
            packed: bytes | None = socket.inet_pton(
                socket.AF_INET6 if ":" in ip else socket.AF_INET, ip
            )
        except (OSError, ValueError, TypeError):
            packed = _parse_slowly(ip)
        if packed is None:
            return UNATTRIBUTED
        if len(packed) == 4:
            return self._v4.lookup(int.from_bytes(packed))
        if packed.startswith(_MAPPED_V4_PREFIX):
            return self._v4.lookup(int.from_bytes(packed[12:]))
        return self._v6.lookup(int.from_bytes(packed))

    def __len__(self) -> int:
        return len(self._v4) + len(self._v6)

    @classmethod
    def from_csv(cls, path: Path) -> PrefixTable:
        """Load an operator table with header ``prefix,asn,provider[,country][,cdn]``.

        Blank lines and lines whose first field starts with ``#`` are skipped.
        Raises AttributionFileError naming the file, line and reason for the first bad row.
        """
        seen: dict[Network, tuple[int, Attribution]] = {}
        try:
            with path.open(newline="", encoding="utf-8-sig") as handle:
                reader = csv.reader(handle)
                header = _read_header(path, reader)
                for row in reader:
                    if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
                        continue
                    line = reader.line_num
                    if len(row) != len(header):
                        raise AttributionFileError(
                            path, line, f"expected {len(header)} fields, got {len(row)}"
                        )
                    network, attribution = _parse_row(
                        path, line, dict(zip(header, row, strict=True))
                    )
                    if network in seen:
                        first_line, first = seen[network]
                        if first != attribution:
                            raise AttributionFileError(
                                path,
                                line,
                                f"prefix {network} also on line {first_line} "
                                f"with a different attribution ({first.provider!r})",
                            )
                        continue
                    seen[network] = (line, attribution)
        except UnicodeDecodeError as exc:
            raise AttributionFileError(path, 0, f"not UTF-8: {exc.reason}") from exc
        except csv.Error as exc:
            raise AttributionFileError(path, reader.line_num, str(exc)) from exc
        return cls((network, attribution) for network, (_, attribution) in seen.items())


def _read_header(path: Path, reader: Iterable[list[str]]) -> list[str]:
    """Read and check the header row; unknown or missing columns are errors."""
    header = [name.strip().lower() for name in next(iter(reader), [])]
    if not header:
        raise AttributionFileError(path, 1, "empty file, expected a header row")
    missing = [name for name in _REQUIRED_COLUMNS if name not in header]
    if missing:
        raise AttributionFileError(path, 1, f"header lacks column(s): {', '.join(missing)}")
    unknown = [name for name in header if name not in _REQUIRED_COLUMNS + _OPTIONAL_COLUMNS]
    if unknown:
        raise AttributionFileError(path, 1, f"unknown column(s): {', '.join(unknown)}")
    if len(set(header)) != len(header):
        raise AttributionFileError(path, 1, "duplicate column in header")
    return header


def _parse_row(path: Path, line: int, row: Mapping[str, str]) -> tuple[Network, Attribution]:
    """Turn one CSV row into a normalised network and its attribution."""
    text = row["prefix"].strip()
    try:
        network = _normalise(ipaddress.ip_network(text, strict=False))
    except ValueError:
        raise AttributionFileError(path, line, f"bad prefix {text!r}") from None

    provider = row["provider"].strip()
    if not provider:
        raise AttributionFileError(path, line, "empty provider")

    asn_text = row["asn"].strip()
    digits = asn_text[2:] if asn_text[:2].upper() == "AS" else asn_text
    asn: int | None = None
    if asn_text:
        if not (digits.isascii() and digits.isdigit()) or int(digits) >= 2**32:
            raise AttributionFileError(path, line, f"asn {asn_text!r} is not an AS number")
        asn = int(digits)

    country = row.get("country", "").strip().upper() or None
    if country is not None and not (len(country) == 2 and country.isascii() and country.isalpha()):
        raise AttributionFileError(path, line, f"country {country!r} is not a two-letter code")

    cdn_text = row.get("cdn", "").strip().lower()
    if cdn_text not in _TRUE | _FALSE:
        raise AttributionFileError(path, line, f"cdn {cdn_text!r} is not true/false/yes/no/1/0")

    attribution = Attribution(
        provider=provider, asn=asn, country=country, cdn=cdn_text in _TRUE, prefix=str(network)
    )
    return network, attribution
