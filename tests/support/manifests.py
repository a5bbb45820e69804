"""The rendered manifests read as Kubernetes would: kustomize rendering, pod specs and their
containers, the refresher's flags and mounts, and the hardening every container must have.
Shared by the manifest, chart and injection tests (tests/deploy)."""

from __future__ import annotations

import functools
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "manifests"
EXAMPLES = MANIFESTS / "examples"
# Tools come from the project's venv (pyproject's test extra), never from PATH:
# a machine's own kubectl may be older and render differently.
VENV_BIN = Path(sys.executable).parent
KUBECTL = VENV_BIN / "kubectl"
KUBERNETES_VALIDATE = VENV_BIN / "kubernetes-validate"
REFRESHER_IMAGE = "ghcr.io/example/ims-token-refresher"
REFRESHER_UID = 65532
Obj = dict[str, Any]


def directory_id(directory: Path) -> str:
    return directory.relative_to(MANIFESTS).as_posix()


def _missing_local_resources(directory: Path) -> list[str]:
    """Local paths a kustomization refers to that are not written yet."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text(encoding="utf-8"))
    entries = [*kustomization.get("resources", []), *kustomization.get("components", [])]
    return [entry for entry in entries if "://" not in entry and not (directory / entry).exists()]


@functools.cache
def _kustomize(directory: Path) -> tuple[Obj, ...]:
    result = subprocess.run(
        [str(KUBECTL), "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"kubectl kustomize {directory_id(directory)}:\n{result.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def render(directory: Path) -> list[Obj]:
    """The objects `kubectl apply -k directory` would send, or skip if a dependency is missing."""
    missing = _missing_local_resources(directory)
    if missing:
        # manifests/base (RBAC) is written by another change; render once it lands.
        pytest.skip(f"{directory_id(directory)} refers to {missing}, not present yet")
    return list(_kustomize(directory))


def pod_templates(objects: list[Obj]) -> Iterator[tuple[str, Obj]]:
    """(kind/name, pod template or Pod) for every workload among the objects."""
    for obj in objects:
        kind, spec = obj["kind"], obj.get("spec", {})
        if kind == "Pod":
            template = obj
        elif kind == "CronJob":
            template = spec["jobTemplate"]["spec"]["template"]
        elif kind in {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}:
            template = spec["template"]
        else:
            continue
        yield f"{kind}/{obj['metadata']['name']}", template


def pod_specs(objects: list[Obj]) -> Iterator[tuple[str, Obj]]:
    """(kind/name, pod spec) for every workload among the objects."""
    for name, template in pod_templates(objects):
        yield name, template["spec"]


def containers(pod: Obj) -> list[Obj]:
    return [*pod.get("initContainers", []), *pod.get("containers", [])]


def is_refresher(container: Obj) -> bool:
    return container["image"].split("@")[0].rsplit(":", 1)[0] == REFRESHER_IMAGE


def project_version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"][
        "version"
    ]


def hardening_violations(pod: Obj, container: Obj) -> list[str]:
    pod_context = pod.get("securityContext", {})
    context = container.get("securityContext", {})

    def effective(key: str) -> Any:
        # These four may be set on the pod and overridden per container.
        return context.get(key, pod_context.get(key))

    problems = []
    if effective("runAsNonRoot") is not True:
        problems.append("runAsNonRoot is not true")
    user, group = effective("runAsUser"), effective("runAsGroup")
    if is_refresher(container):
        if (user, group) != (REFRESHER_UID, REFRESHER_UID):
            problems.append(f"runs as {user}:{group}, not {REFRESHER_UID}:{REFRESHER_UID}")
    elif not isinstance(user, int) or user == 0 or not isinstance(group, int):
        # runAsNonRoot alone fails at start for images whose USER is root (busybox).
        problems.append(f"runs as {user}:{group}; set a numeric non-root runAsUser/runAsGroup")
    if (effective("seccompProfile") or {}).get("type") != "RuntimeDefault":
        problems.append("seccompProfile is not RuntimeDefault")
    if context.get("readOnlyRootFilesystem") is not True:
        problems.append("readOnlyRootFilesystem is not true")
    if context.get("allowPrivilegeEscalation") is not False:
        problems.append("allowPrivilegeEscalation is not false")
    capabilities = context.get("capabilities", {})
    if capabilities.get("drop") != ["ALL"] or capabilities.get("add"):
        problems.append(f"capabilities are {capabilities}, not drop: [ALL]")
    return problems
