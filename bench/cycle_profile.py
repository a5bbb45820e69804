"""Where a refresh cycle of `refresher run` spends its CPU, and what it allocates.

Leads for optimising, not figures of docs/benchmarks.md (profiling slows the process):

    .venv/bin/python bench/cycle_profile.py cpu     # cProfile of the refresh loop's thread
    .venv/bin/python bench/cycle_profile.py alloc   # tracemalloc: what the cycles keep, peaks
    .venv/bin/python bench/cycle_profile.py cpu --cycles 300 --top 40
    CYCLE_CALLERS='isinstance' .venv/bin/python bench/cycle_profile.py cpu  # + who calls it

`refresher run` runs with its defaults (JSON logs, probes served on 127.0.0.1:0) against
the emulator with 0.1 s tokens, inside a wrapper process that calls the CLI in its main
thread as the console script does. A watcher thread counts publishes (each moves
`DIR/..data`) and stops the process with SIGTERM after warm-up + cycles.

- cpu: the thread named "refresh-loop" is profiled (its own CPU time, so sleeps and
  waits are not in it) from its start: the warm-up cannot be cut out of a cProfile run;
  with 200+ cycles the first one's lazy work is a few percent. Divide by the cycles.
- alloc: tracemalloc snapshots after the warm-up and at the end: the lines whose memory
  grew over the cycles (what a cycle keeps), and the transient peak of each cycle (what
  it allocates and frees again), from tracemalloc's peak reset at every publish.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import signal
import statistics
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

from measuring import Workspace
from subjects import NODE_DIR, PYTHON, ROOT, Emulator, refresher

TOKEN_TTL_S = 0.1


def _watch(token_dir: Path, total: int, on_cycle: Any) -> None:
    """Count publishes by the moves of ..data; SIGTERM the process after `total`."""
    last, count = None, 0
    while count < total:
        try:
            now = os.readlink(token_dir / "..data")
        except OSError:
            now = None
        if now is not None and now != last:
            count, last = count + 1, now
            on_cycle(count)
        time.sleep(0.002)
    os.kill(os.getpid(), signal.SIGTERM)


def _profile_cpu(argv: list[str], cycles: int, warmup: int, top: int) -> str:
    from refresher.cli import run_cli  # after the wrapper is in place

    # CPU time of the profiled thread: sleeps, waits on IMS and fsync's wait are not in it.
    profiler = cProfile.Profile(time.thread_time)
    original = threading.Thread.run

    def run(self: threading.Thread) -> None:
        if self.name != "refresh-loop":
            original(self)
            return
        profiler.enable()
        try:
            original(self)
        finally:
            profiler.disable()

    threading.Thread.run = run  # type: ignore[method-assign]
    token_dir = Path(argv[argv.index("--token-dir") + 1])
    total = warmup + cycles
    threading.Thread(target=_watch, args=(token_dir, total, lambda _n: None), daemon=True).start()
    code = run_cli(argv, dict(os.environ))
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    out.write(f"exit {code}; {total} cycles profiled (times are totals: divide by {total})\n")
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    if os.environ.get("CYCLE_CALLERS"):
        stats.print_callers(os.environ["CYCLE_CALLERS"])
    return out.getvalue()


def _profile_alloc(argv: list[str], cycles: int, warmup: int, top: int) -> str:
    from refresher.cli import run_cli

    tracemalloc.start(10)
    snapshots: dict[str, tracemalloc.Snapshot] = {}
    peaks: list[int] = []

    def on_cycle(count: int) -> None:
        current, peak = tracemalloc.get_traced_memory()
        if count > warmup:
            peaks.append(peak - current)
        tracemalloc.reset_peak()
        if count in (warmup, warmup + cycles):
            snapshots["first" if count == warmup else "last"] = tracemalloc.take_snapshot()

    token_dir = Path(argv[argv.index("--token-dir") + 1])
    total = warmup + cycles
    threading.Thread(target=_watch, args=(token_dir, total, on_cycle), daemon=True).start()
    code = run_cli(argv, dict(os.environ))
    lines = [f"exit {code}; {cycles} cycles after {warmup} of warm-up"]
    if peaks:
        lines.append(
            f"transient peak per cycle (traced memory above the level at publish): median "
            f"{statistics.median(peaks) / 1024:.0f} KiB, max {max(peaks) / 1024:.0f} KiB"
        )
    if len(snapshots) == 2:
        ignore = [tracemalloc.Filter(False, tracemalloc.__file__)]
        first = snapshots["first"].filter_traces(ignore)
        last = snapshots["last"].filter_traces(ignore)
        diff = last.compare_to(first, "lineno")
        grown = sum(d.size_diff for d in diff)
        lines.append(f"kept over {cycles} cycles: {grown / 1024:+.1f} KiB; top lines:")
        lines += [f"  {d}" for d in diff[:top]]
        lines.append("largest holders at the end (traceback of the biggest):")
        for stat in last.statistics("traceback")[:3]:
            lines.append(f"  {stat.size / 1024:.0f} KiB in {stat.count} blocks")
            lines += [f"    {frame}" for frame in stat.traceback.format()[-6:]]
    return "\n".join(lines) + "\n"


def child(args: argparse.Namespace) -> int:
    profile = _profile_cpu if args.mode == "cpu" else _profile_alloc
    report = profile(args.argv, args.cycles, args.warmup, args.top)
    Path(args.child).write_text(report, encoding="utf-8")
    return 0


def parent(args: argparse.Namespace) -> int:
    space = Workspace(src=None, keep=False, node_path=NODE_DIR)
    try:
        emulator = Emulator(space, TOKEN_TTL_S)
        out, report = space.path("token"), space.path("report.txt")
        argv = refresher("run", min_lifetime_s=0.001)(emulator, out)[1:]  # less the script
        wrapper = [str(PYTHON), __file__, args.mode, "--child", str(report)]
        wrapper += ["--cycles", str(args.cycles), "--warmup", str(args.warmup)]
        wrapper += ["--top", str(args.top), "--", *argv]
        with space.path("stdout").open("wb") as logs:
            child_process = space.spawn(wrapper, stdout=logs, name="profiled", cwd=ROOT)
            child_process.wait(timeout=(args.cycles + args.warmup) * TOKEN_TTL_S * 20 + 120)
        if not report.exists():
            print(Path(child_process.stderr_path).read_text(), file=sys.stderr)  # type: ignore[attr-defined]
            return 1
        print(report.read_text())
        return 0
    except subprocess.TimeoutExpired:
        print("the profiled refresher did not finish in time", file=sys.stderr)
        return 1
    finally:
        space.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("cpu", "alloc"))
    parser.add_argument("--cycles", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    rest = sys.argv[1:]
    split = rest.index("--") if "--" in rest else len(rest)
    args = parser.parse_args(rest[:split])
    args.argv = rest[split + 1 :]  # the refresher's own arguments, in child mode
    return child(args) if args.child else parent(args)


if __name__ == "__main__":
    sys.exit(main())
