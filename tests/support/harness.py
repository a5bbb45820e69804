"""The real CLI as a subprocess, in a world of its own (credentials, an emulator), with
every output it printed scanned for secrets at teardown (the `harness` fixture in
tests/conftest.py builds it)."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ims_emulator import AEM_CREDENTIALS_FILE, OAUTH_CREDENTIALS_FILE, Emulator
from tests.support.leaks import assert_no_leak

REPO = Path(__file__).resolve().parent.parent.parent


def secret_values(credentials_dir: Path) -> list[str]:
    """Every secret in the credentials files: the client secrets, the private key whole
    and each of its lines (a line alone must not appear either)."""
    aem = json.loads((credentials_dir / AEM_CREDENTIALS_FILE).read_text())["integration"]
    oauth = json.loads((credentials_dir / OAUTH_CREDENTIALS_FILE).read_text())
    key = str(aem["privateKey"])
    key_lines = [
        line for line in key.replace("\r", "").splitlines() if line and not line.startswith("-----")
    ]
    return [str(aem["technicalAccount"]["clientSecret"]), *oauth["client_secrets"], key, *key_lines]


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

    def close(self) -> None:
        """Kill what is still running (its output joins the scan) and stop the emulator."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                out, _ = proc.communicate(timeout=10)
                self.outputs.append(out or "")
        if self.emulator is not None:
            self.emulator.stop()

    def scan(self) -> None:
        """Every output of the test through the one leak scanner (tests/support/leaks.py)."""
        secrets = secret_values(self.credentials) + self.extra_secrets
        for text in self.outputs:
            assert_no_leak(text, secrets)


def wait_until(predicate: Callable[[], bool], timeout: float = 20, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(interval)


def read_token(token_dir: Path) -> str:
    return (token_dir / "access_token").read_text()


def timed_get(port: int, path: str = "/healthz", timeout: float = 5) -> tuple[int, float]:
    """One GET to 127.0.0.1:port on a fresh connection: (status, or 0 if it failed; seconds)."""
    started = time.monotonic()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        response.read()
        status = response.status
    except OSError:
        status = 0
    finally:
        connection.close()
    return status, time.monotonic() - started
