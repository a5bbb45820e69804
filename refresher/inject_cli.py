"""`refresher inject` and `refresher injector`: their flags and their composition.

`cli.py` only adds these subcommands and hands them over. Nothing heavy is
imported here at module level: PyYAML, the HTTP server and TLS load only when one
of these two commands runs, so `refresher run` never pays for them.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Hashable
from pathlib import Path
from typing import IO, Any

from refresher import __version__
from refresher.errors import EXIT_OK, EXIT_USAGE

COMMANDS = ("inject", "injector")
# The released image, the one the manifests use; --image overrides (a registry mirror, a digest).
DEFAULT_IMAGE = f"ghcr.io/example/ims-token-refresher:{__version__}"
INJECTOR_LISTEN = "0.0.0.0:8443"  # the API server must reach the webhook
_MAX_IMAGE = 512


def _env(flag: str) -> str:
    return "REFRESHER_" + flag.upper().replace("-", "_")


def add_commands(commands: Any) -> None:
    """Add the two subcommands to the CLI's subparsers (every flag reads REFRESHER_<FLAG>)."""
    inject = commands.add_parser(
        "inject",
        help="add the refresher to opted-in pod templates in YAML or JSON manifests",
        description=(
            "Read Kubernetes objects (YAML or JSON, many documents; Pod, Deployment,"
            " StatefulSet, DaemonSet, ReplicaSet, Job, CronJob, List) and write them as YAML"
            " with the refresher injected into every pod template labelled"
            ' ims-token-refresher.io/inject: "true". Other documents pass through unchanged.'
            " A refusal is one line on stderr naming the document, exit 2, nothing written."
        ),
    )
    inject.add_argument(
        "-f",
        "--filename",
        metavar="FILE",
        help=f"the manifests; - is standard input [-] (env {_env('filename')})",
    )
    _image_flag(inject)
    injector = commands.add_parser(
        "injector",
        help="the mutating admission webhook that injects the refresher into opted-in pods",
        description=(
            "HTTPS (TLS 1.2+): POST /mutate (AdmissionReview v1, JSONPatch), GET /healthz,"
            " /readyz, /metrics. The certificate and key are reloaded when their files change."
        ),
    )
    injector.add_argument(
        "--listen",
        metavar="ADDR",
        help=f"HOST:PORT of the webhook [{INJECTOR_LISTEN}] (env {_env('listen')})",
    )
    for flag, what in (("tls-cert-file", "certificate chain"), ("tls-key-file", "private key")):
        injector.add_argument(
            f"--{flag}",
            metavar="PATH",
            help=f"PEM {what}, reloaded when the file changes (required) (env {_env(flag)})",
        )
    _image_flag(injector)
    injector.add_argument(
        "--log-format", metavar="FORMAT", help=f"json or text [json] (env {_env('log-format')})"
    )
    injector.add_argument(
        "--log-level",
        metavar="LEVEL",
        help=f"debug, info, warning or error [info] (env {_env('log-level')})",
    )


def _image_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--image",
        metavar="IMAGE",
        help=f"the refresher image to inject [{DEFAULT_IMAGE}] (env {_env('image')})",
    )


def run(args: argparse.Namespace) -> int:
    """Run `inject` or `injector`; every failure is one line on stderr with its exit code."""
    try:
        image = _image(args.image)
        if args.command == "inject":
            return inject_command(args.filename or "-", image, sys.stdin, sys.stdout)
        return _injector(args, image)
    except UsageError as exc:
        print(f"refresher: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


def _injector(args: argparse.Namespace, image: str) -> int:
    """Serve the webhook until SIGTERM or SIGINT, then close and exit 0."""
    import signal  # noqa: PLC0415
    import threading  # noqa: PLC0415

    from prometheus_client import CollectorRegistry, disable_created_metrics  # noqa: PLC0415

    from refresher import injector  # noqa: PLC0415 - TLS, HTTP and metrics load only here
    from refresher.httpserver import HttpServer  # noqa: PLC0415
    from refresher.logs import SecretRegistry, setup_logging  # noqa: PLC0415

    host, port = _listen(args.listen or INJECTOR_LISTEN)
    if not args.tls_cert_file or not args.tls_key_file:
        raise UsageError("--tls-cert-file and --tls-key-file are required")
    log_format = _choice("--log-format", args.log_format or "json", ("json", "text"))
    log_level = _choice(
        "--log-level", args.log_level or "info", ("debug", "info", "warning", "error")
    )
    setup_logging(log_format, log_level, SecretRegistry())
    disable_created_metrics()  # type: ignore[no-untyped-call]
    metrics = injector.InjectorMetrics(CollectorRegistry(auto_describe=True))
    try:
        tls = injector.CertificateFiles(Path(args.tls_cert_file), Path(args.tls_key_file), metrics)
    except injector.CertificateError as exc:
        raise UsageError(str(exc)) from None
    webhook = injector.Webhook(image, metrics)
    try:
        server = HttpServer(
            host,
            port,
            webhook.handle,
            limits=injector.LIMITS,
            methods=injector.METHODS,
            tls=tls,
            name="injector",
        )
    except OSError as exc:
        raise UsageError(f"--listen {host}:{port}: {exc.strerror}") from None
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    server.start()
    logging.getLogger("refresher.injector").info(
        "serving admission reviews", extra={"listen": f"{host}:{server.port}", "image": image}
    )
    stop.wait()
    server.close()
    return EXIT_OK


def _listen(text: str) -> tuple[str, int]:
    import ipaddress  # noqa: PLC0415

    host, sep, port_text = text.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"  # noqa: S104 - the API server must reach the webhook
    try:
        if not sep:
            raise ValueError(text)  # noqa: TRY301 - one message for every bad form
        if host != "localhost":
            ipaddress.ip_address(host)
        port = int(port_text)
        if not 0 <= port <= 65535:
            raise ValueError(port_text)  # noqa: TRY301
    except ValueError:
        raise UsageError(f"--listen {text!r} is not HOST:PORT") from None
    return host, port


def _choice(flag: str, value: str, choices: tuple[str, ...]) -> str:
    if value.lower() not in choices:
        raise UsageError(f"{flag} {value!r} must be one of {', '.join(choices)}")
    return value.lower()


class UsageError(Exception):
    """Bad input or flags: one line, exit 2."""


def _image(text: str | None) -> str:
    if text is None:
        return DEFAULT_IMAGE
    if not text or len(text) > _MAX_IMAGE or any(c.isspace() or not c.isprintable() for c in text):
        raise UsageError("--image must be an image reference (no spaces)")
    return text


# --- inject ---------------------------------------------------------------------


def inject_command(source: str, image: str, stdin: IO[str], stdout: IO[str]) -> int:
    from refresher.inject import inject_documents  # noqa: PLC0415

    documents = load_documents(_read(source, stdin), _source_name(source))
    injected, report = inject_documents(documents, image=image)
    for hint in report.hints:
        print(f"refresher: warning: {hint}", file=sys.stderr)
    if report.refused:
        # Nothing on stdout: half a pipeline's manifests must never reach `kubectl apply`.
        for line in report.refused:
            print(f"refresher: error: {line}", file=sys.stderr)
        return EXIT_USAGE
    try:
        output = dump_documents(injected)
    except RecursionError:  # JSON parses deeper than the YAML writer can recurse
        raise UsageError(f"{_source_name(source)}: nested too deeply") from None
    stdout.write(output)
    return EXIT_OK


def _source_name(source: str) -> str:
    return "standard input" if source == "-" else source


# Far above any rendered set of manifests; parsed, the documents take tens of times
# this in memory. Without a bound, `-f /dev/zero` (or a runaway generator upstream
# of the pipe) is read until the memory runs out.
MAX_INPUT_CHARS = 64 << 20


def _read(source: str, stdin: IO[str]) -> str:
    name = "standard input" if source == "-" else f"-f {source}"
    try:
        if source == "-":
            text = stdin.read(MAX_INPUT_CHARS + 1)
        else:
            with Path(source).open(encoding="utf-8") as file:
                text = file.read(MAX_INPUT_CHARS + 1)
    except UnicodeDecodeError:
        raise UsageError(f"{name}: not UTF-8 text") from None
    except OSError as exc:
        raise UsageError(f"{name}: {exc.strerror or type(exc).__name__}") from None
    if len(text) > MAX_INPUT_CHARS:
        raise UsageError(f"{name}: over {MAX_INPUT_CHARS >> 20} MiB")
    return text


def load_documents(text: str, source: str) -> list[Any]:
    """The documents of a YAML or JSON stream (empty ones dropped), or `UsageError`."""
    import yaml  # noqa: PLC0415 - only inject reads YAML

    if text.lstrip().startswith(("{", "[")):
        try:
            return [json.loads(text, object_pairs_hook=_json_object)]
        except ValueError:
            pass  # YAML flow style looks the same: let the YAML parser decide
        except RecursionError:
            raise UsageError(f"{source}: nested too deeply") from None
    try:
        documents = list(yaml.load_all(text, Loader=_kubernetes_loader()))
    except yaml.YAMLError as exc:
        # The problem and its place only: the context would quote the input (maybe a Secret).
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise UsageError(f"{source}: not valid YAML or JSON: {problem}{where}") from None
    except RecursionError:
        raise UsageError(f"{source}: nested too deeply") from None
    return [document for document in documents if document is not None]


# Plain scalars as Kubernetes reads them (go-yaml v2 under sigs.k8s.io/yaml), not as
# PyYAML's YAML 1.1 does: `y`/`n` are bools, `080` and `1e3` floats, `0o17` an int,
# while `1:20` (sexagesimal to PyYAML), `=` and timestamps stay strings. Otherwise
# `inject` would read a manifest differently from kubectl and write that reading back.
_GO_BOOL = r"y|Y|yes|Yes|YES|n|N|no|No|NO|true|True|TRUE|false|False|FALSE|on|On|ON|off|Off|OFF"
_GO_INT = r"[-+]?(0[bB][01_]+|0[oO][0-7_]+|0[xX][0-9a-fA-F_]+|0[0-7_]*|[1-9][0-9_]*)"
_GO_FLOAT = (
    r"[-+]?(\.[0-9_]+|[0-9][0-9_]*(\.[0-9_]*)?)([eE][-+]?[0-9_]+)?"
    r"|[-+]?\.(inf|Inf|INF)|\.(nan|NaN|NAN)|\.[0-9_]*([eE][-+]?[0-9_]+)?"
)


def _json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object; a key twice goes to the YAML reader, which names its line."""
    mapping = dict(pairs)
    if len(mapping) < len(pairs):
        raise ValueError("a key appears twice")
    return mapping


def _kubernetes_loader() -> Any:
    import re  # noqa: PLC0415

    import yaml  # noqa: PLC0415

    loader: Any = type("KubernetesLoader", (yaml.SafeLoader,), {})
    loader.yaml_implicit_resolvers = {}
    digits = list("-+0123456789.")
    for tag, pattern, first in (
        ("bool", _GO_BOOL, list("yYnNtTfFoO")),
        ("null", r"~|null|Null|NULL|", ["~", "n", "N", ""]),
        ("int", _GO_INT, digits),
        ("float", _GO_FLOAT, digits),
        ("merge", r"<<", ["<"]),
    ):
        regexp = re.compile(f"^(?:{pattern})$")
        loader.add_implicit_resolver(f"tag:yaml.org,2002:{tag}", regexp, first)

    def construct_bool(self: Any, node: Any) -> bool:
        return str(self.construct_scalar(node)).lower() in ("y", "yes", "true", "on")

    def construct_int(self: Any, node: Any) -> int | str:
        text = str(self.construct_scalar(node))
        plain = text.replace("_", "")
        unsigned = plain.lstrip("+-")
        try:
            if len(unsigned) > 1 and unsigned[0] == "0" and unsigned[1].isdigit():
                return int(plain, 8)  # Go: a leading 0 is octal
            return int(plain, 0)
        except ValueError:  # "0x_": Go reads no number either
            return text

    def construct_float(self: Any, node: Any) -> float | str:
        text = str(self.construct_scalar(node))
        plain = text.replace("_", "")
        special = {".inf": "inf", "+.inf": "inf", "-.inf": "-inf", ".nan": "nan"}
        try:
            return float(special.get(plain.lower(), plain))
        except ValueError:  # ".": a string to Go too
            return text

    loader.add_constructor("tag:yaml.org,2002:bool", construct_bool)
    loader.add_constructor("tag:yaml.org,2002:int", construct_int)
    loader.add_constructor("tag:yaml.org,2002:float", construct_float)
    loader.construct_mapping = _unique_keys(loader.construct_mapping)
    return loader


def _unique_keys(construct_mapping: Any) -> Any:
    """A mapping with a key twice says two things; PyYAML keeps the last silently, a
    reviewer may read the first (`inject: "false"` above `inject: "true"`): refused."""
    import yaml  # noqa: PLC0415

    def construct(self: Any, node: Any, deep: bool = False) -> Any:
        # The keys written here, before merge keys (`<<: *base`, whose keys these may
        # override) are flattened into the node.
        written = [key for key, _ in node.value if key.tag != "tag:yaml.org,2002:merge"]
        mapping = construct_mapping(self, node, deep=deep)
        seen: set[Any] = set()
        for key_node in written:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, "a key appears twice in one mapping", key_node.start_mark
                )
            seen.add(key)
        return mapping

    return construct


class _Octal(int):
    """A file mode, written the way people read it (0440, not 288)."""


_MODE_KEYS = frozenset({"defaultMode", "mode"})


def _octal_modes(node: Any, seen: dict[int, Any]) -> Any:
    """`node` with file modes as `_Octal`. YAML aliases make the documents a graph whose
    tree can be exponentially large (a "billion laughs"): each shared node is converted
    once and stays shared, so the dump writes it once, with an alias, as it came."""
    if not isinstance(node, list | dict):
        return node
    if id(node) in seen:
        return seen[id(node)]
    if isinstance(node, list):
        items: list[Any] = []
        seen[id(node)] = items
        items.extend(_octal_modes(item, seen) for item in node)
        return items
    converted: dict[Any, Any] = {}
    seen[id(node)] = converted
    for key, value in node.items():
        mode = key in _MODE_KEYS and type(value) is int and 0 <= value <= 0o777
        converted[key] = _Octal(value) if mode else _octal_modes(value, seen)
    return converted


# Plain scalars that Kubernetes' reader (go-yaml v2, under sigs.k8s.io/yaml) resolves
# to a bool or a number although PyYAML writes them unquoted: its YAML 1.1 bools
# include y/n, and it reads any plain scalar starting with a digit, a sign or a dot
# with Go's ParseInt(base 0) and ParseFloat ("080", "1e3", "0o17").
_GO_YAML_BOOLS = frozenset(["y", "Y", "n", "N"])


def _not_a_string_to_go_yaml(text: str) -> bool:
    if text in _GO_YAML_BOOLS:
        return True
    if not text or text[0] not in "0123456789+-.":
        return False
    plain = text.replace("_", "")
    for parse in (lambda t: int(t, 0), float, float.fromhex):
        try:
            parse(plain)
        except ValueError:
            continue
        return True
    return False


def dump_documents(documents: list[Any]) -> str:
    """YAML, kubectl's way: keys in their order, scripts as block scalars, modes in octal."""
    import yaml  # noqa: PLC0415

    def represent_str(dumper: Any, data: str) -> Any:
        # The emitter falls back to quoting when a block scalar cannot hold the text exactly.
        style = "|" if "\n" in data else "'" if _not_a_string_to_go_yaml(data) else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)

    def represent_octal(dumper: Any, data: _Octal) -> Any:
        # YAML 1.1 (PyYAML, and kubectl's parser) reads a leading 0 as octal.
        return dumper.represent_scalar("tag:yaml.org,2002:int", f"0{int(data):o}")

    seen: dict[int, Any] = {}
    dumper: Any = type("Dumper", (yaml.SafeDumper,), {})
    dumper.add_representer(str, represent_str)
    dumper.add_representer(_Octal, represent_octal)
    return str(
        yaml.dump_all(
            [_octal_modes(document, seen) for document in documents],
            Dumper=dumper,
            sort_keys=False,
            default_flow_style=False,
            width=1 << 16,
        )
    )
