"""The report: figures as rows with goals and verdicts, rendered into bench/benchmarks.md.in.

FIGURES declares every row of the results table: where its runs are, its goal, and
0.1.0's figure. The document's prose is the template; the one-line savings come from
bench/savings.toml, each showing today's value of the figure it names, so that a
change that undoes a saving shows in the next run.
"""

from __future__ import annotations

import string
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from figures import Results
from measuring import Summary, paired_ratios

BENCH = Path(__file__).resolve().parent
TEMPLATE = BENCH / "benchmarks.md.in"
SAVINGS = BENCH / "savings.toml"


@dataclass(frozen=True)
class Measured:
    """What a goal is judged on: this run's figure, and its ratios to the same run's peers."""

    ours: Summary
    vs_floor: Summary | None
    vs_v010: Summary | None  # to 0.1.0 itself, run beside today's refresher


@dataclass(frozen=True)
class Goal:
    """A goal for a figure: its text, and a check (None: its peer was not measured)."""

    text: str
    check: Callable[[Measured], bool | None]


def _ratio_at_most(ratio: Summary | None, limit: float) -> bool | None:
    return None if ratio is None else ratio.median <= limit


def vs_floor(limit: float) -> Goal:
    return Goal(f"<= {limit:g}x floor", lambda m: _ratio_at_most(m.vs_floor, limit))


def vs_v010(limit: float) -> Goal:
    """No regression against 0.1.0 run beside us, with `limit` for the machine's noise."""
    return Goal(f"<= {limit:g}x 0.1.0 (this run)", lambda m: _ratio_at_most(m.vs_v010, limit))


def at_most(limit: float, unit: str) -> Goal:
    return Goal(f"<= {limit:g} {unit}".strip(), lambda m: m.ours.median <= limit)


def at_least(limit: float, unit: str) -> Goal:
    return Goal(f">= {limit:g} {unit}".strip(), lambda m: m.ours.low >= limit)


def below(limit: float, unit: str) -> Goal:
    return Goal(f"< {limit:g} {unit}".strip(), lambda m: m.ours.median < limit)


def no_worse_vs_floor(ratio_010: float) -> Goal:
    """No regression against 0.1.0, judged by the ratio to the floor of the same run.

    Absolute figures move with the machine and the libraries (the floor itself grew by
    1.5 MiB since 0.1.0's run); the ratio to the floor does not.
    """
    return Goal(
        f"<= {ratio_010:g}x floor (0.1.0's ratio)", lambda m: _ratio_at_most(m.vs_floor, ratio_010)
    )


@dataclass(frozen=True)
class Figure:
    """One row: the refresher's (or injector's) runs of `metric` in `section`."""

    key: str  # stable name, used by bench/savings.toml
    label: str
    section: str
    metric: str
    subject: str
    unit: str
    digits: int
    goal: Goal | None = None
    v010: float | None = None  # 0.1.0's figure (docs/benchmarks.md of 2026-11-26)

    @property
    def v010_subject(self) -> str:
        """0.1.0's runs of the same figure, in the same section of this run (if any)."""
        return {"once": "v010_once", "run": "v010", "secret": "v010_secret"}.get(self.subject, "")


F = Figure
FIGURES = [
    F("once_publish", "`once`: start -> token published", "startup", "publish_ms", "once",
      "ms", 0, vs_floor(1.10), 417),
    F("run_publish", "`run`: start -> `..data`", "startup", "publish_ms", "run", "ms", 0,
      vs_floor(1.3), 421),
    F("once_exit", "`once`: start -> exit", "startup", "exit_ms", "once", "ms", 0, None, 505),
    F("once_cpu", "`once`: CPU of the one-shot exchange", "startup", "cpu_ms", "once", "ms",
      0, None, 424),
    F("once_hwm", "`once`: peak RSS", "startup", "hwm_mib", "once", "MiB", 1, None, 42.2),
    F("cycle_cpu", "`run`: CPU per refresh cycle", "cycles", "cpu_ms", "run", "ms", 2,
      vs_floor(1.5), 7.98),
    F("cycle_rss", "`run`: RSS after the cycles", "cycles", "rss_mib", "run", "MiB", 1),
    F("file_rss", "`run`, file sink: steady RSS after ≥ 3 refreshes", "memory", "rss_mib",
      "run", "MiB", 1, vs_floor(1.10), 42.7),
    F("file_refreshes", "`run`, file sink: refreshes in the window", "memory", "refreshes",
      "run", "", 0, at_least(3, "")),
    F("file_hwm", "`run`, file sink: peak RSS (VmHWM)", "memory", "hwm_mib", "run", "MiB", 1,
      None, 42.7),
    F("secret_rss", "`run`, file + Secret sinks: steady RSS", "memory", "rss_mib", "secret",
      "MiB", 1, no_worse_vs_floor(1.56), 60.4),
    F("secret_hwm", "`run`, file + Secret sinks: peak RSS", "memory", "hwm_mib", "secret",
      "MiB", 1, None, 60.4),
    F("idle_cpu", "`run`, idle (day-long token): CPU", "idle", "millicores", "run",
      "millicores", 3, vs_v010(1.10), 0.065),
    F("idle_cpu_secret", "`run` + Secret, idle: CPU", "idle", "millicores", "secret",
      "millicores", 3, vs_v010(1.10), 0.065),
    F("idle_wakeups", "`run`, idle: wake-ups", "idle", "wakeups_per_s", "run", "/s", 2,
      None, 0.20),
    F("idle_rss", "`run`, idle: RSS", "idle", "rss_mib", "run", "MiB", 1, None, 42.5),
    F("long_cpu", "back-to-back cycles: CPU per cycle, last window", "long", "last_cpu_ms", "run",
      "ms", 2, None, 7.95),
    F("long_cpu_growth", "back-to-back cycles: last window / first window", "long",
      "cpu_growth", "run", "x", 2, None, 1.13),
    F("long_cpu_trend", "back-to-back cycles: median of the last 3 windows / of the 2nd-4th",
      "long", "cpu_trend", "run", "x", 2),
    F("long_vs_floor_trend", "back-to-back cycles: the same, of CPU per cycle / the floor's "
      "in the same window", "long", "vs_floor_trend", "run", "x", 2, at_most(1.1, "x")),
    F("long_rss_growth", "back-to-back cycles: RSS growth after the first window", "long",
      "rss_growth_mib", "run", "MiB", 1, at_most(1.0, "MiB"), 0.6),
    F("imports_once", "`once`: modules imported", "imports", "modules", "once", "", 0, None,
      393),
    F("imports_once_ms", "`once`: import time (sum of self times)", "imports", "import_ms",
      "once", "ms", 0),
    F("imports_run", "`run`: modules imported", "imports", "modules", "run", "", 0, None, 393),
    F("kubernetes_file", "`run`, file sink: `kubernetes` modules imported", "imports",
      "kubernetes", "run", "", 0, at_most(0, ""), 0),
    F("webhook_single_p50", "webhook, 1 client: p50 per review", "webhook", "single_p50_ms",
      "injector", "ms", 2),
    F("webhook_single_p99", "webhook, 1 client: p99 per review", "webhook", "single_p99_ms",
      "injector", "ms", 2),
    F("webhook_paced_p50", "webhook, 50 clients: p50 per review", "webhook", "paced_p50_ms",
      "injector", "ms", 2),
    F("webhook_paced_p99", "webhook, 50 clients: p99 per review", "webhook", "paced_p99_ms",
      "injector", "ms", 2, below(10, "ms")),
    F("webhook_closed_rate", "webhook, 50 clients closed loop: reviews/s", "webhook",
      "closed_per_s", "injector", "/s", 0),
    F("webhook_closed_p99", "webhook, 50 clients closed loop: p99 (queueing)", "webhook",
      "closed_p99_ms", "injector", "ms", 1),
    F("webhook_cpu", "webhook: injector CPU per review (1 client)", "webhook",
      "single_cpu_us", "injector", "us", 0),
    F("webhook_rss", "webhook: injector RSS after the runs", "webhook", "rss_mib", "injector",
      "MiB", 1),
    F("webhook_hwm", "webhook: injector peak RSS", "webhook", "hwm_mib", "injector", "MiB", 1),
]  # fmt: skip


def _num(value: float | None, digits: int, unit: str = "") -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f} {unit}".strip()


def _spread(summary: Summary | None, digits: int) -> str:
    if summary is None:
        return ""
    if summary.n == 1:
        return "n=1"
    return f"{summary.low:,.{digits}f}-{summary.high:,.{digits}f} (n={summary.n})"


def _ratio(summary: Summary | None) -> str:
    if summary is None:
        return "-"
    if summary.n == 1 or summary.low == summary.high:
        return f"{summary.median:.3f}x"
    return f"{summary.median:.3f}x ({summary.low:.2f}-{summary.high:.2f})"


@dataclass(frozen=True)
class Row:
    figure: Figure
    ours: Summary
    floor: Summary | None
    node: Summary | None
    vs_floor: Summary | None
    vs_node: Summary | None
    v010_now: Summary | None  # 0.1.0 run beside us
    vs_v010: Summary | None
    met: bool | None


def rows(results: Results) -> list[Row]:
    found = []
    for figure in FIGURES:
        ours = Summary.of(results.values(figure.section, figure.metric, figure.subject))
        if ours is None:
            continue
        mine = results.values(figure.section, figure.metric, figure.subject)
        peers = {"floor": "floor", "node": "node", "v010": figure.v010_subject}
        theirs = {k: results.values(figure.section, figure.metric, v) for k, v in peers.items()}
        vs = {k: paired_ratios(mine, values) for k, values in theirs.items()}
        met = figure.goal.check(Measured(ours, vs["floor"], vs["v010"])) if figure.goal else None
        found.append(
            Row(
                figure,
                ours,
                Summary.of(theirs["floor"]),
                Summary.of(theirs["node"]),
                vs["floor"],
                vs["node"],
                Summary.of(theirs["v010"]),
                vs["v010"],
                met,
            )
        )
    return found


def table(found: list[Row]) -> str:
    head = "| figure | refresher (median) | spread | floor | @adobe/jwt-auth | vs floor | "
    head += "vs @adobe/jwt-auth | 0.1.0, this run | vs 0.1.0 | 0.1.0, its doc | goal | verdict |"
    lines = [head, "|---|---:|---|---:|---:|---|---|---:|---|---:|---|---|"]
    for row in found:
        f = row.figure
        verdict = "" if row.met is None else ("met" if row.met else "**missed**")
        if f.goal is not None and row.met is None:
            verdict = "n/a"
        cells = [
            f.label,
            _num(row.ours.median, f.digits, f.unit),
            _spread(row.ours, f.digits),
            _num(row.floor.median if row.floor else None, f.digits, f.unit),
            _num(row.node.median if row.node else None, f.digits, f.unit),
            _ratio(row.vs_floor),
            _ratio(row.vs_node),
            _num(row.v010_now.median if row.v010_now else None, f.digits, f.unit),
            _ratio(row.vs_v010),
            _num(f.v010, f.digits, f.unit),
            f.goal.text if f.goal else "",
            verdict,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def savings(found: list[Row], path: Path = SAVINGS) -> str:
    """One line per saving: what it cost before, what it costs now (today's figure if named)."""
    entries = tomllib.loads(path.read_text(encoding="utf-8")).get("saving", [])
    current = {row.figure.key: row for row in found}
    lines = []
    for entry in entries:
        now = entry.get("now", "")
        row = current.get(entry.get("figure", ""))
        if row is not None:
            f = row.figure
            measured = _num(row.ours.median, f.digits, f.unit)
            if row.vs_floor is not None:
                measured += f", {row.vs_floor.median:.2f}x floor"
            now = f"{now} (this run: {measured}, {f.label})" if now else f"{measured} ({f.label})"
        lines.append(f"- **{entry['change']}**: before: {entry['before']}; now: {now or '-'}")
    return "\n".join(lines) or "- none recorded yet"


def _window_floor(window: dict[str, Any]) -> str:
    if "floor_cpu_ms" not in window:  # results saved before the floor ran alongside
        return "- | -"
    return f"{window['floor_cpu_ms']:.2f} ms | {window['vs_floor']:.2f}x"


def long_windows(results: Results) -> str:
    if not results.long:
        return "Not measured in this run."
    head = [
        f"RSS after the first cycle: {results.long['first_rss_mib']:.1f} MiB. The emulator "
        f"issued {results.long['issued']} tokens (rejected: {results.long['rejected'] or 'none'}).",
        "",
        "| cycles | CPU per cycle | the floor's, same window | ratio | wall per cycle "
        "| RSS at end | VmHWM at end |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    return "\n".join(
        head
        + [
            f"| {w['cycles']} | {w['cpu_ms']:.2f} ms | {_window_floor(w)} "
            f"| {w['wall_ms']:.2f} ms | {w['rss_mib']:.1f} MiB | {w['hwm_mib']:.1f} MiB |"
            for w in results.long["windows"]
        ]
    )


def imports(results: Results) -> str:
    if not results.imports:
        return "Not measured in this run."
    lines = [
        "| mode | modules | costliest packages (modules, self time summed) |",
        "|---|---:|---|",
    ]
    for key, packages in results.imports.items():
        label = {"secret": "run --secret"}.get(key, key)
        count = int(sum(n for _, n, _ in packages))
        top = ", ".join(f"`{name}` {n} / {us / 1000:.0f} ms" for name, n, us in packages[:8])
        modules = results.values("imports", "modules", key)
        lines.append(f"| `refresher {label}` | {modules[0] if modules else count:.0f} | {top} |")
    return "\n".join(lines)


def render(results: Results, meta: dict[str, Any], plan: Any) -> str:
    found = rows(results)
    values = {
        "baseline": "not run in this run",  # results saved before 0.1.0 ran beside us
        **{k: str(v) for k, v in meta.items()},
        **{f"plan_{k}": f"{v:,g}" for k, v in vars(plan).items()},
        "results": table(found),
        "savings": savings(found),
        "long_windows": long_windows(results),
        "imports": imports(results),
    }
    text = string.Template(TEMPLATE.read_text(encoding="utf-8")).substitute(values)
    return text.rstrip() + "\n"
