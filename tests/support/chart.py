"""The Helm chart rendered as a cluster would get it (`helm template` per Kubernetes version
and values, cached), the kustomize examples beside it, and readers for its objects:
one object by kind, the injector's container and flags, the webhook's problems."""

from __future__ import annotations

import functools
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.support.manifests import EXAMPLES

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "ims-token-refresher"
INJECTOR_EXAMPLE = EXAMPLES / "injector"
VENV_BIN = Path(sys.executable).parent
HELM = VENV_BIN / "helm"
KUBECTL = VENV_BIN / "kubectl"
REFRESHER = VENV_BIN / "refresher"
# The chart's kubeVersion floor (native sidecars) and the newest schema set
# kubernetes-validate ships.
KUBE_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
OPT_IN_LABEL = "ims-token-refresher.io/inject"
RELEASE, NAMESPACE = "itr", "tools"
DEFAULTS: tuple[str, ...] = ()
Obj = dict[str, Any]


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    if not HELM.is_file():
        pytest.skip(f"no helm at {HELM} (make helm installs the pinned release)")
    return subprocess.run(
        [str(HELM), *args], capture_output=True, text=True, timeout=60, check=False
    )


@functools.cache
def _template(kube_version: str, settings: tuple[str, ...]) -> tuple[Obj, ...]:
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE]
    args += ["--kube-version", kube_version]
    for setting in settings:
        args += ["--set", setting]
    result = helm(*args)
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def render(
    settings: tuple[str, ...] = DEFAULTS, kube_version: str = KUBE_VERSIONS[-1]
) -> list[Obj]:
    """The objects `helm install` would create with these --set values."""
    return list(_template(kube_version, settings))


@functools.cache
def kustomize(directory: Path) -> tuple[Obj, ...]:
    result = subprocess.run(
        [str(KUBECTL), "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def the(objects: list[Obj], kind: str, name_suffix: str = "") -> Obj:
    """The one object of this kind (whose name ends with name_suffix)."""
    (found,) = [
        o for o in objects if o["kind"] == kind and o["metadata"]["name"].endswith(name_suffix)
    ]
    return found


def injector_container(objects: list[Obj]) -> Obj:
    pod = the(objects, "Deployment", "injector")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return container


def flags(container: Obj) -> dict[str, str]:
    """--flag=value arguments as a dict (the chart writes them in that form)."""
    return dict(
        word.removeprefix("--").split("=", 1) for word in container["args"] if word.startswith("--")
    )


def webhook_problems(objects: list[Obj], namespace: str) -> Iterator[str]:
    """The webhook's contract (docs/SPEC.md, "Helm chart"), for the chart and the example."""
    configuration = the(objects, "MutatingWebhookConfiguration")
    (webhook,) = configuration["webhooks"]
    service = the(objects, "Service", "injector")
    expected = {
        "admissionReviewVersions": ["v1"],
        "sideEffects": "None",
        "failurePolicy": "Fail",
        "objectSelector": {"matchLabels": {OPT_IN_LABEL: "true"}},
    }
    for key, value in expected.items():
        if webhook.get(key) != value:
            yield f"{key} is {webhook.get(key)!r}, not {value!r}"
    if not 1 <= webhook.get("timeoutSeconds", 10) <= 10:
        yield f"timeoutSeconds {webhook.get('timeoutSeconds')} is not short"
    excluded = {
        value
        for expression in webhook["namespaceSelector"]["matchExpressions"]
        if expression["key"] == "kubernetes.io/metadata.name" and expression["operator"] == "NotIn"
        for value in expression["values"]
    }
    if not {"kube-system", namespace} <= excluded:
        yield f"namespaces {sorted(excluded)} leave out kube-system or {namespace}"
    if [(r["operations"], r["resources"]) for r in webhook["rules"]] != [(["CREATE"], ["pods"])]:
        yield f"rules {webhook['rules']} are not pod creation only"
    target = webhook["clientConfig"]["service"]
    if (target["name"], target["namespace"], target["path"]) != (
        service["metadata"]["name"],
        namespace,
        "/mutate",
    ):
        yield f"clientConfig {target} is not the injector Service's /mutate"
    if target.get("port", 443) != service["spec"]["ports"][0]["port"]:
        yield "clientConfig port is not the Service's"


def injector_help() -> str:
    result = subprocess.run(
        [str(REFRESHER), "injector", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if result.returncode != 0 and "invalid choice" in result.stderr:
        pytest.skip("`refresher injector` does not exist yet (the injection issue adds it)")
    assert result.returncode == 0, result.stderr
    return result.stdout
