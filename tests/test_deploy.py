"""The deployment files under deploy/: checked by their own tools and against each other.

Prometheus rules and config (promtool), Alertmanager routing (amtool), the Grafana
dashboard, systemd units (systemd-analyze), container and Kubernetes manifests. Every
configuration is parsed with our own command-line parsers, every cross-reference (file,
port, ConfigMap, Secret, volume, Service) must resolve, and every metric a rule or panel
uses must be one the collector exports or one announced for the agents.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import aiohttp
import configargparse
import pytest

from agent.cli import build_parser
from collector.cli import serve_parser
from collector.server import Collector

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
    parser = build_parser() if kind == "agent" else serve_parser()
    path = tmp_path / f"{kind}-{abs(hash(text))}.toml"
    path.write_text(text)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return parser.parse_args(["--config", str(path)])
    except SystemExit:
        pytest.fail(f"takedown-{kind} rejects its config:\n{text}\n{err.getvalue()}")


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


def _mounts(service: dict[str, Any]) -> Iterator[tuple[str, Path | str]]:
    """(container path, host path or volume name) of a compose service's volumes."""
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        yield target, (COMPOSE.parent / source).resolve() if source.startswith(".") else source


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
        for name, service in compose["services"].items():
            if "build" in service:
                context = (COMPOSE.parent / service["build"]["context"]).resolve()
                assert (context / service["build"]["dockerfile"]).is_file(), name
            for _, source in _mounts(service):
                if isinstance(source, Path):
                    assert source.exists(), f"{name}: {source}"
                else:
                    assert source in compose["volumes"], f"{name}: volume {source}"

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


def files_of(service: dict[str, Any]) -> dict[str, str]:
    return {t: s.read_text() for t, s in _mounts(service) if isinstance(s, Path) and s.is_file()}


def _k8s(yaml: ModuleType) -> list[dict[str, Any]]:
    return [
        doc
        for path in sorted(K8S.glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc
    ]


def _pods(docs: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(workload, pod template) of every StatefulSet and Deployment."""
    for doc in docs:
        if doc["kind"] in {"StatefulSet", "Deployment"}:
            yield doc, doc["spec"]["template"]


class TestKubernetes:
    def test_manifests_parse_with_names(self, yaml: ModuleType) -> None:
        """Every document has an apiVersion, a kind and a name in the takedown namespace."""
        docs = _k8s(yaml)
        kinds = {d["kind"] for d in docs}
        assert {"StatefulSet", "Deployment", "Service", "ConfigMap", "Secret"} <= kinds
        for doc in docs:
            assert doc["apiVersion"] and doc["metadata"]["name"]
            assert doc["kind"] == "Namespace" or doc["metadata"]["namespace"] == "takedown"

    def test_references_resolve(self, yaml: ModuleType) -> None:
        """ConfigMaps, Secrets, claims, Services and named ports referenced all exist."""
        docs = _k8s(yaml)
        names = {(d["kind"], d["metadata"]["name"]) for d in docs}
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
                files = {}
                for mount in container["volumeMounts"]:
                    source = volumes.get(mount["name"], {}).get("configMap")
                    for key, text in configmaps.get(source["name"] if source else "", {}).items():
                        files[f"{mount['mountPath']}/{key}"] = text
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
