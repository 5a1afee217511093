"""Attribution sources beyond the operator CSV: routing data and MaxMind ASN databases.

A collector attributes an address by asking several sources in order: the
operator's CSV overrides (resellers, customer ranges) first, then a MaxMind-format
ASN database and/or a pyasn ``ipasn`` routing-table dump. ``LayeredAttributor``
returns the first source's answer and flags answers from CDN ASNs.

A source is anything with ``lookup(ip) -> Attribution | None``; a miss is
``None`` or the ``UNATTRIBUTED`` singleton (what ``PrefixTable`` returns).

Exceptions::

    ValueError
     +-- AttributionFileError   a bad line in an ipasn or AS-name file, or an unreadable .mmdb
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import ipaddress
import json
import logging
import re
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Protocol

import maxminddb

from collector.attribution import (
    UNATTRIBUTED,
    Attribution,
    AttributionFileError,
    Network,
    PrefixTable,
)

log = logging.getLogger(__name__)

_MAX_ASN = 2**32
_NAME_COUNTRY = re.compile(r"^(?P<name>.+?),\s*(?P<country>[A-Z]{2})$")


class Source(Protocol):
    def lookup(self, ip: str) -> Attribution | None: ...


def _open_text(path: Path) -> IO[str]:
    """Open a UTF-8 text file, transparently gunzipping a ``.gz`` one."""
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    return path.open(encoding="utf-8-sig", newline="")


def _parse_asn(text: str) -> int | None:
    """An AS number written as ``13335`` or ``AS13335``; None if it is not one."""
    digits = text[2:] if text[:2].upper() == "AS" else text
    if not (digits.isascii() and digits.isdigit()) or int(digits) >= _MAX_ASN:
        return None
    return int(digits)


def load_as_names(path: Path) -> dict[int, str]:
    """Read AS names from pyasn's ``asnames.json`` ({"13335": "NAME, CC"}) or a CSV ``asn,name``.

    The format follows the suffix (``.json``, optionally ``.gz``); CSV may have an
    ``asn,name`` header, blank lines and ``#`` comments.
    """
    is_json = ".json" in path.suffixes
    try:
        with _open_text(path) as handle:
            if is_json:
                return _names_from_json(path, handle)
            return _names_from_csv(path, handle)
    except UnicodeDecodeError as exc:
        raise AttributionFileError(path, 0, f"not UTF-8: {exc.reason}") from exc
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise AttributionFileError(path, 0, f"bad gzip data: {exc}") from exc


def _names_from_json(path: Path, handle: IO[str]) -> dict[int, str]:
    try:
        data = json.load(handle)
    except json.JSONDecodeError as exc:
        raise AttributionFileError(path, exc.lineno, f"bad JSON: {exc.msg}") from exc
    if not isinstance(data, dict):
        raise AttributionFileError(path, 1, "expected a JSON object of ASN to name")
    names: dict[int, str] = {}
    for key, name in data.items():
        asn = _parse_asn(key.strip())
        if asn is None or not isinstance(name, str):
            raise AttributionFileError(path, 0, f"entry {key!r}: expected ASN to name string")
        if name.strip():
            names[asn] = name.strip()
    return names


def _names_from_csv(path: Path, handle: IO[str]) -> dict[int, str]:
    names: dict[int, str] = {}
    reader = csv.reader(handle)
    try:
        for row in reader:
            if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
                continue
            line = reader.line_num
            if line == 1 and row[0].strip().lower() == "asn":
                continue
            if len(row) != 2:
                raise AttributionFileError(path, line, f"expected 2 fields, got {len(row)}")
            asn = _parse_asn(row[0].strip())
            if asn is None:
                raise AttributionFileError(path, line, f"asn {row[0]!r} is not an AS number")
            if row[1].strip():
                names[asn] = row[1].strip()
    except csv.Error as exc:
        raise AttributionFileError(path, reader.line_num, str(exc)) from exc
    return names


def _attribution_for(asn: int, name: str | None) -> Attribution:
    """Provider and country from an AS name ("CLOUDFLARENET, US"), or "AS<n>" without one."""
    if name is None:
        return Attribution(provider=f"AS{asn}", asn=asn, country=None, cdn=False, prefix=None)
    match = _NAME_COUNTRY.match(name)
    if match is None:
        return Attribution(provider=name, asn=asn, country=None, cdn=False, prefix=None)
    return Attribution(
        provider=match["name"], asn=asn, country=match["country"], cdn=False, prefix=None
    )


def load_ipasn(path: Path, names: dict[int, str] | None = None) -> PrefixTable:
    """Load a pyasn ``ipasn`` file (``PREFIX<tab>ASN`` lines, ``;`` comments, maybe gzipped).

    One Attribution is shared by all prefixes of an AS (so ``prefix`` is None).
    Raises AttributionFileError naming the file and line of the first bad line.
    """
    names = names or {}
    shared: dict[int, Attribution] = {}
    at = [0]

    def entries(handle: IO[str]) -> Iterator[tuple[Network, Attribution]]:
        for line, text in enumerate(handle, start=1):
            at[0] = line
            if not text.strip() or text.startswith(";"):
                continue
            fields = text.split()
            if len(fields) != 2:
                raise AttributionFileError(path, line, f"expected PREFIX ASN, got {text.strip()!r}")
            try:
                network = ipaddress.ip_network(fields[0], strict=False)
            except ValueError:
                raise AttributionFileError(path, line, f"bad prefix {fields[0]!r}") from None
            asn = _parse_asn(fields[1])
            if asn is None:
                raise AttributionFileError(path, line, f"asn {fields[1]!r} is not an AS number")
            attribution = shared.get(asn)
            if attribution is None:
                attribution = shared[asn] = _attribution_for(asn, names.get(asn))
            yield network, attribution

    try:
        with _open_text(path) as handle:
            return PrefixTable(entries(handle))
    except AttributionFileError:
        raise
    except UnicodeDecodeError as exc:
        raise AttributionFileError(path, at[0] + 1, f"not UTF-8: {exc.reason}") from exc
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise AttributionFileError(path, at[0], f"bad gzip data: {exc}") from exc
    except ValueError as exc:
        raise AttributionFileError(path, at[0], str(exc)) from exc


def _mmdb_form(ip: str) -> str:
    """Rewrite the rare forms a MaxMind reader mishandles: scope ids and IPv4-mapped IPv6."""
    if "%" in ip or ip[:7].lower() == "::ffff:":
        address = ipaddress.ip_address(ip.split("%", 1)[0])
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(address)
    return ip


class MmdbAsn:
    """A MaxMind-format ASN database (GeoLite2-ASN layout); close it, or use it as a context."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._reader = maxminddb.open_database(str(path))
        except maxminddb.InvalidDatabaseError as exc:
            raise AttributionFileError(path, 0, f"not a MaxMind DB: {exc}") from exc

    def lookup(self, ip: str) -> Attribution | None:
        """The AS announcing ``ip``, or None if the database has no ASN record for it."""
        try:
            record = self._reader.get(_mmdb_form(ip))
        except (ValueError, TypeError, AttributeError, maxminddb.InvalidDatabaseError):
            return None
        if not isinstance(record, dict):
            return None
        asn = record.get("autonomous_system_number")
        if not isinstance(asn, int) or isinstance(asn, bool) or not 0 <= asn < _MAX_ASN:
            return None
        org = record.get("autonomous_system_organization")
        provider = org.strip() if isinstance(org, str) and org.strip() else f"AS{asn}"
        return Attribution(provider=provider, asn=asn, country=None, cdn=False, prefix=None)

    def close(self) -> None:
        self._reader.close()

    def __enter__(self) -> MmdbAsn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class MmdbCountry:
    """A MaxMind-format country database (GeoLite2-Country or -City layout): where an
    address is, as an ISO 3166 two-letter code."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._reader = maxminddb.open_database(str(path))
        except maxminddb.InvalidDatabaseError as exc:
            raise AttributionFileError(path, 0, f"not a MaxMind DB: {exc}") from exc

    def country(self, ip: str) -> str | None:
        """The country code of ``ip``, or None if the database does not know it."""
        try:
            record = self._reader.get(ip)
        except ValueError:
            return None
        if not isinstance(record, dict):
            return None
        for key in ("country", "registered_country"):
            entry = record.get(key)
            code = entry.get("iso_code") if isinstance(entry, dict) else None
            if isinstance(code, str) and len(code) == 2:
                return code.upper()
        return None

    def close(self) -> None:
        self._reader.close()


class LayeredAttributor:
    """Ask each source in order and keep the first hit; CDN ASNs are flagged ``cdn=True``.

    Put the operator's CSV overrides first so they always win. Never raises for a string.
    """

    __slots__ = ("_cdn_asns", "_countries", "_sources")

    def __init__(
        self,
        sources: Sequence[Source],
        cdn_asns: frozenset[int] = frozenset(),
        countries: MmdbCountry | None = None,
    ) -> None:
        self._sources = tuple(sources)
        self._cdn_asns = cdn_asns
        self._countries = countries

    def lookup(self, ip: str) -> Attribution:
        """The first source's answer; its country from the country database if it has none."""
        hit = self._first(ip)
        if hit.country is None and self._countries is not None:
            country = self._countries.country(ip)
            if country is not None:
                return dataclasses.replace(hit, country=country)
        return hit

    def _first(self, ip: str) -> Attribution:
        for source in self._sources:
            try:
                hit = source.lookup(ip)
            except Exception as exc:
                log.warning("attribution_source_failed source=%s error=%r", type(source), exc)
                continue
            if hit is not None and hit is not UNATTRIBUTED:
                if hit.asn in self._cdn_asns and not hit.cdn:
                    return dataclasses.replace(hit, cdn=True)
                return hit
        return UNATTRIBUTED

    def close(self) -> None:
        """Close every source that holds a file (MaxMind readers)."""
        for source in self._sources:
            close = getattr(source, "close", None)
            if callable(close):
                close()
        if self._countries is not None:
            self._countries.close()


def build_attributor(
    prefixes: Path | None = None,
    mmdb: Path | None = None,
    ipasn: Path | None = None,
    as_names: Path | None = None,
    cdn_asns: frozenset[int] = frozenset(),
    country_mmdb: Path | None = None,
) -> LayeredAttributor:
    """Layer the configured sources: CSV overrides, then the MaxMind db, then the ipasn table.

    The text files are read before the db is opened, so a bad file leaks no open reader.
    """
    overrides = PrefixTable.from_csv(prefixes) if prefixes else None
    names = load_as_names(as_names) if as_names else None
    routes = load_ipasn(ipasn, names) if ipasn else None
    asn_db = MmdbAsn(mmdb) if mmdb else None
    try:
        countries = MmdbCountry(country_mmdb) if country_mmdb else None
    except AttributionFileError:
        if asn_db is not None:
            asn_db.close()
        raise
    layers = (overrides, asn_db, routes)
    return LayeredAttributor([s for s in layers if s is not None], cdn_asns, countries)


def parse_asn_list(text: str) -> frozenset[int]:
    """Parse ``13335,AS20940 54113`` (commas or spaces) into AS numbers, for CLI options."""
    asns = [_parse_asn(part) for part in text.replace(",", " ").split()]
    if any(asn is None for asn in asns):
        raise ValueError(f"{text!r} is not a list of AS numbers")
    return frozenset(asn for asn in asns if asn is not None)
