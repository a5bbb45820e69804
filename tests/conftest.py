"""Fixtures every test group uses: the session's credentials and the harness that runs the
real CLI as a subprocess and scans all its output for secrets at teardown. The code
behind them is in tests/support/."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import keys
from tests.support.harness import Harness


@pytest.fixture(scope="session")
def credentials_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """AEM and OAuth credentials, written once per session by tests/support/keys.py."""
    directory = tmp_path_factory.mktemp("credentials-template")
    keys.write_credentials(directory)
    return directory


@pytest.fixture
def harness(tmp_path: Path, credentials_template: Path) -> Iterator[Harness]:
    """A private copy of the credentials and, at teardown, the secret scan of all output."""
    credentials = tmp_path / "credentials"
    shutil.copytree(credentials_template, credentials)
    h = Harness(root=tmp_path, credentials=credentials)
    try:
        yield h
    finally:
        h.close()
    h.scan()
