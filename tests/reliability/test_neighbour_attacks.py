"""A hostile neighbour container: it shares the token directory (an emptyDir), so it can
plant, swap and race entries there, and a chatty `--on-refresh` hook can flood us.

Each attack is real and bounded (a few seconds): a racing process flipping a stale
snapshot name between a directory and a symlink to a victim directory; SIGTERM at random
points of a publish; an undeletable leftover, a forged year-9999 `token.json` and a
`..data` pointing outside DIR against the real CLI and the emulator; a hook writing
200 MB to stderr.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import tracemalloc
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from refresher.clock import SystemClock
from refresher.errors import PublishError
from refresher.metrics import Metrics
from refresher.notify import TAIL_BYTES, Notifier
from refresher.sinks.file import PUBLISHED, FileSink
from refresher.token import AccessToken
from tests.support.harness import REPO, Harness, read_token

pytestmark = pytest.mark.slow

STALE = "..2020_01_01_00_00_00.x"


def _token(n: int, now: datetime | None = None) -> AccessToken:
    issued = now or datetime.now(UTC)
    return AccessToken(
        f"token-{n:08d}", issued, issued + timedelta(hours=24), "jwt", "c", "https://ims"
    )


def _python(script: str, *args: str) -> subprocess.Popen[str]:
    """A helper process running `script` with the repository importable."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )


# ------------------------------------------------------------- item 1: the symlink race

_FLIPPER = """
    import os, sys, time
    name, victim, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
    print("flipping", flush=True)
    flips = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for step in (os.mkdir, os.rmdir, lambda n: os.symlink(victim, n), os.unlink):
            try:
                step(name)
            except OSError:
                pass
        flips += 1
    print(flips, flush=True)
"""


def test_cleanup_never_follows_a_symlink_swapped_in_by_a_racing_neighbour(
    tmp_path: Path, figures: dict[str, Any]
) -> None:
    """While the sink publishes and cleans in a loop, a process flips a stale snapshot
    name between a directory and a symlink to a victim directory (200 files): after 3 s
    every victim file is still there."""
    victim = tmp_path / "victim"
    victim.mkdir()
    for n in range(200):
        (victim / f"file-{n:03d}").write_text("precious")
    out = tmp_path / "out"
    sink = FileSink(out, clock=SystemClock())
    sink.prepare()
    flipper = _python(_FLIPPER, str(out / STALE), str(victim), "3")
    assert flipper.stdout is not None
    assert flipper.stdout.readline().strip() == "flipping"
    publishes = failed = 0
    end = time.monotonic() + 3
    try:
        while time.monotonic() < end and len(os.listdir(victim)) == 200:
            try:
                sink.publish(_token(publishes))
            except PublishError:
                failed += 1  # cleanup is best effort: a publish must not fail for it
            publishes += 1
    finally:
        flips = int(flipper.communicate(timeout=10)[0].strip() or 0)
    left = len(os.listdir(victim))
    figures.update(
        {"publishes": publishes, "failed": failed, "flips": flips, "victim_files_left": left}
    )
    assert left == 200
    assert failed == 0
    assert publishes > 10 and flips > 1000  # the race really ran
    assert sink.read_current() is not None


# ------------------------------------------------------------- SIGTERM mid-publish

_PUBLISHER = """
    import sys
    from datetime import timedelta
    from pathlib import Path
    from refresher.clock import SystemClock
    from refresher.sinks.file import FileSink
    from refresher.token import AccessToken
    clock = SystemClock()
    sink = FileSink(Path(sys.argv[1]), clock=clock)
    sink.prepare()
    n = int(sys.argv[2])
    print("publishing", flush=True)
    while True:
        now = clock.now()
        sink.publish(AccessToken(f"token-{n:08d}", now, now + timedelta(hours=24), "jwt", "c",
                                 "https://ims"))
        n += 1
"""


def _reader_view(out: Path) -> str:
    """What an application sees through the stable names; asserts the set is whole."""
    value = (out / "access_token").read_text()
    document = json.loads((out / "token.json").read_text())
    assert document["access_token"] == value
    assert document["expires_at"] == (out / "expires_at").read_text()
    return value


def test_sigterm_at_any_point_of_a_publish_leaves_a_whole_set(
    tmp_path: Path, figures: dict[str, Any]
) -> None:
    """A process publishing back to back is terminated at random instants, 15 times:
    each time DIR holds the old or the new complete set (never a mix, never nothing),
    adoption reads it, and the next process cleans what the killed one left."""
    out = tmp_path / "out"
    first = FileSink(out, clock=SystemClock())
    first.prepare()
    first.publish(_token(0))
    rng = random.Random(10)
    seen = 0
    leftovers: list[int] = []
    for kill in range(15):
        proc = _python(_PUBLISHER, str(out), str((kill + 1) * 1_000_000))
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "publishing"
        time.sleep(rng.uniform(0.0, 0.05))
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=10)
        value = _reader_view(out)
        number = int(value.split("-")[1])
        assert number >= seen  # the old set or a newer one
        seen = number
        adopted = FileSink(out, clock=SystemClock()).read_current()
        assert adopted is not None and adopted.value == value
        leftovers.append(sum(1 for n in os.listdir(out) if n.startswith("..20")) - 1)
    figures.update({"kills": 15, "snapshots_left_by_a_kill_max": max(leftovers)})
    FileSink(out, clock=SystemClock()).prepare()
    assert sum(1 for n in os.listdir(out) if n.startswith("..")) == 2  # ..data + its snapshot


# ------------------------------------------------------------- items 8 and 13: the real CLI


def _once(harness: Harness, out: Path) -> subprocess.CompletedProcess[str]:
    return harness.run(*harness.args("once", harness.aem, "--token-dir", str(out)))


def test_once_publishes_despite_a_leftover_it_cannot_remove(harness: Harness) -> None:
    """A `..*` directory holding a directory: `once` logs it once, publishes, exits 0 (it
    used to stop with "internal error", exit 1); the next `once` adopts as before."""
    emulator = harness.start_emulator()
    out = harness.root / "out"
    (out / STALE / "sub").mkdir(parents=True)
    result = _once(harness, out)
    assert result.returncode == 0, result.stdout + result.stderr
    token = read_token(out)
    harness.extra_secrets.append(token)
    warnings = [line for line in result.stdout.splitlines() if "cannot remove the leftover" in line]
    assert len(warnings) == 1 and STALE in warnings[0]
    assert _once(harness, out).returncode == 0
    assert read_token(out) == token
    assert emulator.stats()["issued"] == 1
    assert (out / STALE / "sub").is_dir()


def _published_document(harness: Harness, out: Path) -> dict[str, Any]:
    """The token.json of a real `once` (its client id and endpoint match the credentials)."""
    assert _once(harness, out).returncode == 0
    harness.extra_secrets.append(read_token(out))
    return dict(json.loads((out / "token.json").read_text()))


def _forge(document: dict[str, Any], value: str, expires_at: str) -> dict[str, Any]:
    now = datetime.now(UTC)
    return {
        **document,
        "access_token": value,
        "issued_at": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "expires_at": expires_at,
    }


def _wipe(out: Path) -> None:
    for entry in os.listdir(out):
        path = out / entry
        if path.is_dir() and not path.is_symlink():
            for child in path.iterdir():
                child.unlink()
            path.rmdir()
        else:
            path.unlink()


def test_a_forged_year_9999_token_json_alone_is_not_adopted(harness: Harness) -> None:
    """A lone `token.json` matching our client, expiring in 9999: `once` mints afresh
    (0.1.0 adopted it and scheduled the next refresh for the year 7673)."""
    emulator = harness.start_emulator()
    out = harness.root / "out"
    document = _published_document(harness, out)
    _wipe(out)
    forged = _forge(document, "forged-token-value", "9999-12-31T23:59:59Z")
    (out / "token.json").write_text(json.dumps(forged))
    assert _once(harness, out).returncode == 0
    assert emulator.stats()["issued"] == 2
    assert read_token(out) != "forged-token-value"
    assert json.loads((out / "token.json").read_text())["expires_at"] < "9999"
    harness.extra_secrets.append(read_token(out))


def test_data_pointing_outside_dir_is_not_adopted(harness: Harness) -> None:
    """`..data` naming a complete, plausible forged set outside DIR: `once` mints afresh,
    and nothing outside DIR is touched."""
    emulator = harness.start_emulator()
    out = harness.root / "out"
    document = _published_document(harness, out)
    _wipe(out)
    elsewhere = harness.root / "elsewhere" / "..forged"
    elsewhere.mkdir(parents=True)
    expires = (datetime.now(UTC) + timedelta(hours=23)).strftime("%Y-%m-%dT%H:%M:%SZ")
    forged = _forge(document, "forged-token-value", expires)
    (elsewhere / "token.json").write_text(json.dumps(forged))
    (elsewhere / "access_token").write_text("forged-token-value")
    (elsewhere / "expires_at").write_text(expires)
    (out / "..data").symlink_to(elsewhere)
    for name in PUBLISHED:
        (out / name).symlink_to(f"..data/{name}")
    assert _once(harness, out).returncode == 0
    assert emulator.stats()["issued"] == 2
    assert read_token(out) != "forged-token-value"
    assert sorted(os.listdir(elsewhere)) == sorted(PUBLISHED)
    harness.extra_secrets.append(read_token(out))


# ------------------------------------------------------------- item 7: a chatty hook


def test_a_hook_writing_200_mb_to_stderr_does_not_grow_our_memory(
    tmp_path: Path, figures: dict[str, Any]
) -> None:
    """A failing hook that writes 200 MB to stderr: we keep a few KiB of it (traced peak
    well under 1 MiB; 0.1.0 buffered all of it), and log its last line."""
    script = tmp_path / "chatty.py"
    script.write_text(
        "import sys\nblock = b'chatter ' * 131072\n"
        "for _ in range(200):\n    sys.stderr.buffer.write(block)\n"
        "sys.stderr.buffer.write(b'\\nfinal complaint\\n')\nsys.exit(1)\n"
    )
    metrics = Metrics(CollectorRegistry())
    seen: list[str] = []
    notifier = Notifier(
        (sys.executable, str(script)),
        timeout_s=30,
        base_env={},
        metrics=metrics,
        scrub=lambda text: seen.append(text) or text,
    )
    rss_before = _vm_rss_kib()
    tracemalloc.start()
    started = time.monotonic()
    try:
        notifier.notify(str(tmp_path), "2026-11-27T12:00:00Z")
        notifier.join(60)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    took = time.monotonic() - started
    rss_after = _vm_rss_kib()
    figures.update(
        {
            "hook_stderr_mb": 200,
            "traced_peak_kib": round(peak / 1024),
            "vm_rss_growth_kib": rss_after - rss_before,
            "seconds": round(took, 2),
        }
    )
    assert metrics.registry.get_sample_value("refresher_on_refresh_total", {"result": "error"}) == 1
    assert seen == ["final complaint"]
    assert peak < 1024 * 1024
    assert TAIL_BYTES <= 64 * 1024


def _vm_rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")
