"""The README's configuration table and commands stay in step with the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest

from refresher.cli import COMMANDS, _env_name

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
FLAGS = sorted({flag.name for _, flags in COMMANDS.values() for flag in flags})


@pytest.mark.parametrize("flag", FLAGS)
def test_every_flag_is_documented(flag: str) -> None:
    """Each flag of run/once/check has a row with its environment variable."""
    assert f"| `--{flag}` | `{_env_name(flag)}` |" in README


def test_newcomer_commands() -> None:
    """The README gives `make demo` and `make test`."""
    assert "make demo" in README
    assert "make test" in README
