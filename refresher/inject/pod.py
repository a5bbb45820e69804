"""The injection itself: one pod (or pod template) and its annotations in, the injected copy out.

Pure and total: no I/O, no clock, the input is never mutated, and any input that is
not a pod the function understands ends in `Refused` with one line naming the
annotation or the name at fault, never in another exception (the admission
webhook feeds it whatever the API server, or an attacker, sends).
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

Obj = dict[str, Any]

PREFIX = "ims-token-refresher.io/"
LABEL = PREFIX + "inject"
STATUS = PREFIX + "status"
INJECTED = "injected"

CREDENTIALS_SECRET = "credentials-secret"  # noqa: S105 - a name, not a secret
TOKEN_PATH = "token-path"  # noqa: S105 - a name, not a secret
CONTAINERS = "containers"
MODE = "mode"
FLOW = "flow"
IMS_ENDPOINT = "ims-endpoint"
ANNOTATIONS = (CREDENTIALS_SECRET, TOKEN_PATH, CONTAINERS, MODE, FLOW, IMS_ENDPOINT, "status")

CONTAINER = "ims-token-refresher"
CREDENTIALS_VOLUME = "ims-token-refresher-credentials"
TOKEN_VOLUME = "ims-token-refresher-token"  # noqa: S105 - a name, not a secret
# Paths inside the refresher's own container: fixed, whatever token-path the app uses.
CREDENTIALS_DIR = "/etc/adobe-ims"
TOKEN_DIR = "/var/run/adobe-ims"  # noqa: S105 - a name, not a secret
DEFAULT_TOKEN_PATH = TOKEN_DIR
PROBE_PORT = 9876
UID = 65532

Mode = Literal["sidecar", "init"]
Flow = Literal["auto", "jwt", "oauth"]

_SECRET_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
# Conservative on purpose: a path the kubelet, a shell and a YAML reader all take literally.
_PATH = re.compile(r"(/[A-Za-z0-9._@+-]+)+")
_HOST = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?(:[0-9]{1,5})?")
# Where the token volume must not go: a mount there (or above) hides what the
# application's image or the kubelet puts there, and the runtime refuses mounts in
# /proc, /sys and /dev. Exact names: the image's own top-level directories.
_SYSTEM_DIRS = frozenset(
    [
        "/bin",
        "/boot",
        "/etc",
        "/home",
        "/lib",
        "/lib32",
        "/lib64",
        "/opt",
        "/root",
        "/run",
        "/sbin",
        "/srv",
        "/tmp",  # noqa: S108 - a name to refuse, not a file
        "/usr",
        "/var",
    ]
)
_NO_MOUNT_UNDER = ("/proc", "/sys", "/dev")
# Mounted by the kubelet into every container (the service account token: the API
# server adds its mount only where no container mounts that path already).
_KUBELET_PATHS = (
    "/var/run/secrets/kubernetes.io/serviceaccount",
    "/run/secrets/kubernetes.io/serviceaccount",
    "/etc/hosts",
    "/etc/hostname",
    "/etc/resolv.conf",
)
_TERMINATION_LOG = "/dev/termination-log"
# Fields that let another container of the pod see the refresher's processes, and so,
# through /proc/<pid>/root and /proc/<pid>/environ, its credentials.
_PROCESS_SHARING = ("shareProcessNamespace", "hostPID")


class Refused(ValueError):
    """An opted-in pod that cannot be injected; the message is one line for the user."""


def shown(value: object, limit: int = 80) -> str:
    """A name or value from the pod, for a message: one line, bounded, quoted if odd.

    Pod authors (and, on the webhook's port, anyone) choose these strings: a newline
    in a container name must not forge a second line of `inject`'s stderr or a log.
    """
    text = str(value)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text if text.isprintable() and " " not in text else repr(text)


@dataclass(frozen=True)
class Options:
    """The pod's annotations, validated."""

    credentials_secret: str
    token_path: str
    containers: tuple[str, ...] | None
    """Application containers that get the token volume; None: every container."""
    mode: Mode
    flow: Flow
    ims_endpoint: str | None


@dataclass(frozen=True)
class Outcome:
    result: Literal["injected", "unchanged"]
    pod: Obj
    """The injected pod, or (unchanged) a shallow copy of the input. It shares what did not
    change with the input: treat both as immutable, or copy."""
    reason: str
    """Why: "injected", "not opted in" or "already injected"."""


def opted_in(template: Mapping[str, Any]) -> bool:
    metadata = template.get("metadata")
    labels = metadata.get("labels") if isinstance(metadata, Mapping) else None
    return isinstance(labels, Mapping) and labels.get(LABEL) == "true"


def inject_pod(template: Mapping[str, Any], *, image: str) -> Outcome:
    """The pod (or pod template: any mapping with `metadata` and `spec`) with the refresher.

    A pod without the opt-in label, or already injected, comes back unchanged.
    Raises `Refused` for an opted-in pod that cannot be injected as asked.
    """
    if not opted_in(template):
        return Outcome("unchanged", dict(template), "not opted in")
    annotations = _annotations(template)
    spec = template.get("spec")
    if not isinstance(spec, Mapping):
        raise Refused("spec must be an object")
    if annotations.get(STATUS) == INJECTED and CONTAINER in _names(spec, "initContainers"):
        return Outcome("unchanged", dict(template), "already injected")
    options = parse_options(annotations)
    spec = _injected_spec(spec, options, image)
    metadata = template["metadata"]
    annotations = {**(metadata.get("annotations") or {}), STATUS: INJECTED}
    # Copied along the paths that change only: the rest is shared with the input (which
    # is never mutated), so that the webhook's diff skips it by identity.
    pod = {**template, "metadata": {**metadata, "annotations": annotations}, "spec": spec}
    return Outcome("injected", pod, INJECTED)


def _annotations(template: Mapping[str, Any]) -> dict[str, str]:
    annotations = template["metadata"].get("annotations") or {}
    if not isinstance(annotations, Mapping):
        raise Refused("metadata.annotations must be an object")
    for key, value in annotations.items():
        if isinstance(key, str) and key.startswith(PREFIX) and not isinstance(value, str):
            raise Refused(f"annotation {shown(key)} must be a string")
    return {k: v for k, v in annotations.items() if isinstance(k, str) and isinstance(v, str)}


def parse_options(annotations: Mapping[str, str]) -> Options:
    """Validated options from the annotations; `Refused` names the first one at fault."""
    ours = {k.removeprefix(PREFIX): v for k, v in annotations.items() if k.startswith(PREFIX)}
    unknown = sorted(set(ours) - set(ANNOTATIONS))
    if unknown:
        known = ", ".join(ANNOTATIONS[:-1])
        raise Refused(f"unknown annotation {shown(PREFIX + unknown[0])} (known: {known})")
    secret = ours.get(CREDENTIALS_SECRET)
    if secret is None:
        raise Refused(f"annotation {PREFIX}{CREDENTIALS_SECRET} is required")
    if len(secret) > 253 or not _SECRET_NAME.fullmatch(secret):
        _invalid(CREDENTIALS_SECRET, secret, "not a Secret name")
    return Options(
        credentials_secret=secret,
        token_path=_token_path_option(ours.get(TOKEN_PATH, DEFAULT_TOKEN_PATH)),
        containers=_containers_option(ours.get(CONTAINERS)),
        mode=_choice(ours, MODE, ("sidecar", "init"), "sidecar"),  # type: ignore[arg-type]
        flow=_choice(ours, FLOW, ("auto", "jwt", "oauth"), "auto"),  # type: ignore[arg-type]
        ims_endpoint=_endpoint_option(ours.get(IMS_ENDPOINT)),
    )


def _invalid(name: str, value: str, why: str) -> None:
    short = value if len(value) <= 80 else value[:77] + "..."
    raise Refused(f"annotation {PREFIX}{name}: {short!r} is {why}")


def _token_path_option(path: str) -> str:
    if (
        len(path) > 1024
        or not _PATH.fullmatch(path)
        or posixpath.normpath(path) != path
        or ".." in path.split("/")
    ):
        _invalid(TOKEN_PATH, path, "not a normalized absolute path of letters, digits, ._@+-")
    if path in _SYSTEM_DIRS or any(_within(path, top) for top in _NO_MOUNT_UNDER):
        _invalid(TOKEN_PATH, path, "a system directory: the mount would hide it")
    for kubelet in _KUBELET_PATHS:
        if _within(kubelet, path):
            _invalid(TOKEN_PATH, path, f"at or above {kubelet}, which the kubelet mounts")
    return path


def _within(path: str, directory: str) -> bool:
    """`path` is `directory` or below it (both normalized)."""
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def _choice(ours: Mapping[str, str], name: str, choices: tuple[str, ...], default: str) -> str:
    value = ours.get(name, default)
    if value not in choices:
        _invalid(name, value, f"not one of {', '.join(choices)}")
    return value


def _containers_option(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    names = tuple(dict.fromkeys(part.strip() for part in text.split(",")))
    if not names or "" in names:
        _invalid(CONTAINERS, text, "not a comma-separated list of container names")
    return names


_NOT_AN_ENDPOINT = "not a host or an https URL"


def _endpoint_option(text: str | None) -> str | None:
    if text is None:
        return None
    problem = _endpoint_text_problem(text) or _endpoint_url_problem(text)
    if problem:
        _invalid(IMS_ENDPOINT, text, problem)
    return text


def _endpoint_text_problem(text: str) -> str | None:
    """What in the text itself makes it no host or URL to hand the refresher, or None."""
    if len(text) > 2048 or any(c.isspace() or not c.isprintable() for c in text):
        return _NOT_AN_ENDPOINT
    if not text.isascii():
        # A homograph (a Cyrillic letter in adobelogin.com) reads as Adobe's host in a review.
        return f"{_NOT_AN_ENDPOINT} (IDN hosts: use punycode)"
    if "$" in text:
        # The kubelet expands $(VAR) in args from the container's environment (which
        # always has KUBERNETES_SERVICE_HOST): the refresher would get another host.
        return f"{_NOT_AN_ENDPOINT} ($ is expanded by the kubelet)"
    if "@" in text:
        # Anyone who can read the pod reads its annotations; the refresher drops userinfo.
        return f"{_NOT_AN_ENDPOINT} (no user:password@)"
    if "://" not in text and not _HOST.fullmatch(text):
        return _NOT_AN_ENDPOINT
    return None


def _endpoint_url_problem(text: str) -> str | None:
    """Why `text` (a host, or a URL) is no https URL with a host, or None."""
    try:
        parts = urlsplit(text if "://" in text else f"https://{text}")
        ok = parts.scheme == "https" and bool(parts.hostname) and parts.port != 0
    except ValueError:  # a port out of range, an unbalanced bracket
        ok = False
    # The injected refresher runs without --allow-insecure-http: plain http could never work.
    return None if ok else "not an https URL or a host"


# --- the spec -------------------------------------------------------------------


def _objects(holder: Mapping[str, Any], key: str, where: str) -> list[Obj]:
    """`holder[key]` as a list of objects ([] when absent), or `Refused`."""
    value = holder.get(key)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise Refused(f"{where}.{key} must be a list of objects")
    return value


def _names(spec: Mapping[str, Any], key: str) -> list[str]:
    return [str(item.get("name")) for item in _objects(spec, key, "spec")]


def _injected_spec(spec: Mapping[str, Any], options: Options, image: str) -> Obj:
    apps = _objects(spec, "containers", "spec")
    if not apps:
        raise Refused("spec.containers must list at least one container")
    _check_collisions(spec)
    _check_pod_level(spec, options)
    selected = {id(container) for container in _selected(apps, options)}
    mount = {"name": TOKEN_VOLUME, "mountPath": options.token_path, "readOnly": True}
    containers = [
        _with_mount(app, mount, options.token_path) if id(app) in selected else app for app in apps
    ]
    context = _security_context(spec)
    changes: Obj = {
        "initContainers": [
            refresher_container(options, image),
            *_objects(spec, "initContainers", "spec"),
        ],
        "containers": containers,
        "volumes": [*_objects(spec, "volumes", "spec"), *volumes(options)],
        **context,
    }
    injected: Obj = {}
    for key, value in spec.items():
        if key == "containers" and "initContainers" not in spec:
            injected["initContainers"] = None  # written before containers, where people look
        injected[key] = value
    injected.update(changes)
    return injected


def _security_context(spec: Mapping[str, Any]) -> Obj:
    """The pod's securityContext with an fsGroup, as a change ({} when it has one)."""
    context = spec.get("securityContext")
    if context is not None and not isinstance(context, Mapping):
        raise Refused("spec.securityContext must be an object")
    if context is None or context.get("fsGroup") is None:
        # The token files are 0440: the application reads them through this group.
        return {"securityContext": {**(context or {}), "fsGroup": UID}}
    return {}


def _with_mount(container: Obj, mount: Obj, token_path: str) -> Obj:
    """A copy of `container` that also mounts the token volume (read-only) at token-path."""
    name = container.get("name")
    mounts = _objects(container, "volumeMounts", f"container {shown(name)}")
    devices = _objects(container, "volumeDevices", f"container {shown(name)}")
    for existing, key in [(m, "mountPath") for m in mounts] + [(d, "devicePath") for d in devices]:
        # Replacing that mount would hide the user's volume; skipping the container
        # would leave it without a token in a pod that looks injected: refuse. The
        # API server compares paths as strings, the runtime after normalizing them.
        path = posixpath.normpath("/" + str(existing.get(key, "")).lstrip("/"))
        if _within(path, token_path):
            raise Refused(
                f"container {shown(name)} already mounts volume {shown(existing.get('name'))}"
                f" at {shown(existing.get(key))}"
                f" (annotation {PREFIX}{TOKEN_PATH}: {token_path})"
            )
    # The kubelet mounts a file there: inside a read-only volume it could not.
    message_path = container.get("terminationMessagePath") or _TERMINATION_LOG
    if _within(str(message_path), token_path):
        raise Refused(
            f"container {shown(name)} has its terminationMessagePath {shown(message_path)}"
            f" under annotation {PREFIX}{TOKEN_PATH}: {token_path}"
        )
    return {**container, "volumeMounts": [*mounts, dict(mount)]}


def _check_collisions(spec: Mapping[str, Any]) -> None:
    for key in ("initContainers", "containers", "ephemeralContainers"):
        if CONTAINER in _names(spec, key):
            raise Refused(f"container name {CONTAINER} is already taken")
    taken = set(_names(spec, "volumes")) & {CREDENTIALS_VOLUME, TOKEN_VOLUME}
    if taken:
        raise Refused(f"volume name {sorted(taken)[0]} is already taken")
    for key in ("initContainers", "containers", "ephemeralContainers"):
        for container in _objects(spec, key, "spec"):
            _check_container(container)


def _check_container(container: Obj) -> None:
    """Neither the probe port nor either volume name (the pod would, once injected, give
    this container the credentials, or the token read-write) already in use."""
    where = f"container {shown(container.get('name'))}"
    for port in _objects(container, "ports", where):
        if port.get("containerPort") == PROBE_PORT:
            raise Refused(
                f"port {PROBE_PORT} (the refresher's probe port) is already declared by {where}"
            )
    for key in ("volumeMounts", "volumeDevices"):
        for mount in _objects(container, key, where):
            if mount.get("name") in (CREDENTIALS_VOLUME, TOKEN_VOLUME):
                raise Refused(f"volume name {mount['name']} is already taken (in {key} of {where})")


def _check_pod_level(spec: Mapping[str, Any], options: Options) -> None:
    """A Linux pod; a running sidecar must not share its processes or the node's network."""
    operating_system = spec.get("os")
    if isinstance(operating_system, Mapping) and operating_system.get("name") not in (
        None,
        "linux",
    ):
        # The API server refuses Linux-only fields (seccomp, runAsUser) in such a pod.
        raise Refused(
            f"spec.os.name: {shown(operating_system.get('name'))}: the refresher runs on Linux only"
        )
    if options.mode == "init":
        return  # it has exited before any other container starts, and binds no port
    for field in _PROCESS_SHARING:
        if spec.get(field) is True:
            raise Refused(
                f"spec.{field}: the application could read the refresher's credentials"
                f" through /proc; use annotation {PREFIX}{MODE}: init, or drop {field}"
            )
    if spec.get("hostNetwork") is True:
        raise Refused(
            f"spec.hostNetwork: the refresher's probe port {PROBE_PORT} would be bound on the"
            f" node (one such pod per node); use annotation {PREFIX}{MODE}: init"
        )


def _selected(apps: list[Obj], options: Options) -> list[Obj]:
    if options.containers is None:
        return apps
    by_name = {str(app.get("name")): app for app in apps}
    for name in options.containers:
        if name not in by_name:
            _invalid(CONTAINERS, name, "not a container of this pod")
    return [by_name[name] for name in options.containers]


# --- what is added --------------------------------------------------------------


def refresher_args(options: Options) -> list[str]:
    command = "run" if options.mode == "sidecar" else "once"
    args = [command, "--credentials", CREDENTIALS_DIR, "--token-dir", TOKEN_DIR]
    if options.flow != "auto":
        args += ["--flow", options.flow]
    if options.ims_endpoint is not None:
        args += ["--ims-endpoint", options.ims_endpoint]
    return args


def _http_probe(path: str, period_s: int, failures: int) -> Obj:
    return {
        "httpGet": {"path": path, "port": "http"},
        "periodSeconds": period_s,
        "timeoutSeconds": 2,
        "failureThreshold": failures,
    }


def refresher_container(options: Options, image: str) -> Obj:
    """The init container: a native sidecar running `run`, or a classic one running `once`."""
    container: Obj = {"name": CONTAINER, "image": image}
    if options.mode == "sidecar":
        container["restartPolicy"] = "Always"
    container["args"] = refresher_args(options)
    if options.mode == "sidecar":
        container["ports"] = [{"name": "http", "containerPort": PROBE_PORT, "protocol": "TCP"}]
        # Up to 5 minutes for the first token (IMS retries with backoff): the
        # application's containers start only once this succeeds.
        container["startupProbe"] = _http_probe("/readyz", 2, 150)
        container["readinessProbe"] = _http_probe("/readyz", 10, 3)
        # The refresh loop, never IMS reachability: an outage is no restart storm.
        container["livenessProbe"] = _http_probe("/healthz", 10, 3)
    # Sized from docs/benchmarks.md (~43 MiB steady RSS, idle CPU well under 1m).
    container["resources"] = {
        "requests": {"cpu": "5m", "memory": "48Mi"},
        "limits": {"memory": "96Mi"},
    }
    container["securityContext"] = {
        "runAsNonRoot": True,
        "runAsUser": UID,
        "runAsGroup": UID,
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    container["terminationMessagePolicy"] = "FallbackToLogsOnError"
    container["volumeMounts"] = [
        {"name": CREDENTIALS_VOLUME, "mountPath": CREDENTIALS_DIR, "readOnly": True},
        {"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR},
    ]
    return container


def volumes(options: Options) -> list[Obj]:
    return [
        {
            "name": CREDENTIALS_VOLUME,
            "secret": {"secretName": options.credentials_secret, "defaultMode": 0o440},
        },
        # In memory: the token never touches the node's disk; room for two snapshots.
        {"name": TOKEN_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}},
    ]
