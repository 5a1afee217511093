"""`report --format html`: a self-contained page whose figures are the JSON report's figures."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from collector.method import METHOD_VERSION
from collector.report_html import COLUMNS, cell_text, nice_ticks, time_unit
from collector.store.schema import migrations
from collector.store.sql import Database

BIN = Path(sys.executable).parent
COLLECTOR = str(BIN / "takedown-collector")
NOW = time.time()
DAY = 86400.0
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
KINDS = {key: kind for key, _, kind in COLUMNS}

# provider, asn, countries served from (alternating by URL), [hours to removal or None, ...]
PROVIDERS: list[tuple[str, int, tuple[str, ...], list[float | None]]] = [
    ("Fast Hosting B.V.", 64500, ("NL",), [0.5, 2, 3, 5, 8, 10, 20, 30, 0.2, 1.5, None]),
    ("Slow Servers Ltd", 64501, ("DE", "US", "DE"), [30, 50, 70, 100, 200, None, None, None,
                                                      None, 26, 40, None]),
    ("Tiny Host", 64502, (), [4, None]),
]  # fmt: skip


def make_db(path: Path) -> Path:
    """A collector database with verdicts of three providers, written through the schema."""
    conn = sqlite3.connect(path)
    migrations.apply(Database(conn, "sqlite", str(path)))
    conn.execute(
        "INSERT INTO agents (id, name, network, version, first_seen, last_seen)"
        " VALUES (1, 'a1', 'n1', 'x', ?, ?)",
        (NOW, NOW),
    )
    url_id = 0
    for provider, asn, countries, fates in PROVIDERS:
        for i, hours in enumerate(fates):
            url_id += 1
            country = countries[i % len(countries)] if countries else None
            conn.execute(
                "INSERT INTO results (agent_id, seq, url_id, started_at, elapsed, status,"
                " final_url, body_bytes, truncated, peer_ip, error, redirects, class, provider,"
                " asn, stored_at, country) VALUES (1, ?, ?, ?, 0.1, 200, '', 10, 0, '192.0.2.1',"
                " 'none', 0, 'present', ?, ?, ?, ?)",
                (url_id, url_id, NOW - DAY, provider, asn, NOW, country),
            )
            notified = NOW - 10 * DAY - url_id * 60
            conn.execute(
                "INSERT INTO urls (id, url, created_at) VALUES (?, ?, ?)",
                (url_id, f"http://u{url_id}.example/", notified),
            )
            conn.execute(
                "INSERT INTO reports (url_id, notified_at, submitted_at) VALUES (?, ?, ?)",
                (url_id, notified, notified),
            )
            removed = hours is not None
            latency = hours * 3600 if hours is not None else None
            conn.execute(
                "INSERT INTO url_state (url_id, state, notified_at, provider, asn,"
                " removal_latency, removal_first_removed_at, removal_last_present_at,"
                " updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    url_id, "removed" if removed else "available", notified, provider, asn,
                    latency, notified + latency if latency is not None else None,
                    notified + latency - 300 if latency is not None else None, NOW,
                ),
            )  # fmt: skip
    conn.commit()
    conn.close()
    return path


def collector(*args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TAKEDOWN_")}
    done = subprocess.run(
        [COLLECTOR, *args], capture_output=True, text=True, env=env, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def side_by_side(*commands: tuple[str, ...]) -> list[str]:
    """`collector(*command)` for each command, the processes running at the same time."""
    with ThreadPoolExecutor(len(commands)) as pool:
        return list(pool.map(lambda args: collector(*args), commands))


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict[str, Any]], Path]:
    """The JSON report and the html page, both from one database."""
    tmp = tmp_path_factory.mktemp("html")
    db = make_db(tmp / "c.db")
    page = tmp / "report.html"
    json_text, _ = side_by_side(
        ("report", "--db", str(db), "--format", "json"),
        ("report", "--db", str(db), "--format", "html", "-o", str(page)),
    )
    return json.loads(json_text), page


class Cells(HTMLParser):
    """The provider table's cells: {provider: {field: (data-value, text)}}."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[str, dict[str, tuple[str, str]]] = {}
        self._row: str | None = None
        self._cell: tuple[str, str] | None = None
        self._text = ""
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag == "tr" and a.get("data-provider") is not None:
            self._row = a["data-provider"]
            self.rows[self._row or ""] = {}
        elif tag in ("td", "th") and self._row is not None and a.get("data-field"):
            self._cell = (a["data-field"] or "", a.get("data-value") or "")
            self._text = ""

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._text += data

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self._row is not None:
            field, value = self._cell
            self.rows[self._row][field] = (value, self._text.strip())
            self._cell = None
        elif tag == "tr":
            self._row = None


def json_value_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return " ".join(str(v) for v in value)
    return str(value)


def check_figures(dom: str, records: list[dict[str, Any]]) -> int:
    """Every figure in the page's table is the JSON report's, as a value and as text."""
    cells = Cells()
    cells.feed(dom)
    assert set(cells.rows) == {r["provider"] for r in records}
    checked = 0
    for r in records:
        row = cells.rows[r["provider"]]
        assert {"provider", "reports", "removed", "median_latency_seconds"} <= set(row)
        for field, (value, text) in row.items():
            assert value == json_value_text(r[field]), (r["provider"], field, value, r[field])
            assert text == cell_text(KINDS[field], r[field]), (field, text)
            checked += 1
    return checked


class TestCountries:
    def test_every_format_says_where_the_content_was_served_from(
        self, reports: tuple[list[dict[str, Any]], Path], tmp_path: Path
    ) -> None:
        """JSON, CSV, text and the page give each provider's countries, most URLs first."""
        records, page = reports
        by_provider = {r["provider"]: r["countries"] for r in records}
        assert by_provider == {
            "Fast Hosting B.V.": ["NL"],
            "Slow Servers Ltd": ["DE", "US"],
            "Tiny Host": [],
        }
        db = make_db(tmp_path / "c.db")
        csv_text, table = side_by_side(
            ("report", "--db", str(db), "--format", "csv"), ("report", "--db", str(db))
        )
        assert csv_text.splitlines()[0].endswith(",countries") and ",DE US\n" in csv_text
        assert "from" in table.splitlines()[0] and " DE,US " in table
        assert ">DE, US<" in page.read_text()


class TestPage:
    def test_figures_are_the_json_figures(self, reports: tuple[list[dict[str, Any]], Path]) -> None:
        """The page's table cells carry and show exactly the JSON report's values."""
        records, page = reports
        assert check_figures(page.read_text(), records) >= 3 * 15

    def test_self_contained(self, reports: tuple[list[dict[str, Any]], Path]) -> None:
        """No script, no external file or address: nothing to fetch."""
        _, page = reports
        text = page.read_text()
        cells = Cells()
        cells.feed(text)
        for tag, attrs in cells.tags:
            assert tag not in ("script", "link", "img", "iframe", "object"), tag
            assert not {"src", "href"} & set(attrs), (tag, attrs)
        assert "http://" not in text.replace("http://u", "") and "https://" not in text
        assert "url(" not in text and "@import" not in text

    def test_window_method_curves_and_how_to_read(
        self, reports: tuple[list[dict[str, Any]], Path]
    ) -> None:
        """The page states its window and method, draws a curve per provider and explains."""
        records, page = reports
        text = page.read_text()
        assert 'id="window"' in text and "the first report" in text
        assert 'id="method"' in text and METHOD_VERSION in text
        assert "How to read this" in text and "Kaplan–Meier" in text
        assert text.count('<polyline class="curve"') == len(records) == 3


class TestAxis:
    @pytest.mark.parametrize("longest", [90.0, 3600.0, 2 * DAY, 9 * DAY, 42 * DAY])
    def test_axis_fits_the_data(self, longest: float) -> None:
        """The axis ends at the first round tick at or past the data, under twice its span."""
        unit, _ = time_unit(longest)
        ticks = nice_ticks(longest / unit)
        assert ticks[0] == 0 and ticks[-1] * unit >= longest
        assert ticks[-1] * unit < 2 * longest + unit
        assert 3 <= len(ticks) <= 12


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="needs chromium (scripts/ci-system-deps.sh)")
class TestInChromium:
    @staticmethod
    def chromium(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
        assert CHROMIUM is not None
        profile = tmp / f"profile-{len(list(tmp.iterdir()))}"
        return subprocess.run(
            [
                CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run", f"--user-data-dir={profile}", *args,
            ],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip

    def test_rendered_page_shows_the_json_figures(
        self, reports: tuple[list[dict[str, Any]], Path], tmp_path: Path
    ) -> None:
        """Headless Chromium renders the page (screenshot), and the DOM it built holds the
        JSON report's figures."""
        records, page = reports
        shot = tmp_path / "report.png"
        done = self.chromium(
            tmp_path, f"--screenshot={shot}", "--window-size=1400,1700", page.as_uri()
        )
        assert shot.exists() and shot.stat().st_size > 20_000, done.stderr[-2000:]
        keep = os.environ.get("TAKEDOWN_SCREENSHOT_DIR")
        if keep:
            shutil.copy(shot, Path(keep) / "report.png")
        dumped = self.chromium(tmp_path, "--dump-dom", page.as_uri())
        assert dumped.returncode == 0, dumped.stderr[-2000:]
        assert check_figures(dumped.stdout, records) >= 3 * 15
