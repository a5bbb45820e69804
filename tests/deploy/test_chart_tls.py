"""The injector's TLS, from the chart and from the Kustomize example, offline.

The chart's generated CA and serving certificate are checked with
cryptography, served by the real `refresher injector` started with the chart's
own arguments, and kept across upgrades by `lookup` (helm renders against a
small stand-in API server, there being no cluster here); the cert-manager
variants are checked for their wiring.
"""

from __future__ import annotations

import base64
import http.client
import json
import re
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from cryptography import x509

from tests.support.chart import (
    CHART,
    INJECTOR_EXAMPLE,
    NAMESPACE,
    OPT_IN_LABEL,
    RELEASE,
    ROOT,
    Obj,
    flags,
    helm,
    injector_container,
    injector_help,
    kustomize,
    render,
    the,
    webhook_problems,
)


def test_generated_certificate_is_served_and_trusted() -> None:
    """Without cert-manager, the mounted Secret holds a CA (the webhook's caBundle) and a
    serving certificate it signed for the Service's DNS names."""
    objects = render()
    secret = the(objects, "Secret")
    data = {key: base64.b64decode(value) for key, value in secret["data"].items()}
    (webhook,) = the(objects, "MutatingWebhookConfiguration")["webhooks"]
    assert base64.b64decode(webhook["clientConfig"]["caBundle"]) == data["ca.crt"]
    ca = x509.load_pem_x509_certificate(data["ca.crt"])
    serving = x509.load_pem_x509_certificate(data["tls.crt"])
    serving.verify_directly_issued_by(ca)
    names = serving.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    service = the(objects, "Service")["metadata"]["name"]
    assert f"{service}.{NAMESPACE}.svc" in names.get_values_for_type(x509.DNSName)
    assert b"PRIVATE KEY" in data["tls.key"] and "ca.key" not in data
    pod = the(objects, "Deployment")["spec"]["template"]["spec"]
    assert pod["volumes"] == [
        {"name": "tls", "secret": {"secretName": secret["metadata"]["name"], "defaultMode": 0o440}}
    ]
    mounted = injector_container(objects)["volumeMounts"][0]["mountPath"]
    assert flags(injector_container(objects))["tls-cert-file"] == f"{mounted}/tls.crt"
    assert flags(injector_container(objects))["tls-key-file"] == f"{mounted}/tls.key"


def _start_chart_injector(objects: list[Obj], tmp: Path) -> tuple[subprocess.Popen[bytes], int]:
    """`refresher injector` with the chart's own arguments and generated Secret, on a free
    loopback port instead of 0.0.0.0:8443; returns the process and its port."""
    tls = tmp / "tls"
    tls.mkdir()
    for key, value in the(objects, "Secret")["data"].items():
        (tls / key).write_bytes(base64.b64decode(value))
    mount = injector_container(objects)["volumeMounts"][0]["mountPath"]
    args = [
        "--listen=127.0.0.1:0" if word.startswith("--listen=") else word.replace(mount, str(tls))
        for word in injector_container(objects)["args"]
    ]
    log = tmp / "injector.log"
    env = {"PATH": "/usr/bin:/bin"}  # no REFRESHER_* from the developer's shell
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "refresher", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
        )
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and process.poll() is None:
        for line in log.read_text().splitlines():
            if "serving admission reviews" in line:
                return process, int(json.loads(line)["listen"].rsplit(":", 1)[1])
        time.sleep(0.05)
    process.kill()
    process.wait(5)
    pytest.fail(f"the injector did not start:\n{log.read_text()[-2000:]}")


def test_the_real_injector_serves_the_chart_certificate_and_injects() -> None:
    """The CLI started with the chart's arguments and Secret answers over TLS that the
    webhook's caBundle verifies for the Service's name, and injects the chart's image."""
    injector_help()  # skips until `refresher injector` exists
    objects = render()
    (webhook,) = the(objects, "MutatingWebhookConfiguration")["webhooks"]
    context = ssl.create_default_context(
        cadata=base64.b64decode(webhook["clientConfig"]["caBundle"]).decode()
    )
    service = webhook["clientConfig"]["service"]
    server_name = f"{service['name']}.{service['namespace']}.svc"  # what the API server asks for
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "web-",
            "namespace": "shop",
            "labels": {OPT_IN_LABEL: "true"},
            "annotations": {"ims-token-refresher.io/credentials-secret": "adobe-ims-credentials"},
        },
        "spec": {"containers": [{"name": "app", "image": "busybox:1.37.0"}]},
    }
    review = {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "0c1d2e3f",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "shop",
            "operation": "CREATE",
            "object": pod,
        },
    }
    with tempfile.TemporaryDirectory() as tmp:
        process, port = _start_chart_injector(objects, Path(tmp))
        try:
            # One kept-alive connection, verified for server_name (not the IP) by
            # handing http.client a socket that is already TLS.
            connection = http.client.HTTPSConnection("127.0.0.1", port, timeout=5)
            connection.sock = context.wrap_socket(
                socket.create_connection(("127.0.0.1", port), timeout=5),
                server_hostname=server_name,
            )
            connection.request("GET", "/readyz")
            ready = connection.getresponse()
            ready.read()
            assert ready.status == 200
            connection.request(
                "POST",
                "/mutate",
                body=json.dumps(review),
                headers={"Content-Type": "application/json"},
            )
            response = connection.getresponse()
            answer = json.loads(response.read())["response"]
            connection.close()
        finally:
            process.terminate()
            process.wait(10)
    assert response.status == 200 and answer["uid"] == "0c1d2e3f"
    assert answer["allowed"] is True, answer
    patch = json.loads(base64.b64decode(answer["patch"]))
    images = re.findall(r'"image": "([^"]+)"', json.dumps(patch))
    assert flags(injector_container(objects))["image"] in images
    assert process.returncode == 0


# What DiscoveryApi serves: group/version -> [(resource, kind, namespaced)].
DISCOVERY_KINDS: dict[str, list[tuple[str, str, bool]]] = {
    "v1": [
        ("secrets", "Secret", True),
        ("services", "Service", True),
        ("serviceaccounts", "ServiceAccount", True),
    ],
    "apps/v1": [("deployments", "Deployment", True)],
    "policy/v1": [("poddisruptionbudgets", "PodDisruptionBudget", True)],
    "admissionregistration.k8s.io/v1": [
        ("mutatingwebhookconfigurations", "MutatingWebhookConfiguration", False)
    ],
}


class DiscoveryApi:
    """Just enough of a Kubernetes API server for `helm template --dry-run=server`:
    discovery for the chart's kinds and GET of the objects a test stores, over a real
    socket through a kubeconfig. There is no cluster here; this stands in for one so
    that the chart's `lookup` of its previous Secret runs for real."""

    def __init__(self) -> None:
        self.objects: dict[str, Obj] = {}
        self.requests: list[str] = []
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?")[0]
                api.requests.append(path)
                body = api.answer(path)
                data = json.dumps(body or {"kind": "Status", "code": 404}).encode()
                self.send_response(200 if body else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def answer(self, path: str) -> Obj | None:
        groups = [gv for gv in DISCOVERY_KINDS if "/" in gv]
        if path == "/version":
            return {"major": "1", "minor": "33", "gitVersion": "v1.33.0"}
        if path == "/api":
            return {"kind": "APIVersions", "versions": ["v1"]}
        if path == "/apis":
            return {
                "kind": "APIGroupList",
                "groups": [
                    {
                        "name": gv.split("/")[0],
                        "versions": [{"groupVersion": gv, "version": "v1"}],
                        "preferredVersion": {"groupVersion": gv, "version": "v1"},
                    }
                    for gv in groups
                ],
            }
        version = path.removeprefix("/api/").removeprefix("/apis/")
        if version in DISCOVERY_KINDS:
            return {
                "kind": "APIResourceList",
                "groupVersion": version,
                "resources": [
                    {"name": name, "kind": kind, "namespaced": namespaced, "verbs": ["get"]}
                    for name, kind, namespaced in DISCOVERY_KINDS[version]
                ],
            }
        return self.objects.get(path)

    def kubeconfig(self, directory: Path) -> Path:
        path = directory / "kubeconfig"
        server = f"http://127.0.0.1:{self.server.server_address[1]}"
        path.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "fake", "cluster": {"server": server}}],
                    "users": [{"name": "fake", "user": {}}],
                    "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
                    "current-context": "fake",
                }
            ),
            encoding="utf-8",
        )
        return path

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _render_against(api: DiscoveryApi) -> list[Obj]:
    """`helm template --dry-run=server`: rendered with lookups answered by the fake API."""
    with tempfile.TemporaryDirectory() as tmp:
        kubeconfig = api.kubeconfig(Path(tmp))
        result = helm(
            "template",
            RELEASE,
            str(CHART),
            "--namespace",
            NAMESPACE,
            "--dry-run=server",
            "--disable-openapi-validation",
            "--kubeconfig",
            str(kubeconfig),
        )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def _as_released(secret: Obj) -> Obj:
    """The Secret as the previous release left it in the cluster (Helm's ownership marks)."""
    stored = json.loads(json.dumps(secret))
    stored["metadata"]["annotations"] = {
        "meta.helm.sh/release-name": RELEASE,
        "meta.helm.sh/release-namespace": NAMESPACE,
    }
    return stored


@pytest.fixture
def api() -> Iterator[DiscoveryApi]:
    server = DiscoveryApi()
    yield server
    server.close()


def test_upgrade_keeps_the_generated_certificate(api: DiscoveryApi) -> None:
    """On upgrade the chart finds its Secret with `lookup` and keeps the CA, the serving
    pair and the caBundle: running pods never see a certificate change."""
    first = the(render(), "Secret")
    path = f"/api/v1/namespaces/{NAMESPACE}/secrets/{first['metadata']['name']}"
    api.objects[path] = _as_released(first)
    objects = _render_against(api)
    assert path in api.requests
    assert the(objects, "Secret")["data"] == first["data"]
    (webhook,) = the(objects, "MutatingWebhookConfiguration")["webhooks"]
    assert webhook["clientConfig"]["caBundle"] == first["data"]["ca.crt"]


def test_an_incomplete_secret_is_replaced_by_a_new_pair(api: DiscoveryApi) -> None:
    """A Secret lacking its key is not reused: a new CA and serving pair are generated."""
    first = the(render(), "Secret")
    path = f"/api/v1/namespaces/{NAMESPACE}/secrets/{first['metadata']['name']}"
    damaged = _as_released(first)
    del damaged["data"]["tls.key"]
    api.objects[path] = damaged
    objects = _render_against(api)
    assert path in api.requests
    data = the(objects, "Secret")["data"]
    assert data["ca.crt"] != first["data"]["ca.crt"] and data["tls.key"]
    ca = x509.load_pem_x509_certificate(base64.b64decode(data["ca.crt"]))
    x509.load_pem_x509_certificate(base64.b64decode(data["tls.crt"])).verify_directly_issued_by(ca)


def _cert_manager_problems(objects: list[Obj], namespace: str) -> Iterator[str]:
    """cert-manager wiring: the cainjector annotation names the Certificate whose Secret the
    injector mounts, issued for the Service's DNS names by an Issuer that exists."""
    configuration = the(objects, "MutatingWebhookConfiguration")
    if "caBundle" in configuration["webhooks"][0]["clientConfig"]:
        yield "caBundle is set: cert-manager's CA injector owns it"
    source = configuration["metadata"]["annotations"]["cert-manager.io/inject-ca-from"]
    certificate = the(objects, "Certificate", source.split("/")[1])
    if source != f"{namespace}/{certificate['metadata']['name']}":
        yield f"inject-ca-from {source} is not the serving Certificate"
    pod = the(objects, "Deployment", "injector")["spec"]["template"]["spec"]
    if [v["secret"]["secretName"] for v in pod["volumes"]] != [certificate["spec"]["secretName"]]:
        yield "the injector does not mount the Certificate's Secret"
    service = the(objects, "Service", "injector")["metadata"]["name"]
    if f"{service}.{namespace}.svc" not in certificate["spec"]["dnsNames"]:
        yield f"dnsNames {certificate['spec']['dnsNames']} miss {service}.{namespace}.svc"
    issuers = {o["metadata"]["name"] for o in objects if o["kind"] == "Issuer"}
    if certificate["spec"]["issuerRef"]["name"] not in issuers:
        yield "the serving Certificate's Issuer is not part of the install"
    if any(o["kind"] == "Secret" for o in objects):
        yield "a Secret is rendered although cert-manager writes it"


def test_cert_manager_issues_the_serving_certificate() -> None:
    """With certManager.enabled, cert-manager issues the certificate and fills caBundle."""
    problems = list(_cert_manager_problems(render(("certManager.enabled=true",)), NAMESPACE))
    assert not problems, "\n".join(problems)


def test_cert_manager_with_an_issuer_of_your_own() -> None:
    """certManager.issuerRef names an existing issuer: the chart then creates no Issuer."""
    objects = render(
        (
            "certManager.enabled=true",
            "certManager.issuerRef.name=corp-ca",
            "certManager.issuerRef.kind=ClusterIssuer",
        )
    )
    assert not [o for o in objects if o["kind"] == "Issuer"]
    certificate = the(objects, "Certificate")
    assert certificate["spec"]["issuerRef"] == {
        "name": "corp-ca",
        "kind": "ClusterIssuer",
        "group": "cert-manager.io",
    }


def test_injector_example_webhook_and_cert_manager_wiring() -> None:
    """The example's webhook keeps the chart's contract, and cert-manager's wiring follows
    the kustomization's namespace."""
    objects = list(kustomize(INJECTOR_EXAMPLE))
    namespace = the(objects, "Namespace")["metadata"]["name"]
    problems = list(webhook_problems(objects, namespace))
    problems += list(_cert_manager_problems(objects, namespace))
    assert not problems, "\n".join(problems)
    assert "NAMESPACE" not in yaml.safe_dump_all(objects)
