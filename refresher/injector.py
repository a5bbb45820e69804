"""`refresher injector`: the mutating admission webhook around `refresher.inject`.

`POST /mutate` takes an `admission.k8s.io/v1` AdmissionReview and answers with a
JSONPatch computed from `inject_pod`'s result, so the webhook and `refresher inject`
cannot drift. A pod without the opt-in label is allowed untouched, whatever the
webhook configuration sends; a malformed review is a 400 (the API server then
applies the webhook's failurePolicy) and the server goes on serving.

Admission blocks pod creation, so every request is answered on the HTTP server's
own thread in well under a millisecond for ordinary pods: no I/O besides the
socket, one JSON parse, one copy of the pod, one patch.
"""

from __future__ import annotations

import base64
import errno
import json
import logging
import ssl
import stat
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram

from refresher.exposition import encoder
from refresher.httpserver import Limits, Request, Response
from refresher.inject import Refused, inject_pod, json_patch

log = logging.getLogger(__name__)

API_VERSION = "admission.k8s.io/v1"
RESULTS = ("injected", "unchanged", "refused", "error")
_JSON = "application/json"
# A pod is stored in etcd only up to ~1.5 MiB; a review of a bigger one is refused (413).
# Bodies in flight are bounded by the server's shared budget for big bodies
# (Limits.max_bodies_bytes) plus 64 KiB per connection; 64 connections leave room for
# the 50 reviews in flight of a burst, each API server keeping its connections alive.
LIMITS = Limits(max_body_bytes=2 << 20, max_connections=64, body_timeout_s=5.0)
METHODS = frozenset({"GET", "HEAD", "POST"})


class BadReview(ValueError):
    """Not an AdmissionReview this webhook can answer (HTTP 400); the text is safe to log."""


@dataclass(frozen=True)
class Answer:
    review: dict[str, Any]
    result: str
    """One of RESULTS."""
    fields: dict[str, Any]
    """What to log about it: namespace, generateName, pod (its name), uid, and why when refused."""


def admit(body: bytes, image: str) -> Answer:
    """The AdmissionReview answering `body`, or `BadReview`. Pure: bytes in, answer out."""
    request = _request(body)
    uid = request["uid"]
    pod = request.get("object")
    metadata = pod.get("metadata") if isinstance(pod, Mapping) else None
    meta = metadata if isinstance(metadata, Mapping) else {}
    fields = {
        "uid": _text(uid),
        "namespace": _text(request.get("namespace")),
        "generateName": _text(meta.get("generateName")),
        # Not "name": that is a LogRecord attribute, and logging refuses to overwrite it.
        "pod": _text(meta.get("name") or request.get("name")),
        "operation": _text(request.get("operation")),
    }
    response: dict[str, Any] = {"uid": uid, "allowed": True}
    if not _is_pod_create(request):
        return Answer(_review(response), "unchanged", fields)
    if not isinstance(pod, dict) or not isinstance(metadata, dict):
        raise BadReview("request.object is not a pod")
    try:
        outcome = inject_pod(pod, image=image)
    except Refused as exc:
        response.update(allowed=False, status={"code": 400, "message": str(exc)})
        return Answer(_review(response), "refused", {**fields, "reason": str(exc)})
    if outcome.result == "injected":
        patch = json.dumps(json_patch(pod, outcome.pod), separators=(",", ":"))
        response.update(patchType="JSONPatch", patch=base64.b64encode(patch.encode()).decode())
    return Answer(_review(response), outcome.result, {**fields, "reason": outcome.reason})


def _request(body: bytes) -> dict[str, Any]:
    try:
        review = json.loads(body)
    except (ValueError, RecursionError):  # bad JSON or UTF-8; or nested past the stack
        raise BadReview("the body is not JSON") from None
    if not isinstance(review, dict):
        raise BadReview("the body is not a JSON object")
    if review.get("apiVersion") != API_VERSION or review.get("kind") != "AdmissionReview":
        raise BadReview(f"not an {API_VERSION} AdmissionReview")
    request = review.get("request")
    if not isinstance(request, dict):
        raise BadReview("the review has no request")
    uid = request.get("uid")
    if not isinstance(uid, str) or not uid or len(uid) > 128:
        raise BadReview("the request has no uid")
    return request


def _is_pod_create(request: Mapping[str, Any]) -> bool:
    kind = request.get("kind")
    return (
        request.get("operation") == "CREATE"
        and isinstance(kind, Mapping)
        and (kind.get("group"), kind.get("version"), kind.get("kind")) == ("", "v1", "Pod")
        and request.get("subResource") in (None, "")
    )


def _text(value: object) -> str | None:
    """A client's string as a log field: short, and one line even in text logs."""
    if not isinstance(value, str):
        return None
    return "".join(c if c.isprintable() else "?" for c in value[:253])


def _review(response: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": "AdmissionReview", "response": response}


class InjectorMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.admissions = Counter(
            "refresher_injector_admissions",
            "Admission reviews answered, by result.",
            ["result"],
            registry=registry,
        )
        self.duration = Histogram(
            "refresher_injector_admission_duration_seconds",
            "Time to answer one admission review, from its last byte to its answer.",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5),
            registry=registry,
        )
        self.certificate_reloads = Counter(
            "refresher_injector_certificate_reloads",
            "Certificate and key reloads after their files changed, by result.",
            ["result"],
            registry=registry,
        )
        for result in RESULTS:
            self.admissions.labels(result=result)
        for result in ("success", "error"):
            self.certificate_reloads.labels(result=result)


class Webhook:
    """The request handler of the injector's HttpServer."""

    def __init__(self, image: str, metrics: InjectorMetrics) -> None:
        self.image = image
        self.metrics = metrics

    def handle(self, request: Request) -> Response:
        if request.path == "/mutate":
            if request.method != "POST":
                return _json_response(405, {"error": "use POST"}, (("Allow", "POST"),))
            return self._mutate(request)
        if request.method not in ("GET", "HEAD"):
            return _json_response(405, {"error": "method not allowed"}, (("Allow", "GET, HEAD"),))
        if request.path in ("/healthz", "/readyz"):
            # Serving means a certificate is loaded: the server cannot start without one.
            return _json_response(200, {"status": "ok"})
        if request.path == "/metrics":
            encode, content_type = encoder(request.headers.get("accept", ""))
            return Response(200, encode(self.metrics.registry), content_type)
        return _json_response(404, {"error": "not found"})

    def _mutate(self, request: Request) -> Response:
        started = time.perf_counter()
        try:
            answer = admit(request.body, self.image)
        except BadReview as exc:
            self._count("error", started)
            log.warning("malformed admission review: %s", exc, extra={"peer": request.peer})
            return _json_response(400, {"error": str(exc)})
        except Exception as exc:  # a bug answers 500, and the failurePolicy decides
            self._count("error", started)
            log.error("admission failed: %s", type(exc).__name__, exc_info=exc)
            return _json_response(500, {"error": "internal error"})
        body = json.dumps(answer.review, separators=(",", ":")).encode()
        duration = self._count(answer.result, started)
        fields = {k: v for k, v in answer.fields.items() if v is not None}
        log.info(
            "admission %s",
            answer.result,
            extra={**fields, "result": answer.result, "duration_ms": round(duration * 1000, 3)},
        )
        return Response(200, body, _JSON)

    def _count(self, result: str, started: float) -> float:
        duration = time.perf_counter() - started
        self.metrics.admissions.labels(result=result).inc()
        self.metrics.duration.observe(duration)
        return duration


def _json_response(
    status: int, body: Mapping[str, Any], headers: tuple[tuple[str, str], ...] = ()
) -> Response:
    return Response(status, (json.dumps(body) + "\n").encode(), _JSON, headers)


# --- TLS ------------------------------------------------------------------------


class CertificateError(Exception):
    """The certificate or key cannot be loaded; the text names the file, never its content."""

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient
        """The process, not the files, failed (out of descriptors or memory): retry them."""


# Failures of the process rather than of the files: the same files may load a moment later.
_TRANSIENT_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EINTR})


class CertificateFiles:
    """The server's SSLContext from a certificate and key file, rebuilt when they change.

    Called for every new connection (the HttpServer's `tls`): a stat of each file
    (a few microseconds) tells whether a mounted Secret was renewed (kubelet swaps
    its `..data` symlink, so the inode changes) or a file rewritten. A new pair that
    does not load (half written, key and certificate not matching) is logged once
    and the previous context keeps serving; it is retried when the files change again,
    or at the next connection when the process itself failed (out of descriptors or
    memory: the same files may load a moment later), logged once per pair of files.
    """

    def __init__(self, cert: Path, key: Path, metrics: InjectorMetrics) -> None:
        self.cert, self.key = cert, key
        self.metrics = metrics
        self._lock = threading.Lock()
        self._signature = self._stat()
        self._failed: tuple[object, ...] | None = None
        self._logged: tuple[object, ...] | None = None
        self.context = self._load()

    def __call__(self) -> ssl.SSLContext:
        signature = self._stat()
        if signature in (self._signature, self._failed):
            return self.context
        with self._lock:
            try:
                self.context = self._load()
            except CertificateError as exc:
                self.metrics.certificate_reloads.labels(result="error").inc()
                if signature != self._logged:
                    self._logged = signature
                    log.error("certificate reload failed, still serving the previous one: %s", exc)
                if not exc.transient:
                    self._failed = signature
            else:
                self._signature, self._failed, self._logged = signature, None, None
                self.metrics.certificate_reloads.labels(result="success").inc()
                log.info("certificate reloaded", extra={"cert": str(self.cert)})
        return self.context

    def _stat(self) -> tuple[object, ...]:
        signature: list[object] = []
        for path in (self.cert, self.key):
            try:
                info = path.stat()
            except OSError as exc:
                signature.append(exc.errno)
            else:
                signature += [info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns]
        return tuple(signature)

    def _load(self) -> ssl.SSLContext:
        for flag, path in (("--tls-cert-file", self.cert), ("--tls-key-file", self.key)):
            try:
                mode = path.stat().st_mode
            except OSError as exc:
                raise CertificateError(
                    f"{flag} {path}: {exc.strerror}", transient=exc.errno in _TRANSIENT_ERRNOS
                ) from None
            if not stat.S_ISREG(mode):  # a FIFO would block the server thread forever
                raise CertificateError(f"{flag} {path}: not a regular file")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(self.cert, self.key)
        except (ssl.SSLError, OSError, ValueError) as exc:
            # The reason only (e.g. KEY_VALUES_MISMATCH): never the PEM text.
            reason = getattr(exc, "reason", None) or type(exc).__name__
            # SSLError is an OSError whose errno is OpenSSL's code: never a process failure.
            transient = (
                isinstance(exc, OSError)
                and not isinstance(exc, ssl.SSLError)
                and exc.errno in _TRANSIENT_ERRNOS
            )
            raise CertificateError(
                f"--tls-cert-file {self.cert} / --tls-key-file {self.key}: {reason}",
                transient=transient,
            ) from None
        return context
