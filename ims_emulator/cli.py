"""The emulator's command line: `python -m ims_emulator` and `refresher emulator`.

Every flag also reads `IMS_EMULATOR_<FLAG>` (upper case, `-` as `_`); the
command line wins. An `IMS_EMULATOR_*` variable that names no flag is an error,
so a typo is never silently ignored; `REFRESHER_*` is never read here (that is
the client's namespace). Bad settings end in one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

from ims_emulator.credentials import AEM_CREDENTIALS_FILE, OAUTH_CREDENTIALS_FILE
from ims_emulator.files import write_file
from ims_emulator.server import Emulator
from ims_emulator.specs import (
    DEFAULT_FAULT_MIX,
    DEFAULT_FAULTS,
    FAULT_KINDS,
    MAX_CLOCK_OFFSET_S,
    FaultSpec,
    cert_days,
    clock_offset,
    integer,
    token_ttl,
)

__all__ = ["ENV_PREFIX", "SettingsError", "add_arguments", "build_parser", "main", "run"]

ENV_PREFIX = "IMS_EMULATOR_"
EXIT_OK, EXIT_RUNTIME, EXIT_USAGE = 0, 1, 2
_log = logging.getLogger("ims_emulator")


class SettingsError(ValueError):
    """A flag or environment value the emulator cannot use (exit 2)."""


def _checked(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse `type` from a validator: its ValueError becomes argparse's one-line error."""

    def parse(text: str) -> Any:
        try:
            return convert(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = getattr(convert, "__name__", "value")
    return parse


def _port(text: str) -> int:
    value = integer(text, "port")
    if value > 65535:
        raise ValueError(f"port must be at most 65535, not {text!r}")
    return value


@dataclass(frozen=True)
class _Option:
    """A flag as the environment sees it: its argparse action and how to read a value."""

    action: argparse.Action
    kind: str  # "value", "list" (comma-separated, like a repeated flag) or "switch"

    @property
    def env_name(self) -> str:
        return ENV_PREFIX + self.action.option_strings[0].lstrip("-").upper().replace("-", "_")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line and exit 2, like every other bad setting.
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def _fault_field(name: str) -> Callable[[str], Any]:
    """The check of one `FaultSpec` field, as an argparse type: one rule for flag and API."""
    check: Callable[[object], Any] = next(f for f in fields(FaultSpec) if f.name == name).metadata[
        "check"
    ]
    return _checked(check)


# (group, flag, kind, argparse keywords): the whole command line, declared once. The
# fault flags store under FaultSpec's field names (`--fault` appends to `queue`).
_FLAGS: tuple[tuple[str, str, str, dict[str, Any]], ...] = (
    ("listening", "--host", "value", {
        "default": "127.0.0.1", "help": "address to listen on (default: %(default)s)"}),
    ("listening", "--port", "value", {
        "type": _checked(_port), "default": 8080,
        "help": "port to listen on; 0 picks a free one (default: %(default)s)"}),
    ("listening", "--port-file", "value", {
        "type": Path, "metavar": "PATH",
        "help": "write the bound port to this file (atomically) once listening"}),
    ("listening", "--tls", "switch", {
        "action": "store_true",
        "help": "serve HTTPS with a generated CA; writes ca.pem into --tls-dir"}),
    ("listening", "--tls-dir", "value", {
        "type": Path, "metavar": "DIR",
        "help": "where ca.pem (and its key, reused on restart) live (default: the credentials "
        "dir)"}),
    ("credentials", "--write-credentials", "value", {
        "type": Path, "metavar": "DIR",
        "help": f"generate {AEM_CREDENTIALS_FILE} and {OAUTH_CREDENTIALS_FILE} in DIR (mode "
        "0600) and accept them; files already there are kept and accepted"}),
    ("credentials", "--credentials-dir", "value", {
        "type": Path, "metavar": "DIR",
        "help": "accept the credentials already in DIR (written earlier by --write-credentials, "
        "or a Developer Console project JSON)"}),
    ("credentials", "--cert-days", "value", {
        "type": _checked(cert_days), "default": 365.0, "metavar": "DAYS",
        "help": "validity of generated certificates in days; fractional or negative for tests "
        "(default: %(default)s)"}),
    ("credentials", "--token-ttl", "value", {
        "type": _checked(token_ttl), "default": 86400.0, "metavar": "SECONDS",
        "help": "lifetime of issued access tokens, fractions allowed (default: %(default)s)"}),
    ("fault injection and clock", "--fault", "list", {
        "action": "append", "choices": FAULT_KINDS, "default": [], "metavar": "KIND",
        "dest": "queue",
        "help": "queue a fault for the next token request; repeat to queue several, in order "
        f"({', '.join(FAULT_KINDS)})"}),
    ("fault injection and clock", "--fail-rate", "value", {
        "type": _fault_field("fail_rate"), "default": DEFAULT_FAULTS.fail_rate,
        "metavar": "RATE",
        "help": "probability (0..1) that a token request gets a random fault from --fault-mix"}),
    ("fault injection and clock", "--fault-mix", "value", {
        "type": _fault_field("mix"), "default": ",".join(DEFAULT_FAULT_MIX), "metavar": "KINDS",
        "dest": "mix",
        "help": "comma-separated fault kinds for --fail-rate (default: %(default)s)"}),
    ("fault injection and clock", "--seed", "value", {
        "type": _fault_field("seed"), "metavar": "N",
        "help": "seed for the random faults, to replay a run exactly"}),
    ("fault injection and clock", "--retry-after", "value", {
        "type": _fault_field("retry_after"), "default": DEFAULT_FAULTS.retry_after,
        "metavar": "SECONDS", "help": "Retry-After sent with 429 faults (default: %(default)s)"}),
    ("fault injection and clock", "--delay-seconds", "value", {
        "type": _fault_field("delay_seconds"), "default": DEFAULT_FAULTS.delay_seconds,
        "metavar": "SECONDS",
        "help": "how long a delay fault waits before answering (default: %(default)s)"}),
    ("fault injection and clock", "--clock-offset", "value", {
        "type": _checked(clock_offset), "default": 0.0, "metavar": "SECONDS",
        "help": "run the emulator's clock (its Date header, how it judges a JWT's exp) this "
        f"many seconds ahead, or behind if negative; at most {MAX_CLOCK_OFFSET_S:g} "
        "(default: 0)"}),
)  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> list[_Option]:
    """Add every emulator flag to `parser`; return them for the environment to fill."""
    groups: dict[str, Any] = {}
    options: list[_Option] = []
    for group_name, name, kind, keywords in _FLAGS:
        if group_name not in groups:
            groups[group_name] = parser.add_argument_group(group_name)
        action = groups[group_name].add_argument(name, **keywords)
        option = _Option(action, kind)
        action.help = f"{action.help} (env {option.env_name})"
        options.append(option)
    return options


def build_parser(prog: str = "python -m ims_emulator") -> tuple[_Parser, list[_Option]]:
    parser = _Parser(
        prog=prog,
        description="A local Adobe IMS emulator (JWT exchange and OAuth Server-to-Server): "
        "real checks, IMS's answers and units, fault injection.",
        epilog=f"Every flag also reads {ENV_PREFIX}<FLAG> (e.g. {ENV_PREFIX}PORT); "
        "the command line wins.",
    )
    return parser, add_arguments(parser)


def _given(option: _Option, argv: Sequence[str]) -> bool:
    names = option.action.option_strings
    return any(arg in names or arg.split("=", 1)[0] in names for arg in argv)


def _env_value(option: _Option, raw: str) -> Any:
    """Convert an environment value as argparse would convert the flag's. Raises ValueError."""
    action = option.action
    if option.kind == "switch":
        word = raw.strip().lower()
        if word not in ("1", "true", "yes", "on", "0", "false", "no", "off", ""):
            raise ValueError(f"expected true or false, not {raw!r}")
        return word in ("1", "true", "yes", "on")
    items = [item.strip() for item in raw.split(",")] if option.kind == "list" else [raw]
    values = []
    for item in items:
        try:
            value = action.type(item) if callable(action.type) else item
        except argparse.ArgumentTypeError as exc:
            raise ValueError(str(exc)) from None
        if action.choices is not None and value not in action.choices:
            raise ValueError(f"{item!r} is not one of {', '.join(map(str, action.choices))}")
        values.append(value)
    return values if option.kind == "list" else values[0]


def apply_environment(
    parser: argparse.ArgumentParser,
    options: list[_Option],
    argv: Sequence[str],
    environ: Mapping[str, str],
) -> None:
    """Flags missing from argv take their `IMS_EMULATOR_*` value. Raises SettingsError."""
    by_name = {option.env_name: option for option in options}
    unknown = sorted(k for k in environ if k.startswith(ENV_PREFIX) and k not in by_name)
    if unknown:
        raise SettingsError(f"unknown environment variable(s) {', '.join(unknown)}: no such flag")
    for name, option in by_name.items():
        if name not in environ or _given(option, argv):
            continue
        try:
            value = _env_value(option, environ[name])
        except ValueError as exc:
            raise SettingsError(f"{name}: {exc}") from None
        parser.set_defaults(**{option.action.dest: value})


def main(
    argv: Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    prog: str = "python -m ims_emulator",
) -> int:
    """Parse flags and `IMS_EMULATOR_*`, serve until SIGTERM/SIGINT. Returns the exit code."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    parser, options = build_parser(prog)
    try:
        apply_environment(parser, options, arguments, os.environ if environ is None else environ)
    except SettingsError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return run(parser.parse_args(arguments))


def run(args: argparse.Namespace, stop: threading.Event | None = None) -> int:
    """Serve until SIGTERM/SIGINT (or until `stop` is set, if given). Returns an exit code.

    Signal handlers are installed only when `stop` is not given, and the
    previous ones are restored on return.
    """
    if args.write_credentials is not None and args.credentials_dir is not None:
        print(
            "emulator: --write-credentials and --credentials-dir exclude each other",
            file=sys.stderr,
        )
        return EXIT_USAGE
    credentials_dir: Path | None = args.write_credentials or args.credentials_dir
    if args.tls and (args.tls_dir or credentials_dir) is None:
        print("emulator: --tls needs --tls-dir or a credentials directory", file=sys.stderr)
        return EXIT_USAGE
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s emulator %(message)s"))
    previous_level, previous_propagate = _log.level, _log.propagate
    _log.addHandler(handler)
    _log.setLevel(logging.INFO)
    _log.propagate = False  # one line per request on stderr, whatever the root logger does
    try:
        return _serve(args, credentials_dir, stop)
    finally:
        _log.removeHandler(handler)
        _log.setLevel(previous_level)
        _log.propagate = previous_propagate


def _start(args: argparse.Namespace, credentials_dir: Path | None) -> Emulator | int:
    """The started emulator, or the exit code of a failure already reported."""
    try:
        return Emulator.start(
            credentials_dir,
            token_ttl_s=args.token_ttl,
            tls=args.tls,
            host=args.host,
            port=args.port,
            cert_days=args.cert_days,
            tls_dir=args.tls_dir,
            generate=args.credentials_dir is None,
            clock_offset_s=args.clock_offset,
        )
    except FileNotFoundError as exc:
        print(f"emulator: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (OSError, ValueError, TypeError, KeyError) as exc:
        print(f"emulator: cannot start: {exc}", file=sys.stderr)
        return EXIT_RUNTIME if isinstance(exc, OSError) else EXIT_USAGE


def _serve(
    args: argparse.Namespace, credentials_dir: Path | None, stop: threading.Event | None
) -> int:
    # The fault flags' dests are FaultSpec's field names: nothing to translate.
    faults = FaultSpec.from_mapping({f.name: getattr(args, f.name) for f in fields(FaultSpec)})
    emulator = _start(args, credentials_dir)
    if isinstance(emulator, int):
        return emulator
    with emulator:
        emulator.set_faults(**vars(faults))
        if args.port_file is not None:
            write_file(args.port_file, str(emulator.port).encode(), 0o644)
        where = (
            f"credentials in {credentials_dir}"
            if credentials_dir
            else "no credentials: register clients with POST /__emulator/clients"
        )
        notes = f"; CA certificate {emulator.ca_path}" if emulator.ca_path else ""
        if emulator.clock_offset_s:
            notes += f"; clock offset {emulator.clock_offset_s:+g} s"
        print(
            f"IMS emulator listening on {emulator.base_url} ({where}{notes})",
            file=sys.stderr,
            flush=True,
        )
        _wait_for_stop(stop)
    return EXIT_OK


def _wait_for_stop(stop: threading.Event | None) -> None:
    if stop is not None:
        stop.wait()
        return
    event = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        event.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        # A short timeout keeps the main thread responsive to signals on every platform.
        while not event.wait(0.5):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
