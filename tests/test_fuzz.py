"""Fuzzing the report reader, the importer and the collector's two gRPC services.

Hypothesis generates malformed input in bulk; every test checks the same promises:

- nothing crashes: the reader yields rows or `RowError`s (a header problem is `ReportFileError`),
  the collector answers every request with a status and keeps serving;
- every bad row is a clear error at its physical line, and every bad message a clear status
  (INVALID_ARGUMENT, or a per-report / per-result rejection with a reason);
- what the reader accepts, the intake accepts (checked with `check_report` on every accepted
  row), so a checked file is never half-imported; nothing from invalid input is stored.

The counts asked for are reached by batching: many rows per file and many messages per request
or stream. Each test asserts (and prints) the count it reached, so lowering `max_examples` below
what the promise needs fails instead of silently testing less.

Bytes that do not parse as the request type never reach a servicer: the collector's `Decoding`
interceptor answers INVALID_ARGUMENT naming the message type (and, in a stream, its position),
on Intake/Submit, AgentLink/Connect and the open health service's Check and Watch alike, with at
most one throttled warning per method in the log and never an ERROR traceback.

The gRPC tests run Hypothesis in a worker thread (`drive`) so that each example can make real
calls on the test's event loop, where the conftest collector serves, and the counts can be
asserted after the last example.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import functools
import io
import itertools
import json
import string
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from collector.importer import _message, import_file
from collector.reports_file import ReportIn, RowError, read_reports, validate_file
from collector.server import Collector
from collector.service import MAX_NAME, check_report, translate_result
from collector.store.reads import connect_readonly
from protos.takedown.v1 import takedown_pb2 as pb
from protos.takedown.v1 import takedown_pb2_grpc as pb_grpc

T = TypeVar("T")

NOW = time.time()
EARLIEST = 946_684_800  # 2000-01-01, the intake's lower bound
DAY = 86_400
SUBMIT = "/takedown.v1.Intake/Submit"
CONNECT = "/takedown.v1.AgentLink/Connect"
# A failing example is a whole file or request; Hypothesis warns that printing it is large.
pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")
# Examples are whole files or requests of dozens of rows or messages: shrinking them takes
# minutes, and every assertion names the offending row or message, so failures are not shrunk.
BULK: dict[str, Any] = {
    "deadline": None,
    "phases": [Phase.explicit, Phase.reuse, Phase.generate],
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
}
RUN = itertools.count(1)  # unique URLs and references per generated file


# ---------------------------------------------------------------------------------------------
# Report rows: a valid row, then at most two mutations that each make it invalid in a known way.

COLUMNS = (
    "url",
    "notified_at",
    "received_at",
    "reference",
    "sha256",
    "order_issued_at",
    "order_deadline",
    "origin_ip",
    "note",  # unknown columns are ignored
)


def iso(ts: float, offset_minutes: int = 0) -> str:
    return datetime.fromtimestamp(ts, timezone(timedelta(minutes=offset_minutes))).isoformat()


printable = st.text(
    alphabet=st.characters(codec="utf-8", categories=["L", "N", "P", "S"]), max_size=20
)
controls = st.sampled_from(["\x00", "\x01", "\x07", "\x1b", "\x7f", "\x85", "\u2028", "\t", "\n"])
bad_times = st.one_of(
    st.just("2024-05-01T10:00:00"),  # no offset
    st.just("2024-05-01"),
    printable.map(lambda t: "x" + t),
    st.integers(-(10**12), 10**12).map(str),
    st.sampled_from(
        ["0001-01-01T00:00:00-14:00", "9999-12-31T23:59:59+14:00", "1999-12-31T23:59Z"]
    ),
    st.integers(0, EARLIEST - 1).map(lambda ts: iso(ts)),  # before 2000
    st.integers(int(NOW) + 2 * DAY, int(NOW) + 10_000 * DAY).map(lambda ts: iso(ts, 60)),
)
bad_urls = st.one_of(
    st.sampled_from(["ftp", "file", "gopher", "javascript", "data", "ws", "httpx"]).map(
        lambda s: f"{s}://h.example/x"
    ),
    st.sampled_from(
        [
            "http://a..b/",
            "http://[::1/",
            "http://h.example:99999/",
            "http://h.example:0/",
            "http://h.example:x/",
            "http:///x",
            "http://",
            "//h.example/x",
            "h.example/x",
            "http://[fe80::1%25eth0]/",
            "http://exa\u00admple..com/",
        ]
    ),
    controls.map(lambda c: f"http://h.example/a{c}b"),
    st.integers(2049, 2200).map(lambda n: "http://h.example/" + "a" * n),
)


@dataclass(frozen=True)
class Mutation:
    name: str
    says: str  # a word the error message must contain
    value: Any = None
    field: str = ""


@functools.cache
def mutations(fmt: str) -> st.SearchStrategy[Mutation]:
    """One way to make a row invalid, with the words its error must contain."""
    common = [
        bad_urls.map(lambda v: Mutation("url", "url", v, "url")),
        st.just(Mutation("no-url", "url is missing", "", "url")),
        st.just(Mutation("no-notified", "notified_at is missing", "  ", "notified_at")),
        bad_times.map(lambda v: Mutation("notified", "notified_at", v, "notified_at")),
        bad_times.map(lambda v: Mutation("received", "received_at", v, "received_at")),
        bad_times.map(lambda v: Mutation("order", "order_issued_at", v, "order_issued_at")),
        st.text(string.ascii_letters, min_size=201, max_size=260).map(
            lambda v: Mutation("long-ref", "reference must be", v, "reference")
        ),
        st.tuples(printable, controls, printable).map(
            lambda t: Mutation(
                "control-ref", "reference must be", f"r{t[0]}{t[1]}{t[2]}r", "reference"
            )
        ),
        st.one_of(
            st.text("0123456789abcdef", min_size=0, max_size=63).filter(bool),
            st.text("0123456789abcdef", min_size=65, max_size=80),
            st.text("ghijxyz-", min_size=64, max_size=64),
        ).map(lambda v: Mutation("sha", "sha256", v, "sha256")),
        st.one_of(
            st.sampled_from(["1.2.3", "999.1.1.1", "::g", "10.0.0.1/8", "localhost", "1.2.3.4 5"]),
            printable.filter(lambda s: s.strip() and not s[0].isdigit()),
        ).map(lambda v: Mutation("ip", "origin_ip", v, "origin_ip")),
        st.one_of(
            st.sampled_from(["0", "0s", "-1", "0.2", "abc", "1e3", "99999999999w", "5y"]),
            st.integers(31, 400).map(lambda n: "9" * n),
        ).map(lambda v: Mutation("deadline", "order_deadline", v, "order_deadline")),
        st.just(Mutation("dup-ref", "duplicate reference")),
    ]
    if fmt == "jsonl":
        common += [
            st.tuples(
                st.sampled_from(COLUMNS[:8]),
                st.one_of(
                    st.integers(), st.floats(), st.booleans(), st.lists(st.integers(), max_size=2)
                ),
            ).map(lambda kv: Mutation("type", f"{kv[0]} must be a string", kv[1], kv[0])),
            st.one_of(st.lists(st.integers(), max_size=3), st.integers(), st.text(), st.none()).map(
                lambda v: Mutation("not-object", "not an object", v)
            ),
            st.integers(1, 10_000).map(lambda cut: Mutation("bad-json", "invalid JSON", cut)),
            st.just(Mutation("surrogate-ref", "reference must be", "case-\ud800", "reference")),
        ]
    else:
        common += [
            st.sampled_from([-1, 1, 2]).map(
                lambda d: Mutation("fields", "fields but the header", d)
            ),
            st.just(Mutation("quote", "malformed CSV")),
        ]
    return st.one_of(common)


@dataclass(frozen=True)
class Row:
    fields: dict[str, str]
    mutations: tuple[Mutation, ...]


@dataclass(frozen=True)
class Pools:
    """What a file's rows are made of, drawn once per file: rows then cost two draws each."""

    mutations: list[Mutation]
    texts: list[str]  # reference suffixes, paths, CSV notes

    @staticmethod
    def draw(draw: st.DrawFn, fmt: str, clean: bool) -> Pools:
        return Pools(
            [] if clean else draw(st.lists(mutations(fmt), min_size=8, max_size=16)),
            draw(st.lists(st.text(st.characters(codec="utf-8"), max_size=12), min_size=4)),
        )


def make_row(draw: st.DrawFn, fmt: str, run: int, index: int, pools: Pools) -> Row:
    """A valid row shaped by one drawn integer, plus zero, one or two mutations from the pool."""
    shape = draw(st.integers(0, 2**48 - 1))
    ts = EARLIEST + shape % (int(NOW) - 3600 - EARLIEST)
    offset = (shape >> 8) % (28 * 60 + 1) - 14 * 60
    texts = pools.texts
    path = "".join(ch for ch in texts[shape % len(texts)] if ch in string.ascii_letters + "/?=&")
    fields = {"url": f"http://r{run}-{index}.example/{path}", "notified_at": iso(ts, offset)}
    if shape >> 20 & 1:
        suffix = "".join(ch for ch in texts[(shape >> 24) % len(texts)] if ch.isprintable())
        fields["reference"] = f"case {run}/{index} {suffix}".strip()
    if shape >> 21 & 1:
        fields["received_at"] = iso(max(EARLIEST, ts - (shape >> 28) % 10**6))
    if (shape >> 22) % 6 == 0:
        fields["sha256"] = "ab" * 32
        fields["order_issued_at"] = iso(ts)
        fields["order_deadline"] = ("90", "15m", "24h", "2w")[(shape >> 30) % 4]
        fields["origin_ip"] = ("192.0.2.7", "2001:db8::1")[(shape >> 32) % 2]
    if fmt == "csv" and shape >> 34 & 1:
        fields["note"] = texts[(shape >> 36) % len(texts)]
    table = pools.mutations
    pick = draw(st.integers(0, 2 * len(table) + 1))
    if pick < len(table):
        chosen: tuple[Mutation, ...] = (table[pick],)
    elif pick < 2 * len(table):
        chosen = (table[pick - len(table)], table[(pick + 1) % len(table)])
    else:
        chosen = ()  # valid
    return Row(fields, chosen)


def apply(row: Row, earlier_refs: list[str]) -> tuple[dict[str, Any], list[str]]:
    """The row's fields with its field mutations applied, and the words its error must contain.

    A later mutation of the same field replaces an earlier one; "dup-ref" needs an earlier
    valid reference and is skipped without one. Structural mutations are left to the builders.
    """
    fields: dict[str, Any] = dict(row.fields)
    says: dict[str, str] = {}
    for m in row.mutations:
        if m.name == "dup-ref" and earlier_refs:
            fields["reference"] = earlier_refs[-1]
            says["reference"] = m.says
        elif m.field:
            fields[m.field] = m.value
            says[m.field] = m.says
    return fields, list(says.values())


@dataclass
class Built:
    text: str
    expect: list[tuple[int, list[str] | None, Row]]  # (line, words of the error or None, row)
    tail_from: int  # first line of the unchecked garbage tail
    malformed: int


def build_csv(draw: st.DrawFn, run: int, sizes: tuple[int, int], clean: bool) -> Built:
    order = draw(st.permutations(COLUMNS))
    header = [c.upper() if draw(st.booleans()) else f" {c} " for c in order]
    out = io.StringIO()
    writer = csv.writer(out)  # \r\n ends rows, so a \r in a field is quoted
    writer.writerow(header)
    expect: list[tuple[int, list[str] | None, Row]] = []
    refs: list[str] = []
    malformed = 0
    pools = Pools.draw(draw, "csv", clean)
    for i in range(draw(st.integers(*sizes))):
        row = make_row(draw, "csv", run, i, pools)
        line = out.getvalue().count("\n") + 1
        fields, says = apply(row, refs)
        names = {m.name for m in row.mutations}
        cells = [str(fields.get(c, "")) for c in order]
        if "fields" in names:
            delta = next(m.value for m in row.mutations if m.name == "fields")
            cells = cells[:delta] if delta < 0 else cells + ["extra"] * delta
            says = ["fields but the header"]
        if "quote" in names:  # one physical line: the reader resumes on the next one
            flat = ["".join(ch for ch in c if ch not in '"\r\n') for c in cells]
            out.write(f'"{flat[0]}"x,' + ",".join(flat[1:]) + "\n")
            says = ["malformed CSV"]
        else:
            writer.writerow(cells)
            if not any(c.strip() for c in cells):
                continue  # a blank record is skipped, like a blank line
        if not says and "reference" in fields:
            refs.append(fields["reference"].strip())
        malformed += bool(says)
        expect.append((line, says or None, row))
    if draw(st.booleans()):
        out.write("\n")
    tail_from = out.getvalue().count("\n") + 1
    garbage = st.text(alphabet=st.sampled_from('",\r\x00 ab:/Zé\\{}\ufeff\u2028'), max_size=30)
    for junk in [] if clean else draw(st.lists(garbage, max_size=8)):
        out.write(junk + "\n")
    return Built(out.getvalue(), expect, tail_from, malformed)


def build_jsonl(draw: st.DrawFn, run: int, sizes: tuple[int, int], clean: bool) -> Built:
    lines: list[str] = []
    expect: list[tuple[int, list[str] | None, Row]] = []
    refs: list[str] = []
    malformed = 0
    pools = Pools.draw(draw, "jsonl", clean)
    for i in range(draw(st.integers(*sizes))):
        if i % 11 == 10:
            lines.append(("", "  ", "\t", "\r")[i % 4])
        row = make_row(draw, "jsonl", run, i, pools)
        fields, says = apply(row, refs)
        obj: Any = fields
        surrogates = any(m.name == "surrogate-ref" for m in row.mutations)
        text = json.dumps(obj, ensure_ascii=surrogates or draw(st.booleans()))
        names = {m.name for m in row.mutations}
        if "not-object" in names:
            value = next(m.value for m in row.mutations if m.name == "not-object")
            text, says = json.dumps(value), ["not an object"]
        elif "bad-json" in names:
            cut = next(m.value for m in row.mutations if m.name == "bad-json")
            text, says = text[: 1 + cut % (len(text) - 1)], ["invalid JSON"]
        if not says and "reference" in fields:
            refs.append(fields["reference"].strip())
        malformed += bool(says)
        lines.append(text)
        expect.append((len(lines), says or None, row))
    tail_from = len(lines) + 1
    garbage = st.text(alphabet=st.sampled_from('{}[]":,0 a\\\x00é\u2028'), max_size=30)
    lines += [] if clean else draw(st.lists(garbage, max_size=8))
    return Built("\n".join(lines) + "\n", expect, tail_from, malformed)


@st.composite
def report_files(
    draw: st.DrawFn, fmt: str, sizes: tuple[int, int] = (80, 90), may_be_clean: bool = False
) -> Built:
    """A report file of `sizes` rows: checked rows first, then (unless clean) a garbage tail."""
    run = next(RUN)
    clean = may_be_clean and draw(st.booleans())
    build = build_csv if fmt == "csv" else build_jsonl
    return build(draw, run, sizes, clean)


def write_file(directory: Path, fmt: str, text: str) -> Path:
    path = directory / f"reports.{fmt}"
    path.write_bytes(text.encode("utf-8"))
    return path


def check_read(built: Built, got: list[ReportIn | RowError], physical: int) -> None:
    """Each checked row at its line, right verdict and words; the garbage tail only sane."""
    head = got[: len(built.expect)]
    assert len(head) == len(built.expect)
    for item, (line, says, row) in zip(head, built.expect, strict=True):
        if says is None:
            assert isinstance(item, ReportIn), (line, row, item)
            assert item.url == row.fields["url"]
            # What the reader accepts, the intake accepts: the file is never half-imported.
            assert not isinstance(check_report(_message(item), time.time()), str), item
        else:
            assert isinstance(item, RowError), (line, row, item)
            assert item.line == line, (row, item)
            for word in says:
                assert word in item.message, (row, item)
    lines = [item.line for item in got if isinstance(item, RowError)]
    assert lines == sorted(lines)
    for item in got[len(built.expect) :]:
        if isinstance(item, RowError):
            assert built.tail_from <= item.line <= physical and item.message
        else:
            assert not isinstance(check_report(_message(item), time.time()), str), item


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_reader_thousands_of_malformed_rows(fmt: str) -> None:
    """>= 6,000 malformed rows per format: each a RowError at its line naming the problem."""
    reached = {"files": 0, "rows": 0, "malformed": 0}

    @settings(max_examples=100, **BULK)
    @given(report_files(fmt))
    def run(built: Built) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = write_file(Path(tmp), fmt, built.text)
            got = list(read_reports(path, now=NOW))
        check_read(built, got, built.text.count("\n"))
        reached["files"] += 1
        reached["rows"] += len(built.expect)
        reached["malformed"] += built.malformed

    run()
    print(f"reached reader-{fmt}: {reached}")
    assert reached["malformed"] >= 6_000, reached


# ---------------------------------------------------------------------------------------------
# Whole files through `takedown-collector import` (collector.importer.import_file) into the
# conftest collector: a file with a bad row imports nothing, unless --skip-invalid.


def db_count(collector: Collector, sql: str, *args: object) -> int:
    conn = connect_readonly(collector.config.db)
    try:
        return int(conn.execute(sql, args).fetchone()[0])
    finally:
        conn.close()


def stored_urls(collector: Collector, prefix: str) -> set[str]:
    conn = connect_readonly(collector.config.db)
    try:
        rows = conn.execute("SELECT url FROM urls WHERE url LIKE ? || '%'", (prefix,))
        return {url for (url,) in rows}
    finally:
        conn.close()


@pytest.mark.integration
@pytest.mark.slow
@settings(
    max_examples=40,
    deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
@given(fmt=st.sampled_from(["csv", "jsonl"]), data=st.data())
async def test_import_whole_files(
    collector: Collector, tmp_path_factory: pytest.TempPathFactory, fmt: str, data: st.DataObject
) -> None:
    """A file with bad rows: each reported as FILE:LINE, nothing stored; --skip-invalid stores
    exactly the valid rows and the intake refuses none of them; a clean file imports whole."""
    built = data.draw(report_files(fmt, sizes=(3, 30), may_be_clean=True))
    path = write_file(tmp_path_factory.mktemp("import"), fmt, built.text)
    run = built.expect[0][2].fields["url"].split("-")[0]  # http://rN
    check = validate_file(path)
    valid_urls = {row.fields["url"] for _, says, row in built.expect if says is None}
    target = f"127.0.0.1:{collector.grpc_port}"
    reports_before = db_count(collector, "SELECT count(*) FROM reports")

    out = io.StringIO()
    status = await import_file(path, target, out=out, batch_size=7)
    text = out.getvalue()
    if check.error_count:
        bad_lines = {line for line, says, _ in built.expect if says}
        assert bad_lines <= {e.line for e in check.errors}
        for e in check.errors:
            assert f"{path}:{e.line}: {e.message}" in text
        assert status == 1 and "nothing imported" in text
        assert f"accepted 0, already known 0, rejected {check.error_count}" in text
        assert db_count(collector, "SELECT count(*) FROM reports") == reports_before
        assert stored_urls(collector, f"{run}-") == set()

        out = io.StringIO()
        status = await import_file(path, target, out=out, skip_invalid=True, batch_size=7)
        text = out.getvalue()
    assert status == 0, text
    assert f"accepted {check.valid}, already known 0, rejected {check.error_count}" in text
    assert " rejected: " not in text  # no row refused by the intake after others were stored
    assert db_count(collector, "SELECT count(*) FROM reports") == reports_before + check.valid
    assert stored_urls(collector, f"{run}-") == valid_urls


T_OK = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(NOW - 60))


@pytest.mark.integration
@pytest.mark.parametrize(
    ("name", "text", "says"),
    [
        (
            "multiline.csv",
            f'url,notified_at,reference\nhttp://m.example/1,{T_OK},ok\nhttp://m.example/2,{T_OK},"a\nb"\n',
            "reference must be at most 200 printable characters",
        ),
        (
            "long.csv",
            f"url,notified_at,reference\nhttp://m.example/3,{T_OK},ok\n"
            f"http://m.example/4,{T_OK},{'x' * 201}\n",
            "reference must be at most 200 printable characters",
        ),
        (
            "old.csv",
            f"url,notified_at\nhttp://m.example/5,{T_OK}\nhttp://m.example/6,1999-12-31T00:00:00Z\n",
            "is before 2000-01-01",
        ),
        (
            "surrogate.jsonl",
            f'{{"url":"http://m.example/7","notified_at":"{T_OK}"}}\n'
            f'{{"url":"http://m.example/8","notified_at":"{T_OK}","reference":"\\ud800"}}\n',
            "reference must be at most 200 printable characters",
        ),
        (
            "infinite.csv",
            f"url,notified_at,order_deadline\nhttp://m.example/9,{T_OK},\n"
            f"http://m.example/10,{T_OK},{'9' * 400}\n",
            "must be 1 to 4294967295 seconds",
        ),
        (
            "huge.csv",
            f"url,notified_at,order_deadline\nhttp://m.example/11,{T_OK},\nhttp://m.example/12,{T_OK},9999999999w\n",
            "must be 1 to 4294967295 seconds",
        ),
    ],
)
async def test_rows_the_intake_refuses_are_refused_before_sending(
    collector: Collector, tmp_path: Path, name: str, text: str, says: str
) -> None:
    """Rows that used to pass the reader and then be refused by the intake (after the rows before
    them were stored) or crash the importer (a lone surrogate, an order deadline beyond uint32)
    are bad rows at line 3 (line 2 for JSONL): nothing is imported."""
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    out = io.StringIO()
    status = await import_file(path, f"127.0.0.1:{collector.grpc_port}", out=out, batch_size=1)
    line = 2 if name.endswith(".jsonl") else 3
    assert status == 1
    assert f"{path}:{line}: " in out.getvalue() and says in out.getvalue()
    assert db_count(collector, "SELECT count(*) FROM reports") == 0


# ---------------------------------------------------------------------------------------------
# gRPC: random messages and raw bytes against Intake.Submit and AgentLink.Connect.

NOW_US = int(NOW * 1_000_000)
EARLIEST_US = EARLIEST * 1_000_000
INT64 = st.integers(-(2**63), 2**63 - 1)
UINT64 = st.integers(0, 2**64 - 1)
UINT32 = st.integers(0, 2**32 - 1)
any_text = st.text(st.characters(codec="utf-8"), max_size=40)  # no lone surrogates: proto strings
plausible_us = st.integers(EARLIEST_US, NOW_US)
times_us = st.one_of(st.just(0), INT64, plausible_us, st.integers(-(10**6), 10**6))
urls = st.one_of(
    bad_urls,
    any_text,
    st.builds(
        "http://{}.example/{}".format,
        st.text(string.ascii_lowercase + string.digits, min_size=1, max_size=8),
        st.text(string.ascii_letters + "%/?", max_size=10),
    ),
)


@dataclass(frozen=True)
class Field:
    """A message field: values the intake accepts, and Hypothesis' idea of anything else."""

    valid: tuple[Any, ...]
    drawn: st.SearchStrategy[Any]


@st.composite
def pooled(
    draw: st.DrawFn, build: Callable[..., T], fields: dict[str, Field], sizes: tuple[int, int]
) -> list[T]:
    """`sizes` messages from per-field pools drawn once (valid values plus up to 6 drawn ones).

    A message costs one drawn integer: its low bits pick "all valid" (a third of them), the rest
    pick each field's pool entry. Hypothesis limits how much one example may draw, so drawing
    every field of a hundred messages would end most examples early.
    """
    pools = {
        n: [*f.valid, *draw(st.lists(f.drawn, min_size=1, max_size=6))] for n, f in fields.items()
    }
    out = []
    for _ in range(draw(st.integers(*sizes))):
        k = draw(st.integers(0, 2**64 - 1))
        clean, k = k % 3 == 0, k // 3
        values = {}
        for name, pool in pools.items():
            width = len(fields[name].valid) if clean else len(pool)
            values[name], k = pool[k % 16 % width], k // 16
        out.append(build(**values))
    return out


REPORT_FIELDS = {
    "url": Field(("http://ok.example/a", "https://ok.example:8443/b?c=d#e"), urls),
    "reference": Field(
        ("", "case-1"), st.one_of(printable, any_text, st.integers(195, 205).map("r".__mul__))
    ),
    "notified_at_unix_us": Field((NOW_US - 10**9, EARLIEST_US), times_us),
    "received_at_unix_us": Field((0, NOW_US - 10**10), times_us),
    "sha256": Field((b"", b"\x01" * 32), st.binary(max_size=40)),
    "order_issued_at_unix_us": Field((0, NOW_US), times_us),
    "order_deadline_seconds": Field((0, 3600), UINT32),
    "origin_ip": Field(("", "192.0.2.1"), st.one_of(st.ip_addresses().map(str), any_text)),
}


def drive(run: Callable[[], None]) -> Awaitable[None]:
    """Run the Hypothesis function `run` in a worker thread; it reaches the loop through `call`."""
    return asyncio.to_thread(run)


def caller(loop: asyncio.AbstractEventLoop) -> Callable[[Coroutine[Any, Any, T]], T]:
    def call(coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout=60)

    return call


async def still_serving(channel: grpc.aio.Channel) -> None:
    """The server answers health checks and stores a valid report."""
    health = health_pb2_grpc.HealthStub(channel)
    reply = await health.Check(health_pb2.HealthCheckRequest(service="takedown.v1.Intake"))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    url = f"http://alive-{next(RUN)}.example/"
    response = await pb_grpc.IntakeStub(channel).Submit(
        pb.SubmitRequest(reports=[pb.Report(url=url, notified_at_unix_us=NOW_US)])
    )
    assert response.outcomes[0].status == pb.SUBMIT_STATUS_ACCEPTED


def stored_reference(collector: Collector, reference: str) -> str | None:
    """The URL a reference (of the unauthenticated intake) already names, if any."""
    conn = connect_readonly(collector.config.db)
    try:
        row = conn.execute(
            "SELECT u.url FROM reports r JOIN urls u ON u.id = r.url_id"
            " WHERE r.source = '' AND r.reference = ?",
            (reference,),
        ).fetchone()
        return None if row is None else str(row[0])
    finally:
        conn.close()


def check_outcomes(
    collector: Collector, sent: list[pb.Report], got: pb.SubmitResponse, now: float
) -> int:
    """Outcomes match `check_report` one by one; exactly the accepted reports are stored."""
    assert len(got.outcomes) == len(sent)
    accepted = {}
    for report, outcome in zip(sent, got.outcomes, strict=True):
        verdict = check_report(report, now)
        if isinstance(verdict, str):
            assert (outcome.status, outcome.error) == (pb.SUBMIT_STATUS_REJECTED, verdict), report
        elif outcome.status == pb.SUBMIT_STATUS_REJECTED:
            # A reference this hotline already used for another URL: refused, naming both.
            assert verdict.reference and "already names URL id" in outcome.error, outcome
            known = stored_reference(collector, verdict.reference)
            assert known is not None and known != verdict.url, (known, verdict.url)
            assert known in outcome.error and verdict.url in outcome.error
        else:
            assert outcome.status in (pb.SUBMIT_STATUS_ACCEPTED, pb.SUBMIT_STATUS_ALREADY_KNOWN)
            assert outcome.report_id > 0 and not outcome.error
            if outcome.status == pb.SUBMIT_STATUS_ACCEPTED:
                accepted[outcome.report_id] = verdict.url
    if accepted:
        conn = connect_readonly(collector.config.db)
        try:
            marks = ",".join("?" * len(accepted))
            rows = conn.execute(
                f"SELECT reports.id, urls.url FROM reports JOIN urls ON urls.id = reports.url_id"
                f" WHERE reports.id IN ({marks})",
                list(accepted),
            )
            assert dict(rows.fetchall()) == accepted
        finally:
            conn.close()
    return len(accepted)


@pytest.mark.integration
@pytest.mark.slow
async def test_submit_random_reports(collector: Collector) -> None:
    """>= 6,000 random Reports in 60+ requests: each outcome is what check_report says, with its
    reason; the reports table grows by exactly the accepted ones; the server keeps serving."""
    call = caller(asyncio.get_running_loop())
    reached = {"requests": 0, "reports": 0, "rejected": 0, "accepted": 0}
    async with grpc.aio.insecure_channel(f"127.0.0.1:{collector.grpc_port}") as channel:
        stub = pb_grpc.IntakeStub(channel)

        async def submit(sent: list[pb.Report]) -> None:
            before = db_count(collector, "SELECT count(*) FROM reports")
            for r in sent:  # the pools' valid URLs and references, fresh so they are stored
                if r.url in REPORT_FIELDS["url"].valid:
                    r.url += str(next(RUN))
                if r.reference == "case-1":
                    r.reference = f"case-{next(RUN)}"
            now = time.time()
            got = await stub.Submit(pb.SubmitRequest(reports=sent), timeout=30)
            accepted = check_outcomes(collector, sent, got, now)
            assert db_count(collector, "SELECT count(*) FROM reports") == before + accepted
            reached["requests"] += 1
            reached["reports"] += len(sent)
            reached["accepted"] += accepted
            reached["rejected"] += sum(o.status == pb.SUBMIT_STATUS_REJECTED for o in got.outcomes)

        @settings(max_examples=60, **BULK)
        @given(pooled(pb.Report, REPORT_FIELDS, (100, 130)))
        def run(sent: list[pb.Report]) -> None:
            call(submit(sent))

        await drive(run)
        too_many = pb.SubmitRequest(reports=[pb.Report(url="http://x.example/")] * 10_001)
        before = db_count(collector, "SELECT count(*) FROM reports")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Submit(too_many)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "at most 10000 reports" in (info.value.details() or "")
        assert db_count(collector, "SELECT count(*) FROM reports") == before
        await still_serving(channel)
    print(f"reached submit-reports: {reached}")
    assert reached["reports"] >= 6_000 and reached["rejected"] > reached["reports"] // 3, reached
    assert reached["accepted"] > reached["reports"] // 10, reached


def mutated(valid: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    """Valid encodings with bytes flipped, cut short, or glued to random bytes."""

    @st.composite
    def mutate(draw: st.DrawFn) -> bytes:
        data = bytearray(draw(valid))
        how = draw(st.sampled_from(["flip", "cut", "glue", "insert"]))
        if how == "flip" and data:
            for _ in range(draw(st.integers(1, 4))):
                i = draw(st.integers(0, len(data) - 1))
                data[i] = draw(st.integers(0, 255))
        elif how == "cut" and data:
            data = data[: draw(st.integers(0, len(data) - 1))]
        elif how == "glue":
            data += draw(st.binary(min_size=1, max_size=20))
        else:
            i = draw(st.integers(0, len(data)))
            data[i:i] = draw(st.binary(min_size=1, max_size=6))
        return bytes(data)

    return mutate()


def decodes(message: type[T], data: bytes) -> T | None:
    try:
        return message.FromString(data)  # type: ignore[attr-defined, no-any-return]
    except DecodeError:
        return None


def undecodable(exc: grpc.aio.AioRpcError, type_name: str) -> bool:
    """The collector's answer to bytes the request type cannot parse."""
    details = exc.details() or ""
    return exc.code() == grpc.StatusCode.INVALID_ARGUMENT and f"not a valid {type_name}" in details


@pytest.mark.integration
@pytest.mark.slow
async def test_submit_raw_bytes(collector: Collector) -> None:
    """>= 1,200 raw payloads on Intake/Submit: a payload that parses is answered like that message
    (outcomes as check_report says), one that does not gets an error status, never a crash;
    nothing from an unparsable payload is stored, and the server keeps serving."""
    call = caller(asyncio.get_running_loop())
    reached = {"payloads": 0, "undecodable": 0}
    valid = pooled(pb.Report, REPORT_FIELDS, (0, 3)).map(
        lambda r: pb.SubmitRequest(reports=r).SerializeToString()
    )
    payloads = st.one_of(st.binary(max_size=200), mutated(valid), valid)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{collector.grpc_port}") as channel:
        submit = channel.unary_unary(SUBMIT, request_serializer=None, response_deserializer=None)

        async def one(data: bytes) -> None:
            parsed = decodes(pb.SubmitRequest, data)
            before = db_count(collector, "SELECT count(*) FROM reports")
            now = time.time()
            try:
                raw = await submit(data, timeout=30)
            except grpc.aio.AioRpcError as exc:
                assert parsed is None and undecodable(exc, "takedown.v1.SubmitRequest"), (data, exc)
                assert db_count(collector, "SELECT count(*) FROM reports") == before
                reached["undecodable"] += 1
                return
            assert parsed is not None, data
            check_outcomes(collector, list(parsed.reports), pb.SubmitResponse.FromString(raw), now)

        async def many(batch: list[bytes]) -> None:
            for data in batch:  # one at a time: the row counts above are per payload
                await one(data)
            reached["payloads"] += len(batch)

        @settings(max_examples=240, **BULK)
        @given(st.lists(payloads, min_size=5, max_size=6))
        def run(batch: list[bytes]) -> None:
            call(many(batch))

        await drive(run)
        await still_serving(channel)
    print(f"reached submit-raw: {reached}")
    assert reached["payloads"] >= 1_200 and reached["undecodable"] > 100, reached


@pytest.mark.integration
async def test_unparsable_request_is_invalid_argument(collector: Collector) -> None:
    """A request whose bytes are not a SubmitRequest is INVALID_ARGUMENT, like any bad input."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{collector.grpc_port}") as channel:
        submit = channel.unary_unary(SUBMIT, request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await submit(b"\xff\xff\xff")
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "Submit: the request is not a valid takedown.v1.SubmitRequest" in (
            info.value.details() or ""
        )
        # The server still answers a valid request on the same channel.
        raw = await submit(pb.SubmitRequest().SerializeToString(), timeout=30)
    assert pb.SubmitResponse.FromString(raw) == pb.SubmitResponse()


# AgentLink.Connect: hello (valid or not), then batches of random results.

Stream = grpc.aio.StreamStreamCall[pb.AgentMessage, pb.CollectorMessage]

RESULT_FIELDS = {
    "url_id": Field((1, 2), st.one_of(INT64, st.integers(-2, 12))),
    "seq": Field((1, 2), st.one_of(UINT64, st.sampled_from([2**63 - 1, 2**63, 2**64 - 1]))),
    "started_at_unix_us": Field((NOW_US - 10**9,), st.one_of(INT64, plausible_us)),
    "elapsed_ms": Field((120,), UINT32),
    "status": Field((200, 404), st.one_of(st.sampled_from([0, 301, 451, 503, 999, 1000]), UINT32)),
    "final_url": Field(
        ("http://ok.example/a",), st.one_of(any_text, st.integers(8190, 8200).map("a".__mul__))
    ),
    "body_sha256": Field((b"", b"\x02" * 32), st.binary(max_size=40)),
    "body_bytes": Field((0, 5000), st.one_of(UINT64, st.just(2**63))),
    "truncated": Field((False,), st.booleans()),
    "peer_ip": Field(("", "127.0.0.10"), st.one_of(st.ip_addresses().map(str), any_text)),
    "error": Field((0, 3), st.integers(0, 15)),  # 13..15 are not ErrorClass values
    "redirects": Field((0,), UINT32),
    "challenge": Field((False,), st.booleans()),
}

names = st.one_of(
    st.text(string.ascii_letters + "-", min_size=1, max_size=20),  # valid
    any_text,
    st.text("n", min_size=MAX_NAME, max_size=MAX_NAME + 2),
)
hellos = st.builds(
    pb.Hello,
    agent=names,
    network=names,
    version=any_text,
    sent_at_unix_us=INT64,
    assignment_digests=st.lists(UINT64, max_size=300),
)

good_hellos = st.builds(
    pb.Hello,
    agent=st.just("a"),  # replaced by a unique name
    network=st.text(string.ascii_letters + "-", min_size=1, max_size=20),
    version=any_text,
    sent_at_unix_us=INT64,
    assignment_digests=st.lists(UINT64, max_size=300),
)


def hello_ok(hello: pb.Hello) -> bool:
    return all(0 < len(v) <= MAX_NAME and v.isprintable() for v in (hello.agent, hello.network))


async def next_of(call: Stream, kind: str) -> pb.CollectorMessage:
    while True:
        message = await call.read()
        assert message is not grpc.aio.EOF, f"stream ended waiting for {kind}"
        if message.WhichOneof("kind") == kind:
            return message


async def refused(call: Stream) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        while await call.read() is not grpc.aio.EOF:
            pass
    return info.value


@pytest.mark.integration
@pytest.mark.slow
async def test_connect_random_messages(collector: Collector) -> None:
    """>= 6,000 random results on 120 streams: a bad hello or a message other than a batch after
    it is INVALID_ARGUMENT; every batch is acked with stored + duplicates + rejected = sent and at
    least every result translate_result refuses rejected; only valid results for real URLs are
    stored; the server keeps serving."""
    call_ = caller(asyncio.get_running_loop())
    reached = {"streams": 0, "results": 0, "invalid": 0, "stored": 0, "refused": 0}
    async with grpc.aio.insecure_channel(f"127.0.0.1:{collector.grpc_port}") as channel:
        intake = pb_grpc.IntakeStub(channel)
        seeded = await intake.Submit(
            pb.SubmitRequest(
                reports=[
                    pb.Report(url=f"http://seed.example/{i}", notified_at_unix_us=NOW_US)
                    for i in range(12)
                ]
            )
        )
        real_ids = {o.url_id for o in seeded.outcomes}
        fields = {
            **RESULT_FIELDS,
            "url_id": Field(tuple(sorted(real_ids)), RESULT_FIELDS["url_id"].drawn),
        }
        seqs = itertools.count(3)

        async def stream(hello: pb.Hello, batches: list[list[pb.ProbeResult]], tail: str) -> None:
            name = f"fuzz-{next(RUN)}"
            if hello_ok(hello):
                hello.agent = name
            call: Stream = pb_grpc.AgentLinkStub(channel).Connect(timeout=30)  # type: ignore[call-arg]
            reached["streams"] += 1
            await call.write(pb.AgentMessage(hello=hello))
            if not hello_ok(hello):
                exc = await refused(call)
                assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, exc
                reached["refused"] += 1
                return
            await next_of(call, "welcome")
            sent: dict[int, list[pb.ProbeResult]] = {}
            for r in itertools.chain.from_iterable(batches):
                if r.seq in (1, 2):  # the pool's valid seqs: make them fresh so they are stored
                    r.seq = next(seqs)
            for batch_id, batch in enumerate(batches, 1):
                now = time.time()
                message = pb.ResultBatch(batch_id=batch_id, results=batch, sent_at_unix_us=NOW_US)
                await call.write(pb.AgentMessage(batch=message))
                ack = (await next_of(call, "ack")).ack
                invalid = sum(isinstance(translate_result(r, now), str) for r in batch)
                assert ack.batch_id == batch_id
                assert ack.stored + ack.duplicates + ack.rejected == len(batch), (ack, batch)
                assert ack.rejected >= invalid
                for r in batch:
                    if not isinstance(translate_result(r, now), str) and r.url_id in real_ids:
                        sent.setdefault(r.seq, []).append(r)
                reached["results"] += len(batch)
                reached["invalid"] += invalid
                reached["stored"] += ack.stored
            if tail == "hello":
                await call.write(pb.AgentMessage(hello=hello))
            elif tail == "empty":
                await call.write(pb.AgentMessage())
            else:
                await call.done_writing()
            if tail != "close":
                exc = await refused(call)
                assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, exc
                assert "only result batches may follow hello" in (exc.details() or "")
            else:
                while await call.read() is not grpc.aio.EOF:
                    pass
                assert await call.code() == grpc.StatusCode.OK
            conn = connect_readonly(collector.config.db)
            try:
                stored = conn.execute(
                    "SELECT seq, url_id, status, final_url FROM results JOIN agents"
                    " ON agents.id = results.agent_id WHERE agents.name = ?",
                    (name,),
                ).fetchall()
            finally:
                conn.close()
            for seq, url_id, status, final_url in stored:
                assert any(
                    (r.url_id, r.status, r.final_url) == (url_id, status, final_url)
                    for r in sent.get(seq, [])
                ), (seq, url_id, status)

        # Enough examples that the result count is reached however many hellos are bad.
        @settings(max_examples=200, **BULK)
        @given(
            hello=st.one_of(good_hellos, hellos),  # Hypothesis favours the first
            batches=st.lists(pooled(pb.ProbeResult, fields, (25, 40)), min_size=3, max_size=4),
            tail=st.sampled_from(["close", "hello", "empty"]),
        )
        def run(hello: pb.Hello, batches: list[list[pb.ProbeResult]], tail: str) -> None:
            call_(stream(hello, batches, tail))

        await drive(run)

        for first in (pb.AgentMessage(), pb.AgentMessage(batch=pb.ResultBatch(batch_id=1))):
            call: Stream = pb_grpc.AgentLinkStub(channel).Connect()  # type: ignore[call-arg]
            await call.write(first)
            assert (await refused(call)).code() == grpc.StatusCode.INVALID_ARGUMENT
        await still_serving(channel)
    print(f"reached connect-results: {reached}")
    assert reached["results"] >= 6_000 and reached["refused"] > 0, reached
    assert reached["invalid"] > reached["results"] // 5 and reached["stored"] > 0, reached


@pytest.mark.integration
@pytest.mark.slow
async def test_connect_raw_bytes(collector: Collector) -> None:
    """>= 600 raw messages on 200 Connect streams: the stream ends as the messages, parsed in
    order, require -- OK after valid ones, INVALID_ARGUMENT at the first message that is not a
    valid hello / a batch or is unparsable (naming its position) -- and the server
    keeps serving."""
    call_ = caller(asyncio.get_running_loop())
    reached = {"streams": 0, "payloads": 0}
    hello = pb.AgentMessage(hello=pb.Hello(agent="raw", network="n")).SerializeToString()
    batch = pooled(pb.ProbeResult, RESULT_FIELDS, (0, 3)).map(
        lambda r: pb.AgentMessage(batch=pb.ResultBatch(batch_id=1, results=r)).SerializeToString()
    )
    first = st.one_of(st.just(hello), mutated(st.just(hello)), st.binary(max_size=60))
    later = st.one_of(batch, mutated(batch), st.binary(max_size=60), st.just(hello))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{collector.grpc_port}") as channel:
        connect = channel.stream_stream(
            CONNECT, request_serializer=None, response_deserializer=None
        )

        def expected(payloads: list[bytes]) -> tuple[str, int]:
            """How the stream must end, and how many payloads the server reads to decide."""
            for i, data in enumerate(payloads):
                message = decodes(pb.AgentMessage, data)
                if message is None:
                    return "undecodable", i + 1
                kind = message.WhichOneof("kind")
                if i == 0 and (kind != "hello" or not hello_ok(message.hello)):
                    return "invalid", i + 1
                if i > 0 and kind != "batch":
                    return "invalid", i + 1
            return "ok", len(payloads)

        async def stream(payloads: list[bytes]) -> None:
            want, decisive = expected(payloads)
            call = connect(timeout=30)
            # Nothing is written after the payload that ends the stream: a write racing the
            # server's end fails in the client ("Internal error from Core") and hides the status.
            for data in payloads[:decisive]:
                await call.write(data)
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                await call.done_writing()
            try:
                while await call.read() is not grpc.aio.EOF:
                    pass
            except grpc.aio.AioRpcError as exc:
                if want == "undecodable":
                    assert undecodable(exc, "takedown.v1.AgentMessage"), (payloads, exc)
                    assert f"message {decisive} " in (exc.details() or ""), exc
                else:
                    assert want == "invalid" and exc.code() == grpc.StatusCode.INVALID_ARGUMENT, (
                        payloads,
                        exc,
                    )
            else:
                assert want == "ok", payloads
            reached["streams"] += 1
            reached["payloads"] += len(payloads)

        @settings(max_examples=200, **BULK)
        @given(first=first, rest=st.lists(later, min_size=2, max_size=4))
        def run(first: bytes, rest: list[bytes]) -> None:
            call_(stream([first, *rest]))

        await drive(run)
        await still_serving(channel)
    print(f"reached connect-raw: {reached}")
    assert reached["payloads"] >= 600, reached


# grpc.health.v1: Check (unary) and Watch (server streaming), open to anyone without a token.

CHECK = "/grpc.health.v1.Health/Check"
WATCH = "/grpc.health.v1.Health/Watch"
HEALTH_REQUEST = "grpc.health.v1.HealthCheckRequest"
KNOWN_SERVICES = ("", "takedown.v1.AgentLink", "takedown.v1.Intake")


def malformed_warnings(records: list[Any], method: str) -> int:
    return sum(
        1
        for r in records
        if r.name == "collector.decoding" and f"method={method} " in r.getMessage()
    )


@pytest.mark.integration
@pytest.mark.slow
async def test_health_raw_bytes(collector: Collector, caplog: pytest.LogCaptureFixture) -> None:
    """>= 400 raw payloads on Health/Check and Health/Watch: a payload that parses is answered
    like that request (SERVING for the collector's services, NOT_FOUND / SERVICE_UNKNOWN for
    others), one that does not is INVALID_ARGUMENT naming the type; the log holds no ERROR and
    at most one throttled warning per method per 10 s; the server keeps serving."""
    caplog.set_level("WARNING")
    call_ = caller(asyncio.get_running_loop())
    reached = {"check": 0, "watch": 0, "undecodable": 0}
    valid = st.one_of(st.sampled_from(KNOWN_SERVICES), st.just("nope.v1.X"), any_text).map(
        lambda s: health_pb2.HealthCheckRequest(service=s).SerializeToString()
    )
    payloads = st.one_of(st.binary(max_size=60), mutated(valid), valid)
    started = time.monotonic()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{collector.grpc_port}") as channel:
        check = channel.unary_unary(CHECK, request_serializer=None, response_deserializer=None)
        watch = channel.unary_stream(WATCH, request_serializer=None, response_deserializer=None)

        async def one(data: bytes) -> None:
            parsed = decodes(health_pb2.HealthCheckRequest, data)
            known = parsed is not None and parsed.service in KNOWN_SERVICES
            try:
                raw = await check(data, timeout=30)
            except grpc.aio.AioRpcError as exc:
                if parsed is None:
                    assert undecodable(exc, HEALTH_REQUEST), (data, exc)
                    reached["undecodable"] += 1
                else:
                    assert not known and exc.code() == grpc.StatusCode.NOT_FOUND, (data, exc)
            else:
                assert known, data
                reply = health_pb2.HealthCheckResponse.FromString(raw)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            reached["check"] += 1
            stream = watch(data, timeout=30)
            try:
                first = await stream.read()
            except grpc.aio.AioRpcError as exc:
                assert parsed is None and undecodable(exc, HEALTH_REQUEST), (data, exc)
            else:
                assert parsed is not None, data
                status = health_pb2.HealthCheckResponse.FromString(first).status
                want = "SERVING" if known else "SERVICE_UNKNOWN"
                assert status == health_pb2.HealthCheckResponse.ServingStatus.Value(want)
            finally:
                stream.cancel()
            reached["watch"] += 1

        async def many(batch: list[bytes]) -> None:
            for data in batch:
                await one(data)

        @settings(max_examples=100, **BULK)
        @given(st.lists(payloads, min_size=4, max_size=5))
        def run(batch: list[bytes]) -> None:
            call_(many(batch))

        await drive(run)
        await still_serving(channel)
    windows = 1 + int((time.monotonic() - started) // 10)
    print(f"reached health-raw: {reached}")
    assert reached["check"] >= 400 and reached["undecodable"] > 40, reached
    errors = [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]
    assert errors == [], [r.getMessage() for r in errors]
    for method in ("Check", "Watch"):
        assert 1 <= malformed_warnings(caplog.records, method) <= windows, method


@pytest.mark.integration
async def test_malformed_flood_logs_one_warning(
    collector: Collector, caplog: pytest.LogCaptureFixture
) -> None:
    """200 undecodable requests on each method are all INVALID_ARGUMENT; while the throttle's
    window lasts, each method logs one warning and no ERROR or traceback."""
    caplog.set_level("WARNING")
    collector.decoding.throttle.every = 3600.0  # the whole test is one window
    bad = b"\xff\xff\xff"
    async with grpc.aio.insecure_channel(f"127.0.0.1:{collector.grpc_port}") as channel:
        calls: dict[str, Callable[[], Awaitable[object]]] = {
            "Check": lambda: channel.unary_unary(CHECK, None, None)(bad),
            "Watch": lambda: channel.unary_stream(WATCH, None, None)(bad).read(),
            "Submit": lambda: channel.unary_unary(SUBMIT, None, None)(bad),
        }

        async def connect() -> object:
            call = channel.stream_stream(CONNECT, None, None)()
            await call.write(bad)
            return await call.read()

        calls["Connect"] = connect
        for name, make in calls.items():
            for _ in range(200):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await make()
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, info.value)
        await still_serving(channel)
    errors = [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL") or r.exc_info]
    assert errors == [], [r.getMessage() for r in errors]
    for name in calls:
        assert malformed_warnings(caplog.records, name) == 1, name
