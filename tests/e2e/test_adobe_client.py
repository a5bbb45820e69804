"""Adobe's own `@adobe/jwt-auth`, unmodified, against the emulator (issue 12's acceptance).

The library is installed from npm once per test session into a temporary
directory (as bench/run.py installs it for the benchmarks; npm's own cache
makes a repeat quick). It signs its JWT with its own `jsonwebtoken`, posts a
multipart form with its own `node-fetch` to `{ims}/ims/exchange/jwt/`, and
reads the answer: the emulator must take all of that as IMS does, over HTTP and
over HTTPS (the emulator's CA given to Node by NODE_EXTRA_CA_CERTS). Then with
the emulator's clock 10 minutes ahead — the client's clock 10 minutes behind —
the same library is refused as IMS refuses it: its JWT (exp = now + 300 s) is
"JWT token is expired".

Skipped only when `npm` or `node` is absent. A failed install (no registry)
fails the test: CI reaches the npm registry.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jwt
import pytest

from ims_emulator import AEM_CREDENTIALS_FILE, Emulator

PACKAGE = "@adobe/jwt-auth@2"  # the major version bench/run.py measures

# Prints the library's outcome as one JSON line; the token itself goes to a 0600 file,
# never to the output (the suite scans output for secrets).
RUNNER = r"""
'use strict';
const fs = require('fs');
const authorize = require('@adobe/jwt-auth');
const [credentials, ims, out] = process.argv.slice(2);
const integration = JSON.parse(fs.readFileSync(credentials, 'utf8')).integration;
authorize({
  clientId: integration.technicalAccount.clientId,
  clientSecret: integration.technicalAccount.clientSecret,
  technicalAccountId: integration.id,
  orgId: integration.org,
  privateKey: integration.privateKey,
  metaScopes: integration.metascopes,
  ims,
}).then((answer) => {
  fs.writeFileSync(out, answer.access_token, { mode: 0o600 });
  console.log(JSON.stringify({ ok: true, expires_in: answer.expires_in }));
}).catch((error) => {
  console.log(JSON.stringify({ ok: false, code: error.code, message: error.message }));
  process.exitCode = 1;
});
"""


@pytest.fixture(scope="session")
def jwt_auth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with @adobe/jwt-auth installed and the runner script beside it."""
    npm, node = shutil.which("npm"), shutil.which("node")
    if npm is None or node is None:
        pytest.skip("npm/node not installed: cannot run Adobe's @adobe/jwt-auth")
    directory = tmp_path_factory.mktemp("adobe-jwt-auth")
    result = subprocess.run(
        [npm, "install", "--prefix", str(directory), "--no-audit", "--no-fund", PACKAGE],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, f"npm install {PACKAGE} failed: {result.stderr[-500:]}"
    (directory / "runner.js").write_text(RUNNER, encoding="utf-8")
    return directory


def run_jwt_auth(
    jwt_auth: Path, emulator: Emulator, out: Path, extra_env: dict[str, str] | None = None
) -> tuple[int, dict[str, Any]]:
    """Run the library once against `emulator`; (exit code, the runner's JSON line)."""
    assert emulator.credentials_dir is not None
    credentials = emulator.credentials_dir / AEM_CREDENTIALS_FILE
    env = {**os.environ, **(extra_env or {})}
    result = subprocess.run(
        ["node", str(jwt_auth / "runner.js"), str(credentials), emulator.base_url, str(out)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    lines = result.stdout.strip().splitlines()
    assert lines, f"no outcome from node: {result.stderr[-500:]}"
    outcome: dict[str, Any] = json.loads(lines[-1])
    return result.returncode, outcome


@pytest.mark.slow
@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
def test_adobe_jwt_auth_runs_unmodified_against_the_emulator(
    jwt_auth: Path, tmp_path: Path, tls: bool
) -> None:
    """@adobe/jwt-auth gets a token (expires_in in ms) that the emulator issued, over HTTP and
    over HTTPS trusted through the emulator's CA."""
    out = tmp_path / "token"
    with Emulator.start(tmp_path / "creds", tls=tls) as emulator:
        env = {"NODE_EXTRA_CA_CERTS": str(emulator.ca_path)} if emulator.ca_path else {}
        code, outcome = run_jwt_auth(jwt_auth, emulator, out, env)
        assert (code, outcome) == (0, {"ok": True, "expires_in": 86_400_000})
        claims = jwt.decode(
            out.read_text(), emulator.token_public_key_pem, algorithms=["RS256"],
            options={"verify_exp": False},
        )  # fmt: skip
        assert claims["scope"] == "ent_aem_cloud_api"
        assert emulator.stats()["issued"] == 1


@pytest.mark.slow
def test_adobe_jwt_auth_with_a_clock_10_minutes_behind_is_rejected_as_expired(
    jwt_auth: Path, tmp_path: Path
) -> None:
    """With the emulator's clock 10 minutes ahead (= the client's 10 minutes behind), the
    library's JWT is refused as IMS refuses it: invalid_token "JWT token is expired"."""
    out = tmp_path / "token"
    with Emulator.start(tmp_path / "creds", clock_offset_s=600) as emulator:
        code, outcome = run_jwt_auth(jwt_auth, emulator, out)
        assert code == 1
        assert outcome == {"ok": False, "code": "invalid_token", "message": "JWT token is expired"}
        assert emulator.stats()["rejected"] == {"invalid_token": 1}
        assert not out.exists()
