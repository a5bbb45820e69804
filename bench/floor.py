"""The floor: the least a Python process can do to exchange a JWT for an IMS token.

`requests` + PyJWT (with cryptography, which PyJWT signs RS256 with); no retries, no
schedule, no health, no metrics: read the AEM service credentials, sign the assertion
the way `@adobe/jwt-auth` does, POST it to `{ims}/ims/exchange/jwt`, write the token
atomically (temp file, fsync, rename). With --loop, the credentials file is re-read
every cycle (as a sidecar must) and its key parsed once per distinct PEM; between
cycles the credentials file is stat()ed every --watch seconds (5, the refresher's
default `--watch-interval`), the least a sidecar that notices a rotated Secret does,
so that idle CPU is compared with a process that wakes as often.
Any Python implementation pays at least this; `bench/run.py` compares the
refresher with it.

    floor.py --credentials AEM.json --ims http://127.0.0.1:PORT --out FILE
    floor.py ... --loop SECONDS [--cycles N]   # refresh every SECONDS, forever or N times

One line per published token on stdout (`published N`), which the harness counts.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from typing import Any

import jwt
import requests
from cryptography.hazmat.primitives.serialization import load_pem_private_key


@functools.lru_cache(maxsize=4)
def _key(pem: str) -> Any:
    # Loading an RSA key checks it, which costs tens of ms: parse each PEM once, as
    # the refresher does, while the file itself is still re-read on every cycle.
    return load_pem_private_key(pem.encode(), password=None)


def _assertion(integration: dict[str, Any], ims: str) -> str:
    claims = {
        "exp": round(time.time() + 300),
        "iss": integration["org"],
        "sub": integration["id"],
        "aud": f"{ims}/c/{integration['technicalAccount']['clientId']}",
    }
    metascopes = integration["metascopes"]
    if isinstance(metascopes, str):
        metascopes = metascopes.split(",")
    for metascope in metascopes:
        claims[f"{ims}/s/{metascope}"] = True
    return jwt.encode(claims, _key(integration["privateKey"]), algorithm="RS256")


def _exchange(session: requests.Session, integration: dict[str, Any], ims: str) -> dict[str, Any]:
    account = integration["technicalAccount"]
    response = session.post(
        f"{ims}/ims/exchange/jwt",
        data={
            "client_id": account["clientId"],
            "client_secret": account["clientSecret"],
            "jwt_token": _assertion(integration, ims),
        },
        timeout=(5, 15),
    )
    response.raise_for_status()
    answer: dict[str, Any] = response.json()
    return answer


def _publish(path: str, token: str) -> None:
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o440)
    try:
        os.write(fd, token.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--credentials", required=True, help="AEM service credentials JSON")
    parser.add_argument("--ims", required=True, help="IMS base URL (scheme://host[:port])")
    parser.add_argument("--out", required=True, help="file to publish the token to")
    parser.add_argument("--loop", type=float, help="refresh every SECONDS instead of exiting")
    parser.add_argument("--cycles", type=int, help="with --loop: stop after N tokens")
    parser.add_argument(
        "--watch", type=float, default=5.0, help="with --loop: stat the credentials this often"
    )
    args = parser.parse_args()

    session = requests.Session()
    count = 0
    while True:
        # Re-read every time, as a sidecar must (the mounted Secret may be rotated).
        with open(args.credentials, encoding="utf-8") as handle:
            document = json.load(handle)
        integration = document.get("integration", document)
        answer = _exchange(session, integration, args.ims.rstrip("/"))
        _publish(args.out, answer["access_token"])
        count += 1
        print(f"published {count}", flush=True)
        if args.loop is None or (args.cycles is not None and count >= args.cycles):
            return 0
        _wait(args.loop, args.watch, args.credentials)


def _wait(seconds: float, watch_s: float, credentials: str) -> None:
    """Sleep `seconds`, waking every `watch_s` to stat the credentials (no read)."""
    deadline = time.monotonic() + seconds
    while (remaining := deadline - time.monotonic()) > 0:
        time.sleep(min(remaining, watch_s))
        os.stat(credentials)


if __name__ == "__main__":
    sys.exit(main())
