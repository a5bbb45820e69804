"""End to end: the injected container's own command line, run against the IMS emulator.

No cluster here, so the pod is played by hand, and only that: the injected
refresher's args and env are taken as injection wrote them, each of its mount
paths is mapped to a temporary directory (the Secret volume holds the
credentials file, the token volume is one directory shared with the
application's mount), and the token must appear where the application container
reads it. Two test-only additions stand in for the cluster: the emulator's CA
(IMS's certificate is publicly trusted) and a free loopback port for the probes
(a pod has its own network namespace; this machine does not).
"""

from __future__ import annotations

import json
import shutil
import socket
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from refresher.inject import CONTAINER, CREDENTIALS_VOLUME, LABEL, PREFIX, TOKEN_VOLUME
from tests.support.harness import Harness, read_token, wait_until
from tests.support.injection import inject_pod

Obj = dict[str, Any]
TOKEN_PATH = "/srv/app/adobe"


def application_pod(endpoint: str, mode: str) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "app-",
            "labels": {LABEL: "true"},
            "annotations": {
                PREFIX + "credentials-secret": "adobe-ims-credentials",
                PREFIX + "token-path": TOKEN_PATH,
                PREFIX + "ims-endpoint": endpoint,
                PREFIX + "mode": mode,
            },
        },
        "spec": {"containers": [{"name": "app", "image": "busybox:1.37.0"}]},
    }


class PlayedPod:
    """The injected pod's volumes as directories, and its containers' paths mapped onto them."""

    def __init__(self, pod: Obj, root: Path, credentials_file: Path) -> None:
        spec = pod["spec"]
        self.refresher = next(c for c in spec["initContainers"] if c["name"] == CONTAINER)
        self.app = spec["containers"][0]
        volumes = {volume["name"]: root / volume["name"] for volume in spec["volumes"]}
        for directory in volumes.values():
            directory.mkdir()
        # The Secret volume: the credentials file as `kubectl create secret --from-file` makes it.
        shutil.copy(credentials_file, volumes[CREDENTIALS_VOLUME] / "credentials.json")
        self.paths = {m["mountPath"]: volumes[m["name"]] for m in self.refresher["volumeMounts"]}
        (app_mount,) = [m for m in self.app["volumeMounts"] if m["name"] == TOKEN_VOLUME]
        self.app_token_dir = volumes[app_mount["name"]]  # what the app sees at TOKEN_PATH
        assert app_mount["mountPath"] == TOKEN_PATH and app_mount["readOnly"] is True

    def args(self) -> list[str]:
        """The refresher's own args, each container path replaced by its directory here."""
        mapped = []
        for word in [*self.refresher.get("command", []), *self.refresher["args"]]:
            for mount_path, directory in self.paths.items():
                if word == mount_path or word.startswith(mount_path + "/"):
                    word = str(directory) + word[len(mount_path) :]
            mapped.append(word)
        return mapped

    def env(self, **extra: str) -> dict[str, str]:
        env = {item["name"]: item["value"] for item in self.refresher.get("env", [])}
        return {**env, **extra}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as answer:
            return int(answer.status)
    except OSError as exc:
        return int(getattr(exc, "code", 0))


@pytest.mark.slow
def test_injected_sidecar_publishes_where_the_app_reads(harness: Harness, tmp_path: Path) -> None:
    """sidecar mode: the startup probe passes once the token is at the app's token-path."""
    emulator = harness.start_emulator(tls=True, tls_dir=tmp_path / "emulator-tls")
    pod = PlayedPod(
        inject_pod(application_pod(emulator.base_url, "sidecar")).pod, tmp_path, harness.aem
    )
    port = free_port()
    probe = pod.refresher["startupProbe"]["httpGet"]
    assert probe["port"] == "http" and pod.refresher["ports"][0]["name"] == "http"
    proc = harness.start(
        *pod.args(),
        env=pod.env(
            REFRESHER_CA_BUNDLE=str(emulator.ca_path), REFRESHER_LISTEN=f"127.0.0.1:{port}"
        ),
    )
    wait_until(lambda: http_status(f"http://127.0.0.1:{port}{probe['path']}") == 200, timeout=30)
    token = read_token(pod.app_token_dir)
    assert token and (pod.app_token_dir / "expires_at").read_text()
    assert json.loads((pod.app_token_dir / "token.json").read_text())["flow"] == "jwt"
    liveness = pod.refresher["livenessProbe"]["httpGet"]["path"]
    assert http_status(f"http://127.0.0.1:{port}{liveness}") == 200
    code, _ = harness.stop(proc)
    assert code == 0
    harness.extra_secrets.append(token)


@pytest.mark.slow
def test_injected_init_container_leaves_a_token_for_the_job(
    harness: Harness, tmp_path: Path
) -> None:
    """init mode: `once` exits 0 and the token is where the job's container reads it."""
    emulator = harness.start_emulator(tls=True, tls_dir=tmp_path / "emulator-tls")
    pod = PlayedPod(
        inject_pod(application_pod(emulator.base_url, "init")).pod, tmp_path, harness.oauth
    )
    assert pod.args()[0] == "once"
    result = harness.run(*pod.args(), env=pod.env(REFRESHER_CA_BUNDLE=str(emulator.ca_path)))
    assert result.returncode == 0, result.stderr
    token = read_token(pod.app_token_dir)
    assert json.loads((pod.app_token_dir / "token.json").read_text())["flow"] == "oauth"
    harness.extra_secrets.append(token)
