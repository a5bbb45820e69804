"""`refresher injector`, the admission webhook: the real CLI over real TLS on loopback.

Certificates come from a CA generated here with `cryptography`, laid out the way
kubelet mounts a Secret (files reached through a `..data` symlink that is swapped
on renewal). Patches are applied with the `jsonpatch` library, as the API server
would, and compared with what `refresher inject` produces.
"""

from __future__ import annotations

import base64
import copy
import datetime as dt
import http.client
import ipaddress
import json
import os
import re
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonpatch
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from refresher.inject import LABEL, PREFIX, json_patch
from refresher.injector import admit
from tests.support.injection import (
    CRONJOB,
    DEPLOYMENT,
    STATEFULSET,
    Obj,
    inject_pod,
    load,
    review,
    template_of,
)

SECRET_ENV_VALUE = "hunter2-do-not-log-this-value"


# --- certificates ---------------------------------------------------------------


@dataclass
class Authority:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def context(self) -> ssl.SSLContext:
        """A client context that trusts only this CA (hostname checked: 127.0.0.1)."""
        context = ssl.create_default_context(cadata=self.pem.decode())
        return context


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def new_authority(common_name: str) -> Authority:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Authority(key, cert)


def issue(ca: Authority) -> tuple[bytes, bytes]:
    """A serving certificate for 127.0.0.1 (as the Service's DNS name would be): (cert, key) PEM."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("ims-token-refresher-injector.test.svc"))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("ims-token-refresher-injector.test.svc"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
        .sign(ca.key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


class MountedSecret:
    """A directory laid out like kubelet's Secret volume: tls.crt -> ..data/tls.crt."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir()
        self.generation = 0

    def publish(self, cert: bytes, key: bytes) -> None:
        self.generation += 1
        snapshot = self.root / f"..{self.generation}"
        snapshot.mkdir()
        (snapshot / "tls.crt").write_bytes(cert)
        (snapshot / "tls.key").write_bytes(key)
        link = self.root / "..data_tmp"
        link.symlink_to(snapshot.name)
        link.replace(self.root / "..data")  # one atomic rename, as kubelet does
        for name in ("tls.crt", "tls.key"):
            if not (self.root / name).is_symlink():
                (self.root / name).symlink_to(f"..data/{name}")

    @property
    def cert(self) -> Path:
        return self.root / "tls.crt"

    @property
    def key(self) -> Path:
        return self.root / "tls.key"


# --- the injector process -------------------------------------------------------


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("REFRESHER_")}


@dataclass
class Injector:
    proc: subprocess.Popen[bytes]
    log: Path
    port: int
    ca: Authority
    secret: MountedSecret

    def connection(self, ca: Authority | None = None) -> http.client.HTTPSConnection:
        context = (ca or self.ca).context()
        return http.client.HTTPSConnection("127.0.0.1", self.port, context=context, timeout=5)

    def request(
        self, method: str, path: str, body: bytes | None = None, ca: Authority | None = None
    ) -> tuple[int, bytes]:
        connection = self.connection(ca)
        try:
            headers = {"Content-Type": "application/json"} if body is not None else {}
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def review(self, review: Obj) -> Obj:
        status, body = self.request("POST", "/mutate", json.dumps(review).encode())
        assert status == 200, body
        answer = json.loads(body)
        assert answer["apiVersion"] == "admission.k8s.io/v1"
        assert answer["kind"] == "AdmissionReview"
        assert answer["response"]["uid"] == review["request"]["uid"]
        return answer["response"]  # type: ignore[no-any-return]

    def logs(self) -> list[Obj]:
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()]

    def metric(self, name: str) -> float:
        status, body = self.request("GET", "/metrics")
        assert status == 200
        match = re.search(rf"^{re.escape(name)} (\S+)$", body.decode(), re.MULTILINE)
        assert match, f"{name} not exported"
        return float(match.group(1))


def start_injector(tmp: Path, *extra: str) -> Injector:
    ca = new_authority("injector-test-ca")
    secret = MountedSecret(tmp / "tls")
    secret.publish(*issue(ca))
    log = tmp / "injector.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "refresher",
                "injector",
                "--listen",
                "127.0.0.1:0",
                "--tls-cert-file",
                str(secret.cert),
                "--tls-key-file",
                str(secret.key),
                *extra,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=clean_env(),
        )
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        for line in log.read_text().splitlines():
            if "serving admission reviews" in line:
                port = int(json.loads(line)["listen"].rsplit(":", 1)[1])
                return Injector(proc, log, port, ca, secret)
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"injector did not start:\n{log.read_text()}")


def stop(injector: Injector) -> None:
    if injector.proc.poll() is None:
        injector.proc.terminate()
        try:
            injector.proc.wait(5)
        except subprocess.TimeoutExpired:
            injector.proc.kill()
            injector.proc.wait(5)


@pytest.fixture(scope="module")
def injector(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Injector]:
    """One injector process for the module (its start costs a Python interpreter)."""
    server = start_injector(tmp_path_factory.mktemp("injector"))
    yield server
    stop(server)
    assert server.proc.returncode == 0, server.log.read_text()
    text = server.log.read_text()
    assert SECRET_ENV_VALUE not in text and "Traceback" not in text


# --- reviews --------------------------------------------------------------------


def as_pod(template: Obj, generate_name: str = "web-7d9f8-") -> Obj:
    """What the API server sends for a pod created from this template."""
    pod = copy.deepcopy(template)
    pod["metadata"]["generateName"] = generate_name
    pod["metadata"]["namespace"] = "shop"
    return {"apiVersion": "v1", "kind": "Pod", **pod}


def patched(pod: Obj, response: Obj) -> Obj:
    assert response["allowed"] is True
    assert response["patchType"] == "JSONPatch"
    patch = json.loads(base64.b64decode(response["patch"]))
    return jsonpatch.apply_patch(pod, patch)  # type: ignore[no-any-return]


PODS = {
    "deployment": as_pod(template_of(load(DEPLOYMENT))),
    "cronjob": as_pod(template_of(load(CRONJOB)), "nightly-report-2900-"),
    "statefulset": as_pod(template_of(load(STATEFULSET)), ""),
}


def test_patch_equals_what_inject_produces(injector: Injector) -> None:
    """For real pods, the webhook's patch applied by jsonpatch gives `refresher inject`'s output."""
    listing = {"apiVersion": "v1", "kind": "List", "items": list(PODS.values())}
    cli = subprocess.run(
        [sys.executable, "-m", "refresher", "inject"],
        input=json.dumps(listing),
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=30,
        check=True,
    )
    expected = yaml.safe_load(cli.stdout)["items"]
    for index, pod in enumerate(PODS.values()):
        response = injector.review(review(pod, uid=f"uid-{index}"))
        assert patched(pod, response) == expected[index]


def test_pod_without_the_label_is_never_patched(injector: Injector) -> None:
    """A pod without the label, or with it set to "false", is allowed with no patch."""
    for value in (None, "false"):
        pod = copy.deepcopy(PODS["deployment"])
        if value is None:
            del pod["metadata"]["labels"][LABEL]
        else:
            pod["metadata"]["labels"][LABEL] = value
        response = injector.review(review(pod))
        assert response["allowed"] is True and "patch" not in response


def test_injected_pod_and_other_operations_are_left_alone(injector: Injector) -> None:
    """An injected pod, an UPDATE, and a non-pod resource are allowed untouched."""
    pod = PODS["cronjob"]
    injected_pod = patched(pod, injector.review(review(pod)))
    assert "patch" not in injector.review(review(injected_pod))
    assert "patch" not in injector.review(review(pod, operation="UPDATE"))
    other = review(pod)
    other["request"]["kind"] = {"group": "apps", "version": "v1", "kind": "Deployment"}
    assert "patch" not in injector.review(other)


def test_refusal_is_a_denial_with_the_message(injector: Injector) -> None:
    """A refused pod is `allowed: false` with the one-line message; the count goes up."""
    before = injector.metric('refresher_injector_admissions_total{result="refused"}')
    pod = copy.deepcopy(PODS["deployment"])
    pod["metadata"]["annotations"][PREFIX + "containers"] = "api,sidecar"
    response = injector.review(review(pod))
    assert response["allowed"] is False and "patch" not in response
    assert response["status"]["message"] == (
        "annotation ims-token-refresher.io/containers: 'sidecar' is not a container of this pod"
    )
    after = injector.metric('refresher_injector_admissions_total{result="refused"}')
    assert after == before + 1


def test_logs_name_the_pod_never_its_content(injector: Injector) -> None:
    """Each admission is a JSON line with namespace and generateName; env values never appear."""
    pod = copy.deepcopy(PODS["deployment"])
    pod["metadata"]["generateName"] = "log-check-"
    pod["spec"]["containers"][0]["env"] = [{"name": "DB_PASSWORD", "value": SECRET_ENV_VALUE}]
    injector.review(review(pod, uid="log-check"))
    (line,) = [entry for entry in injector.logs() if entry.get("uid") == "log-check"]
    assert line["namespace"] == "shop" and line["generateName"] == "log-check-"
    assert line["result"] == "injected" and line["level"] == "info"
    assert SECRET_ENV_VALUE not in injector.log.read_text()


def test_a_named_pod_is_admitted_and_logged_by_its_name(injector: Injector) -> None:
    """A bare pod with metadata.name (no generateName) is injected, and its log line names it.

    0.2.0's first webhook put the name in the log record's `name`, a LogRecord attribute:
    logging raised, and every named pod got a 500 (with failurePolicy Fail: not created).
    """
    pod = copy.deepcopy(PODS["deployment"])
    del pod["metadata"]["generateName"]
    pod["metadata"]["name"] = "bare-pod"
    response = injector.review(review(pod, uid="named-pod"))
    assert patched(pod, response)["metadata"]["annotations"][PREFIX + "status"] == "injected"
    (line,) = [entry for entry in injector.logs() if entry.get("uid") == "named-pod"]
    assert line["pod"] == "bare-pod" and line["result"] == "injected"


def test_a_malformed_accept_header_on_metrics_gets_plain_text(injector: Injector) -> None:
    """`Accept: application/openmetrics-text; version=abc` is answered in plain text, not 500."""
    connection = injector.connection()
    try:
        connection.request(
            "GET", "/metrics", headers={"Accept": "application/openmetrics-text; version=abc"}
        )
        response = connection.getresponse()
        body = response.read()
    finally:
        connection.close()
    assert response.status == 200
    assert response.getheader("Content-Type", "").startswith("text/plain")
    assert b"refresher_injector_admissions_total" in body


def test_probes_metrics_and_methods(injector: Injector) -> None:
    """/healthz and /readyz answer 200, /metrics has the histogram, GET /mutate is 405."""
    assert injector.request("GET", "/healthz")[0] == 200
    assert injector.request("GET", "/readyz")[0] == 200
    assert injector.request("GET", "/mutate")[0] == 405
    assert injector.request("GET", "/nope")[0] == 404
    assert injector.metric("refresher_injector_admission_duration_seconds_count") >= 0
    for result in ("injected", "unchanged", "refused", "error"):
        injector.metric(f'refresher_injector_admissions_total{{result="{result}"}}')


MALFORMED = {
    "empty": b"",
    "not json": b"{",
    "not utf-8": b'{"kind": "\xff"}',
    "a list": b"[]",
    "nested past the stack": b"[" * 200_000,
    "wrong apiVersion": json.dumps({**review(PODS["deployment"]), "apiVersion": "v1"}).encode(),
    "no request": json.dumps(
        {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}
    ).encode(),
    "no uid": json.dumps(
        {**review(PODS["deployment"]), "request": {"kind": {"kind": "Pod"}}}
    ).encode(),
    "object not a pod": json.dumps(
        {**review(PODS["deployment"]), "request": {**review({})["request"], "object": [1]}}
    ).encode(),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_review_is_400_and_the_server_keeps_serving(
    injector: Injector, case: str
) -> None:
    """A malformed review is a 400 with a JSON error; the next request is served."""
    before = injector.metric('refresher_injector_admissions_total{result="error"}')
    status, body = injector.request("POST", "/mutate", MALFORMED[case])
    assert status == 400 and "error" in json.loads(body)
    assert injector.metric('refresher_injector_admissions_total{result="error"}') == before + 1
    assert injector.request("GET", "/healthz")[0] == 200


def test_oversized_review_is_refused_413(injector: Injector) -> None:
    """A body over the cap (2 MiB, above any storable pod) is refused before it is read."""
    context = injector.ca.context()
    with (
        socket.create_connection(("127.0.0.1", injector.port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        # The head announces 3 MiB; the answer comes without the body being sent.
        tls.sendall(b"POST /mutate HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (3 << 20))
        assert tls.recv(100).startswith(b"HTTP/1.1 413 ")
    assert injector.request("GET", "/healthz")[0] == 200


def test_a_crowd_of_idle_clients_does_not_lock_out_reviews(injector: Injector) -> None:
    """100 connections that never handshake (more than the injector holds): a review still
    gets its answer at once, the quietest idle connection giving way."""
    crowd = [socket.create_connection(("127.0.0.1", injector.port), timeout=5) for _ in range(100)]
    try:
        started = time.monotonic()
        response = injector.review(review(PODS["statefulset"], uid="after-crowd"))
        assert "patch" in response and time.monotonic() - started < 2
    finally:
        for connection in crowd:
            connection.close()


def test_tls_12_is_accepted_and_plain_http_is_not(injector: Injector) -> None:
    """A TLS 1.2-only client is served; a plaintext request gets no HTTP answer."""
    context = injector.ca.context()
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    connection = http.client.HTTPSConnection("127.0.0.1", injector.port, context=context, timeout=5)
    connection.request("GET", "/healthz")
    assert connection.getresponse().status == 200
    connection.close()
    with socket.create_connection(("127.0.0.1", injector.port), timeout=5) as raw:
        raw.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            answer = raw.recv(100)
        except OSError:
            answer = b""
        assert not answer.startswith(b"HTTP/")


# --- fuzz -----------------------------------------------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=3)
    ),
    max_leaves=12,
)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix]
    if isinstance(node, dict):
        for key, value in node.items():
            found += _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += _paths(value, (*prefix, index))
    return found


def _mutated(base: Obj, data: st.DataObject) -> Obj:
    document = copy.deepcopy(base)
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(_paths(document)))
        if not path:
            continue
        parent = document
        for key in path[:-1]:
            parent = parent[key]
        if data.draw(st.booleans()):
            parent[path[-1]] = data.draw(_json)
        elif isinstance(parent, dict):
            del parent[path[-1]]
    return document


def check_answer(status: int, body: bytes, sent: Obj | None) -> None:
    """400 with an error, or 200 with a valid review whose patch applies and matches inject."""
    assert status in (200, 400), (status, body)
    answer = json.loads(body)
    if status == 400:
        assert set(answer) == {"error"}
        return
    assert sent is not None
    response = answer["response"]
    assert response["uid"] == sent["request"]["uid"] and isinstance(response["allowed"], bool)
    if "patch" in response:
        pod = sent["request"]["object"]
        assert patched(copy.deepcopy(pod), response) == inject_pod(pod).pod


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzz_mutated_reviews(injector: Injector, data: st.DataObject) -> None:
    """Mutated real reviews: a 400 or a valid answer whose patch matches inject, never a 500."""
    base = review(data.draw(st.sampled_from(list(PODS.values()))))
    sent = _mutated(base, data)
    status, body = injector.request("POST", "/mutate", json.dumps(sent).encode())
    check_answer(status, body, sent)


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=st.binary(max_size=512) | _json.map(lambda value: json.dumps(value).encode()))
def test_fuzz_random_bodies(injector: Injector, body: bytes) -> None:
    """Random bytes and random JSON: always a 400 or a valid answer, and the server stays up."""
    status, answer = injector.request("POST", "/mutate", body)
    try:
        sent = json.loads(body)
    except ValueError:
        sent = None
    check_answer(status, answer, sent if isinstance(sent, dict) else None)


# --- pure parts -----------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(old=_json, new=_json)
def test_json_patch_turns_old_into_new(old: Any, new: Any) -> None:
    """json_patch(old, new) applied by the jsonpatch library gives exactly `new`."""
    result = jsonpatch.apply_patch({"root": old}, _rooted(json_patch(old, new)))
    assert json.dumps(result["root"], sort_keys=True) == json.dumps(new, sort_keys=True)


def _rooted(operations: list[Obj]) -> list[Obj]:
    # A root replace ("" path) is legal but jsonpatch applies it oddly: nest under a key.
    return [{**op, "path": "/root" + op["path"]} for op in operations]


def test_patch_is_small_adds_for_injection() -> None:
    """The patch for an injection only adds: the pod's own parts are never replaced."""
    pod = PODS["deployment"]
    operations = json_patch(pod, inject_pod(pod).pod)
    assert {op["op"] for op in operations} == {"add"}
    assert {"op": "add", "path": "/spec/initContainers/0"} in [
        {k: v for k, v in op.items() if k != "value"} for op in operations
    ]


def test_log_fields_are_short_single_lines() -> None:
    """A generateName with a newline cannot forge a log line, even in text format."""
    pod = copy.deepcopy(PODS["deployment"])
    pod["metadata"]["generateName"] = "evil-\n2026-01-01 INFO forged " + "x" * 1000
    answer = admit(json.dumps(review(pod)).encode(), "image")
    shown = answer.fields["generateName"]
    assert "\n" not in shown and len(shown) <= 253 and shown.startswith("evil-?")


def test_admit_counts_a_review_of_a_deleted_pod_as_unchanged() -> None:
    """A DELETE review (object null) is allowed as it is, not an error."""
    sent = review(PODS["deployment"], operation="DELETE")
    sent["request"]["object"] = None
    answer = admit(json.dumps(sent).encode(), "image")
    assert answer.result == "unchanged" and answer.review["response"]["allowed"] is True


# --- the process ----------------------------------------------------------------


def test_certificate_rotation_without_restart(tmp_path: Path) -> None:
    """A renewed Secret is served on the next connection; a broken pair keeps the old one."""
    server = start_injector(tmp_path)
    try:
        assert server.request("GET", "/healthz")[0] == 200
        renewed = new_authority("rotated-ca")
        server.secret.publish(*issue(renewed))
        assert server.request("GET", "/healthz", ca=renewed)[0] == 200
        with pytest.raises(ssl.SSLCertVerificationError):
            server.request("GET", "/healthz", ca=server.ca)
        server.ca = renewed
        # A certificate whose key is not the one beside it (a half-done manual rotation).
        cert, _ = issue(new_authority("third-ca"))
        _, other_key = issue(renewed)
        server.secret.publish(cert, other_key)
        assert server.request("GET", "/healthz", ca=renewed)[0] == 200
        assert server.metric('refresher_injector_certificate_reloads_total{result="error"}') == 1
        assert server.metric('refresher_injector_certificate_reloads_total{result="success"}') == 1
        assert server.proc.poll() is None
    finally:
        stop(server)
    text = server.log.read_text()
    assert "certificate reload failed" in text and "BEGIN" not in text


_TRANSIENT_RELOAD = """
import json, os, resource, sys
from pathlib import Path
from prometheus_client import CollectorRegistry
from refresher.injector import CertificateFiles, InjectorMetrics

cert, key, new_cert, new_key = (Path(p) for p in sys.argv[1:5])
metrics = InjectorMetrics(CollectorRegistry())
files = CertificateFiles(cert, key, metrics)
first = files.context
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
hog = []
try:
    while True:
        hog.append(os.open(os.devnull, os.O_RDONLY))
except OSError:
    pass
new_cert.replace(cert)  # a renewal arrives while the process is out of descriptors
new_key.replace(key)
during = files()
for fd in hog:
    os.close(fd)
after = files()
print(json.dumps({"during_old": during is first, "after_new": after is not first}))
"""


def test_a_reload_that_fails_for_lack_of_descriptors_is_retried(tmp_path: Path) -> None:
    """A renewal seen while the process has no free descriptor (EMFILE) loads at the next call.

    Real EMFILE, in a child process whose descriptor limit is lowered and then exhausted;
    remembering that failure would serve the old certificate until the files change again.
    """
    ca = new_authority("reload-ca")
    paths = [tmp_path / name for name in ("tls.crt", "tls.key", "new.crt", "new.key")]
    for path, pem in zip(paths, (*issue(ca), *issue(ca)), strict=True):
        path.write_bytes(pem)
    result = subprocess.run(
        [sys.executable, "-c", _TRANSIENT_RELOAD, *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert json.loads(result.stdout.splitlines()[-1]) == {"during_old": True, "after_new": True}
    assert "BEGIN" not in result.stdout + result.stderr


def test_help_lists_the_flags_the_chart_passes() -> None:
    """`refresher injector --help` shows every flag the Helm chart sets."""
    result = subprocess.run(
        [sys.executable, "-m", "refresher", "injector", "--help"],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=30,
        check=False,
    )
    assert result.returncode == 0
    for flag in (
        "--listen",
        "--tls-cert-file",
        "--tls-key-file",
        "--image",
        "--log-format",
        "--log-level",
    ):
        assert flag in result.stdout


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([], "--tls-cert-file and --tls-key-file are required"),
        (
            ["--tls-cert-file", "/nonexistent.crt", "--tls-key-file", "/nonexistent.key"],
            "/nonexistent.crt",
        ),
        (["--listen", "nowhere", "--tls-cert-file", "a", "--tls-key-file", "b"], "--listen"),
        (["--log-level", "loud", "--tls-cert-file", "a", "--tls-key-file", "b"], "--log-level"),
    ],
)
def test_bad_configuration_is_one_line_exit_2(args: list[str], expected: str) -> None:
    """Missing or unreadable TLS files and bad flags: one line on stderr, exit 2."""
    result = subprocess.run(
        [sys.executable, "-m", "refresher", "injector", "--listen", "127.0.0.1:0", *args],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=30,
        check=False,
    )
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and expected in lines[0], result.stderr


def test_mismatched_key_at_start_is_exit_2_without_pem(tmp_path: Path) -> None:
    """A key that does not match the certificate stops the start, naming the files only."""
    ca = new_authority("ca")
    cert, _ = issue(ca)
    _, key = issue(ca)
    (tmp_path / "tls.crt").write_bytes(cert)
    (tmp_path / "tls.key").write_bytes(key)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "refresher",
            "injector",
            "--listen",
            "127.0.0.1:0",
            "--tls-cert-file",
            str(tmp_path / "tls.crt"),
            "--tls-key-file",
            str(tmp_path / "tls.key"),
        ],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=30,
        check=False,
    )
    assert result.returncode == 2 and "tls.key" in result.stderr and "BEGIN" not in result.stderr
