"""The real CLI as a subprocess against the real emulator on loopback: every flow and
shape, refresh cycles, faults, rejection, rotation, and torn-read freedom."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.support.harness import Harness, read_token, wait_until

pytestmark = pytest.mark.slow


def _integration(h: Harness) -> dict[str, object]:
    return json.loads(h.aem.read_text())["integration"]


def _kubelet_dir(root: Path, files: dict[str, str], generation: int) -> None:
    """Write `files` the way kubelet projects a Secret: ..data -> timestamped dir, key symlinks."""
    root.mkdir(parents=True, exist_ok=True)
    snapshot = root / f"..2026_11_26_00_00_{generation:02d}.{generation}"
    snapshot.mkdir()
    for name, content in files.items():
        (snapshot / name).write_text(content)
    tmp = root / "..data_tmp"
    tmp.symlink_to(snapshot.name)
    tmp.replace(root / "..data")
    for name in files:
        link = root / name
        if not link.is_symlink():
            link.symlink_to(f"..data/{name}")


def _shapes(h: Harness) -> dict[str, Path]:
    """Every credentials shape of the SPEC, derived from the emulator's generated files."""
    integ = _integration(h)
    oauth = json.loads(h.oauth.read_text())
    tech = integ["technicalAccount"]
    assert isinstance(tech, dict)
    out: dict[str, Path] = {"aem_json": h.aem, "oauth_json": h.oauth}
    bare = h.root / "bare-integration.json"
    bare.write_text(json.dumps(integ))
    out["bare_integration"] = bare
    project = h.root / "project.json"
    project.write_text(
        json.dumps(
            {
                "project": {
                    "org": {"ims_org_id": oauth["org_id"]},
                    "workspace": {
                        "details": {
                            "credentials": [
                                {
                                    "oauth_server_to_server": {
                                        "client_id": oauth["client_id"],
                                        "client_secrets": oauth["client_secrets"],
                                        "technical_account_id": oauth["technical_account_id"],
                                        "scopes": oauth["scopes"],
                                    }
                                }
                            ]
                        }
                    },
                }
            }
        )
    )
    out["console_project"] = project
    jwt_dir = h.root / "jwt-fields"
    _kubelet_dir(
        jwt_dir,
        {
            "client_id": str(tech["clientId"]),
            "client_secret": str(tech["clientSecret"]) + "\n",
            "private_key": str(integ["privateKey"]).replace("\r\n", "\\n"),
            "org_id": str(integ["org"]),
            "technical_account_id": str(integ["id"]),
            "metascopes": str(integ["metascopes"]),
        },
        1,
    )
    out["jwt_field_dir"] = jwt_dir
    oauth_dir = h.root / "oauth-fields"
    _kubelet_dir(
        oauth_dir,
        {
            "client_id": oauth["client_id"],
            "client_secret": oauth["client_secrets"][0],
            "scopes": ",".join(oauth["scopes"]),
        },
        1,
    )
    out["oauth_field_dir"] = oauth_dir
    one_json = h.root / "one-json"
    _kubelet_dir(one_json, {"credentials.json": h.aem.read_text()}, 1)
    out["dir_with_one_json"] = one_json
    return out


SHAPES = [
    ("aem_json", "jwt"),
    ("bare_integration", "jwt"),
    ("oauth_json", "oauth"),
    ("console_project", "oauth"),
    ("jwt_field_dir", "jwt"),
    ("oauth_field_dir", "oauth"),
    ("dir_with_one_json", "jwt"),
]


def test_once_for_every_shape_and_flow(harness: Harness) -> None:
    """`once` publishes a token for every credentials shape, through the right IMS flow."""
    emulator = harness.start_emulator()
    shapes = _shapes(harness)
    for name, flow in SHAPES:
        out = harness.root / f"out-{name}"
        before = emulator.stats()["requests"]
        result = harness.run(
            *harness.args("once", shapes[name], "--token-dir", str(out)),
        )
        assert result.returncode == 0, (name, result.stderr)
        document = json.loads((out / "token.json").read_text())
        assert document["flow"] == flow, name
        assert document["access_token"] == read_token(out)
        assert (out / "expires_at").read_text() == document["expires_at"]
        assert emulator.stats()["requests"][flow] == before[flow] + 1, name
        harness.extra_secrets.append(read_token(out))


def test_flow_override_uses_oauth_despite_a_key(harness: Harness) -> None:
    """--flow oauth on OAuth credentials works; --flow jwt without a key is a clean exit 2."""
    harness.start_emulator()
    out = harness.root / "out"
    ok = harness.run(
        *harness.args("once", harness.oauth, "--flow", "oauth", "--token-dir", str(out)),
    )
    assert ok.returncode == 0, ok.stderr
    bad = harness.run(
        *harness.args("once", harness.oauth, "--flow", "jwt", "--token-dir", str(out)),
    )
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


def test_run_refreshes_short_lived_tokens(harness: Harness) -> None:
    """`run` with 3 s tokens refreshes several times, each token replacing the last."""
    emulator = harness.start_emulator(token_ttl_s=3)
    out = harness.root / "out"
    proc = harness.start(
        "run", "--credentials", str(harness.aem), "--token-dir", str(out), *harness.endpoint_args()
    )
    seen: set[str] = set()
    deadline = time.monotonic() + 12
    while time.monotonic() < deadline and len(seen) < 4:
        if (out / "access_token").exists():
            seen.add(read_token(out))
        time.sleep(0.1)
    code, _ = harness.stop(proc)
    harness.extra_secrets.extend(seen)
    assert code == 0
    assert len(seen) >= 4
    assert emulator.stats()["issued"] >= 4


def test_5xx_then_success(harness: Harness) -> None:
    """503 and 500 are retried with backoff until IMS answers; `once` then succeeds."""
    emulator = harness.start_emulator()
    emulator.set_faults(queue=["503", "500"])
    out = harness.root / "out"
    result = harness.run(
        *harness.args("once", harness.aem, "--token-dir", str(out), "--backoff-initial", "0.2"),
    )
    assert result.returncode == 0, result.stderr
    assert emulator.stats()["faults"] == {"503": 1, "500": 1}
    assert emulator.stats()["issued"] == 1


def test_429_retry_after_is_respected(harness: Harness) -> None:
    """After a 429 with Retry-After: 2 the next request waits at least 2 s."""
    emulator = harness.start_emulator()
    emulator.set_faults(queue=["429"], retry_after=2)
    out = harness.root / "out"
    started = time.monotonic()
    result = harness.run(
        *harness.args("once", harness.oauth, "--token-dir", str(out), "--backoff-initial", "0.05"),
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert emulator.stats()["faults"] == {"429": 1}
    assert elapsed >= 2.0


def test_invalid_client_exits_3_quickly_and_names_the_ims_error(harness: Harness) -> None:
    """A rejected client secret makes `once` exit 3 at once, logging error and x-debug-id."""
    emulator = harness.start_emulator()
    integ = _integration(harness)
    tech = integ["technicalAccount"]
    assert isinstance(tech, dict)
    emulator.register_client(str(tech["clientId"]), ["another-secret-entirely"])
    started = time.monotonic()
    result = harness.run(
        *harness.args("once", harness.aem, "--token-dir", str(harness.root / "out")),
    )
    assert result.returncode == 3
    assert time.monotonic() - started < 10
    assert emulator.stats()["requests"]["jwt"] == 1
    assert "invalid_client" in result.stdout
    assert "x_debug_id" in result.stdout
    assert "invalid_client" in result.stderr


def test_run_does_not_hammer_on_rejection(harness: Harness) -> None:
    """`run` facing invalid_client sends one request, then waits (not a retry storm)."""
    emulator = harness.start_emulator()
    oauth = json.loads(harness.oauth.read_text())
    emulator.register_client(oauth["client_id"], ["revoked-everything"])
    proc = harness.start(
        *harness.args(
            "run",
            harness.oauth,
            "--token-dir",
            str(harness.root / "out"),
            "--backoff-initial",
            "0.05",
        ),
    )
    # Both secrets tried (however long start-up takes), then 3 s in which a retry storm
    # (backoff 0.05 s) would show.
    wait_until(lambda: emulator.stats()["requests"]["oauth"] >= 2, timeout=20)
    time.sleep(3)
    code, out = harness.stop(proc)
    assert code == 0
    # Two client secrets: each tried once, then the slow permanent-retry pause.
    assert emulator.stats()["requests"]["oauth"] == 2
    assert "invalid_client" in out


def test_second_secret_is_tried_on_invalid_client(harness: Harness) -> None:
    """With two client secrets, the first revoked, the second one gets the token."""
    emulator = harness.start_emulator()
    oauth = json.loads(harness.oauth.read_text())
    emulator.register_client(oauth["client_id"], [oauth["client_secrets"][1]])
    result = harness.run(
        *harness.args("once", harness.oauth, "--token-dir", str(harness.root / "out")),
    )
    assert result.returncode == 0, result.stderr
    assert emulator.stats()["requests"]["oauth"] == 2


def test_kubelet_rotation_is_picked_up_within_seconds(harness: Harness) -> None:
    """Swapping the mounted Secret's ..data to a new client secret refreshes at once."""
    emulator = harness.start_emulator()
    oauth = json.loads(harness.oauth.read_text())
    creds = harness.root / "mounted"
    first, second = oauth["client_secrets"]
    fields = {"client_id": oauth["client_id"], "scopes": ",".join(oauth["scopes"])}
    _kubelet_dir(creds, {**fields, "client_secret": first}, 1)
    out = harness.root / "out"
    proc = harness.start(
        *harness.args("run", creds, "--token-dir", str(out), "--watch-interval", "0.2"),
    )
    wait_until(lambda: (out / "access_token").exists())
    token_before = read_token(out)
    emulator.register_client(oauth["client_id"], [second])  # the old secret is revoked
    _kubelet_dir(creds, {**fields, "client_secret": second}, 2)
    swapped = time.monotonic()
    wait_until(lambda: read_token(out) != token_before, timeout=10)
    took = time.monotonic() - swapped
    harness.extra_secrets.extend([token_before, read_token(out)])
    code, output = harness.stop(proc)
    assert code == 0
    assert took < 5
    assert "credentials changed" in output


def test_adopts_a_published_token_at_start(harness: Harness) -> None:
    """A second `once` finds the still-fresh token and does not mint another."""
    emulator = harness.start_emulator()
    out = harness.root / "out"
    args = [
        *harness.args("once", harness.aem, "--token-dir", str(out)),
    ]
    first = harness.run(*args)
    assert first.returncode == 0
    token = read_token(out)
    second = harness.run(*args)
    assert second.returncode == 0
    assert read_token(out) == token
    assert emulator.stats()["issued"] == 1
    harness.extra_secrets.append(token)
    # The log lines key on a stable `event` field (docs/operations.md), not on words.
    assert _events(first.stdout)[:1] == ["starting"]
    assert {"token_minted", "published", "refresh_scheduled"} <= set(_events(first.stdout))
    assert "token_adopted" in _events(second.stdout)
    assert "token_minted" not in _events(second.stdout)


def _events(stdout: str) -> list[str]:
    """The `event` of each JSON log line (every line of `once` is one)."""
    return [json.loads(line).get("event", "") for line in stdout.splitlines() if line.strip()]


def test_concurrent_reader_never_sees_a_torn_directory(harness: Harness) -> None:
    """A reader hammering the directory during 1 s refreshes never sees missing, empty or
    mismatched files."""
    harness.start_emulator(token_ttl_s=1)
    out = harness.root / "out"
    proc = harness.start(
        *harness.args("run", harness.oauth, "--token-dir", str(out)),
    )
    wait_until(lambda: (out / "token.json").exists())
    problems: list[str] = []
    reads = 0
    tokens: set[str] = set()
    stop = threading.Event()

    def reader() -> None:
        nonlocal reads
        while not stop.is_set():
            try:
                # Resolve ..data once, as an application holding the directory would.
                snapshot = out / os.readlink(out / "..data")
                token = (snapshot / "access_token").read_text()
                expires = (snapshot / "expires_at").read_text()
                document = json.loads((snapshot / "token.json").read_text())
                plain = (out / "access_token").read_text()
            except FileNotFoundError:
                continue  # the snapshot was removed after we resolved the link: retry
            except (OSError, ValueError) as exc:
                problems.append(type(exc).__name__)
                continue
            reads += 1
            tokens.add(token)
            if not token or not plain:
                problems.append("empty")
            if document["access_token"] != token or document["expires_at"] != expires:
                problems.append("mismatch")

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    time.sleep(5)
    stop.set()
    for t in threads:
        t.join()
    code, _ = harness.stop(proc)
    harness.extra_secrets.extend(tokens)
    assert code == 0
    assert problems == []
    assert reads > 100
    assert len(tokens) >= 4


def test_https_with_ca_bundle_and_refused_without(harness: Harness) -> None:
    """Over HTTPS the emulator's CA via --ca-bundle works; without it TLS fails cleanly (1)."""
    emulator = harness.start_emulator(tls=True)
    assert emulator.ca_path is not None
    out = harness.root / "out"
    ok = harness.run(
        "once",
        "--credentials",
        str(harness.aem),
        "--token-dir",
        str(out),
        "--ims-endpoint",
        emulator.base_url,
        "--ca-bundle",
        str(emulator.ca_path),
    )
    assert ok.returncode == 0, ok.stderr
    refused = harness.run(
        "once",
        "--credentials",
        str(harness.aem),
        "--token-dir",
        str(harness.root / "out2"),
        "--ims-endpoint",
        emulator.base_url,
    )
    assert refused.returncode == 1
    assert "TLS verification" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_plain_http_refused_without_the_flag(harness: Harness) -> None:
    """An http:// endpoint without --allow-insecure-http is a configuration error (2)."""
    emulator = harness.start_emulator()
    result = harness.run(
        "once",
        "--credentials",
        str(harness.aem),
        "--token-dir",
        str(harness.root / "out"),
        "--ims-endpoint",
        emulator.base_url,
    )
    assert result.returncode == 2
    assert "--allow-insecure-http" in result.stderr
    assert emulator.stats()["requests"] == {"jwt": 0, "oauth": 0}


def test_an_on_refresh_hook_inherits_no_refresher_settings(harness: Harness) -> None:
    """The --on-refresh hook gets IMS_TOKEN_DIR and IMS_TOKEN_EXPIRES_AT but none of the
    sidecar's REFRESHER_* settings: a hook that runs `refresher` itself must not read them."""
    harness.start_emulator()
    out = harness.root / "out"
    dump = harness.root / "hook-env.json"
    hook = (
        f"{sys.executable} -c 'import json, os; json.dump(sorted(k for k in os.environ "
        f'if k.startswith(("REFRESHER_", "IMS_TOKEN_"))), open("{dump}", "w"))\''
    )
    result = harness.run(
        *harness.args("once", harness.oauth, "--on-refresh", hook),
        env={"REFRESHER_TOKEN_DIR": str(out), "REFRESHER_LOG_LEVEL": "info"},
    )
    assert result.returncode == 0, result.stderr
    harness.extra_secrets.append(read_token(out))
    assert json.loads(dump.read_text()) == ["IMS_TOKEN_DIR", "IMS_TOKEN_EXPIRES_AT"]
