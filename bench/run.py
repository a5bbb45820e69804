"""Benchmarks of the refresher side by side with its peers, on the IMS emulator (`make bench`).

Every process is measured as a whole process, from outside, against the built-in IMS
emulator on loopback (a process of its own, so its CPU is never counted):

- the refresher (`refresher once` and `refresher run`, as the container runs them);
- the floor (bench/floor.py): `requests` + PyJWT doing the same exchange and nothing
  else, the least any Python implementation pays;
- Adobe's own Node client, `@adobe/jwt-auth` (bench/peer_jwt_auth.js), installed from
  npm into bench/.node by this script.

Figures are medians over several runs, each absolute and as a ratio to the peers
measured in the same run. Memory is VmHWM / VmRSS from /proc/PID/status; CPU is the
sum over every thread of the first field of /proc/PID/task/*/schedstat (nanoseconds;
the tick counts in /proc/PID/stat are too coarse for an idle process).

Environment knobs:
  BENCH_QUICK=1    a smoke run (fewer runs, short windows, 1,000 instead of 10,000 cycles)
  BENCH_ONLY=a,b   only these sections: startup, memory, idle, cycles, long, imports
  BENCH_SRC=DIR    run the refresher from another source tree (a scratch copy with a
                   proposed change), by PYTHONPATH; the emulator stays this tree's
  BENCH_OUT=FILE   write the Markdown report here. By default a full run of all sections
                   on this tree writes docs/benchmarks.md, and any other run writes nothing
  BENCH_KEEP=1     keep the scratch directory (logs of every process) for inspection
"""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib.metadata
import importlib.util
import itertools
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import types
import urllib.request
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
NODE_DIR = BENCH / ".node"
NODE_PACKAGE = "@adobe/jwt-auth@2"
PYTHON = Path(sys.executable)
REFRESHER = PYTHON.parent / "refresher"
DOC = ROOT / "docs" / "benchmarks.md"
SECTIONS = ("startup", "memory", "idle", "cycles", "long", "imports")

# The refresher logs this line after each publish (service.py, `_accept`): one per cycle.
REFRESHER_MARK = b'"next refresh scheduled"'
PEER_MARK = b"published "
MIB = 1024.0


@dataclass(frozen=True)
class Plan:
    """How much to measure; `BENCH_QUICK=1` shrinks everything for a smoke run."""

    runs: int = 5
    memory_window_s: float = 12.0
    memory_ttl_s: float = 2.0  # the refresher refreshes every ~1.5 s; the peers loop at 1.5 s
    idle_window_s: float = 60.0
    idle_settle_s: float = 5.0
    cycle_ttl_s: float = 0.2
    cycle_warmup: int = 20
    cycles: int = 200
    long_ttl_s: float = 0.02
    long_cycles: int = 10_000
    long_window: int = 1_000

    @classmethod
    def quick(cls) -> Plan:
        return cls(
            runs=3,
            memory_window_s=4.0,
            idle_window_s=5.0,
            idle_settle_s=2.0,
            cycle_warmup=5,
            cycles=30,
            long_cycles=1_000,
            long_window=100,
        )


# ----------------------------------------------------------------------------- /proc


@dataclass(frozen=True)
class Sample:
    """One look at a process: CPU of all its live threads, memory, context switches."""

    at: float
    cpu_ns: int
    rss_kib: int
    hwm_kib: int
    switches: int


def _status(pid: int) -> dict[str, str]:
    fields = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as handle:
        for line in handle:
            name, _, value = line.partition(":")
            fields[name] = value.strip()
    return fields


def _kib(value: str) -> int:
    return int(value.split(maxsplit=1)[0])


def sample(pid: int) -> Sample:
    at = time.perf_counter()
    cpu_ns = switches = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        # A thread may end between listdir and open: it simply no longer counts.
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            with open(f"/proc/{pid}/task/{tid}/schedstat", encoding="ascii") as handle:
                cpu_ns += int(handle.read().split()[0])
            with open(f"/proc/{pid}/task/{tid}/status", encoding="ascii") as handle:
                for line in handle:
                    if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                        switches += int(line.split(":")[1])
    status = _status(pid)
    return Sample(at, cpu_ns, _kib(status["VmRSS"]), _kib(status["VmHWM"]), switches)


# ----------------------------------------------------------------------------- processes


class Bench:
    """Scratch directory, child environment, and every process started, for cleanup."""

    def __init__(self, plan: Plan, src: Path | None) -> None:
        self.plan = plan
        self.src = src
        self.work = Path(tempfile.mkdtemp(prefix="ims-bench-"))
        self.children: list[subprocess.Popen[bytes]] = []
        self.node: list[str] | None = None  # argv prefix of the Node peer, None if unavailable
        self.node_note = ""
        self.api: Any = None  # the fake Kubernetes API server, if it could be loaded
        self.kubeconfig: Path | None = None
        self.secret_note = ""
        self._serial = 0

    def path(self, stem: str) -> Path:
        self._serial += 1
        return self.work / f"{self._serial:04d}-{stem}"

    def env(self, *, kubeconfig: Path | None = None) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("REFRESHER_")
            and k.upper() not in ("KUBECONFIG", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")
        }
        # As in the image: bytecode is compiled ahead (see `compile`), not at every start.
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
        env["NODE_PATH"] = str(NODE_DIR / "node_modules")
        if self.src is not None:
            env["PYTHONPATH"] = str(self.src)
        if kubeconfig is not None:
            env["KUBECONFIG"] = str(kubeconfig)
        return env

    def spawn(
        self,
        argv: Sequence[str],
        *,
        stdout: int | TextIO = subprocess.DEVNULL,
        kubeconfig: Path | None = None,
        name: str = "proc",
    ) -> subprocess.Popen[bytes]:
        stderr = self.path(f"{name}.stderr").open("wb")
        try:
            child = subprocess.Popen(
                list(argv),
                stdout=stdout,
                stderr=stderr,
                stdin=subprocess.DEVNULL,
                env=self.env(kubeconfig=kubeconfig),
                cwd=self.work,
            )
        finally:
            stderr.close()
        child.stderr_path = Path(stderr.name)  # type: ignore[attr-defined]
        self.children.append(child)
        return child

    def stop(self, child: subprocess.Popen[bytes], timeout_s: float = 10.0) -> int | None:
        if child.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signal.SIGTERM)
            try:
                child.wait(timeout_s)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        if child in self.children:
            self.children.remove(child)
        return child.returncode

    def close(self) -> None:
        for child in list(self.children):
            self.stop(child, 5.0)
        if self.api is not None:
            with contextlib.suppress(Exception):
                self.api.__exit__(None, None, None)
        if os.environ.get("BENCH_KEEP") == "1":
            print(f"kept {self.work}")
        else:
            shutil.rmtree(self.work, ignore_errors=True)


def _tail(path: Path, lines: int = 8) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class Emulator:
    """`refresher emulator` as a process of its own, with fresh AEM credentials."""

    def __init__(self, bench: Bench, token_ttl_s: float) -> None:
        self.dir = bench.path(f"emulator-{token_ttl_s:g}")
        port_file = self.dir / "port"
        self.dir.mkdir()
        argv = [str(PYTHON), "-m", "ims_emulator", "--port", "0"]
        argv += ["--port-file", str(port_file), "--write-credentials", str(self.dir / "creds")]
        argv += ["--token-ttl", f"{token_ttl_s:g}"]
        # This tree's emulator whatever BENCH_SRC says: the reference stays the same.
        env = bench.env()
        env.pop("PYTHONPATH", None)
        stderr = (self.dir / "emulator.log").open("wb")
        self.process = subprocess.Popen(
            argv,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=ROOT,
        )
        stderr.close()
        bench.children.append(self.process)
        deadline = time.monotonic() + 60
        while not port_file.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"the emulator did not start:\n{_tail(self.dir / 'emulator.log')}"
                )
            time.sleep(0.05)
        self.base_url = f"http://127.0.0.1:{int(port_file.read_text())}"
        self.credentials = self.dir / "creds" / "aem-service-credentials.json"

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.base_url}/__emulator/stats", timeout=10) as answer:
            return json.load(answer)


# ----------------------------------------------------------------------------- the subjects


@dataclass(frozen=True)
class Subject:
    """One kind of process under test and how to start it against an emulator."""

    key: str
    label: str
    argv: Callable[[Emulator, Path], list[str]]  # (emulator, output path) -> argv
    published: Callable[[Path], Path]  # output path -> the path that appears on publish
    mark: bytes
    secret: bool = False


def refresher_argv(
    command: str, *, listen: bool, secret: str | None = None
) -> Callable[..., list[str]]:
    def argv(emulator: Emulator, out: Path) -> list[str]:
        args = [str(REFRESHER), command, "--credentials", str(emulator.credentials)]
        args += ["--ims-endpoint", emulator.base_url, "--allow-insecure-http"]
        args += ["--token-dir", str(out)]
        if listen:
            args += ["--listen", "127.0.0.1:0"]
        if secret is not None:
            args += [
                "--secret",
                f"{secret}-{out.name.split('-')[0]}",
                "--secret-namespace",
                "bench",
            ]
        return args

    return argv


def floor_argv(loop_s: float | None) -> Callable[[Emulator, Path], list[str]]:
    def argv(emulator: Emulator, out: Path) -> list[str]:
        args = [str(PYTHON), str(BENCH / "floor.py"), "--credentials", str(emulator.credentials)]
        args += ["--ims", emulator.base_url, "--out", str(out)]
        return args + (["--loop", f"{loop_s:g}"] if loop_s is not None else [])

    return argv


def node_argv(bench: Bench, loop_s: float | None) -> Callable[[Emulator, Path], list[str]]:
    def argv(emulator: Emulator, out: Path) -> list[str]:
        assert bench.node is not None
        args = [*bench.node, "--credentials", str(emulator.credentials)]
        args += ["--ims", emulator.base_url, "--out", str(out)]
        return args + (["--loop", f"{loop_s:g}"] if loop_s is not None else [])

    return argv


def _data_link(out: Path) -> Path:
    return out / "..data"


def _same(out: Path) -> Path:
    return out


def subjects(bench: Bench, loop_s: float | None, *, secret: bool = True) -> dict[str, Subject]:
    """floor, node, refresher run (file), refresher run (file + Secret); loops every loop_s."""
    found = {"floor": Subject("floor", "floor", floor_argv(loop_s), _same, PEER_MARK)}
    if bench.node is not None:
        found["node"] = Subject(
            "node", "@adobe/jwt-auth", node_argv(bench, loop_s), _same, PEER_MARK
        )
    found["run"] = Subject(
        "run", "refresher run", refresher_argv("run", listen=True), _data_link, REFRESHER_MARK
    )
    if secret and bench.api is not None:
        found["secret"] = Subject(
            "secret",
            "refresher run + Secret",
            refresher_argv("run", listen=True, secret="bench-token"),
            _data_link,
            REFRESHER_MARK,
            secret=True,
        )
    return found


# ----------------------------------------------------------------------------- setup


def install_node_peer(bench: Bench) -> None:
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        bench.node_note = "node/npm not found: the Node peer is not measured"
        return
    package_json = NODE_DIR / "node_modules" / "@adobe" / "jwt-auth" / "package.json"
    if not package_json.exists():
        NODE_DIR.mkdir(parents=True, exist_ok=True)
        print(f"installing {NODE_PACKAGE} into {NODE_DIR.relative_to(ROOT)} ...", flush=True)
        try:
            subprocess.run(
                [
                    npm,
                    "install",
                    "--prefix",
                    str(NODE_DIR),
                    "--no-audit",
                    "--no-fund",
                    NODE_PACKAGE,
                ],
                check=True,
                capture_output=True,
                timeout=300,
            )
        except (subprocess.SubprocessError, OSError) as exc:
            detail = getattr(exc, "stderr", b"") or b""
            bench.node_note = (
                f"npm install {NODE_PACKAGE} failed (registry unreachable?): the Node peer is "
                f"not measured. {detail.decode(errors='replace').strip()[-200:]}"
            )
            return
    bench.node = [node, str(BENCH / "peer_jwt_auth.js")]


def check_node_peer(bench: Bench, emulator: Emulator) -> None:
    """Run the library unmodified; if the emulator refuses its multipart body, say so and shim."""
    if bench.node is None:
        return
    out = bench.path("node-probe")
    child = bench.spawn(node_argv(bench, None)(emulator, out), name="node-probe")
    code = child.wait(60)
    if code == 0:
        return
    reason = _tail(child.stderr_path)  # type: ignore[attr-defined]
    if "Content-Type" not in reason:
        bench.node_note = f"the Node peer failed ({reason.strip()[-200:]}): not measured"
        bench.node = None
        return
    bench.node = [*bench.node, "--urlencoded"]
    bench.node_note = (
        "`@adobe/jwt-auth` posts its form as multipart/form-data, which Adobe IMS accepts but "
        "the emulator rejects (`400 bad_request: Content-Type must be "
        "application/x-www-form-urlencoded`). The peer therefore runs with `--urlencoded`: "
        "the library's `form-data` dependency is replaced by a URL-encoded body with the same "
        "fields; claims, signing, HTTP stack and parsing remain the library's."
    )


def start_fake_apiserver(bench: Bench) -> None:
    path = ROOT / "tests" / "fakeapi.py"
    try:
        spec = importlib.util.spec_from_file_location("bench_fakeapi", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        api = module.FakeApiServer(("bench",))
        api.__enter__()
        bench.kubeconfig = api.write_kubeconfig(bench.work / "kubeconfig", namespace="bench")
        bench.api = api
    except Exception as exc:
        bench.secret_note = f"the fake apiserver (tests/fakeapi.py) could not start: {exc!r}"


def compile_sources(bench: Bench) -> None:
    """Byte-compile the refresher ahead, as the image does (`compileall` in the Dockerfile)."""
    tree = (bench.src or ROOT) / "refresher"
    subprocess.run(
        [str(PYTHON), "-m", "compileall", "-q", str(tree)], check=True, env=bench.env(), cwd=ROOT
    )


# ----------------------------------------------------------------------------- measurements


@dataclass
class Results:
    startup: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    memory: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    idle: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    cycles: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    long: dict[str, Any] = field(default_factory=dict)
    imports: dict[str, Any] = field(default_factory=dict)


def _add(table: dict[str, dict[str, list[float]]], key: str, metric: str, value: float) -> None:
    table.setdefault(key, {}).setdefault(metric, []).append(value)


def measure_publish(
    bench: Bench, argv: list[str], target: Path, *, oneshot: bool
) -> dict[str, float]:
    """Wall time from just before fork/exec to `target` appearing (and to exit, if one-shot)."""
    started = time.perf_counter()
    child = bench.spawn(argv, name="startup")
    published = exited = None
    usage = None
    deadline = started + 120
    while True:
        now = time.perf_counter()
        if published is None and os.path.lexists(target):
            published = now - started
            if not oneshot:
                break
        pid, status, rusage = os.wait4(child.pid, os.WNOHANG)
        if pid:
            exited, usage = time.perf_counter() - started, rusage
            child.returncode = os.waitstatus_to_exitcode(status)
            if published is None and os.path.lexists(target):
                published = exited
            break
        if now > deadline:
            bench.stop(child)
            raise RuntimeError(f"{argv[:2]} published nothing within 120 s")
        time.sleep(0.0005)
    if published is None:
        raise RuntimeError(
            f"{shlex.join(argv[:3])} exited {child.returncode} without publishing:\n"
            f"{_tail(child.stderr_path)}"  # type: ignore[attr-defined]
        )
    figures = {"publish_ms": published * 1000}
    if oneshot:
        assert usage is not None and exited is not None
        if child.returncode != 0:
            raise RuntimeError(f"{shlex.join(argv[:3])} exited {child.returncode}")
        figures |= {
            "exit_ms": exited * 1000,
            "cpu_ms": (usage.ru_utime + usage.ru_stime) * 1000,
            "hwm_mib": usage.ru_maxrss / MIB,
        }
    else:
        figures["hwm_mib"] = sample(child.pid).hwm_kib / MIB
    bench.stop(child)
    return figures


def section_startup(bench: Bench, results: Results) -> None:
    """Process start to token published: one-shot peers, `refresher once`, `refresher run`."""
    emulator = Emulator(bench, 86400)
    check_node_peer(bench, emulator)
    kinds: list[tuple[str, Callable[[Emulator, Path], list[str]], bool]] = [
        ("floor", floor_argv(None), True),
        ("once", refresher_argv("once", listen=False), True),
        ("run", refresher_argv("run", listen=True), False),
    ]
    if bench.node is not None:
        kinds.insert(1, ("node", node_argv(bench, None), True))
    for round_ in range(bench.plan.runs + 1):  # round 0 warms caches and is not counted
        # Rotate the order so that no kind always runs right after another.
        order = kinds[round_ % len(kinds) :] + kinds[: round_ % len(kinds)]
        for key, argv, oneshot in order:
            out = bench.path(key)
            target = out / "..data" if key in ("once", "run") else out
            figures = measure_publish(bench, argv(emulator, out), target, oneshot=oneshot)
            if round_ > 0:
                for metric, value in figures.items():
                    _add(results.startup, key, metric, value)
        print(f"  startup round {round_}/{bench.plan.runs} done", flush=True)
    bench.stop(emulator.process)


def _count_marks(path: Path, mark: bytes) -> int:
    return path.read_bytes().count(mark)


def _wait_published(bench: Bench, children: list[tuple[Any, ...]], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    for child, target, *_ in children:
        while not os.path.lexists(target):
            if child.poll() is not None:
                raise RuntimeError(
                    f"{shlex.join(child.args[:3])} exited {child.returncode}:\n"
                    f"{_tail(child.stderr_path)}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(f"{shlex.join(child.args[:3])} published nothing in time")
            time.sleep(0.02)


def _start_group(
    bench: Bench, emulator: Emulator, kinds: dict[str, Subject], count: int
) -> list[tuple[subprocess.Popen[bytes], Path, str, Path]]:
    started = []
    for key, subject in kinds.items():
        for _ in range(count):
            out = bench.path(key)
            stdout_path = bench.path(f"{key}.stdout")
            with stdout_path.open("wb") as stdout:
                child = bench.spawn(
                    subject.argv(emulator, out),
                    stdout=stdout,
                    kubeconfig=bench.kubeconfig if subject.secret else None,
                    name=key,
                )
            started.append((child, subject.published(out), key, stdout_path))
    return started


def section_memory(bench: Bench, results: Results) -> None:
    """Peak and steady RSS while refreshing every ~1.5 s; each kind's runs side by side."""
    plan = bench.plan
    emulator = Emulator(bench, plan.memory_ttl_s)
    loop_s = round(plan.memory_ttl_s * 0.75, 3)  # the refresher's mean: 0.8 minus half the jitter
    for key, subject in subjects(bench, loop_s).items():
        group = _start_group(bench, emulator, {key: subject}, plan.runs)
        _wait_published(bench, group, 120)
        time.sleep(plan.memory_window_s)
        for child, _, _, stdout_path in group:
            last = sample(child.pid)
            _add(results.memory, key, "rss_mib", last.rss_kib / MIB)
            _add(results.memory, key, "hwm_mib", last.hwm_kib / MIB)
            bench.stop(child)
            _add(results.memory, key, "refreshes", _count_marks(stdout_path, subject.mark))
        print(f"  memory: {key} done", flush=True)
    bench.stop(emulator.process)


def section_idle(bench: Bench, results: Results) -> None:
    """CPU and wake-ups over a window with a day-long token; every instance side by side."""
    plan = bench.plan
    emulator = Emulator(bench, 86400)
    kinds = subjects(bench, 86400.0)
    group = _start_group(bench, emulator, kinds, plan.runs)
    _wait_published(bench, group, 120)
    time.sleep(plan.idle_settle_s)
    first = {child.pid: sample(child.pid) for child, *_ in group}
    time.sleep(plan.idle_window_s)
    for child, _, key, _ in group:
        end, start = sample(child.pid), first[child.pid]
        seconds = end.at - start.at
        _add(results.idle, key, "millicores", (end.cpu_ns - start.cpu_ns) / 1e6 / seconds)
        _add(results.idle, key, "wakeups_per_s", (end.switches - start.switches) / seconds)
        _add(results.idle, key, "rss_mib", end.rss_kib / MIB)
        bench.stop(child)
    print("  idle done", flush=True)
    bench.stop(emulator.process)


class Follower:
    """Reads a child's stdout, counts publish marks, samples /proc at chosen counts."""

    def __init__(self, child: subprocess.Popen[bytes], mark: bytes, at: Sequence[int]) -> None:
        self.child = child
        self.mark = mark
        self.at = set(at)
        self.target = max(at)
        self.count = 0
        self.samples: dict[int, Sample] = {}
        self.done = threading.Event()
        self.tail: deque[bytes] = deque(maxlen=10)
        self._thread = threading.Thread(target=self._follow, daemon=True)
        self._thread.start()

    def _follow(self) -> None:
        assert self.child.stdout is not None
        for line in self.child.stdout:
            if self.mark in line:
                self.count += 1
                if self.count in self.at:
                    with contextlib.suppress(OSError):
                        self.samples[self.count] = sample(self.child.pid)
                if self.count >= self.target:
                    self.done.set()
            else:
                self.tail.append(line)
        self.done.set()

    def wait(self, timeout_s: float) -> None:
        if not self.done.wait(timeout_s) or self.count < self.target:
            raise RuntimeError(
                f"{shlex.join(self.child.args[:3])}: {self.count} of {self.target} cycles; "
                f"last lines:\n{b''.join(self.tail).decode(errors='replace')}\n"
                f"{_tail(self.child.stderr_path)}"  # type: ignore[attr-defined]
            )


def _follow(bench: Bench, subject: Subject, emulator: Emulator, at: Sequence[int]) -> Follower:
    child = bench.spawn(
        subject.argv(emulator, bench.path(subject.key)),
        stdout=subprocess.PIPE,
        kubeconfig=bench.kubeconfig if subject.secret else None,
        name=subject.key,
    )
    return Follower(child, subject.mark, at)


def section_cycles(bench: Bench, results: Results) -> None:
    """CPU per refresh cycle with short tokens, after a warm-up; the peers alongside."""
    plan = bench.plan
    emulator = Emulator(bench, plan.cycle_ttl_s)
    loop_s = round(plan.cycle_ttl_s * 0.75, 3)
    kinds = subjects(bench, loop_s, secret=False)
    at = (plan.cycle_warmup, plan.cycle_warmup + plan.cycles)
    expected_s = (plan.cycle_warmup + plan.cycles) * plan.cycle_ttl_s
    for round_ in range(plan.runs):
        followers = {key: _follow(bench, subject, emulator, at) for key, subject in kinds.items()}
        try:
            for key, follower in followers.items():
                follower.wait(expected_s * 3 + 60)
                start, end = follower.samples[at[0]], follower.samples[at[1]]
                _add(results.cycles, key, "cpu_ms", (end.cpu_ns - start.cpu_ns) / 1e6 / plan.cycles)
                _add(results.cycles, key, "rss_mib", end.rss_kib / MIB)
                _add(results.cycles, key, "cycle_s", (end.at - start.at) / plan.cycles)
        finally:
            for follower in followers.values():
                bench.stop(follower.child)
        print(f"  cycles round {round_ + 1}/{plan.runs} done", flush=True)
    bench.stop(emulator.process)


def section_long(bench: Bench, results: Results) -> None:
    """Many back-to-back cycles with very short tokens: is CPU per cycle, or RSS, growing?"""
    plan = bench.plan
    emulator = Emulator(bench, plan.long_ttl_s)
    subject = subjects(bench, None, secret=False)["run"]
    at = [1 + k * plan.long_window for k in range(plan.long_cycles // plan.long_window + 1)]
    follower = _follow(bench, subject, emulator, at)
    try:
        follower.wait(plan.long_cycles * 0.2 + 120)
    finally:
        bench.stop(follower.child)
    windows = []
    for begin, end in itertools.pairwise(at):
        a, b = follower.samples[begin], follower.samples[end]
        windows.append(
            {
                "cycles": f"{begin}-{end - 1}",
                "cpu_ms": (b.cpu_ns - a.cpu_ns) / 1e6 / plan.long_window,
                "wall_ms": (b.at - a.at) * 1000 / plan.long_window,
                "rss_mib": b.rss_kib / MIB,
                "hwm_mib": b.hwm_kib / MIB,
            }
        )
    stats = emulator.stats()
    results.long = {
        "windows": windows,
        "first_rss_mib": follower.samples[at[0]].rss_kib / MIB,
        "issued": stats.get("issued"),
        "rejected": stats.get("rejected"),
    }
    print("  long run done", flush=True)
    bench.stop(emulator.process)


def _imported(stderr: str) -> list[str]:
    names = []
    for line in stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            if name != "imported package":
                names.append(name)
    return names


def section_imports(bench: Bench, results: Results) -> None:
    """Which modules each mode imports (`-X importtime`): no `kubernetes` without --secret."""
    emulator = Emulator(bench, 86400)
    modes = {"once": ("once", None), "run": ("run", None)}
    if bench.api is not None:
        modes["secret"] = ("run", "bench-imports")
    for key, (command, secret) in modes.items():
        out = bench.path(key)
        argv = refresher_argv(command, listen=command == "run", secret=secret)(emulator, out)
        child = bench.spawn(
            [str(PYTHON), "-X", "importtime", *argv],
            kubeconfig=bench.kubeconfig if secret else None,
            name=f"imports-{key}",
        )
        deadline = time.monotonic() + 60
        while not os.path.lexists(out / "..data") and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(1.0)  # whatever the loop imports after its first publish counts too
        bench.stop(child)
        names = _imported(child.stderr_path.read_text(errors="replace"))  # type: ignore[attr-defined]
        results.imports[key] = {
            "modules": len(names),
            "kubernetes": sum(1 for n in names if n.split(".")[0] == "kubernetes"),
            "refresher": sorted(n for n in names if n.split(".")[0] == "refresher"),
        }
    bench.stop(emulator.process)


# ----------------------------------------------------------------------------- report


def med(values: Sequence[float] | None) -> float | None:
    return statistics.median(values) if values else None


def _fmt(value: float | None, unit: str, digits: int) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f} {unit}".strip()


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "n/a"
    return f"{a / b:.2f}x"


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("meets" if ok else "**misses**")


@dataclass
class Row:
    metric: str
    ours: float | None
    floor: float | None
    node: float | None
    unit: str
    digits: int
    goal: str = ""
    ok: bool | None = None
    spread: str = ""


def _spread(values: Sequence[float] | None, digits: int) -> str:
    if not values:
        return ""
    return f"{min(values):.{digits}f}-{max(values):.{digits}f} (n={len(values)})"


def build_rows(r: Results, plan: Plan) -> list[Row]:
    rows: list[Row] = []

    def row(
        metric: str,
        table: dict[str, dict[str, list[float]]],
        key: str,
        name: str,
        unit: str,
        digits: int,
        goal: str = "",
        check: Callable[[float, float | None], bool] | None = None,
    ) -> None:
        """One figure of `key` (a refresher mode) beside the same figure of both peers."""
        values = table.get(key, {}).get(name)
        ours = med(values)
        floor = med(table.get("floor", {}).get(name))
        node = med(table.get("node", {}).get(name))
        ok = None if check is None or ours is None else check(ours, floor)
        rows.append(Row(metric, ours, floor, node, unit, digits, goal, ok, _spread(values, digits)))

    def times(limit: float) -> Callable[[float, float | None], bool]:
        return lambda ours, floor: floor is not None and ours <= limit * floor

    def at_most(limit: float) -> Callable[[float, float | None], bool]:
        return lambda ours, _floor: ours <= limit

    s, m, i, c = r.startup, r.memory, r.idle, r.cycles
    if s:
        row(
            "start -> token published: `refresher once`",
            s,
            "once",
            "publish_ms",
            "ms",
            0,
            "<= 1.15x floor",
            times(1.15),
        )
        row(
            "start -> `..data`: `refresher run`",
            s,
            "run",
            "publish_ms",
            "ms",
            0,
            "<= 1.3x floor",
            times(1.3),
        )
        row("start -> exit, one-shot: `refresher once`", s, "once", "exit_ms", "ms", 0)
        row("CPU of a one-shot exchange: `refresher once`", s, "once", "cpu_ms", "ms", 0)
        row("peak RSS of a one-shot exchange: `refresher once`", s, "once", "hwm_mib", "MiB", 1)
    if m:
        row(
            "steady RSS, refreshing, file sink (peers: loops)",
            m,
            "run",
            "rss_mib",
            "MiB",
            1,
            "<= 1.1x floor loop",
            times(1.1),
        )
        row("peak RSS (VmHWM), refreshing, file sink", m, "run", "hwm_mib", "MiB", 1)
        if "secret" in m:
            row(
                "steady RSS, refreshing, file + Secret sinks",
                m,
                "secret",
                "rss_mib",
                "MiB",
                1,
                "<= 60 MiB",
                at_most(60),
            )
            row("peak RSS (VmHWM), file + Secret sinks", m, "secret", "hwm_mib", "MiB", 1)
    if r.imports:
        file_only = [r.imports[k]["kubernetes"] for k in ("once", "run") if k in r.imports]
        counts = ", ".join(f"{k}: {v['modules']} modules" for k, v in r.imports.items())
        worst = float(max(file_only)) if file_only else None
        ok = None if worst is None else worst == 0
        rows.append(
            Row(
                "`kubernetes` modules imported, file sink only",
                worst,
                None,
                None,
                "",
                0,
                "0",
                ok,
                counts,
            )
        )
    if i:
        row(
            f"idle CPU, {plan.idle_window_s:g} s, day-long token, file sink",
            i,
            "run",
            "millicores",
            "mcores",
            3,
            "<= 0.1",
            at_most(0.1),
        )
        if "secret" in i:
            row("idle CPU, file + Secret sinks", i, "secret", "millicores", "mcores", 3)
        row("idle wake-ups (context switches), file sink", i, "run", "wakeups_per_s", "/s", 2)
        row("idle RSS, day-long token, file sink", i, "run", "rss_mib", "MiB", 1)
    if c:
        row(
            f"CPU per refresh cycle ({plan.cycles} cycles, {plan.cycle_ttl_s:g} s tokens)",
            c,
            "run",
            "cpu_ms",
            "ms",
            2,
            "<= 10 ms",
            at_most(10),
        )
    if r.long:
        first, last = r.long["windows"][0], r.long["windows"][-1]
        n, total = plan.long_window, plan.long_cycles
        growth = last["cpu_ms"] / first["cpu_ms"]
        rows.append(
            Row(
                f"CPU per cycle, last {n:,} of {total:,} cycles",
                last["cpu_ms"],
                None,
                None,
                "ms",
                2,
                "flat: <= 1.1x first",
                growth <= 1.1,
                f"first {n:,}: {first['cpu_ms']:.2f} ms ({growth:.2f}x)",
            )
        )
        delta = last["rss_mib"] - first["rss_mib"]
        rows.append(
            Row(
                f"RSS after {total:,} cycles",
                last["rss_mib"],
                None,
                None,
                "MiB",
                1,
                "flat: growth <= 1 MiB",
                delta <= 1.0,
                f"after {n:,}: {first['rss_mib']:.1f} MiB ({delta:+.1f} MiB)",
            )
        )
    return rows


def render_table(rows: list[Row], node_label: str) -> str:
    head = [
        "metric",
        "refresher",
        "floor",
        node_label,
        "vs floor",
        f"vs {node_label}",
        "goal",
        "verdict",
        "refresher spread",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [
            row.metric,
            _fmt(row.ours, row.unit, row.digits),
            _fmt(row.floor, row.unit, row.digits),
            _fmt(row.node, row.unit, row.digits),
            _ratio(row.ours, row.floor),
            _ratio(row.ours, row.node),
            row.goal,
            _verdict(row.ok) if row.goal else "",
            row.spread,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _node_versions() -> dict[str, str]:
    versions = {}
    node = shutil.which("node")
    if node:
        versions["node"] = subprocess.run(
            [node, "--version"], capture_output=True, text=True
        ).stdout.strip()
    modules = NODE_DIR / "node_modules"
    for name in ("@adobe/jwt-auth", "jsonwebtoken", "node-fetch", "form-data"):
        with contextlib.suppress(OSError, ValueError):
            versions[name] = json.loads((modules / name / "package.json").read_text())["version"]
    return versions


def _python_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for dist in (
        "ims-token-refresher",
        "requests",
        "urllib3",
        "PyJWT",
        "cryptography",
        "tenacity",
        "prometheus-client",
        "kubernetes",
    ):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[dist] = importlib.metadata.version(dist)
    return versions


def _git_revision(src: Path | None) -> str:
    tree = src or ROOT
    try:
        head = subprocess.run(
            ["git", "-C", str(tree), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(tree), "status", "--porcelain", "--", "refresher"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (subprocess.SubprocessError, OSError):
        return "unknown"
    return head + (" + uncommitted changes in refresher/" if dirty else "")


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _mem_total() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return f"{int(line.split()[1]) / MIB / MIB:.1f} GiB"
    return "unknown"


def render_doc(results: Results, rows: list[Row], meta: dict[str, Any], plan: Plan) -> str:
    node_label = "@adobe/jwt-auth"
    uname = platform.uname()
    lines = [
        "# Benchmarks",
        "",
        "Generated by `make bench` (`bench/run.py`); do not edit by hand. The refresher, the",
        "floor (`bench/floor.py`: `requests` + PyJWT doing the same JWT exchange and nothing",
        "else) and Adobe's own Node client (`bench/peer_jwt_auth.js` around `@adobe/jwt-auth`)",
        "run as whole processes against the built-in IMS emulator on loopback, which runs as a",
        "process of its own (its CPU is not counted). Medians over the runs; ratios are",
        "refresher / peer, measured in the same run.",
        "",
        f"- date: {meta['date']}" + (" (BENCH_QUICK=1 smoke run)" if meta["quick"] else ""),
        f"- machine: `{uname.system} {uname.release} {uname.machine}`, {os.cpu_count()} CPUs "
        f"({_cpu_model()}), {_mem_total()} RAM; load average {meta['load_start']} at start, "
        f"{meta['load_end']} at end (other work shared the machine)",
        f"- refresher: {meta['revision']}" + (f", from {meta['src']}" if meta["src"] else ""),
        "- Python: " + ", ".join(f"{k} {v}" for k, v in meta["python"].items()),
        "- Node: " + (", ".join(f"{k} {v}" for k, v in meta["node"].items()) or "not available"),
        f"- wall time of the whole benchmark: {meta['elapsed_s'] / 60:.1f} min",
        "",
        "## Results",
        "",
        render_table(rows, node_label),
        "",
    ]
    if results.long:
        lines += [
            f"## {plan.long_cycles:,} back-to-back cycles "
            f"({plan.long_ttl_s:g} s tokens), per window",
            "",
            f"RSS after the first cycle: {results.long['first_rss_mib']:.1f} MiB. "
            "The emulator issued "
            f"{results.long['issued']} tokens (rejected: {results.long['rejected'] or 'none'}).",
            "",
            "| cycles | CPU per cycle | wall per cycle | RSS at end | VmHWM at end |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {w['cycles']} | {w['cpu_ms']:.2f} ms | {w['wall_ms']:.2f} ms "
            f"| {w['rss_mib']:.1f} MiB "
            f"| {w['hwm_mib']:.1f} MiB |"
            for w in results.long["windows"]
        ]
        lines.append("")
    if results.imports:
        lines += ["## Imports (`python -X importtime`, until one second after `..data`)", ""]
        for key, info in results.imports.items():
            label = {"secret": "run --secret"}.get(key, key)
            lines.append(
                f"- `refresher {label}`: {info['modules']} modules in all, "
                f"{info['kubernetes']} of them `kubernetes.*`, {len(info['refresher'])} "
                "of the refresher's own"
            )
        lines.append("")
    lines += [
        "## How each figure is measured",
        "",
        f"- **start -> token published**: wall time from just before fork/exec to the token "
        f"appearing (`DIR/..data` for the refresher, the output file for the peers, which write "
        f"it with temp file + fsync + rename), polled every 0.5 ms; {plan.runs} rounds after one "
        f"warm-up round, the order rotated each round. One-shot peers also give time to exit, CPU "
        f"(user + system, from wait4) and peak RSS (ru_maxrss). The refresher is byte-compiled "
        f"ahead, as in the image.",
        f"- **steady / peak RSS**: VmRSS / VmHWM after {plan.memory_window_s:g} s of refreshing "
        f"(emulator tokens of {plan.memory_ttl_s:g} s: the refresher refreshes every ~"
        f"{plan.memory_ttl_s * 0.75:g} s, the peers loop every {plan.memory_ttl_s * 0.75:g} s); "
        f"{plan.runs} instances of each kind side by side. Secret mode publishes to the fake "
        f"apiserver of tests/fakeapi.py (in the benchmark's own process) through KUBECONFIG.",
        f"- **idle CPU**: with a day-long token, {plan.runs} instances of every kind side by side, "
        f"{plan.idle_settle_s:g} s after the first publish; the sum over every thread of the first "
        f"field of /proc/PID/task/*/schedstat (ns) at the start and the end of a "
        f"{plan.idle_window_s:g} s window; 1 millicore = 1 ms of CPU per second. Wake-ups: "
        f"voluntary + involuntary context switches of all threads over the same window.",
        f"- **CPU per refresh cycle**: emulator tokens of {plan.cycle_ttl_s:g} s, default "
        f"--refresh-ratio/--jitter; schedstat sum between the {plan.cycle_warmup}th and the "
        f"{plan.cycle_warmup + plan.cycles}th publish (counted from the process's own log line / "
        f"output line), divided by {plan.cycles}; {plan.runs} rounds, the three kinds side by "
        "side. "
        f"A cycle is: re-read credentials, sign, exchange, publish, log.",
        f"- **{plan.long_cycles:,} cycles**: emulator tokens of {plan.long_ttl_s:g} s so that "
        f"cycles run back to back; CPU and RSS sampled at every {plan.long_window:,}th publish. "
        f"Flat means: CPU per cycle of the last window <= 1.1x the first, RSS growth <= 1 MiB.",
        "- Every process is what a pod runs: the refresher with its defaults (JSON logs at "
        "info, probes served, here on 127.0.0.1:0); the floor and the Node peer re-read the "
        "credentials file on every cycle too. The emulator sets TCP_NODELAY on its connections: "
        "without it each exchange on a kept-alive connection stalls ~40 ms (Nagle + delayed "
        "ACK), which IMS does not do; CPU figures do not depend on it, loop wall times do.",
        "- Other work shared this 2-CPU machine (see the load average): wall times are the "
        "noisiest figures; CPU time and memory much less so.",
        "",
        "## Commands",
        "",
        "```",
        *meta["commands"],
        "```",
    ]
    if meta["node_note"]:
        lines += ["", f"Node peer: {meta['node_note']}"]
    if meta["secret_note"]:
        lines += ["", f"Secret sink: {meta['secret_note']}"]
    return "\n".join(lines) + "\n"


def _commands(bench: Bench) -> list[str]:
    # Placeholders in place of a running emulator: the argv builders read only these two.
    emu: Any = types.SimpleNamespace(
        credentials=Path("CREDS/aem-service-credentials.json"), base_url="http://127.0.0.1:PORT"
    )
    out = Path("OUT")
    lines = [
        "make bench                                   # = .venv/bin/python bench/run.py",
        "python -m ims_emulator --port 0 --port-file F --write-credentials CREDS --token-ttl S"
        "   # = refresher emulator ...",
        shlex.join(floor_argv(None)(emu, out)).replace(str(ROOT) + "/", ""),
        shlex.join(floor_argv(1.5)(emu, out)).replace(str(ROOT) + "/", ""),
    ]
    if bench.node is not None:
        lines.append(
            "NODE_PATH=bench/.node/node_modules "
            + shlex.join(node_argv(bench, 1.5)(emu, out)).replace(str(ROOT) + "/", "")
        )
    lines += [
        shlex.join(refresher_argv("once", listen=False)(emu, out)).replace(str(ROOT) + "/", ""),
        shlex.join(refresher_argv("run", listen=True)(emu, out)).replace(str(ROOT) + "/", ""),
        "KUBECONFIG=FAKE "
        + shlex.join(refresher_argv("run", listen=True, secret="NAME")(emu, out)).replace(
            str(ROOT) + "/", ""
        ),
        "python -X importtime .venv/bin/refresher run|once ...",
    ]
    return lines


def main() -> int:
    quick = os.environ.get("BENCH_QUICK") == "1"
    plan = Plan.quick() if quick else Plan()
    only = [s.strip() for s in os.environ.get("BENCH_ONLY", "").split(",") if s.strip()]
    unknown = set(only) - set(SECTIONS)
    if unknown:
        print(f"bench: unknown BENCH_ONLY section(s) {sorted(unknown)}; choose from {SECTIONS}")
        return 2
    src = Path(os.environ["BENCH_SRC"]).resolve() if os.environ.get("BENCH_SRC") else None
    out_env = os.environ.get("BENCH_OUT")
    out = Path(out_env) if out_env else (DOC if not quick and not only and src is None else None)
    sections = only or list(SECTIONS)

    started = time.monotonic()
    bench = Bench(plan, src)
    results = Results()
    meta: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "quick": quick,
        "src": str(src) if src else "",
        "load_start": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
    }
    try:
        compile_sources(bench)
        install_node_peer(bench)
        if bench.node_note:
            print(f"note: {bench.node_note}")
        if {"memory", "idle", "imports"} & set(sections):
            start_fake_apiserver(bench)
            if bench.secret_note:
                print(f"note: {bench.secret_note}")
        if "startup" not in sections and bench.node is not None:
            probe = Emulator(bench, 86400)
            check_node_peer(bench, probe)
            bench.stop(probe.process)
        steps: dict[str, Callable[[Bench, Results], None]] = {
            "startup": section_startup,
            "imports": section_imports,
            "memory": section_memory,
            "idle": section_idle,
            "cycles": section_cycles,
            "long": section_long,
        }
        for name, step in steps.items():
            if name in sections:
                print(f"{name} ...", flush=True)
                step(bench, results)
        meta.update(
            revision=_git_revision(src),
            python=_python_versions(),
            node=_node_versions() if bench.node is not None else {},
            node_note=bench.node_note,
            secret_note=bench.secret_note,
            commands=_commands(bench),
            load_end=" ".join(Path("/proc/loadavg").read_text().split()[:3]),
            elapsed_s=time.monotonic() - started,
        )
    finally:
        bench.close()
    rows = build_rows(results, plan)
    print()
    print(render_table(rows, "@adobe/jwt-auth"))
    if results.long:
        print()
        for w in results.long["windows"]:
            print(
                f"  cycles {w['cycles']}: {w['cpu_ms']:.2f} ms CPU/cycle, "
                f"{w['wall_ms']:.1f} ms wall/cycle, RSS {w['rss_mib']:.1f} MiB"
            )
    if out is not None:
        out.write_text(render_doc(results, rows, meta, plan), encoding="utf-8")
        print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
