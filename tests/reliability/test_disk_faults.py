"""Disk faults under the token directory: a full filesystem (ENOSPC) and a read-only one
(EROFS), made real with a tiny tmpfs. The failed publish is logged and counted
(`refresher_sink_write_total{sink="file",result="error"}`), the previous snapshot stays
intact and readable, /readyz follows the token readers can actually read, and the
refresher publishes again, without leftovers, as soon as the disk recovers.

Needs root and a working `mount -t tmpfs` (a container may forbid it): otherwise the
tests skip and say why. A read-only directory via chmod proves nothing as root
(CAP_DAC_OVERRIDE ignores the mode bits), hence `mount -o remount,ro`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.harness import Harness, wait_until

from .support import Refresher, TokenBook, client_ids, dir_state, scan_for_secrets

pytestmark = pytest.mark.slow

TOKEN_TTL_S = 2.0
BACKOFF_MAX_S = 0.5
ERROR_SAMPLE = 'refresher_sink_write_total{result="error",sink="file"}'
SUCCESS_SAMPLE = 'refresher_sink_write_total{result="success",sink="file"}'


def _mount(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["mount", *args], capture_output=True, text=True, check=False)


@contextlib.contextmanager
def tiny_tmpfs(path: Path, size: str = "128k") -> Iterator[Path]:
    """A tmpfs of `size` at `path`, unmounted afterwards; skips if that is impossible."""
    if os.geteuid() != 0:
        pytest.skip(f"needs root to mount a tmpfs (running as uid {os.geteuid()})")
    path.mkdir()
    mounted = _mount("-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path))
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def _fill(disk: Path) -> int:
    """Write a filler file until ENOSPC; return its size."""
    filler = disk / "filler"
    written = 0
    with filler.open("wb", buffering=0) as handle:  # unbuffered: the write itself fails
        while True:
            try:
                written += handle.write(b"\0" * 4096)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                return written


def _disk_fault(harness: Harness, fault: str, figures: dict[str, Any]) -> None:
    emulator = harness.start_emulator(token_ttl_s=TOKEN_TTL_S)
    book = TokenBook(emulator, client_ids(harness))
    with tiny_tmpfs(harness.root / "disk") as disk:
        out = disk / "tokens"
        refresher = Refresher(
            harness,
            *harness.args(
                "run",
                harness.aem,
                "--token-dir",
                str(out),
                "--listen",
                "127.0.0.1:0",
                "--log-level",
                "debug",
                "--backoff-initial",
                "0.1",
                "--backoff-max",
                str(BACKOFF_MAX_S),
            ),
        )
        wait_until(lambda: dir_state(out, book)["complete"])
        good = dir_state(out, book)
        good_files = {n: (out / n).read_bytes() for n in ("access_token", "token.json")}
        expiry = book.expiry(good["token"])
        assert expiry is not None
        if fault == "full":
            filler = _fill(disk)
        else:
            filler = 0
            remount = _mount("-o", "remount,ro", str(disk))
            assert remount.returncode == 0, remount.stderr
        broken_at = time.time()
        # Past the next refresh point and past the old token's expiry.
        wait_until(lambda: refresher.metrics().get(ERROR_SAMPLE, 0) >= 1, timeout=10)
        time.sleep(max(0.0, expiry + 0.5 - time.time()))
        errors = refresher.metrics()[ERROR_SAMPLE]
        during = dir_state(out, book)
        kept = {n: (out / n).read_bytes() for n in ("access_token", "token.json")}
        ready_status, _ = refresher.get("/readyz")
        live_status, _ = refresher.get("/healthz")
        successes_before = refresher.metrics()[SUCCESS_SAMPLE]
        if fault == "full":
            (disk / "filler").unlink()
        else:
            remount = _mount("-o", "remount,rw", str(disk))
            assert remount.returncode == 0, remount.stderr
        healed_at = time.time()
        wait_until(lambda: dir_state(out, book)["target"] != good["target"], timeout=10)
        recovered_after = time.time() - healed_at
        wait_until(lambda: refresher.get("/readyz")[0] == 200, timeout=5)
        after = refresher.metrics()
        code = refresher.stop()
        final = dir_state(out, book)
    failures = refresher.find("publishing failed")
    reason = "No space left on device" if fault == "full" else "Read-only file system"
    secrets = scan_for_secrets(
        [refresher.output, *refresher.fetched], harness.credentials, book.values()
    )
    figures.update(
        {
            "fault": fault,
            "filler_bytes": filler,
            "broken_for_s": round(healed_at - broken_at, 2),
            "sink_write_errors_counted": errors,
            "publishing_failed_log_lines": len(failures),
            "log_names_the_cause": all(reason in str(r.get("message")) for r in failures),
            "old_snapshot_intact": during["target"] == good["target"] and kept == good_files,
            "old_snapshot_complete": during["complete"],
            "leftovers_while_broken": during["leftovers"],
            "readyz_after_old_token_expired": ready_status,
            "healthz_while_broken": live_status,
            "recovered_after_s": round(recovered_after, 3),
            "sink_write_success_after_recovery": after[SUCCESS_SAMPLE] - successes_before,
            "final": {"complete": final["complete"], "leftovers": final["leftovers"]},
            "secret_scan": secrets,
        }
    )
    assert code == 0
    assert errors >= 1 and len(failures) >= 1
    assert figures["log_names_the_cause"], failures[:1]
    assert figures["old_snapshot_intact"] and during["complete"]
    assert during["leftovers"] == []
    assert live_status == 200
    # Ready means "a published token is valid": the one readers can read has expired.
    assert ready_status == 503
    assert recovered_after <= BACKOFF_MAX_S + 1.5
    assert figures["sink_write_success_after_recovery"] >= 1
    assert final["complete"] and final["leftovers"] == []
    assert all(v == 0 for k, v in secrets.items() if k != "bytes_scanned")


@pytest.mark.parametrize("fault", ["full", "read_only"])
def test_disk_fault_keeps_the_old_snapshot_and_recovers(
    harness: Harness, figures: dict[str, Any], fault: str
) -> None:
    """ENOSPC / EROFS under the token dir: counted and logged, old snapshot intact, /readyz
    503 once it expired, /healthz 200, a new publish within the backoff cap of recovery."""
    _disk_fault(harness, fault, figures)
