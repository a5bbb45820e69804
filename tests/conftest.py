"""Shared fixtures: generated credentials, a real IMS emulator on loopback, and the real CLI
run as a subprocess whose every output line is scanned for secrets at teardown."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ims_emulator import AEM_CREDENTIALS_FILE, OAUTH_CREDENTIALS_FILE, Emulator

REPO = Path(__file__).resolve().parent.parent
JWT_LIKE = re.compile(r"eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}")


@pytest.fixture(scope="session")
def credentials_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """AEM and OAuth credentials generated once per session (RSA key generation is slow)."""
    directory = tmp_path_factory.mktemp("credentials-template")
    Emulator.start(directory).stop()
    return directory


def secret_values(credentials_dir: Path) -> list[str]:
    """Every secret in the generated credentials: client secrets and private-key lines."""
    values: list[str] = []
    aem = json.loads((credentials_dir / AEM_CREDENTIALS_FILE).read_text())["integration"]
    values.append(aem["technicalAccount"]["clientSecret"])
    key_lines = [
        line
        for line in aem["privateKey"].replace("\r", "").splitlines()
        if line and not line.startswith("-----")
    ]
    values.extend(key_lines)
    oauth = json.loads((credentials_dir / OAUTH_CREDENTIALS_FILE).read_text())
    values.extend(oauth["client_secrets"])
    return values


@dataclass
class Harness:
    """One test's world: its credentials, its emulator, and every output to scan."""

    root: Path
    credentials: Path
    emulator: Emulator | None = None
    outputs: list[str] = field(default_factory=list)
    procs: list[subprocess.Popen[str]] = field(default_factory=list)
    extra_secrets: list[str] = field(default_factory=list)

    @property
    def aem(self) -> Path:
        return self.credentials / AEM_CREDENTIALS_FILE

    @property
    def oauth(self) -> Path:
        return self.credentials / OAUTH_CREDENTIALS_FILE

    def start_emulator(self, **kwargs: object) -> Emulator:
        if self.emulator is not None:
            self.emulator.stop()
        self.emulator = Emulator.start(self.credentials, **kwargs)  # type: ignore[arg-type]
        return self.emulator

    def endpoint_args(self) -> list[str]:
        assert self.emulator is not None
        args = ["--ims-endpoint", self.emulator.base_url]
        if self.emulator.base_url.startswith("http://"):
            args.append("--allow-insecure-http")
        return args

    def args(self, command: str, credentials: Path, *extra: str) -> list[str]:
        """`COMMAND --credentials PATH EXTRA... --ims-endpoint <the emulator>`."""
        return [command, "--credentials", str(credentials), *extra, *self.endpoint_args()]

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("REFRESHER_")}
        env.update({"PYTHONUNBUFFERED": "1", "NO_PROXY": "*", "REFRESHER_LISTEN": ""})
        env.update(extra or {})
        return env

    def run(
        self, *args: str, env: dict[str, str] | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """Run the real CLI to completion; its output is kept for the secret scan."""
        result = subprocess.run(
            [sys.executable, "-m", "refresher", *args],
            capture_output=True,
            text=True,
            env=self.env(env),
            timeout=timeout,
            check=False,
        )
        self.outputs.extend([result.stdout, result.stderr])
        return result

    def start(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        """Start the real CLI in the background (stdout+stderr kept for the scan)."""
        proc = subprocess.Popen(
            [sys.executable, "-m", "refresher", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=self.env(env),
        )
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[str], timeout: float = 10) -> tuple[int, str]:
        """SIGTERM, wait, return (exit code, output)."""
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=timeout)
        self.outputs.append(out)
        return proc.returncode, out

    def scan(self) -> None:
        secrets = secret_values(self.credentials) + self.extra_secrets
        for text in self.outputs:
            for secret in secrets:
                assert secret not in text, "a secret value reached the output"
            assert not JWT_LIKE.search(text), "a JWT or token reached the output"


@pytest.fixture
def harness(tmp_path: Path, credentials_template: Path) -> Iterator[Harness]:
    """A private copy of the credentials and, at teardown, the secret scan of all output."""
    credentials = tmp_path / "credentials"
    shutil.copytree(credentials_template, credentials)
    h = Harness(root=tmp_path, credentials=credentials)
    try:
        yield h
    finally:
        for proc in h.procs:
            if proc.poll() is None:
                proc.kill()
                out, _ = proc.communicate(timeout=10)
                h.outputs.append(out or "")
        if h.emulator is not None:
            h.emulator.stop()
    h.scan()


def wait_until(predicate: Callable[[], bool], timeout: float = 20, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(interval)


def read_token(token_dir: Path) -> str:
    return (token_dir / "access_token").read_text()
