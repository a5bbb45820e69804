"""The figures: each section starts its subjects, measures them, and stores the runs.

Comparisons are made in one run. Wall-time and CPU figures run the subjects one after
the other, interleaved (A B C A B C ..., the order rotated each round), so that each
round's subjects share the machine's noise and a per-round ratio cancels it. Memory and
idle figures run every instance side by side in one window: neither depends on CPU
contention, and a window per subject would multiply the run time.
"""

from __future__ import annotations

import itertools
import os
import re
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import injector
from measuring import MIB, Follower, sample, time_to_publish, wait_for_paths
from subjects import PYTHON, Emulator, Lab, Subject, refresher


@dataclass(frozen=True)
class Plan:
    """How much to measure; `quick()` runs every subject briefly, to check the harness."""

    runs: int = 5
    startup_runs: int = 15  # cheap (~1 s a round) and the noisiest figure: more rounds
    memory_window_s: float = 12.0
    memory_ttl_s: float = 2.0  # the refresher refreshes every ~1.5 s; the peers loop at 1.5 s
    idle_runs: int = 10  # a wake-up's cost differs from process to process: more of them
    idle_window_s: float = 120.0
    idle_settle_s: float = 5.0
    cycle_ttl_s: float = 0.1
    cycle_warmup: int = 20
    cycles: int = 100
    long_ttl_s: float = 0.02
    long_cycles: int = 10_000
    long_window: int = 1_000
    min_lifetime_s: float = 0.001  # --min-token-lifetime for the sub-second tokens above
    webhook_single: int = 2000
    webhook_paced_s: float = 10.0
    webhook_interval_s: float = 0.1  # 50 clients: 500 reviews/s offered
    webhook_closed: int = 10_000
    webhook_rounds: int = 3

    @classmethod
    def quick(cls) -> Plan:
        return cls(
            runs=2,
            startup_runs=2,
            memory_window_s=5.0,
            idle_runs=2,
            idle_window_s=5.0,
            idle_settle_s=2.0,
            cycle_warmup=5,
            cycles=20,
            long_cycles=500,
            long_window=100,
            webhook_single=300,
            webhook_paced_s=3.0,
            webhook_closed=2000,
            webhook_rounds=1,
        )


@dataclass
class Results:
    """runs[section][metric][subject]: one value per run, in run order (pairs align)."""

    runs: dict[str, dict[str, dict[str, list[float]]]] = field(default_factory=dict)
    long: dict[str, Any] = field(default_factory=dict)
    imports: dict[str, Any] = field(default_factory=dict)
    webhook: dict[str, Any] = field(default_factory=dict)

    def add(self, section: str, subject: str, figures: dict[str, float]) -> None:
        table = self.runs.setdefault(section, {})
        for metric, value in figures.items():
            table.setdefault(metric, {}).setdefault(subject, []).append(value)

    def values(self, section: str, metric: str, subject: str) -> list[float]:
        return self.runs.get(section, {}).get(metric, {}).get(subject, [])


Section = Callable[[Lab, Plan, Results], None]


def _rotated(items: list[Any], round_: int) -> list[Any]:
    shift = round_ % len(items)
    return items[shift:] + items[:shift]


def startup(lab: Lab, plan: Plan, results: Results) -> None:
    """Process start to token published (and to exit, for one-shots), interleaved."""
    emulator = Emulator(lab.space, 86400)
    lab.check_node_peer(emulator)
    kinds = list(lab.oneshots().values())
    for round_ in range(plan.startup_runs + 1):  # round 0 warms caches and is not counted
        for subject in _rotated(kinds, round_):
            out = lab.space.path(subject.key)
            figures = time_to_publish(
                lab.space,
                subject.argv(emulator, out),
                subject.target(out),
                oneshot=subject.key != "run",
            )
            if round_ > 0:
                results.add("startup", subject.key, figures)
        print(f"  startup round {round_}/{plan.startup_runs}", flush=True)
    emulator.stop()


def _side_by_side(
    lab: Lab, emulator: Emulator, kinds: dict[str, Subject], count: int
) -> list[tuple[Subject, subprocess.Popen[bytes], Path]]:
    """`count` instances of every kind, interleaved at start; stdout kept for counting."""
    group, targets = [], []
    for _, subject in itertools.product(range(count), kinds.values()):
        stdout_path = lab.space.path(f"{subject.key}.stdout")
        out = lab.space.path(subject.key)
        with stdout_path.open("wb") as stdout:
            child = lab.spawn(subject, emulator, out, stdout=stdout)
        group.append((subject, child, stdout_path))
        targets.append((child, subject.target(out)))
    wait_for_paths(targets, 120)
    return group


def memory(lab: Lab, plan: Plan, results: Results) -> None:
    """Steady and peak RSS after refreshing for a while; every instance side by side."""
    emulator = Emulator(lab.space, plan.memory_ttl_s)
    loop_s = round(plan.memory_ttl_s * 0.75, 3)  # the refresher's mean: 0.8 less half the jitter
    group = _side_by_side(lab, emulator, lab.loops(loop_s), plan.runs)
    time.sleep(plan.memory_window_s)
    for subject, child, stdout_path in group:
        last = sample(child.pid)
        lab.space.stop(child)
        refreshes = stdout_path.read_bytes().count(subject.mark) - 1  # less the first publish
        figures = {"rss_mib": last.rss_kib / MIB, "hwm_mib": last.hwm_kib / MIB}
        results.add("memory", subject.key, figures | {"refreshes": refreshes})
    print("  memory done", flush=True)
    emulator.stop()


def idle(lab: Lab, plan: Plan, results: Results) -> None:
    """CPU and wake-ups over a window with a day-long token; every instance side by side."""
    emulator = Emulator(lab.space, 86400)
    group = _side_by_side(lab, emulator, lab.loops(86400.0), plan.idle_runs)
    time.sleep(plan.idle_settle_s)
    first = {child.pid: sample(child.pid) for _, child, _ in group}
    time.sleep(plan.idle_window_s)
    for subject, child, _ in group:
        end, start = sample(child.pid), first[child.pid]
        seconds = end.at - start.at
        figures = {
            "millicores": (end.cpu_ns - start.cpu_ns) / 1e6 / seconds,
            "wakeups_per_s": (end.switches - start.switches) / seconds,
            "rss_mib": end.rss_kib / MIB,
        }
        results.add("idle", subject.key, figures)
        lab.space.stop(child)
    print("  idle done", flush=True)
    emulator.stop()


def _follow(lab: Lab, subject: Subject, emulator: Emulator, at: list[int]) -> Follower:
    child = lab.spawn(subject, emulator, lab.space.path(subject.key), stdout=subprocess.PIPE)
    return Follower(child, subject.mark, at)


def cycles(lab: Lab, plan: Plan, results: Results) -> None:
    """CPU per refresh cycle with short tokens, after a warm-up; interleaved runs."""
    emulator = Emulator(lab.space, plan.cycle_ttl_s)
    loop_s = round(plan.cycle_ttl_s * 0.75, 3)
    kinds = list(lab.loops(loop_s, secret=False, min_lifetime_s=plan.min_lifetime_s).values())
    at = [plan.cycle_warmup, plan.cycle_warmup + plan.cycles]
    timeout_s = at[1] * plan.cycle_ttl_s * 5 + 60
    for round_ in range(plan.runs):
        for subject in _rotated(kinds, round_):
            follower = _follow(lab, subject, emulator, at)
            try:
                follower.wait(timeout_s)
            finally:
                lab.space.stop(follower.child)
            start, end = follower.between(*at)
            figures = {
                "cpu_ms": (end.cpu_ns - start.cpu_ns) / 1e6 / plan.cycles,
                "cycle_ms": (end.at - start.at) * 1000 / plan.cycles,
                "rss_mib": end.rss_kib / MIB,
            }
            results.add("cycles", subject.key, figures)
        print(f"  cycles round {round_ + 1}/{plan.runs}", flush=True)
    emulator.stop()


def long(lab: Lab, plan: Plan, results: Results) -> None:
    """Many back-to-back cycles with very short tokens: is CPU per cycle, or RSS, growing?"""
    emulator = Emulator(lab.space, plan.long_ttl_s)
    kinds = lab.loops(round(plan.long_ttl_s * 0.75, 3), secret=False)
    subject = lab.loops(None, secret=False, min_lifetime_s=plan.min_lifetime_s)["run"]
    at = [1 + k * plan.long_window for k in range(plan.long_cycles // plan.long_window + 1)]
    # The floor loops alongside for the whole run and is sampled at the same instants: a
    # minute of a busier machine raises both, and the ratio of the two cancels it.
    floor = _follow(lab, kinds["floor"], emulator, [10**9])
    follower = _follow(lab, subject, emulator, at)
    follower.beside = floor
    try:
        follower.wait(plan.long_cycles * 0.2 + 120)
    finally:
        lab.space.stop(follower.child)
        lab.space.stop(floor.child)
    windows: list[dict[str, Any]] = []
    for begin, end in itertools.pairwise(at):
        a, b = follower.between(begin, end)
        (fa, fa_count), (fb, fb_count) = (follower.beside_samples[k] for k in (begin, end))
        cpu_ms = (b.cpu_ns - a.cpu_ns) / 1e6 / plan.long_window
        floor_ms = (fb.cpu_ns - fa.cpu_ns) / 1e6 / max(1, fb_count - fa_count)
        windows.append(
            {
                "cycles": f"{begin}-{end - 1}",
                "cpu_ms": cpu_ms,
                "floor_cpu_ms": floor_ms,
                "vs_floor": cpu_ms / floor_ms if floor_ms else float("nan"),
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
    first, last = windows[0], windows[-1]
    figures = {
        "last_cpu_ms": last["cpu_ms"],
        "cpu_growth": last["cpu_ms"] / first["cpu_ms"],
        # Less sensitive to one noisy window: the last three against the 2nd to 4th.
        "cpu_trend": statistics.median(w["cpu_ms"] for w in windows[-3:])
        / statistics.median(w["cpu_ms"] for w in windows[1:4]),
        # The same, of CPU per cycle relative to the floor's in the same window: growth of
        # the refresher's own, with the machine's drift over the run cancelled.
        "vs_floor_trend": statistics.median(w["vs_floor"] for w in windows[-3:])
        / statistics.median(w["vs_floor"] for w in windows[1:4]),
        "rss_mib": last["rss_mib"],
        "rss_growth_mib": last["rss_mib"] - first["rss_mib"],
    }
    results.add("long", "run", figures)
    print("  long run done", flush=True)
    emulator.stop()


_IMPORT_LINE = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)")


def parse_importtime(stderr: str) -> list[tuple[str, int]]:
    """(module, self microseconds) of every `-X importtime` line."""
    return [(m.group(4), int(m.group(1))) for m in _IMPORT_LINE.finditer(stderr)]


def by_package(modules: list[tuple[str, int]]) -> list[tuple[str, int, int]]:
    """(top-level package, modules, self microseconds summed), costliest first."""
    totals: dict[str, list[int]] = {}
    for name, own in modules:
        entry = totals.setdefault(name.split(".")[0], [0, 0])
        entry[0] += 1
        entry[1] += own
    return sorted(((k, n, us) for k, (n, us) in totals.items()), key=lambda t: -t[2])


def imports(lab: Lab, plan: Plan, results: Results) -> None:
    """Which modules each mode imports, and what they cost (`-X importtime`)."""
    emulator = Emulator(lab.space, 86400)
    modes: dict[str, tuple[str, str | None]] = {"once": ("once", None), "run": ("run", None)}
    if lab.api is not None:
        modes["secret"] = ("run", "bench-imports")
    for key, (command, secret) in modes.items():
        out = lab.space.path(key)
        argv = refresher(command, listen=command == "run", secret=secret)(emulator, out)
        child = lab.space.spawn(
            [str(PYTHON), "-X", "importtime", *argv],
            kubeconfig=lab.kubeconfig if secret else None,
            name=f"imports-{key}",
        )
        deadline = time.monotonic() + 60
        while not os.path.lexists(out / "..data") and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(1.0)  # whatever the loop imports after its first publish counts too
        lab.space.stop(child)
        text = child.stderr_path.read_text(errors="replace")  # type: ignore[attr-defined]
        modules = parse_importtime(text)
        packages = by_package(modules)
        counts = {name: n for name, n, _ in packages}
        figures = {
            "modules": len(modules),
            "kubernetes": counts.get("kubernetes", 0),
            "import_ms": sum(us for _, us in modules) / 1000,
        }
        results.add("imports", key, figures)
        results.imports[key] = packages[:10]
    print("  imports done", flush=True)
    emulator.stop()


def webhook(lab: Lab, plan: Plan, results: Results) -> None:
    """The injector over TLS: one client, 50 paced clients, 50 closed-loop clients."""
    paced = max(1, round(plan.webhook_paced_s / plan.webhook_interval_s))
    loads = [
        injector.Load("single", 1, plan.webhook_single, None),
        injector.Load("paced", 50, paced, plan.webhook_interval_s),
        injector.Load("closed", 50, max(1, plan.webhook_closed // 50), None),
    ]
    found = injector.measure(lab.space, loads, plan.webhook_rounds)
    results.webhook = found
    for round_ in range(plan.webhook_rounds):
        figures = {
            f"{load.name}_{key}": values[round_]
            for load in loads
            for key, values in found[load.name].items()
        }
        results.add("webhook", "injector", figures)
    memory = {k: found[k] for k in ("idle_rss_mib", "rss_mib", "hwm_mib")}
    results.add("webhook", "injector", memory)
    print("  webhook done", flush=True)


SECTIONS: dict[str, Section] = {
    "startup": startup,
    "imports": imports,
    "memory": memory,
    "idle": idle,
    "cycles": cycles,
    "long": long,
    "webhook": webhook,
}
