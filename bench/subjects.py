"""What is measured: the refresher, its peers, and the IMS emulator they all talk to.

- the refresher as the container runs it: `refresher once`, and `refresher run` with
  its defaults (JSON logs at info, probes served, here on 127.0.0.1:0), to a file sink
  and to a file + Secret sink (tests/support/fakeapi.py's apiserver, through KUBECONFIG);
- the floor (bench/floor.py): `requests` + PyJWT doing the same exchange and nothing
  else, parsing the key once: the least any Python implementation pays;
- Adobe's own Node client, `@adobe/jwt-auth` (bench/peer_jwt_auth.js), installed from
  npm into bench/.node;
- the webhook, `refresher injector` (bench/injector.py);
- 0.1.0 itself (its `refresher/` exported from git, BASELINE_REV), beside today's
  refresher in the same run: `once`, and `run` to a file sink and to file + Secret
  sinks (without `--min-token-lifetime`, which 0.1.0 did not have: it took sub-second
  tokens as they came).

The emulator (`python -m ims_emulator`) is a process of its own, so its CPU is never
counted, and always this tree's, so that BENCH_SRC changes only the refresher.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from measuring import Workspace, stderr_of, tail

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
NODE_DIR = BENCH / ".node"
NODE_PACKAGE = "@adobe/jwt-auth@2"
PYTHON = Path(sys.executable)
REFRESHER = PYTHON.parent / "refresher"

# 0.1.0 as released (2026-11-26): measured beside today's refresher in the same run,
# so that "no figure worse than 0.1.0's" is judged on one machine at one time.
BASELINE_REV = "0935144"
BASELINE_LABEL = "0.1.0"

# The refresher logs this line after each publish: one per cycle.
REFRESHER_MARK = b'"next refresh scheduled"'
PEER_MARK = b"published "  # bench/floor.py and bench/peer_jwt_auth.js print this per token


class Emulator:
    """The IMS emulator as a process of its own, with fresh AEM credentials."""

    def __init__(self, space: Workspace, token_ttl_s: float) -> None:
        self.dir = space.path(f"emulator-{token_ttl_s:g}")
        self.dir.mkdir()
        port_file = self.dir / "port"
        argv = [str(PYTHON), "-m", "ims_emulator", "--port", "0", "--port-file", str(port_file)]
        argv += ["--write-credentials", str(self.dir / "creds"), "--token-ttl", f"{token_ttl_s:g}"]
        self.space = space
        self.process = space.spawn(argv, name="emulator", src=False, cwd=ROOT)
        deadline = time.monotonic() + 60
        while not port_file.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the emulator did not start:\n{stderr_of(self.process)}")
            time.sleep(0.05)
        self.base_url = f"http://127.0.0.1:{int(port_file.read_text())}"
        self.credentials = self.dir / "creds" / "aem-service-credentials.json"

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.base_url}/__emulator/stats", timeout=10) as answer:
            return json.load(answer)  # type: ignore[no-any-return]

    def stop(self) -> None:
        self.space.stop(self.process)


Argv = Callable[[Emulator, Path], list[str]]  # (emulator, output path) -> argv


@dataclass(frozen=True)
class Subject:
    """One kind of process under test and how to start it against an emulator."""

    key: str
    label: str
    argv: Argv
    data_link: bool  # publishes DIR/..data (the refresher) rather than one file (the peers)
    mark: bytes  # one stdout line holding this per published token
    secret: bool = False
    src: Path | None = None  # another refresher tree on PYTHONPATH (0.1.0, side by side)

    def target(self, out: Path) -> Path:
        return out / "..data" if self.data_link else out


def refresher(
    command: str,
    *,
    listen: bool = True,
    secret: str | None = None,
    min_lifetime_s: float | None = None,
) -> Argv:
    """`refresher once|run` with its defaults, plus only what the bench needs."""

    def argv(emulator: Emulator, out: Path) -> list[str]:
        args = [str(REFRESHER), command, "--credentials", str(emulator.credentials)]
        args += ["--ims-endpoint", emulator.base_url, "--allow-insecure-http"]
        args += ["--token-dir", str(out)]
        if listen:
            args += ["--listen", "127.0.0.1:0"]
        if min_lifetime_s is not None:  # sub-second tokens, for back-to-back cycles
            args += ["--min-token-lifetime", f"{min_lifetime_s:g}"]
        if secret is not None:
            args += ["--secret", f"{secret}-{out.name.split('-')[0]}"]
            args += ["--secret-namespace", "bench"]
        return args

    return argv


def floor(loop_s: float | None) -> Argv:
    def argv(emulator: Emulator, out: Path) -> list[str]:
        args = [str(PYTHON), str(BENCH / "floor.py"), "--credentials", str(emulator.credentials)]
        args += ["--ims", emulator.base_url, "--out", str(out)]
        return args + (["--loop", f"{loop_s:g}"] if loop_s is not None else [])

    return argv


class Lab:
    """The peers and sinks that could be set up here, and why one could not."""

    def __init__(self, space: Workspace) -> None:
        self.space = space
        self.node: list[str] | None = None  # argv prefix of the Node peer
        self.notes: dict[str, str] = {}
        self.api: Any = None
        self.kubeconfig: Path | None = None
        self.baseline: Path | None = None  # 0.1.0's refresher tree, when exported

    def node_argv(self, loop_s: float | None) -> Argv:
        def argv(emulator: Emulator, out: Path) -> list[str]:
            assert self.node is not None
            args = [*self.node, "--credentials", str(emulator.credentials)]
            args += ["--ims", emulator.base_url, "--out", str(out)]
            return args + (["--loop", f"{loop_s:g}"] if loop_s is not None else [])

        return argv

    def oneshots(self) -> dict[str, Subject]:
        """Process start to token published: floor, node, `refresher once`, `refresher run`."""
        found = {"floor": Subject("floor", "floor", floor(None), False, PEER_MARK)}
        if self.node is not None:
            found["node"] = Subject(
                "node", "@adobe/jwt-auth", self.node_argv(None), False, PEER_MARK
            )
        found["once"] = Subject(
            "once", "refresher once", refresher("once", listen=False), True, REFRESHER_MARK
        )
        found["run"] = Subject("run", "refresher run", refresher("run"), True, REFRESHER_MARK)
        if self.baseline is not None:
            found["v010_once"] = Subject(
                "v010_once",
                f"{BASELINE_LABEL} once",
                refresher("once", listen=False),
                True,
                REFRESHER_MARK,
                src=self.baseline,
            )
        return found

    def loops(
        self, loop_s: float | None, *, secret: bool = True, min_lifetime_s: float | None = None
    ) -> dict[str, Subject]:
        """Refreshing processes: floor, node, `refresher run` (file; file + Secret)."""
        found = {"floor": Subject("floor", "floor", floor(loop_s), False, PEER_MARK)}
        if self.node is not None:
            found["node"] = Subject(
                "node", "@adobe/jwt-auth", self.node_argv(loop_s), False, PEER_MARK
            )
        found["run"] = Subject(
            "run",
            "refresher run",
            refresher("run", min_lifetime_s=min_lifetime_s),
            True,
            REFRESHER_MARK,
        )
        if secret and self.api is not None:
            found["secret"] = Subject(
                "secret",
                "refresher run + Secret",
                refresher("run", secret="bench-token", min_lifetime_s=min_lifetime_s),
                True,
                REFRESHER_MARK,
                secret=True,
            )
        if self.baseline is not None:
            # 0.1.0 had no --min-token-lifetime: it took sub-second tokens as they came.
            found["v010"] = Subject(
                "v010",
                f"{BASELINE_LABEL} run",
                refresher("run"),
                True,
                REFRESHER_MARK,
                src=self.baseline,
            )
            if secret and self.api is not None:
                found["v010_secret"] = Subject(
                    "v010_secret",
                    f"{BASELINE_LABEL} run + Secret",
                    refresher("run", secret="bench-base"),
                    True,
                    REFRESHER_MARK,
                    secret=True,
                    src=self.baseline,
                )
        return found

    def spawn(
        self, subject: Subject, emulator: Emulator, out: Path, **kw: Any
    ) -> subprocess.Popen[bytes]:
        kubeconfig = self.kubeconfig if subject.secret else None
        return self.space.spawn(
            subject.argv(emulator, out),
            kubeconfig=kubeconfig,
            name=subject.key,
            src=subject.src or True,
            **kw,
        )

    # ------------------------------------------------------------------------- setup

    def install_node_peer(self) -> None:
        node, npm = shutil.which("node"), shutil.which("npm")
        if node is None or npm is None:
            self.notes["node"] = "node/npm not found: the Node peer is not measured"
            return
        package_json = NODE_DIR / "node_modules" / "@adobe" / "jwt-auth" / "package.json"
        if not package_json.exists():
            NODE_DIR.mkdir(parents=True, exist_ok=True)
            print(f"installing {NODE_PACKAGE} into {NODE_DIR.relative_to(ROOT)} ...", flush=True)
            command = [npm, "install", "--prefix", str(NODE_DIR), "--no-audit", "--no-fund"]
            try:
                subprocess.run(
                    [*command, NODE_PACKAGE], check=True, capture_output=True, timeout=300
                )
            except (subprocess.SubprocessError, OSError) as exc:
                detail = (getattr(exc, "stderr", b"") or b"").decode(errors="replace")
                self.notes["node"] = (
                    f"npm install {NODE_PACKAGE} failed (registry unreachable?): the Node peer "
                    f"is not measured. {detail.strip()[-200:]}"
                )
                return
        self.node = [node, str(BENCH / "peer_jwt_auth.js")]

    def check_node_peer(self, emulator: Emulator) -> None:
        """Run the library unmodified; if the emulator refuses its multipart body, shim it."""
        if self.node is None:
            return
        out = self.space.path("node-probe")
        child = self.space.spawn(self.node_argv(None)(emulator, out), name="node-probe")
        if child.wait(60) == 0:
            return
        reason = stderr_of(child)
        if "Content-Type" not in reason:
            self.notes["node"] = f"the Node peer failed ({reason.strip()[-200:]}): not measured"
            self.node = None
            return
        self.node = [*self.node, "--urlencoded"]
        self.notes["node"] = (
            "`@adobe/jwt-auth` posts its form as multipart/form-data, which Adobe IMS accepts "
            "but the emulator rejects (`400 bad_request: Content-Type must be "
            "application/x-www-form-urlencoded`). The peer therefore runs with `--urlencoded`: "
            "the library's `form-data` dependency is replaced by a URL-encoded body with the "
            "same fields; claims, signing, HTTP stack and parsing remain the library's."
        )

    def start_fake_apiserver(self) -> None:
        candidates = [ROOT / "tests" / "support" / "fakeapi.py", ROOT / "tests" / "fakeapi.py"]
        path = next((p for p in candidates if p.exists()), candidates[-1])
        try:
            spec = importlib.util.spec_from_file_location("bench_fakeapi", path)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
            api = module.FakeApiServer(("bench",))
            api.__enter__()
            self.kubeconfig = api.write_kubeconfig(
                self.space.work / "kubeconfig", namespace="bench"
            )
            self.api = api
        except Exception as exc:
            self.notes["secret"] = f"the fake apiserver ({path}) could not start: {exc!r}"

    def close(self) -> None:
        if self.api is not None:
            with contextlib.suppress(Exception):
                self.api.__exit__(None, None, None)


def compile_sources(space: Workspace, *more: Path) -> None:
    """Byte-compile the refresher ahead, as the image does (`compileall` in the Dockerfile)."""
    for tree in [space.src or ROOT, *more]:
        subprocess.run(
            [str(PYTHON), "-m", "compileall", "-q", str(tree / "refresher")],
            check=True,
            env=space.env(),
            cwd=ROOT,
        )


def emulator_log(emulator: Emulator) -> str:
    return tail(emulator.process.stderr_path)  # type: ignore[attr-defined]
