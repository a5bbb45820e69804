"""Publish the token to a Kubernetes Secret. The only module that imports `kubernetes`.

Concurrency: several replicas may share one Secret, so every write is a
read-modify-write guarded by `metadata.resourceVersion`. We PUT back the object we
read (rather than a merge patch carrying `resourceVersion`): a PUT replaces exactly
the state we looked at, so the precondition and the content cannot disagree, and a
409 means precisely "someone wrote since you read". Keys, labels and annotations
that users put on the Secret travel through untouched because they are in the
object we read. A missing Secret is created (POST); it is never deleted and
re-created, so readers never see it vanish. On a conflict we re-read and, if the
other writer left a token that outlives ours (`schedule.outlives`, the one adoption
rule), return it for the caller to adopt instead of overwriting it (Adobe throttles
integrations that mint too many tokens). What we put in the Secret and what we accept
back from it are in `refresher.sinks.secretdata`.

Memory (the process must stay under 60 MiB RSS): importing any `kubernetes`
submodule runs the package `__init__`, which loads the config loaders, pydantic,
oauthlib, yaml and the client package. The model classes and the API classes load
lazily (client 37 and later), and `CoreV1Api` with the models it references would
cost more than all of that again, so we touch neither: the official client does
what it is good at (kubeconfig and in-cluster config, auth with rotating
service-account tokens and exec plugins, TLS, proxies, the urllib3 pool of
`RESTClientObject`) and we send and read plain JSON dicts. The budget is pinned by
tests/unit/test_secret_sink.py::test_secret_mode_memory.
"""

from __future__ import annotations

import importlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from refresher.clock import Clock
from refresher.errors import ConfigError, PublishError
from refresher.logs import redact
from refresher.schedule import outlives
from refresher.sinks.secretdata import MANAGER, new_secret, same_token, with_token
from refresher.sinks.secretdata import held_token as _held_token  # its tests' name
from refresher.token import AccessToken

DEFAULT_SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
RBAC_HINT = "grant it to the ServiceAccount (see manifests/base/rbac.yaml)"

# Read-modify-write rounds before giving up on a Secret that keeps changing under
# us; the caller then backs off and tries again later.
WRITE_ATTEMPTS = 5
# (connect, read) seconds for every API request: a hung apiserver must not hang
# the refresh loop past the token's expiry.
DEFAULT_TIMEOUT_S = (5.0, 15.0)

_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
# urllib3 prefixes its errors with object reprs and pool descriptions: noise in a log line.
_NOISE = re.compile(r"<[^<>]*? object at 0x[0-9a-f]+>:?\s*|HTTPS?Connection(Pool)?\([^)]*\):\s*")
_MAX_DETAIL = 200
# What we parse of the API's answers. A Secret holds at most 1 MiB of data (base64 in
# JSON: ~1.4 MiB); an answer past this cap is not a Secret we wrote, and is refused
# unread rather than held in memory.
MAX_REPLY_BYTES = 2 * 1024 * 1024

_log = logging.getLogger(__name__)

JsonObj = dict[str, Any]


@dataclass(frozen=True)
class _Reply:
    """One API answer: the HTTP status and the JSON body (None if it was not JSON)."""

    status: int
    reason: str
    body: JsonObj | None
    oversized: bool = False
    """The body exceeded MAX_REPLY_BYTES and was not read."""

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def status_reason(self) -> str:
        """The `reason` of a `Status` body (Conflict vs AlreadyExists share HTTP 409)."""
        if self.body is not None and self.body.get("kind") == "Status":
            return str(self.body.get("reason") or "")
        return ""

    @property
    def status_kind(self) -> str:
        """`details.kind` of a `Status` body: tells a missing namespace from a missing Secret."""
        if self.body is not None and isinstance(self.body.get("details"), dict):
            return str(self.body["details"].get("kind") or "")
        return ""

    @property
    def status_message(self) -> str:
        if self.body is not None and self.body.get("kind") == "Status":
            return str(self.body.get("message") or "")
        return ""


class SecretSink:
    """Publishes `token.published_files()` into one Secret; see the module docstring.

    `in_cluster` and `kubeconfig` come from the composition root (only cli.py reads
    the environment): in a cluster, the pod's service account (`service_account_dir`
    holds its token, CA and namespace); otherwise `kubeconfig`, or the client's
    default (`$KUBECONFIG` or `~/.kube/config`) when None. `in_cluster=None` means
    "in a cluster if the service account token is mounted".
    """

    name = "secret"
    shared = True  # replicas of a Deployment write the same Secret

    def __init__(
        self,
        secret_name: str,
        namespace: str | None,
        *,
        clock: Clock,
        kubeconfig: Path | str | None = None,
        service_account_dir: Path = DEFAULT_SERVICE_ACCOUNT_DIR,
        in_cluster: bool | None = None,
        timeout_s: tuple[float, float] = DEFAULT_TIMEOUT_S,
    ) -> None:
        if not _DNS_SUBDOMAIN.match(secret_name) or len(secret_name) > 253:
            raise ConfigError(f"--secret {secret_name!r} is not a valid Secret name")
        self.secret_name = secret_name
        self.namespace = _resolve_namespace(namespace, service_account_dir)
        self._clock = clock
        self._timeout_s = timeout_s
        if in_cluster is None:
            in_cluster = (service_account_dir / "token").is_file()
        self._kube = _load_client(in_cluster, kubeconfig, service_account_dir)
        # A kubeconfig server may carry a path prefix (API proxies); keep it, minus a final "/".
        self.host: str = str(self._kube.configuration.host).rstrip("/")
        self._item_path = f"/api/v1/namespaces/{self.namespace}/secrets/{secret_name}"
        self._collection_path = f"/api/v1/namespaces/{self.namespace}/secrets"

    def __repr__(self) -> str:
        return f"SecretSink({self.namespace}/{self.secret_name} at {self.host})"

    # --- the Sink protocol -------------------------------------------------------

    def prepare(self) -> None:
        """Nothing to set up: the Secret is created by the first publish if missing."""

    def read_current(self) -> AccessToken | None:
        current = self._get()
        return _held_token(current, self._clock.now()) if current is not None else None

    def publish(self, token: AccessToken) -> AccessToken:
        for attempt in range(1, WRITE_ATTEMPTS + 1):
            current = self._get()
            held = _held_token(current, self._clock.now()) if current is not None else None
            settled = self._settled(held, token)
            if settled is not None:
                return settled
            reply = self._write(current, token)
            if reply.ok:
                return token
            # 409 Conflict (stale resourceVersion), 409 AlreadyExists (a concurrent
            # create) and 404 on PUT (deleted since our read) all mean: re-read.
            if reply.status == 409 or (reply.status == 404 and current is not None):
                _log.debug(
                    "the Secret changed while we wrote it; re-reading",
                    extra={"attempt": attempt, "reason": reply.status_reason or reply.status},
                )
                continue
            raise self._error(reply, "update" if current is not None else "create", token)
        raise PublishError(
            f"gave up after {WRITE_ATTEMPTS} conflicting writes on secrets/{self.secret_name} "
            f'in namespace "{self.namespace}": another writer keeps changing it',
            sink=self.name,
        )

    def _settled(self, held: AccessToken | None, token: AccessToken) -> AccessToken | None:
        """What the Secret already holds when no write is needed: `token` itself, or a
        token another writer published that outlives it (adopted); else None."""
        if held is None:
            return None
        if same_token(held, token):
            return token  # already there (e.g. our previous write's reply was lost)
        if outlives(held, token, self._clock.now()):
            _log.info(
                "another writer published a newer token to the Secret; adopting it",
                extra={"secret": self.secret_name, "namespace": self.namespace},
            )
            return held
        return None

    def _write(self, current: JsonObj | None, token: AccessToken) -> _Reply:
        """Create the Secret, or replace `current` (its resourceVersion is the precondition)."""
        now = self._clock.now()
        if current is None:
            new = new_secret(self.secret_name, self.namespace, token, now)
            return self._send("POST", self._collection_path, new)
        return self._send("PUT", self._item_path, with_token(current, token, now))

    # --- HTTP ----------------------------------------------------------------------

    def _get(self) -> JsonObj | None:
        reply = self._send("GET", self._item_path)
        if reply.ok and reply.body is not None:
            meta = reply.body.get("metadata")
            if not isinstance(meta, dict) or not isinstance(meta.get("resourceVersion"), str):
                # Without it, a PUT would have no precondition: refuse rather than guess.
                raise PublishError(
                    f'secrets/{self.secret_name} in namespace "{self.namespace}" came back '
                    "without metadata.resourceVersion: not a Secret object; not written",
                    sink=self.name,
                )
            return reply.body
        if reply.ok and reply.oversized:
            raise PublishError(
                f'secrets/{self.secret_name} in namespace "{self.namespace}" is larger than '
                f"{MAX_REPLY_BYTES} bytes: not a Secret this refresher wrote; not read",
                sink=self.name,
            )
        if reply.status == 404 and reply.status_kind != "namespaces":
            return None
        raise self._error(reply, "get", None)

    def _headers(self, body: JsonObj | None) -> dict[str, str]:
        """The request's headers, credentials included; raises PublishError without them."""
        headers = {"Accept": "application/json", "User-Agent": MANAGER}
        if body is not None:
            headers["Content-Type"] = "application/json"
        try:
            # Evaluated per request: the client's refresh hook re-reads rotated
            # service-account tokens and re-runs exec plugins here.
            for setting in self._kube.configuration.auth_settings().values():
                if setting.get("in") == "header" and setting.get("value"):
                    headers[setting["key"]] = setting["value"]
        except self._kube.config_errors as exc:
            raise PublishError(
                f"cannot get Kubernetes API credentials: {_short(exc)}", sink=self.name
            ) from None
        return headers

    def _send(self, method: str, path: str, body: JsonObj | None = None) -> _Reply:
        headers = self._headers(body)
        url = self.host + path + ("?fieldManager=" + MANAGER if method in ("PUT", "POST") else "")
        try:
            response = self._kube.rest.request(
                method, url, headers=headers, body=body, _request_timeout=self._timeout_s
            )
            raw = _read_capped(response)
            status, reason = int(response.status), str(response.reason or "")
            if raw is None:
                return _Reply(status, reason, None, oversized=True)
            return _Reply(status, reason, _parse(raw))
        except self._kube.api_exception as exc:
            # Older clients raise on non-2xx; all raise TLS failures with status 0.
            # Never chain it: its str() carries the whole response, headers and body.
            status, reason = getattr(exc, "status", 0), getattr(exc, "reason", "")
            if not status:
                raise self._unreachable(_short(reason)) from None
            return _Reply(int(status), str(reason or ""), _parse(getattr(exc, "body", None)))
        except self._kube.transport_errors as exc:
            raise self._unreachable(_short(exc)) from exc

    # --- errors --------------------------------------------------------------------

    def _unreachable(self, reason: str) -> PublishError:
        return PublishError(f"Kubernetes API unreachable at {self.host}: {reason}", sink=self.name)

    def _error(self, reply: _Reply, verb: str, token: AccessToken | None) -> PublishError:
        """One clear line per failure; never the body, never a token."""
        target = f"secrets/{self.secret_name}" if verb != "create" else "secrets"
        where = f'in namespace "{self.namespace}"'
        status = reply.status
        if status == 403:
            # Kubernetes cannot limit "create" by name: the Role grants it on all secrets.
            message = f'RBAC forbids "{verb}" on {target} {where}: {RBAC_HINT}'
        elif status == 404:
            message = f'namespace "{self.namespace}" not found'
        elif status == 401:
            message = (
                f"Kubernetes API at {self.host} rejected our credentials (401 Unauthorized): "
                "check the ServiceAccount token or the kubeconfig user"
            )
        elif status == 429 or status >= 500:
            return self._unreachable(f"HTTP {status} {reply.status_reason or reply.reason}".strip())
        elif status == 422:
            detail = _redact(reply.status_message, token)
            message = f"Kubernetes rejected secrets/{self.secret_name} {where} as invalid: {detail}"
        else:
            detail = _redact(reply.status_message, token) or reply.reason
            message = f'unexpected HTTP {status} on "{verb}" {target} {where}: {detail}'
        return PublishError(message, sink=self.name)


@dataclass(frozen=True)
class _Kube:
    """The parts of the official client we use, imported at construction only."""

    configuration: Any
    rest: Any
    api_exception: type[Exception]
    config_errors: tuple[type[Exception], ...]
    transport_errors: tuple[type[Exception], ...]


def _load_client(
    in_cluster: bool, kubeconfig: Path | str | None, service_account_dir: Path
) -> _Kube:
    """Import the client (lazily: refresher must not pay for it unless --secret is set)."""
    # importlib rather than `import` statements: lazy by construction, and the modules
    # are typed Any here, as their annotations differ between client releases.
    try:
        configuration_module = importlib.import_module("kubernetes.client.configuration")
        rest = importlib.import_module("kubernetes.client.rest")
        exceptions = importlib.import_module("kubernetes.client.exceptions")
        config_exception = importlib.import_module("kubernetes.config.config_exception")
        incluster = importlib.import_module("kubernetes.config.incluster_config")
        kube_config = importlib.import_module("kubernetes.config.kube_config")
        urllib3 = importlib.import_module("urllib3")
        yaml = importlib.import_module("yaml")
    except ImportError as exc:
        raise ConfigError(f"--secret needs the kubernetes package: {exc}") from None
    config_errors: tuple[type[Exception], ...] = (
        config_exception.ConfigException,
        OSError,
        ValueError,
        KeyError,
        TypeError,
        yaml.YAMLError,
    )
    configuration = configuration_module.Configuration()
    try:
        if in_cluster:
            # The loader reads KUBERNETES_SERVICE_HOST/PORT itself; we only point it
            # at the service account files (and re-read the token as kubelet rotates it).
            incluster.InClusterConfigLoader(
                token_filename=str(service_account_dir / "token"),
                cert_filename=str(service_account_dir / "ca.crt"),
            ).load_and_set(configuration)
        else:
            kube_config.load_kube_config(
                config_file=str(kubeconfig) if kubeconfig is not None else None,
                client_configuration=configuration,
                persist_config=False,
            )
    except config_errors as exc:
        where = "in-cluster" if in_cluster else f"kubeconfig {kubeconfig or '(default)'}"
        raise ConfigError(f"cannot load the Kubernetes {where} config: {_short(exc)}") from None
    # One immediate reconnect covers a stale pooled connection or a blip; anything
    # longer is the caller's backoff. Never resend a request that reached the server.
    configuration.retries = urllib3.Retry(total=1, connect=1, read=0, status=0, redirect=0)
    return _Kube(
        configuration=configuration,
        rest=rest.RESTClientObject(configuration),
        api_exception=exceptions.ApiException,
        config_errors=config_errors,
        transport_errors=(urllib3.exceptions.HTTPError, OSError),
    )


def _resolve_namespace(namespace: str | None, service_account_dir: Path) -> str:
    if not namespace:
        try:
            namespace = (service_account_dir / "namespace").read_text().strip()
        except OSError:
            namespace = ""
    if not namespace:
        raise ConfigError("--secret-namespace is required outside a cluster")
    if not _DNS_LABEL.match(namespace) or len(namespace) > 63:
        raise ConfigError(f"--secret-namespace {namespace!r} is not a valid namespace name")
    return namespace


def _read_capped(response: Any) -> bytes | None:
    """The body, or None when it exceeds MAX_REPLY_BYTES (then the connection is closed
    rather than drained). Clients >= 37 return every status unread; older ones preload."""
    if response.data is not None:
        raw = response.data
        return None if len(raw) > MAX_REPLY_BYTES else bytes(raw)
    inner = getattr(response, "response", None)
    if inner is None or not hasattr(inner, "read"):
        raw = response.read()
        return None if len(raw) > MAX_REPLY_BYTES else bytes(raw)
    raw = inner.read(MAX_REPLY_BYTES + 1)
    if len(raw) > MAX_REPLY_BYTES:
        inner.close()
        return None
    return bytes(raw)


def _parse(raw: object) -> JsonObj | None:
    if isinstance(raw, str):
        raw = raw.encode()
    if not isinstance(raw, bytes | bytearray) or not raw:
        return None
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        return None  # an HTML error page from a proxy, say, or absurd nesting
    return body if isinstance(body, dict) else None


def _short(exc: object) -> str:
    """The innermost reason of a transport error, without urllib3's object reprs."""
    while isinstance(exc, Exception) and getattr(exc, "reason", None) is not None:
        exc = getattr(exc, "reason")  # noqa: B009 - MaxRetryError -> NewConnectionError
    args: tuple[object, ...] = getattr(exc, "args", ())
    if len(args) == 2 and isinstance(args[1], BaseException):
        # ProtocolError('Connection aborted.', RemoteDisconnected('Remote end closed ...'))
        exc = f"{str(args[0]).rstrip('.')}: {args[1]}"
    text = _NOISE.sub("", str(exc)).strip() or type(exc).__name__
    return text.splitlines()[0][:_MAX_DETAIL]


def _redact(text: str, token: AccessToken | None) -> str:
    """An apiserver message, one line, capped, with our token scrubbed (defence in depth)."""
    text = redact(text, [token.value] if token is not None and token.value else [])
    return " ".join(text.split())[:_MAX_DETAIL]
