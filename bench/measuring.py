"""Measuring processes from outside: /proc samples, timings, and the statistics of a figure.

Every subject is a whole process; nothing here knows what a subject is. CPU is the
sum over every thread of the first field of /proc/PID/task/*/schedstat (nanoseconds:
the tick counts of /proc/PID/stat are too coarse for an idle process); memory is
VmRSS / VmHWM from /proc/PID/status.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import tempfile
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

MIB = 1024.0  # KiB per MiB, and MiB per GiB


@dataclass(frozen=True)
class Sample:
    """One look at a process: CPU of all its live threads, memory, context switches."""

    at: float
    cpu_ns: int
    rss_kib: int
    hwm_kib: int
    switches: int


def status(pid: int) -> dict[str, str]:
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
    fields = status(pid)
    return Sample(at, cpu_ns, _kib(fields["VmRSS"]), _kib(fields["VmHWM"]), switches)


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def tail(path: Path, lines: int = 8) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# ----------------------------------------------------------------------------- statistics


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile: p99 of 100 values is the 99th, never an interpolation."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))]


@dataclass(frozen=True)
class Summary:
    """A figure over its runs: the median, and the spread as min-max."""

    median: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Summary | None:
        if not values:
            return None
        return cls(statistics.median(values), min(values), max(values), len(values))


def paired_ratios(ours: Sequence[float], theirs: Sequence[float]) -> Summary | None:
    """Ratio of run i to run i of the peer (same round, so the same noise), summarised.

    The median of the per-round ratios cancels slow drifts of the machine's load that a
    ratio of two medians would keep.
    """
    pairs = [a / b for a, b in zip(ours, theirs, strict=False) if b]
    return Summary.of(pairs)


# ----------------------------------------------------------------------------- processes


class Workspace:
    """Scratch directory, the children's environment, and every process started (for cleanup)."""

    def __init__(self, *, src: Path | None, keep: bool, node_path: Path) -> None:
        self.src = src
        self.keep = keep
        self.node_path = node_path
        self.work = Path(tempfile.mkdtemp(prefix="ims-bench-"))
        self.children: list[subprocess.Popen[bytes]] = []
        self._serial = 0

    def path(self, stem: str) -> Path:
        self._serial += 1
        return self.work / f"{self._serial:04d}-{stem}"

    def env(self, *, kubeconfig: Path | None = None, src: bool | Path = True) -> dict[str, str]:
        """The children's environment; `src` a tree puts that refresher on PYTHONPATH."""
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("REFRESHER_", "IMS_EMULATOR_", "BENCH_"))
            and k.upper() not in ("KUBECONFIG", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")
        }
        # As in the image: bytecode is compiled ahead, not at every start.
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env.pop("PYTHONPATH", None)
        env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
        env["NODE_PATH"] = str(self.node_path)
        if isinstance(src, Path):
            env["PYTHONPATH"] = str(src)
        elif src and self.src is not None:
            env["PYTHONPATH"] = str(self.src)
        if kubeconfig is not None:
            env["KUBECONFIG"] = str(kubeconfig)
        return env

    def spawn(
        self,
        argv: Sequence[str],
        *,
        stdout: int | IO[Any] = subprocess.DEVNULL,
        kubeconfig: Path | None = None,
        name: str = "proc",
        src: bool | Path = True,
        cwd: Path | None = None,
    ) -> subprocess.Popen[bytes]:
        stderr_path = self.path(f"{name}.stderr")
        with stderr_path.open("wb") as stderr:
            child = subprocess.Popen(
                list(argv),
                stdout=stdout,
                stderr=stderr,
                stdin=subprocess.DEVNULL,
                env=self.env(kubeconfig=kubeconfig, src=src),
                cwd=cwd or self.work,
            )
        child.stderr_path = stderr_path  # type: ignore[attr-defined]
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
        if self.keep:
            print(f"kept {self.work}")
        else:
            shutil.rmtree(self.work, ignore_errors=True)


def name_of(child: subprocess.Popen[bytes]) -> str:
    """The start of a child's command line, for error messages."""
    return shlex.join(str(arg) for arg in list(child.args)[:3])  # type: ignore[arg-type]


def stderr_of(child: subprocess.Popen[bytes]) -> str:
    return tail(child.stderr_path)  # type: ignore[attr-defined]


def time_to_publish(
    space: Workspace, argv: list[str], target: Path, *, oneshot: bool
) -> dict[str, float]:
    """Wall time from just before fork/exec to `target` appearing (and to exit, if one-shot).

    Polled every 0.5 ms. One-shot processes also give their CPU (user + system, from
    wait4) and peak RSS (ru_maxrss); long-running ones their VmHWM at publish.
    """
    started = time.perf_counter()
    child = space.spawn(argv, name="startup")
    published = exited = None
    usage = None
    deadline = started + 120
    while True:
        now = time.perf_counter()
        if published is None and os.path.lexists(target):
            published = now - started
            if not oneshot:
                break
        pid, wait_status, rusage = os.wait4(child.pid, os.WNOHANG)
        if pid:
            exited, usage = time.perf_counter() - started, rusage
            child.returncode = os.waitstatus_to_exitcode(wait_status)
            if published is None and os.path.lexists(target):
                published = exited
            break
        if now > deadline:
            space.stop(child)
            raise RuntimeError(f"{shlex.join(argv[:3])} published nothing within 120 s")
        time.sleep(0.0005)
    if published is None or (oneshot and child.returncode != 0):
        raise RuntimeError(f"{shlex.join(argv[:3])} exited {child.returncode}:\n{stderr_of(child)}")
    figures = {"publish_ms": published * 1000}
    if oneshot:
        assert usage is not None and exited is not None
        figures |= {
            "exit_ms": exited * 1000,
            "cpu_ms": (usage.ru_utime + usage.ru_stime) * 1000,
            "hwm_mib": usage.ru_maxrss / MIB,
        }
    else:
        figures["hwm_mib"] = sample(child.pid).hwm_kib / MIB
    space.stop(child)
    return figures


def wait_for_paths(
    children: Sequence[tuple[subprocess.Popen[bytes], Path]], timeout_s: float
) -> None:
    """Wait until every child's published path exists; a child that exits is an error."""
    deadline = time.monotonic() + timeout_s
    for child, target in children:
        while not os.path.lexists(target):
            if child.poll() is not None:
                raise RuntimeError(
                    f"{name_of(child)} exited {child.returncode}:\n{stderr_of(child)}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name_of(child)} published nothing in time")
            time.sleep(0.02)


class Follower:
    """Reads a child's stdout, counts lines holding `mark`, samples /proc at chosen counts."""

    def __init__(self, child: subprocess.Popen[bytes], mark: bytes, at: Sequence[int]) -> None:
        self.child = child
        self.mark = mark
        self.at = set(at)
        self.target = max(at)
        self.count = 0
        self.samples: dict[int, Sample] = {}
        # Another process followed alongside (the floor, sharing the machine's noise),
        # sampled at the same instants: (its sample, its count of marks then).
        self.beside: Follower | None = None
        self.beside_samples: dict[int, tuple[Sample, int]] = {}
        self.done = threading.Event()
        self.last_lines: deque[bytes] = deque(maxlen=10)
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
                        if self.beside is not None:
                            other = self.beside
                            self.beside_samples[self.count] = (sample(other.child.pid), other.count)
                if self.count >= self.target:
                    self.done.set()
            else:
                self.last_lines.append(line)
        self.done.set()

    def wait(self, timeout_s: float) -> None:
        if not self.done.wait(timeout_s) or self.count < self.target:
            raise RuntimeError(
                f"{name_of(self.child)}: {self.count} of {self.target} cycles; "
                f"last lines:\n{b''.join(self.last_lines).decode(errors='replace')}\n"
                f"{stderr_of(self.child)}"
            )

    def between(self, first: int, last: int) -> tuple[Sample, Sample]:
        return self.samples[first], self.samples[last]
