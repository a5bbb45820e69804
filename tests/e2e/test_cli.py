"""The CLI contract: flags and REFRESHER_* variables, one-line errors with exit 2, --help,
and `check`'s secret-free summary. All through the real CLI as a subprocess."""

from __future__ import annotations

import json
import re

import pytest

from tests.support.harness import Harness


def one_line_error(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


def test_help_lists_commands_and_exit_codes(harness: Harness) -> None:
    """`refresher --help` lists every command as an entry of its own (not a word that
    happens to occur: "run" is also in "run time"), each exit code, and REFRESHER_<FLAG>."""
    result = harness.run("--help")
    assert result.returncode == 0
    entries = re.findall(r"^ {4}([a-z]+) {2,}\S", result.stdout, re.MULTILINE)
    assert entries == ["run", "once", "check", "token", "inject", "injector", "emulator"]
    codes = re.findall(r"^ {2}([0-3]) {2}\S", result.stdout.split("exit codes:")[1], re.MULTILINE)
    assert codes == ["0", "1", "2", "3"]
    assert "REFRESHER_<FLAG>" in result.stdout


def test_run_help_shows_env_names(harness: Harness) -> None:
    """Each flag of `run` names its own environment variable in its help (the epilog's
    example variable does not count for every flag)."""
    result = harness.run("run", "--help")
    assert result.returncode == 0
    usage, _, options = result.stdout.partition("options:")
    flags = set(re.findall(r"\[(--[a-z-]+)", usage)) - {"--help"}
    assert len(flags) >= 20, flags
    text = " ".join(options.split())  # argparse wraps help text
    for flag in sorted(flags):
        assert f"(env REFRESHER_{flag[2:].upper().replace('-', '_')})" in text, flag


def test_unknown_refresher_variable_is_an_error(harness: Harness) -> None:
    """A REFRESHER_* variable that names no flag (a typo) exits 2 naming it."""
    result = harness.run(
        "check", "--credentials", str(harness.oauth), env={"REFRESHER_TOKEN_DRI": "/tmp/x"}
    )
    assert result.returncode == 2
    assert "REFRESHER_TOKEN_DRI" in one_line_error(result.stderr)


def test_variable_of_another_subcommand_is_ignored(harness: Harness) -> None:
    """`check` ignores REFRESHER_TOKEN_DIR and REFRESHER_RETRY_TIMEOUT (flags of other
    commands: one environment serves every subcommand)."""
    result = harness.run(
        "check",
        "--credentials",
        str(harness.oauth),
        "--allow-insecure-http",
        env={"REFRESHER_TOKEN_DIR": "/nonexistent", "REFRESHER_RETRY_TIMEOUT": "1"},
    )
    assert result.returncode == 0, result.stderr


def test_environment_supplies_flags_and_command_line_wins(harness: Harness) -> None:
    """REFRESHER_CREDENTIALS is used when --credentials is absent; the flag wins when given."""
    from_env = harness.run("check", env={"REFRESHER_CREDENTIALS": str(harness.oauth)})
    assert from_env.returncode == 0, from_env.stderr
    assert "flow: oauth" in from_env.stdout
    flag_wins = harness.run(
        "check",
        "--credentials",
        str(harness.aem),
        env={"REFRESHER_CREDENTIALS": str(harness.oauth)},
    )
    assert flag_wins.returncode == 0, flag_wins.stderr
    assert "flow: jwt" in flag_wins.stdout


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["once", "--token-dir", "/tmp/x"], "--credentials is required"),
        (["once", "--credentials", "CREDS"], "no output"),
        (
            ["once", "--credentials", "CREDS", "--token-dir", "T", "--refresh-ratio", "1.5"],
            "--refresh-ratio",
        ),
        (["once", "--credentials", "CREDS", "--token-dir", "T", "--jwt-ttl", "abc"], "--jwt-ttl"),
        (
            ["once", "--credentials", "CREDS", "--token-dir", "T", "--file-mode", "0999"],
            "--file-mode",
        ),
        (
            ["once", "--credentials", "CREDS", "--token-dir", "T", "--file-mode", "0666"],
            "not be writable by group or others",
        ),
        (["once", "--credentials", "CREDS", "--token-dir", "T", "--flow", "saml"], "--flow"),
        (
            [
                "once",
                "--credentials",
                "CREDS",
                "--token-dir",
                "T",
                "--ims-endpoint",
                "http://ims.example",
            ],
            "--allow-insecure-http",
        ),
        (
            ["once", "--credentials", "CREDS", "--token-dir", "T", "--ca-bundle", "/nonexistent"],
            "--ca-bundle",
        ),
        (["run", "--credentials", "CREDS", "--token-dir", "T", "--listen", "nowhere"], "--listen"),
        (["once", "--bogus-flag"], "unrecognized arguments"),
        (
            ["once", "--credentials", "/nonexistent/creds.json", "--token-dir", "T"],
            "/nonexistent/creds.json",
        ),
    ],
)
def test_bad_configuration_is_one_line_and_exit_2(
    harness: Harness, args: list[str], needle: str
) -> None:
    """Each configuration mistake gets one clear line on stderr and exit code 2."""
    args = [
        str(harness.oauth) if a == "CREDS" else str(harness.root / "t") if a == "T" else a
        for a in args
    ]
    result = harness.run(*args)
    assert result.returncode == 2
    assert needle in one_line_error(result.stderr)


def test_several_problems_are_reported_together(harness: Harness) -> None:
    """Two bad flags are both named in the one error line."""
    result = harness.run(
        "once",
        "--credentials",
        str(harness.oauth),
        "--token-dir",
        "t",
        "--jitter",
        "2",
        "--read-timeout",
        "-1",
    )
    line = one_line_error(result.stderr)
    assert "--jitter" in line
    assert "--read-timeout" in line


def test_bad_credentials_never_echo_the_secret(harness: Harness) -> None:
    """Credentials with a wrong-typed field exit 2, naming the field but not the secret."""
    document = json.loads(harness.oauth.read_text())
    document["scopes"] = 42
    broken = harness.root / "broken.json"
    broken.write_text(json.dumps(document))
    result = harness.run("check", "--credentials", str(broken))
    assert result.returncode == 2
    line = one_line_error(result.stderr)
    assert "scopes" in line.replace(str(broken), "")  # the field, not the file name
    assert str(broken) in line


def test_check_prints_a_summary_without_secrets(harness: Harness) -> None:
    """`check` on AEM credentials prints flow, client id, IMS host, key size and certificate
    days left, and no secret."""
    integration = json.loads(harness.aem.read_text())["integration"]
    result = harness.run("check", "--credentials", str(harness.aem))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "flow: jwt" in out
    assert integration["technicalAccount"]["clientId"] in out
    assert "ims: https://" in out
    report = dict(line.split(": ", 1) for line in out.splitlines())
    assert report["key_size"] == "2048"
    assert 364 <= float(report["certificate_days_left"]) <= 365  # issued for 365 days
    assert "ent_aem_cloud_api" in out


ODD_NUMBERS = [
    # (flag, value, the subcommands that take the flag)
    ("--jwt-ttl", "inf", ("check", "once", "run")),
    ("--jwt-ttl", "nan", ("check", "once", "run")),
    ("--jwt-ttl", "0.5", ("check", "once", "run")),
    ("--jwt-ttl", "0", ("check", "once", "run")),
    ("--jwt-ttl", "86401", ("check", "once", "run")),
    ("--connect-timeout", "inf", ("check", "once", "run")),
    ("--read-timeout", "1e300", ("check", "once", "run")),
    ("--watch-interval", "1e300", ("once", "run")),
    ("--watch-interval", "inf", ("once", "run")),
    ("--permanent-retry-interval", "1e300", ("once", "run")),
    ("--backoff-initial", "1e300", ("once", "run")),
    ("--backoff-max", "nan", ("once", "run")),
    ("--retry-timeout", "inf", ("once",)),
    ("--on-refresh-timeout", "1e300", ("once", "run")),
]


@pytest.mark.parametrize(
    ("command", "flag", "value"),
    [(command, flag, value) for flag, value, commands in ODD_NUMBERS for command in commands],
)
def test_odd_numbers_are_one_line_and_exit_2(
    harness: Harness, command: str, flag: str, value: str
) -> None:
    """inf, nan, a fraction of a whole-seconds flag, zero, or a duration past its sane maximum:
    one line naming the flag, exit 2, in every subcommand that takes the flag (never an
    OverflowError in the loop, never a silently truncated value)."""
    args = [command, "--credentials", str(harness.oauth), flag, value]
    if command != "check":
        # Should the value slip through, fail fast rather than run: nothing listens on :9.
        args += ["--token-dir", str(harness.root / "t")]
        args += ["--ims-endpoint", "http://127.0.0.1:9", "--allow-insecure-http"]
    if command == "once" and flag != "--retry-timeout":
        args += ["--retry-timeout", "2"]
    result = harness.run(*args, timeout=20)
    assert result.returncode == 2, result.stderr
    assert flag in one_line_error(result.stderr)


@pytest.mark.parametrize(
    ("value", "code"), [("yes", 0), ("TRUE", 0), ("1", 0), ("0", 2), ("off", 2), ("maybe", 2)]
)
def test_boolean_variables_go_through_the_one_boolean_parser(
    harness: Harness, value: str, code: int
) -> None:
    """REFRESHER_ALLOW_INSECURE_HTTP is parsed like every other value: true/yes/on/1 permit
    plain HTTP, false/no/off/0 do not, anything else is one line and exit 2 (not "false")."""
    result = harness.run(
        "check",
        "--credentials",
        str(harness.oauth),
        "--ims-endpoint",
        "http://127.0.0.1:9",
        env={"REFRESHER_ALLOW_INSECURE_HTTP": value},
    )
    assert result.returncode == code, result.stderr
    if code:
        line = one_line_error(result.stderr)
        expected = "--allow-insecure-http" if value == "maybe" else "plain HTTP"
        assert expected in line
