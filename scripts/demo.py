"""`make demo`: the real refresher against the built-in IMS emulator, end to end.

Starts `refresher emulator` on a free loopback port, obtains a token with both
flows through `refresher once`, runs `refresher run` with 4-second tokens long
enough to see it refresh, shows what it published, and cleans up.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REFRESHER = [sys.executable, "-m", "refresher"]


def banner(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def wait_for(path: Path, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists() or not path.read_text().strip():
        if time.monotonic() > deadline:
            raise SystemExit(f"demo: timed out waiting for {path}")
        time.sleep(0.05)


def show_dir(token_dir: Path) -> None:
    for entry in sorted(token_dir.iterdir(), key=lambda p: p.name):
        kind = (
            f"-> {os.readlink(entry)}" if entry.is_symlink() else "(dir)" if entry.is_dir() else ""
        )
        print(f"  {entry.name:<40} {kind}")
    token = (token_dir / "access_token").read_text()
    print(
        f"  access_token: {token[:24]}... ({len(token)} characters; demo token from the emulator)"
    )
    print(f"  expires_at:   {(token_dir / 'expires_at').read_text()}")
    document = json.loads((token_dir / "token.json").read_text())
    document["access_token"] = "<as in access_token>"
    print("  token.json:   " + json.dumps(document, indent=2).replace("\n", "\n  "))
    payload = token.split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    print(
        "  decoded token claims (IMS shape): "
        + json.dumps(
            {
                k: claims[k]
                for k in ("type", "client_id", "created_at", "expires_in", "scope")
                if k in claims
            }
        )
    )


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="refresher-demo-"))
    creds, port_file = work / "credentials", work / "port"
    emulator = subprocess.Popen(
        [
            *REFRESHER,
            "emulator",
            "--port",
            "0",
            "--port-file",
            str(port_file),
            "--write-credentials",
            str(creds),
            "--token-ttl",
            "4",
        ],
    )
    try:
        wait_for(port_file)
        endpoint = f"http://127.0.0.1:{port_file.read_text().strip()}"
        common = ["--ims-endpoint", endpoint, "--allow-insecure-http", "--log-format", "text"]

        banner(f"IMS emulator on {endpoint}; generated credentials in {creds}")
        subprocess.run(
            [
                *REFRESHER,
                "check",
                "--credentials",
                str(creds / "aem-service-credentials.json"),
                *common,
            ],
            check=True,
        )

        for label, file in (
            ("JWT exchange (AEM service credentials)", "aem-service-credentials.json"),
            ("OAuth Server-to-Server", "oauth-server-to-server.json"),
        ):
            out = work / f"tokens-{file.split('.')[0]}"
            banner(f"refresher once, {label}")
            subprocess.run(
                [
                    *REFRESHER,
                    "once",
                    "--credentials",
                    str(creds / file),
                    "--token-dir",
                    str(out),
                    *common,
                ],
                check=True,
            )
            show_dir(out)

        out = work / "tokens-run"
        banner("refresher run with 4-second tokens for 8 seconds (watch it refresh)")
        run = subprocess.Popen(
            [
                *REFRESHER,
                "run",
                "--credentials",
                str(creds / "aem-service-credentials.json"),
                "--token-dir",
                str(out),
                "--listen",
                "127.0.0.1:0",
                *common,
            ]
        )
        time.sleep(8)
        run.send_signal(signal.SIGTERM)
        print(f"  refresher run exited with {run.wait(timeout=10)} after SIGTERM")
        show_dir(out)
        banner("done: the token directory above is what an application reads")
        return 0
    finally:
        emulator.send_signal(signal.SIGTERM)
        try:
            emulator.wait(timeout=5)
        except subprocess.TimeoutExpired:
            emulator.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
