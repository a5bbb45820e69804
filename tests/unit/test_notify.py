"""`--on-refresh`: the hook's environment, its outcome counted and logged, and its stderr
kept as a bounded tail that is scrubbed of secrets before anything of it is logged.
Hooks are real processes (small Python scripts); the chatty-hook memory attack lives in
tests/reliability/test_neighbour_attacks.py."""

from __future__ import annotations

import io
import json
import logging
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from refresher.logs import REDACTED, SecretRegistry, setup_logging
from refresher.metrics import Metrics
from refresher.notify import TAIL_BYTES, Notifier

# An opaque token (not JWT-shaped, so only the registry can recognise it), 1,200 chars.
TOKEN = "".join(f"tok{n:04d}" for n in range(171))[:1200]


class Logged:
    """The JSON lines the refresher would write, with the secret registry behind them."""

    def __init__(self) -> None:
        self.stream = io.StringIO()
        self.secrets = SecretRegistry()
        setup_logging("json", "info", self.secrets, self.stream)

    @property
    def text(self) -> str:
        return self.stream.getvalue()

    def records(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.text.splitlines()]


@pytest.fixture
def logged() -> Iterator[Logged]:
    yield Logged()
    logging.getLogger().handlers.clear()


def _notifier(tmp_path: Path, body: str, timeout_s: float = 10) -> tuple[Notifier, Metrics]:
    script = tmp_path / "hook.py"
    script.write_text(textwrap.dedent(body))
    metrics = Metrics(CollectorRegistry())
    notifier = Notifier(
        (sys.executable, str(script)), timeout_s=timeout_s, base_env={}, metrics=metrics
    )
    return notifier, metrics


def _run_once(notifier: Notifier) -> None:
    notifier.notify("/tokens", "2026-11-27T12:00:00Z")
    notifier.join(20)


def _count(metrics: Metrics, result: str) -> float | None:
    return metrics.registry.get_sample_value("refresher_on_refresh_total", {"result": result})


def test_hook_environment_is_ims_token_dir_and_expires_at(tmp_path: Path) -> None:
    """The hook gets IMS_TOKEN_DIR and IMS_TOKEN_EXPIRES_AT, and no REFRESHER_* of ours."""
    dump = tmp_path / "env.json"
    notifier, metrics = _notifier(
        tmp_path,
        f"""
        import json, os
        with open({str(dump)!r}, "w") as f:
            json.dump({{k: v for k, v in os.environ.items() if "TOKEN" in k or "EXPIRES" in k}}, f)
        """,
    )
    _run_once(notifier)
    assert json.loads(dump.read_text()) == {
        "IMS_TOKEN_DIR": "/tokens",
        "IMS_TOKEN_EXPIRES_AT": "2026-11-27T12:00:00Z",
    }
    assert _count(metrics, "success") == 1


def test_a_token_in_a_long_stderr_line_is_scrubbed_before_any_cut(
    tmp_path: Path, logged: Logged
) -> None:
    """A failing hook printing the token in a long line: not one fragment of the token
    reaches the log (it used to be cut to 200 characters first, then not recognised)."""
    logged.secrets.add(TOKEN)
    notifier, metrics = _notifier(
        tmp_path,
        f"""
        import sys
        sys.stderr.write("error: bad token " + {TOKEN!r} + " rejected\\n")
        sys.exit(1)
        """,
    )
    _run_once(notifier)
    assert _count(metrics, "error") == 1
    assert TOKEN[:40] not in logged.text
    assert TOKEN[-40:] not in logged.text
    [record] = [r for r in logged.records() if r["message"].endswith("exited 1")]
    assert record["stderr_tail"] == f"error: bad token {REDACTED} rejected"


def test_a_token_cut_by_the_tail_boundary_leaves_no_fragment(
    tmp_path: Path, logged: Logged
) -> None:
    """When the kept tail starts inside a line holding the token, that line is dropped:
    the token's end, which no scrubber could recognise, is not logged."""
    logged.secrets.add(TOKEN)
    filler = "x" * (TAIL_BYTES - 300)
    notifier, _ = _notifier(
        tmp_path,
        f"""
        import sys
        sys.stderr.write("token " + {TOKEN!r} + " end\\n" + {filler!r} + "\\nlast words\\n")
        sys.exit(3)
        """,
    )
    _run_once(notifier)
    assert TOKEN[-100:-4] not in logged.text
    assert "tok" not in logged.text
    [record] = [r for r in logged.records() if r["message"].endswith("exited 3")]
    assert str(record["stderr_tail"]).endswith("last words")


def test_the_scrub_function_is_applied_to_the_tail(tmp_path: Path) -> None:
    """The notifier scrubs with what it is given (the registry's scrub in the CLI), even
    without the logging filter."""
    metrics = Metrics(CollectorRegistry())
    script = tmp_path / "hook.py"
    script.write_text(f"import sys\nsys.stderr.write({TOKEN!r})\nsys.exit(1)\n")
    seen: list[str] = []

    def scrub(text: str) -> str:
        seen.append(text)
        return text.replace(TOKEN, REDACTED)

    notifier = Notifier(
        (sys.executable, str(script)),
        timeout_s=10,
        base_env={},
        metrics=metrics,
        scrub=scrub,
    )
    _run_once(notifier)
    assert seen == [TOKEN]


def test_a_timeout_is_logged_counted_and_keeps_the_tail(tmp_path: Path, logged: Logged) -> None:
    """A hook hanging past the timeout is killed, counted as `timeout`, logged with what it
    said last."""
    notifier, metrics = _notifier(
        tmp_path,
        """
        import sys, time
        sys.stderr.write("waiting for the app\\n")
        sys.stderr.flush()
        time.sleep(30)
        """,
        timeout_s=0.5,
    )
    _run_once(notifier)
    assert _count(metrics, "timeout") == 1
    [record] = [r for r in logged.records() if "timed out after 0.5s" in str(r["message"])]
    assert record["level"] == "warning"
    assert record["stderr_tail"] == "waiting for the app"
