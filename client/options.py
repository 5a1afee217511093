"""Command-line conventions of takedown-agent and takedown-collector.

Help shows each default once, as a user would type it (`6h`, `5m<2h,15m<48h,1h`), and
nothing for options without one (no `None`, `False` or `frozenset()`). A default that is
typed through the option's own `type` (give the default as text: argparse converts it)
prints as written. A bad value is answered with one line naming the option and what it
allows, instead of the whole usage text.
"""

from __future__ import annotations

import argparse
import ipaddress
import math
import re
import sys
from collections.abc import Callable
from pathlib import PurePath
from typing import Any, NoReturn

import configargparse

_NO_DEFAULT: tuple[object, ...] = (None, False, argparse.SUPPRESS)


def shown_default(action: argparse.Action) -> str | None:
    """How an option's default reads in --help, or None when there is nothing to show."""
    default = action.default
    if any(default is d for d in _NO_DEFAULT) or not action.option_strings:
        return None
    if isinstance(action, argparse.BooleanOptionalAction):
        flag = next(o for o in action.option_strings if not o.startswith("--no-"))
        return flag if default else f"--no-{flag[2:]}"
    if isinstance(default, list | tuple | set | frozenset | dict) and not default:
        return None
    if isinstance(default, PurePath):
        return str(default)
    if isinstance(default, list | tuple):
        return ", ".join(str(v) for v in default)
    return str(default)


class HelpFormatter(argparse.HelpFormatter):
    """Appends `(default: X)` once, where X is `shown_default`; help that names its own
    default (it contains "(default") is left alone."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default" in text:
            return text
        shown = shown_default(action)
        if shown is None:
            return text
        return f"{text} (default: {shown.replace('%', '%%')})"


class ArgParser(configargparse.ArgParser):  # type: ignore[misc]
    """configargparse's parser with the conventions above."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        # '--watch-period -3d' is a (bad) value, not an unknown option: no option of these
        # programs starts with '-<digit>', so every such word is taken as a value.
        self._negative_number_matcher = re.compile(r"^-\.?\d")

    def error(self, message: str) -> NoReturn:
        """One line on stderr, exit status 2: '<prog>: argument --x: <why> (see --help)'."""
        sys.stderr.write(f"{self.prog}: {message} (see {self.prog} --help)\n")
        raise SystemExit(2)


def number(
    kind: type[int] | type[float],
    low: float,
    high: float = math.inf,
    *,
    open_low: bool = True,
    unit: str = "",
    hint: str = "",
) -> Callable[[str], int | float]:
    """An argparse type: a finite number of `kind` in (low, high), or [low, high) with
    open_low=False; the error says what is allowed (`unit` names it, `hint` explains)."""

    def allowed() -> str:
        what = ("a whole number" if kind is int else "a number") + (f" of {unit}" if unit else "")
        if high == math.inf:
            bound = f"above {low:g}" if open_low else f"{low:g} or more"
        elif open_low:
            bound = f"above {low:g} and below {high:g}"
        else:
            bound = f"from {low:g} up to (not including) {high:g}"
        return f"{what}, {bound}{f' ({hint})' if hint else ''}"

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise configargparse.ArgumentTypeError(
                f"{text!r} is not allowed: give {allowed()}"
            ) from None
        too_low = value <= low if open_low else value < low
        if too_low or value >= high or not math.isfinite(value):
            raise configargparse.ArgumentTypeError(f"{text!r} is not allowed: give {allowed()}")
        return value

    return parse


def host_port(text: str) -> str:
    """An argparse type: HOST:PORT (a name, an IPv4 address or a bracketed IPv6 address)."""
    host, sep, port = text.strip().rpartition(":")
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not bare or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise configargparse.ArgumentTypeError(
            f"{text!r} is not allowed: give HOST:PORT, e.g. 127.0.0.1:7443 or [::1]:7443"
        )
    if ":" in bare and not host.startswith("["):
        raise configargparse.ArgumentTypeError(
            f"{text!r} is not allowed: write an IPv6 address in brackets, e.g. [::1]:7443"
        )
    return text.strip()


def optional_host_port(text: str) -> str:
    """host_port, or empty for "off"."""
    return "" if not text.strip() else host_port(text)


def ip_address(text: str) -> str:
    """An argparse type: one IPv4 or IPv6 address, as given."""
    try:
        ipaddress.ip_address(text.strip())
    except ValueError:
        raise configargparse.ArgumentTypeError(
            f"{text!r} is not allowed: give an IP address of this host"
        ) from None
    return text.strip()
