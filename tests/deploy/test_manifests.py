"""Offline checks of the Kustomize manifests, the Dockerfile and the deploying guide.

No cluster and no Docker engine: every kustomization is rendered with the
venv's kubectl, validated against Kubernetes' own OpenAPI schemas by
kubernetes-validate, and then held to the product's deployment contract
(hardening, probes, token volume, service account tokens only where the
Secret sink needs one).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.support.manifests import (
    EXAMPLES,
    KUBERNETES_VALIDATE,
    MANIFESTS,
    REFRESHER_IMAGE,
    ROOT,
    VENV_BIN,
    Obj,
    containers,
    directory_id,
    hardening_violations,
    is_refresher,
    pod_specs,
    pod_templates,
    project_version,
    render,
)

DOCKERFILE = ROOT / "Dockerfile"
DEPLOYING_DOC = ROOT / "docs" / "deploying.md"

HADOLINT = VENV_BIN / "hadolint"

# The newest schema set kubernetes-validate 1.37 ships. Native sidecars are GA
# since 1.33 and podFailurePolicy since 1.31, so nothing here needs a newer one.
KUBERNETES_VERSION = "1.37.0"
# prometheus-operator and cert-manager kinds: not in Kubernetes' schemas,
# rendered but not validated.
CRD_API_GROUPS = ("monitoring.coreos.com/", "cert-manager.io/")

REFRESHER_CONTAINER = "ims-token-refresher"
HTTP_PORT = 9876
CREDENTIALS_SECRET = "adobe-ims-credentials"
SERVICE_ACCOUNT = "ims-token-refresher"


def _kustomization_dirs() -> list[Path]:
    return sorted(path.parent for path in MANIFESTS.rglob("kustomization.yaml"))


# Examples that run no token refresher: the injector example runs `refresher
# injector`; tests/deploy/test_chart.py holds it to the same hardening.
NOT_TOKEN_EXAMPLES = frozenset({"injector"})


def _example_dirs() -> list[Path]:
    """The examples that run a token refresher (run or once)."""
    return sorted(
        path.parent
        for path in EXAMPLES.glob("*/kustomization.yaml")
        if path.parent.name not in NOT_TOKEN_EXAMPLES
    )


ALL_DIRS = pytest.mark.parametrize("directory", _kustomization_dirs(), ids=directory_id)
EXAMPLE_DIRS = pytest.mark.parametrize("directory", _example_dirs(), ids=directory_id)


def argv(container: Obj) -> list[str]:
    return [*container.get("command", []), *container.get("args", [])]


def option(container: Obj, flag: str) -> str | None:
    """A refresher option's value from the arguments, else from its REFRESHER_* variable."""
    words = argv(container)
    for index, word in enumerate(words):
        if word == flag and index + 1 < len(words):
            return words[index + 1]
        if word.startswith(f"{flag}="):
            return word.split("=", 1)[1]
    variable = "REFRESHER_" + flag.removeprefix("--").upper().replace("-", "_")
    for env in container.get("env", []):
        if env["name"] == variable:
            return str(env.get("value"))
    return None


def volume(pod: Obj, name: str) -> Obj:
    return next(item for item in pod.get("volumes", []) if item["name"] == name)


def mount_at(container: Obj, path: str) -> Obj | None:
    return next(
        (item for item in container.get("volumeMounts", []) if item["mountPath"] == path), None
    )


def port_number(container: Obj, port: int | str) -> int | str:
    for item in container.get("ports", []):
        if item.get("name") == port:
            return int(item["containerPort"])
    return port


def refresher_pods(objects: list[Obj]) -> list[tuple[str, Obj]]:
    return [
        (name, pod) for name, pod in pod_specs(objects) if any(map(is_refresher, containers(pod)))
    ]


# --- rendering and schema -------------------------------------------------------


def test_every_example_is_a_kustomization() -> None:
    """The four documented examples exist as kustomizations."""
    assert {d.name for d in _example_dirs()} >= {
        "sidecar",
        "secret-writer",
        "cronjob",
        "init-container",
    }


@ALL_DIRS
def test_kustomization_renders(directory: Path) -> None:
    """`kubectl kustomize` builds each kustomization into named, typed objects."""
    objects = render(directory)
    assert objects, f"{directory_id(directory)} renders nothing"
    for obj in objects:
        assert obj.get("apiVersion") and obj.get("kind") and obj["metadata"].get("name"), obj


@ALL_DIRS
def test_objects_match_kubernetes_schema(directory: Path, tmp_path: Path) -> None:
    """Every built-in object passes strict schema validation for current Kubernetes."""
    objects = [obj for obj in render(directory) if not obj["apiVersion"].startswith(CRD_API_GROUPS)]
    if not objects:
        pytest.skip(f"{directory_id(directory)} holds only custom resources")
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(yaml.safe_dump_all(objects, sort_keys=False), encoding="utf-8")
    result = subprocess.run(
        [
            str(KUBERNETES_VALIDATE),
            "--strict",
            "--kubernetes-version",
            KUBERNETES_VERSION,
            "--quiet",
            str(rendered),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = result.stdout + result.stderr
    # A kind without a schema is only a warning there; here it is a failure.
    assert result.returncode == 0 and not output.strip(), output


@EXAMPLE_DIRS
def test_objects_carry_recommended_labels(directory: Path) -> None:
    """Every object and pod template carries app.kubernetes.io/name (and part-of from kustomize)."""
    objects = render(directory)
    unlabelled = [
        f"{obj['kind']}/{obj['metadata']['name']}"
        for obj in objects
        if not {"app.kubernetes.io/name", "app.kubernetes.io/part-of"}
        <= obj["metadata"].get("labels", {}).keys()
    ]
    unlabelled += [
        f"{name} pod template"
        for name, template in pod_templates(objects)
        if "app.kubernetes.io/name" not in template["metadata"].get("labels", {})
    ]
    assert not unlabelled


# --- hardening ------------------------------------------------------------------


@EXAMPLE_DIRS
def test_every_container_is_hardened(directory: Path) -> None:
    """Every container and init container runs non-root, read-only, without capabilities."""
    problems = [
        f"{name} {container['name']}: {problem}"
        for name, pod in pod_specs(render(directory))
        for container in containers(pod)
        for problem in hardening_violations(pod, container)
    ]
    assert not problems, "\n".join(problems)


@EXAMPLE_DIRS
def test_service_account_token_only_for_secret_sink(directory: Path) -> None:
    """Only pods that write a Secret mount an API token, and then as ims-token-refresher."""
    problems = []
    for name, pod in pod_specs(render(directory)):
        writes_secret = any(is_refresher(c) and option(c, "--secret") for c in containers(pod))
        # Explicit in both cases: an absent field means true.
        if pod.get("automountServiceAccountToken") is not writes_secret:
            problems.append(f"{name}: automountServiceAccountToken should be {writes_secret}")
        if writes_secret and pod.get("serviceAccountName") != SERVICE_ACCOUNT:
            problems.append(f"{name}: serviceAccountName should be {SERVICE_ACCOUNT}")
    assert not problems, "\n".join(problems)


@EXAMPLE_DIRS
def test_refresher_pods_disable_service_links(directory: Path) -> None:
    """Pods running the refresher set enableServiceLinks: false.

    A Service named "refresher" would otherwise inject REFRESHER_SERVICE_HOST and
    friends, which the refresher rejects as unknown settings.
    """
    offenders = [
        name
        for name, pod in refresher_pods(render(directory))
        if pod.get("enableServiceLinks") is not False
    ]
    assert not offenders


# --- the refresher container ----------------------------------------------------


@EXAMPLE_DIRS
def test_refresher_image_is_the_released_one(directory: Path) -> None:
    """The kustomization's images: entry resolves the refresher to the project's version."""
    expected = f"{REFRESHER_IMAGE}:{project_version()}"
    images = {
        container["image"]
        for _, pod in refresher_pods(render(directory))
        for container in containers(pod)
        if is_refresher(container)
    }
    assert images == {expected}
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text(encoding="utf-8"))
    assert REFRESHER_IMAGE in {entry["name"] for entry in kustomization.get("images", [])}


@EXAMPLE_DIRS
def test_refresher_containers_are_named_and_configured(directory: Path) -> None:
    """Each refresher container is named ims-token-refresher, runs run/once and has an output."""
    problems = []
    for name, pod in refresher_pods(render(directory)):
        for container in filter(is_refresher, containers(pod)):
            words = container.get("args", [])
            if container["name"] != REFRESHER_CONTAINER:
                problems.append(f"{name}: container named {container['name']}")
            if not words or words[0] not in {"run", "once"}:
                problems.append(f"{name}: subcommand {words[:1]} is not run or once")
            if not (option(container, "--token-dir") or option(container, "--secret")):
                problems.append(f"{name}: neither --token-dir nor --secret")
            if not container.get("resources", {}).get("limits", {}).get("memory"):
                problems.append(f"{name}: no memory limit")
    assert not problems, "\n".join(problems)


@EXAMPLE_DIRS
def test_credentials_mounted_whole_from_secret(directory: Path) -> None:
    """--credentials points at a whole-volume mount of Secret adobe-ims-credentials, no subPath."""
    checked = 0
    for name, pod in refresher_pods(render(directory)):
        for container in filter(is_refresher, containers(pod)):
            path = option(container, "--credentials")
            mount = mount_at(container, path) if path else None
            assert mount, f"{name}: --credentials {path} is not a mount point"
            # subPath mounts are never updated by the kubelet: a rotated
            # credential would not reach the refresher.
            assert "subPath" not in mount and "subPathExpr" not in mount, name
            assert mount.get("readOnly") is True, name
            source = volume(pod, mount["name"])
            assert source.get("secret", {}).get("secretName") == CREDENTIALS_SECRET, name
            checked += 1
    assert checked


@EXAMPLE_DIRS
def test_no_subpath_on_secret_or_token_mounts(directory: Path) -> None:
    """No container mounts a Secret or the token volume with subPath (it would never update)."""
    offenders = []
    for name, pod in pod_specs(render(directory)):
        for container in containers(pod):
            for mount in container.get("volumeMounts", []):
                source = volume(pod, mount["name"])
                if ("secret" in source or "emptyDir" in source or "projected" in source) and (
                    "subPath" in mount or "subPathExpr" in mount
                ):
                    offenders.append(f"{name} {container['name']} {mount['mountPath']}")
    assert not offenders


@EXAMPLE_DIRS
def test_token_dir_is_shared_memory_volume(directory: Path) -> None:
    """--token-dir is a memory-backed, size-limited emptyDir that another container reads."""
    for name, pod in refresher_pods(render(directory)):
        for container in filter(is_refresher, containers(pod)):
            token_dir = option(container, "--token-dir")
            if token_dir is None:
                continue
            mount = mount_at(container, token_dir)
            assert mount and mount.get("readOnly") is not True, f"{name}: {token_dir} not writable"
            empty_dir = volume(pod, mount["name"]).get("emptyDir")
            assert empty_dir is not None, f"{name}: token volume is not an emptyDir"
            assert empty_dir.get("medium") == "Memory" and empty_dir.get("sizeLimit"), name
            readers = [
                other
                for other in containers(pod)
                if other is not container
                and any(m["name"] == mount["name"] for m in other.get("volumeMounts", []))
            ]
            assert readers, f"{name}: nobody reads the token volume"
            for reader in readers:
                reader_mount = next(m for m in reader["volumeMounts"] if m["name"] == mount["name"])
                assert reader_mount.get("readOnly") is True, f"{name}: {reader['name']} can write"


@EXAMPLE_DIRS
def test_long_running_refresher_probes_health_endpoints(directory: Path) -> None:
    """`refresher run` containers probe liveness on /healthz and readiness on /readyz at 9876."""
    for name, pod in refresher_pods(render(directory)):
        for container in filter(is_refresher, containers(pod)):
            if container["args"][0] != "run":
                continue
            expected = {"livenessProbe": "/healthz", "readinessProbe": "/readyz"}
            if "startupProbe" in container:
                expected["startupProbe"] = "/readyz"
            for probe, path in expected.items():
                get = container.get(probe, {}).get("httpGet")
                assert get, f"{name}: no HTTP {probe}"
                assert get["path"] == path, f"{name}: {probe} on {get['path']}"
                assert port_number(container, get["port"]) == HTTP_PORT, f"{name}: {probe} port"
            ports = {p["containerPort"]: p.get("name") for p in container.get("ports", [])}
            # manifests/monitoring's PodMonitors scrape the port by this name.
            assert ports.get(HTTP_PORT) == "http", f"{name}: port {HTTP_PORT} not named http"


# --- per-example shape ----------------------------------------------------------


def test_sidecar_example_is_a_native_sidecar() -> None:
    """The sidecar runs as a restartable init container gated on /readyz before the app starts."""
    (name, pod), *others = refresher_pods(render(EXAMPLES / "sidecar"))
    assert not others
    sidecars = [c for c in pod.get("initContainers", []) if is_refresher(c)]
    assert len(sidecars) == 1, f"{name}: the refresher is not an init container"
    sidecar = sidecars[0]
    assert sidecar.get("restartPolicy") == "Always"
    assert sidecar["args"][0] == "run"
    # The app container starts only after the sidecar's startupProbe succeeds.
    assert sidecar["startupProbe"]["httpGet"]["path"] == "/readyz"
    assert not any(is_refresher(c) for c in pod["containers"])
    token_dir = option(sidecar, "--token-dir")
    assert token_dir and not option(sidecar, "--secret")
    assert all(mount_at(app, token_dir) for app in pod["containers"]), "app does not mount it"
    requests = sidecar["resources"]["requests"]
    assert requests.get("cpu") and requests.get("memory")


def test_init_container_example_fetches_once_before_the_job() -> None:
    """The batch example's refresher is a classic init container running `once` into a token dir."""
    objects = render(EXAMPLES / "init-container")
    (name, pod), *others = refresher_pods(objects)
    assert not others
    assert next(o for o in objects if o["kind"] == "Job")["spec"]["template"]["spec"] is pod
    (init,) = pod["initContainers"]
    assert is_refresher(init) and "restartPolicy" not in init, name
    assert init["args"][0] == "once" and option(init, "--token-dir")
    assert pod["restartPolicy"] == "Never"


@pytest.mark.parametrize("example", ["cronjob", "init-container"])
def test_jobs_fail_fast_on_configuration_and_rejection(example: str) -> None:
    """Jobs stop retrying on exit 2 (bad configuration) and 3 (IMS rejected the credentials)."""
    objects = render(EXAMPLES / example)
    jobs = [o["spec"] for o in objects if o["kind"] == "Job"] + [
        o["spec"]["jobTemplate"]["spec"] for o in objects if o["kind"] == "CronJob"
    ]
    assert jobs
    for job in jobs:
        rules = job["podFailurePolicy"]["rules"]
        fail_job = [
            r["onExitCodes"] for r in rules if r["action"] == "FailJob" and "onExitCodes" in r
        ]
        assert fail_job == [
            {"containerName": REFRESHER_CONTAINER, "operator": "In", "values": [2, 3]}
        ]


@pytest.mark.parametrize("example", ["secret-writer", "cronjob"])
def test_secret_sink_has_rbac_for_its_secret(example: str) -> None:
    """The base RBAC lets the pod's service account get/update/patch the one Secret it writes."""
    objects = render(EXAMPLES / example)
    by_kind: dict[str, dict[str, Obj]] = {}
    for obj in objects:
        by_kind.setdefault(obj["kind"], {})[obj["metadata"]["name"]] = obj
    for name, pod in refresher_pods(objects):
        secret = next(option(c, "--secret") for c in containers(pod) if is_refresher(c))
        assert secret, f"{name} writes no Secret"
        account = pod["serviceAccountName"]
        assert account in by_kind.get("ServiceAccount", {}), f"{name}: no ServiceAccount {account}"
        bindings = [
            b
            for b in by_kind.get("RoleBinding", {}).values()
            if {"kind": "ServiceAccount", "name": account}
            in [{"kind": s["kind"], "name": s["name"]} for s in b.get("subjects", [])]
        ]
        assert bindings, f"{name}: {account} is bound to no Role"
        rules = [
            rule
            for binding in bindings
            for rule in by_kind["Role"][binding["roleRef"]["name"]]["rules"]
            if "secrets" in rule.get("resources", [])
        ]
        named = [r for r in rules if secret in r.get("resourceNames", [])]
        assert {"get", "update", "patch"} <= {v for r in named for v in r["verbs"]}, name
        # `create` cannot be limited by resourceNames; it is the only unnamed grant.
        assert {"create"} >= {v for r in rules if not r.get("resourceNames") for v in r["verbs"]}


def test_secret_writer_has_a_consumer_of_the_secret() -> None:
    """The secret-writer example's consumer mounts the Secret the refresher writes, as a volume."""
    objects = render(EXAMPLES / "secret-writer")
    (name, pod), *others = refresher_pods(objects)
    assert not others
    writer = next(
        obj
        for obj in objects
        if obj["kind"] == "Deployment" and pod is obj["spec"]["template"]["spec"]
    )
    assert writer["spec"]["replicas"] >= 2, name
    secret = next(option(c, "--secret") for c in containers(pod) if is_refresher(c))
    consumers = [
        consumer_name
        for consumer_name, consumer in pod_specs(objects)
        if any(v.get("secret", {}).get("secretName") == secret for v in consumer.get("volumes", []))
    ]
    assert consumers


# --- Dockerfile -----------------------------------------------------------------


def test_dockerfile_passes_hadolint(tmp_path: Path) -> None:
    """hadolint reports nothing, at any severity, without a config that ignores rules."""
    # A config with no ignores overrides any user-level or repository one, so
    # the only way to silence a rule is an inline pragma in the Dockerfile.
    config = tmp_path / "hadolint.yaml"
    config.write_text("ignored: []\n", encoding="utf-8")
    result = subprocess.run(
        [
            str(HADOLINT),
            "--config",
            str(config),
            "--failure-threshold",
            "style",
            "--no-color",
            str(DOCKERFILE),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_dockerfile_ignores_carry_a_reason() -> None:
    """Each inline `hadolint ignore` pragma is preceded by a comment that says why."""
    lines = DOCKERFILE.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines):
        if re.match(r"\s*#\s*hadolint\s+ignore=", line):
            previous = lines[number - 1].strip() if number else ""
            assert previous.startswith("#") and "hadolint" not in previous, (
                f"Dockerfile:{number + 1}: say why above the ignore pragma"
            )


# --- the deploying guide --------------------------------------------------------


def test_deploying_doc_names_exist_in_manifests() -> None:
    """Each example, Secret, container and object named in docs/deploying.md exists."""
    text = DEPLOYING_DOC.read_text(encoding="utf-8")
    examples = set(re.findall(r"manifests/examples/([\w-]+)", text))
    assert examples, "the guide names no example"
    for example in examples:
        assert (EXAMPLES / example / "kustomization.yaml").is_file(), example
    objects = [obj for directory in _example_dirs() for obj in render(directory)]

    secret_names = set(re.findall(r"kubectl create secret generic ([\w.-]+)", text))
    assert secret_names == {CREDENTIALS_SECRET}
    mounted = {
        v["secret"]["secretName"]
        for _, pod in pod_specs(objects)
        for v in pod.get("volumes", [])
        if "secret" in v
    }
    assert secret_names <= mounted

    names = {(obj["kind"].lower(), obj["metadata"]["name"]) for obj in objects}
    aliases = {
        "deploy": "deployment",
        "deployment": "deployment",
        "job": "job",
        "cronjob": "cronjob",
    }
    for alias, name in re.findall(r"(?<![/\w])(deploy|deployment|cronjob|job)/([\w-]+)", text):
        assert (aliases[alias], name) in names, f"{alias}/{name} is not in the manifests"

    container_names = {c["name"] for _, pod in pod_specs(objects) for c in containers(pod)}
    for container in re.findall(r"(?:-c|--container)[ =]([\w-]+)", text):
        assert container in container_names, container
    assert f"{HTTP_PORT}" in text and "/readyz" in text and "/metrics" in text
