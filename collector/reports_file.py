"""Read a hotline's report file (CSV or JSONL) into validated reports, without any I/O but the file.

Each row becomes a `ReportIn` or a `RowError` naming the physical line where the row starts, so a
hotline can fix its file; problems with the file as a whole raise `ReportFileError`. Rows are
streamed, and `validate_file` reads everything first so an importer can refuse a bad file before
sending anything. Timestamps must carry a UTC offset: a naive time would silently shift every
latency measured from it.

Exceptions::

    ValueError
     +-- InvalidURL        a URL that cannot be probed (also a RowError message)
     +-- InvalidTime       a timestamp that is not ISO 8601 with an offset
    Exception
     +-- ReportFileError   the file as a whole is unusable
"""

from __future__ import annotations

import csv
import ipaddress
import json
import re
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO

from collector.durations import parse_duration
from collector.urls import InvalidURL, normalize_url

MAX_LINE_BYTES = 1 << 20
MAX_KEPT_ERRORS = 1000
FUTURE_TOLERANCE_SECONDS = 86400.0
# The intake (collector.service.check_report) refuses what these refuse; checking them here keeps
# a file from being half-imported, with rows refused only after others were stored.
EARLIEST_TIME = 946_684_800.0  # 2000-01-01T00:00:00Z
MAX_REFERENCE_LENGTH = 200
MAX_ORDER_DEADLINE_SECONDS = 2**32 - 1  # a uint32 on the wire
REQUIRED_FIELDS = ("url", "notified_at")
OPTIONAL_FIELDS = (
    "received_at",
    "reference",
    "sha256",
    "order_issued_at",
    "order_deadline",
    "origin_ip",
)

_FORMATS = {"csv": "csv", "jsonl": "jsonl", "ndjson": "jsonl"}


class InvalidTime(ValueError):
    """A timestamp that is not ISO 8601 with a UTC offset."""


class ReportFileError(Exception):
    """The file as a whole cannot be read: unopenable, undecodable, unknown format, no header."""


@dataclass(frozen=True)
class ReportIn:
    """One valid reported URL with its times in Unix seconds."""

    url: str
    notified_at: float
    received_at: float | None
    reference: str | None
    sha256: bytes | None = None
    order_issued_at: float | None = None
    order_deadline: float | None = None
    origin_ip: str | None = None


@dataclass(frozen=True)
class RowError:
    """A row that was rejected; `line` is the physical line where the row starts (header = 1)."""

    line: int
    message: str


@dataclass(frozen=True)
class FileCheck:
    """Outcome of reading a whole file: counts plus the first `MAX_KEPT_ERRORS` row errors."""

    rows: int
    valid: int
    error_count: int
    errors: tuple[RowError, ...]

    @property
    def ok(self) -> bool:
        """True when every row is valid."""
        return self.error_count == 0


def parse_time(raw: str, field: str) -> float:
    """Parse an ISO 8601 time with a UTC offset (or Z) into Unix seconds."""
    text = raw.strip()
    try:
        parsed = datetime.fromisoformat(text)
    except (ValueError, OverflowError):
        raise InvalidTime(f"{field} {raw!r} is not an ISO 8601 time") from None
    if parsed.tzinfo is None or parsed.utcoffset() is None:
        raise InvalidTime(f"{field} {raw!r} has no UTC offset")
    try:
        return parsed.timestamp()
    except (ValueError, OverflowError):
        raise InvalidTime(f"{field} {raw!r} is out of range") from None


def read_reports(
    path: Path, fmt: str | None = None, now: float | None = None
) -> Iterator[ReportIn | RowError]:
    """Stream the rows of a report file; `now` (default: the current time) bounds notified_at.

    An unknown format raises ReportFileError at once; other file problems raise it while
    iterating, possibly after some rows were yielded (e.g. a decode error late in the file), so
    use `validate_file` before acting on any row.
    """
    kind = _resolve_format(path, fmt)
    return _iter_reports(path, kind, _RowChecker(time.time() if now is None else now))


def _iter_reports(path: Path, kind: str, checker: _RowChecker) -> Iterator[ReportIn | RowError]:
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise ReportFileError(f"cannot open {path}: {exc.strerror}") from exc
    with handle:
        lines = _decoded_lines(handle, path)
        if kind == "csv":
            yield from _read_csv(lines, checker)
        else:
            yield from _read_jsonl(lines, checker)


def validate_file(path: Path, fmt: str | None = None, now: float | None = None) -> FileCheck:
    """Read the whole file and count valid and invalid rows, keeping the first errors."""
    rows = valid = error_count = 0
    errors: list[RowError] = []
    for item in read_reports(path, fmt, now):
        rows += 1
        if isinstance(item, RowError):
            error_count += 1
            if len(errors) < MAX_KEPT_ERRORS:
                errors.append(item)
        else:
            valid += 1
    return FileCheck(rows=rows, valid=valid, error_count=error_count, errors=tuple(errors))


def _resolve_format(path: Path, fmt: str | None) -> str:
    """The format named by `fmt`, else the one implied by the file's extension."""
    if fmt is not None and fmt.lower() not in _FORMATS:
        raise ReportFileError(f"unknown format {fmt!r}; expected one of {sorted(_FORMATS)}")
    kind = _FORMATS.get(fmt.lower() if fmt else path.suffix.lower().removeprefix("."))
    if kind is None:
        raise ReportFileError(
            f"cannot tell the format of {path.name!r} from its extension; pass fmt='csv' or 'jsonl'"
        )
    return kind


def _decoded_lines(handle: IO[bytes], path: Path) -> Iterator[str]:
    """Yield the file's lines (split on LF only, endings kept) as text, stripping a UTF-8 BOM."""
    number = 0
    while raw := handle.readline(MAX_LINE_BYTES + 1):
        number += 1
        if len(raw) > MAX_LINE_BYTES:
            raise ReportFileError(f"{path.name}: line {number} exceeds {MAX_LINE_BYTES} bytes")
        if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ReportFileError(
                f"{path.name}: line {number} is not valid UTF-8 (byte {exc.start + 1} of the line)"
            ) from None


def _read_csv(lines: Iterable[str], checker: _RowChecker) -> Iterator[ReportIn | RowError]:
    reader = csv.reader(lines, strict=True)
    header: list[str] | None = None
    consumed = 0
    while True:
        start = consumed + 1
        try:
            record = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            consumed = reader.line_num
            if header is None:
                raise ReportFileError(f"line {start}: malformed CSV header: {exc}") from None
            yield RowError(start, f"malformed CSV: {exc}")
            continue
        consumed = reader.line_num
        if not any(cell.strip() for cell in record):
            continue
        if header is None:
            header = _check_header(record, start)
            continue
        if len(record) != len(header):
            yield RowError(start, f"row has {len(record)} fields but the header has {len(header)}")
            continue
        yield checker.check(start, dict(zip(header, record, strict=True)))
    if header is None:
        raise ReportFileError("CSV file has no header row")


def _check_header(record: list[str], line: int) -> list[str]:
    header = [name.strip().lower() for name in record]
    """Column names matched case-insensitively; required ones must be present, known ones once."""
    missing = [name for name in REQUIRED_FIELDS if name not in header]
    if missing:
        raise ReportFileError(f"line {line}: missing required column(s): {', '.join(missing)}")
    repeated = [n for n in (*REQUIRED_FIELDS, *OPTIONAL_FIELDS) if header.count(n) > 1]
    if repeated:
        raise ReportFileError(f"line {line}: column {repeated[0]!r} appears more than once")
    return header


def _read_jsonl(lines: Iterable[str], checker: _RowChecker) -> Iterator[ReportIn | RowError]:
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError) as exc:
            yield RowError(number, f"invalid JSON: {exc}")
            continue
        if not isinstance(obj, dict):
            yield RowError(number, f"JSON line is a {type(obj).__name__}, not an object")
            continue
        yield checker.check(number, obj)


def parse_extras(
    sha256: str | None, order_deadline: str | None, origin_ip: str | None, problems: list[str]
) -> tuple[bytes | None, float | None, str | None]:
    """Check the optional reference hash, order deadline and origin IP; note problems."""
    digest = None
    if sha256 is not None:
        if re.fullmatch(r"[0-9a-fA-F]{64}", sha256):
            digest = bytes.fromhex(sha256)
        else:
            problems.append("sha256 must be 64 hexadecimal characters")
    deadline = None
    if order_deadline is not None:
        try:
            deadline = parse_duration(order_deadline)
        except ValueError as exc:
            problems.append(f"order_deadline: {exc}")
        if deadline is not None and not 1 <= deadline <= MAX_ORDER_DEADLINE_SECONDS:
            limit = MAX_ORDER_DEADLINE_SECONDS
            problems.append(f"order_deadline {order_deadline!r} must be 1 to {limit} seconds")
            deadline = None
    origin = None
    if origin_ip is not None:
        try:
            origin = str(ipaddress.ip_address(origin_ip))
        except ValueError:
            problems.append(f"origin_ip {origin_ip!r} is not an IP address")
    return digest, deadline, origin


class _RowChecker:
    """Validates one row's fields and remembers references to report duplicates."""

    def __init__(self, now: float) -> None:
        self._latest_allowed = now + FUTURE_TOLERANCE_SECONDS
        self._references: dict[str, int] = {}

    def check(self, line: int, fields: Mapping[str, object]) -> ReportIn | RowError:
        problems: list[str] = []
        url = self._text(fields, "url", problems)
        notified = self._text(fields, "notified_at", problems)
        received = self._text(fields, "received_at", problems)
        reference = self._text(fields, "reference", problems)
        normalized: str | None = None
        if url is not None:
            try:
                normalized = normalize_url(url)
            except InvalidURL as exc:
                problems.append(str(exc))
        notified_at = self._time(notified, "notified_at", problems)
        received_at = self._time(received, "received_at", problems)
        order_issued_at = self._time(self._text(fields, "order_issued_at", problems),
                                     "order_issued_at", problems)  # fmt: skip
        extras = parse_extras(
            self._text(fields, "sha256", problems),
            self._text(fields, "order_deadline", problems),
            self._text(fields, "origin_ip", problems),
            problems,
        )
        if reference is not None and (
            len(reference) > MAX_REFERENCE_LENGTH or not reference.isprintable()
        ):
            problems.append(
                f"reference must be at most {MAX_REFERENCE_LENGTH} printable characters"
            )
        elif reference is not None:
            first = self._references.setdefault(reference, line)
            if first != line:
                problems.append(f"duplicate reference {reference!r} (first on line {first})")
        if problems or normalized is None or notified_at is None:
            return RowError(line, "; ".join(problems))
        return ReportIn(
            normalized, notified_at, received_at, reference,
            sha256=extras[0], order_issued_at=order_issued_at,
            order_deadline=extras[1], origin_ip=extras[2],
        )  # fmt: skip

    @staticmethod
    def _text(fields: Mapping[str, object], name: str, problems: list[str]) -> str | None:
        """The stripped value of a string field, None if absent or blank (an error if required)."""
        value = fields.get(name)
        if value is not None and not isinstance(value, str):
            problems.append(f"{name} must be a string, not {type(value).__name__}")
            return None
        text = value.strip() if value is not None else ""
        if not text:
            if name in REQUIRED_FIELDS:
                problems.append(f"{name} is missing")
            return None
        return text

    def _time(self, text: str | None, name: str, problems: list[str]) -> float | None:
        if text is None:
            return None
        try:
            value = parse_time(text, name)
        except InvalidTime as exc:
            problems.append(str(exc))
            return None
        if value > self._latest_allowed:
            problems.append(f"{name} {text!r} is more than 1 day in the future")
            return None
        if value < EARLIEST_TIME:
            problems.append(f"{name} {text!r} is before 2000-01-01")
            return None
        return value
