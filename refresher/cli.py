"""The composition root: flags and environment in, everything built and wired, exit code out.

Only this module reads the environment, installs signal handlers and exits.
Every flag also reads `REFRESHER_<FLAG>`; the command line wins. A `REFRESHER_*`
variable that names no flag of any subcommand is an error (a typo is never ignored).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING, NoReturn

from refresher import __version__
from refresher.config import build_settings, flag_defaults, parse_bool
from refresher.errors import EXIT_OK, EXIT_RUNTIME, EXIT_USAGE, ConfigError, RefresherError

if TYPE_CHECKING:
    from refresher.app import App

ENV_PREFIX = "REFRESHER_"


@dataclass(frozen=True)
class Flag:
    name: str
    help: str
    """What it does; the default is added from `Settings` (see `described`)."""
    metavar: str | None = None
    boolean: bool = False

    @property
    def env(self) -> str:
        return _env_name(self.name)

    @property
    def described(self) -> str:
        """The help text with the default that `Settings` declares for this flag."""
        default = flag_defaults().get(self.name)
        return f"{self.help} [{default}]" if default is not None else self.help


_CREDENTIALS = [
    Flag("credentials", "credentials file, or a mounted Secret directory (required)", "PATH"),
    Flag("flow", "auto (JWT when a private key is present, else OAuth), jwt or oauth", "FLOW"),
    Flag(
        "ims-endpoint",
        "IMS host or URL [from the credentials, else ims-na1.adobelogin.com]",
        "HOST|URL",
    ),
    Flag(
        "ims-audience",
        "IMS base URL for the JWT's aud and metascope claims, when IMS is reached through "
        "a gateway under another host name [the endpoint's]",
        "URL",
    ),
]
_EXCHANGE = [
    Flag(
        "allow-insecure-http", "permit a plain http:// IMS endpoint (emulator, tests)", boolean=True
    ),
    Flag("ca-bundle", "extra CA certificates (PEM) to trust for IMS", "PATH"),
    Flag("jwt-ttl", "lifetime of the signed JWT assertion, seconds", "S"),
    Flag("connect-timeout", "IMS connect timeout, seconds", "S"),
    Flag(
        "read-timeout",
        "IMS read timeout, seconds; connect plus read timeout bound the whole exchange",
        "S",
    ),
    Flag(
        "min-token-lifetime",
        "a token granted for less than this is a bad answer, retried, never published, seconds",
        "S",
    ),
    Flag("backoff-initial", "first retry delay after a transient failure, seconds", "S"),
    Flag("backoff-max", "cap of the exponential backoff, seconds", "S"),
    Flag(
        "permanent-retry-interval",
        "pause after IMS rejected the credentials, seconds; a credentials change ends it",
        "S",
    ),
]
_OUTPUT = [
    Flag("token-dir", "publish access_token, expires_at, token.json here (..data swap)", "DIR"),
    Flag("file-mode", "mode of the published files, octal", "MODE"),
    Flag("secret", "publish to this Kubernetes Secret", "NAME"),
    Flag("secret-namespace", "namespace of --secret [the pod's]", "NS"),
    Flag("on-refresh", "run CMD (no shell) after each publish", "CMD"),
    Flag("on-refresh-timeout", "kill --on-refresh after this many seconds", "S"),
]
_SCHEDULE = [
    Flag("refresh-ratio", "refresh when this fraction of the lifetime has passed", "R"),
    Flag("jitter", "... earlier by a random fraction of the lifetime up to this", "J"),
    Flag("watch-interval", "stat the credentials for changes this often, seconds", "S"),
]
_ONCE = [Flag("retry-timeout", "give up retrying after this many seconds", "S")]
_CHECK = [
    Flag(
        "online",
        "then exchange once and report what IMS granted or why it refused (never the token)",
        boolean=True,
    )
]
_SERVER = [Flag("listen", "HOST:PORT of /healthz, /readyz, /metrics; empty disables", "ADDR")]
_LOGGING = [
    Flag("log-format", "json or text", "FORMAT"),
    Flag("log-level", "debug, info, warning or error", "LEVEL"),
]

COMMANDS: dict[str, tuple[str, list[Flag]]] = {
    "run": (
        "keep a fresh token published, forever (the container's default command)",
        _CREDENTIALS + _EXCHANGE + _OUTPUT + _SCHEDULE + _SERVER + _LOGGING,
    ),
    "once": (
        "obtain and publish one token, then exit (init containers, CronJobs, scripts)",
        _CREDENTIALS + _EXCHANGE + _OUTPUT + _SCHEDULE + _ONCE + _LOGGING,
    ),
    "check": (
        "validate configuration and credentials offline and print a summary (no secrets)",
        _CREDENTIALS + _EXCHANGE + _CHECK + _LOGGING,
    ),
    "token": (
        "exchange once and print only the access token on stdout (logs on stderr)",
        _CREDENTIALS + _EXCHANGE + _LOGGING,
    ),
}


def configuration_table() -> str:
    """The README's configuration table: every flag of run, once, check and token."""
    commands: dict[str, list[str]] = {}
    flags: dict[str, Flag] = {}
    for command, (_, command_flags) in COMMANDS.items():
        for flag in command_flags:
            flags.setdefault(flag.name, flag)
            commands.setdefault(flag.name, []).append(command)
    rows = ["| flag | environment | commands | meaning [default] |", "|---|---|---|---|"]
    rows += [
        f"| `--{name}` | `{flag.env}` | {', '.join(commands[name])} | {flag.described} |"
        for name, flag in flags.items()
    ]
    return "\n".join(rows) + "\n"


EXIT_CODES = """exit codes:
  0  success
  1  failed at run time (IMS unreachable after retries, a sink failed)
  2  bad usage, configuration or credentials
  3  IMS rejected the credentials

Every flag also reads REFRESHER_<FLAG> (e.g. REFRESHER_TOKEN_DIR); the command line wins."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line and exit 2, like every other configuration problem.
        self.exit(EXIT_USAGE, f"refresher: error: {message} (see --help)\n")


def _env_name(flag: str) -> str:
    return ENV_PREFIX + flag.upper().replace("-", "_")


def build_parser() -> argparse.ArgumentParser:
    """The whole CLI. `emulator` is only listed here: run_cli hands its arguments to the
    `ims_emulator` package, which has its own flags and reads IMS_EMULATOR_*."""
    parser = _Parser(
        prog="refresher",
        description="Keeps an Adobe IMS access token fresh for the application next to it.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (summary, flags) in COMMANDS.items():
        sub = commands.add_parser(
            name,
            help=summary,
            description=summary,
            epilog=EXIT_CODES,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        for flag in flags:
            help_text = f"{flag.described} (env {flag.env})"
            if flag.boolean:
                sub.add_argument(
                    f"--{flag.name}", action="store_true", default=None, help=help_text
                )
            else:
                sub.add_argument(f"--{flag.name}", metavar=flag.metavar, help=help_text)
    from refresher import inject_cli  # noqa: PLC0415 - argparse only; YAML and TLS load on use

    inject_cli.add_commands(commands)
    commands.add_parser(
        "emulator",
        add_help=False,
        help="a local Adobe IMS emulator for demos and tests (see `refresher emulator --help`)",
    )
    return parser


def _dests(parser: argparse.ArgumentParser, command: str) -> dict[str, object]:
    """The options of `command` as parsed from nothing: their dests, all unset."""
    return {k: v for k, v in vars(parser.parse_args([command])).items() if k != "command"}


def _known_env(parser: argparse.ArgumentParser) -> set[str]:
    names = {_env_name(flag.name) for _, flags in COMMANDS.values() for flag in flags}
    for command in ("inject", "injector"):
        names |= {_env_name(dest) for dest in _dests(parser, command)}
    return names


def _check_env(parser: argparse.ArgumentParser, environ: dict[str, str]) -> None:
    unknown = sorted(k for k in environ if k.startswith(ENV_PREFIX) and k not in _known_env(parser))
    if unknown:
        raise ConfigError(f"unknown environment variable(s) {', '.join(unknown)}: no such flag")


def _apply_env(args: argparse.Namespace, environ: dict[str, str]) -> None:
    """Options missing from argv take their `REFRESHER_*` value, as text: booleans
    included, which `build_settings` parses with every other value (one parser)."""
    for dest, value in vars(args).items():
        if dest != "command" and value is None:
            setattr(args, dest, environ.get(_env_name(dest)))


def _raw(args: argparse.Namespace, flags: list[Flag]) -> dict[str, str | None]:
    """The raw settings of the command, flag names with `_`: text, or None when unset."""
    raw: dict[str, str | None] = {}
    for flag in flags:
        key = flag.name.replace("-", "_")
        value = getattr(args, key, None)
        raw[key] = "true" if value is True else value
    return raw


def main(argv: Sequence[str] | None = None) -> NoReturn:
    sys.exit(run_cli(list(sys.argv[1:] if argv is None else argv), dict(os.environ)))


def run_cli(argv: list[str], environ: dict[str, str]) -> int:
    command = next((a for a in argv if not a.startswith("-")), None)
    if command == "emulator":
        # A program of its own (it shares no code with the client): imported only here.
        from ims_emulator.cli import main as emulator_main  # noqa: PLC0415

        rest = argv[argv.index("emulator") + 1 :]
        return emulator_main(rest, environ, prog="refresher emulator")
    parser = build_parser()
    try:
        _check_env(parser, environ)
    except ConfigError as exc:
        print(f"refresher: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    _apply_env(args, environ)
    try:
        return _dispatch(args, environ)
    except RefresherError as exc:
        hint = getattr(exc, "hint", None)  # IMS's rejections say what to fix
        print(f"refresher: error: {exc}" + (f" (hint: {hint})" if hint else ""), file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return EXIT_OK
    except Exception as exc:  # noqa: BLE001 - the last line of defence: no traceback, no secret
        # Only the type: an unexpected exception's message could quote a secret.
        print(
            f"refresher: internal error ({type(exc).__name__}); please report it", file=sys.stderr
        )
        return EXIT_RUNTIME


def _dispatch(args: argparse.Namespace, environ: dict[str, str]) -> int:
    command: str = args.command
    if command in ("inject", "injector"):
        from refresher import inject_cli  # noqa: PLC0415

        return inject_cli.run(args)
    settings = build_settings(
        _raw(args, COMMANDS[command][1]), needs_output=command not in ("check", "token")
    )
    if command in ("check", "token"):
        from refresher import online  # noqa: PLC0415 - no loop, no sinks, no metrics

        if command == "token":
            return online.token(settings)
        return online.check(settings, _say, online=_flag_on(args, "online"))
    from refresher.app import App  # noqa: PLC0415 - the whole pipeline: not for --help

    return _serve(App.build(command, settings, environ))


def _say(key: str, value: object) -> None:
    print(f"{key}: {value}")


def _flag_on(args: argparse.Namespace, name: str) -> bool:
    """A boolean flag that `Settings` does not hold (`check --online`), parsed by the
    same parser as every other boolean."""
    value = getattr(args, name, None)
    if not isinstance(value, str):
        return value is True
    try:
        return parse_bool(value)
    except ValueError as exc:
        raise ConfigError(f"--{name}={value!r}: {exc}") from None


def _serve(application: App) -> int:
    """Run `run` or `once` until it ends or a signal stops it (the handlers are ours)."""

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        application.stop(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return application.run()
