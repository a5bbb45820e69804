"""The Helm chart and the Kustomize injector example, offline.

No cluster: the venv's helm (`make helm` installs the pinned release) lints
and renders the chart for the oldest and newest Kubernetes it supports, with
default values and with every optional part on; kubernetes-validate checks
every built-in object strictly; the rendered objects are then held to the
deployment contract (hardening, the webhook's scope, TLS wiring, RBAC by
name), and the chart is kept in step with the CLI, the Kustomize examples and
manifests/monitoring. Custom resources (cert-manager, prometheus-operator)
have no schema here: they are listed and skipped explicitly. The injector's
TLS (generated, kept on upgrade, cert-manager) is in tests/deploy/test_chart_tls.py.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.support.chart import (
    CHART,
    DEFAULTS,
    INJECTOR_EXAMPLE,
    KUBE_VERSIONS,
    NAMESPACE,
    OPT_IN_LABEL,
    RELEASE,
    Obj,
    flags,
    helm,
    injector_container,
    injector_help,
    kustomize,
    render,
    the,
    webhook_problems,
)
from tests.support.manifests import (
    EXAMPLES,
    MANIFESTS,
    REFRESHER_IMAGE,
    containers,
    hardening_violations,
    is_refresher,
    pod_specs,
    project_version,
)

CRD_KINDS = frozenset(
    {
        ("cert-manager.io/v1", "Issuer"),
        ("cert-manager.io/v1", "Certificate"),
        ("monitoring.coreos.com/v1", "PodMonitor"),
        ("monitoring.coreos.com/v1", "PrometheusRule"),
    }
)
EVERYTHING_ON = (
    "writer.enabled=true",
    "monitoring.podMonitors=true",
    "monitoring.prometheusRule=true",
    "monitoring.dashboard=true",
)
VALUE_SETS = {
    "defaults": DEFAULTS,
    "everything-on": EVERYTHING_ON,
    "everything-on-cert-manager": (*EVERYTHING_ON, "certManager.enabled=true"),
}


def _validation_problems(objects: list[Obj], kube_version: str) -> tuple[list[str], set[Any]]:
    problems, skipped = [], set()
    for obj in objects:
        if (obj["apiVersion"], obj["kind"]) in CRD_KINDS:
            skipped.add((obj["apiVersion"], obj["kind"]))
            continue
        try:
            kubernetes_validate.validate(obj, kube_version, strict=True)
        except kubernetes_validate.ValidationError as error:
            problems.append(f"{obj['kind']}/{obj['metadata']['name']}: {error.message}")
        except kubernetes_validate.SchemaNotFoundError:
            problems.append(f"{obj['kind']}/{obj['metadata']['name']}: no schema and not a CRD")
    return problems, skipped


# --- lint and render --------------------------------------------------------------


@pytest.mark.parametrize("values", list(VALUE_SETS), ids=str)
def test_helm_lint_strict(values: str) -> None:
    """`helm lint --strict` passes with default values and with every optional part on."""
    args = ["lint", "--strict", str(CHART), "--namespace", NAMESPACE]
    for setting in VALUE_SETS[values]:
        args += ["--set", setting]
    result = helm(*args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[WARNING]" not in result.stdout and "[ERROR]" not in result.stdout, result.stdout


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("values", list(VALUE_SETS), ids=str)
def test_every_builtin_object_validates_strictly(values: str, kube_version: str) -> None:
    """Every object the chart renders passes kubernetes-validate --strict; CRDs are listed."""
    objects = render(VALUE_SETS[values], kube_version)
    problems, skipped = _validation_problems(objects, kube_version)
    assert not problems, "\n".join(problems)
    kinds = {obj["kind"] for obj in objects}
    if values == "defaults":
        # The default install is the injector and nothing else.
        assert kinds == {
            "Deployment",
            "PodDisruptionBudget",
            "Service",
            "ServiceAccount",
            "Secret",
            "MutatingWebhookConfiguration",
        }
        assert not skipped
    else:
        assert {"Role", "RoleBinding", "ConfigMap"} <= kinds
        assert {k for _, k in skipped} >= {"PodMonitor", "PrometheusRule"}


def test_older_kubernetes_is_refused() -> None:
    """Kubernetes 1.28 (no native sidecars by default) is refused by the chart's kubeVersion."""
    result = helm("template", RELEASE, str(CHART), "--kube-version", "1.28.9")
    assert result.returncode != 0
    assert "kubeVersion" in result.stderr or "incompatible" in result.stderr, result.stderr


def test_notes_show_how_to_opt_a_pod_in() -> None:
    """NOTES.txt, as `helm install` prints it, names the opt-in label and the Secret annotation."""
    result = helm("install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--dry-run=client")
    assert result.returncode == 0, result.stderr
    notes = result.stdout.split("NOTES:", 1)[1]
    assert f'{OPT_IN_LABEL}: "true"' in notes
    assert "ims-token-refresher.io/credentials-secret:" in notes


def test_notes_warn_when_installed_in_default() -> None:
    """Installed in "default", NOTES.txt warns that pods there are never injected."""
    result = helm("install", RELEASE, str(CHART), "--namespace", "default", "--dry-run=client")
    assert result.returncode == 0, result.stderr
    assert 'WARNING: this release is in namespace "default"' in result.stdout
    quiet = helm("install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--dry-run=client")
    assert "WARNING" not in quiet.stdout.split("NOTES:", 1)[1]


# --- values and schema ------------------------------------------------------------


@pytest.mark.parametrize(
    "setting",
    [
        "foo=1",
        "injector.replica=3",
        "image.registry=example.com",
        "writer.resources.requests.gpu=1",
        "certManager.issuerRef.group=example.com",
        "monitoring.podMonitor=true",
        "injector.tolerations[0].keys=a",
        "injector.failurePolicy=Maybe",
        "injector.replicas=1",
        "image.tag=0.1.0 --log-level=debug",
        "injector.sidecarImage=x y",
        "certManager.issuerRef.name=Corp CA",
    ],
)
def test_unknown_or_invalid_values_are_refused(setting: str) -> None:
    """values.schema.json refuses a misspelt key or an invalid value, naming it."""
    result = helm("template", RELEASE, str(CHART), "--set", setting)
    assert result.returncode != 0, f"{setting} was accepted"
    key = re.split(r"[.=\[]", setting.partition("=")[0])[-1]
    assert key in result.stderr or "additional properties" in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("setting", "field"),
    [
        ("injector.sidecarImage", "args"),
        ("image.tag", "image"),
        ("injector.priorityClassName", "priorityClassName"),
    ],
)
def test_hostile_strings_stay_one_value_without_the_schema(setting: str, field: str) -> None:
    """A value carrying YAML structure renders as one quoted string even with the schema
    skipped: it can add no argument, key or object (the schema also refuses it)."""
    hostile = 'x"\n- --log-level=debug\nextra: injected'
    args = ["template", RELEASE, str(CHART), "--skip-schema-validation"]
    result = helm(*args, "--set-json", f"{setting}={json.dumps(hostile)}")
    assert result.returncode == 0, result.stderr
    objects = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    container = injector_container(objects)
    pod = the(objects, "Deployment", "injector")["spec"]["template"]["spec"]
    assert len(container["args"]) == len(injector_container(render())["args"])
    rendered = {
        "args": flags(container)["image"],
        "image": container["image"].removeprefix(f"{REFRESHER_IMAGE}:"),
        "priorityClassName": pod.get("priorityClassName"),
    }[field]
    assert rendered == hostile
    assert "extra" not in pod and "extra" not in container


def test_names_fit_kubernetes_limits_for_the_longest_release_name() -> None:
    """With a 53-character release name (Helm's limit) every name and label value is valid."""
    release = "r" * 53
    settings = [word for setting in EVERYTHING_ON for word in ("--set", setting)]
    result = helm("template", release, str(CHART), *settings)
    assert result.returncode == 0, result.stderr
    # Kubernetes' IsDNS1123Subdomain: 253 characters, no per-segment limit.
    segment = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
    for obj in filter(None, yaml.safe_load_all(result.stdout)):
        name = obj["metadata"]["name"]
        if obj["kind"] == "Service":  # an RFC 1035 label: it becomes a DNS name
            assert re.fullmatch(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", name), name
        else:  # an RFC 1123 subdomain
            assert len(name) <= 253 and re.fullmatch(rf"{segment}(\.{segment})*", name), name
        for value in obj["metadata"].get("labels", {}).values():
            assert len(value) <= 63, value


def _schema() -> Obj:
    schema: Obj = json.loads((CHART / "values.schema.json").read_text(encoding="utf-8"))
    return schema


def _leaves(schema: Obj, prefix: str = "") -> dict[str, Obj]:
    """Dotted value paths that are not objects with fixed properties, with their schema."""
    if schema.get("type") == "object" and "properties" in schema:
        found: dict[str, Obj] = {}
        for key, sub in schema["properties"].items():
            found.update(_leaves(sub, f"{prefix}{key}."))
        return found
    return {prefix.rstrip("."): schema}


def _value_leaves(values: Any, prefix: str = "", schema: Obj | None = None) -> dict[str, Any]:
    if isinstance(values, dict) and schema and "properties" in schema:
        found: dict[str, Any] = {}
        for key, sub in values.items():
            found.update(_value_leaves(sub, f"{prefix}{key}.", schema["properties"].get(key)))
        return found
    return {prefix.rstrip("."): values}


def test_schema_refuses_additional_properties_everywhere() -> None:
    """Every object in values.schema.json either lists its keys (additionalProperties:
    false) or is a string map; nothing accepts arbitrary structure."""

    def walk(node: Any, path: str) -> Iterator[str]:
        if isinstance(node, dict):
            if node.get("type") == "object":
                extra = node.get("additionalProperties")
                if "properties" in node and extra is not False:
                    yield f"{path}: object with properties lacks additionalProperties: false"
                if "properties" not in node and extra != {"type": "string"}:
                    yield f"{path}: free-form object"
            for key, sub in node.items():
                yield from walk(sub, f"{path}/{key}")
        elif isinstance(node, list):
            for index, sub in enumerate(node):
                yield from walk(sub, f"{path}/{index}")

    problems = list(walk(_schema(), ""))
    assert not problems, "\n".join(problems)


def test_values_yaml_and_schema_name_the_same_keys() -> None:
    """Every key of values.yaml is in the schema and every schema key has a default there."""
    values = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))
    assert set(_value_leaves(values, schema=_schema())) == set(_leaves(_schema()))


def _readme_table() -> dict[str, tuple[str, str]]:
    """The chart README's values table: key -> (type, default) as written."""
    rows = re.findall(
        r"^\| `([\w.]+)` \| (\w+) \| `(.*?)` \| .+ \|$",
        (CHART / "README.md").read_text(encoding="utf-8"),
        re.MULTILINE,
    )
    return {key: (kind, default) for key, kind, default in rows}


def test_readme_values_table_matches_the_schema_and_defaults() -> None:
    """The chart README lists every value once, with the schema's type and values.yaml's default."""
    table = _readme_table()
    leaves = _leaves(_schema())
    assert set(table) == set(leaves)
    defaults = _value_leaves(
        yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8")), schema=_schema()
    )
    for key, (kind, default) in table.items():
        schema = leaves[key]
        expected_kind = schema.get("type") or ("string" if "enum" in schema else "quantity")
        assert kind == expected_kind, key
        assert yaml.safe_load(default) == defaults[key], key


# --- hardening and shape ------------------------------------------------------------


@pytest.mark.parametrize("values", list(VALUE_SETS), ids=str)
def test_every_container_is_hardened(values: str) -> None:
    """Every container runs as 65532, non-root, read-only, without capabilities or service links."""
    objects = render(VALUE_SETS[values])
    assert list(pod_specs(objects)), "the chart rendered no pod: nothing would be checked"
    problems = [
        f"{name} {container['name']}: {problem}"
        for name, pod in pod_specs(objects)
        for container in containers(pod)
        for problem in hardening_violations(pod, container)
    ]
    problems += [
        f"{name}: enableServiceLinks is not false"
        for name, pod in pod_specs(objects)
        if pod.get("enableServiceLinks") is not False
    ]
    assert not problems, "\n".join(problems)
    assert all(is_refresher(c) for _, pod in pod_specs(objects) for c in containers(pod))


def test_only_the_writer_mounts_a_service_account_token() -> None:
    """The injector gets no API credentials; the writer does, as its own service account."""
    for name, pod in pod_specs(render(EVERYTHING_ON)):
        writes_secret = name.endswith("-writer")
        assert pod.get("automountServiceAccountToken") is writes_secret, name
        assert pod["serviceAccountName"].endswith("-writer" if writes_secret else "-injector")


def test_default_install_is_an_available_injector() -> None:
    """2+ replicas spread over nodes, a PDB and a Service that select them, probes over HTTPS."""
    objects = render()
    deployment = the(objects, "Deployment", "injector")
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert deployment["spec"]["replicas"] >= 2
    assert the(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"] == selector
    assert the(objects, "Service")["spec"]["selector"] == selector
    assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    container = injector_container(objects)
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = container[probe]["httpGet"]
        assert (get["scheme"], get["path"], get["port"]) == ("HTTPS", path, "https")
    assert flags(container)["listen"].endswith(":8443")
    assert container["ports"] == [{"name": "https", "containerPort": 8443, "protocol": "TCP"}]


@pytest.mark.parametrize("values", ["defaults", "everything-on-cert-manager"], ids=str)
def test_webhook_reaches_only_opted_in_pods(values: str) -> None:
    """Opt-in label only, v1, no side effects, a short timeout, Fail, namespaces excluded."""
    problems = list(webhook_problems(render(VALUE_SETS[values]), NAMESPACE))
    assert not problems, "\n".join(problems)


def test_extra_excluded_namespaces_are_added() -> None:
    """injector.excludeNamespaces adds to kube-system and the release namespace, never replaces."""
    objects = render(("injector.excludeNamespaces={istio-system,monitoring}",))
    (webhook,) = the(objects, "MutatingWebhookConfiguration")["webhooks"]
    (expression,) = webhook["namespaceSelector"]["matchExpressions"]
    assert expression["values"] == ["kube-system", NAMESPACE, "istio-system", "monitoring"]


def test_writer_rbac_names_its_one_secret() -> None:
    """The writer runs `run --secret S`; its Role allows get/update/patch on S alone, and create."""
    objects = render((*EVERYTHING_ON, "writer.secretName=team-token"))
    container = the(objects, "Deployment", "writer")["spec"]["template"]["spec"]["containers"][0]
    assert container["args"][:5] == [
        "run",
        "--credentials",
        "/etc/adobe-ims",
        "--secret",
        "team-token",
    ]
    rules = the(objects, "Role")["rules"]
    named = [r for r in rules if r.get("resourceNames")]
    assert named == [
        {
            "apiGroups": [""],
            "resources": ["secrets"],
            "resourceNames": ["team-token"],
            "verbs": ["get", "update", "patch"],
        }
    ]
    assert [r["verbs"] for r in rules if not r.get("resourceNames")] == [["create"]]
    binding = the(objects, "RoleBinding")
    account = the(objects, "Deployment", "writer")["spec"]["template"]["spec"]["serviceAccountName"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}
    ]


# --- kept in step with the CLI, the examples and manifests/monitoring ---------------


def test_chart_image_is_the_examples_image() -> None:
    """The chart's image and the image it injects are the Kustomize examples' image."""
    expected = f"{REFRESHER_IMAGE}:{project_version()}"
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text(encoding="utf-8"))
    assert chart["appVersion"] == chart["version"] == project_version()
    container = injector_container(render())
    assert container["image"] == flags(container)["image"] == expected
    examples = {
        c["image"]
        for directory in sorted(EXAMPLES.glob("*/kustomization.yaml"))
        for _, pod in pod_specs(list(kustomize(directory.parent)))
        for c in containers(pod)
        if is_refresher(c)
    }
    assert examples == {expected}
    assert flags(injector_container(list(kustomize(INJECTOR_EXAMPLE))))["image"] == expected


@pytest.mark.parametrize("source", ["chart", "kustomize"])
def test_injector_flags_are_accepted_by_the_cli(source: str) -> None:
    """Each flag the chart and the example pass to `refresher injector` is in its --help."""
    objects = render() if source == "chart" else list(kustomize(INJECTOR_EXAMPLE))
    container = injector_container(objects)
    assert container["args"][0] == "injector"
    documented = set(re.findall(r"(--[a-z][a-z0-9-]*)", injector_help()))
    missing = {f"--{flag}" for flag in flags(container)} - documented
    assert not missing, f"{source} passes flags the CLI does not know: {sorted(missing)}"


@pytest.mark.parametrize(
    "name", ["grafana-dashboard.json", "prometheusrule.yaml", "podmonitor.yaml"]
)
def test_chart_monitoring_files_equal_manifests(name: str) -> None:
    """The chart's files/ copies of manifests/monitoring are byte-identical to them."""
    chart_copy = (CHART / "files" / name).read_bytes()
    assert chart_copy == (MANIFESTS / "monitoring" / name).read_bytes(), (
        f"cp manifests/monitoring/{name} charts/ims-token-refresher/files/{name}"
    )


def test_chart_monitoring_objects_carry_the_manifests_specs() -> None:
    """The chart's PrometheusRule and dashboard carry manifests/monitoring's rules and JSON."""
    objects = render(EVERYTHING_ON)
    rule = yaml.safe_load((MANIFESTS / "monitoring" / "prometheusrule.yaml").read_text())
    assert the(objects, "PrometheusRule")["spec"] == rule["spec"]
    (dashboard,) = the(objects, "ConfigMap")["data"].values()
    assert json.loads(dashboard) == json.loads(
        (MANIFESTS / "monitoring" / "grafana-dashboard.json").read_text()
    )
    assert the(objects, "ConfigMap")["metadata"]["labels"]["grafana_dashboard"] == "1"


# --- the Kustomize injector example -------------------------------------------------


def test_injector_example_validates_and_is_hardened() -> None:
    """The Kustomize injector renders, validates strictly (built-in kinds) and is hardened."""
    objects = list(kustomize(INJECTOR_EXAMPLE))
    problems, skipped = _validation_problems(objects, KUBE_VERSIONS[-1])
    assert not problems, "\n".join(problems)
    assert skipped == {("cert-manager.io/v1", "Issuer"), ("cert-manager.io/v1", "Certificate")}
    problems = [
        f"{name} {c['name']}: {problem}"
        for name, pod in pod_specs(objects)
        for c in containers(pod)
        for problem in hardening_violations(pod, c)
    ]
    assert not problems, "\n".join(problems)
    (_, pod), *others = pod_specs(objects)
    assert not others
    assert pod["automountServiceAccountToken"] is False and pod["enableServiceLinks"] is False
    assert the(objects, "Deployment")["spec"]["replicas"] >= 2
