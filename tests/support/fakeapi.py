"""A fake Kubernetes API server for core/v1 Secrets, over a real socket (stdlib only).

It speaks the real wire protocol, so the official `kubernetes` client talks to it
through a kubeconfig file exactly as to a cluster, and its semantics are the
apiserver's where the Secret sink depends on them:

- `metadata.resourceVersion` is a string that changes on every write (one global
  counter, like etcd's revision); `uid` and `creationTimestamp` are set on create;
- PUT with a stale `resourceVersion` is 409 `Conflict`; PUT without one is an
  unconditional update (Secrets allow it); PUT of a missing object is 404 (Secrets
  do not allow create-on-update);
- POST of an existing name is 409 `AlreadyExists`; POST into a missing namespace is
  404 `NotFound` for `namespaces`, while GET of a Secret there is 404 for `secrets`;
- RBAC denials are 403 `Forbidden` with the apiserver's message;
- invalid objects (bad name, bad data key, data not base64, a changed `type`, a
  change to an `immutable` Secret) are 422 `Invalid`;
- PATCH is 405: the Secret sink writes with GET and PUT only, so the fake
  implements no patch format (a sink that patches would need one first);
- every error is a complete `Status` object.

Fault hooks for tests: `fail_next`, `drop_next`, `delay_next`, `down`/`up`,
`forbid`, `before_next` and `bump_before_next_write` (a concurrent writer between a
client's GET and its PUT). `requests` counts requests per HTTP method and
`log` keeps (method, path) in order.
"""

from __future__ import annotations

import base64
import binascii
import copy
import json
import re
import socket
import ssl
import sys
import threading
import uuid
from collections import Counter
from collections.abc import Callable
from contextlib import suppress
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

JsonObj = dict[str, Any]

_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DATA_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")
_REASONS = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    409: "Conflict",
    415: "UnsupportedMediaType",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}
_VERBS = {"POST": "create", "PUT": "update", "DELETE": "delete"}


class ApiError(Exception):
    """Raised inside the handler; rendered as a `Status` object."""

    def __init__(
        self, code: int, message: str, *, reason: str | None = None, name: str = "", kind: str = ""
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason or _REASONS.get(code, "Unknown")
        self.name = name
        self.kind = kind


def status_object(
    code: int, message: str, reason: str, *, name: str = "", kind: str = ""
) -> JsonObj:
    """A failure `Status` exactly as the apiserver serializes it."""
    details: JsonObj = {}
    if name:
        details["name"] = name
    if kind:
        details["kind"] = kind
    body: JsonObj = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    if details:
        body["details"] = details
    return body


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    fake: FakeApiServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Quiet on clients that hung up (timeouts, dropped connections): that is the test."""
        if not isinstance(sys.exc_info()[1], ConnectionError | ssl.SSLError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the apiserver: the client pools connections
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: pytest output stays readable."""

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in two writes: without NODELAY, Nagle waits for the
        # client's delayed ACK (~40 ms a request). Go's apiserver sets it too.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.fake._track(self.connection, add=True)

    def finish(self) -> None:
        with suppress(OSError):
            super().finish()
        self.server.fake._track(self.connection, add=False)

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_PATCH(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        fake = self.server.fake
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            code, body = fake._handle(self.command, self.path, dict(self.headers.items()), raw)
        except _Drop:
            self.close_connection = True
            with suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        payload = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


class _Drop(Exception):
    """Close the connection without an answer."""


class FakeApiServer:
    """Context manager: a fake apiserver on 127.0.0.1, port 0, served from a thread.

    `user` is the identity named in 403 messages. With `token` set, requests must
    carry `Authorization: Bearer <token>` (else 401); otherwise any bearer token is
    accepted. `certfile`/`keyfile` serve HTTPS instead of HTTP.
    """

    def __init__(
        self,
        namespaces: tuple[str, ...] = ("default",),
        *,
        user: str = "system:serviceaccount:default:ims-token-refresher",
        token: str | None = None,
        certfile: Path | None = None,
        keyfile: Path | None = None,
    ) -> None:
        self.user = user
        self.token = token
        self._certfile = certfile
        self._keyfile = keyfile
        self._lock = threading.RLock()
        self._namespaces: dict[str, JsonObj] = {}
        self._secrets: dict[tuple[str, str], JsonObj] = {}
        self._revision = 100
        self._forbidden: list[tuple[str, str, str | None]] = []
        self._failures: list[int] = []
        self._drops = 0
        self._delays: list[float] = []
        self._hooks: list[tuple[str, Callable[[FakeApiServer], None]]] = []
        self._connections: set[socket.socket] = set()
        self._released = threading.Event()
        self.requests: Counter[str] = Counter()
        self.log: list[tuple[str, str]] = []
        # Request bodies as sent (tests assert on preconditions; they hold tokens: never print).
        self.bodies: list[tuple[str, str, Any]] = []
        self.authorizations: list[str] = []
        # Exceptions inside the fake (or a test's hook): __exit__ fails the test with them.
        self.internal_errors: list[str] = []
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.port = 0
        for namespace in namespaces:
            self.add_namespace(namespace)

    # --- lifecycle ------------------------------------------------------------

    def __enter__(self) -> FakeApiServer:
        self._start()
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self._released.set()
        self._stop()
        if self.internal_errors and exc_type is None:
            raise AssertionError(f"fake apiserver failed internally: {self.internal_errors}")

    @property
    def url(self) -> str:
        scheme = "https" if self._certfile else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    def _start(self) -> None:
        server = _Server(("127.0.0.1", self.port), _Handler)
        if self._certfile is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(self._certfile, self._keyfile)
            server.socket = context.wrap_socket(server.socket, server_side=True)
        server.fake = self
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(
            # A short poll keeps shutdown() (each test's teardown, down()) fast.
            target=server.serve_forever,
            kwargs={"poll_interval": 0.02},
            daemon=True,
        )
        self._thread.start()

    def _stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        # Pooled keep-alive connections would otherwise keep being served.
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            with suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        assert self._thread is not None
        self._thread.join(timeout=5)
        self._server = None

    def down(self) -> None:
        """Stop listening and cut open connections: clients get 'connection refused'."""
        self._stop()

    def up(self) -> None:
        """Listen again on the same port."""
        if self._server is None:
            self._start()

    def _track(self, conn: socket.socket, *, add: bool) -> None:
        with self._lock:
            if add:
                self._connections.add(conn)
            else:
                self._connections.discard(conn)

    def write_kubeconfig(
        self,
        path: Path,
        namespace: str = "default",
        *,
        token: str = "fake-service-account-token",  # noqa: S107 - a test credential
        ca_file: Path | None = None,
    ) -> Path:
        """Write a kubeconfig (JSON is valid YAML) pointing at this server; return `path`."""
        cluster: JsonObj = {"server": self.url}
        if ca_file is not None:
            cluster["certificate-authority"] = str(ca_file)
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": cluster}],
            "users": [{"name": "fake", "user": {"token": token}}],
            "contexts": [
                {
                    "name": "fake",
                    "context": {"cluster": "fake", "user": "fake", "namespace": namespace},
                }
            ],
            "current-context": "fake",
        }
        path.write_text(json.dumps(config, indent=2))
        return path

    # --- state for tests ------------------------------------------------------

    def add_namespace(self, name: str) -> None:
        with self._lock:
            self._namespaces[name] = {
                "kind": "Namespace",
                "apiVersion": "v1",
                "metadata": {
                    "name": name,
                    "uid": str(uuid.uuid4()),
                    "resourceVersion": self._next_revision(),
                    "creationTimestamp": _now(),
                },
                "status": {"phase": "Active"},
            }

    def remove_namespace(self, name: str) -> None:
        with self._lock:
            self._namespaces.pop(name, None)
            for key in [key for key in self._secrets if key[0] == name]:
                del self._secrets[key]

    @property
    def secrets(self) -> dict[tuple[str, str], JsonObj]:
        """A deep copy of every stored Secret, keyed by (namespace, name)."""
        with self._lock:
            return copy.deepcopy(self._secrets)

    def secret(self, namespace: str, name: str) -> JsonObj | None:
        """A deep copy of one stored Secret, or None."""
        with self._lock:
            found = self._secrets.get((namespace, name))
            return copy.deepcopy(found) if found is not None else None

    def secret_data(self, namespace: str, name: str) -> dict[str, bytes]:
        """The decoded `data` of one stored Secret (KeyError if missing)."""
        stored = self.secret(namespace, name)
        if stored is None:
            raise KeyError(f"{namespace}/{name}")
        return {key: base64.b64decode(value) for key, value in (stored.get("data") or {}).items()}

    def put_secret(self, obj: JsonObj, namespace: str = "default") -> JsonObj:
        """Store `obj` server-side (as another writer would), bumping its resourceVersion."""
        with self._lock:
            obj = copy.deepcopy(obj)
            meta = obj.setdefault("metadata", {})
            key = (namespace, meta["name"])
            existing = self._secrets.get(key)
            meta["namespace"] = namespace
            meta.setdefault("uid", existing["metadata"]["uid"] if existing else str(uuid.uuid4()))
            meta.setdefault(
                "creationTimestamp",
                existing["metadata"]["creationTimestamp"] if existing else _now(),
            )
            meta["resourceVersion"] = self._next_revision()
            obj.setdefault("kind", "Secret")
            obj.setdefault("apiVersion", "v1")
            obj.setdefault("type", "Opaque")
            self._secrets[key] = obj
            return copy.deepcopy(obj)

    def remove_secret(self, namespace: str, name: str) -> None:
        """Delete server-side (as another actor would)."""
        with self._lock:
            self._secrets.pop((namespace, name), None)

    def bump(
        self, namespace: str, name: str, mutate: Callable[[JsonObj], None] | None = None
    ) -> None:
        """A concurrent write: apply `mutate` (if any) and bump the resourceVersion."""
        with self._lock:
            stored = self._secrets[(namespace, name)]
            owned = {k: stored["metadata"][k] for k in ("uid", "creationTimestamp", "namespace")}
            if mutate is not None:
                mutate(stored)
            stored["metadata"].update(owned)  # the mutation may replace metadata wholesale
            stored["metadata"]["resourceVersion"] = self._next_revision()

    # --- fault hooks ----------------------------------------------------------

    def forbid(self, verb: str, resource: str = "secrets", name: str | None = None) -> None:
        """Deny an RBAC verb (get, list, create, update, patch, delete) on secrets or one name."""
        with self._lock:
            self._forbidden.append((verb, resource, name))

    def allow_all(self) -> None:
        with self._lock:
            self._forbidden.clear()

    def fail_next(self, n: int, status: int = 503) -> None:
        """Answer the next `n` requests with a `Status` of this HTTP code."""
        with self._lock:
            self._failures.extend([status] * n)

    def drop_next(self, n: int) -> None:
        """Close the connection without answering the next `n` requests."""
        with self._lock:
            self._drops += n

    def delay_next(self, n: int, seconds: float) -> None:
        """Hold the next `n` requests for `seconds` before answering (client timeouts)."""
        with self._lock:
            self._delays.extend([seconds] * n)

    def before_next(self, method: str, hook: Callable[[FakeApiServer], None]) -> None:
        """Run `hook(server)` just before handling the next request with this HTTP method."""
        with self._lock:
            self._hooks.append((method.upper(), hook))

    def pending_hooks(self, method: str) -> int:
        """How many `before_next` hooks still wait for a request with this HTTP method."""
        with self._lock:
            return sum(1 for hook_method, _ in self._hooks if hook_method == method.upper())

    def bump_before_next_write(
        self, namespace: str, name: str, mutate: Callable[[JsonObj], None] | None = None
    ) -> None:
        """Another writer updates the Secret between the client's GET and its next PUT."""
        self.before_next("PUT", lambda server: server.bump(namespace, name, mutate))

    # --- request handling -----------------------------------------------------

    def _next_revision(self) -> str:
        self._revision += 1
        return str(self._revision)

    def _take_hook(self, method: str) -> Callable[[FakeApiServer], None] | None:
        with self._lock:
            for index, (hook_method, hook) in enumerate(self._hooks):
                if hook_method == method:
                    del self._hooks[index]
                    return hook
        return None

    def _handle(
        self, method: str, raw_path: str, headers: dict[str, str], raw: bytes
    ) -> tuple[int, JsonObj]:
        try:
            return self._serve(method, raw_path, headers, raw)
        except ApiError as err:
            return err.code, status_object(
                err.code, err.message, err.reason, name=err.name, kind=err.kind
            )
        except _Drop:
            raise
        except Exception as exc:  # a bug in the fake or in a test hook: fail the test loudly
            self.internal_errors.append(f"{method} {raw_path}: {exc!r}")
            message = f"fake apiserver bug: {type(exc).__name__}"
            return 500, status_object(500, message, "InternalError")

    def _serve(
        self, method: str, raw_path: str, headers: dict[str, str], raw: bytes
    ) -> tuple[int, JsonObj]:
        # Hooks run first, so a hook may queue a fault for the very request it precedes.
        hook = self._take_hook(method)
        if hook is not None:
            hook(self)
        with self._lock:
            self.requests[method] += 1
            self.log.append((method, raw_path))
            self.bodies.append((method, raw_path, _loads_or_raw(raw)))
            auth = headers.get("Authorization") or headers.get("authorization") or ""
            self.authorizations.append(auth)
            delay = self._delays.pop(0) if self._delays else 0.0
            drop = self._drops > 0
            if drop:
                self._drops -= 1
            failure = self._failures.pop(0) if self._failures and not drop else None
        if delay:
            self._released.wait(delay)
        if drop:
            raise _Drop
        if failure is not None:
            raise ApiError(failure, _fault_message(failure))
        scheme, _, credential = auth.partition(" ")
        # The auth scheme is case-insensitive (RFC 7235): the in-cluster loader sends "bearer".
        if self.token is not None and (scheme.lower() != "bearer" or credential != self.token):
            raise ApiError(401, "Unauthorized")
        with self._lock:
            return self._route(method, raw_path, headers, raw)

    def _route(
        self, method: str, raw_path: str, headers: dict[str, str], raw: bytes
    ) -> tuple[int, JsonObj]:
        split = urlsplit(raw_path)
        parts = [unquote(part) for part in split.path.strip("/").split("/")]
        query = parse_qs(split.query)
        if parts[:3] != ["api", "v1", "namespaces"] or len(parts) < 4:
            raise ApiError(404, "the server could not find the requested resource")
        namespace = parts[3]
        if len(parts) == 4:
            if method != "GET":
                raise ApiError(405, f"{method} is not supported on namespaces in this fake")
            self._authorize("get", "namespaces", namespace, "")
            found = self._namespaces.get(namespace)
            if found is None:
                raise ApiError(
                    404, f'namespaces "{namespace}" not found', name=namespace, kind="namespaces"
                )
            return 200, copy.deepcopy(found)
        if parts[4] != "secrets" or len(parts) > 6:
            raise ApiError(404, "the server could not find the requested resource")
        name = parts[5] if len(parts) == 6 else None
        if name is None:
            if method == "GET":
                self._authorize("list", "secrets", namespace, None)
                return 200, self._list(namespace, query)
            if method == "POST":
                self._authorize("create", "secrets", namespace, None)
                return 201, self._create(namespace, _decode(raw))
            raise ApiError(405, f"{method} is not allowed on the secrets collection")
        verb = "get" if method == "GET" else _VERBS.get(method)
        if verb is None:
            raise ApiError(405, f"{method} is not allowed on a secret")
        self._authorize(verb, "secrets", namespace, name)
        key = (namespace, name)
        stored = self._secrets.get(key)
        if stored is None:
            raise ApiError(404, f'secrets "{name}" not found', name=name, kind="secrets")
        if method == "GET":
            return 200, copy.deepcopy(stored)
        if method == "DELETE":
            del self._secrets[key]
            return 200, {
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Success",
                "details": {"name": name, "kind": "secrets", "uid": stored["metadata"]["uid"]},
            }
        return 200, self._update(stored, _decode(raw), namespace, name)  # PUT

    def _authorize(self, verb: str, resource: str, namespace: str, name: str | None) -> None:
        for denied_verb, denied_resource, denied_name in self._forbidden:
            if denied_verb == verb and denied_resource == resource and denied_name in (None, name):
                subject = f'{resource} "{name}"' if name else resource
                raise ApiError(
                    403,
                    f'{subject} is forbidden: User "{self.user}" cannot {verb} '
                    f'resource "{resource}" '
                    f'in API group "" in the namespace "{namespace}"',
                    name=name or "",
                    kind=resource,
                )

    def _list(self, namespace: str, query: dict[str, list[str]]) -> JsonObj:
        wanted: dict[str, str] = {}
        for selector in query.get("labelSelector", []):
            for term in filter(None, selector.split(",")):
                label, _, value = term.partition("=")
                wanted[label] = value.lstrip("=")
        items = []
        for (ns, _name), obj in sorted(self._secrets.items()):
            labels = obj["metadata"].get("labels") or {}
            if ns == namespace and all(labels.get(k) == v for k, v in wanted.items()):
                item = copy.deepcopy(obj)
                item.pop("kind", None)
                item.pop("apiVersion", None)
                items.append(item)
        return {
            "kind": "SecretList",
            "apiVersion": "v1",
            "metadata": {"resourceVersion": str(self._revision)},
            "items": items,
        }

    def _create(self, namespace: str, obj: JsonObj) -> JsonObj:
        meta = obj.get("metadata")
        if not isinstance(meta, dict):
            raise ApiError(
                422,
                'Secret "" is invalid: metadata.name: Required value: name is required',
                kind="Secret",
            )
        name = str(meta.get("name") or "")
        _check_body(obj, namespace, None)
        if namespace not in self._namespaces:
            raise ApiError(
                404, f'namespaces "{namespace}" not found', name=namespace, kind="namespaces"
            )
        _validate(obj, name)
        if (namespace, name) in self._secrets:
            raise ApiError(
                409,
                f'secrets "{name}" already exists',
                reason="AlreadyExists",
                name=name,
                kind="secrets",
            )
        if meta.get("resourceVersion"):
            raise ApiError(400, "resourceVersion should not be set on objects to be created")
        stored = _normalize(obj)
        stored_meta = stored["metadata"]
        stored_meta["namespace"] = namespace
        stored_meta["uid"] = str(uuid.uuid4())
        stored_meta["creationTimestamp"] = _now()
        stored_meta["resourceVersion"] = self._next_revision()
        self._secrets[(namespace, name)] = stored
        return copy.deepcopy(stored)

    def _update(self, stored: JsonObj, obj: JsonObj, namespace: str, name: str) -> JsonObj:
        _check_body(obj, namespace, name)
        meta = obj.get("metadata") or {}
        sent_version = meta.get("resourceVersion")
        current_version = stored["metadata"]["resourceVersion"]
        if sent_version and sent_version != current_version:
            raise ApiError(
                409,
                f'Operation cannot be fulfilled on secrets "{name}": the object has been modified; '
                "please apply your changes to the latest version and try again",
                name=name,
                kind="secrets",
            )
        _validate(obj, name)
        updated = _normalize(obj)
        if updated.get("type") != stored.get("type"):
            raise ApiError(
                422,
                f'Secret "{name}" is invalid: type: Invalid value: "{updated.get("type")}": '
                "field is immutable",
                name=name,
                kind="Secret",
            )
        if stored.get("immutable") and (
            updated.get("data") != stored.get("data") or not updated.get("immutable")
        ):
            raise ApiError(
                422,
                f'Secret "{name}" is invalid: data: Forbidden: '
                "field is immutable when `immutable` is set",
                name=name,
                kind="Secret",
            )
        updated_meta = updated["metadata"]
        for field in ("uid", "creationTimestamp"):  # server-owned: the client cannot change them
            updated_meta[field] = stored["metadata"][field]
        updated_meta["namespace"] = namespace
        if {**updated, "metadata": {**updated_meta, "resourceVersion": current_version}} == stored:
            # A no-op write does not bump the version, like the apiserver.
            return copy.deepcopy(stored)
        updated_meta["resourceVersion"] = self._next_revision()
        self._secrets[(namespace, name)] = updated
        return copy.deepcopy(updated)


def _fault_message(code: int) -> str:
    if code == 503:
        return "the server is currently unable to handle the request"
    if code == 429:
        return "too many requests, please try again later"
    if code == 504:
        return "the server was unable to return a response in the time allotted"
    return "Internal error occurred: injected fault"


def _loads_or_raw(raw: bytes) -> Any:
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return raw


def _decode_any(raw: bytes) -> Any:
    try:
        return json.loads(raw or b"null")
    except ValueError:
        raise ApiError(400, "the request body is not valid JSON") from None


def _decode(raw: bytes) -> JsonObj:
    body = _decode_any(raw)
    if not isinstance(body, dict):
        raise ApiError(400, "the request body is not a JSON object")
    return body


def _check_body(obj: JsonObj, namespace: str, name: str | None) -> None:
    if obj.get("kind") not in (None, "Secret") or obj.get("apiVersion") not in (None, "v1"):
        raise ApiError(
            400,
            f"the API version in the data ({obj.get('apiVersion')}) does not match "
            "the expected API version (v1)",
        )
    meta = obj.get("metadata") or {}
    if meta.get("namespace") not in (None, "", namespace):
        raise ApiError(
            400,
            "the namespace of the provided object does not match the namespace sent on the request",
        )
    if name is not None and meta.get("name") != name:
        raise ApiError(
            400,
            f"the name of the object ({meta.get('name')}) does not match "
            f"the name on the URL ({name})",
        )


def _validate(obj: JsonObj, name: str) -> None:
    problems = []
    if not name or len(name) > 253 or not _NAME.match(name):
        problems.append(
            f'metadata.name: Invalid value: "{name}": '
            "a lowercase RFC 1123 subdomain must consist of "
            "lower case alphanumeric characters, '-' or '.', and must start and end with an "
            "alphanumeric character"
        )
    data = obj.get("data") or {}
    if not isinstance(data, dict):
        problems.append("data: Invalid value: must be a map of string to base64 string")
        data = {}
    for key, value in data.items():
        if not _DATA_KEY.match(key):
            problems.append(
                f'data[{key}]: Invalid value: "{key}": a valid config key must consist of '
                "alphanumeric characters, '-', '_' or '.'"
            )
        try:
            base64.b64decode(str(value), validate=True)
        except (binascii.Error, ValueError):
            # Name the key, never echo the value: it is secret material.
            problems.append(f"data[{key}]: Invalid value: <value omitted>: illegal base64 data")
    for field in ("labels", "annotations"):
        values = (obj.get("metadata") or {}).get(field) or {}
        if not isinstance(values, dict) or not all(isinstance(v, str) for v in values.values()):
            problems.append(f"metadata.{field}: Invalid value: must be a map of strings")
    if problems:
        raise ApiError(
            422, f'Secret "{name}" is invalid: ' + ", ".join(problems), name=name, kind="Secret"
        )


def _normalize(obj: JsonObj) -> JsonObj:
    """What the apiserver stores: stringData folded into data, defaults applied."""
    stored = copy.deepcopy(obj)
    stored["kind"] = "Secret"
    stored["apiVersion"] = "v1"
    stored["type"] = stored.get("type") or "Opaque"
    string_data = stored.pop("stringData", None) or {}
    if string_data:
        data = stored.setdefault("data", {})
        for key, value in string_data.items():
            data[key] = base64.b64encode(str(value).encode()).decode()
    meta = stored.setdefault("metadata", {})
    meta.pop("managedFields", None)
    for field in ("labels", "annotations"):
        if field in meta and not meta[field]:
            del meta[field]
    if "data" in stored and not stored["data"]:
        del stored["data"]
    return stored
