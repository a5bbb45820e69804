"""The emulator's command line: `python -m ims_emulator` and `refresher emulator`, flags and
`IMS_EMULATOR_*`, one line and exit 2 for every bad setting (never a traceback)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ims_emulator import AEM_CREDENTIALS_FILE, OAUTH_CREDENTIALS_FILE
from ims_emulator.cli import add_arguments, main
from tests.support.ims_wire import assertion, post_jwt

REPO = Path(__file__).resolve().parents[2]
EMULATOR = (sys.executable, "-m", "ims_emulator")
VIA_REFRESHER = (sys.executable, "-m", "refresher", "emulator")


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment without any REFRESHER_* or IMS_EMULATOR_* setting."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REFRESHER_", "IMS_EMULATOR_"))}
    env.update(extra or {})
    return env


def _stop(process: subprocess.Popen[str], sig: int = signal.SIGTERM) -> str:
    """Signal the process, wait, and return its stderr (killed if it does not stop)."""
    try:
        process.send_signal(sig)
        return process.communicate(timeout=10)[1]
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


def _wait_for_port(port_file: Path, process: subprocess.Popen[str]) -> int:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if port_file.exists():
            return int(port_file.read_text())
        if process.poll() is not None:
            pytest.fail(f"emulator exited early: {process.communicate()[1]}")
        time.sleep(0.02)
    pytest.fail("emulator did not write its port file")


def _emulator_process(
    *args: str, command: tuple[str, ...] = EMULATOR, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*command, *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=clean_env(env),
    )


def test_subprocess_serves_on_a_free_port_and_exits_0_on_sigterm(tmp_path: Path) -> None:
    """`python -m ims_emulator --port 0 --port-file` serves, logs safely, stops on SIGTERM."""
    creds, port_file = tmp_path / "creds", tmp_path / "port"
    process = _emulator_process(
        "--write-credentials", str(creds), "--port", "0", "--port-file", str(port_file)
    )
    try:
        port = _wait_for_port(port_file, process)
        base = f"http://127.0.0.1:{port}"
        aem = json.loads((creds / AEM_CREDENTIALS_FILE).read_text())["integration"]
        assert aem["imsEndpoint"] == f"127.0.0.1:{port}"
        token = assertion(base, aem)
        response = post_jwt(base, aem, token)
        assert response.status_code == 200
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0
    assert f"IMS emulator listening on {base} (credentials in {creds})" in stderr
    assert "POST /ims/exchange/jwt 200 issued" in stderr
    assert response.headers["x-debug-id"] in stderr
    for secret in (aem["technicalAccount"]["clientSecret"], token, response.json()["access_token"]):
        assert secret not in stderr

    # A restart on the same directory accepts the same credentials.
    port_file.unlink()
    process = _emulator_process(
        "--credentials-dir", str(creds), "--port", "0", "--port-file", str(port_file)
    )
    try:
        restarted = f"http://127.0.0.1:{_wait_for_port(port_file, process)}"
        assert post_jwt(restarted, aem).status_code == 200
        process.send_signal(signal.SIGINT)
        process.communicate(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0


def test_credentials_dir_without_files_is_a_usage_error(tmp_path: Path) -> None:
    """--credentials-dir on an empty directory exits 2 with a message, not a traceback."""
    result = subprocess.run(
        [sys.executable, "-m", "ims_emulator", "--credentials-dir", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert OAUTH_CREDENTIALS_FILE in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "argv",
    [
        ["--fault", "teapot"],
        ["--fault-mix", "500,teapot"],
        ["--fail-rate", "1.5"],
        ["--token-ttl", "0"],
        ["--retry-after", "-1"],
        ["--port", "70000"],
    ],
)
def test_add_arguments_rejects_bad_flag_values(argv: list[str]) -> None:
    """Bad fault kinds, rates, ttls and ports are refused by the parser (exit 2)."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with pytest.raises(SystemExit) as excinfo:
        parser.parse_args(argv)
    assert excinfo.value.code == 2


def test_add_arguments_gives_every_flag_a_help_text() -> None:
    """Every emulator flag documents itself in --help."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    flags = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert len(flags) >= 15
    assert all(action.help for action in flags)
    args = parser.parse_args(["--fault", "503", "--fault", "429", "--fault-mix", "drop,delay"])
    assert args.queue == ["503", "429"]
    assert args.mix == ("drop", "delay")


def test_help_of_both_entry_points_documents_the_flags_and_their_environment() -> None:
    """`python -m ims_emulator --help` and `refresher emulator --help` show every flag and
    its IMS_EMULATOR_* name, exit 0."""
    for command in (EMULATOR, VIA_REFRESHER):
        result = subprocess.run(
            [*command, "--help"], cwd=REPO, capture_output=True, text=True, timeout=30,
            env=clean_env(), check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        text = " ".join(result.stdout.split())  # argparse wraps help text
        for words in ("--clock-offset", "(env IMS_EMULATOR_PORT)", "(env IMS_EMULATOR_FAULT)"):
            assert words in text, (command, words)
        assert "REFRESHER_" not in text


def test_settings_come_from_ims_emulator_variables_and_refresher_ones_are_not_read(
    tmp_path: Path,
) -> None:
    """`refresher emulator` configured only by IMS_EMULATOR_* serves on the port they name;
    a REFRESHER_PORT that would not even parse is not read at all."""
    creds, port_file = tmp_path / "creds", tmp_path / "port"
    env = {
        "IMS_EMULATOR_PORT": "0",
        "IMS_EMULATOR_PORT_FILE": str(port_file),
        "IMS_EMULATOR_WRITE_CREDENTIALS": str(creds),
        "IMS_EMULATOR_CLOCK_OFFSET": "-30",
        "IMS_EMULATOR_FAULT": "503",
        "REFRESHER_PORT": "not-a-port",
    }
    process = _emulator_process(command=VIA_REFRESHER, env=env)
    try:
        base = f"http://127.0.0.1:{_wait_for_port(port_file, process)}"
        aem = json.loads((creds / AEM_CREDENTIALS_FILE).read_text())["integration"]
        assert post_jwt(base, aem).status_code == 503  # the queued fault, from the environment
        response = post_jwt(base, aem)
        assert response.status_code == 200
    finally:
        stderr = _stop(process)
    assert process.returncode == 0
    assert "clock offset -30 s" in stderr


def test_a_flag_on_the_command_line_wins_over_its_variable(tmp_path: Path) -> None:
    """--fault-mix given on the command line overrides IMS_EMULATOR_FAULT_MIX."""
    parser = argparse.ArgumentParser()
    from ims_emulator.cli import apply_environment

    options = add_arguments(parser)
    env = {"IMS_EMULATOR_FAULT_MIX": "drop", "IMS_EMULATOR_FAULT": "503,429"}
    argv = ["--fault-mix", "500"]
    apply_environment(parser, options, argv, env)
    args = parser.parse_args(argv)
    assert args.mix == ("500",)
    assert args.queue == ["503", "429"]


def _exit_of(argv: list[str], env: dict[str, str]) -> int:
    try:
        return main(argv, env)
    except SystemExit as exc:  # argparse's own errors exit through our one-line error()
        return int(exc.code or 0)


@pytest.mark.parametrize(
    ("argv", "env", "named"),
    [
        (["--port", "abc"], {}, "port"),
        (["--port", "70000"], {}, "port"),
        (["--fail-rate", "2"], {}, "fail_rate"),
        (["--cert-days", "abc"], {}, "cert days"),
        (["--token-ttl", "0"], {}, "token ttl"),
        (["--token-ttl", "nan"], {}, "token ttl"),
        (["--clock-offset", "inf"], {}, "clock offset"),
        (["--retry-after", "-1"], {}, "retry_after"),
        (["--fault", "teapot"], {}, "teapot"),
        (["--fault-mix", "500,teapot"], {}, "teapot"),
        ([], {"IMS_EMULATOR_PORT": "abc"}, "IMS_EMULATOR_PORT"),
        ([], {"IMS_EMULATOR_FAIL_RATE": "2"}, "IMS_EMULATOR_FAIL_RATE"),
        ([], {"IMS_EMULATOR_CERT_DAYS": "abc"}, "IMS_EMULATOR_CERT_DAYS"),
        ([], {"IMS_EMULATOR_FAULT": "503,teapot"}, "IMS_EMULATOR_FAULT"),
        ([], {"IMS_EMULATOR_TLS": "maybe"}, "IMS_EMULATOR_TLS"),
        ([], {"IMS_EMULATOR_PROT": "8080"}, "IMS_EMULATOR_PROT"),
        (["--write-credentials", "a", "--credentials-dir", "b"], {}, "credentials"),
        ([], {"IMS_EMULATOR_WRITE_CREDENTIALS": "a", "IMS_EMULATOR_CREDENTIALS_DIR": "b"},
         "exclude each other"),
    ],
)  # fmt: skip
def test_bad_settings_are_one_line_and_exit_2(
    argv: list[str], env: dict[str, str], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each bad flag or IMS_EMULATOR_* value: exit 2 and one line naming it, no traceback."""
    assert _exit_of(argv, env) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert named in err
    assert "Traceback" not in err


def test_bad_settings_in_a_real_process_never_show_a_traceback(tmp_path: Path) -> None:
    """As a subprocess too (`refresher emulator`): a bad fault from the environment and a
    bad port flag each end in one line and exit 2."""
    for args, env in ((["--port", "abc"], {}), ([], {"IMS_EMULATOR_FAULT": "teapot"})):
        result = subprocess.run(
            [*VIA_REFRESHER, *args], cwd=REPO, capture_output=True, text=True, timeout=30,
            env=clean_env(env), check=False,
        )  # fmt: skip
        assert result.returncode == 2, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "Traceback" not in result.stderr
