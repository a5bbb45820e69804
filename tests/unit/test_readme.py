"""The README's configuration table, the CLI's help and the `Settings` defaults agree."""

from __future__ import annotations

import contextlib
import io
import re
from dataclasses import fields
from pathlib import Path

import pytest

from refresher.cli import COMMANDS, build_parser, configuration_table
from refresher.config import (
    ImsSettings,
    OutputSettings,
    ScheduleSettings,
    Settings,
    build_settings,
    flag_defaults,
)

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()
FLAGS = sorted({flag.name for _, flags in COMMANDS.values() for flag in flags})


def test_the_configuration_table_is_the_one_the_cli_generates() -> None:
    """The README holds, row for row, the table generated from the flags and the
    `Settings` defaults (regenerate it with `refresher.cli.configuration_table()`)."""
    assert configuration_table() in README


@pytest.mark.parametrize("flag", FLAGS)
def test_every_flag_has_a_row_with_its_environment_variable(flag: str) -> None:
    """Each flag of run/once/check/token has a row naming its REFRESHER_* variable."""
    env = "REFRESHER_" + flag.upper().replace("-", "_")
    assert f"| `--{flag}` | `{env}` |" in README


def test_every_settings_field_with_a_flag_names_a_real_flag() -> None:
    """The flag named on each `Settings` field exists, so its default reaches the help."""
    named = {
        item.metadata["flag"]
        for cls in (Settings, ImsSettings, ScheduleSettings, OutputSettings)
        for item in fields(cls)
        if "flag" in item.metadata
    }
    assert named <= set(FLAGS)
    assert set(flag_defaults()) <= named


def test_the_defaults_shown_are_the_defaults_applied() -> None:
    """With no flags, `build_settings` yields exactly the field defaults the help shows."""
    settings = build_settings({"credentials": "x.json", "token_dir": "/t"}, needs_output=True)
    assert settings.ims == ImsSettings()
    assert settings.schedule == ScheduleSettings()
    assert settings.listen == Settings().listen
    assert (settings.log_format, settings.log_level) == ("json", "info")
    shown = flag_defaults()
    assert shown["file-mode"] == "0440" and settings.output.file_mode == 0o440
    assert shown["refresh-ratio"] == f"{settings.schedule.refresh_ratio:g}"


def test_the_help_shows_each_default() -> None:
    """`refresher run --help` shows every default in brackets, taken from `Settings`."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--help"])
    help_text = re.sub(r"\s+", " ", out.getvalue())
    run_flags = {flag.name for flag in COMMANDS["run"][1]}
    for name, default in flag_defaults().items():
        if name in run_flags:
            assert f"[{default}] (env" in help_text, name


def test_newcomer_commands() -> None:
    """The README's first shell block starts with `make demo` and `make test`, and each is
    a target of the Makefile (prose that merely mentions them does not count)."""
    block = re.search(r"```sh\n(.*?)```", README, re.DOTALL)
    assert block is not None
    commands = [line.split("#")[0].strip() for line in block.group(1).splitlines()]
    assert commands[:2] == ["make demo", "make test"]
    makefile = (Path(__file__).resolve().parents[2] / "Makefile").read_text()
    for target in ("demo", "test"):
        assert re.search(rf"^{target}:", makefile, re.MULTILINE), target
