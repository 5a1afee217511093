"""The deployment files under deploy/: checked by their own tools and against each other.

Prometheus rules and config (promtool), Alertmanager routing (amtool), the Grafana
dashboard, systemd units (systemd-analyze), container and Kubernetes manifests. Every
configuration is parsed with our own command-line parsers, every cross-reference (file,
port, ConfigMap, Secret, volume, Service) must resolve, and every metric a rule or panel
uses must be one the collector exports or one announced for the agents. Every deployment
runs with TLS and tokens, and the credentials its configs name are provided where they
look: by LoadCredential=, by compose's init service (run here for real), by documented
Secrets.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tomllib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import aiohttp
import configargparse
import pytest
from cryptography import x509

from agent.cli import build_parser
from client.credentials import ClientTLS
from collector.cli import import_parser, serve_parser, server_security
from collector.server import Collector
from tests.conftest import eventually, scrape

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
PROMETHEUS_YML = DEPLOY / "prometheus" / "prometheus.yml"
RULES = DEPLOY / "prometheus" / "rules" / "takedown.rules.yml"
RULE_TESTS = sorted((DEPLOY / "prometheus" / "tests").glob("*.yml"))
ALERTMANAGER_YML = DEPLOY / "alertmanager" / "alertmanager.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "takedown.json"
COMPOSE = DEPLOY / "container" / "compose.yaml"
SYSTEMD = DEPLOY / "systemd"
K8S = DEPLOY / "k8s"
BIN = Path(sys.executable).parent

REQUIRED_ALERTS = {
    "TakedownRemovalOverdue": "hotline",
    "TakedownContentReappeared": "hotline",
    "TakedownAgentDown": "ops",
    "TakedownAgentSilent": "ops",
    "TakedownCollectorDown": "ops",
    "TakedownAgentSpoolGrowing": "ops",
    "TakedownNoResultsIngested": "ops",
}
# Announced metrics that rules and panels may already use (tests use synthetic series).
COMING_SOON = {
    "takedown_agent_clock_offset_seconds",
    "takedown_agent_spool_results",
    "takedown_agent_spool_bytes",
    "takedown_agent_results_dropped_total",
    "takedown_agent_reconnects_total",
    "takedown_agent_stream_up",
}
PROMQL_WORDS = {"by", "on", "and", "or", "unless", "without", "ignoring", "group_left",
                "group_right", "offset", "bool", "inf", "nan"}  # fmt: skip
# Which CLI reads a config (import: `takedown-collector import`), and the TOML table it reads.
PARSERS = {"collector": serve_parser, "agent": build_parser, "import": import_parser}
TABLES = {"collector": "collector", "agent": "agent", "import": "collector"}
# The options that name TLS and token files, as parsed attributes.
CREDENTIAL_FILES = ("cert_file", "key_file", "client_ca_file", "ca_file", "token_file")


@pytest.fixture(scope="module")
def yaml() -> ModuleType:
    return pytest.importorskip("yaml", reason="PyYAML is not installed (dev extra)")


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed: run scripts/ci-system-deps.sh")
    return path


def run_tool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)


def load_yaml(yaml: ModuleType, path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def rules(yaml: ModuleType) -> list[dict[str, Any]]:
    return [r for g in load_yaml(yaml, RULES)["groups"] for r in g["rules"]]


def alerts(yaml: ModuleType) -> dict[str, dict[str, Any]]:
    return {r["alert"]: r for r in rules(yaml) if "alert" in r}


def dashboard_targets() -> Iterator[tuple[str, str]]:
    """(panel title, PromQL expression) for every query in the dashboard."""
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"]


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not functions or keywords."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", expr)
    expr = re.sub(r"\b(?:by|on|without|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    tokens = re.finditer(r"(?<![\w$.])([A-Za-z_:][\w:]*)(\s*\()?", expr)
    return {m[1] for m in tokens if not m[2] and m[1].lower() not in PROMQL_WORDS}


def hostport(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host, int(port)


def parse_config(kind: str, text: str, tmp_path: Path) -> configargparse.Namespace:
    """Parse a TOML config the way `takedown-<kind> --config FILE` does; fail with its error."""
    parser = PARSERS[kind]()
    path = tmp_path / f"{kind}-{abs(hash(text))}.toml"
    path.write_text(text)
    operands = ["reports.csv"] if kind == "import" else []
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return parser.parse_args(["--config", str(path), *operands])
    except SystemExit:
        pytest.fail(f"takedown-{kind} rejects its config:\n{text}\n{err.getvalue()}")


def deploy_configs(yaml: ModuleType) -> Iterator[tuple[str, str, str]]:
    """(where, kind, text) of every TOML config in deploy/, the Kubernetes ConfigMaps' too."""
    found = [(str(p.relative_to(DEPLOY)), p.name, p.read_text()) for p in DEPLOY.rglob("*.toml")]
    found += [
        (f"k8s/{doc['metadata']['name']}/{key}", key, text)
        for doc in _k8s(yaml)
        if doc["kind"] == "ConfigMap"
        for key, text in doc["data"].items()
        if key.endswith(".toml")
    ]
    for where, name, text in sorted(found):
        if "agent" in tomllib.loads(text):
            yield where, "agent", text
        else:
            yield where, "import" if name.startswith("import") else "collector", text


def documented_commands(*paths: Path) -> list[list[str]]:
    """The takedown-collector and kubectl commands shown in the files' comments, as words."""
    found = []
    for path in paths:
        lines = path.read_text().splitlines()
        comments = "\n".join(re.sub(r"^\s*# ?", "", s) for s in lines if s.lstrip()[:1] == "#")
        for line in comments.replace("\\\n", " ").splitlines():
            if line.strip().startswith(("takedown-collector ", "kubectl ")):
                found.append(shlex.split(line))
    return found


def option(words: list[str], name: str) -> list[str]:
    """Every value of `name` (given as `name VALUE`) in a command's words."""
    return [words[i + 1] for i, word in enumerate(words[:-1]) if word == name]


def subcommand(words: list[str], *command: str) -> list[str] | None:
    """The words after `takedown-collector COMMAND...` in a command line, or None."""
    for i in range(len(words)):
        if words[i : i + len(command) + 1] == ["takedown-collector", *command]:
            return words[i + len(command) + 1 :]
    return None


def server_names(commands: list[list[str]]) -> set[str]:
    """The DNS names of the collector certificates the commands issue."""
    issued = [rest for words in commands if (rest := subcommand(words, "ca", "issue"))]
    return {name for rest in issued if "--server" in rest for name in option(rest, "--dns")}


def agent_tokens(commands: list[list[str]]) -> dict[tuple[str, ...], str]:
    """(agent name, network) -> the file each `agents add` in the commands writes the token to."""
    return {
        (rest[0], *option(rest, "--network")): "".join(option(words, ">"))
        for words in commands
        if (rest := subcommand(words, "agents", "add"))
    }


def credential_files(args: configargparse.Namespace) -> dict[str, Path]:
    """The TLS and token files a parsed config names, by option."""
    return {a: Path(getattr(args, a)) for a in CREDENTIAL_FILES if getattr(args, a, None)}


def parse_args(kind: str, args: list[str], files: dict[str, str], tmp: Path) -> Any:
    """Parse container/unit arguments, reading `--config` from `files` (path -> content)."""
    assert args[:1] == ["--config"] and len(args) == 2, f"expected --config FILE, got {args}"
    assert args[1] in files, f"{args[1]} is not provided by the deployment"
    return parse_config(kind, files[args[1]], tmp)


def listen_port(config_text: str, table: str) -> int:
    return hostport(tomllib.loads(config_text)[table]["metrics-listen"])[1]


class TestPrometheus:
    pytestmark = pytest.mark.prometheus

    def test_config_is_valid(self) -> None:
        """promtool accepts the Prometheus config and finds the rule file it names."""
        result = run_tool(tool("promtool"), "check", "config", str(PROMETHEUS_YML))
        assert result.returncode == 0, result.stdout + result.stderr
        assert "1 rule files found" in result.stdout

    def test_rules_are_valid(self) -> None:
        """promtool accepts every recording and alerting rule."""
        result = run_tool(tool("promtool"), "check", "rules", str(RULES))
        assert result.returncode == 0, result.stdout + result.stderr

    def test_rule_unit_tests_pass(self) -> None:
        """The promtool unit tests of the rules pass."""
        assert RULE_TESTS
        result = run_tool(tool("promtool"), "test", "rules", *map(str, RULE_TESTS))
        assert result.returncode == 0, result.stdout + result.stderr
        assert "SUCCESS" in result.stdout + result.stderr

    def test_every_alert_is_tested_firing_and_not_firing(self, yaml: ModuleType) -> None:
        """Each alert has a unit-test case where it fires and one where it does not."""
        fired: set[str] = set()
        quiet: set[str] = set()
        for path in RULE_TESTS:
            for case in load_yaml(yaml, path)["tests"]:
                for check in case.get("alert_rule_test", []):
                    (fired if check.get("exp_alerts") else quiet).add(check["alertname"])
        names = set(alerts(yaml))
        assert names - fired == set()
        assert names - quiet == set()

    def test_required_alerts_route_to_their_team(self, yaml: ModuleType) -> None:
        """The issue's alerts exist with the team that must act on them."""
        found = alerts(yaml)
        for name, team in REQUIRED_ALERTS.items():
            assert found[name]["labels"]["team"] == team, name

    def test_alerts_carry_severity_team_and_actionable_text(self, yaml: ModuleType) -> None:
        """Every alert has a severity, a team and a summary and description to act on."""
        for name, rule in alerts(yaml).items():
            assert rule["labels"]["severity"] in {"critical", "warning", "info"}, name
            assert rule["labels"]["team"] in {"hotline", "ops"}, name
            assert rule["annotations"]["summary"].strip(), name
            assert len(rule["annotations"]["description"].split()) >= 20, name

    def test_alert_labels_are_never_urls(self, yaml: ModuleType) -> None:
        """No rule groups or labels by URL or report id (labels are providers and agents)."""
        for rule in rules(yaml):
            assert not re.search(r"\b(url|report|reference)\b", rule["expr"]), rule


class TestAlertmanager:
    pytestmark = pytest.mark.prometheus

    def test_config_is_valid(self) -> None:
        """amtool accepts the Alertmanager config."""
        result = run_tool(tool("amtool"), "check-config", str(ALERTMANAGER_YML))
        assert result.returncode == 0, result.stdout + result.stderr

    def test_each_alert_reaches_its_team(self, yaml: ModuleType) -> None:
        """Routing sends every alert to the receiver named by its team label."""
        amtool = tool("amtool")
        for name, rule in alerts(yaml).items():
            team = rule["labels"]["team"]
            result = run_tool(
                amtool, "config", "routes", "test", f"--config.file={ALERTMANAGER_YML}",
                f"alertname={name}", f"team={team}", "provider=Hoster A",
            )  # fmt: skip
            assert result.returncode == 0, result.stdout + result.stderr
            assert result.stdout.split() == [team], name

    def test_hotline_groups_per_provider_and_deadline(self, yaml: ModuleType) -> None:
        """Hotline notifications are grouped by alert, provider and deadline."""
        config = load_yaml(yaml, ALERTMANAGER_YML)
        hotline = next(r for r in config["route"]["routes"] if r["receiver"] == "hotline")
        assert set(hotline.get("group_by", config["route"]["group_by"])) == {
            "alertname", "provider", "deadline"
        }  # fmt: skip
        for receiver in config["receivers"]:
            assert all(w["send_resolved"] for w in receiver["webhook_configs"])


class TestMetricNames:
    async def test_rules_and_panels_use_only_exported_metrics(
        self, yaml: ModuleType, collector: Collector
    ) -> None:
        """Every metric in a rule or panel is exported by the collector, recorded, or announced."""
        exported: set[str] = set()
        for line in (await _exposition(collector.metrics_port)).splitlines():
            if line.startswith("# TYPE "):
                _, _, name, kind = line.split()
                exported.add(name)
                suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"]}
                exported.update(name + s for s in suffixes.get(kind, []))
        assert "takedown_removal_latency_seconds_bucket" in exported
        recorded = {r["record"] for r in rules(yaml) if "record" in r}
        known = exported | recorded | COMING_SOON | {"up", "time"}
        used = {name for r in rules(yaml) for name in metric_names(r["expr"])}
        used |= {name for _, expr in dashboard_targets() for name in metric_names(expr)}
        assert {"takedown_overdue_urls", "takedown_agent_connected", "up"} <= used
        assert used - known == set()


async def _exposition(port: int) -> str:
    """The raw /metrics text (families without samples still have a TYPE line)."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/metrics") as response,
    ):
        return await response.text()


class TestGrafana:
    def test_dashboard_has_uid_and_no_hard_coded_datasource(self) -> None:
        """Every panel and query uses the ${DS_PROMETHEUS} variable, which is defined."""
        board = json.loads(DASHBOARD.read_text())
        assert board["uid"] == "takedown-monitor"
        variables = {v["name"]: v for v in board["templating"]["list"]}
        assert variables["DS_PROMETHEUS"]["type"] == "datasource"
        for panel in board["panels"]:
            if panel["type"] == "row":
                continue
            sources = [panel["datasource"]] + [t["datasource"] for t in panel["targets"]]
            assert all(s == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"} for s in sources)

    def test_every_template_variable_used_is_defined(self) -> None:
        """Queries and titles refer only to variables the dashboard defines."""
        board = json.loads(DASHBOARD.read_text())
        defined = {v["name"] for v in board["templating"]["list"]}
        used = set(re.findall(r"\$\{?(\w+)", DASHBOARD.read_text()))
        assert {u for u in used if not u.startswith("__")} <= defined

    def test_panels_cover_latency_removal_share_urls_and_agents(self) -> None:
        """The dashboard shows what analysts, the hotline and ops look for."""
        exprs = " ".join(expr for _, expr in dashboard_targets())
        for needle in (
            "provider:takedown_removal_latency_seconds:quantile",
            "increase(takedown_removal_latency_seconds_bucket",
            "provider:takedown_removed_within_24h:ratio",
            'state="available"',
            'state="geoblocked"',
            "takedown_overdue_urls",
            "takedown_reappearances_total",
            "takedown_agent_connected",
            "takedown_agent_last_result_timestamp_seconds",
            "takedown_agent_clock_offset_seconds",
        ):
            assert needle in exprs

    def test_panel_ids_are_unique(self) -> None:
        """Grafana needs a distinct id per panel."""
        ids = [p["id"] for p in json.loads(DASHBOARD.read_text())["panels"]]
        assert len(ids) == len(set(ids))

    def test_provisioning_points_at_prometheus_and_the_dashboards(self, yaml: ModuleType) -> None:
        """The provisioned data source and dashboard folder match compose.yaml's mounts."""
        grafana = DEPLOY / "grafana" / "provisioning"
        source = load_yaml(yaml, grafana / "datasources" / "prometheus.yml")["datasources"][0]
        provider = load_yaml(yaml, grafana / "dashboards" / "takedown.yml")["providers"][0]
        compose = load_yaml(yaml, COMPOSE)
        mounts = dict(_mounts(compose["services"]["grafana"]))
        assert mounts[provider["options"]["path"]] == DEPLOY / "grafana" / "dashboards"
        assert mounts["/etc/grafana/provisioning"] == grafana
        host, port = hostport(source["url"].removeprefix("http://"))
        assert host == "prometheus" and host in compose["services"]
        assert f"127.0.0.1:{port}:{port}" in compose["services"]["prometheus"]["ports"]


def _unit(path: Path) -> dict[str, list[str]]:
    """The [Service] section of a unit file, each key with all its values."""
    values: dict[str, list[str]] = {}
    section = ""
    for line in path.read_text().splitlines():
        if line.startswith("["):
            section = line.strip("[]")
        elif "=" in line and not line.startswith("#") and section == "Service":
            key, _, value = line.partition("=")
            values.setdefault(key, []).append(value)
    return values


class TestSystemd:
    UNITS = ("takedown-collector.service", "takedown-agent@.service")

    def test_units_verify(self, tmp_path: Path) -> None:
        """systemd-analyze verify finds no problem (ExecStart pointed at this install)."""
        analyze = tool("systemd-analyze")
        for name in self.UNITS:
            text = (SYSTEMD / name).read_text().replace("/opt/takedown/venv/bin/", f"{BIN}/")
            (tmp_path / name).write_text(text)
        result = run_tool(
            analyze, "verify",
            str(tmp_path / "takedown-collector.service"),
            str(tmp_path / "takedown-agent@nl-ams.service"),
        )  # fmt: skip
        output = result.stdout + result.stderr
        assert result.returncode == 0, output
        assert [line for line in output.splitlines() if "takedown" in line] == []

    @pytest.mark.parametrize("name", UNITS)
    def test_units_are_hardened(self, name: str) -> None:
        """The services run unprivileged in a read-only, filtered sandbox and stop gracefully."""
        unit = _unit(SYSTEMD / name)
        expected = {
            "DynamicUser": "yes",
            "ProtectSystem": "strict",
            "ProtectHome": "yes",
            "NoNewPrivileges": "yes",
            "PrivateTmp": "yes",
            "CapabilityBoundingSet": "",
            "Restart": "on-failure",
            "KillSignal": "SIGTERM",
        }
        for key, value in expected.items():
            assert unit[key] == [value], key
        assert "@system-service" in unit["SystemCallFilter"]
        assert set(unit["RestrictAddressFamilies"][0].split()) <= {"AF_INET", "AF_INET6", "AF_UNIX"}
        assert unit["StateDirectory"] and unit["TimeoutStopSec"]

    def test_exec_start_reads_a_valid_config(self, tmp_path: Path) -> None:
        """ExecStart uses --config; the example configs parse and keep state in StateDirectory."""
        collector = shlex.split(_unit(SYSTEMD / self.UNITS[0])["ExecStart"][0])
        agent = shlex.split(_unit(SYSTEMD / self.UNITS[1])["ExecStart"][0].replace("%i", "nl-ams"))
        assert collector[0].endswith("/takedown-collector") and collector[1] == "serve"
        assert agent[0].endswith("/takedown-agent")
        files = {f"/etc/takedown/{p.name}": p.read_text() for p in SYSTEMD.glob("*.toml")}
        args = parse_args("collector", collector[2:], files, tmp_path)
        state = "/var/lib/" + _unit(SYSTEMD / self.UNITS[0])["StateDirectory"][0]
        assert str(args.db).startswith(state + "/")
        args = parse_args("agent", agent[1:], files, tmp_path)
        assert args.network == "nl-ams"
        agent_state = _unit(SYSTEMD / self.UNITS[1])["StateDirectory"][0].replace("%i", "nl-ams")
        assert str(args.state_dir) == "/var/lib/" + agent_state

    def test_credentials_come_from_load_credential(self, tmp_path: Path) -> None:
        """Each TLS and token file a config names is /run/credentials/UNIT/ID, every ID loaded
        by that unit from an absolute path; the documented certificate and token fit the agent."""
        files = {f"/etc/takedown/{p.name}": p.read_text() for p in SYSTEMD.glob("*.toml")}
        commands = documented_commands(*(SYSTEMD / name for name in self.UNITS))
        for name in self.UNITS:
            unit = _unit(SYSTEMD / name)
            words = shlex.split(unit["ExecStart"][0].replace("%i", "nl-ams"))
            kind = "collector" if words[0].endswith("/takedown-collector") else "agent"
            args = parse_args(kind, words[-2:], files, tmp_path)
            loaded = dict(v.replace("%i", "nl-ams").split(":", 1) for v in unit["LoadCredential"])
            named = credential_files(args).values()
            directory = Path("/run/credentials") / name.replace("@.", "@nl-ams.")
            assert {path.parent for path in named} == {directory}, name
            assert {path.name for path in named} == set(loaded), name
            assert all(Path(source).is_absolute() for source in loaded.values()), name
            if kind == "agent":
                assert hostport(args.collector)[0] in server_names(commands)
                assert (args.name, args.network) in agent_tokens(commands)


def _mounts(service: dict[str, Any]) -> Iterator[tuple[str, Path | str]]:
    """(container path, host path or volume name) of a compose service's volumes."""
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        yield target, (COMPOSE.parent / source).resolve() if source.startswith(".") else source


def assert_references_resolve(compose: dict[str, Any], path: Path) -> None:
    """Every build file and bind mount of the compose file at `path` exists; its named volumes
    are declared."""
    for name, service in compose["services"].items():
        if "build" in service:
            context = (path.parent / service["build"]["context"]).resolve()
            assert (context / service["build"]["dockerfile"]).is_file(), name
        for _, source in _mounts(service):
            if isinstance(source, Path):
                assert source.exists(), f"{name}: {source}"
            else:
                assert source in compose["volumes"], f"{name}: volume {source}"


def _local(service: dict[str, Any], path: str, volumes: Path) -> Path:
    """Where a container path of a compose service is on this host: in its bind mount's source,
    or in volumes/NAME for a named volume (by the longest mount target that holds it)."""
    for target, source in sorted(_mounts(service), key=lambda mount: -len(mount[0])):
        if path == target or path.startswith(target + "/"):
            base = source if isinstance(source, Path) else volumes / source
            return base / path[len(target) :].lstrip("/")
    pytest.fail(f"{path} is in no volume or bind mount of the service")


def _localized(service: dict[str, Any], text: str, volumes: Path) -> str:
    """A compose service's config with each quoted absolute path where it is on this host."""
    return re.sub(r'"(/[^"]*)"', lambda m: json.dumps(str(_local(service, m[1], volumes))), text)


def _environment() -> dict[str, str]:
    """This environment without TAKEDOWN_* settings, with our programs first on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TAKEDOWN_")}
    return env | {"PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _run(*args: str | Path, env: dict[str, str]) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *map(str, args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@contextlib.asynccontextmanager
async def _process(
    log: Path, *args: str | Path, env: dict[str, str]
) -> AsyncIterator[asyncio.subprocess.Process]:
    """A program running with its output in `log`, stopped by SIGTERM (or killed) at the end."""
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            *map(str, args), stdout=out, stderr=out, env=env
        )
        try:
            yield proc
        finally:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except TimeoutError:
                proc.kill()
                await proc.wait()


def _running(proc: asyncio.subprocess.Process, log: Path) -> None:
    assert proc.returncode is None, f"{log.stem} exited:\n{log.read_text()}"


async def _serving(proc: asyncio.subprocess.Process, log: Path, port: int) -> bool:
    _running(proc, log)
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}/healthz") as response,
        ):
            return response.status == 200
    except aiohttp.ClientError:
        return False


def _containerfile(role: str) -> dict[str, str]:
    """Instruction -> argument text of a Containerfile (continuations joined)."""
    text = (COMPOSE.parent / f"Containerfile.{role}").read_text().replace("\\\n", " ")
    out: dict[str, str] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out[word] = " ".join(filter(None, [out.get(word), rest.strip()]))
    return out


class TestContainers:
    @pytest.mark.parametrize("role", ["collector", "agent"])
    def test_containerfile_runs_as_non_root_with_a_health_check(self, role: str) -> None:
        """The image is python:3.11-slim, runs unprivileged and checks /healthz on its port."""
        spec = _containerfile(role)
        assert spec["FROM"] == "python:3.11-slim"
        assert spec["USER"].split(":")[0] not in {"0", "root"}
        assert "pip install ." in spec["RUN"]
        for source in re.findall(r"COPY (\S+)", "COPY " + spec["COPY"].replace(" ./", " ")):
            assert (ROOT / source).exists(), source
        health = re.search(r"http://127\.0\.0\.1:(\d+)/healthz", spec["HEALTHCHECK"])
        assert health and health[1] in spec["EXPOSE"].split()

    def test_compose_references_resolve(self, yaml: ModuleType) -> None:
        """Every build file and bind mount of compose.yaml exists; volumes are declared."""
        compose = load_yaml(yaml, COMPOSE)
        assert_references_resolve(compose, COMPOSE)

    def test_compose_configs_parse_and_ports_agree(self, yaml: ModuleType, tmp_path: Path) -> None:
        """Configs parse with our CLIs; scrape targets, health checks and addresses match them."""
        compose = load_yaml(yaml, COMPOSE)
        services = compose["services"]
        scrape = load_yaml(yaml, PROMETHEUS_YML)
        targets = {
            job["job_name"]: [t for c in job["static_configs"] for t in c["targets"]]
            for job in scrape["scrape_configs"]
        }
        agents = [n for n, s in services.items() if "Containerfile.agent" in str(s.get("build"))]
        assert len(agents) == 2
        networks = set()
        for name in ["collector", *agents]:
            kind = "collector" if name == "collector" else "agent"
            files = {t: s.read_text() for t, s in _mounts(services[name]) if isinstance(s, Path)}
            args = shlex.split(" ".join(json.loads(_containerfile(kind)["CMD"])))
            config = parse_args(kind, args, files, tmp_path)
            port = listen_port(files[args[1]], kind)
            health = re.search(r":(\d+)/healthz", _containerfile(kind)["HEALTHCHECK"])
            assert health and int(health[1]) == port, name
            job = "takedown-collector" if kind == "collector" else "takedown-agent"
            assert f"{name}:{port}" in targets[job]
            if kind == "agent":
                networks.add(config.network)
                host, grpc_port = hostport(config.collector)
                assert host in services
                collector_config = files_of(services[host])["/etc/takedown/collector.toml"]
                assert hostport(tomllib.loads(collector_config)["collector"]["listen"])[1] == (
                    grpc_port
                )
        assert len(networks) == 2
        manager = scrape["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"][0]
        host, port = hostport(manager)
        assert host in services and f"127.0.0.1:{port}:{port}" in services[host]["ports"]
        mounts = dict(_mounts(services["prometheus"]))
        assert mounts["/etc/prometheus/prometheus.yml"] == PROMETHEUS_YML
        assert mounts["/etc/prometheus/rules"] == RULES.parent
        am_mounts = dict(_mounts(services["alertmanager"]))
        assert am_mounts["/etc/alertmanager/alertmanager.yml"] == ALERTMANAGER_YML

    def test_init_makes_the_credentials_before_anyone_reads_them(self, yaml: ModuleType) -> None:
        """Who mounts the credentials volume waits for init to succeed and mounts it read-only;
        only init, a one-shot, mounts the CA's volume."""
        services = load_yaml(yaml, COMPOSE)["services"]
        assert services["init"]["restart"] == "no"
        readers = set()
        for name, service in services.items():
            volumes = {spec.split(":")[0]: spec for spec in service.get("volumes", [])}
            assert "pki" not in volumes or name == "init", name
            if "credentials" in volumes and name != "init":
                readers.add(name)
                assert volumes["credentials"].endswith(":ro"), name
                condition = {"condition": "service_completed_successfully"}
                assert service["depends_on"]["init"] == condition, name
        assert readers == {"collector", "import", "agent-nl-ams", "agent-de-fra"}

    @pytest.mark.slow
    @pytest.mark.integration
    async def test_init_credentials_let_the_stack_in(
        self, yaml: ModuleType, tmp_path: Path
    ) -> None:
        """init's script (twice: the second run changes nothing) makes every file the configs
        name in the volumes they mount; with them the real collector serves mutual TLS and
        wants tokens, the import is accepted and both agents connect."""
        compose = load_yaml(yaml, COMPOSE)
        services = compose["services"]
        volumes = tmp_path / "volumes"
        for name in compose["volumes"]:
            (volumes / name).mkdir(parents=True)
        init = services["init"]

        def local(value: str) -> str:
            return str(_local(init, value, volumes)) if value.startswith("/") else value

        env = _environment()
        init_env = env | {key: local(value) for key, value in init["environment"].items()}
        made = []
        for _ in range(2):
            status, _, err = await _run(*map(local, init["entrypoint"]), env=init_env)
            assert status == 0, err
            made.append({p.name: p.read_bytes() for p in (volumes / "credentials").iterdir()})
        assert made[0] and made[0] == made[1]

        configs: dict[str, Path] = {}
        parsed: dict[str, configargparse.Namespace] = {}
        for name, service in services.items():
            for _, source in _mounts(service):
                if isinstance(source, Path) and source.suffix == ".toml":
                    configs[name] = tmp_path / f"{name}.toml"
                    configs[name].write_text(_localized(service, source.read_text(), volumes))
                    kind = name if name in PARSERS else "agent"
                    parsed[name] = parse_config(kind, configs[name].read_text(), tmp_path)
                    for option_name, path in credential_files(parsed[name]).items():
                        assert path.is_file(), f"{name}: {option_name} {path} is not made"
        assert parsed["collector"].client_ca_file
        cert = x509.load_pem_x509_certificate(Path(parsed["collector"].cert_file).read_bytes())
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        for name, args in parsed.items():
            if name != "collector":
                assert hostport(args.collector)[0] in sans.get_values_for_type(x509.DNSName), name

        target, metrics = f"127.0.0.1:{_free_port()}", _free_port()
        collector_bin, agent_bin = BIN / "takedown-collector", BIN / "takedown-agent"
        reports = tmp_path / "reports.csv"
        reports.write_text("url,notified_at\nhttp://192.0.2.1/a,2026-01-05T10:00:00Z\n")
        async with contextlib.AsyncExitStack() as stack:
            log = tmp_path / "collector.log"
            serve = _process(
                log, collector_bin, "serve", "--config", configs["collector"],
                "--listen", target, "--metrics-listen", f"127.0.0.1:{metrics}", env=env,
            )  # fmt: skip
            collector = await stack.enter_async_context(serve)
            await eventually(lambda: _serving(collector, log, metrics), 30, "the collector")
            status, _, err = await _run(
                collector_bin, "import", "--config", configs["import"], "--collector", target,
                reports, env=env,
            )  # fmt: skip
            assert status == 0 and "accepted 1," in err, err
            agents = [name for name in configs if name.startswith("agent-")]
            running = {}
            for name in agents:
                agent_log = tmp_path / f"{name}.log"
                agent = _process(
                    agent_log, agent_bin, "--config", configs[name], "--collector", target,
                    "--metrics-listen", "", env=env,
                )  # fmt: skip
                running[agent_log] = await stack.enter_async_context(agent)

            async def connected() -> bool:
                for agent_log, proc in running.items():
                    _running(proc, agent_log)
                samples = (await scrape(metrics)).get("takedown_agent_connected", [])
                names = {s.labels["agent"] for s in samples if s.value == 1}
                return names == {parsed[name].name for name in agents}

            await eventually(connected, 30, "both agents connected over mutual TLS")


def files_of(service: dict[str, Any]) -> dict[str, str]:
    return {t: s.read_text() for t, s in _mounts(service) if isinstance(s, Path) and s.is_file()}


def _k8s(yaml: ModuleType) -> list[dict[str, Any]]:
    return [
        doc
        for path in sorted(K8S.glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc
    ]


def k8s_secrets() -> dict[str, dict[str, Path]]:
    """Secret name -> {key: file} of each `kubectl -n takedown create secret generic` shown in
    the manifests' comments: Secrets are made outside the manifests, never committed."""
    secrets = {}
    for words in documented_commands(*sorted(K8S.glob("*.yaml"))):
        if words[:6] == ["kubectl", "-n", "takedown", "create", "secret", "generic"]:
            assert all(w.startswith("--from-file=") for w in words[7:]), words
            pairs = (w.removeprefix("--from-file=").split("=", 1) for w in words[7:])
            secrets[words[6]] = {key: Path(file) for key, file in pairs}
    return secrets


def _config_files(
    container: dict[str, Any], volumes: dict[str, Any], configmaps: dict[str, dict[str, str]]
) -> dict[str, str]:
    """Path -> content of every ConfigMap file mounted into a container."""
    files = {}
    for mount in container["volumeMounts"]:
        source = volumes.get(mount["name"], {}).get("configMap")
        for key, text in configmaps.get(source["name"] if source else "", {}).items():
            files[f"{mount['mountPath']}/{key}"] = text
    return files


def _pods(docs: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(workload, pod template) of every StatefulSet and Deployment."""
    for doc in docs:
        if doc["kind"] in {"StatefulSet", "Deployment"}:
            yield doc, doc["spec"]["template"]


class TestKubernetes:
    def test_manifests_parse_with_names(self, yaml: ModuleType) -> None:
        """Every document has an apiVersion, a kind and a name in the takedown namespace; no
        Secret is among them (applying a placeholder would overwrite the real one)."""
        docs = _k8s(yaml)
        kinds = {d["kind"] for d in docs}
        assert {"StatefulSet", "Deployment", "Service", "ConfigMap"} <= kinds
        assert "Secret" not in kinds
        for doc in docs:
            assert doc["apiVersion"] and doc["metadata"]["name"]
            assert doc["kind"] == "Namespace" or doc["metadata"]["namespace"] == "takedown"

    def test_references_resolve(self, yaml: ModuleType) -> None:
        """ConfigMaps, Secrets (documented), claims, Services and named ports referenced exist."""
        docs = _k8s(yaml)
        names = {(d["kind"], d["metadata"]["name"]) for d in docs}
        names |= {("Secret", name) for name in k8s_secrets()}
        for workload, pod in _pods(docs):
            spec = pod["spec"]
            claims = {
                c["metadata"]["name"] for c in workload["spec"].get("volumeClaimTemplates", [])
            }
            volumes = {v["name"] for v in spec.get("volumes", [])} | claims
            for volume in spec.get("volumes", []):
                if "configMap" in volume:
                    assert ("ConfigMap", volume["configMap"]["name"]) in names
                if "secret" in volume:
                    assert ("Secret", volume["secret"]["secretName"]) in names
                if "persistentVolumeClaim" in volume:
                    claim = volume["persistentVolumeClaim"]["claimName"]
                    assert ("PersistentVolumeClaim", claim) in names
            if workload["kind"] == "StatefulSet":
                service = next(
                    d for d in docs if d["kind"] == "Service"
                    and d["metadata"]["name"] == workload["spec"]["serviceName"]
                )  # fmt: skip
                assert service["spec"]["clusterIP"] == "None"
            labels = pod["metadata"]["labels"]
            assert workload["spec"]["selector"]["matchLabels"].items() <= labels.items()
            for container in spec["containers"]:
                ports = {p["name"]: p["containerPort"] for p in container["ports"]}
                assert {m["name"] for m in container["volumeMounts"]} <= volumes
                for probe in ("readinessProbe", "livenessProbe"):
                    assert container[probe]["httpGet"]["port"] in ports
                    assert container[probe]["httpGet"]["path"] == "/healthz"
                assert int(pod["metadata"]["annotations"]["prometheus.io/port"]) in ports.values()
        for service in (d for d in docs if d["kind"] == "Service"):
            selector = service["spec"]["selector"].items()
            matches = [
                (w, p) for w, p in _pods(docs) if selector <= p["metadata"]["labels"].items()
            ]
            assert matches, service["metadata"]["name"]
            for port in service["spec"]["ports"]:
                container_ports = {
                    p["name"]: p["containerPort"]
                    for w, pod in matches
                    for c in pod["spec"]["containers"]
                    for p in c["ports"]
                }
                assert container_ports[port["targetPort"]] == port["port"]

    def test_container_args_are_valid_cli_options(self, yaml: ModuleType, tmp_path: Path) -> None:
        """Each container's --config parses with our CLIs and agrees with ports and volumes."""
        docs = _k8s(yaml)
        configmaps = {d["metadata"]["name"]: d["data"] for d in docs if d["kind"] == "ConfigMap"}
        services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
        networks = []
        for _, pod in _pods(docs):
            volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
            for container in pod["spec"]["containers"]:
                files = _config_files(container, volumes, configmaps)
                kind = "collector" if container["command"][0] == "takedown-collector" else "agent"
                assert container["command"] == (
                    ["takedown-collector", "serve"] if kind == "collector" else ["takedown-agent"]
                )
                args = parse_args(kind, container["args"], files, tmp_path)
                ports = {p["containerPort"] for p in container["ports"]}
                assert listen_port(files[container["args"][1]], kind) in ports
                if kind == "collector":
                    assert hostport(args.listen)[1] in ports
                    mounts = [m["mountPath"] for m in container["volumeMounts"]]
                    assert any(str(args.db).startswith(m + "/") for m in mounts)
                    assert str(args.prefixes) in files
                else:
                    networks.append(args.network)
                    host, port = hostport(args.collector)
                    service = services[host.split(".")[0]]
                    assert host.split(".")[1:2] in ([], [service["metadata"]["namespace"]])
                    assert port in {p["port"] for p in service["spec"]["ports"]}
        assert len(networks) == len(set(networks)) == 2

    def test_credentials_come_from_documented_secrets(
        self, yaml: ModuleType, tmp_path: Path
    ) -> None:
        """Each TLS and token file a container's config names is a key of a Secret mounted there,
        made by a documented command from the right files: one CA for all, the agent's own
        certificate and token, a collector certificate for the address the agents use."""
        docs = _k8s(yaml)
        configmaps = {d["metadata"]["name"]: d["data"] for d in docs if d["kind"] == "ConfigMap"}
        secrets = k8s_secrets()
        commands = documented_commands(*sorted(K8S.glob("*.yaml")))
        tokens = agent_tokens(commands)
        cas, used = set(), set()
        for _, pod in _pods(docs):
            volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
            for container in pod["spec"]["containers"]:
                files = _config_files(container, volumes, configmaps)
                kind = "collector" if container["command"][0] == "takedown-collector" else "agent"
                args = parse_args(kind, container["args"], files, tmp_path)
                secret_at = {
                    m["mountPath"]: volumes[m["name"]]["secret"]["secretName"]
                    for m in container["volumeMounts"]
                    if "secret" in volumes.get(m["name"], {})
                }
                source = {}
                for name, path in credential_files(args).items():
                    secret = secret_at.get(str(path.parent))
                    assert secret in secrets, f"{name}: {path} is in no documented Secret"
                    assert path.name in secrets[secret], f"{name}: {secret} has no {path.name}"
                    source[name] = secrets[secret][path.name]
                    used.add(secret)
                cas |= {source[n] for n in ("ca_file", "client_ca_file") if n in source}
                if kind == "collector":
                    assert {"cert_file", "key_file", "client_ca_file"} <= source.keys()
                else:
                    assert source["cert_file"].name == f"{args.name}.pem"
                    assert source["key_file"].name == f"{args.name}.key"
                    assert source["token_file"] == Path(tokens[(args.name, args.network)])
                    assert hostport(args.collector)[0] in server_names(commands)
        assert len(cas) == 1 and used == set(secrets)


class TestCredentials:
    def test_every_config_parses_with_its_cli(self, yaml: ModuleType, tmp_path: Path) -> None:
        """Each TOML config in deploy/ has just its program's table, and each key in it is an
        option of that program: its own parser reads the file."""
        configs = list(deploy_configs(yaml))
        assert {kind for _, kind, _ in configs} == set(PARSERS)
        for where, kind, text in configs:
            assert list(tomllib.loads(text)) == [TABLES[kind]], where
            parse_config(kind, text, tmp_path)

    def test_collectors_want_tls_and_tokens_and_clients_bring_them(
        self, yaml: ModuleType, tmp_path: Path
    ) -> None:
        """Every collector config has a certificate and key (or insecure = true), as `serve`
        checks at start; every agent and import config a CA file (or insecure) and a token
        file or token; where a deployment's collector wants client certificates, every
        client of that deployment has one."""
        mutual: dict[str, bool] = {}
        clients = []
        for where, kind, text in deploy_configs(yaml):
            args = parse_config(kind, text, tmp_path)
            deployment = where.split("/")[0]
            if kind == "collector":
                err = io.StringIO()
                try:
                    with contextlib.redirect_stderr(err):
                        tls, tokens = server_security(serve_parser(), args)
                except SystemExit:
                    pytest.fail(f"{where}: takedown-collector serve refuses it: {err.getvalue()}")
                assert (tls is not None and tokens) or args.insecure, where
                mutual[deployment] = bool(args.client_ca_file)
            else:
                assert args.ca_file or args.insecure, f"{where}: ca-file or insecure"
                assert args.token_file or args.token, f"{where}: token-file or token"
                if args.insecure:
                    assert not (args.ca_file or args.cert_file or args.key_file), where
                ClientTLS(args.ca_file, args.cert_file, args.key_file)  # cert and key together
                clients.append((deployment, where, args))
        assert set(mutual) == {"systemd", "container", "k8s"}
        for deployment, where, args in clients:
            assert not mutual[deployment] or (args.cert_file and args.key_file), where


PG_COMPOSE = DEPLOY / "container" / "compose.postgresql.yaml"
PG_K8S = K8S / "postgresql"
PG_URI = "postgresql://takedown@postgres:5432/takedown"


def _pg_k8s(yaml: ModuleType) -> list[dict[str, Any]]:
    return [
        doc
        for path in sorted(PG_K8S.glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc
    ]


def _no_password(uri: str) -> None:
    from urllib.parse import urlsplit

    parts = urlsplit(uri)
    assert parts.scheme == "postgresql" and parts.username and parts.password is None, uri


class TestPostgreSQL:
    def test_collector_image_installs_the_postgresql_extra(self) -> None:
        """The collector image can run on --db postgresql:// (psycopg is the extra)."""
        assert re.search(r"pip install \.\[postgresql\]", _containerfile("collector")["RUN"])

    def test_compose_runs_two_collectors_on_one_database(
        self, yaml: ModuleType, tmp_path: Path
    ) -> None:
        """Both collectors parse with --db postgresql:// (no password, no evidence log), wait for
        a healthy postgres, read the password file postgres-password makes; the agents dial a
        name both collectors answer to and the certificate names; files and volumes exist."""
        compose = load_yaml(yaml, PG_COMPOSE)
        services = compose["services"]
        postgres = services["postgres"]
        assert re.fullmatch(r"docker\.io/library/postgres:1[56](\.\d+)?", postgres["image"])
        assert postgres["healthcheck"]["test"][:2] == ["CMD", "pg_isready"]
        password_file = postgres["environment"]["POSTGRES_PASSWORD_FILE"]
        assert dict(_mounts(postgres))[str(Path(password_file).parent)] == "postgres-password"
        assert_references_resolve(compose, PG_COMPOSE)
        collectors = [n for n, s in services.items() if "--db" in s.get("command", [])]
        assert collectors == ["collector-1", "collector-2"]
        aliases = set()
        for name in collectors:
            service = services[name]
            assert service["depends_on"]["postgres"] == {"condition": "service_healthy"}
            files = files_of(service)
            args = parse_config("collector", files[service["command"][1]], tmp_path)
            assert option(service["command"], "--db") == [PG_URI]
            _no_password(PG_URI)
            assert args.log_key_file is None and "--log-key-file" not in service["command"]
            pgpass = Path(service["environment"]["PGPASSFILE"])
            assert dict(_mounts(service))[str(pgpass.parent)] == "postgres-password"
            aliases |= set(service["networks"]["default"]["aliases"])
        init = services["init"]
        assert init["environment"]["COLLECTOR_DB"] == PG_URI
        assert init["depends_on"]["postgres"] == {"condition": "service_healthy"}
        names = set(init["environment"]["COLLECTOR_DNS"].split())
        assert set(collectors) <= names
        agents = [n for n, s in services.items() if "Containerfile.agent" in str(s.get("build"))]
        assert len(agents) == 2
        for name in [*agents, "import"]:
            config = tomllib.loads(files_of(services[name])[next(
                t for t, s in _mounts(services[name]) if isinstance(s, Path)
            )])  # fmt: skip
            host = hostport(next(iter(config.values()))["collector"])[0]
            assert host in aliases and host in names, name
            assert set(services[name]["depends_on"]) >= {"init", *collectors}, name
        scrape = yaml.safe_load(compose["configs"]["prometheus-yml"]["content"])
        jobs = {j["job_name"]: j for j in scrape["scrape_configs"]}
        targets = {t for c in jobs["takedown-collector"]["static_configs"] for t in c["targets"]}
        assert targets == {f"{name}:9464" for name in collectors}

    def test_kubernetes_two_replicas_behind_one_service(
        self, yaml: ModuleType, tmp_path: Path
    ) -> None:
        """The collector Deployment has 2 replicas on PostgreSQL (no password in the URI, no
        evidence log, PGPASSWORD from the documented Secret that postgres also reads), the
        probes, ports and security context of ../collector.yaml, and one gRPC Service selects
        it, the one agents.yaml dials; PostgreSQL is a StatefulSet with a claim template and a
        headless Service."""
        docs = _pg_k8s(yaml)
        assert "Secret" not in {d["kind"] for d in docs}
        assert all(d["metadata"]["namespace"] == "takedown" for d in docs)
        by = {(d["kind"], d["metadata"]["name"]): d for d in docs}
        sqlite = {(d["kind"], d["metadata"]["name"]): d for d in _k8s(yaml)}
        secrets: dict[str, dict[str, Path]] = {}
        for words in documented_commands(*sorted(PG_K8S.glob("*.yaml"))):
            if words[:6] == ["kubectl", "-n", "takedown", "create", "secret", "generic"]:
                pairs = (w.removeprefix("--from-file=").split("=", 1) for w in words[7:])
                secrets[words[6]] = {key: Path(file) for key, file in pairs}
        assert secrets["takedown-collector-tls"] == k8s_secrets()["takedown-collector-tls"]

        deployment = by[("Deployment", "takedown-collector")]
        assert deployment["spec"]["replicas"] == 2
        pod = deployment["spec"]["template"]
        (container,) = pod["spec"]["containers"]
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        configmaps = {d["metadata"]["name"]: d["data"] for d in docs if d["kind"] == "ConfigMap"}
        files = _config_files(container, volumes, configmaps)
        args = parse_args("collector", container["args"], files, tmp_path)
        assert isinstance(args.db, str)
        _no_password(args.db)
        assert args.log_key_file is None
        assert "log-key-file" not in tomllib.loads(files[container["args"][1]])["collector"]
        assert str(args.prefixes) in files
        (env,) = [e for e in container["env"] if e["name"] == "PGPASSWORD"]
        ref = env["valueFrom"]["secretKeyRef"]
        assert ref["key"] in secrets[ref["name"]]
        for path in credential_files(args).values():
            mount = next(m for m in container["volumeMounts"] if m["mountPath"] == str(path.parent))
            secret = volumes[mount["name"]]["secret"]["secretName"]
            assert path.name in secrets[secret]

        reference = sqlite[("StatefulSet", "takedown-collector")]["spec"]["template"]["spec"]
        for key in ("readinessProbe", "livenessProbe", "ports", "securityContext", "command"):
            assert container[key] == reference["containers"][0][key], key
        assert pod["spec"]["securityContext"] == reference["securityContext"]
        ports = {p["containerPort"] for p in container["ports"]}
        assert (
            hostport(args.listen)[1] in ports
            and listen_port(files[container["args"][1]], "collector") in ports
        )
        assert int(pod["metadata"]["annotations"]["prometheus.io/port"]) in ports

        labels = pod["metadata"]["labels"].items()
        selecting = [
            d for d in docs if d["kind"] == "Service" and d["spec"]["selector"].items() <= labels
        ]
        assert [s["metadata"]["name"] for s in selecting] == ["takedown-collector"]
        (service,) = selecting
        assert [p["name"] for p in service["spec"]["ports"]] == ["grpc"]
        assert service["spec"]["ports"][0]["port"] == hostport(args.listen)[1]
        agent_config = sqlite[("ConfigMap", "takedown-agent-config")]["data"]
        for text in agent_config.values():
            host, port = hostport(tomllib.loads(text)["agent"]["collector"])
            assert (
                host.split(".")[0] == "takedown-collector"
                and port == service["spec"]["ports"][0]["port"]
            )

        statefulset = by[("StatefulSet", "takedown-postgresql")]
        headless = by[("Service", statefulset["spec"]["serviceName"])]
        assert headless["spec"]["clusterIP"] == "None"
        template = statefulset["spec"]["template"]
        assert headless["spec"]["selector"].items() <= template["metadata"]["labels"].items()
        claims = {c["metadata"]["name"] for c in statefulset["spec"]["volumeClaimTemplates"]}
        (postgres,) = template["spec"]["containers"]
        assert re.fullmatch(r"docker\.io/library/postgres:1[56](\.\d+)?", postgres["image"])
        assert postgres["readinessProbe"]["exec"]["command"][0] == "pg_isready"
        pg_volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        assert {m["name"] for m in postgres["volumeMounts"]} <= pg_volumes.keys() | claims
        pg_env = {e["name"]: e.get("value") for e in postgres["env"]}
        password = Path(pg_env["POSTGRES_PASSWORD_FILE"])
        mount = next(m for m in postgres["volumeMounts"] if m["mountPath"] == str(password.parent))
        assert pg_volumes[mount["name"]]["secret"]["secretName"] == ref["name"]
        assert password.name == ref["key"]
        host, port = hostport(args.db.removeprefix("postgresql://").split("@")[1].split("/")[0])
        assert host.split(".")[0] == headless["metadata"]["name"]
        assert port in {p["port"] for p in headless["spec"]["ports"]}
        assert urlsplit_path(args.db) == pg_env["POSTGRES_DB"]

    def test_systemd_config_for_hosts_sharing_a_database(self, tmp_path: Path) -> None:
        """The systemd example parses as the unit's collector.toml: a PostgreSQL URI without a
        password, no evidence log, credentials where the unit's LoadCredential= puts them."""
        path = SYSTEMD / "collector-postgresql.toml"
        args = parse_config("collector", path.read_text(), tmp_path)
        assert isinstance(args.db, str)
        _no_password(args.db)
        assert args.log_key_file is None
        loaded = dict(
            v.split(":", 1) for v in _unit(SYSTEMD / "takedown-collector.service")["LoadCredential"]
        )
        for file in credential_files(args).values():
            assert file.parent == Path("/run/credentials/takedown-collector.service")
            assert file.name in loaded


def urlsplit_path(uri: str) -> str:
    from urllib.parse import urlsplit

    return urlsplit(uri).path.lstrip("/")
