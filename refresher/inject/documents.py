"""Where the pod templates are in Kubernetes objects, for `refresher inject`.

Pure like the rest of the package: parsed documents in, injected documents out;
reading and writing YAML is the CLI's business.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from refresher.inject.pod import LABEL, Obj, Refused, inject_pod, opted_in, shown

# kind -> the keys leading from the object to its pod template.
TEMPLATE_PATHS: dict[str, tuple[str, ...]] = {
    "Pod": (),
    "Deployment": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "ReplicaSet": ("spec", "template"),
    "Job": ("spec", "template"),
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
    "ReplicationController": ("spec", "template"),
    "PodTemplate": ("template",),
}


@dataclass
class Report:
    """What happened to the documents: injected names, refusals, and hints for the user."""

    injected: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    """One line each: `Kind/name: why`."""
    hints: list[str] = field(default_factory=list)


def describe(document: Mapping[str, Any]) -> str:
    metadata = document.get("metadata")
    name = metadata.get("name") if isinstance(metadata, Mapping) else None
    if name is None and isinstance(metadata, Mapping):
        name = metadata.get("generateName")
    return f"{shown(document.get('kind'))}/{shown(name, 253)}"


def inject_documents(documents: list[Any], *, image: str) -> tuple[list[Any], Report]:
    """Every opted-in pod template injected; every other document as it was."""
    report = Report()
    return [_document(doc, image, report) for doc in documents], report


def _document(document: Any, image: str, report: Report) -> Any:
    if not isinstance(document, dict):
        return document
    kind = document.get("kind")
    items = document.get("items")
    if isinstance(kind, str) and kind.endswith("List") and isinstance(items, list):
        return {**document, "items": [_document(item, image, report) for item in items]}
    path = TEMPLATE_PATHS.get(kind) if isinstance(kind, str) else None
    if path is None:
        _hint_unknown_kind(document, report)
        return document
    template = _at(document, path)
    if not isinstance(template, dict):
        return document
    _hint_misplaced_opt_in(document, template, report)
    try:
        outcome = inject_pod(template, image=image)
    except Refused as exc:
        report.refused.append(f"{describe(document)}: {exc}")
        return document
    if outcome.result == "unchanged":
        return document
    report.injected.append(describe(document))
    return _replaced(document, path, outcome.pod)


def _at(document: Obj, path: tuple[str, ...]) -> Any:
    node: Any = document
    for key in path:
        if not isinstance(node, dict):
            return None
        node = node.get(key)
    return node


def _replaced(node: Any, path: tuple[str, ...], value: Obj) -> Any:
    if not path:
        return value
    return {**node, path[0]: _replaced(node[path[0]], path[1:], value)}


def _hint_misplaced_opt_in(document: Obj, template: Obj, report: Report) -> None:
    """An opt-in written where the webhook never looks is a silent no-op: say so."""
    if opted_in(template):
        return
    pod_labels = _at(template, ("metadata", "labels"))
    pod_annotations = _at(template, ("metadata", "annotations"))
    workload_labels = _at(document, ("metadata", "labels")) if template is not document else None
    where = None
    if isinstance(pod_labels, dict) and LABEL in pod_labels:
        where = f'label {LABEL} is {str(pod_labels[LABEL])[:80]!r}, not "true"'
    elif isinstance(pod_annotations, dict) and LABEL in pod_annotations:
        where = f"{LABEL} is an annotation; it must be a label of the pod"
    elif isinstance(workload_labels, dict) and LABEL in workload_labels:
        where = f"{LABEL} is a label of the {document.get('kind')}; it must be on its pod template"
    if where is not None:
        report.hints.append(f"{describe(document)}: {where}: not injected")


def _hint_unknown_kind(document: Obj, report: Report) -> None:
    """An opted-in `spec.template` of a kind not listed (a Rollout, a custom resource) is
    left as it is: only the webhook injects it, when its pods are created. Say so."""
    template = _at(document, ("spec", "template"))
    if isinstance(template, dict) and opted_in(template):
        report.hints.append(
            f"{describe(document)}: kind {shown(document.get('kind'))} is not one"
            f" refresher inject knows ({', '.join(TEMPLATE_PATHS)}): not injected"
        )
