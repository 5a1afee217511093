"""The command-line entry points: help, flags/env/TOML options, import, report, agent refusal."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import configargparse
import pytest

from agent import cli as agent_cli
from agent.cli import build_parser
from collector.cli import (
    COMMANDS,
    DEFAULT_SCHEDULE,
    duration,
    import_parser,
    report_parser,
    serve_parser,
    url_parser,
)
from collector.importer import import_file
from collector.schedule import DEFAULT_PHASES, parse_phases
from collector.server import Collector
from collector.store.reads import connect_readonly, url_statuses

BIN = Path(sys.executable).parent
AGENT = str(BIN / "takedown-agent")
COLLECTOR = str(BIN / "takedown-collector")

REPORT_KEYS = {
    "provider",
    "asn",
    "reports",
    "urls",
    "removed",
    "online",
    "median_latency_seconds",
    "removed_within_24h",
}
T0 = "2026-01-05T10:00:00+00:00"
GOOD_URLS = ("http://a.example/1", "http://b.example/2", "http://c.example/3")


def clean_env() -> dict[str, str]:
    """The test's environment without TAKEDOWN_* variables, so a child sees only its arguments."""
    return {k: v for k, v in os.environ.items() if not k.startswith("TAKEDOWN_")}


def run(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run a console script to completion (for tests with no server in this process)."""
    return subprocess.run(
        args, capture_output=True, text=True, timeout=timeout, env=clean_env(), check=False
    )


async def run_async(*args: str, within: float = 30) -> tuple[int, str, str, float]:
    """Run a console script without blocking the event loop the collector fixture serves on."""
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=clean_env(),
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), within)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        pytest.fail(f"{args[0]} did not finish within {within}s")
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode(), time.monotonic() - started


def option_strings(parser: configargparse.ArgParser) -> Iterator[str]:
    """Every option string (or positional name) the parser defines."""
    for action in parser._actions:
        yield from action.option_strings or [action.dest]


def write_csv(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    path.write_text("url,notified_at,reference\n" + "".join(f"{u},{t},{r}\n" for u, t, r in rows))
    return path


def good_csv(tmp_path: Path) -> Path:
    return write_csv(tmp_path / "good.csv", [(u, T0, f"R{i}") for i, u in enumerate(GOOD_URLS, 1)])


def bad_csv(tmp_path: Path) -> Path:
    """Three rows; the one on physical line 3 has a timestamp without a UTC offset."""
    return write_csv(
        tmp_path / "bad.csv",
        [
            ("http://x.example/1", T0, "X1"),
            ("http://x.example/2", "2026-01-05T10:00:00", "X2"),
            ("http://x.example/3", T0, "X3"),
        ],
    )


def stored_urls(collector: Collector) -> set[str]:
    conn = connect_readonly(collector.config.db)
    try:
        return {s.url for s in url_statuses(conn)}
    finally:
        conn.close()


@contextlib.contextmanager
def closed_port() -> Iterator[int]:
    """A loopback port that is bound (so nobody else takes it) but refuses connections."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


class TestHelp:
    def test_agent_help_lists_every_option(self) -> None:
        """`takedown-agent --help` exits 0 and mentions every option of its parser."""
        done = run(AGENT, "--help")
        assert done.returncode == 0, done.stderr
        missing = [o for o in option_strings(build_parser()) if o not in done.stdout]
        assert missing == []

    @pytest.mark.parametrize(
        ("command", "build"),
        [
            ("serve", serve_parser),
            ("import", import_parser),
            ("report", report_parser),
            ("url", url_parser),
        ],
    )
    def test_collector_command_help_lists_every_option(
        self, command: str, build: Callable[[], configargparse.ArgParser]
    ) -> None:
        """`takedown-collector COMMAND --help` exits 0 and mentions every option of its parser."""
        done = run(COLLECTOR, command, "--help")
        assert done.returncode == 0, done.stderr
        assert f"takedown-collector {command}" in done.stdout
        missing = [o for o in option_strings(build()) if o not in done.stdout]
        assert missing == []

    def test_no_command_prints_usage_and_exits_2(self) -> None:
        """`takedown-collector` alone prints the usage listing the commands and exits 2."""
        done = run(COLLECTOR)
        assert done.returncode == 2
        output = done.stdout + done.stderr
        assert "usage: takedown-collector" in output
        assert all(c in output for c in ("serve", "import", "report"))

    def test_unknown_command_exits_2_naming_it(self) -> None:
        """An unknown command exits 2 with an error that names it."""
        done = run(COLLECTOR, "frobnicate")
        assert done.returncode == 2
        assert "unknown command 'frobnicate'" in done.stderr


def help_entries(parser: configargparse.ArgParser) -> dict[str, str]:
    """Each option's help entry (its lines joined), by its first option string."""
    entries: dict[str, str] = {}
    current = ""
    for line in parser.format_help().splitlines():
        if line.startswith("  -"):
            current = line.split()[0].rstrip(",")
            entries[current] = line
        elif current and line.startswith("      "):
            entries[current] += " " + line.strip()
        else:
            current = ""
    return entries


ALL_PARSERS = [("takedown-agent", build_parser)] + [
    (f"takedown-collector {name}", build) for name, build in COMMANDS.items()
]


class TestHelpDefaults:
    @pytest.mark.parametrize(("program", "build"), ALL_PARSERS)
    def test_each_option_shows_at_most_one_default_and_no_python_objects(
        self, program: str, build: Callable[[], configargparse.ArgParser]
    ) -> None:
        """No help entry says None, False, frozenset() or a float of seconds, or two defaults."""
        entries = help_entries(build())
        assert entries, program
        for option, text in entries.items():
            assert text.count("(default") <= 1, (option, text)
            for junk in ("None", "frozenset", "False)", "True)", "Phase(", "21600.0", "43200"):
                assert junk not in text, (option, text)

    def test_serve_defaults_read_as_written(self) -> None:
        """serve --help shows the schedule, durations and rates the way a user types them."""
        entries = help_entries(serve_parser())
        expected = {
            "--schedule": "(default: 5m<2h,15m<48h,1h)",
            "--watch-interval": "(default: 6h)",
            "--watch-period": "(default: 30d)",
            "--liveness-intervals": "(default: 3)",
            "--min-vantage-points": "(default: 2)",
            "--order-deadline": "(default: 12h)",
            "--deadline": "(default: 1h, 12h, 24h)",
            "--deadline-window": "(default: 30m)",
            "--nxdomain-is-removal": "(default: --nxdomain-is-removal)",
            "--max-results-per-second": "(default: 20000)",
        }
        for option, shown in expected.items():
            assert shown in entries[option], entries[option]

    def test_written_schedule_default_is_the_planner_default(self) -> None:
        """The schedule help shows is the one the planner uses when none is given."""
        assert parse_phases(DEFAULT_SCHEDULE) == DEFAULT_PHASES
        assert serve_parser().parse_args([]).schedule == DEFAULT_PHASES

    def test_string_defaults_are_converted(self) -> None:
        """Defaults given as text reach the program as the option's type."""
        args = serve_parser().parse_args([])
        assert (args.watch_period, args.watch_interval, args.order_deadline) == (
            30 * 86400.0,
            6 * 3600.0,
            12 * 3600.0,
        )
        assert args.max_results_per_second == 20_000.0
        agent = build_parser().parse_args(["--collector", "127.0.0.1:1", "--network", "n"])
        assert (agent.timeout, agent.first_spread) == (30.0, 60.0)


BAD_VALUES = [
    ("serve", "--max-probe-rate", "0", "probes per second, above 0"),
    ("serve", "--max-probe-rate", "-1", "probes per second, above 0"),
    ("serve", "--max-probe-rate", "lots", "probes per second, above 0"),
    ("serve", "--watch-period", "-3d", "is not a duration"),
    ("serve", "--listen", "nowhere", "HOST:PORT"),
    ("serve", "--max-results-per-second", "-5", "0 or more (0: no limit)"),
    ("serve", "--buckets", "soon", "is not a duration"),
    ("report", "--min-reports", "0", "whole number, above 0"),
    ("import", "--collector", "::1:7443", "IPv6 address in brackets"),
    ("agent", "--concurrency", "-4", "whole number, above 0"),
    ("agent", "--timeout", "0", "seconds, above 0"),
    ("agent", "--source-address", "eth0", "IP address"),
    ("agent", "--max-redirects", "100", "up to (not including) 100"),
]


class TestBadValues:
    @pytest.mark.parametrize(("command", "option", "value", "allowed"), BAD_VALUES)
    def test_bad_value_is_one_line_naming_option_and_what_is_allowed(
        self,
        command: str,
        option: str,
        value: str,
        allowed: str,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """A bad value exits 2 with one line: the program, the option, the value, what fits."""
        if command == "agent":
            parser = build_parser()
            argv = ["--collector", "127.0.0.1:1", "--network", "n", option, value]
        else:
            parser = COMMANDS[command]()
            argv = (["FILE"] if command == "import" else []) + [option, value]
        with pytest.raises(SystemExit) as exc:
            parser.parse_args(argv)
        assert exc.value.code == 2
        lines = capsys.readouterr().err.splitlines()
        assert len(lines) == 1, lines
        assert lines[0].startswith(parser.prog + ": argument " + option), lines
        assert repr(value) in lines[0] and allowed in lines[0], lines

    def test_zero_probe_rate_exits_2_without_traceback(self, tmp_path: Path) -> None:
        """takedown-collector serve --max-probe-rate 0 is a one-line usage error, not a crash."""
        done = run(COLLECTOR, "serve", "--max-probe-rate", "0", "--db", str(tmp_path / "c.db"))
        assert done.returncode == 2
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
        assert "--max-probe-rate" in done.stderr and "above 0" in done.stderr

    def test_bad_value_from_the_environment_names_the_option(self) -> None:
        """A bad value in TAKEDOWN_AGENT_CONCURRENCY is refused like the flag."""
        env = {**clean_env(), "TAKEDOWN_AGENT_CONCURRENCY": "0"}
        done = subprocess.run(
            [AGENT, "--collector", "127.0.0.1:1", "--network", "n"],
            capture_output=True,
            text=True,
            env=env,
            timeout=30,
            check=False,
        )
        assert done.returncode == 2
        assert "--concurrency" in done.stderr and "Traceback" not in done.stderr


class TestAgentOptions:
    @pytest.fixture
    def toml(self, tmp_path: Path) -> Path:
        path = tmp_path / "agent.toml"
        path.write_text(
            "[agent]\n"
            'collector = "127.0.0.1:7000"\n'
            'network = "toml-net"\n'
            "concurrency = 12\n"
            'allow-private = ["127.0.0.0/8", "10.0.0.0/8"]\n'
        )
        return path

    @pytest.fixture(autouse=True)
    def no_takedown_env(self, monkeypatch: pytest.MonkeyPatch) -> None:
        for name in list(os.environ):
            if name.startswith("TAKEDOWN_"):
                monkeypatch.delenv(name)

    def test_toml_agent_table_sets_values(self, toml: Path) -> None:
        """Values in the [agent] table of --config are used, including lists and typed values."""
        args = build_parser().parse_args(["--config", str(toml)])
        assert args.collector == "127.0.0.1:7000"
        assert args.network == "toml-net"
        assert args.concurrency == 12
        assert [str(n) for n in args.allow_private] == ["127.0.0.0/8", "10.0.0.0/8"]

    def test_environment_overrides_toml(self, toml: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """TAKEDOWN_AGENT_NETWORK sets network, over the TOML file's value."""
        monkeypatch.setenv("TAKEDOWN_AGENT_NETWORK", "env-net")
        args = build_parser().parse_args(["--config", str(toml)])
        assert args.network == "env-net"
        assert args.collector == "127.0.0.1:7000"

    def test_environment_alone_satisfies_required_option(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A required option given only through the environment is accepted."""
        monkeypatch.setenv("TAKEDOWN_AGENT_NETWORK", "env-net")
        args = build_parser().parse_args(["--collector", "127.0.0.1:1"])
        assert args.network == "env-net"

    def test_flag_overrides_environment_and_toml(
        self, toml: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A command-line flag wins over both the environment and the TOML file."""
        monkeypatch.setenv("TAKEDOWN_AGENT_NETWORK", "env-net")
        monkeypatch.setenv("TAKEDOWN_AGENT_CONCURRENCY", "7")
        args = build_parser().parse_args(
            ["--config", str(toml), "--network", "cli-net", "--concurrency", "3"]
        )
        assert args.network == "cli-net"
        assert args.concurrency == 3

    def test_tls_and_host_queue_options_reach_the_config(self) -> None:
        """Probes go unverified by default; --verify-tls and --host-backlog reach the config."""
        base = ["--collector", "127.0.0.1:1", "--network", "n", "--insecure"]
        default = agent_cli.config_from(build_parser().parse_args(base))
        assert (default.probe.verify_tls, default.host_backlog) == (False, 256)
        args = build_parser().parse_args([*base, "--verify-tls", "--host-backlog", "9"])
        config = agent_cli.config_from(args)
        assert (config.probe.verify_tls, config.host_backlog) == (True, 9)

    def test_agent_key_file_reaches_the_config_apart_from_the_tls_key(self) -> None:
        """--agent-key-file is the signing key (AgentConfig.key_file); --key-file stays TLS's."""
        base = ["--collector", "127.0.0.1:1", "--network", "n"]
        insecure = [*base, "--insecure"]
        assert agent_cli.config_from(build_parser().parse_args(insecure)).key_file is None
        signing = [*insecure, "--agent-key-file", "sign.key"]
        assert agent_cli.config_from(build_parser().parse_args(signing)).key_file == Path(
            "sign.key"
        )
        args = build_parser().parse_args(
            [*base, "--agent-key-file", "sign.key", "--cert-file", "c.pem", "--key-file", "t.key"]
        )
        assert (args.agent_key_file, args.key_file) == (Path("sign.key"), Path("t.key"))

    def test_bad_allow_private_exits_naming_value(self, capsys: pytest.CaptureFixture[str]) -> None:
        """--allow-private with a non-CIDR value is a usage error that names the value."""
        with pytest.raises(SystemExit) as exc:
            build_parser().parse_args(
                ["--collector", "127.0.0.1:1", "--network", "n", "--allow-private", "not-a-net"]
            )
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert "--allow-private" in err
        assert "'not-a-net'" in err

    def test_jitter_out_of_range_is_usage_error(self, capsys: pytest.CaptureFixture[str]) -> None:
        """--jitter outside [0, 1) is refused by the parser, naming the option."""
        with pytest.raises(SystemExit) as exc:
            build_parser().parse_args(
                ["--collector", "127.0.0.1:1", "--network", "n", "--jitter", "1.5"]
            )
        assert exc.value.code == 2
        assert "--jitter" in capsys.readouterr().err

    def test_jitter_out_of_range_exits_without_traceback(self) -> None:
        """takedown-agent --jitter 1.5 exits 2 with a one-line error, not a traceback."""
        with closed_port() as port:
            done = run(
                AGENT, "--collector", f"127.0.0.1:{port}", "--network", "n", "--jitter", "1.5"
            )
        assert done.returncode == 2
        assert "Traceback" not in done.stderr
        assert "--jitter" in done.stderr


class TestServeOptions:
    @pytest.fixture
    def toml(self, tmp_path: Path) -> Path:
        path = tmp_path / "collector.toml"
        path.write_text(
            "[collector]\n"
            'probe-interval = "2h"\n'
            "confirmations = 3\n"
            "nxdomain-is-removal = false\n"
            'deadline = ["1h", "24h"]\n'
        )
        return path

    @pytest.fixture(autouse=True)
    def no_takedown_env(self, monkeypatch: pytest.MonkeyPatch) -> None:
        for name in list(os.environ):
            if name.startswith("TAKEDOWN_"):
                monkeypatch.delenv(name)

    def test_toml_collector_table_sets_values(self, toml: Path) -> None:
        """Values in the [collector] table are parsed with each option's type."""
        args = serve_parser().parse_args(["--config", str(toml)])
        assert args.probe_interval == 7200.0
        assert args.confirmations == 3
        assert args.nxdomain_is_removal is False
        assert args.deadline == [3600.0, 86400.0]

    def test_environment_duration(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """TAKEDOWN_COLLECTOR_PROBE_INTERVAL=15m gives a probe interval of 900 seconds."""
        monkeypatch.setenv("TAKEDOWN_COLLECTOR_PROBE_INTERVAL", "15m")
        assert serve_parser().parse_args([]).probe_interval == 900.0

    def test_environment_overrides_toml(self, toml: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """The environment wins over the TOML file; other TOML values still apply."""
        monkeypatch.setenv("TAKEDOWN_COLLECTOR_PROBE_INTERVAL", "15m")
        args = serve_parser().parse_args(["--config", str(toml)])
        assert args.probe_interval == 900.0
        assert args.confirmations == 3

    def test_flag_overrides_environment_and_toml(
        self, toml: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A command-line flag wins over both the environment and the TOML file."""
        monkeypatch.setenv("TAKEDOWN_COLLECTOR_PROBE_INTERVAL", "15m")
        args = serve_parser().parse_args(
            ["--config", str(toml), "--probe-interval", "30s", "--confirmations", "5"]
        )
        assert args.probe_interval == 30.0
        assert args.confirmations == 5

    def test_defaults_without_env_or_toml(self) -> None:
        """With nothing given, the documented defaults apply."""
        args = serve_parser().parse_args([])
        assert args.probe_interval is None
        assert [str(p) for p in args.schedule] == ["5m<2h", "15m<48h", "1h"]
        assert args.watch_period == 30 * 86400
        assert args.listen == "127.0.0.1:7443"
        assert args.nxdomain_is_removal is True

    def test_confirmations_below_one_is_usage_error(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """--confirmations 0 is refused by the parser, naming the option."""
        with pytest.raises(SystemExit) as exc:
            serve_parser().parse_args(["--confirmations", "0"])
        assert exc.value.code == 2
        assert "--confirmations" in capsys.readouterr().err

    def test_confirmations_below_one_exits_without_traceback(self, tmp_path: Path) -> None:
        """takedown-collector serve --confirmations 0 exits 2 with a one-line error."""
        done = run(
            COLLECTOR,
            "serve",
            "--confirmations",
            "0",
            "--db",
            str(tmp_path / "c.db"),
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            timeout=20,
        )
        assert done.returncode == 2
        assert "Traceback" not in done.stderr
        assert "--confirmations" in done.stderr


class TestDuration:
    @pytest.mark.parametrize(
        ("text", "seconds"),
        [
            ("90", 90.0),
            ("90s", 90.0),
            ("15m", 900.0),
            ("24h", 86400.0),
            ("30d", 30 * 86400.0),
            ("2w", 14 * 86400.0),
            ("1.5h", 5400.0),
        ],
    )
    def test_accepts(self, text: str, seconds: float) -> None:
        """Plain seconds and s/m/h/d/w suffixes convert to seconds."""
        assert duration(text) == seconds

    @pytest.mark.parametrize(
        ("text", "message"),
        [
            ("abc", "'abc' is not a duration like 90s, 15m, 24h, 30d"),
            ("0", "'0' must be positive"),
            ("-5m", "'-5m' is not a duration"),
            ("5x", "'5x' is not a duration"),
            ("", "'' is not a duration"),
        ],
    )
    def test_refuses(self, text: str, message: str) -> None:
        """Text that is not a positive duration is refused with a message quoting it."""
        with pytest.raises(configargparse.ArgumentTypeError, match=message):
            duration(text)

    def test_bad_duration_on_command_line_is_usage_error(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A bad --probe-interval exits 2 naming the option and the value."""
        with pytest.raises(SystemExit) as exc:
            serve_parser().parse_args(["--probe-interval=-5m"])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert "--probe-interval" in err
        assert "'-5m'" in err


@pytest.mark.integration
class TestImport:
    async def test_valid_csv_then_again(self, collector: Collector, tmp_path: Path) -> None:
        """A valid CSV is accepted; importing it again reports every row as already known."""
        path = good_csv(tmp_path)
        target = f"127.0.0.1:{collector.grpc_port}"
        plain = ("--collector", target, "--insecure")
        rc, _, err, _ = await run_async(COLLECTOR, "import", str(path), *plain)
        assert rc == 0, err
        assert "accepted 3, already known 0, rejected 0" in err
        assert stored_urls(collector) == set(GOOD_URLS)
        rc, _, err, _ = await run_async(COLLECTOR, "import", str(path), *plain)
        assert rc == 0, err
        assert "accepted 0, already known 3, rejected 0" in err

    async def test_bad_row_imports_nothing(self, collector: Collector, tmp_path: Path) -> None:
        """A file with a naive timestamp on line 3 exits 1, names FILE:3, and stores nothing."""
        path = bad_csv(tmp_path)
        rc, _, err, _ = await run_async(
            COLLECTOR,
            "import",
            str(path),
            "--collector",
            f"127.0.0.1:{collector.grpc_port}",
            "--insecure",
        )
        assert rc == 1
        assert f"{path}:3:" in err
        assert "no UTC offset" in err
        assert "nothing imported" in err
        assert not any(u.startswith("http://x.example/") for u in stored_urls(collector))

    async def test_skip_invalid_imports_valid_rows(
        self, collector: Collector, tmp_path: Path
    ) -> None:
        """With --skip-invalid the two valid rows are imported and the summary counts one reject."""
        path = bad_csv(tmp_path)
        rc, _, err, _ = await run_async(
            COLLECTOR,
            "import",
            str(path),
            "--collector",
            f"127.0.0.1:{collector.grpc_port}",
            "--skip-invalid",
            "--insecure",
        )
        assert rc == 0, err
        assert f"{path}:3:" in err
        assert "accepted 2, already known 0, rejected 1" in err
        assert stored_urls(collector) == {"http://x.example/1", "http://x.example/3"}

    async def test_jsonl(self, collector: Collector, tmp_path: Path) -> None:
        """A JSONL file (format from its extension) is imported like a CSV."""
        path = tmp_path / "reports.jsonl"
        path.write_text(
            "".join(
                json.dumps({"url": u, "notified_at": T0, "reference": f"J{i}"}) + "\n"
                for i, u in enumerate(GOOD_URLS)
            )
        )
        rc, _, err, _ = await run_async(
            COLLECTOR,
            "import",
            str(path),
            "--collector",
            f"127.0.0.1:{collector.grpc_port}",
            "--insecure",
        )
        assert rc == 0, err
        assert "accepted 3, already known 0, rejected 0" in err
        assert stored_urls(collector) == set(GOOD_URLS)

    async def test_no_collector_listening(self, tmp_path: Path) -> None:
        """With nothing listening, import gives up in bounded time: exit 1 naming UNAVAILABLE."""
        path = good_csv(tmp_path)
        with closed_port() as port:
            rc, _, err, elapsed = await run_async(
                COLLECTOR,
                "import",
                str(path),
                "--collector",
                f"127.0.0.1:{port}",
                "--attempts",
                "2",
                "--insecure",
                within=60,
            )
        assert rc == 1
        assert "UNAVAILABLE" in err
        assert "Traceback" not in err
        assert elapsed < 60


@pytest.mark.integration
class TestReport:
    @pytest.fixture
    async def db(self, collector: Collector, tmp_path: Path) -> Path:
        """The fixture collector's database, with three reports submitted over gRPC."""
        out = io.StringIO()
        status = await import_file(good_csv(tmp_path), f"127.0.0.1:{collector.grpc_port}", out=out)
        assert status == 0, out.getvalue()
        return collector.config.db

    async def test_json(self, db: Path) -> None:
        """--format json prints a list of provider rows with the documented keys and counts."""
        rc, out, err, _ = await run_async(COLLECTOR, "report", "--db", str(db), "--format", "json")
        assert rc == 0, err
        rows = json.loads(out)
        assert isinstance(rows, list)
        assert rows
        assert all(set(row) >= REPORT_KEYS for row in rows)
        assert sum(row["urls"] for row in rows) == 3
        assert sum(row["reports"] for row in rows) == 3
        assert sum(row["removed"] for row in rows) == 0

    async def test_csv(self, db: Path) -> None:
        """--format csv prints a header with the documented columns, then one line per provider."""
        rc, out, err, _ = await run_async(COLLECTOR, "report", "--db", str(db), "--format", "csv")
        assert rc == 0, err
        records = list(csv.DictReader(io.StringIO(out)))
        assert records
        assert set(records[0]) >= REPORT_KEYS
        assert sum(int(r["urls"]) for r in records) == 3

    async def test_table(self, db: Path) -> None:
        """The default table format starts with the column header line."""
        rc, out, err, _ = await run_async(COLLECTOR, "report", "--db", str(db))
        assert rc == 0, err
        header = out.splitlines()[0].split()
        assert header[:7] == ["provider", "asn", "from", "reports", "urls", "removed", "online"]
        assert "median" in header

    async def test_markdown_window(self, db: Path) -> None:
        """--format markdown within a window that holds the reports; an empty window says so."""
        window, empty = await asyncio.gather(  # two processes side by side
            run_async(
                COLLECTOR, "report", "--db", str(db), "--format", "markdown",
                "--since", "2026-01-05T00:00:00+00:00", "--until", "2026-01-06T00:00:00Z",
            ),
            run_async(COLLECTOR, "report", "--db", str(db), "--format", "markdown",
                      "--since", "1h"),
        )  # fmt: skip
        rc, out, err, _ = window
        assert rc == 0, err
        assert out.startswith("| provider")
        assert "not ranked" in out
        rc, out, err, _ = empty
        assert rc == 0, err
        assert "(no reports yet)" in out

    async def test_compare_json(self, db: Path) -> None:
        """--compare names both windows and counts this window's reports against the previous."""
        rc, out, err, _ = await run_async(
            COLLECTOR, "report", "--db", str(db), "--format", "json", "--compare",
            "--since", "2026-01-05T00:00:00+00:00", "--until", "2026-01-06T00:00:00+00:00",
        )  # fmt: skip
        assert rc == 0, err
        doc = json.loads(out)
        assert doc["previous_window"]["until"].startswith("2026-01-05T00:00:00")
        assert sum(r["reports"] for r in doc["providers"]) == 3
        assert sum(r["reports_previous"] for r in doc["providers"]) == 0

    async def test_compare_needs_since(self, db: Path) -> None:
        """--compare without a window start exits 1 naming --since."""
        rc, _, err, _ = await run_async(COLLECTOR, "report", "--db", str(db), "--compare")
        assert rc == 1
        assert "--since" in err
        assert "Traceback" not in err

    def test_naive_since_is_usage_error(self, tmp_path: Path) -> None:
        """A --since without a UTC offset exits 2 naming the value."""
        done = run(COLLECTOR, "report", "--db", str(tmp_path / "x.db"), "--since", "2026-01-05")
        assert done.returncode == 2
        assert "'2026-01-05'" in done.stderr
        assert "no UTC offset" in done.stderr

    async def test_plot(self, db: Path, tmp_path: Path) -> None:
        """--plot writes a PNG of the survival curves."""
        png = tmp_path / "curves.png"
        rc, _, err, _ = await run_async(COLLECTOR, "report", "--db", str(db), "--plot", str(png))
        assert rc == 0, err
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    async def test_url_timeline(self, db: Path) -> None:
        """`url` by id and by exact URL prints the same URL's timeline, text or JSON."""
        rc, out, err, _ = await run_async(
            COLLECTOR, "url", GOOD_URLS[0], "--db", str(db), "--format", "json"
        )
        assert rc == 0, err
        doc = json.loads(out)
        assert doc["url"] == GOOD_URLS[0]
        rc, out, err, _ = await run_async(COLLECTOR, "url", str(doc["url_id"]), "--db", str(db))
        assert rc == 0, err
        assert "notice sent (report R1)" in out

    async def test_url_unknown(self, db: Path) -> None:
        """An unknown URL exits 1 naming it, without a traceback."""
        rc, _, err, _ = await run_async(COLLECTOR, "url", "http://nope.example/", "--db", str(db))
        assert rc == 1
        assert "no URL 'http://nope.example/'" in err
        assert "Traceback" not in err

    def test_missing_database(self, tmp_path: Path) -> None:
        """A missing database file exits 1 with a message naming it and no traceback."""
        missing = tmp_path / "nope.db"
        done = run(COLLECTOR, "report", "--db", str(missing))
        assert done.returncode == 1
        assert str(missing) in done.stderr
        assert "Traceback" not in done.stderr
        assert not missing.exists()

    def test_foreign_file(self, tmp_path: Path) -> None:
        """A file that is not a collector database exits 1 with a message naming it."""
        foreign = tmp_path / "foreign.db"
        foreign.write_bytes(b"not sqlite at all" * 100)
        done = run(COLLECTOR, "report", "--db", str(foreign))
        assert done.returncode == 1
        assert str(foreign) in done.stderr
        assert "not a Takedown Monitor database" in done.stderr
        assert "Traceback" not in done.stderr


@pytest.mark.integration
class TestAgentRefused:
    async def test_empty_network_is_refused(self, collector: Collector) -> None:
        """An agent the collector refuses (empty network) exits 2 naming INVALID_ARGUMENT."""
        rc, _, err, _ = await run_async(
            AGENT,
            "--collector",
            f"127.0.0.1:{collector.grpc_port}",
            "--network",
            "",
            "--name",
            "x",
            "--allow-private",
            "127.0.0.0/8",
            "--insecure",
            within=30,
        )
        assert rc == 2, err
        assert "INVALID_ARGUMENT" in err
        assert "Traceback" not in err
