"""Benchmark of `refresher injector`: latency per admission review over TLS, and memory.

The injector runs as the container runs it (a process of its own, the real CLI);
clients keep their TLS connections alive, as the API server does, and send a real
pod's AdmissionReview (the Deployment of tests/test_inject.py, as a pod). Clients
are closed-loop: each sends its next review as soon as the last one is answered,
so 50 clients keep 50 reviews in flight at all times (harsher than pod creation
bursts). The clients run in separate processes, so that their own Python cost is
not the injector's; on a small machine they still compete with it for CPU, which
the figures include.

Latency is measured by each client from sending the request to reading the whole
answer. Memory is the injector's VmHWM / VmRSS after the runs.

    .venv/bin/python bench/injector.py            # prints a Markdown section
    BENCH_QUICK=1 .venv/bin/python bench/injector.py
"""

from __future__ import annotations

import datetime as dt
import http.client
import ipaddress
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

QUICK = os.environ.get("BENCH_QUICK") == "1"
REQUESTS_PER_CLIENT_1 = 300 if QUICK else 2000
REQUESTS_TOTAL_50 = 2000 if QUICK else 10000


def certificate(directory: Path) -> Path:
    """A self-signed serving certificate for 127.0.0.1; returns the CA (= cert) path."""
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
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    (directory / "tls.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "tls.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return directory / "tls.crt"


def review_body() -> bytes:
    from tests.test_inject import DEPLOYMENT  # a real pod with init containers and volumes

    template = yaml.safe_load(DEPLOYMENT)["spec"]["template"]
    template["metadata"]["generateName"] = "orders-7d9f8-"
    pod = {"apiVersion": "v1", "kind": "Pod", **template}
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
            "object": pod,
            "oldObject": None,
            "dryRun": False,
        },
    }
    return json.dumps(review).encode()


def client(port: int, ca: str, count: int, body: bytes, start: float) -> list[float]:
    """One keep-alive client: `count` reviews back to back; latencies in seconds."""
    import ssl

    context = ssl.create_default_context(cafile=ca)
    connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=30)
    connection.connect()
    while time.time() < start:  # every client starts together
        time.sleep(0.001)
    latencies = []
    for _ in range(count):
        began = time.perf_counter()
        connection.request("POST", "/mutate", body, {"Content-Type": "application/json"})
        answer = connection.getresponse()
        data = answer.read()
        latencies.append(time.perf_counter() - began)
        if answer.status != 200 or b'"patch"' not in data:
            raise RuntimeError(f"unexpected answer {answer.status}")
    connection.close()
    return latencies


def _client_group(args: tuple[int, str, int, int, bytes, float]) -> list[float]:
    port, ca, clients, count, body, start = args
    results: list[list[float]] = [[] for _ in range(clients)]

    def run(index: int) -> None:
        results[index] = client(port, ca, count, body, start)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [latency for result in results for latency in result]


def measure(port: int, ca: str, clients: int, total: int, body: bytes) -> list[float]:
    processes = min(clients, 10)  # 50 clients: 10 processes of 5 threads
    per_process = clients // processes
    count = max(1, total // clients)
    start = time.time() + 1.0
    with multiprocessing.Pool(processes) as pool:
        groups = pool.map(_client_group, [(port, ca, per_process, count, body, start)] * processes)
    return [latency for group in groups for latency in group]


def memory(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            fields[key] = int(value.split()[0])
    return fields


def cpu_seconds(pid: int) -> float:
    """User + system CPU of the whole process (every thread), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="injector-bench-") as scratch:
        directory = Path(scratch)
        ca = certificate(directory)
        log = directory / "injector.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("REFRESHER_")}
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "refresher",
                    "injector",
                    "--listen=127.0.0.1:0",
                    f"--tls-cert-file={ca}",
                    f"--tls-key-file={directory / 'tls.key'}",
                    "--log-level=info",  # a JSON line per review, as in production
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=ROOT,
            )
        try:
            port = _port(proc, log)
            idle = memory(proc.pid)
            body = review_body()
            rows = []
            for clients, total in ((1, REQUESTS_PER_CLIENT_1), (50, REQUESTS_TOTAL_50)):
                measure(port, str(ca), clients, min(total, 500), body)  # warm up
                cpu_before = cpu_seconds(proc.pid)
                latencies = measure(port, str(ca), clients, total, body)
                cpu = (cpu_seconds(proc.pid) - cpu_before) / len(latencies)
                rows.append((clients, len(latencies), latencies, cpu))
            after = memory(proc.pid)
        finally:
            proc.terminate()
            proc.wait(10)
    print("## Injector (admission webhook)\n")
    print(
        f"One review of a {len(body):,}-byte pod (`bench/injector.py`), TLS 1.3 keep-alive"
        f" connections on loopback, closed-loop clients; {os.cpu_count()} CPUs shared by"
        " the injector and its clients.\n"
    )
    print("| clients | reviews | p50 | p99 | max | reviews/s | injector CPU per review |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for clients, count, latencies, cpu in rows:
        p50, p99 = percentile(latencies, 0.5), percentile(latencies, 0.99)
        rate = clients / statistics.mean(latencies)
        print(
            f"| {clients} | {count:,} | {p50 * 1000:.2f} ms | {p99 * 1000:.2f} ms"
            f" | {max(latencies) * 1000:.2f} ms | {rate:,.0f} | {cpu * 1e6:.0f} µs |"
        )
    print(
        f"\nMemory: {idle['VmRSS'] / 1024:.1f} MiB RSS idle after start;"
        f" {after['VmRSS'] / 1024:.1f} MiB RSS and {after['VmHWM'] / 1024:.1f} MiB peak"
        " after the runs."
    )


def _port(proc: subprocess.Popen[bytes], log: Path) -> int:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        for line in log.read_text().splitlines():
            if "serving admission reviews" in line:
                return int(json.loads(line)["listen"].rsplit(":", 1)[1])
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    raise SystemExit(f"injector did not start:\n{log.read_text()}")


if __name__ == "__main__":
    main()
