"""Sidecar injection: the pure pod function and `refresher inject` (the real CLI).

Real pod specs (a Deployment with its own init containers, volumes and
securityContext; a CronJob in init mode selecting one of two containers; a
StatefulSet; a pod that is not opted in), the results validated against
Kubernetes' own schemas, idempotency, every refusal, and the shipped sidecar
example kept equal to what injection produces.
"""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from refresher.inject import (
    CONTAINER,
    CREDENTIALS_VOLUME,
    LABEL,
    PREFIX,
    STATUS,
    TOKEN_VOLUME,
    Refused,
)
from refresher.inject import inject_documents as _inject_documents
from refresher.inject_cli import DEFAULT_IMAGE
from tests.support.injection import (
    CRONJOB,
    DEPLOYMENT,
    STATEFULSET,
    Obj,
    inject_pod,
    load,
    one_line,
    pod,
    refresher,
    template_of,
)
from tests.support.manifests import EXAMPLES, KUBERNETES_VALIDATE, render


def inject_documents(documents: list[Any]) -> Any:
    return _inject_documents(documents, image=DEFAULT_IMAGE)


NOT_OPTED_IN = """
apiVersion: v1
kind: Pod
metadata:
  name: plain
  annotations:
    ims-token-refresher.io/credentials-secret: ignored-without-the-label
spec:
  containers:
    - name: app
      image: busybox:1.37.0
"""

SERVICE = """
apiVersion: v1
kind: Service
metadata: {name: orders}
spec:
  selector: {app: orders}
  ports: [{port: 80, targetPort: http}]
"""

WORKLOADS = {"deployment": DEPLOYMENT, "cronjob": CRONJOB, "statefulset": STATEFULSET}


def injected(document: Obj) -> Obj:
    (result,), report = inject_documents([document])
    assert not report.refused, report.refused
    return result  # type: ignore[no-any-return]


def by_name(items: list[Obj], name: str) -> Obj:
    return next(item for item in items if item["name"] == name)


def mount(container: Obj, volume: str) -> Obj | None:
    return next((m for m in container.get("volumeMounts", []) if m["name"] == volume), None)


# --- what is injected -----------------------------------------------------------


def test_deployment_keeps_its_own_init_containers_volumes_and_security_context() -> None:
    """The refresher goes first, the pod's own init containers, volumes and fsGroup stay."""
    original = load(DEPLOYMENT)
    spec = template_of(injected(original))["spec"]
    assert [c["name"] for c in spec["initContainers"]] == [CONTAINER, "migrate"]
    assert [v["name"] for v in spec["volumes"]] == [
        "config",
        "cache",
        CREDENTIALS_VOLUME,
        TOKEN_VOLUME,
    ]
    assert spec["securityContext"] == {"runAsNonRoot": True, "runAsUser": 1000, "fsGroup": 2000}
    for name in ("api", "worker"):
        assert mount(by_name(spec["containers"], name), TOKEN_VOLUME) == {
            "name": TOKEN_VOLUME,
            "mountPath": "/var/run/secrets/adobe",
            "readOnly": True,
        }
    assert mount(by_name(spec["initContainers"], "migrate"), TOKEN_VOLUME) is None
    assert by_name(spec["volumes"], CREDENTIALS_VOLUME)["secret"] == {
        "secretName": "orders-adobe",
        "defaultMode": 0o440,
    }
    # Everything the pod had is still there, untouched.
    api = by_name(spec["containers"], "api")
    assert api["volumeMounts"][:2] == template_of(original)["spec"]["containers"][0]["volumeMounts"]


def test_native_sidecar_is_hardened_and_gated_on_readyz() -> None:
    """sidecar mode: restartPolicy Always, startup probe /readyz, hardened, resources set."""
    spec = template_of(injected(load(DEPLOYMENT)))["spec"]
    sidecar = spec["initContainers"][0]
    assert sidecar["image"] == DEFAULT_IMAGE
    assert sidecar["restartPolicy"] == "Always"
    assert sidecar["args"] == [
        "run",
        "--credentials",
        "/etc/adobe-ims",
        "--token-dir",
        "/var/run/adobe-ims",
    ]
    assert sidecar["startupProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert sidecar["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert sidecar["ports"] == [{"name": "http", "containerPort": 9876, "protocol": "TCP"}]
    assert sidecar["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 65532,
        "runAsGroup": 65532,
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert sidecar["resources"]["limits"]["memory"] and sidecar["resources"]["requests"]["cpu"]
    assert template_of(injected(load(DEPLOYMENT)))["metadata"]["annotations"][STATUS] == "injected"


def test_cronjob_init_mode_mounts_only_the_selected_container() -> None:
    """init mode runs `once` without probes; only the container named in `containers` mounts."""
    spec = template_of(injected(load(CRONJOB)))["spec"]
    (init,) = spec["initContainers"]
    assert "restartPolicy" not in init and "startupProbe" not in init and "ports" not in init
    assert init["args"][0] == "once" and init["args"][-2:] == ["--flow", "oauth"]
    report, uploader = spec["containers"]
    assert mount(report, TOKEN_VOLUME)["mountPath"] == "/var/run/adobe-ims"  # type: ignore[index]
    assert mount(uploader, TOKEN_VOLUME) is None
    assert spec["securityContext"] == {"fsGroup": 65532}


def test_statefulset_passes_the_ims_endpoint() -> None:
    """The ims-endpoint annotation becomes --ims-endpoint; volumeClaimTemplates are untouched."""
    original = load(STATEFULSET)
    result = injected(original)
    sidecar = template_of(result)["spec"]["initContainers"][0]
    assert sidecar["args"][-2:] == ["--ims-endpoint", "https://ims-na1-stg1.adobelogin.com"]
    assert result["spec"]["volumeClaimTemplates"] == original["spec"]["volumeClaimTemplates"]


def test_pod_without_the_label_is_never_changed() -> None:
    """No label, no change, even with our annotations; other kinds pass through as they are."""
    documents = [load(NOT_OPTED_IN), load(SERVICE)]
    result, report = inject_documents(copy.deepcopy(documents))
    assert result == documents and not report.injected and not report.refused


@pytest.mark.parametrize("value", ["false", "True", "yes", ""])
def test_only_the_label_value_true_opts_in(value: str) -> None:
    """The label must be exactly "true" (what the webhook's objectSelector matches)."""
    document = pod(credentials_secret="c")
    document["metadata"]["labels"][LABEL] = value
    assert inject_pod(document).result == "unchanged"


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_injection_is_idempotent(name: str) -> None:
    """Injecting an injected document changes nothing."""
    once = injected(load(WORKLOADS[name]))
    assert injected(copy.deepcopy(once)) == once
    assert inject_pod(template_of(once)).reason == "already injected"


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_input_is_never_mutated(name: str) -> None:
    """The function returns a copy; the caller's document is as it was."""
    original = load(WORKLOADS[name])
    snapshot = copy.deepcopy(original)
    injected(original)
    assert original == snapshot


# --- refusals -------------------------------------------------------------------


def with_spec(document: Obj, **spec: Any) -> Obj:
    document["spec"].update(spec)
    return document


REFUSALS: dict[str, tuple[Obj, str]] = {
    "missing credentials-secret": (pod(), "ims-token-refresher.io/credentials-secret is required"),
    "invalid credentials-secret": (
        pod(credentials_secret="Adobe_Creds"),
        "ims-token-refresher.io/credentials-secret: 'Adobe_Creds'",
    ),
    "unknown annotation (typo)": (
        pod(credentials_secret="c", token_dir="/x"),
        "unknown annotation ims-token-refresher.io/token-dir",
    ),
    "invalid mode": (pod(credentials_secret="c", mode="daemon"), "ims-token-refresher.io/mode"),
    "invalid flow": (pod(credentials_secret="c", flow="saml"), "ims-token-refresher.io/flow"),
    "relative token-path": (
        pod(credentials_secret="c", token_path="run/adobe"),
        "ims-token-refresher.io/token-path",
    ),
    "token-path with ..": (
        pod(credentials_secret="c", token_path="/var/../etc"),
        "ims-token-refresher.io/token-path",
    ),
    "token-path /": (pod(credentials_secret="c", token_path="/"), "token-path"),
    "containers names no container": (
        pod(credentials_secret="c", containers="app,web"),
        "ims-token-refresher.io/containers: 'web' is not a container of this pod",
    ),
    "containers empty": (pod(credentials_secret="c", containers=""), "containers"),
    "plain http ims-endpoint": (
        pod(credentials_secret="c", ims_endpoint="http://ims.example.com"),
        "ims-token-refresher.io/ims-endpoint",
    ),
    "ims-endpoint with spaces": (
        pod(credentials_secret="c", ims_endpoint="ims.example.com --flow jwt"),
        "ims-token-refresher.io/ims-endpoint",
    ),
    "container name taken": (
        with_spec(
            pod(credentials_secret="c"),
            initContainers=[{"name": CONTAINER, "image": "someone/else"}],
        ),
        f"container name {CONTAINER} is already taken",
    ),
    "volume name taken": (
        with_spec(pod(credentials_secret="c"), volumes=[{"name": TOKEN_VOLUME, "emptyDir": {}}]),
        f"volume name {TOKEN_VOLUME} is already taken",
    ),
    "probe port taken": (
        with_spec(
            pod(credentials_secret="c"),
            containers=[{"name": "app", "image": "x", "ports": [{"containerPort": 9876}]}],
        ),
        "port 9876 (the refresher's probe port) is already declared by container app",
    ),
    "something mounted at token-path": (
        with_spec(
            pod(credentials_secret="c"),
            containers=[
                {
                    "name": "app",
                    "image": "x",
                    "volumeMounts": [{"name": "mine", "mountPath": "/var/run/adobe-ims"}],
                }
            ],
            volumes=[{"name": "mine", "emptyDir": {}}],
        ),
        "container app already mounts volume mine at /var/run/adobe-ims",
    ),
    "something mounted under token-path": (
        with_spec(
            pod(credentials_secret="c"),
            containers=[
                {
                    "name": "app",
                    "image": "x",
                    "volumeMounts": [{"name": "mine", "mountPath": "/var/run/adobe-ims/sub"}],
                }
            ],
            volumes=[{"name": "mine", "emptyDir": {}}],
        ),
        "container app already mounts volume mine at /var/run/adobe-ims/sub",
    ),
    "non-string annotation": (
        pod(credentials_secret=5),  # type: ignore[arg-type]
        "annotation ims-token-refresher.io/credentials-secret must be a string",
    ),
    "no containers": (with_spec(pod(credentials_secret="c"), containers=[]), "spec.containers"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refusal_names_the_annotation_or_the_name(case: str) -> None:
    """Each refusal is one line naming what is at fault."""
    document, expected = REFUSALS[case]
    with pytest.raises(Refused) as caught:
        inject_pod(document)
    message = str(caught.value)
    assert expected in message and "\n" not in message


def test_a_mount_above_token_path_is_fine() -> None:
    """A volume mounted at a parent of token-path does not collide (ours is nested in it)."""
    document = with_spec(
        pod(credentials_secret="c"),
        containers=[
            {
                "name": "app",
                "image": "x",
                "volumeMounts": [{"name": "run", "mountPath": "/var/run"}],
            }
        ],
        volumes=[{"name": "run", "emptyDir": {}}],
    )
    assert inject_pod(document).result == "injected"


def test_https_endpoint_and_host_forms_are_accepted() -> None:
    """ims-endpoint takes a host, a host:port or an https URL, as --ims-endpoint does."""
    for endpoint in ("ims-na1.adobelogin.com", "ims.example.com:8443", "https://ims.example.com"):
        outcome = inject_pod(pod(credentials_secret="c", ims_endpoint=endpoint))
        assert outcome.pod["spec"]["initContainers"][0]["args"][-1] == endpoint


# Any JSON-ish value, nested: what a hostile or broken client can put anywhere in a pod.
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    spec=st.dictionaries(
        st.sampled_from(["containers", "initContainers", "volumes", "securityContext", "x"]),
        _json,
    ),
    annotations=st.dictionaries(
        st.sampled_from([PREFIX + "credentials-secret", PREFIX + "containers", PREFIX + "x", "y"]),
        _json,
    ),
)
def test_any_opted_in_pod_is_injected_or_refused(spec: Obj, annotations: Obj) -> None:
    """Whatever shape the pod has, the result is an injected pod or a Refused, nothing else."""
    document = {
        "metadata": {"labels": {LABEL: "true"}, "annotations": annotations},
        "spec": spec,
    }
    try:
        outcome = inject_pod(document)
    except Refused as exc:
        assert "\n" not in str(exc)
    else:
        assert outcome.pod["spec"]["initContainers"][0]["name"] == CONTAINER


# --- the real CLI ---------------------------------------------------------------


def test_cli_injects_a_stream_and_passes_the_rest_through(tmp_path: Path) -> None:
    """`inject -f FILE`: every opted-in template injected, other documents unchanged, YAML out."""
    source = tmp_path / "app.yaml"
    source.write_text("---\n".join([DEPLOYMENT, SERVICE, NOT_OPTED_IN, CRONJOB]))
    result = refresher("inject", "-f", str(source))
    assert result.returncode == 0, result.stderr
    out = list(yaml.safe_load_all(result.stdout))
    assert out[1:3] == [load(SERVICE), load(NOT_OPTED_IN)]
    assert out[0] == injected(load(DEPLOYMENT)) and out[3] == injected(load(CRONJOB))
    # Modes as people write them; kubectl's YAML 1.1 parser reads 0440 as octal too.
    assert "defaultMode: 0440" in result.stdout


def test_cli_reads_json_and_lists_from_stdin_and_sets_the_image() -> None:
    """A JSON `List` on standard input: its items are injected with --image."""
    listing = {
        "apiVersion": "v1",
        "kind": "List",
        "items": [load(STATEFULSET), load(SERVICE)],
    }
    result = refresher(
        "inject", "--image", "registry.example.com/refresher@sha256:ab", stdin=json.dumps(listing)
    )
    assert result.returncode == 0, result.stderr
    (out,) = yaml.safe_load_all(result.stdout)
    sidecar = template_of(out["items"][0])["spec"]["initContainers"][0]
    assert sidecar["image"] == "registry.example.com/refresher@sha256:ab"
    assert out["items"][1] == load(SERVICE)


def test_cli_twice_is_cli_once() -> None:
    """Piping inject's output through inject again changes nothing (idempotent end to end)."""
    once = refresher("inject", stdin=DEPLOYMENT + "---\n" + CRONJOB)
    twice = refresher("inject", stdin=once.stdout)
    assert once.returncode == twice.returncode == 0
    assert twice.stdout == once.stdout


def test_cli_refusal_is_one_line_naming_the_document_and_writes_nothing() -> None:
    """A refusal: one stderr line `Kind/name: why`, exit 2, and no half-written output."""
    broken = DEPLOYMENT.replace("credentials-secret", "credential-secret")
    result = refresher("inject", stdin=SERVICE + "---\n" + broken)
    assert result.returncode == 2 and result.stdout == ""
    line = one_line(result.stderr)
    assert "Deployment/orders" in line and "ims-token-refresher.io/credential-secret" in line


@pytest.mark.parametrize(
    ("stdin", "expected"),
    [
        ("kind: Pod\nmetadata: {name: [\n", "not valid YAML or JSON"),
        ('{"kind": "Pod", "metadata": ', "not valid YAML or JSON"),
        ("a: b\n\tc: d\n", "not valid YAML or JSON"),
    ],
)
def test_cli_malformed_input_is_one_line_exit_2(stdin: str, expected: str) -> None:
    """Malformed YAML or JSON: one line with the place, exit 2, no traceback."""
    result = refresher("inject", stdin=stdin)
    assert result.returncode == 2 and result.stdout == ""
    assert expected in one_line(result.stderr)


def test_cli_malformed_input_never_echoes_it() -> None:
    """The error names the place, not the text: a broken Secret manifest is not printed."""
    secret = "c2VjcmV0LXZhbHVlLXRoYXQtbXVzdC1ub3QtbGVhaw=="
    result = refresher("inject", stdin=f"kind: Secret\ndata:\n  key: {secret}\n  - x\n")
    assert result.returncode == 2 and secret not in result.stderr
    one_line(result.stderr)


def test_cli_survives_a_billion_laughs() -> None:
    """YAML aliases nested ten deep (10^10 leaves as a tree) pass through in about a second."""
    lines = [
        "apiVersion: v1",
        "kind: ConfigMap",
        "metadata: {name: lol}",
        "data:",
        "  l0: &l0 [lol]",
    ]
    lines += [f"  l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, 10)]
    result = refresher("inject", stdin="\n".join(lines) + "\n---\n" + DEPLOYMENT)
    assert result.returncode == 0 and "ims-token-refresher" in result.stdout
    assert len(result.stdout) < 100_000


def test_cli_missing_file_and_bad_image_are_usage_errors(tmp_path: Path) -> None:
    """A missing -f file or an --image with spaces: one line, exit 2."""
    missing = refresher("inject", "-f", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2 and "nope.yaml" in one_line(missing.stderr)
    bad = refresher("inject", "--image", "a b", stdin=DEPLOYMENT)
    assert bad.returncode == 2 and "--image" in one_line(bad.stderr)


def test_cli_warns_when_the_opt_in_is_an_annotation() -> None:
    """The opt-in written as an annotation is not injected, and the CLI says why."""
    text = NOT_OPTED_IN.replace(
        "annotations:", 'annotations:\n    ims-token-refresher.io/inject: "true"'
    )
    result = refresher("inject", stdin=text)
    assert result.returncode == 0 and yaml.safe_load(result.stdout) == load(text)
    assert "must be a label" in one_line(result.stderr)


# --- schemas --------------------------------------------------------------------


@pytest.mark.parametrize("version", ["1.29.0", kubernetes_validate.latest_version()])
def test_injected_workloads_pass_strict_schema_validation(version: str, tmp_path: Path) -> None:
    """Every injected workload is valid for Kubernetes 1.29 and the newest known version."""
    documents = [injected(load(text)) for text in WORKLOADS.values()]
    documents.append(injected(pod(credentials_secret="c", mode="init")))
    rendered = tmp_path / "injected.yaml"
    rendered.write_text(yaml.safe_dump_all(documents, sort_keys=False))
    result = subprocess.run(
        [
            str(KUBERNETES_VALIDATE),
            "--strict",
            "--kubernetes-version",
            version,
            "--quiet",
            str(rendered),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0 and not output.strip(), output


# --- the shipped example --------------------------------------------------------


def without_injection(template: Obj) -> Obj:
    """The application as its author wrote it: the example minus what injection adds."""
    template = copy.deepcopy(template)
    spec = template["spec"]
    spec["initContainers"] = [c for c in spec.get("initContainers", []) if c["name"] != CONTAINER]
    spec["volumes"] = [
        v for v in spec["volumes"] if v["name"] not in (CREDENTIALS_VOLUME, TOKEN_VOLUME)
    ]
    for container in spec["containers"]:
        container["volumeMounts"] = [
            m for m in container.get("volumeMounts", []) if m["name"] != TOKEN_VOLUME
        ]
        if not container["volumeMounts"]:
            del container["volumeMounts"]
    for key in ("initContainers", "volumes"):
        if not spec[key]:
            del spec[key]
    del template["metadata"]["annotations"][STATUS]
    return template


def test_sidecar_example_is_exactly_what_inject_produces() -> None:
    """manifests/examples/sidecar's refresher part equals inject's output for its application."""
    (deployment,) = [o for o in render(EXAMPLES / "sidecar") if o["kind"] == "Deployment"]
    template = deployment["spec"]["template"]
    application = without_injection(template)
    assert CONTAINER not in json.dumps(application["spec"]), "the example has refresher parts left"
    # The rendered example carries the released image, which is also inject's default.
    assert inject_pod(application).pod == template
