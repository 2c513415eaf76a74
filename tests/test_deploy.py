"""deploy/: Prometheus rules (promtool), the Grafana dashboard, the Kubernetes DaemonSet.

Metric names in the rules and the dashboard are checked against what a real daemon serves
(the session's `hopwatch run`), so a renamed metric breaks this test, not a 3 a.m. page.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import tomllib

from hopwatch.config import parse_config, split_host_port
from tests.helpers import REPO, Daemon

DEPLOY = REPO / "deploy"
RULES = DEPLOY / "prometheus" / "hopwatch.rules.yml"
RULE_TESTS = DEPLOY / "prometheus" / "tests.yml"
DASHBOARD = DEPLOY / "grafana" / "hopwatch.json"
DAEMONSET = DEPLOY / "kubernetes" / "hopwatch-daemonset.yaml"
SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's python3-yaml (scripts/setup-system.sh)
# Metrics Prometheus itself adds to every target.
PROMETHEUS_BUILTIN = {"up"}


def load_yaml(path: Path) -> list[Any]:
    """All documents of a YAML file, parsed by PyYAML from the distro's python3-yaml (the
    venv does not depend on PyYAML)."""
    res = subprocess.run(
        [
            SYSTEM_PYTHON,
            "-c",
            "import json, sys, yaml;"
            " print(json.dumps(list(yaml.safe_load_all(open(sys.argv[1])))))",
            str(path),
        ],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    docs: list[Any] = json.loads(res.stdout)
    return docs


def promtool(*args: str, cwd: Path | None = None) -> str:
    res = subprocess.run(["promtool", *args], capture_output=True, text=True, cwd=cwd)
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout


def exported_names(daemon: Daemon) -> set[str]:
    """Every metric family the daemon declares (# TYPE), with and without samples."""
    import urllib.request

    with urllib.request.urlopen(f"http://{daemon.addr}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return {m.group(1) for m in re.finditer(r"^# TYPE (\S+) \S+$", text, re.M)}


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (identifiers not followed by a paren and
    not inside a label matcher or string)."""
    no_strings = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    no_matchers = re.sub(r"\{[^}]*\}", "{}", no_strings)
    no_matchers = re.sub(
        r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", no_matchers
    )
    keywords = {
        "sum", "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or",
        "unless", "bool", "rate", "increase", "absent", "count", "max", "min", "avg",
        "vector", "label_replace", "offset",
    }  # fmt: skip
    names = set()
    for m in re.finditer(r"(?<![\w:$.\[])([a-zA-Z_:][\w:]*)(?![\w(:])", no_matchers):
        name = m.group(1)
        after = no_matchers[m.end() :].lstrip()
        if name in keywords or after.startswith("("):
            continue
        if re.fullmatch(r"\d+[smhdwy]?", name) or name.startswith("__"):
            continue
        names.add(name)
    return names


def test_metric_names_helper() -> None:
    expr = (
        'sum by (node, process) (rate(hopwatch_findings_total{finding="x"}[10m])) / '
        "sum by (node) (rate(hopwatch_http_messages_total[$__rate_interval])) and on (service) "
        "(hopwatch:cross_node_stripped_edges:rate5m > 0) or up == 0"
    )
    assert metric_names(expr) == {
        "hopwatch_findings_total",
        "hopwatch_http_messages_total",
        "hopwatch:cross_node_stripped_edges:rate5m",
        "up",
    }


# --- Prometheus rules ------------------------------------------------------------------
def rules() -> list[dict[str, Any]]:
    (doc,) = load_yaml(RULES)
    return [r for g in doc["groups"] for r in g["rules"]]


def test_promtool_check_rules() -> None:
    out = promtool("check", "rules", str(RULES))
    assert "SUCCESS" in out


def test_promtool_test_rules() -> None:
    out = promtool("test", "rules", RULE_TESTS.name, cwd=RULE_TESTS.parent)
    assert "SUCCESS" in out


def test_every_alert_has_a_test_case() -> None:
    alerts = {r["alert"] for r in rules() if "alert" in r}
    assert {
        "HopwatchStrippingHop",
        "HopwatchTraceContextLeak",
        "HopwatchMalformedRateHigh",
        "HopwatchEventsLost",
        "HopwatchDown",
        "HopwatchAbsent",
        "HopwatchCaptureDetached",
    } <= alerts
    (tests,) = load_yaml(RULE_TESTS)
    tested = {
        case["alertname"]
        for t in tests["tests"]
        for case in t.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert alerts == tested, f"alerts without a firing test case: {alerts - tested}"
    records = {r["record"] for r in rules() if "record" in r}
    tested_records = {
        m
        for t in tests["tests"]
        for case in t.get("promql_expr_test", [])
        for m in metric_names(case["expr"])
    }
    assert records <= tested_records


@pytest.mark.kernel
def test_rules_use_metrics_the_daemon_exports(daemon: Daemon) -> None:
    exported = exported_names(daemon)
    records = {r["record"] for r in rules() if "record" in r}
    for rule in rules():
        unknown = metric_names(rule["expr"]) - exported - records - PROMETHEUS_BUILTIN
        assert not unknown, f"{rule.get('alert') or rule.get('record')}: {unknown}"


# --- Grafana dashboard -----------------------------------------------------------------
def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def panels() -> list[dict[str, Any]]:
    out = []
    for p in dashboard()["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def grafana_to_promql(expr: str) -> str:
    """Grafana's variables and macros replaced by values Prometheus accepts."""
    expr = expr.replace("$__rate_interval", "5m").replace("$__range", "6h")
    expr = expr.replace("$__interval", "1m")
    return re.sub(r"\$\{?(\w+)\}?", ".*", expr)


def test_dashboard_structure() -> None:
    d = dashboard()
    assert d["uid"] and d["title"] and d["schemaVersion"] >= 30
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in panels()]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    titles = " ".join(p["title"] for p in panels()).lower()
    for wanted in ("hop table", "findings over time", "formats per service", "events lost"):
        assert wanted in titles
    for p in panels():
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}", p["title"]
            assert t["expr"].strip(), p["title"]
        grid = p["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, p["title"]
    for v in variables.values():
        if v["type"] == "query":
            assert v["datasource"]["uid"] == "${datasource}"


def dashboard_exprs() -> list[tuple[str, str]]:
    out = [(p["title"], t["expr"]) for p in panels() for t in p.get("targets", [])]
    for v in dashboard()["templating"]["list"]:
        if v["type"] == "query":
            query = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            m = re.fullmatch(r"label_values\((.+), \w+\)", query)
            assert m, query
            out.append((f"variable {v['name']}", m.group(1)))
    return out


def test_dashboard_promql_parses(tmp_path: Path) -> None:
    """Every expression, macros substituted, is valid PromQL to promtool (as recording
    rules in a scratch rules file)."""
    lines = ["groups:", "  - name: dashboard", "    rules:"]
    for i, (_title, expr) in enumerate(dashboard_exprs()):
        lines.append(f"      - record: dashboard:expr{i}")
        lines.append(f"        expr: {json.dumps(grafana_to_promql(expr))}")
    scratch = tmp_path / "dashboard.rules.yml"
    scratch.write_text("\n".join(lines) + "\n")
    promtool("check", "rules", str(scratch))


@pytest.mark.kernel
def test_dashboard_uses_metrics_the_daemon_exports(daemon: Daemon) -> None:
    exported = exported_names(daemon)
    records = {r["record"] for r in rules() if "record" in r}
    for title, expr in dashboard_exprs():
        unknown = metric_names(grafana_to_promql(expr)) - exported - records - PROMETHEUS_BUILTIN
        assert not unknown, f"panel {title!r}: {unknown} (daemon exports {sorted(exported)})"


# --- Kubernetes DaemonSet --------------------------------------------------------------
def k8s() -> dict[str, dict[str, Any]]:
    return {d["kind"]: d for d in load_yaml(DAEMONSET)}


def test_daemonset_essentials() -> None:
    objs = k8s()
    assert set(objs) == {"Namespace", "ServiceAccount", "ConfigMap", "DaemonSet"}
    ds = objs["DaemonSet"]
    assert ds["apiVersion"] == "apps/v1"
    spec = ds["spec"]["template"]["spec"]
    meta = ds["spec"]["template"]["metadata"]
    assert ds["spec"]["selector"]["matchLabels"].items() <= meta["labels"].items()
    assert spec["hostPID"] is True
    assert spec["hostNetwork"] is False
    assert {"operator": "Exists"} in spec["tolerations"]
    (c,) = spec["containers"]
    sc = c["securityContext"]
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert set(sc["capabilities"]["add"]) == {"BPF", "PERFMON", "SYS_PTRACE"}
    assert sc["privileged"] is False and sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["seccompProfile"]["type"] == "Unconfined"
    assert c["resources"]["limits"]["memory"] and c["resources"]["limits"]["cpu"]
    assert c["resources"]["requests"]["memory"] and c["resources"]["requests"]["cpu"]

    # Host paths: tracefs, debugfs, headers (all read-only), audit log writable.
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    host = {
        m["mountPath"]: volumes[m["name"]]["hostPath"]["path"]
        for m in c["volumeMounts"]
        if "hostPath" in volumes[m["name"]]
    }
    for path in (
        "/sys/kernel/tracing",
        "/sys/kernel/debug",
        "/lib/modules",
        "/usr/src",
        "/var/lib/hopwatch/headers",
    ):
        assert host.get(path) == path, path
        assert mounts[path].get("readOnly") is True, path
    assert host["/var/log/hopwatch"] == "/var/log/hopwatch"
    assert not mounts["/var/log/hopwatch"].get("readOnly")

    # The command reads the ConfigMap; the metrics port, the probes and the scrape
    # annotations all agree with the address the config serves.
    argv = c["command"] + c["args"]
    assert argv[1:3] == ["run", "--config"]
    config_path = Path(argv[3])
    assert (
        volumes[mounts[str(config_path.parent)]["name"]]["configMap"]["name"]
        == (objs["ConfigMap"]["metadata"]["name"])
    )
    text = objs["ConfigMap"]["data"][config_path.name]
    config = parse_config(text, source="configmap")
    host_addr, port = split_host_port(config.metrics_addr)
    assert host_addr == "0.0.0.0"
    (container_port,) = c["ports"]
    assert container_port["containerPort"] == port and container_port["name"] == "metrics"
    ann = meta["annotations"]
    assert ann["prometheus.io/scrape"] == "true"
    assert ann["prometheus.io/port"] == str(port)
    assert ann["prometheus.io/path"] == "/metrics"
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"] == {"path": "/metrics", "port": "metrics"}
    assert objs["ConfigMap"]["metadata"]["namespace"] == ds["metadata"]["namespace"]


def test_daemonset_config_is_the_default_config_but_the_address() -> None:
    text = k8s()["ConfigMap"]["data"]["config.toml"]
    default = (REPO / "systemd" / "config.toml").read_text()
    assert tomllib.loads(text) == {**tomllib.loads(default), "metrics": {"addr": "0.0.0.0:9647"}}
    strip = [ln for ln in text.splitlines() if not ln.startswith("addr = ")]
    assert strip == [ln for ln in default.splitlines() if ln != '# addr = "127.0.0.1:9647"']


def test_daemonset_capabilities_match_the_unit() -> None:
    """The pod runs as uid 0, so it needs the unit's set minus DAC_READ_SEARCH (which the
    unit needs only because it runs as the hopwatch user)."""
    from tests.test_systemd import UNIT, parse_unit, words

    unit_caps = {c.removeprefix("CAP_") for c in words(parse_unit(UNIT), "CapabilityBoundingSet")}
    (c,) = k8s()["DaemonSet"]["spec"]["template"]["spec"]["containers"]
    assert set(c["capabilities"]["add"] if "capabilities" in c else []) | set(
        c["securityContext"]["capabilities"]["add"]
    ) == unit_caps - {"DAC_READ_SEARCH"}
