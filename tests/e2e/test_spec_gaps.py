"""Promises of docs/SPEC.md that no other test checked, each pinned through the real CLI
against the real emulator (and the fake apiserver where a Secret is involved).

Where the wire must be seen, a recording gateway sits between the CLI and the emulator:
it forwards each token request unchanged (keeping the client's `Host`, so the emulator
judges `aud` as the client meant it) and keeps only what the tests read: arrival and
departure instants and the assertion's claims (never a secret, never the JWT itself).
"""

from __future__ import annotations

import base64
import http.client
import json
import shlex
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.error import HTTPError
from urllib.parse import parse_qs
from urllib.request import Request, urlopen

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.support import keys
from tests.support.fakeapi import FakeApiServer
from tests.support.harness import Harness, read_token, timed_get, wait_until
from tests.support.injection import pod, template_of

pytestmark = pytest.mark.slow

NS = "team-a"
SECRET = "adobe-ims-token"
TOKEN_JSON_KEYS = {
    "access_token",
    "token_type",
    "expires_at",
    "issued_at",
    "expires_in",
    "flow",
    "client_id",
    "ims_endpoint",
}


def _instant(text: str) -> float:
    """POSIX seconds of an RFC 3339 `...Z` instant (the published precision: whole seconds)."""
    assert text.endswith("Z"), "not an RFC 3339 UTC instant"
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _events(stdout: str) -> list[dict[str, Any]]:
    """The JSON log lines of a finished command (stdout holds nothing else)."""
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def _token_json(token_dir: Path) -> dict[str, Any]:
    document = json.loads((token_dir / "token.json").read_text())
    assert isinstance(document, dict)
    return document


# ---------------------------------------------------------------- a recording gateway


@dataclass
class Seen:
    """One token request as the gateway saw it: no secret is kept."""

    path: str
    arrived: float
    left: float = 0.0
    claims: dict[str, Any] | None = None


def _claims_of(body: bytes) -> dict[str, Any] | None:
    """The unverified claims of the form's `jwt_token` (None for an OAuth request)."""
    assertion = parse_qs(body.decode()).get("jwt_token")
    if not assertion:
        return None
    payload = assertion[0].split(".")[1]
    decoded = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert isinstance(decoded, dict)
    return decoded


class _Recording(BaseHTTPRequestHandler):
    """Forward a POST to the emulator after `server.delay_s`, recording what `Seen` keeps."""

    def do_POST(self) -> None:
        server: Gateway = self.server  # type: ignore[assignment]
        seen = Seen(self.path, time.time())
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        seen.claims = _claims_of(body)
        time.sleep(server.delay_s)
        request = Request(server.upstream + self.path, data=body, method="POST")
        request.add_header("Content-Type", self.headers["Content-Type"])
        request.add_header("Host", self.headers["Host"])  # the emulator judges `aud` by it
        try:
            with urlopen(request, timeout=20) as answer:
                status, answer_body = answer.status, answer.read()
                debug_id = answer.headers.get("x-debug-id", "")
        except HTTPError as exc:
            status, answer_body = exc.code, exc.read()
            debug_id = exc.headers.get("x-debug-id", "")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        if debug_id:
            self.send_header("x-debug-id", debug_id)
        self.send_header("Content-Length", str(len(answer_body)))
        self.end_headers()
        self.wfile.write(answer_body)
        seen.left = time.time()
        server.seen.append(seen)

    def log_message(self, *args: object) -> None:
        pass


class Gateway(ThreadingHTTPServer):
    """A loopback gateway in front of the harness's emulator that records token requests."""

    def __init__(self, harness: Harness, delay_s: float = 0.0) -> None:
        super().__init__(("127.0.0.1", 0), _Recording)
        self.harness = harness
        self.delay_s = delay_s
        self.seen: list[Seen] = []

    @property
    def upstream(self) -> str:
        """The emulator the harness runs now (a test may restart it with other settings)."""
        assert self.harness.emulator is not None, "start the emulator first"
        return self.harness.emulator.base_url

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@pytest.fixture
def gateway(harness: Harness) -> Iterator[Gateway]:
    """A recording gateway in front of the harness's emulator (the test starts it)."""
    server = Gateway(harness)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _via(gateway: Gateway) -> list[str]:
    return ["--ims-endpoint", gateway.url, "--allow-insecure-http"]


# ---------------------------------------------------------------- `run` with its probe port


@dataclass
class Running:
    """A `refresher run --listen 127.0.0.1:0` subprocess, its port and its output lines."""

    proc: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    port: int = 0
    reader: threading.Thread | None = None

    def events(self) -> list[str]:
        names = []
        for line in list(self.lines):
            try:
                names.append(str(json.loads(line).get("event", "")))
            except ValueError:
                continue
        return names

    def status(self, path: str) -> int:
        return timed_get(self.port, path)[0]

    def metric(self, name: str, **labels: str) -> float | None:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            connection.request("GET", "/metrics")
            text = connection.getresponse().read().decode()
        finally:
            connection.close()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(
                    sample.labels.get(k) == v for k, v in labels.items()
                ):
                    return float(sample.value)
        return None


@pytest.fixture
def run_with_probes(harness: Harness) -> Iterator[Any]:
    """Start `refresher run` with a probe port; its output joins the harness's secret scan."""
    started: list[Running] = []

    def start(*args: str, env: dict[str, str] | None = None) -> Running:
        proc = subprocess.Popen(
            [sys.executable, "-m", "refresher", "run", "--listen", "127.0.0.1:0", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=harness.env(env),
        )
        running = Running(proc)
        started.append(running)
        listening = threading.Event()

        def read() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                running.lines.append(line)
                if not listening.is_set() and "serving probes and metrics" in line:
                    running.port = int(json.loads(line)["listen"].rsplit(":", 1)[1])
                    listening.set()
            listening.set()

        running.reader = threading.Thread(target=read, daemon=True)
        running.reader.start()
        assert listening.wait(30), "the probe server did not start"
        assert running.port, "the probe server did not start"
        return running

    try:
        yield start
    finally:
        for running in started:
            if running.proc.poll() is None:
                running.proc.terminate()
                try:
                    running.proc.wait(10)
                except subprocess.TimeoutExpired:
                    running.proc.kill()
                    running.proc.wait(10)
            if running.reader is not None:
                running.reader.join(5)
            if running.proc.stdout is not None:
                running.proc.stdout.close()
            harness.outputs.append("".join(running.lines))


# ---------------------------------------------------------------- the fake apiserver


@dataclass(frozen=True)
class Api:
    server: FakeApiServer
    env: dict[str, str]


@pytest.fixture
def api(harness: Harness) -> Iterator[Api]:
    """A fake apiserver serving namespace NS, and KUBECONFIG pointing at it."""
    with FakeApiServer(namespaces=(NS,)) as server:
        kubeconfig = server.write_kubeconfig(harness.root / "kubeconfig", namespace=NS)
        yield Api(server, {"KUBECONFIG": str(kubeconfig)})


def _secret_files(server: FakeApiServer) -> dict[str, str]:
    return {k: v.decode() for k, v in server.secret_data(NS, SECRET).items()}


# ================================================================ Exchange


@pytest.mark.parametrize(("flags", "ttl"), [((), 300), (("--jwt-ttl", "120"), 120)])
def test_the_jwt_exp_is_now_plus_jwt_ttl(
    harness: Harness, gateway: Gateway, flags: tuple[str, ...], ttl: int
) -> None:
    """SPEC, Exchange: the JWT carries `exp` = now + `--jwt-ttl` (default 300 s; integer
    seconds), as sent on the wire by the real CLI."""
    harness.start_emulator()
    result = harness.run(
        "check", "--credentials", str(harness.aem), "--online", *flags, *_via(gateway)
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (seen,) = gateway.seen
    assert seen.claims is not None
    exp = seen.claims["exp"]
    assert isinstance(exp, int)
    # Signed just before it was sent: exp - arrival is the ttl, less the time in between.
    assert ttl - 10 <= exp - seen.arrived <= ttl + 1, exp - seen.arrived


def test_a_rejected_client_is_retried_at_once_when_the_credentials_change(
    harness: Harness, run_with_probes: Any
) -> None:
    """SPEC, Exchange: "Do not hammer on a permanent rejection: retry it slowly, and at once
    when the credentials change" (here: kubelet swaps in the right client secret while
    `run` waits out the 300 s --permanent-retry-interval)."""
    emulator = harness.start_emulator()
    oauth = json.loads(harness.oauth.read_text())
    wrong = "p8e-" + "z" * 30
    harness.extra_secrets.append(wrong)
    fields = {"client_id": oauth["client_id"], "scopes": ",".join(oauth["scopes"])}
    mounted = keys.write_kubelet_secret(
        harness.root / "mounted", {**fields, "client_secret": wrong}, version=1
    )
    out = harness.root / "out"
    running = run_with_probes(
        *harness.args("run", mounted, "--token-dir", str(out), "--watch-interval", "0.2")[1:],
    )
    wait_until(lambda: emulator.stats()["rejected"].get("invalid_client", 0) >= 1, timeout=30)
    assert running.status("/readyz") == 503
    keys.swap_kubelet_secret(
        mounted, {**fields, "client_secret": oauth["client_secrets"][0]}, version=2
    )
    swapped = time.monotonic()
    wait_until(lambda: (out / "access_token").exists(), timeout=60)
    took = time.monotonic() - swapped
    harness.extra_secrets.append(read_token(out))
    assert took < 60  # far under the 300 s pause a rejection otherwise waits out
    wait_until(lambda: running.status("/readyz") == 200, timeout=10)
    stats = emulator.stats()
    assert stats["requests"]["oauth"] == 2, stats["requests"]
    assert stats["issued"] == 1
    assert "credentials_changed" in running.events()


# ================================================================ Schedule


def test_lifetime_counts_from_when_the_request_was_sent(harness: Harness, gateway: Gateway) -> None:
    """SPEC, Schedule: "Lifetime counts from the moment the request was sent (not when it
    returned)": an answer held 5 s yields issued_at and expires_at from the sending."""
    ttl = 600
    harness.start_emulator(token_ttl_s=ttl)
    gateway.delay_s = 5
    out = harness.root / "out"
    result = harness.run(
        "once", "--credentials", str(harness.oauth), "--token-dir", str(out), *_via(gateway)
    )
    assert result.returncode == 0, result.stderr
    harness.extra_secrets.append(read_token(out))
    (seen,) = gateway.seen
    assert seen.left - seen.arrived >= 5
    document = _token_json(out)
    issued, expires = _instant(document["issued_at"]), _instant(document["expires_at"])
    # Sent before the gateway saw it; the answer came >= 5 s after that. Whole seconds.
    assert issued <= seen.arrived + 1, issued - seen.arrived
    assert expires <= seen.arrived + ttl + 1, expires - seen.arrived
    assert expires >= seen.arrived + ttl - 10


def _scheduled(stdout: str) -> float:
    """The `refresh_scheduled` event's refresh_at, in POSIX seconds."""
    (event,) = [e for e in _events(stdout) if e.get("event") == "refresh_scheduled"]
    return _instant(event["refresh_at"])


@pytest.mark.parametrize(
    ("flags", "low", "high"),
    [((), 0.7, 0.8), (("--refresh-ratio", "0.5", "--jitter", "0"), 0.5, 0.5)],
)
def test_refresh_is_scheduled_at_ratio_minus_jitter_of_the_lifetime(
    harness: Harness, flags: tuple[str, ...], low: float, high: float
) -> None:
    """SPEC, Schedule: refresh when `--refresh-ratio` (default 0.8) of the lifetime has
    passed, made earlier by a random jitter of up to `--jitter` (default 0.1) of it."""
    lifetime = 1000
    harness.start_emulator(token_ttl_s=lifetime)
    out = harness.root / "out"
    result = harness.run(*harness.args("once", harness.oauth, "--token-dir", str(out), *flags))
    assert result.returncode == 0, result.stderr
    harness.extra_secrets.append(read_token(out))
    document = _token_json(out)
    issued = _instant(document["issued_at"])
    assert _instant(document["expires_at"]) - issued == pytest.approx(lifetime, abs=1)
    delay = _scheduled(result.stdout) - issued
    # Both instants are published to the whole second.
    assert low * lifetime - 1 <= delay <= high * lifetime + 1, delay


def test_run_restarted_adopts_the_published_token_and_is_ready(
    harness: Harness, run_with_probes: Any
) -> None:
    """SPEC, Schedule: "At start, a token already published (file ...) that is still valid
    and not yet due is adopted instead of minting a new one": a restarted `run` sidecar mints
    nothing and is ready with the token already in DIR."""
    emulator = harness.start_emulator()
    out = harness.root / "out"
    first = harness.run(*harness.args("once", harness.aem, "--token-dir", str(out)))
    assert first.returncode == 0, first.stderr
    token = read_token(out)
    harness.extra_secrets.append(token)
    running = run_with_probes(*harness.args("run", harness.aem, "--token-dir", str(out))[1:])
    wait_until(lambda: running.status("/readyz") == 200, timeout=30)
    wait_until(lambda: "refresh_scheduled" in running.events(), timeout=30)
    assert running.metric("refresher_adopted_total", source="file") == 1
    assert "token_adopted" in running.events()
    assert "token_minted" not in running.events()
    assert emulator.stats()["issued"] == 1
    assert read_token(out) == token


def test_a_token_adopted_from_the_secret_is_published_to_the_new_pods_dir(
    harness: Harness, api: Api
) -> None:
    """SPEC, Schedule and Secret: a token already in the shared Secret, valid and not due,
    is adopted instead of minting another; a second pod (its own empty token dir) gets that
    token in DIR, and the Secret holds the same three files as DIR (same content)."""
    emulator = harness.start_emulator()
    first_dir, second_dir = harness.root / "pod-1", harness.root / "pod-2"
    common = ("--secret", SECRET, "--secret-namespace", NS)
    first = harness.run(
        *harness.args("once", harness.oauth, *common, "--token-dir", str(first_dir)), env=api.env
    )
    assert first.returncode == 0, first.stderr
    harness.extra_secrets.append(read_token(first_dir))
    in_secret = _secret_files(api.server)
    for name in ("access_token", "expires_at", "token.json"):
        assert in_secret[name] == (first_dir / name).read_text(), name
    second = harness.run(
        *harness.args("once", harness.oauth, *common, "--token-dir", str(second_dir)), env=api.env
    )
    assert second.returncode == 0, second.stderr
    assert emulator.stats()["issued"] == 1
    assert read_token(second_dir) == in_secret["access_token"]
    assert _token_json(second_dir) == json.loads(in_secret["token.json"])
    assert api.server.requests["DELETE"] == 0


# ================================================================ Token directory


@pytest.mark.parametrize("flow", ["jwt", "oauth"])
def test_token_json_carries_the_spec_fields_in_seconds(harness: Harness, flow: str) -> None:
    """SPEC, Token directory: `access_token` raw without a newline, `expires_at` RFC 3339
    UTC, `token.json` with exactly its eight fields (`expires_in` in seconds for both flows,
    though the JWT exchange answers in milliseconds), files mode 0440 by default, each name
    a symlink through `..data` to a hidden snapshot."""
    lifetime = 600
    emulator = harness.start_emulator(token_ttl_s=lifetime)
    credentials = harness.aem if flow == "jwt" else harness.oauth
    out = harness.root / "out"
    result = harness.run(*harness.args("once", credentials, "--token-dir", str(out)))
    assert result.returncode == 0, result.stderr
    token = read_token(out)
    harness.extra_secrets.append(token)
    assert token == token.strip() and "\n" not in token
    document = _token_json(out)
    assert set(document) == TOKEN_JSON_KEYS
    assert document["access_token"] == token
    assert document["token_type"].lower() == "bearer"
    assert document["flow"] == flow
    if flow == "jwt":
        client_id = json.loads(credentials.read_text())["integration"]["technicalAccount"][
            "clientId"
        ]
    else:
        client_id = json.loads(credentials.read_text())["client_id"]
    assert document["client_id"] == client_id
    assert emulator.endpoint in document["ims_endpoint"]
    assert isinstance(document["expires_in"], int)
    assert lifetime - 2 <= document["expires_in"] <= lifetime
    assert (out / "expires_at").read_text() == document["expires_at"]
    issued, expires = _instant(document["issued_at"]), _instant(document["expires_at"])
    assert expires - issued == pytest.approx(document["expires_in"], abs=1)
    snapshot = out / (out / "..data").readlink()
    assert (out / "..data").is_symlink() and snapshot.name.startswith("..")
    for name in ("access_token", "expires_at", "token.json"):
        assert (out / name).is_symlink() and (out / name).readlink() == Path("..data") / name
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o440, name


def test_file_mode_flag_sets_the_published_files_mode(harness: Harness) -> None:
    """SPEC, Token directory: files are mode `--file-mode` (here 0444 instead of 0440)."""
    harness.start_emulator()
    out = harness.root / "out"
    result = harness.run(
        *harness.args("once", harness.oauth, "--token-dir", str(out), "--file-mode", "0444")
    )
    assert result.returncode == 0, result.stderr
    harness.extra_secrets.append(read_token(out))
    for name in ("access_token", "expires_at", "token.json"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o444, name


# ================================================================ --on-refresh


def _dumping_hook(dump: Path, *extra: str) -> str:
    """A hook command that writes its argv and the IMS_TOKEN_* environment to `dump`."""
    code = (
        "import json, os, sys; "
        f"json.dump({{'argv': sys.argv[1:], 'env': {{k: v for k, v in os.environ.items() "
        f"if k.startswith('IMS_TOKEN_')}}}}, open({str(dump)!r}, 'w'))"
    )
    return shlex.join([sys.executable, "-c", code, *extra])


def test_on_refresh_with_only_the_secret_sink_gets_an_empty_token_dir(
    harness: Harness, api: Api
) -> None:
    """SPEC, Notifying: the hook runs with `IMS_TOKEN_DIR` (empty when only the Secret sink
    is configured) and `IMS_TOKEN_EXPIRES_AT` in its environment."""
    harness.start_emulator()
    dump = harness.root / "hook.json"
    result = harness.run(
        *harness.args(
            "once",
            harness.oauth,
            "--secret",
            SECRET,
            "--secret-namespace",
            NS,
            "--on-refresh",
            _dumping_hook(dump),
        ),
        env=api.env,
    )
    assert result.returncode == 0, result.stderr
    files = _secret_files(api.server)
    harness.extra_secrets.append(files["access_token"])
    wait_until(dump.exists, timeout=20)
    assert json.loads(dump.read_text())["env"] == {
        "IMS_TOKEN_DIR": "",
        "IMS_TOKEN_EXPIRES_AT": files["expires_at"],
    }


def test_on_refresh_is_split_like_a_shell_but_run_without_one(harness: Harness) -> None:
    """SPEC, Notifying: CMD is "split like a shell would, but run without a shell": quotes
    group words, while `;`, `>`, `$VAR` and globs reach the program as literal arguments."""
    harness.start_emulator()
    out = harness.root / "out"
    dump = harness.root / "hook.json"
    marker = harness.root / "marker"
    redirected = harness.root / "redirected"
    literal = ["two words", "$IMS_TOKEN_DIR", ";", "touch", str(marker), ">", str(redirected), "*"]
    command = _dumping_hook(dump, *literal)
    result = harness.run(
        *harness.args("once", harness.oauth, "--token-dir", str(out), "--on-refresh", command)
    )
    assert result.returncode == 0, result.stderr
    harness.extra_secrets.append(read_token(out))
    wait_until(dump.exists, timeout=20)
    hook = json.loads(dump.read_text())
    assert hook["argv"] == literal
    assert hook["env"]["IMS_TOKEN_DIR"] == str(out)
    assert not marker.exists()
    assert not redirected.exists()


# ================================================================ Commands and environment


def test_check_summary_names_key_type_certificate_expiry_and_scopes(harness: Harness) -> None:
    """SPEC, Commands: `check` prints a summary without secrets: flow, client id, IMS host
    (the default ims-na1.adobelogin.com), scopes, key type and size, certificate expiry
    and days left."""
    aem = harness.run("check", "--credentials", str(harness.aem))
    assert aem.returncode == 0, aem.stderr
    report = dict(line.split(": ", 1) for line in aem.stdout.splitlines())
    assert report["key_type"] == "RSA"
    assert report["ims"] == "https://ims-na1.adobelogin.com"
    not_after = json.loads(harness.aem.read_text())["integration"]["certificateExpirationDate"]
    assert _instant(report["certificate_not_after"]) == pytest.approx(
        _instant(not_after[:19] + "Z"), abs=1
    )
    oauth = harness.run("check", "--credentials", str(harness.oauth))
    assert oauth.returncode == 0, oauth.stderr
    report = dict(line.split(": ", 1) for line in oauth.stdout.splitlines())
    document = json.loads(harness.oauth.read_text())
    assert report["flow"] == "oauth"
    assert report["client_id"] == document["client_id"]
    assert [s.strip() for s in report["scopes"].split(",")] == document["scopes"]


def test_inject_reads_its_image_from_the_shared_environment(harness: Harness) -> None:
    """SPEC, Commands: every flag also reads `REFRESHER_<FLAG>`, and one environment serves
    every subcommand: `inject` takes REFRESHER_IMAGE, `once` ignores it (not its flag)."""
    image = "registry.example.com/mirror/ims-token-refresher:9.9.9"
    document = pod(credentials_secret="adobe-ims-credentials")
    source = harness.root / "pod.yaml"
    source.write_text(yaml.safe_dump(document))
    injected = harness.run("inject", "-f", str(source), env={"REFRESHER_IMAGE": image})
    assert injected.returncode == 0, injected.stderr
    (out,) = yaml.safe_load_all(injected.stdout)
    assert template_of(out)["spec"]["initContainers"][0]["image"] == image
    harness.start_emulator()
    once = harness.run(
        *harness.args("once", harness.oauth, "--token-dir", str(harness.root / "out")),
        env={"REFRESHER_IMAGE": image},
    )
    assert once.returncode == 0, once.stderr
    harness.extra_secrets.append(read_token(harness.root / "out"))


# ================================================================ Logs


def test_log_format_text_and_log_level_reach_the_log_lines(harness: Harness) -> None:
    """SPEC, Logs: one JSON object per line by default, `--log-format json|text` and
    `--log-level`: text lines are plain `key=value` lines (not JSON), and at `warning` a
    clean `once` writes no info line."""
    harness.start_emulator()
    text = harness.run(
        *harness.args(
            "once", harness.oauth, "--token-dir", str(harness.root / "a"), "--log-format", "text"
        )
    )
    assert text.returncode == 0, text.stderr
    harness.extra_secrets.append(read_token(harness.root / "a"))
    lines = [line for line in text.stdout.splitlines() if line.strip()]
    assert lines
    for line in lines:
        with pytest.raises(ValueError):
            json.loads(line)
    assert any("event=published" in line for line in lines)
    quiet = harness.run(
        *harness.args(
            "once", harness.oauth, "--token-dir", str(harness.root / "b"), "--log-level", "warning"
        )
    )
    assert quiet.returncode == 0, quiet.stderr
    harness.extra_secrets.append(read_token(harness.root / "b"))
    assert quiet.stdout.strip() == ""
