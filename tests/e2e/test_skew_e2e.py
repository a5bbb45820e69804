"""Clock skew end to end: a pod whose clock is 10 minutes behind IMS (the emulator run with
`clock_offset_s=600`, which moves its clock and its `Date` header).

IMS judges `exp` by its own clock, so every JWT signed for our clock (exp = now + 300 s)
is already expired for it. 0.1.0 then paused as if the credentials were rejected. Now the
first token comes within 3 requests (the rejection, then one re-signed at once), every
later one at the first try, the skew is warned about once and exported as a gauge.
"""

from __future__ import annotations

import json
import queue
import threading
import urllib.request

import pytest

from tests.support.harness import Harness, wait_until

pytestmark = pytest.mark.slow

OFFSET_S = 600.0


def test_a_pod_10_minutes_behind_gets_every_token(harness: Harness) -> None:
    """`run` with 3 s tokens against IMS 600 s ahead: 4 tokens cost 5 requests (one
    rejection, at the start only), one skew warning, gauge ~600."""
    emulator = harness.start_emulator(token_ttl_s=3, clock_offset_s=OFFSET_S)
    token_dir = harness.root / "out"
    proc = harness.start(
        *harness.args(
            "run",
            harness.aem,
            "--token-dir",
            str(token_dir),
            "--listen",
            "127.0.0.1:0",
            "--backoff-initial",
            "0.2",
        )
    )
    lines: queue.Queue[str] = queue.Queue()
    seen: list[str] = []
    assert proc.stdout is not None
    stdout = proc.stdout
    threading.Thread(target=lambda: [lines.put(line) for line in stdout], daemon=True).start()

    def drain() -> None:
        while not lines.empty():
            seen.append(lines.get())

    def issued() -> int:
        drain()
        return int(emulator.stats()["issued"])

    wait_until(lambda: issued() >= 4, timeout=30)
    stats = emulator.stats()
    port = next(
        int(json.loads(line)["listen"].rsplit(":", 1)[1])
        for line in seen
        if "serving probes and metrics" in line
    )
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        metrics = answer.read().decode()
    code, rest = harness.stop(proc)
    harness.outputs.pop()  # the rest of stdout was read by the thread above
    drain()
    harness.outputs.append("".join(seen) + rest)
    assert code == 0
    assert stats["rejected"] == {"invalid_token": 1}, stats
    assert stats["requests"]["jwt"] == stats["issued"] + 1, stats
    gauge = next(
        float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith("refresher_clock_skew_seconds ")
    )
    assert OFFSET_S - 2 <= gauge <= OFFSET_S + 2
    warnings = [json.loads(line) for line in seen if "off this node's" in line]
    assert len(warnings) == 1 and warnings[0]["level"] == "warning"
    assert not [line for line in seen if "giving up" in line]


def test_check_online_reports_the_skew(harness: Harness) -> None:
    """`check --online` against IMS 600 s ahead: granted at the second request, skew ~600."""
    emulator = harness.start_emulator(clock_offset_s=OFFSET_S)
    result = harness.run(*harness.args("check", harness.aem, "--online"))
    assert result.returncode == 0, result.stdout + result.stderr
    report = dict(line.split(": ", 1) for line in result.stdout.splitlines())
    assert report["online"] == "ok"
    assert OFFSET_S - 2 <= float(report["clock_skew_s"]) <= OFFSET_S + 2
    assert emulator.stats()["requests"]["jwt"] == 2


def test_an_ims_clock_behind_ours_needs_no_resigning(harness: Harness) -> None:
    """IMS 600 s behind: our JWTs are merely longer-lived for it; first try, skew -600."""
    emulator = harness.start_emulator(clock_offset_s=-OFFSET_S)
    result = harness.run(*harness.args("check", harness.aem, "--online"))
    assert result.returncode == 0, result.stdout + result.stderr
    report = dict(line.split(": ", 1) for line in result.stdout.splitlines())
    assert -OFFSET_S - 2 <= float(report["clock_skew_s"]) <= -OFFSET_S + 2
    assert emulator.stats()["requests"]["jwt"] == 1
