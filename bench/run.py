"""Benchmarks of the refresher beside its peers, on the IMS emulator (`make bench`).

    .venv/bin/python bench/run.py                # the full run: writes docs/benchmarks.md
    .venv/bin/python bench/run.py --quick        # every subject briefly, to check the harness
    .venv/bin/python bench/run.py --only cycles,webhook --out /tmp/b.md

The harness: measuring.py (process sampling, timings, statistics), subjects.py (the
refresher, the floor, @adobe/jwt-auth, the emulator), injector.py (the webhook and its
clients), figures.py (what each section runs and records), report.py with
benchmarks.md.in and savings.toml (the document). cycle_profile.py is apart: where a
cycle's CPU goes (cProfile) and what it allocates (tracemalloc), as leads.

Environment (each also a flag):
  BENCH_QUICK=1   --quick
  BENCH_ONLY=a,b  --only: these sections only
  BENCH_SRC=DIR   --src: the refresher from another source tree, by PYTHONPATH (the
                  emulator stays this tree's)
  BENCH_REV=REV   --rev: refresher/ as committed at a git revision of this tree (HEAD
                  while others edit the working tree; v0.1.0 to compare)
  BENCH_BASELINE=REV  --baseline: the 0.1.0 measured beside the refresher (default
                  subjects.BASELINE_REV, 0.1.0 as released; "none": without it)
  BENCH_OUT=FILE  --out: where the document goes; by default only a full run of every
                  section on this tree (or --rev) writes docs/benchmarks.md
  BENCH_KEEP=1    --keep the scratch directory, with every process's logs
The data of the document is saved beside it (bench/results.json for docs/benchmarks.md,
FILE.json for --out FILE.md); `--render` writes the document again from it, without
measuring, after a change to bench/benchmarks.md.in or bench/savings.toml.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.metadata
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
import types
from dataclasses import asdict
from pathlib import Path
from typing import Any

import figures
import report
from measuring import MIB, Workspace, loadavg
from subjects import (
    BASELINE_REV,
    NODE_DIR,
    ROOT,
    Emulator,
    Lab,
    compile_sources,
    floor,
    refresher,
)

DOC = ROOT / "docs" / "benchmarks.md"
RESULTS = ROOT / "bench" / "results.json"  # the data of DOC, for --render
PYTHON_DISTS = (
    "ims-token-refresher",
    "requests",
    "urllib3",
    "PyJWT",
    "cryptography",
    "prometheus-client",
    "kubernetes",
)


def parse(argv: list[str]) -> argparse.Namespace:
    env = os.environ.get
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", default=env("BENCH_QUICK") == "1")
    parser.add_argument("--only", default=env("BENCH_ONLY", ""), help="sections, comma-separated")
    parser.add_argument("--src", default=env("BENCH_SRC"), help="refresher source tree")
    parser.add_argument("--rev", default=env("BENCH_REV"), help="git revision of refresher/")
    parser.add_argument(
        "--baseline",
        default=env("BENCH_BASELINE", BASELINE_REV),
        help="git revision run beside the refresher as 0.1.0; 'none' for no such subject",
    )
    parser.add_argument("--out", default=env("BENCH_OUT"), help="write the document here")
    parser.add_argument("--keep", action="store_true", default=env("BENCH_KEEP") == "1")
    parser.add_argument(
        "--render",
        action="store_true",
        help="no measuring: write the document again from bench/results.json (the last full "
        "run), after a change to bench/benchmarks.md.in or bench/savings.toml",
    )
    args = parser.parse_args(argv)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(args.only) - set(figures.SECTIONS)
    if unknown:
        parser.error(f"unknown section(s) {sorted(unknown)}; choose from {list(figures.SECTIONS)}")
    return args


def _versions() -> tuple[str, str]:
    python = [f"python {platform.python_version()}"]
    for dist in PYTHON_DISTS:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            python.append(f"{dist} {importlib.metadata.version(dist)}")
    node = []
    if node_bin := shutil.which("node"):
        result = subprocess.run([node_bin, "--version"], capture_output=True, text=True)
        node.append(f"node {result.stdout.strip()}")
    for name in ("@adobe/jwt-auth", "jsonwebtoken", "node-fetch", "form-data"):
        package = NODE_DIR / "node_modules" / name / "package.json"
        with contextlib.suppress(OSError, ValueError):
            node.append(f"{name} {json.loads(package.read_text())['version']}")
    return ", ".join(python), ", ".join(node) or "not available"


def _revision(src: Path | None) -> str:
    tree = src or ROOT
    try:
        git = ["git", "-C", str(tree)]
        head = subprocess.run(
            [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "--", "refresher"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (subprocess.SubprocessError, OSError):
        return "unknown"
    return head + (" + uncommitted changes in refresher/" if dirty else "")


def _short(rev: str) -> str:
    git = ["git", "-C", str(ROOT), "rev-parse", "--short", f"{rev}^{{commit}}"]
    return subprocess.run(git, capture_output=True, text=True, check=True).stdout.strip()


def _export(rev: str, into: Path) -> Path:
    """refresher/ as committed at `rev`, unpacked into `into` (for PYTHONPATH)."""
    into.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", _short(rev), "refresher"],
        capture_output=True,
        check=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def _machine() -> str:
    uname = platform.uname()
    model, memory = "unknown CPU", "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                memory = f"{int(line.split()[1]) / MIB / MIB:.1f} GiB"
    return (
        f"`{uname.system} {uname.release} {uname.machine}`, {os.cpu_count()} CPUs ({model}), "
        f"{memory} RAM"
    )


def _commands(lab: Lab) -> str:
    # Placeholders in place of a running emulator: the argv builders read only these two.
    emu: Any = types.SimpleNamespace(
        credentials=Path("CREDS/aem-service-credentials.json"), base_url="http://127.0.0.1:PORT"
    )
    out = Path("OUT")

    def show(argv: list[str]) -> str:
        return shlex.join(argv).replace(str(ROOT) + "/", "").replace(sys.exec_prefix, ".venv")

    lines = [
        "python -m ims_emulator --port 0 --port-file F --write-credentials CREDS --token-ttl S",
        show(floor(None)(emu, out)),
        show(floor(1.5)(emu, out)),
    ]
    if lab.node is not None:
        lines.append("NODE_PATH=bench/.node/node_modules " + show(lab.node_argv(1.5)(emu, out)))
    lines += [
        show(refresher("once", listen=False)(emu, out)),
        show(refresher("run")(emu, out)),
        show(refresher("run", min_lifetime_s=0.001)(emu, out)) + "   # sub-second tokens",
        "KUBECONFIG=FAKE " + show(refresher("run", secret="NAME")(emu, out)),
        ".venv/bin/refresher injector --listen=127.0.0.1:0 --tls-cert-file=CERT "
        "--tls-key-file=KEY --log-level=info",
        "python -X importtime .venv/bin/refresher once|run ...",
    ]
    return "\n".join(lines)


def _command_line(args: argparse.Namespace) -> str:
    knobs = [f"{k}={os.environ[k]}" for k in sorted(os.environ) if k.startswith("BENCH_")]
    command = " ".join([*knobs, shlex.join(["python", "bench/run.py", *sys.argv[1:]])])
    return f"{command} (by make)" if "MAKELEVEL" in os.environ else command


def measure(args: argparse.Namespace, plan: figures.Plan) -> tuple[figures.Results, dict[str, str]]:
    """Run the sections asked for; the results, and what the document says of the run."""
    src = Path(args.src).resolve() if args.src else None
    sections = args.only or list(figures.SECTIONS)
    started, load_start = time.monotonic(), loadavg()
    space = Workspace(src=src, keep=args.keep, node_path=NODE_DIR / "node_modules")
    revision = _revision(src) + (f", from {src}" if src else "")
    if args.rev:
        space.src, revision = _export(args.rev, space.work / "src"), _short(args.rev)
    lab = Lab(space)
    results = figures.Results()
    loads: list[str] = []  # 1-minute load average as each section starts
    baseline = "not run in this run"
    try:
        if args.baseline != "none":
            try:
                lab.baseline = _export(args.baseline, space.work / "baseline")
                baseline = f"commit {_short(args.baseline)}"
            except subprocess.CalledProcessError:  # a shallow clone, say
                lab.notes["0.1.0"] = f"revision {args.baseline} not in this clone: not run"
        compile_sources(space, *([lab.baseline] if lab.baseline else []))
        lab.install_node_peer()
        if {"memory", "idle", "imports"} & set(sections):
            lab.start_fake_apiserver()
        if "startup" not in sections and lab.node is not None:
            probe = Emulator(space, 86400)
            lab.check_node_peer(probe)
            probe.stop()
        for name in sections:
            loads.append(f"{name} {loadavg().split()[0]}")
            print(f"{name} ...", flush=True)
            figures.SECTIONS[name](lab, plan, results)
        commands = _commands(lab)
    finally:
        lab.close()
        space.close()
    python_versions, node_versions = _versions()
    load_end = loadavg()
    # The load before the first process starts is other work's; later, it is partly ours.
    busy = max(float(x) for x in load_start.split()[:2]) > 0.5
    return results, {
        "mode": "quick (`--quick`: every subject briefly; not for comparison)"
        if args.quick
        else "full",
        "command": _command_line(args),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "elapsed": f"{(time.monotonic() - started) / 60:.1f} min",
        "machine": _machine(),
        "load_note": f"load average {load_start} before the run (1, 5, 15 min), {load_end} "
        f"after it; 1-minute load as each section started: {', '.join(loads)}"
        + (". **Taken under load**: other work shared the machine" if busy else ""),
        "revision": revision,
        "baseline": baseline,
        "python_versions": python_versions,
        "node_versions": node_versions,
        "commands": commands,
        "notes": "".join(f"\n{k.capitalize()}: {v}\n" for k, v in lab.notes.items()),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    if args.src and args.rev:
        raise SystemExit("bench: --src and --rev exclude each other")
    full = not args.quick and not args.only and not args.src
    out = Path(args.out) if args.out else (DOC if full or args.render else None)
    # The data beside the document: a later --render needs no measuring.
    data_path = None if out is None else RESULTS if out == DOC else out.with_suffix(".json")
    if args.render:
        if data_path is None or not data_path.exists():
            raise SystemExit(f"bench: no saved results at {data_path}")
        saved = json.loads(data_path.read_text(encoding="utf-8"))
        plan = figures.Plan(**saved["plan"])
        results, meta = figures.Results(**saved["results"]), saved["meta"]
    else:
        plan = figures.Plan.quick() if args.quick else figures.Plan()
        results, meta = measure(args, plan)
        if data_path is not None:
            data = {"plan": asdict(plan), "meta": meta, "results": asdict(results)}
            data_path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    print()
    print(report.table(report.rows(results)))
    if out is not None:
        out.write_text(report.render(results, meta, plan), encoding="utf-8")
        print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
