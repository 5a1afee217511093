"""Tests for reading hotline report files (CSV and JSONL)."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import string
import tempfile
import tracemalloc
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from collector.reports_file import (
    MAX_KEPT_ERRORS,
    InvalidTime,
    ReportFileError,
    ReportIn,
    RowError,
    parse_time,
    read_reports,
    validate_file,
)
from collector.urls import InvalidURL, normalize_url

NOW = datetime(2026, 12, 1, tzinfo=UTC).timestamp()
T0 = "2026-11-28T10:00:00+01:00"
T0_UNIX = datetime(2026, 11, 28, 9, tzinfo=UTC).timestamp()
HEADER = "url,notified_at,received_at,reference\n"


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8"))
    return path


def read(path: Path, fmt: str | None = None) -> list[ReportIn | RowError]:
    return list(read_reports(path, fmt, now=NOW))


class TestNormalizeUrl:
    @pytest.mark.parametrize(
        ("raw", "expected"),
        [
            ("  http://example.com/a  ", "http://example.com/a"),
            (
                "HTTPS://WWW.Example.COM/Path/A%2fB?Q=Ab%20c",
                "https://www.example.com/Path/A%2fB?Q=Ab%20c",
            ),
            ("http://example.com:80/x", "http://example.com/x"),
            ("https://example.com:443", "https://example.com"),
            ("http://example.com:8080/x", "http://example.com:8080/x"),
            ("https://example.com:80/", "https://example.com:80/"),
            ("http://example.com/a#frag", "http://example.com/a"),
            ("http://example.com#frag", "http://example.com"),
            ("http://example.com:/x", "http://example.com/x"),
            ("http://User:Pw@Example.com/", "http://User:Pw@example.com/"),
            ("http://[2001:DB8::1]:8080/", "http://[2001:db8::1]:8080/"),
            ("http://bücher.example/ü?ß", "http://xn--bcher-kva.example/ü?ß"),
            ("http://\uff25\uff38\uff21\uff2d\uff30\uff2c\uff25\uff0ecom/", "http://example.com/"),
            ("http://192.0.2.1/x", "http://192.0.2.1/x"),
        ],
    )
    def test_normalizes(self, raw: str, expected: str) -> None:
        """Scheme/host lowercased, IDNA host, default port and fragment dropped, rest byte-exact."""
        assert normalize_url(raw) == expected

    @pytest.mark.parametrize(
        ("raw", "needle"),
        [
            ("", "empty"),
            ("   ", "empty"),
            ("ftp://example.com/x", "scheme 'ftp'"),
            ("javascript:alert(1)", "scheme 'javascript'"),
            ("example.com/x", "scheme"),
            ("http:example.com", "no host"),
            ("http:///path", "host"),
            ("http://user@/path", "host"),
            ("http://exa mple.com/", "whitespace"),
            ("http://example.com/a b", "whitespace"),
            ("http://example.com/\x00", "control"),
            ("http://example.com/a\u2028b", "whitespace"),
            ("http://example.com:0/", "port '0'"),
            ("http://example.com:65536/", "port '65536'"),
            ("http://example.com:http/", "port"),
            ("http://example.com:1:2/", "port"),
            ("http://[::1/", "IPv6"),
            ("http://[nothex::1]/", "IPv6"),
            ("http://[fe80::1%25eth0]/", "IPv6"),
            ("http://exa_mple%2e.com/", "host"),
            ("http://a..b/", "host"),
            ("http://a\uff0fb.com/", "host"),
            ("http://" + "a" * 64 + ".com/", "host"),
            ("http://example.com/" + "a" * 2048, "2048"),
        ],
    )
    def test_rejects(self, raw: str, needle: str) -> None:
        """Unprobeable URLs raise InvalidURL with a message saying what is wrong."""
        with pytest.raises(InvalidURL, match=needle):
            normalize_url(raw)

    def test_idna_expansion_past_limit_rejected(self) -> None:
        """A URL that grows past 2048 characters through IDNA is rejected, keeping idempotence."""
        host = "ü" * 30 + ".example"
        raw = f"http://{host}/" + "a" * (2048 - len(host) - 8)
        assert len(raw) == 2048
        with pytest.raises(InvalidURL, match="normalized"):
            normalize_url(raw)

    @given(st.text())
    def test_any_text_only_raises_invalid_url(self, raw: str) -> None:
        """Arbitrary text either normalizes or raises InvalidURL, never anything else."""
        with contextlib.suppress(InvalidURL):
            normalize_url(raw)

    @given(
        st.sampled_from(["http", "HTTP", "https", "hTTps", "ftp", "http:", ""]),
        st.sampled_from(["", "user@", "u:p@", "@", "a@b@"]),
        st.text(max_size=20) | st.sampled_from(["example.com", "bücher.de", "[::1]", "xn--a"]),
        st.sampled_from(["", ":", ":80", ":443", ":8080", ":0", ":99999", ":x"]),
        st.text(max_size=30),
    )
    def test_url_like_text_idempotent(
        self, scheme: str, userinfo: str, host: str, port: str, rest: str
    ) -> None:
        """Whatever normalize_url accepts it returns unchanged when given its own output."""
        try:
            once = normalize_url(f"{scheme}://{userinfo}{host}{port}{rest}")
        except InvalidURL:
            return
        assert normalize_url(once) == once
        assert once.startswith(("http://", "https://"))
        assert "#" not in once


class TestParseTime:
    def test_offset(self) -> None:
        """An explicit offset is applied: 10:00+01:00 is 09:00 UTC."""
        assert parse_time(T0, "notified_at") == T0_UNIX

    def test_z_suffix(self) -> None:
        """A trailing Z means UTC."""
        assert parse_time("2026-11-28T09:00:00Z", "notified_at") == T0_UNIX

    def test_fractional_seconds(self) -> None:
        """Sub-second precision is kept."""
        assert parse_time("2026-11-28T09:00:00.25Z", "x") == T0_UNIX + 0.25

    @pytest.mark.parametrize("raw", ["2026-11-28T10:00", "2026-11-28T10:00:00", "2026-11-28"])
    def test_naive_rejected(self, raw: str) -> None:
        """A time without offset is rejected, naming the field and the value."""
        with pytest.raises(InvalidTime, match=f"notified_at '{raw}' has no UTC offset"):
            parse_time(raw, "notified_at")

    @pytest.mark.parametrize("raw", ["", "yesterday", "1764320400", "2026-13-01T00:00Z"])
    def test_garbage_rejected(self, raw: str) -> None:
        """Non-ISO text and impossible dates are rejected, naming the field."""
        with pytest.raises(InvalidTime, match=r"received_at .* not an ISO 8601 time"):
            parse_time(raw, "received_at")


class TestReadReportsCsv:
    def test_good_csv(self, tmp_path: Path) -> None:
        """Valid rows become ReportIn; extra columns are ignored; optional fields may be empty."""
        path = write(
            tmp_path,
            "r.csv",
            "url,notified_at,received_at,reference,extra\n"
            f"HTTP://Example.com/a,{T0},2026-11-28T08:30:00Z,HL-1,whatever\n"
            f"https://example.org/b,{T0},,,\n",
        )
        assert read(path) == [
            ReportIn("http://example.com/a", T0_UNIX, T0_UNIX - 1800, "HL-1"),
            ReportIn("https://example.org/b", T0_UNIX, None, None),
        ]

    def test_header_names_case_and_space_insensitive(self, tmp_path: Path) -> None:
        """Column names are matched after stripping and lowercasing, in any order."""
        path = write(tmp_path, "r.csv", f" Notified_At , URL \n{T0},http://a.example/\n")
        assert read(path) == [ReportIn("http://a.example/", T0_UNIX, None, None)]

    def test_bad_rows_with_line_numbers(self, tmp_path: Path) -> None:
        """Each bad row is a RowError at its starting physical line, after multi-line fields too."""
        future = datetime.fromtimestamp(NOW + 86400 + 60, UTC).isoformat()
        path = write(
            tmp_path,
            "r.csv",
            HEADER
            + f"ftp://example.com/,{T0},,\n"
            + "http://example.com/,2026-11-28T10:00,,\n"
            + f",{T0},,\n"
            + f"http://example.com/,{future},,\n"
            + f"http://example.com/,{T0}\n"
            + f'http://example.com/ok,{T0},,"multi\nline\nreference"\n'
            + "\n"
            + f"http://exa mple.com/,{T0},,\n"
            + f'http://example.com/,{T0},"unclosed,\n',
        )
        rows = read(path)
        assert [type(r).__name__ for r in rows] == ["RowError"] * 8
        errors = {r.line: r.message for r in rows if isinstance(r, RowError)}
        assert list(errors) == [2, 3, 4, 5, 6, 7, 11, 12]
        assert "scheme 'ftp'" in errors[2]
        assert errors[3] == "notified_at '2026-11-28T10:00' has no UTC offset"
        assert errors[4] == "url is missing"
        assert "more than 1 day in the future" in errors[5]
        assert errors[6] == "row has 2 fields but the header has 4"
        assert "whitespace" in errors[11]
        assert "malformed CSV" in errors[12]
        # The intake refuses a reference with line breaks, so the reader does too.
        assert errors[7] == "reference must be at most 200 printable characters"

    def test_future_limit_is_one_day(self, tmp_path: Path) -> None:
        """notified_at exactly one day after now is accepted; a second later is not."""
        edge = datetime.fromtimestamp(NOW + 86400, UTC).isoformat()
        late = datetime.fromtimestamp(NOW + 86401, UTC).isoformat()
        path = write(
            tmp_path,
            "r.csv",
            HEADER + f"http://a.example/,{edge},,\n" + f"http://a.example/,{late},,\n",
        )
        rows = read(path)
        assert isinstance(rows[0], ReportIn)
        assert isinstance(rows[1], RowError)
        assert rows[1].line == 3

    def test_received_after_notified_is_fine(self, tmp_path: Path) -> None:
        """received_at later than notified_at is not an error."""
        path = write(tmp_path, "r.csv", HEADER + f"http://a.example/,{T0},2026-11-29T00:00:00Z,\n")
        (row,) = read(path)
        assert isinstance(row, ReportIn)
        assert row.received_at is not None and row.received_at > row.notified_at

    def test_several_problems_in_one_row(self, tmp_path: Path) -> None:
        """All problems of a row are reported together."""
        path = write(tmp_path, "r.csv", HEADER + "gopher://x,noon,,\n")
        (row,) = read(path)
        assert isinstance(row, RowError)
        assert "scheme 'gopher'" in row.message and "notified_at 'noon'" in row.message

    def test_duplicate_reference(self, tmp_path: Path) -> None:
        """A reference seen before is an error on the later line naming the first."""
        path = write(
            tmp_path,
            "r.csv",
            HEADER
            + f"http://a.example/,{T0},,X\n"
            + f"http://b.example/,{T0},,Y\n"
            + f"http://c.example/,{T0},,X\n",
        )
        rows = read(path)
        assert isinstance(rows[0], ReportIn) and isinstance(rows[1], ReportIn)
        assert rows[2] == RowError(4, "duplicate reference 'X' (first on line 2)")

    @pytest.mark.parametrize("header", ["url,received_at\n", "notified_at,reference\n"])
    def test_missing_column(self, tmp_path: Path, header: str) -> None:
        """A header without a required column is a file error naming it."""
        path = write(tmp_path, "r.csv", header + "x,y\n")
        missing = "notified_at" if header.startswith("url") else "url"
        with pytest.raises(ReportFileError, match=f"missing required column.*{missing}"):
            read(path)

    def test_duplicate_column(self, tmp_path: Path) -> None:
        """A required column given twice is ambiguous and rejected."""
        path = write(tmp_path, "r.csv", "url,notified_at,url\n")
        with pytest.raises(ReportFileError, match="'url' appears more than once"):
            read(path)

    def test_empty_file(self, tmp_path: Path) -> None:
        """A CSV file without a header is a file error."""
        with pytest.raises(ReportFileError, match="no header"):
            read(write(tmp_path, "r.csv", "\n\n"))

    def test_bom_and_crlf(self, tmp_path: Path) -> None:
        """A UTF-8 BOM and CRLF line endings are accepted."""
        path = tmp_path / "r.csv"
        path.write_bytes(
            b"\xef\xbb\xbfurl,notified_at\r\nhttp://a.example/," + T0.encode() + b"\r\n"
        )
        assert read(path) == [ReportIn("http://a.example/", T0_UNIX, None, None)]

    def test_blank_lines_skipped_but_counted(self, tmp_path: Path) -> None:
        """Blank lines produce nothing but still count for later line numbers."""
        path = write(tmp_path, "r.csv", f"\n{HEADER}\n  \n,{T0},,\n")
        assert read(path) == [RowError(5, "url is missing")]

    def test_decode_error_names_line_after_streaming_earlier_rows(self, tmp_path: Path) -> None:
        """Invalid UTF-8 is a file error naming its line, raised only when the reader gets there."""
        path = tmp_path / "r.csv"
        path.write_bytes(
            HEADER.encode() + f"http://a.example/,{T0},,\n".encode() + b"http://\xff/,x,,\n"
        )
        rows = read_reports(path, now=NOW)
        assert isinstance(next(rows), ReportIn)
        with pytest.raises(ReportFileError, match="line 3 is not valid UTF-8"):
            next(rows)

    def test_unreadable_file(self, tmp_path: Path) -> None:
        """A missing file is a ReportFileError, not an OSError."""
        with pytest.raises(ReportFileError, match="cannot open"):
            read(tmp_path / "absent.csv")

    def test_streams_without_holding_rows(self, tmp_path: Path) -> None:
        """Reading 20,000 rows peaks far below the ~4 MB that holding them takes."""
        path = tmp_path / "big.csv"
        with path.open("w", encoding="utf-8") as handle:
            handle.write(HEADER)
            for i in range(20_000):
                handle.write(f"http://h{i}.example/path/{i},{T0},,\n")
        tracemalloc.start()
        try:
            count = sum(1 for row in read_reports(path, now=NOW) if isinstance(row, ReportIn))
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert count == 20_000
        assert peak < 1_000_000


class TestReadReportsJsonl:
    def test_good_jsonl(self, tmp_path: Path) -> None:
        """Objects with extra keys and null optionals become ReportIn."""
        lines = [
            {"url": "http://a.example/", "notified_at": "2026-11-28T09:00:00Z", "v": 2},
            {"url": "http://b.example/", "notified_at": T0, "received_at": None, "reference": "R"},
        ]
        path = write(tmp_path, "r.jsonl", "".join(json.dumps(x) + "\n" for x in lines))
        assert read(path) == [
            ReportIn("http://a.example/", T0_UNIX, None, None),
            ReportIn("http://b.example/", T0_UNIX, None, "R"),
        ]

    def test_bad_lines(self, tmp_path: Path) -> None:
        """Invalid JSON, non-objects and wrongly typed fields are RowErrors at their lines."""
        path = write(
            tmp_path,
            "r.ndjson",
            "{not json\n"
            "\n"
            '["http://a.example/"]\n'
            '"just a string"\n'
            f'{{"url": 5, "notified_at": "{T0}"}}\n'
            '{"url": "http://a.example/"}\n' + "[" * 100_000 + "\n",
        )
        rows = read(path)
        assert all(isinstance(r, RowError) for r in rows)
        messages = {r.line: r.message for r in rows if isinstance(r, RowError)}
        assert list(messages) == [1, 3, 4, 5, 6, 7]
        assert messages[1].startswith("invalid JSON")
        assert messages[3] == "JSON line is a list, not an object"
        assert messages[4] == "JSON line is a str, not an object"
        assert messages[5] == "url must be a string, not int"
        assert messages[6] == "notified_at is missing"
        assert messages[7].startswith("invalid JSON")

    def test_bom(self, tmp_path: Path) -> None:
        """A BOM before the first JSON object is ignored."""
        path = tmp_path / "r.jsonl"
        path.write_bytes(
            b"\xef\xbb\xbf" + json.dumps({"url": "http://a.example", "notified_at": T0}).encode()
        )
        assert read(path) == [ReportIn("http://a.example", T0_UNIX, None, None)]


class TestFormatDetection:
    def test_txt_not_guessed(self, tmp_path: Path) -> None:
        """A .txt file needs an explicit format, and the error says so at call time."""
        with pytest.raises(ReportFileError, match="fmt="):
            read_reports(write(tmp_path, "r.txt", HEADER))

    def test_explicit_format(self, tmp_path: Path) -> None:
        """fmt overrides the extension."""
        path = write(tmp_path, "r.txt", f"url,notified_at\nhttp://a.example/,{T0}\n")
        assert read(path, "CSV") == [ReportIn("http://a.example/", T0_UNIX, None, None)]

    def test_unknown_format(self, tmp_path: Path) -> None:
        """An unknown fmt is a file error."""
        with pytest.raises(ReportFileError, match="unknown format 'xml'"):
            read_reports(write(tmp_path, "r.csv", HEADER), "xml")


class TestValidateFile:
    def test_counts_and_caps_errors(self, tmp_path: Path) -> None:
        """All rows are counted, but only the first MAX_KEPT_ERRORS errors are kept."""
        bad = MAX_KEPT_ERRORS + 500
        body = f"http://ok.example/,{T0},,\n" * 3 + f"ftp://x/,{T0},,\n" * bad
        check = validate_file(write(tmp_path, "r.csv", HEADER + body), now=NOW)
        assert (check.rows, check.valid, check.error_count) == (bad + 3, 3, bad)
        assert len(check.errors) == MAX_KEPT_ERRORS
        assert check.errors[0].line == 5
        assert not check.ok

    def test_clean_file_ok(self, tmp_path: Path) -> None:
        """A file with only valid rows is ok."""
        check = validate_file(
            write(tmp_path, "r.csv", HEADER + f"http://a.example/,{T0},,\n"), now=NOW
        )
        assert check.ok and check.valid == 1 and check.errors == ()


hosts = st.text(alphabet=string.ascii_lowercase + string.digits + "-", min_size=1, max_size=12)
paths = st.text(alphabet=string.ascii_letters + string.digits + "/?=&%,;\"'~ü", max_size=30)
references = st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=15).filter(
    lambda r: r == r.strip() and r.isprintable()  # what the intake accepts
)
row_st = st.tuples(
    hosts,
    paths,
    st.integers(min_value=946_684_800 + 90, max_value=int(NOW)),  # received = ts - 90 >= 2000
    st.integers(min_value=-14 * 60, max_value=14 * 60),
    st.booleans(),
    st.booleans(),
)


def iso(ts: int, offset_minutes: int) -> str:
    return datetime.fromtimestamp(ts, timezone(timedelta(minutes=offset_minutes))).isoformat()


class TestReadReportsProperties:
    @settings(max_examples=150, deadline=None)
    @given(st.lists(st.tuples(row_st, references), max_size=15, unique_by=lambda x: x[1]))
    def test_csv_round_trip(
        self, rows: list[tuple[tuple[str, str, int, int, bool, bool], str]]
    ) -> None:
        """Rows written by csv.writer come back equal, and bad rows at their starting lines."""
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(["reference", "url", "extra", "notified_at", "received_at"])
        expected: list[tuple[int, ReportIn | None]] = []
        for (host, path, ts, offset, valid, received), ref in rows:
            line = out.getvalue().count("\n") + 1
            url = f"https://{host}.example/{path}"
            scheme_url = url if valid else "ftp" + url[5:]
            got_at = iso(ts - 90, -offset) if received else ""
            writer.writerow([ref, scheme_url, 'x,\n"y"', iso(ts, offset), got_at])
            report = ReportIn(url, float(ts), float(ts - 90) if received else None, ref)
            expected.append((line, report if valid else None))
        with tempfile.TemporaryDirectory() as tmp:
            got = read(write(Path(tmp), "r.csv", out.getvalue()))
        assert len(got) == len(expected)
        for item, (line, report) in zip(got, expected, strict=True):
            if report is None:
                assert isinstance(item, RowError) and item.line == line
            else:
                assert item == report

    @settings(max_examples=200, deadline=None)
    @given(
        st.lists(
            st.text(alphabet=st.sampled_from('",\n\r\x00 ab:/Zé\ufeff\\{}[]'), max_size=40)
            | st.sampled_from(
                [f"http://a.example/,{T0},,", f'"http://a.example/",{T0},"', "ftp://,,"]
            ),
            min_size=10,
            max_size=40,
        )
    )
    def test_malformed_csv_never_crashes(self, lines: list[str]) -> None:
        """Thousands of malformed rows give rows or RowErrors at increasing in-file line numbers."""
        text = HEADER + "\n".join(lines) + "\n"
        physical = text.count("\n")
        with tempfile.TemporaryDirectory() as tmp:
            got = read(write(Path(tmp), "r.csv", text))
            check = validate_file(Path(tmp) / "r.csv", now=NOW)
        numbers = [r.line for r in got if isinstance(r, RowError)]
        assert numbers == sorted(set(numbers))
        assert all(2 <= n <= physical for n in numbers)
        assert check.rows == len(got)

    @settings(max_examples=100, deadline=None)
    @given(
        st.lists(
            st.recursive(
                st.none() | st.booleans() | st.integers() | st.text(max_size=10),
                lambda inner: (
                    st.lists(inner, max_size=3)
                    | st.dictionaries(
                        st.sampled_from(["url", "notified_at", "reference", "z"]), inner
                    )
                ),
                max_leaves=8,
            ).map(json.dumps)
            | st.text(max_size=30).filter(lambda s: "\n" not in s),
            min_size=10,
            max_size=40,
        )
    )
    def test_malformed_jsonl_never_crashes(self, lines: list[str]) -> None:
        """Arbitrary JSON values and non-JSON lines give one item per non-blank line."""
        with tempfile.TemporaryDirectory() as tmp:
            got = read(write(Path(tmp), "r.jsonl", "\n".join(lines) + "\n"))
        assert [r.line for r in got if isinstance(r, RowError)] == sorted(
            {r.line for r in got if isinstance(r, RowError)}
        )
        assert len(got) == sum(1 for line in lines if line.strip())

    @settings(max_examples=100, deadline=None)
    @given(st.binary(max_size=300), st.sampled_from(["csv", "jsonl"]))
    def test_random_bytes_only_raise_report_file_error(self, data: bytes, fmt: str) -> None:
        """Arbitrary bytes give rows, RowErrors or a ReportFileError, nothing else."""
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "r.bin"
            path.write_bytes(data)
            try:
                got = list(read_reports(path, fmt, now=NOW))
            except ReportFileError:
                return
        assert all(isinstance(r, ReportIn | RowError) for r in got)
