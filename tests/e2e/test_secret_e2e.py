"""The Secret sink through the real CLI: the official client reaches the fake apiserver
through a kubeconfig, as in a cluster. Replicas share one token; a failing sink never
blocks the other."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.fakeapi import FakeApiServer
from tests.support.harness import Harness, read_token, wait_until

pytestmark = pytest.mark.slow

NS = "team-a"
NAME = "adobe-ims-token"


@dataclass(frozen=True)
class Api:
    """The fake apiserver and the environment that points the CLI at it."""

    server: FakeApiServer
    env: dict[str, str]


@pytest.fixture
def api(harness: Harness) -> Iterator[Api]:
    """A fake apiserver serving namespace NS, and KUBECONFIG for it."""
    with FakeApiServer(namespaces=(NS,)) as server:
        kubeconfig = server.write_kubeconfig(harness.root / "kubeconfig", namespace=NS)
        yield Api(server, {"KUBECONFIG": str(kubeconfig)})


def secret_token(server: FakeApiServer) -> str | None:
    if server.secret(NS, NAME) is None:
        return None
    data = server.secret_data(NS, NAME)
    return data["access_token"].decode() if "access_token" in data else None


def test_once_creates_the_secret_then_adopts_it(harness: Harness, api: Api) -> None:
    """`once --secret` creates the Secret per the SPEC; a second `once` adopts, not re-mints."""
    server, env = api.server, api.env
    emulator = harness.start_emulator()
    args = harness.args("once", harness.aem, "--secret", NAME, "--secret-namespace", NS)
    first = harness.run(*args, env=env)
    assert first.returncode == 0, first.stderr
    obj = server.secret(NS, NAME)
    assert obj is not None
    assert obj["type"] == "Opaque"
    assert obj["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "ims-token-refresher"
    annotations = obj["metadata"]["annotations"]
    data = {k: base64.b64decode(v).decode() for k, v in obj["data"].items()}
    assert set(data) >= {"access_token", "expires_at", "token.json"}
    assert annotations["ims-token-refresher/expires-at"] == data["expires_at"]
    assert "ims-token-refresher/refreshed-at" in annotations
    assert json.loads(data["token.json"])["access_token"] == data["access_token"]
    harness.extra_secrets.append(data["access_token"])
    second = harness.run(*args, env=env)
    assert second.returncode == 0, second.stderr
    assert emulator.stats()["issued"] == 1
    assert server.requests["DELETE"] == 0


def test_three_replicas_share_one_token(harness: Harness, api: Api) -> None:
    """Three `run` replicas on one Secret cause about one IMS exchange per refresh cycle."""
    server, env = api.server, api.env
    emulator = harness.start_emulator(token_ttl_s=4)
    args = harness.args("run", harness.oauth, "--secret", NAME, "--secret-namespace", NS)
    replicas = []
    for _ in range(3):
        replicas.append(harness.start(*args, env=env))
        time.sleep(0.7)
    seen: set[str] = set()
    deadline = time.monotonic() + 14
    while time.monotonic() < deadline:
        token = secret_token(server)
        if token:
            seen.add(token)
        time.sleep(0.05)
    for proc in replicas:
        code, _ = harness.stop(proc)
        assert code == 0
    harness.extra_secrets.extend(seen)
    issued = emulator.stats()["issued"]
    cycles = len(seen)
    # One replica alone would mint once per ~3 s cycle; three independent ones, three times that.
    assert cycles >= 4
    assert issued <= cycles + 2, (issued, cycles)
    assert server.requests["DELETE"] == 0


def test_forbidden_secret_does_not_block_the_file(harness: Harness, api: Api) -> None:
    """With RBAC missing, `once` still publishes the file, names the missing verb, exits 1."""
    server, env = api.server, api.env
    server.forbid("create")
    server.forbid("update")
    harness.start_emulator()
    out = harness.root / "out"
    result = harness.run(
        *harness.args(
            "once", harness.aem, "--secret", NAME, "--secret-namespace", NS, "--token-dir", str(out)
        ),
        env=env,
    )
    assert result.returncode == 1
    assert read_token(out)
    logs = result.stdout.replace('\\"', '"')
    assert f'RBAC forbids "create" on secrets in namespace "{NS}"' in logs
    harness.extra_secrets.append(read_token(out))


def test_unreachable_api_keeps_refreshing_the_file(harness: Harness, api: Api) -> None:
    """With the API server down, `run` keeps the file fresh and recovers the Secret later."""
    server, env = api.server, api.env
    server.down()
    harness.start_emulator(token_ttl_s=30)
    out = harness.root / "out"
    proc = harness.start(
        *harness.args(
            "run",
            harness.oauth,
            "--secret",
            NAME,
            "--secret-namespace",
            NS,
            "--token-dir",
            str(out),
            "--backoff-max",
            "1",
        ),
        env=env,
    )
    wait_until(lambda: (out / "access_token").exists())
    time.sleep(1)
    server.up()
    wait_until(lambda: secret_token(server) is not None, timeout=15)
    assert secret_token(server) == read_token(out)
    harness.extra_secrets.append(read_token(out))
    code, output = harness.stop(proc)
    assert code == 0
    assert "unreachable" in output


def test_missing_namespace_is_one_clear_line(harness: Harness, api: Api) -> None:
    """A Secret in a namespace that does not exist fails `once` with a line naming it."""
    env = api.env
    harness.start_emulator()
    result = harness.run(
        *harness.args("once", harness.oauth, "--secret", NAME, "--secret-namespace", "nope"),
        env=env,
    )
    assert result.returncode == 1
    assert 'namespace "nope" not found' in result.stdout.replace('\\"', '"')
    assert "Traceback" not in result.stdout + result.stderr


def test_users_keys_and_labels_survive(harness: Harness, api: Api, tmp_path: Path) -> None:
    """Keys, labels and annotations a user put on the Secret are kept across refreshes."""
    server, env = api.server, api.env
    server.put_secret(
        {
            "metadata": {"name": NAME, "labels": {"team": "a"}, "annotations": {"note": "mine"}},
            "type": "Opaque",
            "data": {"extra": base64.b64encode(b"keep me").decode()},
        },
        namespace=NS,
    )
    harness.start_emulator()
    result = harness.run(
        *harness.args("once", harness.oauth, "--secret", NAME, "--secret-namespace", NS),
        env=env,
    )
    assert result.returncode == 0, result.stderr
    obj = server.secret(NS, NAME)
    assert obj is not None
    assert obj["metadata"]["labels"]["team"] == "a"
    assert obj["metadata"]["annotations"]["note"] == "mine"
    assert server.secret_data(NS, NAME)["extra"] == b"keep me"
    harness.extra_secrets.append(secret_token(server) or "")
