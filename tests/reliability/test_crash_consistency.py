"""Crash consistency: SIGKILL the refresher at random points, many of them in the middle
of a publish (0.4 s tokens: it publishes about three times a second). After every kill
the directory holds one complete snapshot, the previous or the new one (`..data`
resolves, the three files are present, non-empty and agree, the stable names point
through `..data`); a restart removes what the killed publish left behind and publishes
a fresh token (adopting one is only possible while the old one is not yet due).

Kill points, drawn at random per kill:
- `startup`: at a random instant after the process starts (imports, adoption, prepare);
- `random`: at a random instant after its first publish;
- `writing`: as soon as a new snapshot directory appears that `..data` does not name
  yet (files being written and fsynced);
- `swapped`: just after `..data` moved (stable names, directory fsync, cleanup).
"""

from __future__ import annotations

import os
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.support.harness import Harness, wait_until

from .support import Refresher, TokenBook, client_ids, dir_state, percentiles, scan_for_secrets

pytestmark = pytest.mark.slow

TOKEN_TTL_S = 0.4
MODES = ("startup", "random", "writing", "swapped")


def _target(out: Path) -> str | None:
    try:
        return os.readlink(out / "..data")
    except OSError:
        return None


def _kill_when(mode: str, refresher: Refresher, out: Path, rng: random.Random) -> bool:
    """Wait for the kill point of `mode`, then SIGKILL; True if the point was reached."""
    reached = True
    if mode == "startup":
        time.sleep(rng.uniform(0.05, 1.0))
    else:
        before = _target(out)
        deadline = time.monotonic() + 5
        while _target(out) == before and time.monotonic() < deadline:
            time.sleep(0.002)  # this process' first publish
        if mode == "random":
            time.sleep(rng.uniform(0.0, 0.6))
        elif mode == "writing":
            reached = False
            while time.monotonic() < deadline:
                current = _target(out)
                names = os.listdir(out)
                if any(n.startswith("..20") and n != current for n in names):
                    reached = True
                    break
        else:  # swapped
            before = _target(out)
            reached = False
            while time.monotonic() < deadline:
                if _target(out) != before:
                    reached = True
                    time.sleep(rng.uniform(0.0, 0.003))
                    break
    refresher.kill()
    return reached


def _crash_loop(harness: Harness, kills: int, figures: dict[str, Any]) -> None:
    emulator = harness.start_emulator(token_ttl_s=TOKEN_TTL_S)
    out = harness.root / "tokens"
    book = TokenBook(emulator, client_ids(harness))
    args = [
        *harness.args(
            "run",
            harness.aem,
            "--token-dir",
            str(out),
            "--log-level",
            "debug",
            "--backoff-initial",
            "0.05",
            "--backoff-max",
            "0.2",
            "--min-token-lifetime",  # 0.4 s tokens: far under the 1 s default
            "0.1",
        ),
    ]
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    modes: Counter[str] = Counter()
    reached: Counter[str] = Counter()
    left_behind: Counter[str] = Counter()
    leftover_kinds: Counter[str] = Counter()
    states: Counter[str] = Counter()
    problems: list[str] = []
    start_outcomes: Counter[str] = Counter()
    to_fresh: list[float] = []
    ever_published = False
    previous_leftovers: list[str] = []
    outputs: list[str] = []
    for _ in range(kills):
        started = time.monotonic()
        refresher = Refresher(harness, *args)
        before = _target(out)
        if before is not None:
            # The restart publishes a valid token: adopted or freshly minted.
            def fresh(before: str | None = before) -> bool:
                state = dir_state(out, book)
                expiry = book.expiry(state.get("token", ""))
                return state["target"] != before and expiry is not None and expiry > time.time()

            wait_until(fresh, timeout=10, interval=0.002)
            to_fresh.append(time.monotonic() - started)
            gone = set(previous_leftovers) & set(os.listdir(out))
            if gone:
                problems.append(f"leftovers not cleaned after a restart: {sorted(gone)}")
        mode = rng.choice(MODES)
        modes[mode] += 1
        reached[mode] += _kill_when(mode, refresher, out, rng)
        outputs.append(refresher.output)
        if refresher.find("found a published token"):
            start_outcomes["found_published_token"] += 1
        if refresher.find("obtained a new access token"):
            start_outcomes["minted"] += 1
        state = dir_state(out, book)
        if state["target"] is None:
            states["no_snapshot_yet"] += 1
            if ever_published:
                problems.append("..data vanished after a kill")
        else:
            ever_published = True
            states["complete" if state["complete"] else "incomplete"] += 1
            if state.get("links", 0) < 3:
                states["first_publish_links_pending"] += 1
        problems.extend(state["problems"])
        previous_leftovers = state["leftovers"]
        if previous_leftovers:
            left_behind[mode] += 1
            for name in previous_leftovers:
                kind = "snapshot_dir" if (out / name).is_dir() else "temp_link"
                leftover_kinds[kind] += 1
    # A last, clean run: after its publish and a SIGTERM, nothing but one snapshot remains.
    refresher = Refresher(harness, *args)
    before = _target(out)
    wait_until(lambda: _target(out) != before, timeout=10)
    code = refresher.stop()
    final = dir_state(out, book)
    secrets = scan_for_secrets([*outputs, refresher.output], harness.credentials, book.values())
    figures.update(
        {
            "token_ttl_s": TOKEN_TTL_S,
            "seed": seed,
            "kills": kills,
            "kills_by_mode": dict(sorted(modes.items())),
            "kill_point_reached": dict(sorted(reached.items())),
            "kills_that_left_an_interrupted_publish": dict(sorted(left_behind.items())),
            "leftover_entries_by_kind": dict(leftover_kinds),
            "states_after_kill": dict(sorted(states.items())),
            "problems": len(problems),
            "problem_examples": problems[:5],
            "restarts_found_published_token": start_outcomes["found_published_token"],
            "restarts_minted": start_outcomes["minted"],
            "restart_to_fresh_token_s": percentiles(to_fresh),
            "final_state": {
                "complete": final["complete"],
                "leftovers": final["leftovers"],
                "exit_code": code,
            },
            "secret_scan": secrets,
        }
    )
    assert problems == []
    assert states["incomplete"] == 0
    assert code == 0
    assert final["complete"] and final["leftovers"] == []
    assert all(v == 0 for k, v in secrets.items() if k != "bytes_scanned")


def test_kill_9_while_publishing_short(harness: Harness, figures: dict[str, Any]) -> None:
    """~16 SIGKILLs at random and mid-publish points: always one complete snapshot, leftovers
    removed by the restart, which publishes a fresh token."""
    _crash_loop(harness, 16, figures)


@pytest.mark.soak
def test_kill_9_while_publishing_long(
    harness: Harness, figures: dict[str, Any], soak_seconds: float
) -> None:
    """>= 200 SIGKILLs (more with longer soaks): the same, and interrupted publishes occur."""
    _crash_loop(harness, max(200, int(soak_seconds / 3)), figures)
    assert sum(figures["kills_that_left_an_interrupted_publish"].values()) > 0
