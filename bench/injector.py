"""The webhook as a subject: `refresher injector` over TLS, and the clients that load it.

The injector runs as the container runs it (the real CLI, a process of its own, JSON
logs at info: a line per review). Clients keep their TLS connections alive, as the
API server does, and send the AdmissionReview of a real pod (POD below: init
containers, volumes, probes). They run in separate processes, so that their own
Python cost is not the injector's; on a small machine they still compete with it for
CPU, which the figures include.

Three loads, each measured by the clients from sending a request to reading the whole
answer:
- one client, closed loop: the next review as soon as the last is answered (the
  latency of one review with nothing else in flight);
- 50 clients, paced: each sends a review every `interval_s` from a random phase, an
  offered load far above a rollout's pod creations, yet one the injector can serve
  (the latency goal applies here);
- 50 clients, closed loop: 50 reviews in flight at all times, which measures capacity
  (reviews/s); its latencies are queueing (Little's law: 50 / throughput), not
  service time.
"""

from __future__ import annotations

import datetime as dt
import http.client
import ipaddress
import itertools
import json
import multiprocessing
import random
import ssl
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from measuring import MIB, Workspace, percentile, status, stderr_of

# The pod template of a Deployment that opts in (as tests/support/injection.py's DEPLOYMENT):
# a copy, so that the benchmark does not depend on the test suite's layout.
POD: dict[str, Any] = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {
        "generateName": "orders-7d9f8-",
        "labels": {"app": "orders", "ims-token-refresher.io/inject": "true"},
        "annotations": {
            "ims-token-refresher.io/credentials-secret": "orders-adobe",
            "ims-token-refresher.io/token-path": "/var/run/secrets/adobe",
            "prometheus.io/scrape": "true",
        },
    },
    "spec": {
        "serviceAccountName": "orders",
        "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "fsGroup": 2000},
        "initContainers": [
            {
                "name": "migrate",
                "image": "registry.example.com/orders:4.2",
                "args": ["migrate", "--wait"],
                "volumeMounts": [{"name": "config", "mountPath": "/etc/orders"}],
            }
        ],
        "containers": [
            {
                "name": "api",
                "image": "registry.example.com/orders:4.2",
                "ports": [{"name": "http", "containerPort": 8080}],
                "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}},
                "volumeMounts": [
                    {"name": "config", "mountPath": "/etc/orders"},
                    {"name": "cache", "mountPath": "/var/cache/orders"},
                ],
            },
            {"name": "worker", "image": "registry.example.com/orders:4.2", "args": ["worker"]},
        ],
        "volumes": [
            {"name": "config", "configMap": {"name": "orders-config"}},
            {"name": "cache", "emptyDir": {}},
        ],
    },
}


@dataclass(frozen=True)
class Load:
    """One load: `clients` keep-alive connections, `count` reviews each, paced or not."""

    name: str
    clients: int
    count: int
    interval_s: float | None  # None: closed loop


def review_body() -> bytes:
    review = {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "bench",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "shop",
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": POD,
            "oldObject": None,
            "dryRun": False,
        },
    }
    return json.dumps(review).encode()


def certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed serving certificate for 127.0.0.1: (cert = CA, key)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "injector-bench")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=6))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tls.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "tls.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return directory / "tls.crt", directory / "tls.key"


def _client(port: int, ca: str, load: Load, body: bytes, start: float, seed: int) -> list[float]:
    """One keep-alive client: `load.count` reviews; latencies in seconds."""
    context = ssl.create_default_context(cafile=ca)
    connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=30)
    connection.connect()
    phase = random.Random(seed).uniform(0, load.interval_s or 0)
    latencies = []
    for index in range(load.count):
        due = start + phase + index * (load.interval_s or 0)
        while (delay := due - time.time()) > 0:  # paced: wait for the slot; late: go now
            time.sleep(delay)
        began = time.perf_counter()
        connection.request("POST", "/mutate", body, {"Content-Type": "application/json"})
        answer = connection.getresponse()
        data = answer.read()
        latencies.append(time.perf_counter() - began)
        if answer.status != 200 or b'"patch"' not in data:
            raise RuntimeError(f"unexpected answer {answer.status}")
    connection.close()
    return latencies


def _client_group(args: tuple[int, str, Load, int, bytes, float, int]) -> list[float]:
    port, ca, load, threads, body, start, seed = args
    results: list[list[float]] = [[] for _ in range(threads)]

    def run(index: int) -> None:
        results[index] = _client(port, ca, load, body, start, seed * 1000 + index)

    workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    if any(len(r) != load.count for r in results):
        raise RuntimeError("a webhook client failed")
    return [latency for result in results for latency in result]


def drive(port: int, ca: Path, load: Load, body: bytes) -> list[float]:
    """Run `load` against the injector; every client starts together, one second from now."""
    processes = min(load.clients, 10)  # 50 clients: 10 processes of 5 threads
    start = time.time() + 1.0 + processes * 0.1  # spawned interpreters start in ~0.1 s each
    jobs = [
        (port, str(ca), load, load.clients // processes, body, start, seed)
        for seed in range(processes)
    ]
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        groups = pool.map(_client_group, jobs)
    return [latency for group in groups for latency in group]


def _cpu_ns(pid: int) -> int:
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def _port(child: subprocess.Popen[bytes], log: Path) -> int:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for line in log.read_text(errors="replace").splitlines():
            if "serving admission reviews" in line:
                return int(json.loads(line)["listen"].rsplit(":", 1)[1])
        if child.poll() is not None:
            break
        time.sleep(0.05)
    raise RuntimeError(f"the injector did not start:\n{stderr_of(child)}")


def argv(cert: Path, key: Path) -> list[str]:
    return [
        str(Path(sys.executable).parent / "refresher"),
        "injector",
        "--listen=127.0.0.1:0",
        f"--tls-cert-file={cert}",
        f"--tls-key-file={key}",
        "--log-level=info",  # a JSON line per review, as in production
    ]


def measure(space: Workspace, loads: list[Load], rounds: int) -> dict[str, Any]:
    """Start the injector, warm it up, run the loads `rounds` times over (A B C A B C ...).

    Figures per load are lists, one value per round; memory is taken after the last.
    """
    cert, key = certificate(space.path("injector-tls"))
    log = space.path("injector.log")
    with log.open("wb") as out:
        child = space.spawn(argv(cert, key), stdout=out, name="injector")
    child.stderr_path = log  # type: ignore[attr-defined]  # it logs to stdout
    try:
        port = _port(child, log)
        idle_rss = int(status(child.pid)["VmRSS"].split()[0]) / MIB
        body = review_body()
        drive(port, cert, Load("warm-up", 1, 200, None), body)
        figures: dict[str, Any] = {"body_bytes": len(body), "idle_rss_mib": idle_rss}
        for _round, load in itertools.product(range(rounds), loads):
            before = _cpu_ns(child.pid)
            latencies = drive(port, cert, load, body)
            found = {
                "reviews": len(latencies),
                "p50_ms": percentile(latencies, 0.50) * 1000,
                "p99_ms": percentile(latencies, 0.99) * 1000,
                "max_ms": max(latencies) * 1000,
                # Closed loop: each client has one review in flight, so clients / latency.
                "per_s": load.clients / statistics.mean(latencies),
                "cpu_us": (_cpu_ns(child.pid) - before) / 1000 / len(latencies),
            }
            for name, value in found.items():
                figures.setdefault(load.name, {}).setdefault(name, []).append(value)
        fields = status(child.pid)
        figures["rss_mib"] = int(fields["VmRSS"].split()[0]) / MIB
        figures["hwm_mib"] = int(fields["VmHWM"].split()[0]) / MIB
        return figures
    finally:
        space.stop(child)
