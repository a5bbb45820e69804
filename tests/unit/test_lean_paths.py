"""What keeps `once` and a refresh cycle cheap (issue 15; docs/benchmarks.md explains each
saving), pinned so that a change undoing one fails here and not only in `make bench`:

- `once`, and `run` without --listen, never import prometheus_client, the probe server,
  the --on-refresh runner or PyJWT (checked in the real CLI, run as a subprocess);
- the JWT signed without PyJWT is byte for byte PyJWT's, and the token's claims are read
  as PyJWT's unverified decode reads them;
- a refresh cycle reads and parses the credentials again only after they changed;
- the exchange watchdog still fires for an exchange armed while it waits for an earlier
  deadline (it is no longer woken on every exchange).
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

import refresher.service
from refresher.assertion import sign
from refresher.credentials import Credentials
from refresher.ims import unverified_claims
from refresher.token import AccessToken
from refresher.transport import _Watch, _Watchdog
from tests.support.fakes import FakeClock
from tests.support.harness import Harness, read_token, wait_until
from tests.support.scripted import ScriptedIms, make_service, stop_after

# Imported by the full pipeline only where it serves metrics or runs a hook.
HEAVY = (
    "prometheus_client",
    "refresher.metrics",
    "refresher.server",
    "refresher.httpserver",
    "refresher.notify",
    "http.server",
    "jwt",
)

# Runs the real CLI in this interpreter, then says which of HEAVY it loaded (on stderr).
PROBE = f"""
import json, os, sys
from refresher.cli import run_cli
code = run_cli(sys.argv[1:], dict(os.environ))
loaded = sorted(name for name in {HEAVY!r} if name in sys.modules)
print("LOADED " + json.dumps(loaded), file=sys.stderr)
sys.exit(code)
"""


def _loaded(stderr: str) -> list[str]:
    line = next(line for line in stderr.splitlines() if line.startswith("LOADED "))
    return list(json.loads(line.removeprefix("LOADED ")))


def test_once_never_imports_what_it_does_not_use(harness: Harness) -> None:
    """`once` publishes its token without loading metrics, the probe server, notify or PyJWT."""
    harness.start_emulator()
    out = harness.root / "out"
    args = harness.args("once", harness.aem, "--token-dir", str(out))
    result = subprocess.run(
        [sys.executable, "-c", PROBE, *args],
        capture_output=True,
        text=True,
        env=harness.env(),
        timeout=60,
        check=False,
    )
    harness.outputs.extend([result.stdout, result.stderr])
    assert result.returncode == 0, result.stderr[-500:]
    assert read_token(out)
    assert _loaded(result.stderr) == []


def test_run_without_listen_never_imports_metrics(harness: Harness) -> None:
    """`run` with no probe server to serve them builds no metrics (and loads none of HEAVY)."""
    harness.start_emulator()
    out = harness.root / "out"
    args = harness.args("run", harness.aem, "--token-dir", str(out))
    proc = subprocess.Popen(
        [sys.executable, "-c", PROBE, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=harness.env(),  # REFRESHER_LISTEN="": no probe server
    )
    harness.procs.append(proc)
    wait_until(lambda: (out / "access_token").exists() or proc.poll() is not None)
    proc.terminate()
    stdout, stderr = proc.communicate(timeout=20)
    harness.outputs.extend([stdout, stderr])
    assert proc.returncode == 0, stderr[-500:]
    assert _loaded(stderr) == []


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def test_signed_assertion_is_pyjwts_to_the_byte(rsa_key: rsa.RSAPrivateKey) -> None:
    """The assertion signed without PyJWT equals `jwt.encode(..., "RS256")` exactly."""
    claims = {
        "iss": "ORG@AdobeOrg",
        "sub": "TECH@techacct.adobe.com",
        "aud": "https://ims-na1.adobelogin.com/c/client-é",
        "exp": 1_800_000_000,
        "https://ims-na1.adobelogin.com/s/ent_aem_cloud_api": True,
    }
    assert sign(claims, rsa_key) == jwt.encode(claims, rsa_key, algorithm="RS256")


def _part(document: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(document).encode()).rstrip(b"=").decode()


@pytest.mark.parametrize(
    "token",
    [
        jwt.encode({"created_at": "1", "expires_in": "2"}, "k" * 32, algorithm="HS256"),
        jwt.encode({"sub": "x"}, "k" * 32, algorithm="HS256") + "==",
        "opaque-token",
        "a.b",
        "a.b.c.d",
        f"{_part({'alg': 'none'})}.{_part([1, 2])}.c2ln",
        f"{_part(['header'])}.{_part({'a': 1})}.c2ln",
        f"{_part({'alg': 'none'})}.{_part({'a': 1})}!.c2ln",
        f"{_part({'alg': 'none'})}.{_part({'a': 1})}.c2l",
        f"{_part({'alg': 'none'})}.e30.",
        "..",
        f"{_part({'alg': 'none'})}.bm90IGpzb24.c2ln",
        f"{_part({'alg': 'none'})}.{_part({'a': 1})}.c2+n",
        f"{_part({'alg': 'none'})}.{_part({'a': 1})}.c2k=",
        f"{_part({'alg': 'none'})}.{_part({'a': 1})}.c2k==",
        f"{_part({'alg': 'none'})}.{_part({'a': 1})}.c2===",
    ],
)
def test_token_claims_are_read_as_pyjwt_reads_them(token: str) -> None:
    """The unverified claims: PyJWT's answer (its error being None), for JWTs and junk."""
    try:
        expected = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        expected = None
    assert unverified_claims(token) == expected


def test_credentials_are_parsed_again_only_after_a_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Refreshes with unchanged credentials read them once; a change is read at once."""
    path = tmp_path / "oauth.json"
    path.write_text('{"client_id": "client-1", "client_secret": "secret-one-1", "scopes": ["a"]}')
    reads: list[Path] = []
    for name in ("load_settled", "load_credentials"):
        real = getattr(refresher.service, name)

        def counting(where: Path, real: Any = real, **kwargs: Any) -> Credentials:
            reads.append(where)  # a spy: the real loader runs
            return real(where, **kwargs)  # type: ignore[no-any-return]

        monkeypatch.setattr(refresher.service, name, counting)
    clock = FakeClock()
    ims = ScriptedIms(clock, 60)
    seen: list[tuple[str, ...]] = []
    exchange = ims.exchange

    def recording(credentials: Credentials, now: Callable[[], datetime]) -> AccessToken:
        seen.append(credentials.client_secrets)
        return exchange(credentials, now)

    monkeypatch.setattr(ims, "exchange", recording)
    rig = make_service(tmp_path, path, clock, ims, watch_interval="1")
    start = clock.monotonic()
    calls_before_change: list[int] = []

    def rotate() -> None:
        if not calls_before_change and clock.monotonic() - start >= 600:
            calls_before_change.append(len(ims.calls))
            reads_before_change.append(len(reads))
            path.write_text(
                '{"client_id": "client-1", "client_secret": "secret-two-22", "scopes": ["a"]}'
            )

    reads_before_change: list[int] = []
    rig.sleeper.on_sleep.append(rotate)
    stop_after(rig.service, clock, rig.sleeper, 900)
    assert rig.service.run() == 0
    assert calls_before_change[0] >= 10
    assert reads_before_change == [1]  # at start; later attempts found the same signature
    assert len(reads) == 2  # the change, read once
    assert seen[calls_before_change[0]] == ("secret-two-22",)  # the next exchange used it
    assert seen[-1] == ("secret-two-22",)


def test_watchdog_fires_an_exchange_armed_during_a_longer_wait() -> None:
    """Armed after an earlier exchange (no notify), a deadline still fires on time; an
    earlier deadline than the thread's wake-up is noticed at once."""
    watchdog = _Watchdog()
    first = _Watch()
    watchdog.arm(first, time.monotonic() + 0.4)
    watchdog.disarm(first)  # the exchange ended; the thread still waits for 0.4 s
    second = _Watch()
    started = time.monotonic()
    watchdog.arm(second, started + 0.6)
    wait_until(lambda: second.reason is not None, timeout=5, interval=0.01)
    assert second.reason == "deadline"
    assert 0.55 <= time.monotonic() - started < 2.0
    assert first.reason is None

    third = _Watch()
    watchdog.arm(third, time.monotonic() + 30)  # the thread now waits 30 s
    watchdog.disarm(third)
    fourth = _Watch()
    started = time.monotonic()
    watchdog.arm(fourth, started + 0.2)  # earlier than that: it must be woken
    wait_until(lambda: fourth.reason is not None, timeout=5, interval=0.01)
    assert time.monotonic() - started < 2.0
    for watch in (first, second, third, fourth):
        watch.close()
