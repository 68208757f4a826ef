"""The Prometheus rules and the Grafana dashboard in dashboards/, held to the metric contract
dashboards/metrics.json (the series `gradwatch monitor` exposes on /metrics).

- The rules: `promtool check rules` and `promtool test rules` (promtool comes with Debian's
  `prometheus` package; without it those tests are skipped), plus checks on the YAML itself:
  contract metrics only, thresholds read from ``gradwatch_threshold``, labels and annotations.
- The dashboard: checked statically (Grafana is not packaged here): layout, data sources,
  template variables, and every PromQL expression against the contract. Its expressions are
  also parsed by promtool, as recording rules in a scratch file.

PromQL is not parsed fully here: `_parse_promql` blanks strings, ranges and grouping clauses
and reads metric names and matcher labels from what is left, which is enough for the simple
expressions a rules file and a dashboard hold.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

import pytest
import yaml

from gradwatch.engine.report import VERDICT_RANK, Thresholds
from gradwatch.monitor.config import RULES, StalenessConfig

DASHBOARDS = Path(__file__).resolve().parents[2] / "dashboards"
CONTRACT_FILE = DASHBOARDS / "metrics.json"
RULES_FILE = DASHBOARDS / "prometheus" / "gradwatch-rules.yml"
RULES_TEST_FILE = DASHBOARDS / "prometheus" / "gradwatch-rules.test.yml"
GRAFANA_FILE = DASHBOARDS / "grafana" / "gradwatch.json"

#: Series Prometheus makes itself that the rules may use, with their labels.
PROMETHEUS_SERIES: dict[str, tuple[str, ...]] = {"up": ("job", "instance")}
SEVERITIES = ("critical", "warning", "info")
GRAFANA_COLUMNS = 24
GRAFANA_BUILTIN_VARIABLES = frozenset({"__range", "__rate_interval", "__interval"})
DATASOURCE_VARIABLE = "DS_PROMETHEUS"
DATASOURCE_REF = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
CORE_PANEL_TYPES = frozenset(
    {"row", "stat", "timeseries", "table", "bargauge", "state-timeline", "heatmap", "text"}
)
DISTANCE_METRICS = frozenset(
    {"gradwatch_rel_distance", "gradwatch_layer_rel_distance", "gradwatch_max_layer_rel_distance"}
)
PROMTOOL_TIMEOUT_S = 60


# ---------------------------------------------------------------------------- the contract
@dataclass(frozen=True)
class Contract:
    metrics: dict[str, dict[str, Any]]
    run_labels: tuple[str, ...]
    target_labels: tuple[str, ...]
    scrape_job: str

    def labels_of(self, name: str) -> set[str]:
        """The labels a scraped series of `name` can carry (its own and the target's)."""
        own = self.metrics[name]["labels"] if name in self.metrics else PROMETHEUS_SERIES[name]
        return {*own, *self.target_labels}

    @property
    def all_labels(self) -> set[str]:
        return {label for m in self.metrics.values() for label in m["labels"]} | set(
            self.target_labels)


@pytest.fixture(scope="module")
def contract() -> Contract:
    data = json.loads(CONTRACT_FILE.read_text(encoding="utf-8"))
    return Contract(
        metrics={m["name"]: m for m in data["metrics"]},
        run_labels=tuple(data["run_labels"]),
        target_labels=tuple(data["target_labels"]),
        scrape_job=data["scrape_job"],
    )


def test_contract_is_well_formed() -> None:
    data = json.loads(CONTRACT_FILE.read_text(encoding="utf-8"))
    names = [m["name"] for m in data["metrics"]]
    assert len(names) == len(set(names)), f"duplicate metric names in {CONTRACT_FILE.name}"
    run_labels = set(data["run_labels"])
    for metric in data["metrics"]:
        name = metric["name"]
        assert set(metric) == {"name", "type", "labels", "help"}, name
        assert re.fullmatch(r"gradwatch_[a-z0-9_]+", name), name
        assert metric["type"] in ("gauge", "counter"), name
        assert (metric["type"] == "counter") == name.endswith("_total"), (
            f"{name}: a counter is exposed with _total, a gauge never ends with it")
        assert metric["help"].strip(), f"{name} has no help text"
        labels = metric["labels"]
        assert len(labels) == len(set(labels)), name
        assert not set(labels) & set(data["target_labels"]), (
            f"{name}: job/instance are Prometheus' target labels, not the monitor's")
        if run_labels & set(labels):
            assert run_labels <= set(labels), f"{name} has only some of {sorted(run_labels)}"
    firing = next(m for m in data["metrics"] if m["name"] == "gradwatch_alert_firing")
    assert "rule" in firing["labels"]


# ---------------------------------------------------------------------------- PromQL, roughly
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_SELECTOR = re.compile(r"(?P<name>[A-Za-z_:][A-Za-z0-9_:]*)?\s*\{(?P<body>[^{}]*)\}")
_MATCHER_LABEL = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(
    r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\((?P<labels>[^)]*)\)")
_IDENTIFIER = re.compile(r"(?<![\w$.:])[A-Za-z_:][A-Za-z0-9_:]*")
_NUMBER = re.compile(r"(?<![\w.$:])(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?(?![\w.])")
_VARIABLE = re.compile(r"\$\{?(\w+)")
_KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "inf", "nan"})
_LABEL_REPLACE_TARGET = re.compile(r"label_replace\s*\([^,]*,\s*\"(\w+)\"")


@dataclass
class PromQL:
    """What the checks need to know about one expression."""

    metrics: set[str] = field(default_factory=set)
    #: (metric name or None for a bare {…}, label names its matchers use)
    selectors: list[tuple[str | None, set[str]]] = field(default_factory=list)
    grouping_labels: set[str] = field(default_factory=set)
    created_labels: set[str] = field(default_factory=set)
    numbers: list[float] = field(default_factory=list)
    variables: set[str] = field(default_factory=set)


def _parse_promql(expr: str) -> PromQL:
    parsed = PromQL(variables=set(_VARIABLE.findall(expr)),
                    created_labels=set(_LABEL_REPLACE_TARGET.findall(expr)))
    text = _STRING.sub('""', expr)
    for match in _SELECTOR.finditer(text):
        name = match["name"]
        labels = set(_MATCHER_LABEL.findall(match["body"]))
        if name in _KEYWORDS:
            name = None
        parsed.selectors.append((name, labels))
    text = _SELECTOR.sub(lambda m: f" {m['name'] or ''} ", text)
    text = _RANGE.sub(" ", text)
    for match in _GROUPING.finditer(text):
        parsed.grouping_labels |= {s.strip() for s in match["labels"].split(",") if s.strip()}
    text = _GROUPING.sub(" ", text)
    parsed.numbers = [float(n) for n in _NUMBER.findall(text)]
    for match in _IDENTIFIER.finditer(text):
        rest = text[match.end():].lstrip()
        word = match.group()
        if rest.startswith("(") or word.lower() in _KEYWORDS:
            continue  # a function or an operator keyword
        parsed.metrics.add(word)
    return parsed


@pytest.mark.parametrize(
    ("expr", "metrics", "labels"),
    [
        ('rate(foo_total{a="x", b=~"$v"}[5m]) > 0.5', {"foo_total"}, {"a", "b"}),
        ("max without (part) (a:b < +Inf or c) unless d == 3", {"a:b", "c", "d"}, set()),
        ('x >= on (job, instance) group_left () y{level="alert"}', {"x", "y"}, {"level"}),
        ("increase(e_total[$__range]) offset 1h", {"e_total"}, set()),
        ('absent(up{job="m"}) or label_replace(f, "p", "o", "", "")', {"up", "f"}, {"job"}),
    ],
)
def test_promql_reader(expr: str, metrics: set[str], labels: set[str]) -> None:
    parsed = _parse_promql(expr)
    assert parsed.metrics == metrics
    assert set().union(*(ls for _, ls in parsed.selectors)) == labels


def _check_expression(expr: str, contract: Contract, *, allowed: set[str]) -> PromQL:
    """Assert `expr` uses only `allowed` metrics, and labels those metrics have."""
    parsed = _parse_promql(expr)
    unknown = parsed.metrics - allowed
    assert not unknown, (f"{sorted(unknown)} in {expr!r} are not in {CONTRACT_FILE.name}; "
                         f"known: {sorted(allowed)}")
    for name, labels in parsed.selectors:
        known = contract.labels_of(name) if name in contract.metrics or (
            name in PROMETHEUS_SERIES) else contract.all_labels
        assert labels <= known, f"{name} in {expr!r} has no label {sorted(labels - known)}"
    known_grouping = contract.all_labels | parsed.created_labels
    assert parsed.grouping_labels <= known_grouping, (
        f"{expr!r} groups by unknown labels {sorted(parsed.grouping_labels - known_grouping)}")
    return parsed


# ---------------------------------------------------------------------------- the rules
def _rules() -> list[dict[str, Any]]:
    data = yaml.safe_load(RULES_FILE.read_text(encoding="utf-8"))
    return [rule for group in data["groups"] for rule in group["rules"]]


def _alerts() -> list[dict[str, Any]]:
    return [rule for rule in _rules() if "alert" in rule]


def _recorded() -> dict[str, str]:
    return {rule["record"]: rule["expr"] for rule in _rules() if "record" in rule}


def _expanded(expr: str) -> str:
    """`expr` followed by the expressions of the recording rules it uses (one level)."""
    used = _parse_promql(expr).metrics
    return "\n".join([expr, *(e for name, e in _recorded().items() if name in used)])


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool not found: install Debian's `prometheus` package "
                    "(apt-get install prometheus) to check and test the Prometheus rules")
    return path


def _run_promtool(*args: str, cwd: Path) -> None:
    result = subprocess.run([_promtool(), *args], cwd=cwd, capture_output=True, text=True,
                            timeout=PROMTOOL_TIMEOUT_S, check=False)
    assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}{result.stderr}"


def test_promtool_check_rules() -> None:
    _run_promtool("check", "rules", RULES_FILE.name, cwd=RULES_FILE.parent)


def test_promtool_test_rules() -> None:
    _run_promtool("test", "rules", RULES_TEST_FILE.name, cwd=RULES_TEST_FILE.parent)


def test_rules_use_only_contract_metrics(contract: Contract) -> None:
    allowed = set(contract.metrics) | set(PROMETHEUS_SERIES) | set(_recorded())
    for rule in _rules():
        _check_expression(rule["expr"], contract, allowed=allowed)
    for name in _recorded():
        assert re.fullmatch(r"gradwatch:[a-z0-9_]+", name), (
            f"recording rule {name!r}: name it gradwatch:<what>, apart from the contract's")


def test_alerts_have_severity_summary_and_description() -> None:
    alerts = _alerts()
    names = [alert["alert"] for alert in alerts]
    assert len(names) == len(set(names)), "duplicate alert names"
    for alert in alerts:
        name = alert["alert"]
        assert re.fullmatch(r"Gradwatch[A-Z][A-Za-z]+", name), name
        assert alert.get("labels", {}).get("severity") in SEVERITIES, (
            f"{name}: labels.severity must be one of {SEVERITIES}")
        annotations = alert.get("annotations", {})
        for key in ("summary", "description"):
            assert str(annotations.get(key, "")).strip(), f"{name} has no {key} annotation"


def test_run_alerts_name_the_run_and_the_monitor_rule(contract: Contract) -> None:
    """Every alert about a run names it, and carries the monitor's rule name as `rule`."""
    covered = set()
    for alert in _alerts():
        name = alert["alert"]
        metrics = _parse_promql(_expanded(alert["expr"])).metrics
        about_runs = any(set(contract.run_labels) <= contract.labels_of(m)
                         for m in metrics if m in contract.metrics)
        if not about_runs:
            assert "rule" not in alert["labels"], f"{name} is not about a run"
            continue
        assert alert["labels"].get("rule") in RULES, f"{name}: labels.rule must be in {RULES}"
        covered.add(alert["labels"]["rule"])
        description = alert["annotations"]["description"]
        for label in ("run_name", "run_id"):
            assert f"$labels.{label}" in description, f"{name}'s description lacks {label}"
    assert covered == set(RULES), f"no Prometheus alert mirrors {sorted(set(RULES) - covered)}"


def test_annotations_use_labels_the_alert_has(contract: Contract) -> None:
    for alert in _alerts():
        metrics = _parse_promql(_expanded(alert["expr"])).metrics
        available = set().union(*(contract.labels_of(m) for m in metrics
                                  if m in contract.metrics or m in PROMETHEUS_SERIES))
        for text in alert["annotations"].values():
            used = set(re.findall(r"\$labels\.(\w+)", text))
            assert used <= available, (
                f"{alert['alert']} templates {sorted(used - available)}, which its series lack")


def test_thresholds_come_from_the_monitor(contract: Contract) -> None:
    """No distance threshold or staleness multiple is written into the rules: they are read
    from gradwatch_threshold and gradwatch_stale_multiple, as the monitor exposes them."""
    defaults = Thresholds()
    for rule in _rules():
        numbers = _parse_promql(rule["expr"]).numbers
        fractions = [n for n in numbers if 0 < n < 1]
        assert not fractions, f"{rule.get('alert') or rule.get('record')}: literal {fractions}"
        assert defaults.warn not in numbers and defaults.alert not in numbers
    distance = [a for a in _alerts() if a["labels"].get("rule") == "distance"]
    assert {a["alert"] for a in distance} >= {"GradwatchDistanceAlert", "GradwatchDistanceWarn"}
    for alert in distance:
        expr = _expanded(alert["expr"])
        assert re.search(r'gradwatch_threshold\{level="alert"\}', expr), alert["alert"]
    warn = next(a for a in distance if a["alert"] == "GradwatchDistanceWarn")
    assert 'gradwatch_threshold{level="warn"}' in warn["expr"]
    stale = [a for a in _alerts() if a["labels"].get("rule") == "stale"]
    assert stale
    for alert in stale:
        parsed = _parse_promql(alert["expr"])
        assert {"gradwatch_stale_multiple", "gradwatch_expected_check_interval_seconds",
                "gradwatch_run_running"} <= parsed.metrics
        assert StalenessConfig().multiple not in parsed.numbers, "multiple written in"
    for rule in _rules():
        for code in re.findall(r"gradwatch_check_verdict\s*==\s*(\d+)", rule["expr"]):
            assert int(code) == VERDICT_RANK["error"], "verdict codes: 0 ok … 3 error"


def test_monitor_down_names_the_scrape_job(contract: Contract) -> None:
    down = next(a for a in _alerts() if a["alert"] == "GradwatchMonitorDown")
    assert f'up{{job="{contract.scrape_job}"}}' in down["expr"]
    assert "absent(" in down["expr"]


def test_every_alert_is_tested_firing_and_silent() -> None:
    data = yaml.safe_load(RULES_TEST_FILE.read_text(encoding="utf-8"))
    assert data["rule_files"] == [RULES_FILE.name]
    firing: set[str] = set()
    silent: set[str] = set()
    for case in data["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else silent).add(check["alertname"])
    names = {alert["alert"] for alert in _alerts()}
    assert names - firing == set(), f"never tested firing: {sorted(names - firing)}"
    assert names - silent == set(), f"never tested silent: {sorted(names - silent)}"
    unknown = (firing | silent) - names
    assert not unknown, f"tests of alerts that do not exist: {sorted(unknown)}"


# ---------------------------------------------------------------------------- the dashboard
@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(GRAFANA_FILE.read_text(encoding="utf-8"))
    return data


def _panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # a collapsed row keeps its panels inside


def _exprs(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    for panel in _panels(dashboard):
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"]


def _variables(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    variables: list[dict[str, Any]] = dashboard["templating"]["list"]
    return variables


def _walk(node: Any, key: str) -> Iterator[Any]:
    """Every value stored under `key`, anywhere in `node`."""
    if isinstance(node, dict):
        for k, value in node.items():
            if k == key:
                yield value
            yield from _walk(value, key)
    elif isinstance(node, list):
        for item in node:
            yield from _walk(item, key)


def test_dashboard_basics(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == "gradwatch"
    assert dashboard["title"]
    assert dashboard["schemaVersion"] >= 36, "Grafana 9+ dashboards (schemaVersion ≥ 36)"
    assert "id" not in dashboard or dashboard["id"] is None, "an exported id breaks imports"
    types = {panel["type"] for panel in _panels(dashboard)}
    assert types <= CORE_PANEL_TYPES, f"plugin panels need installing: {types - CORE_PANEL_TYPES}"
    required = {r["id"] for r in dashboard.get("__requires", []) if r["type"] == "panel"}
    assert types - {"row"} <= required, "__requires lists the panels the dashboard uses"


def test_panel_ids_are_unique(dashboard: dict[str, Any]) -> None:
    ids = [panel["id"] for panel in _panels(dashboard)]
    assert all(isinstance(i, int) for i in ids)
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    assert not duplicates, f"panel ids used twice: {duplicates}"


def test_panels_fit_the_grid_without_overlapping(dashboard: dict[str, Any]) -> None:
    boxes = []
    for panel in dashboard["panels"]:  # nested panels of collapsed rows are laid out apart
        pos = panel["gridPos"]
        x, y, w, h = pos["x"], pos["y"], pos["w"], pos["h"]
        assert all(isinstance(v, int) for v in (x, y, w, h)), panel["title"]
        assert x >= 0 and y >= 0 and w >= 1 and h >= 1, panel["title"]
        assert x + w <= GRAFANA_COLUMNS, f"{panel['title']} is wider than {GRAFANA_COLUMNS}"
        boxes.append((panel["title"], x, y, w, h))
    for (a, ax, ay, aw, ah), (b, bx, by, bw, bh) in combinations(boxes, 2):
        apart = ax + aw <= bx or bx + bw <= ax or ay + ah <= by or by + bh <= ay
        assert apart, f"panels {a!r} and {b!r} overlap"


def test_datasources_use_the_template_variable(dashboard: dict[str, Any]) -> None:
    variable = next(v for v in _variables(dashboard) if v["name"] == DATASOURCE_VARIABLE)
    assert variable["type"] == "datasource" and variable["query"] == "prometheus"
    references = list(_walk(dashboard, "datasource"))
    assert references
    for reference in references:
        assert reference == DATASOURCE_REF, f"datasource {reference!r} is not the variable"
    for panel in _panels(dashboard):
        if panel["type"] != "row":
            assert panel.get("datasource") == DATASOURCE_REF, panel["title"]
            assert panel["targets"], f"{panel['title']} has no query"
            for target in panel["targets"]:
                assert target.get("datasource") == DATASOURCE_REF, panel["title"]


def test_dashboard_queries_use_only_contract_metrics(
    dashboard: dict[str, Any], contract: Contract
) -> None:
    """Contract metrics only (no recording rules: the dashboard works without the rules)."""
    defined = {v["name"] for v in _variables(dashboard)} | GRAFANA_BUILTIN_VARIABLES
    exprs = list(_exprs(dashboard))
    assert exprs
    for title, expr in exprs:
        parsed = _check_expression(expr, contract, allowed=set(contract.metrics))
        assert parsed.variables <= defined, f"{title}: undefined {parsed.variables - defined}"


def test_template_variables_query_existing_labels(
    dashboard: dict[str, Any], contract: Contract
) -> None:
    defined: set[str] = set(GRAFANA_BUILTIN_VARIABLES)
    for variable in _variables(dashboard):
        if variable["type"] == "query":
            query = variable["query"]["query"]
            assert variable["definition"] == query, variable["name"]
            match = re.fullmatch(r"label_values\((?P<selector>.+),\s*(?P<label>\w+)\)", query)
            assert match, f"{variable['name']}: expected label_values(metric, label)"
            parsed = _check_expression(match["selector"], contract,
                                       allowed=set(contract.metrics))
            (metric,) = parsed.metrics
            assert match["label"] in contract.labels_of(metric), (
                f"{variable['name']}: {metric} has no label {match['label']}")
            assert parsed.variables <= defined, (
                f"{variable['name']} uses a variable defined after it: "
                f"{parsed.variables - defined}")
        defined.add(variable["name"])
    names = {v["name"] for v in _variables(dashboard)}
    assert {"experiment_id", "run_name"} <= names


def test_distance_panels_show_the_thresholds_on_a_log_scale(dashboard: dict[str, Any]) -> None:
    defaults = Thresholds()
    found = 0
    for panel in _panels(dashboard):
        exprs = [t["expr"] for t in panel.get("targets", [])]
        if panel["type"] != "timeseries" or not any(
                _parse_promql(e).metrics & DISTANCE_METRICS for e in exprs):
            continue
        found += 1
        config = panel["fieldConfig"]["defaults"]
        assert config["custom"]["scaleDistribution"] == {"type": "log", "log": 10}
        steps = [s["value"] for s in config["thresholds"]["steps"][1:]]
        assert steps == [defaults.warn, defaults.alert], panel["title"]
        assert config["custom"]["thresholdsStyle"]["mode"] != "off", panel["title"]
    assert found >= 2


def test_verdict_mappings_match_the_verdict_codes(dashboard: dict[str, Any]) -> None:
    mappings = [m for ms in _walk(dashboard, "mappings") for m in ms
                if m.get("type") == "value" and "3" in m["options"]]
    assert mappings
    for mapping in mappings:
        texts = {int(code): option["text"] for code, option in mapping["options"].items()}
        assert texts == {code: name for name, code in VERDICT_RANK.items()}


def test_dashboard_queries_parse_as_promql(dashboard: dict[str, Any], tmp_path: Path) -> None:
    """promtool parses each query (variables filled in) as a recording rule."""
    promtool = _promtool()
    queries = [expr for _, expr in _exprs(dashboard)]
    queries += [re.sub(r"^label_values\((.+),\s*\w+\)$", r"\1", v["query"]["query"])
                for v in _variables(dashboard) if v["type"] == "query"]
    filled = [re.sub(r"\[\$__\w+\]", "[1h]", q).replace("$", "") for q in queries]
    rules = {"groups": [{"name": "grafana", "rules": [
        {"record": f"gradwatch:query_{i}", "expr": q} for i, q in enumerate(filled)]}]}
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump(rules), encoding="utf-8")
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True,
                            text=True, timeout=PROMTOOL_TIMEOUT_S, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------------------- the README
def test_readme_lists_every_metric_and_alert(contract: Contract) -> None:
    readme = (DASHBOARDS / "README.md").read_text(encoding="utf-8")
    rows = set(re.findall(r"^\| `(\w+)` \| (gauge|counter) \|", readme, flags=re.MULTILINE))
    assert rows == {(name, m["type"]) for name, m in contract.metrics.items()}, (
        "the README's metric table and metrics.json differ")
    listed = set(re.findall(r"^\| `(Gradwatch\w+)` \|", readme, flags=re.MULTILINE))
    assert listed == {alert["alert"] for alert in _alerts()}, "the README's alert table differs"
