"""Reported URLs in canonical form: only http(s), a valid host, IDNA, bounded length.

Pure: no I/O. Used by the report-file reader and by the collector's intake,
so a URL is normalised the same way whichever way it arrives.
"""

from __future__ import annotations

import re
import unicodedata
from ipaddress import IPv6Address

import idna

MAX_URL_LENGTH = 2048

_DEFAULT_PORTS = {"http": 80, "https": 443}
_SPLIT = re.compile(r"[A-Za-z]+://([^/?#]*)([^#]*)")
_HOST_LABEL = re.compile(r"[a-z0-9_-]{1,63}")
_PORT = re.compile(r"[0-9]{1,5}")
_FORBIDDEN_CATEGORIES = frozenset({"Cc", "Cs", "Zs", "Zl", "Zp"})


class InvalidURL(ValueError):
    """A reported URL that cannot be probed as given."""


def normalize_url(raw: str) -> str:
    """Return the canonical form of an http(s) URL, or raise InvalidURL saying why it is unusable.

    Scheme and host are lowercased, an internationalised host becomes IDNA ASCII (UTS 46, as
    aiohttp/yarl does when probing), default ports and the fragment are dropped; userinfo, path and
    query are kept exactly.
    """
    url = raw.strip()
    if not url or len(url) > MAX_URL_LENGTH:
        raise InvalidURL(f"url is empty or longer than {MAX_URL_LENGTH} characters")
    for ch in url:
        if ch.isspace() or unicodedata.category(ch) in _FORBIDDEN_CATEGORIES:
            raise InvalidURL(f"url contains whitespace or control character {ch!r}")
    scheme = url.partition(":")[0].lower()
    if scheme not in _DEFAULT_PORTS:
        raise InvalidURL(f"url scheme {scheme!r} is not http or https")
    match = _SPLIT.match(url)
    if match is None:
        raise InvalidURL("url has no host (expected http:// or https://)")
    authority, path_query = match.group(1), match.group(2)
    userinfo, at, hostport = authority.rpartition("@")
    host, port = _split_host_port(hostport)
    port_text = "" if port in (None, _DEFAULT_PORTS[scheme]) else f":{port}"
    result = f"{scheme}://{userinfo + at if userinfo else ''}{host}{port_text}{path_query}"
    if len(result) > MAX_URL_LENGTH:
        raise InvalidURL(f"url is longer than {MAX_URL_LENGTH} characters once normalized")
    return result


def _split_host_port(hostport: str) -> tuple[str, int | None]:
    """Split and validate `host[:port]`, returning the normalized host and the port if any."""
    if hostport.startswith("["):
        literal, bracket, port_part = hostport[1:].partition("]")
        if not bracket or "%" in literal or (port_part and port_part[0] != ":"):
            raise InvalidURL(f"url host {hostport!r} is not a bracketed IPv6 address")
        try:
            IPv6Address(literal)
        except ValueError:
            raise InvalidURL(f"url host [{literal}] is not an IPv6 address") from None
        return f"[{literal.lower()}]", _parse_port(port_part[1:])
    host, _, port_text = hostport.partition(":")
    return _normalize_host(host), _parse_port(port_text)


def _parse_port(text: str) -> int | None:
    """An empty port means the default; otherwise 1..65535."""
    if not text:
        return None
    if not _PORT.fullmatch(text) or not 0 < int(text) <= 65535:
        raise InvalidURL(f"url port {text!r} is not a number between 1 and 65535")
    return int(text)


def _normalize_host(host: str) -> str:
    """Lowercase an ASCII host, convert an internationalised one to IDNA, then check its labels."""
    if not host:
        raise InvalidURL("url has no host")
    if host.isascii():
        ascii_host = host.lower()
    else:
        try:
            ascii_host = idna.encode(host, uts46=True).decode("ascii")
        except (UnicodeError, ValueError) as exc:
            raise InvalidURL(f"url host {host!r} is not a valid domain name: {exc}") from None
    labels = ascii_host.split(".")
    if labels[-1] == "" and len(labels) > 1:
        labels.pop()
    if len(ascii_host) > 254 or not all(_HOST_LABEL.fullmatch(label) for label in labels):
        raise InvalidURL(f"url host {host!r} is not a valid host name")
    return ascii_host
