"""What the reliability suites share: the refresher as a supervised subprocess (its output
drained as it runs, its probes and metrics fetched over HTTP), a reader that hammers the
token directory, the token book that knows what the emulator issued, RSS sampling, and
the secret scan. Everything is real: processes, sockets, files."""

from __future__ import annotations

import contextlib
import http.client
import json
import math
import os
import signal
import statistics
import subprocess
import threading
import time
from array import array
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import jwt
from prometheus_client.parser import text_string_to_metric_families

from ims_emulator import AEM_CREDENTIALS_FILE, OAUTH_CREDENTIALS_FILE, Emulator
from tests.support.harness import Harness, secret_values
from tests.support.leaks import leak_counts

PUBLISHED = ("access_token", "expires_at", "token.json")


# --------------------------------------------------------------------------- the process


class Refresher:
    """`python -m refresher ...` started through the harness; stdout drained continuously
    (a full pipe would block the refresher's logging), JSON lines parsed as they come."""

    def __init__(self, harness: Harness, *args: str, env: dict[str, str] | None = None) -> None:
        self.harness = harness
        self.args = args
        self.proc = harness.start(*args, env=env)
        self.lines: list[str] = []
        self.records: list[dict[str, Any]] = []
        self.fetched: list[str] = []  # probe and metrics bodies: scanned for secrets too
        self.returncode: int | None = None
        self._port: int | None = None
        self._port_seen = threading.Event()
        self._drain = threading.Thread(target=self._read, name="refresher-drain", daemon=True)
        self._drain.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if not isinstance(record, dict):
                continue
            with contextlib.suppress(KeyError, TypeError, ValueError):
                record["_t"] = datetime.fromisoformat(str(record["time"])).timestamp()
            self.records.append(record)
            if record.get("message") == "serving probes and metrics":
                self._port = int(str(record["listen"]).rsplit(":", 1)[1])
                self._port_seen.set()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def port(self, timeout: float = 30) -> int:
        if not self._port_seen.wait(timeout):
            raise AssertionError(f"the refresher announced no listen port:\n{self.output[-2000:]}")
        assert self._port is not None
        return self._port

    def get(self, path: str, timeout: float = 5) -> tuple[int, str]:
        """GET a probe or /metrics; the body is kept for the secret scan."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port(), timeout=timeout)
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            body = response.read().decode("utf-8", "replace")
        finally:
            connection.close()
        self.fetched.append(body)
        return response.status, body

    def metrics(self) -> dict[str, float]:
        """Every sample as `name{label="v",...}` (labels sorted) -> value."""
        _, text = self.get("/metrics")
        samples: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        return samples

    def find(self, text: str) -> list[dict[str, Any]]:
        return [r for r in list(self.records) if text in str(r.get("message", ""))]

    def _finish(self, timeout: float) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(timeout=10)
        self._drain.join(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.returncode = code
        self.harness.outputs.append(self.output)
        self.harness.outputs.extend(self.fetched)
        return code

    def stop(self, timeout: float = 15) -> int:
        """SIGTERM and wait; the output (and fetched bodies) join the harness' secret scan."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self._finish(timeout)

    def kill(self) -> int:
        """SIGKILL: no handler, no cleanup, no flush."""
        if self.proc.poll() is None:
            self.proc.kill()
        return self._finish(10)


# --------------------------------------------------------------------------- tokens


class TokenBook:
    """Which tokens this emulator issued (its signature), for which client, and their exact
    expiry from the token's own claims (`created_at` + `expires_in`, milliseconds): the
    `expires_at` file is whole seconds, too coarse for 1 s tokens."""

    def __init__(self, emulator: Emulator, client_ids: Iterable[str]) -> None:
        self.key = emulator.token_public_key_pem
        self.client_ids = set(client_ids)
        self._expiry: dict[str, float | None] = {}
        self._lock = threading.Lock()

    def expiry(self, value: str) -> float | None:
        """Unix time the token expires, or None if this emulator did not issue it to us."""
        with self._lock:
            if value in self._expiry:
                return self._expiry[value]
        try:
            claims = jwt.decode(
                value,
                self.key,
                algorithms=["RS256"],
                options={"verify_exp": False, "verify_aud": False, "verify_iat": False},
            )
            known = claims.get("client_id") in self.client_ids
            expiry = (
                (int(claims["created_at"]) + int(claims["expires_in"])) / 1000 if known else None
            )
        except (jwt.PyJWTError, KeyError, TypeError, ValueError):
            expiry = None
        with self._lock:
            self._expiry[value] = expiry
        return expiry

    def values(self) -> list[str]:
        with self._lock:
            return list(self._expiry)


def observed_run(credentials: Path, token_dir: Path) -> list[str]:
    """The start of every observed `run`: the token dir, probes on a free port, debug logs
    (the level that the secret scans must survive)."""
    return [
        "run",
        "--credentials",
        str(credentials),
        "--token-dir",
        str(token_dir),
        "--listen",
        "127.0.0.1:0",
        "--log-level",
        "debug",
    ]


def client_ids(harness: Harness) -> set[str]:
    aem = json.loads(harness.aem.read_text())["integration"]["technicalAccount"]["clientId"]
    oauth = json.loads(harness.oauth.read_text())["client_id"]
    return {str(aem), str(oauth)}


# --------------------------------------------------------------------------- the reader


@dataclass
class Seen:
    """One token as the readers saw it."""

    first_seen: float
    expiry: float | None
    expired_reads: array[float] = field(default_factory=lambda: array("d"))


class DirReader(threading.Thread):
    """Reads the token directory in a tight loop, as two kinds of application would:

    - a snapshot read resolves `..data` once and reads all three files from that
      snapshot: they must be present, non-empty and agree with each other. A file that
      vanished because `..data` moved on meanwhile is the documented kubelet race
      (re-resolve and retry), counted apart; a file missing from the snapshot that
      `..data` still names is a real problem;
    - a plain read opens `DIR/access_token` through the stable symlink.

    Every token read must be one the emulator issued to our client (else "unknown").
    """

    def __init__(self, directory: Path, book: TokenBook) -> None:
        super().__init__(name="dir-reader", daemon=True)
        self.directory = directory
        self.book = book
        self.stop_event = threading.Event()
        self.reads = 0
        self.problems: Counter[str] = Counter()
        self.benign: Counter[str] = Counter()
        self.examples: list[str] = []
        self.seen: dict[str, Seen] = {}
        self.order: list[str] = []  # tokens in the order first seen
        self.published = False

    def _problem(self, kind: str, detail: str) -> None:
        self.problems[kind] += 1
        if len(self.examples) < 10:
            self.examples.append(f"{kind}: {detail}")

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.read_once()

    def read_once(self) -> None:
        now = time.time()
        data = self.directory / "..data"
        try:
            target = os.readlink(data)
        except FileNotFoundError:
            if self.published:
                self._problem("missing", "..data vanished")
            else:
                self.benign["before_first_publish"] += 1
            return
        snapshot = self.directory / target
        try:
            token = (snapshot / "access_token").read_text()
            expires = (snapshot / "expires_at").read_text()
            raw = (snapshot / "token.json").read_text()
        except FileNotFoundError:
            try:
                moved = os.readlink(data) != target
            except FileNotFoundError:
                moved = False
            if moved:
                self.benign["snapshot_replaced_during_read"] += 1
            else:
                self._problem("missing", f"a file of the current snapshot {target}")
            return
        try:
            plain = (self.directory / "access_token").read_text()
        except FileNotFoundError:
            if self.published:
                self._problem("missing", "DIR/access_token")
            else:
                # The very first publish swaps `..data` in, then creates the stable names
                # (kubelet's order): to an application the token is simply not there yet.
                self.benign["first_publish_links_pending"] += 1
            return
        self.published = True
        self.reads += 1
        if not token or not expires or not raw or not plain:
            self._problem("empty", "an empty published file")
            return
        try:
            document = json.loads(raw)
        except ValueError:
            self._problem("mismatched", "token.json is not JSON")
            return
        if document.get("access_token") != token or document.get("expires_at") != expires:
            self._problem("mismatched", "token.json disagrees with access_token/expires_at")
        for value in {token, plain}:
            if self.book.expiry(value) is None:
                self._problem("unknown", "a token the emulator did not issue to us")
                return
        seen = self.seen.get(token)
        if seen is None:
            seen = Seen(first_seen=now, expiry=self.book.expiry(token))
            self.seen[token] = seen
            self.order.append(token)
        if seen.expiry is not None and now >= seen.expiry:
            seen.expired_reads.append(now)


# --------------------------------------------------------------------------- memory


class RssSampler(threading.Thread):
    """VmRSS and VmHWM of one process from /proc/PID/status, every `interval` seconds."""

    def __init__(self, pid: int, interval: float = 1.0) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.pid = pid
        self.interval = interval
        self.samples: list[tuple[float, int, int]] = []  # (monotonic, rss kB, hwm kB)
        self.stop_event = threading.Event()

    def sample(self) -> None:
        fields: dict[str, int] = {}
        try:
            with open(f"/proc/{self.pid}/status") as status:
                for line in status:
                    name, _, value = line.partition(":")
                    if name in ("VmRSS", "VmHWM"):
                        fields[name] = int(value.split()[0])
        except (FileNotFoundError, ProcessLookupError):
            return
        if len(fields) == 2:
            self.samples.append((time.monotonic(), fields["VmRSS"], fields["VmHWM"]))

    def run(self) -> None:
        while not self.stop_event.wait(self.interval):
            self.sample()

    def summary(self, warmup_fraction: float = 0.2) -> dict[str, float]:
        """Peak, and growth from the end of warm-up to the end (MiB)."""
        if not self.samples:
            return {}
        start = self.samples[0][0]
        span = self.samples[-1][0] - start
        after = [s for s in self.samples if s[0] - start >= span * warmup_fraction]
        first = after[0] if after else self.samples[0]
        last = self.samples[-1]
        mib = 1024.0
        return {
            "samples": len(self.samples),
            "rss_after_warmup_mib": round(first[1] / mib, 1),
            "rss_end_mib": round(last[1] / mib, 1),
            "rss_growth_after_warmup_mib": round((last[1] - first[1]) / mib, 2),
            "peak_rss_vmhwm_mib": round(max(s[2] for s in self.samples) / mib, 1),
            "hwm_growth_after_warmup_mib": round((last[2] - first[2]) / mib, 2),
        }


# --------------------------------------------------------------------------- directory


def dir_state(directory: Path, book: TokenBook | None = None) -> dict[str, Any]:
    """The token directory as a reader would find it right now.

    `complete`: `..data` resolves to a snapshot holding exactly the three files, which
    are non-empty and agree; every stable name present is a symlink through `..data`.
    `leftovers`: `..*` entries other than `..data` and its target (an interrupted
    publish). `problems`: anything a reader could trip over.
    """
    state: dict[str, Any] = {"target": None, "complete": False, "leftovers": [], "problems": []}
    problems: list[str] = state["problems"]
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return state
    try:
        target = os.readlink(directory / "..data")
    except FileNotFoundError:
        target = None
    except OSError as exc:
        problems.append(f"..data is not a symlink: {exc.strerror}")
        return state
    state["target"] = target
    state["leftovers"] = [n for n in names if n.startswith("..") and n not in ("..data", target)]
    stray = [n for n in names if not n.startswith("..") and n not in PUBLISHED]
    if stray:
        problems.append(f"unexpected entries {stray}")
    if target is None:
        if any(n in PUBLISHED for n in names):
            # Before the first swap no stable name may exist: it would dangle.
            problems.append("stable names without ..data")
        return state
    snapshot = directory / target
    if not snapshot.is_dir():
        problems.append("..data dangles")
        return state
    inside = sorted(os.listdir(snapshot))
    if inside != sorted(PUBLISHED):
        problems.append(f"the snapshot holds {inside}")
        return state
    files = {name: (snapshot / name).read_bytes() for name in PUBLISHED}
    if not all(files.values()):
        problems.append("an empty file in the snapshot")
        return state
    try:
        document = json.loads(files["token.json"])
    except ValueError:
        problems.append("token.json is not JSON")
        return state
    if (
        document.get("access_token") != files["access_token"].decode()
        or document.get("expires_at") != files["expires_at"].decode()
    ):
        problems.append("the three files disagree")
    if book is not None and book.expiry(files["access_token"].decode()) is None:
        problems.append("a token the emulator did not issue")
    for name in PUBLISHED:
        link = directory / name
        if link.is_symlink():
            if os.readlink(link) != f"..data/{name}":
                problems.append(f"{name} does not point through ..data")
        elif link.exists():
            problems.append(f"{name} is not a symlink")
    state["links"] = sum((directory / n).is_symlink() for n in PUBLISHED)
    state["token"] = files["access_token"].decode()
    state["complete"] = not problems
    return state


# --------------------------------------------------------------------------- secrets


def scan_for_secrets(
    texts: Iterable[str], credentials_dir: Path, tokens: Iterable[str] = ()
) -> dict[str, int]:
    """Hits per kind in `texts` by the one leak scanner (tests/support/leaks.py): client
    secrets, the private key (whole, re-wrapped or line by line), private-key headers,
    anything JWT-shaped (assertions, access tokens), and the access tokens we know."""
    values = secret_values(credentials_dir)
    aem = json.loads((credentials_dir / AEM_CREDENTIALS_FILE).read_text())["integration"]
    oauth = json.loads((credentials_dir / OAUTH_CREDENTIALS_FILE).read_text())
    client = [str(aem["technicalAccount"]["clientSecret"]), *map(str, oauth["client_secrets"])]
    groups = {
        "client_secret": client,
        "private_key": [v for v in values if v not in client],
        "access_token": [t for t in tokens if t],
    }
    hits: Counter[str] = Counter()
    scanned = 0
    for text in texts:
        scanned += len(text)
        hits.update(leak_counts(text, groups))
    kinds = [*groups, "private_key_header", "jwt_shaped"]
    return {"bytes_scanned": scanned, **{k: hits[k] for k in sorted(kinds)}}


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def at(q: float) -> float:
        # Nearest rank: the smallest value with at least q of the values at or below it.
        return round(ordered[max(0, math.ceil(q * len(ordered)) - 1)], 4)

    return {
        "n": len(ordered),
        "p50": at(0.5),
        "p99": at(0.99),
        "max": round(ordered[-1], 4),
        "mean": round(statistics.fmean(ordered), 4),
    }
