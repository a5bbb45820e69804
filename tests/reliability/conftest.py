"""Options, the `soak` marker and the figures report of the reliability suites.

`--soak-minutes N` selects the long versions (marker `soak`); without it they are
deselected, so `make test` runs only the short versions. A test records its figures
in the `figures` fixture; every block is printed at the end of the run under the
machine it ran on (uname, CPUs, Python, date), also under xdist, where the blocks
travel to the controller as user properties. `--figures-json PATH` also writes them.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

_FIGURES_KEY = "reliability_figures"
_COLLECTED: list[tuple[str, str, dict[str, object]]] = []


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("reliability")
    group.addoption(
        "--soak-minutes",
        type=float,
        default=None,
        help="run the long reliability versions (marker soak) for about this many minutes",
    )
    group.addoption(
        "--figures-json",
        default=None,
        metavar="PATH",
        help="also write the reliability figures blocks to this JSON file",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "soak: long reliability run, selected only with --soak-minutes (make soak)"
    )


def soak_minutes(config: pytest.Config) -> float | None:
    value = config.getoption("soak_minutes", default=None)
    return None if value is None else float(value)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    minutes = soak_minutes(config)
    soak = [item for item in items if item.get_closest_marker("soak") is not None]
    if minutes is None:
        if soak:
            config.hook.pytest_deselected(items=soak)
            items[:] = [item for item in items if item.get_closest_marker("soak") is None]
        return
    # A soak test runs for `minutes` and then analyses: give it room, but not forever.
    for item in soak:
        item.add_marker(pytest.mark.timeout(int(minutes * 60 * 3 + 900)))


@pytest.fixture
def soak_seconds(request: pytest.FixtureRequest) -> float:
    """The long runs' duration (from --soak-minutes)."""
    minutes = soak_minutes(request.config)
    if minutes is None:
        pytest.skip("a soak run: pass --soak-minutes (make soak)")
    return minutes * 60


@pytest.fixture
def figures(record_property: object) -> Iterator[dict[str, object]]:
    """A dict the test fills with its figures; reported at the end of the run."""
    block: dict[str, object] = {}
    yield block
    if block:
        record_property(_FIGURES_KEY, json.dumps(block, default=str))  # type: ignore[operator]


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when != "teardown":
        return
    for key, value in report.user_properties:
        if key == _FIGURES_KEY:
            _COLLECTED.append((report.nodeid, report.outcome, json.loads(str(value))))


def machine() -> dict[str, str]:
    """The machine line every published figure carries."""
    try:
        uname = subprocess.run(
            ["uname", "-a"], capture_output=True, text=True, check=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        uname = " ".join(platform.uname())
    return {
        "uname -a": uname,
        "nproc": str(os.cpu_count()),
        "python": sys.version.split()[0],
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _COLLECTED:
        return
    write = terminalreporter.write_line
    terminalreporter.write_sep("=", "reliability figures")
    host = machine()
    for key, value in host.items():
        write(f"{key}: {value}")
    for nodeid, outcome, block in sorted(_COLLECTED):
        write("")
        write(f"{nodeid} [{outcome}]")
        for key, value in block.items():
            write(f"  {key}: {json.dumps(value, default=str)}")
    path = terminalreporter.config.getoption("figures_json", default=None)
    if path:
        document = {
            "machine": host,
            "results": [{"test": n, "outcome": o, "figures": b} for n, o, b in sorted(_COLLECTED)],
        }
        Path(path).write_text(json.dumps(document, indent=2, default=str) + "\n")
        write(f"figures written to {path}")
