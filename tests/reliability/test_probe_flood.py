"""Floods on the probe port of a real `refresher run` (issue 10, items 2 and 3): huge
request heads never finished, hundreds of idle clients reopened as they are dropped,
slowloris clients. The probes keep answering, memory stays within the manifests' limit,
and the refresh loop keeps its cadence. Loopback only, a few seconds each."""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.harness import Harness, timed_get, wait_until

from .support import Refresher, observed_run

pytestmark = pytest.mark.slow

SIDECAR = Path(__file__).parents[2] / "manifests" / "examples" / "sidecar" / "deployment.yaml"
BIG_HEADER = b"X-Big-%d: " + b"a" * 65000 + b"\r\n"  # 99 of these: 6.4 MB per connection
TOKEN_TTL_S = 2.0  # the loop refreshes every 1.6 s (ratio 0.8, no jitter)


def _memory_limit_mib() -> float:
    """The shipped sidecar's memory limit, read from its manifest (e.g. `96Mi`)."""
    deployment = yaml.safe_load(SIDECAR.read_text())
    spec = deployment["spec"]["template"]["spec"]
    for container in spec.get("initContainers", []) + spec["containers"]:
        limit = container.get("resources", {}).get("limits", {}).get("memory")
        if "refresher" in container["name"] and limit:
            assert str(limit).endswith("Mi"), limit
            return float(str(limit)[:-2])
    raise AssertionError("no memory limit for the refresher in the sidecar example")


def _vm_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            if name == field:
                return int(value.split()[0])
    raise AssertionError(f"no {field} for {pid}")


def _start(harness: Harness) -> Refresher:
    """`run` against the emulator with 2 s tokens; returns once /readyz says 200."""
    harness.start_emulator(token_ttl_s=TOKEN_TTL_S)
    out = harness.root / "out"
    refresher = Refresher(
        harness, *observed_run(harness.aem, out), *harness.endpoint_args(), "--jitter", "0"
    )
    wait_until(lambda: refresher.get("/readyz")[0] == 200, timeout=20, interval=0.1)
    return refresher


def _timed_probe(port: int, path: str = "/healthz") -> tuple[int, float]:
    """One GET on a fresh connection: (status, or 0 if it failed; seconds taken)."""
    return timed_get(port, path, timeout=2)


class Issues(threading.Thread):
    """When the emulator issued each token (polled there, so a starved probe port cannot
    hide a slowed loop): the gaps between refreshes."""

    def __init__(self, harness: Harness) -> None:
        super().__init__(name="issues", daemon=True)
        assert harness.emulator is not None
        self.emulator = harness.emulator
        self.times: list[float] = []
        self.stop_event = threading.Event()

    def run(self) -> None:
        seen = int(self.emulator.stats()["issued"])
        while not self.stop_event.wait(0.02):
            issued = int(self.emulator.stats()["issued"])
            if issued != seen:
                seen = issued
                self.times.append(time.monotonic())

    def gaps(self) -> list[float]:
        self.stop_event.set()
        self.join(5)
        return [b - a for a, b in zip(self.times, self.times[1:], strict=False)]


class Crowd(threading.Thread):
    """Idle clients that send nothing and slowloris clients that send a header line every
    `trickle_s`, all reopened as the server drops them (one selector, no thread each)."""

    def __init__(self, port: int, idle: int, slow: int = 0, trickle_s: float = 2.0) -> None:
        super().__init__(name="crowd", daemon=True)
        self.port = port
        self.wanted = {"idle": idle, "slow": slow}
        self.trickle_s = trickle_s
        self.selector = selectors.DefaultSelector()
        self.stop_event = threading.Event()
        self.counts = {"opened": 0, "dropped": 0, "refused": 0}
        self.open = {"idle": 0, "slow": 0}

    def _open(self, kind: str) -> None:
        try:
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=1)
        except OSError:
            self.counts["refused"] += 1
            return
        if kind == "slow":
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        sock.setblocking(False)
        self.selector.register(sock, selectors.EVENT_READ, kind)
        self.counts["opened"] += 1
        self.open[kind] += 1

    def _top_up(self) -> None:
        for kind, wanted in self.wanted.items():
            while self.open[kind] < wanted and not self.stop_event.is_set():
                self._open(kind)
                if self.counts["refused"] > 10_000:
                    return

    def _trickle(self) -> None:
        for key in list(self.selector.get_map().values()):
            if key.data == "slow":
                with contextlib.suppress(OSError):
                    key.fileobj.send(b"X-Slow: y\r\n")  # type: ignore[union-attr]

    def run(self) -> None:
        self._top_up()
        next_trickle = time.monotonic() + self.trickle_s
        while not self.stop_event.is_set():
            for key, _ in self.selector.select(timeout=0.05):
                sock: Any = key.fileobj
                try:
                    data = sock.recv(4096)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:  # the server dropped it: reopen
                    self.selector.unregister(sock)
                    sock.close()
                    self.open[key.data] -= 1
                    self.counts["dropped"] += 1
            if time.monotonic() >= next_trickle:
                self._trickle()
                next_trickle += self.trickle_s
            self._top_up()
        for key in list(self.selector.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        self.selector.close()

    def stop(self) -> None:
        self.stop_event.set()
        self.join(10)


def _big_head(port: int, outcomes: list[str]) -> socket.socket | None:
    """Send a request line and 99 headers of 65 kB, never the blank line that ends them."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        for i in range(99):
            sock.sendall(BIG_HEADER % i)
    except OSError:
        outcomes.append("closed")  # the server answered and closed, or reset us
        sock.close()
        return None
    sock.settimeout(0.5)
    try:
        answer = sock.recv(64)
    except TimeoutError:
        outcomes.append("held")  # everything buffered by the server: the 0.1.0 failure
        return sock
    except OSError:
        answer = b""
    outcomes.append("431" if answer.startswith(b"HTTP/1.1 431") else "closed")
    sock.close()
    return None


def test_big_request_heads_get_431_and_memory_stays_in_the_limit(
    harness: Harness, figures: dict[str, Any]
) -> None:
    """12 clients sending 99 headers of 65 kB each and 64 idle clients: every big head is
    answered 431 or closed, /healthz answers, peak VmRSS stays under the manifests' limit."""
    refresher = _start(harness)
    port = refresher.port()
    limit_mib = _memory_limit_mib()
    before_kib = _vm_kib(refresher.pid, "VmHWM")
    outcomes: list[str] = []
    held: list[socket.socket | None] = []
    crowd = Crowd(port, idle=64)
    try:
        threads = [
            threading.Thread(target=lambda: held.append(_big_head(port, outcomes)))
            for _ in range(12)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        crowd.start()
        wait_until(lambda: crowd.counts["opened"] >= 64, timeout=5)
        time.sleep(0.5)
        status, elapsed = _timed_probe(port)
        peak_kib = _vm_kib(refresher.pid, "VmHWM")
    finally:
        for sock in held:
            if sock is not None:
                sock.close()
        crowd.stop()
    figures.update(
        {
            "peak_vmhwm_mib_before_flood": round(before_kib / 1024, 1),
            "peak_vmhwm_mib_with_12_big_heads_and_64_idle": round(peak_kib / 1024, 1),
            "memory_limit_mib": limit_mib,
            "big_head_outcomes": sorted(outcomes),
            "healthz_during_flood_s": round(elapsed, 3),
        }
    )
    assert len(outcomes) == 12
    assert set(outcomes) <= {"431", "closed"}, outcomes
    assert peak_kib / 1024 < limit_mib, f"peak {peak_kib / 1024:.1f} MiB over {limit_mib} Mi"
    assert (status, elapsed < 1) == (200, True)
    assert refresher.get("/readyz")[0] == 200
    assert refresher.stop() == 0
    assert "Traceback" not in refresher.output


def _probe_round(port: int, count: int = 10, spacing_s: float = 0.3) -> list[tuple[int, float]]:
    answers = []
    for _ in range(count):
        answers.append(_timed_probe(port))
        time.sleep(spacing_s)
    return answers


def test_idle_and_slowloris_crowds_do_not_starve_probes_or_the_loop(
    harness: Harness, figures: dict[str, Any]
) -> None:
    """64, then 300 idle clients reopened as they are dropped, plus slowloris clients: 10 of
    10 /healthz answer within 1 s each, idle clients are dropped at the head deadline, and
    the refresh loop keeps its 1.6 s cadence throughout."""
    refresher = _start(harness)
    port = refresher.port()
    issues = Issues(harness)
    issues.start()
    rounds: dict[str, list[tuple[int, float]]] = {}
    crowd = Crowd(port, idle=64, slow=16)
    crowd.start()
    try:
        wait_until(lambda: crowd.open["idle"] == 64, timeout=5)
        rounds["64 idle + 16 slowloris"] = _probe_round(port)
        crowd.wanted["idle"] = 300
        wait_until(lambda: crowd.open["idle"] >= 250, timeout=10)
        rounds["300 idle + 16 slowloris"] = _probe_round(port)
    finally:
        crowd.stop()
        gaps = issues.gaps()
    figures.update(
        {
            name: {
                "answered_200": sum(status == 200 for status, _ in answers),
                "slowest_s": round(max(seconds for _, seconds in answers), 3),
            }
            for name, answers in rounds.items()
        }
    )
    figures.update({"crowd": crowd.counts, "refresh_gaps_s": [round(g, 2) for g in gaps]})
    for name, answers in rounds.items():
        assert [status for status, _ in answers] == [200] * 10, (name, answers)
        assert max(seconds for _, seconds in answers) < 1, (name, answers)
    assert crowd.counts["dropped"] > 0, "idle clients were never dropped"
    # One refresh per 1.6 s of lifetime; a loop slowed by the crowd would fall behind.
    assert len(gaps) >= 2, gaps
    assert max(gaps) < TOKEN_TTL_S * 0.8 + 0.5, gaps
    assert refresher.stop() == 0
    assert "Traceback" not in refresher.output
