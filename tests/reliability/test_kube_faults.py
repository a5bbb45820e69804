"""Kubernetes faults, through the fake apiserver (tests/support/fakeapi.py: the real wire protocol,
resourceVersion preconditions, RBAC denials) and the official client in the real CLI:

- the API down, then 403 on update: the Secret keeps the last good token, the failure is
  logged and counted, and the refresher publishes again once the API answers;
- a conflict storm: five replicas share one Secret while another writer keeps bumping
  it (409 on a good share of the writes): no torn Secret, never missing once created,
  never deleted, no lost update of the other writer's field, no token regression.

Every stored version of the Secret is checked by a poller that reads the fake's state
every few milliseconds, and every write body the fake received is checked too.
"""

from __future__ import annotations

import base64
import json
import random
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.fakeapi import FakeApiServer
from tests.support.harness import Harness, wait_until

from .support import Refresher, TokenBook, client_ids, scan_for_secrets

pytestmark = pytest.mark.slow

NS = "team-a"
NAME = "adobe-ims-token"
TOKEN_TTL_S = 2.0
BACKOFF_MAX_S = 0.5
OTHER = "other-writer/generation"
ERRORS = 'refresher_sink_write_total{result="error",sink="secret"}'


@pytest.fixture
def api() -> Iterator[FakeApiServer]:
    with FakeApiServer((NS,), user=f"system:serviceaccount:{NS}:ims-token-refresher") as fake:
        yield fake


def _check_object(obj: dict[str, Any], book: TokenBook) -> list[str]:
    """Problems a reader of this Secret version would have."""
    problems = []
    try:
        data = {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
        document = json.loads(data["token.json"])
        if document["access_token"] != data["access_token"].decode():
            problems.append("torn: token.json and access_token disagree")
        if document["expires_at"] != data["expires_at"].decode():
            problems.append("torn: token.json and expires_at disagree")
        annotations = obj["metadata"].get("annotations") or {}
        if annotations.get("ims-token-refresher/expires-at") != document["expires_at"]:
            problems.append("torn: the expires-at annotation disagrees")
        if obj["metadata"]["labels"].get("app.kubernetes.io/managed-by") != "ims-token-refresher":
            problems.append("label missing")
        if book.expiry(document["access_token"]) is None:
            problems.append("a token the emulator did not issue")
    except (KeyError, TypeError, ValueError) as exc:
        problems.append(f"unreadable: {type(exc).__name__} {exc}")
    return problems


class SecretWatcher(threading.Thread):
    """Reads the stored Secret every 2 ms; checks each new resourceVersion."""

    def __init__(self, api: FakeApiServer, book: TokenBook) -> None:
        super().__init__(name="secret-watcher", daemon=True)
        self.api = api
        self.book = book
        self.stop_event = threading.Event()
        self.versions = 0
        self.problems: list[str] = []
        self.created = False
        self.missing_after_create = 0
        self.tokens: list[tuple[float, str]] = []  # (first seen, token) in order
        self.regressions = 0
        self.regressed_by_s: list[float] = []
        self.lost_updates = 0
        self._last_rv: str | None = None
        self._last_expiry = 0.0
        self._generation = -1

    def run(self) -> None:
        while not self.stop_event.wait(0.002):
            self.observe()

    def observe(self) -> None:
        obj = self.api.secret(NS, NAME)
        if obj is None:
            self.missing_after_create += self.created
            return
        self.created = True
        rv = obj["metadata"]["resourceVersion"]
        if rv == self._last_rv:
            return
        self._last_rv = rv
        self.versions += 1
        self.problems.extend(_check_object(obj, self.book))
        generation = int((obj["metadata"].get("annotations") or {}).get(OTHER, -1))
        if generation < self._generation:
            self.lost_updates += 1  # a write based on a stale read overwrote the other writer
        self._generation = max(self._generation, generation)
        token = base64.b64decode(obj["data"]["access_token"]).decode()
        if not self.tokens or self.tokens[-1][1] != token:
            self.tokens.append((time.time(), token))
            expiry = self.book.expiry(token) or 0.0
            if expiry < self._last_expiry:
                self.regressions += 1
                self.regressed_by_s.append(round(self._last_expiry - expiry, 3))
            self._last_expiry = max(self._last_expiry, expiry)

    def current(self) -> str | None:
        return self.tokens[-1][1] if self.tokens else None


def _start(harness: Harness, api: FakeApiServer) -> Refresher:
    kubeconfig = api.write_kubeconfig(harness.root / "kubeconfig", NS)
    return Refresher(
        harness,
        *harness.args(
            "run",
            harness.aem,
            "--secret",
            NAME,
            "--secret-namespace",
            NS,
            "--listen",
            "127.0.0.1:0",
            "--log-level",
            "debug",
            "--backoff-initial",
            "0.1",
            "--backoff-max",
            str(BACKOFF_MAX_S),
        ),
        env={"KUBECONFIG": str(kubeconfig)},
    )


def _stored_token(api: FakeApiServer) -> str | None:
    """The access token in the stored Secret now (read under the fake's lock)."""
    obj = api.secret(NS, NAME)
    return None if obj is None else base64.b64decode(obj["data"]["access_token"]).decode()


def _write_bodies_ok(api: FakeApiServer, book: TokenBook) -> int:
    """Every PUT/POST body the fake received is itself a consistent Secret."""
    bad = 0
    for method, _path, body in list(api.bodies):
        if method in ("PUT", "POST") and isinstance(body, dict):
            bad += bool(_check_object(body, book))
    return bad


def test_secret_survives_api_outage_and_forbidden(
    harness: Harness, api: FakeApiServer, figures: dict[str, Any]
) -> None:
    """API down past a token's expiry, then 403 on update: the Secret keeps the last good
    token, errors are logged and counted, and publishing resumes once the API answers."""
    emulator = harness.start_emulator(token_ttl_s=TOKEN_TTL_S)
    book = TokenBook(emulator, client_ids(harness))
    watcher = SecretWatcher(api, book)
    watcher.start()
    refresher = _start(harness, api)
    try:
        wait_until(lambda: watcher.current() is not None, timeout=20)
        before_down = watcher.current()
        expiry = book.expiry(before_down or "")
        assert expiry is not None
        api.down()
        time.sleep(max(0.0, expiry + 0.5 - time.time()))
        ready_while_down, _ = refresher.get("/readyz")
        live_while_down, _ = refresher.get("/healthz")
        errors_down = refresher.metrics().get(ERRORS, 0)
        up_at = time.time()
        api.up()
        wait_until(lambda: watcher.current() != before_down, timeout=10)
        recovered_down = time.time() - up_at

        api.forbid("update")
        # The token kept is the one stored once updates are denied, not the watcher's last
        # sight: a publish may follow the recovery's at once (its token was due meanwhile)
        # and land just before the forbid, before the watcher's next look.
        before_403 = _stored_token(api)
        expiry = book.expiry(before_403 or "")
        assert expiry is not None
        time.sleep(max(0.0, expiry + 0.3 - time.time()))
        kept_403 = watcher.current() == before_403
        errors_403 = refresher.metrics().get(ERRORS, 0) - errors_down
        allowed_at = time.time()
        api.allow_all()
        wait_until(lambda: watcher.current() != before_403, timeout=10)
        recovered_403 = time.time() - allowed_at
        wait_until(lambda: refresher.get("/readyz")[0] == 200, timeout=5)
    finally:
        watcher.stop_event.set()
        watcher.join()
    code = refresher.stop()
    rbac_lines = [r for r in refresher.find("publishing failed") if "RBAC forbids" in r["message"]]
    unreachable = [r for r in refresher.find("publishing failed") if "unreachable" in r["message"]]
    secrets = scan_for_secrets(
        [refresher.output, *refresher.fetched], harness.credentials, book.values()
    )
    figures.update(
        {
            "secret_versions_checked": watcher.versions,
            "torn_or_bad_versions": len(watcher.problems),
            "missing_after_create": watcher.missing_after_create,
            "deletes": api.requests["DELETE"],
            "api_down_sink_errors": errors_down,
            "api_down_unreachable_log_lines": len(unreachable),
            "readyz_while_down_after_expiry": ready_while_down,
            "healthz_while_down": live_while_down,
            "recovered_after_api_up_s": round(recovered_down, 3),
            "forbidden_sink_errors": errors_403,
            "forbidden_rbac_log_lines": len(rbac_lines),
            "last_good_token_kept_while_forbidden": kept_403,
            "recovered_after_allow_s": round(recovered_403, 3),
            "bad_write_bodies": _write_bodies_ok(api, book),
            "secret_scan": secrets,
        }
    )
    assert code == 0
    assert watcher.problems == [] and watcher.missing_after_create == 0
    assert api.requests["DELETE"] == 0
    assert errors_down >= 1 and unreachable
    assert ready_while_down == 503 and live_while_down == 200
    assert kept_403 and errors_403 >= 1 and rbac_lines
    assert recovered_down <= BACKOFF_MAX_S + 2 and recovered_403 <= BACKOFF_MAX_S + 2
    assert figures["bad_write_bodies"] == 0
    assert all(v == 0 for k, v in secrets.items() if k != "bytes_scanned")


def _storm(
    harness: Harness, api: FakeApiServer, duration_s: float, figures: dict[str, Any]
) -> None:
    emulator = harness.start_emulator(token_ttl_s=TOKEN_TTL_S)
    book = TokenBook(emulator, client_ids(harness))
    watcher = SecretWatcher(api, book)
    watcher.start()
    stop = threading.Event()
    bumps = 0

    def mutate(obj: dict[str, Any]) -> None:
        # Runs under the API server's lock, so generations are numbered in write order
        # whether the bump comes from this thread or from a hook inside a replica's PUT.
        nonlocal bumps
        obj["metadata"].setdefault("annotations", {})[OTHER] = str(bumps)
        bumps += 1

    def other_writer() -> None:
        rng = random.Random()
        while not stop.wait(rng.uniform(0.001, 0.01)):
            if api.secret(NS, NAME) is None:
                continue
            api.bump(NS, NAME, mutate)
            # Random bumps race the replicas' GET..PUT windows, which on a fast machine
            # may all be missed (CI once saw 0 conflicts in 10 s). So also, now and then,
            # land a bump exactly between a replica's GET and its next PUT: a certain 409.
            if rng.random() < 0.05 and not api.pending_hooks("PUT"):
                api.bump_before_next_write(NS, NAME, mutate)

    bumper = threading.Thread(target=other_writer, name="other-writer", daemon=True)
    bumper.start()
    replicas = [_start(harness, api) for i in range(5)]
    try:
        wait_until(lambda: watcher.current() is not None, timeout=30)
        time.sleep(duration_s)
        ready = [r.get("/readyz")[0] for r in replicas]
    finally:
        stop.set()
        bumper.join()
    codes = [r.stop() for r in replicas]
    time.sleep(0.05)
    watcher.stop_event.set()
    watcher.join()
    watcher.observe()
    outputs = [r.output for r in replicas]
    conflicts = sum(o.count("the Secret changed while we wrote it") for o in outputs)
    gave_up = sum(o.count("conflicting writes") for o in outputs)
    adopted = sum(o.count("adopted") for o in outputs)
    cycles = len(watcher.tokens)
    final = api.secret(NS, NAME)
    secrets = scan_for_secrets(
        [*outputs, *[b for r in replicas for b in r.fetched]], harness.credentials, book.values()
    )
    figures.update(
        {
            "replicas": len(replicas),
            "duration_s": duration_s,
            "token_ttl_s": TOKEN_TTL_S,
            "other_writer_bumps": bumps,
            "secret_versions_checked": watcher.versions,
            "torn_or_bad_versions": len(watcher.problems),
            "problem_examples": watcher.problems[:3],
            "missing_after_create": watcher.missing_after_create,
            "deletes": api.requests["DELETE"],
            "requests": dict(api.requests),
            "conflicts_409_seen_by_replicas": conflicts,
            "writes_given_up_after_5_conflicts": gave_up,
            "lost_updates_of_other_writer": watcher.lost_updates,
            "token_regressions": watcher.regressions,
            "token_regressed_by_s": sorted(watcher.regressed_by_s)[-10:],
            "tokens_in_secret": cycles,
            "tokens_minted": emulator.stats()["issued"],
            "adoption_log_lines": adopted,
            "ready_replicas": ready.count(200),
            "bad_write_bodies": _write_bodies_ok(api, book),
            "secret_scan": secrets,
        }
    )
    summary = {k: v for k, v in figures.items() if k != "secret_scan"}
    assert codes == [0] * 5, summary
    assert watcher.problems == [] and figures["bad_write_bodies"] == 0, summary
    assert watcher.missing_after_create == 0 and api.requests["DELETE"] == 0, summary
    assert watcher.lost_updates == 0, summary
    # Two replicas due at once both mint; the later write may carry the earlier-minted
    # token (a sub-second regression). Beyond the published precision (1 s) none may occur.
    assert all(by <= 1.0 for by in watcher.regressed_by_s), summary
    assert conflicts > 0, summary
    assert final is not None and not _check_object(final, book), summary
    assert ready == [200] * 5, summary
    # Replicas adopt instead of minting: far fewer than five tokens per refresh cycle.
    assert emulator.stats()["issued"] <= 2 * cycles + 5, summary
    assert all(v == 0 for k, v in secrets.items() if k != "bytes_scanned")


def test_conflict_storm_five_replicas_short(
    harness: Harness, api: FakeApiServer, figures: dict[str, Any]
) -> None:
    """Five replicas and a bumping writer on one Secret for 10 s: 409s galore, no torn,
    lost or deleted Secret, no regression beyond 1 s, and replicas adopt, not mint, mostly."""
    _storm(harness, api, 10.0, figures)


@pytest.mark.soak
def test_conflict_storm_five_replicas_long(
    harness: Harness, api: FakeApiServer, figures: dict[str, Any], soak_seconds: float
) -> None:
    """The same storm for a fifth of --soak-minutes (at least a minute)."""
    _storm(harness, api, max(60.0, soak_seconds / 5), figures)
